"""Compiled per-cell ranking for the rank-value schemes (optional: needs numba, `celltron[fast]`).

Same result as `ragged.rank_cells`' numpy loop, token for token and value for value: within a
cell, genes ordered by value descending, exact ties in input gene order. The numpy loop pays
one comparison argsort per cell plus Python overhead; here each cell is ordered by a two-pass
byte radix sort (O(n)) on the top 16 varying bits of the value's IEEE pattern, which orders
every pair of values that differ in those bits, then an insertion sort settles the small
groups that share them by the full float64 value (stable, so ties stay in input order).
Positive doubles order like their bit patterns, so no value is ever compared approximately.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is optional: without it (or with CELLTRON_NUMBA=0) the numpy loop runs
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

NORMALISED_TOTAL = 10_000.0


def available() -> bool:
    return numba is not None and os.environ.get("CELLTRON_NUMBA", "1") != "0"


def _order_cell(values, bits, lo, m, order, keys, scratch, histogram):
    """Fill order[:m] with 0..m-1 sorted by values[lo:lo + m] descending, ties by index.
    `bits` is `values` viewed as uint64: for positive doubles, a larger value has a larger
    pattern."""
    if m == 0:
        return
    low, high = bits[lo], bits[lo]
    for k in range(lo + 1, lo + m):
        low = min(low, bits[k])
        high = max(high, bits[k])
    shift = np.uint64(0)
    while (high - low) >> shift > np.uint64(0xFFFF):
        shift += np.uint64(1)
    for k in range(m):
        order[k] = k
        keys[k] = np.int64((high - bits[lo + k]) >> shift)  # 16 bits; the largest value gets 0
    # two stable byte passes: low byte, then high byte
    source, target = order, scratch
    for byte_shift in (0, 8):
        histogram[:] = 0
        for k in range(m):
            histogram[((keys[source[k]] >> byte_shift) & 0xFF) + 1] += 1
        for d in range(256):
            histogram[d + 1] += histogram[d]
        for k in range(m):
            digit = (keys[source[k]] >> byte_shift) & 0xFF
            target[histogram[digit]] = source[k]
            histogram[digit] += 1
        source, target = target, source
    # after two passes the result is back in `order`; groups sharing a key are in index
    # order, and a stable insertion sort by the full value finishes them
    for k in range(1, m):
        current = order[k]
        value = values[lo + current]
        p = k - 1
        while p >= 0 and values[lo + order[p]] < value:
            order[p + 1] = order[p]
            p -= 1
        order[p + 1] = current


SMALL_COUNTS = 64  # counts below this take count / n_counts * 10,000 from a per-cell table


def _rank(indptr, genes, counts, n_counts, token_of_gene, median, limit, prefix, suffix, want_values):
    n_cells = len(indptr) - 1
    longest = 0
    for i in range(n_cells):
        longest = max(longest, indptr[i + 1] - indptr[i])
    # One pass, cell by cell, into outputs sized for the most the cells can hold (returned as
    # views of their filled part): large scratch arrays cost more in first touches of fresh
    # memory than the arithmetic here, so per-cell work stays in small buffers.
    capacity = len(genes) + n_cells * (prefix + suffix)
    out = np.empty(capacity, np.int64)
    out_values = np.empty(capacity if want_values else 0, np.float64)
    offsets = np.zeros(n_cells + 1, np.int64)
    values, tokens = np.empty(longest, np.float64), np.empty(longest, np.int64)
    order, keys, scratch = np.empty(longest, np.int64), np.empty(longest, np.int64), np.empty(longest, np.int64)
    histogram = np.empty(257, np.int64)
    scaled = np.empty(SMALL_COUNTS, np.float64)
    bits = values.view(np.uint64)
    for i in range(n_cells):
        total = n_counts[i]
        for c in range(1, SMALL_COUNTS):
            scaled[c] = c / total * NORMALISED_TOTAL  # the same operations as for each gene
        m = 0
        for j in range(indptr[i], indptr[i + 1]):
            count = counts[j]
            token = token_of_gene[genes[j]]
            if count > 0 and token >= 0:
                # the reference's operations in its order: count / n_counts * 10,000 / median
                numerator = scaled[count] if count < SMALL_COUNTS else count / total * NORMALISED_TOTAL
                values[m] = numerator / median[genes[j]]
                tokens[m] = token
                m += 1
        _order_cell(values, bits, 0, m, order, keys, scratch, histogram)
        kept = min(m, limit)
        start = offsets[i]
        offsets[i + 1] = start + kept + prefix + suffix
        for k in range(prefix):
            out[start + k] = 0  # special positions stay 0 until the caller fills them
        for k in range(suffix):
            out[start + prefix + kept + k] = 0
        for k in range(kept):
            out[start + prefix + k] = tokens[order[k]]
        if want_values:
            for k in range(prefix):
                out_values[start + k] = 0.0
            for k in range(suffix):
                out_values[start + prefix + kept + k] = 0.0
            for k in range(kept):
                out_values[start + prefix + k] = values[order[k]]
    end = offsets[n_cells]
    return offsets, out[:end], out_values[:end] if want_values else out_values


def _row_sums(indptr, counts):
    sums = np.zeros(len(indptr) - 1, np.float64)
    for i in range(len(indptr) - 1):
        for j in range(indptr[i], indptr[i + 1]):
            sums[i] += counts[j]
    return sums


def _ascending_within_cells(indptr, genes):
    for i in range(len(indptr) - 1):
        for j in range(indptr[i] + 1, indptr[i + 1]):
            if genes[j] < genes[j - 1]:
                return False
    return True


def _bin_cell(values, levels, uniform, keys, order, scratch, histogram, bins):
    """scGPT's binning of one cell's positive values (see `binned.bin_values`), compiled: the
    values sorted (by `_order_cell`: descending, read back to front), numpy's 'linear'
    quantile at `levels` with its exact operations, then both-sided digitising by binary
    search and the tie spread from `uniform`."""
    n = len(values)
    bits = values.view(np.uint64)
    _order_cell(values, bits, 0, n, order, keys, scratch, histogram)
    edges = np.empty(len(levels), np.float64)
    for q in range(len(levels)):
        virtual = (n - 1) * levels[q]
        previous = np.floor(virtual)
        gamma = virtual - previous
        below = int(previous)
        above = min(below + 1, n - 1)
        a, b = values[order[n - 1 - below]], values[order[n - 1 - above]]  # ascending ranks
        difference = b - a
        edges[q] = b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma
    for k in range(n):
        value = values[k]
        lo, hi = 0, len(edges)  # first edge > value (np.searchsorted side='right')
        while lo < hi:
            mid = (lo + hi) // 2
            if edges[mid] <= value:
                lo = mid + 1
            else:
                hi = mid
        left = lo
        lo, hi = 0, len(edges)  # first edge >= value (side='left')
        while lo < hi:
            mid = (lo + hi) // 2
            if edges[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        bins[k] = np.int64(np.ceil(uniform[k] * (lo - left) + left))


if numba is not None:
    _order_cell = numba.njit(cache=True, nogil=True)(_order_cell)
    _bin_cell = numba.njit(cache=True, nogil=True)(_bin_cell)
    _rank = numba.njit(cache=True, nogil=True)(_rank)
    _ascending_within_cells = numba.njit(cache=True, nogil=True)(_ascending_within_cells)
    _row_sums = numba.njit(cache=True, nogil=True)(_row_sums)


def rank_cells_compiled(indptr, genes, counts, n_counts, token_of_gene, median, limit: int, prefix: int, suffix: int,
                        want_values: bool = True):
    """`ragged.rank_cells` for genes in input order within each cell (`ascending_within_cells`),
    compiled; without `want_values` the values array comes back empty."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    n_counts = _row_sums(indptr, counts) if n_counts is None else np.ascontiguousarray(n_counts, dtype=np.float64)
    return _rank(indptr, genes, counts, n_counts, token_of_gene, median, int(limit), int(prefix), int(suffix), bool(want_values))


def ascending_within_cells(indptr, genes) -> bool:
    return bool(_ascending_within_cells(np.ascontiguousarray(indptr, dtype=np.int64), genes))


def bin_cell_compiled(values: np.ndarray, levels: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """`binned.bin_values` for one cell's positive float64 values, compiled."""
    n = len(values)
    work = np.empty((3, n), np.int64)
    bins = np.empty(n, np.int64)
    _bin_cell(np.ascontiguousarray(values, dtype=np.float64), levels, uniform, work[0], work[1], work[2], np.empty(257, np.int64), bins)
    return bins
