"""Compiled tokenizer kernels (numba, a core dependency; `CELLTRON_NUMBA=0` runs the numpy code).

Each gives the same result as the numpy code it stands in for, token for token and value for
value (tests run both):
- `rank_cells_compiled` (`ragged.rank_cells`, Geneformer and ortholog schemes): within a cell,
  genes by value descending, exact ties in input gene order, values as `geneformer_values`
  computes them (float32 steps for cells of float32 sources). Each cell is ordered by a
  two-pass byte radix sort (O(n)) on the top 16 varying bits of the value's IEEE pattern,
  which orders every pair of values that differ in those bits; an insertion sort then settles
  the small groups that share them by the full float64 value (stable, so ties stay in input
  order). Positive doubles order like their bit patterns, so no value is compared
  approximately. The numpy loop pays a comparison argsort per cell plus Python overhead.
- scGPT's block (`binned.BinnedTokenizer`): `expressed_values` (the Preprocessor's values),
  `bin_cells_compiled` (`binned.bin_values` per cell), `sample_positions` and `lay_out`.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is optional: without it (or with CELLTRON_NUMBA=0) the numpy loop runs
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

NORMALISED_TOTAL = 10_000.0


def geneformer_values(counts, n_counts, medians, float32_cells=None) -> np.ndarray:
    """Geneformer's normalised value of each count (float64): count / n_counts * 10,000 / median.

    Geneformer evaluates `X / n_counts * target_sum / medians` on the scipy sparse matrix of
    its input, and scipy divides a sparse matrix by a dense array by multiplying with the
    reciprocal, in the operands' dtype. For a float32 matrix (and its float32 n_counts) the
    first two steps stay float32: float32(count * float32(1 / n_counts)) * 10,000 in float32;
    the float64 medians then promote: value = float64(that) * (1 / median). Near-ties round
    differently in float64, so cells of float32 sources (`float32_cells`, one flag per value)
    take those steps. Other cells keep float64 division: scipy's float64 products with
    reciprocals may differ from it in the last bit, which changed no ranking of real (PBMC 3k)
    integer or float64 counts.
    """
    counts = np.asarray(counts)
    values = counts / n_counts * NORMALISED_TOTAL / medians
    mine = None if float32_cells is None else np.asarray(float32_cells, dtype=bool)
    if mine is not None and mine.any():
        reciprocal = np.float32(1) / np.asarray(n_counts, dtype=np.float32)[mine]
        scaled = counts[mine].astype(np.float32) * reciprocal * np.float32(NORMALISED_TOTAL)
        values[mine] = scaled.astype(np.float64) * (1.0 / np.asarray(medians)[mine])
    return values


def available() -> bool:
    return numba is not None and os.environ.get("CELLTRON_NUMBA", "1") != "0"


def _order_cell(values, bits, lo, m, order, scratch, histogram):
    """Fill order[:m] with 0..m-1 sorted by values[lo:lo + m] descending, ties by index.
    `bits` is `values` viewed as uint64: for positive doubles, a larger value has a larger
    pattern. `histogram` holds 2 x 257 counters."""
    if m == 0:
        return
    low, high = bits[lo], bits[lo]
    for k in range(lo + 1, lo + m):
        low = min(low, bits[k])
        high = max(high, bits[k])
    shift = np.uint64(0)
    while (high - low) >> shift > np.uint64(0xFFFF):
        shift += np.uint64(1)
    # each entry packs its 16-bit key (the largest value gets 0) above its index, so the radix
    # passes move one integer per gene; both bytes are counted in one pass
    histogram[:] = 0
    for k in range(m):
        key = np.int64((high - bits[lo + k]) >> shift)
        order[k] = (key << 32) | k
        histogram[(key & 0xFF) + 1] += 1
        histogram[257 + (key >> 8) + 1] += 1
    for d in range(256):
        histogram[d + 1] += histogram[d]
        histogram[257 + d + 1] += histogram[257 + d]
    for k in range(m):  # stable pass on the low byte
        digit = (order[k] >> 32) & 0xFF
        scratch[histogram[digit]] = order[k]
        histogram[digit] += 1
    for k in range(m):  # then on the high byte
        digit = 257 + (scratch[k] >> 40)
        order[histogram[digit]] = scratch[k] & 0xFFFFFFFF
        histogram[digit] += 1
    # groups sharing a key are in index order; a stable insertion sort by the full value
    # finishes them
    for k in range(1, m):
        current = order[k]
        value = values[lo + current]
        p = k - 1
        while p >= 0 and values[lo + order[p]] < value:
            order[p + 1] = order[p]
            p -= 1
        order[p + 1] = current


def _longest_cell(indptr):
    longest = 0
    for i in range(len(indptr) - 1):
        longest = max(longest, indptr[i + 1] - indptr[i])
    return longest


SMALL_COUNTS = 64  # counts below this take count / n_counts * 10,000 from a per-cell table


def _zero_specials(array, start, prefix, kept, suffix):
    """Zero a laid-out cell's `prefix` leading and `suffix` trailing positions."""
    for k in range(prefix):
        array[start + k] = 0
    for k in range(suffix):
        array[start + prefix + kept + k] = 0


VALUES_NONE, VALUES_RAW, VALUES_LOG2P1 = 0, 1, 2  # what `_rank` returns beside the tokens


def _scale_small_counts(scaled, total, single):
    """scaled[c] = c / total * 10,000 for c < SMALL_COUNTS, with `geneformer_values`'s
    operations: float64 division, or (`single`, a float32 source) its float32 steps. Those are
    computed in float64 and rounded once to float32, which gives the float32 operation's own
    result: the product of two float32 values is exact in float64, and a float64 quotient
    (53 >= 2 x 24 + 2 bits) rounds to float32 as the float32 division does."""
    if single:
        reciprocal = np.float32(1.0 / np.float64(np.float32(total)))
        for c in range(1, len(scaled)):
            product = np.float32(np.float64(np.float32(c)) * np.float64(reciprocal))
            scaled[c] = np.float64(np.float32(np.float64(product) * NORMALISED_TOTAL))
        return np.float64(reciprocal)
    for c in range(1, len(scaled)):
        scaled[c] = c / total * NORMALISED_TOTAL
    return 0.0


def _value(count, total, single, reciprocal, scaled, median):
    """`geneformer_values` of one count (see `_scale_small_counts` for the float32 steps)."""
    if count < SMALL_COUNTS:
        numerator = scaled[count]
    elif single:
        product = np.float32(np.float64(np.float32(count)) * reciprocal)
        numerator = np.float64(np.float32(np.float64(product) * NORMALISED_TOTAL))
    else:
        numerator = count / total * NORMALISED_TOTAL
    return numerator * (1.0 / median) if single else numerator / median


def _rank(indptr, genes, counts, n_counts, float32_cells, token_of_gene, median, limit, prefix, suffix, values_kind):
    n_cells = len(indptr) - 1
    longest = _longest_cell(indptr)
    # One pass, cell by cell, into outputs sized for the most the cells can hold (returned as
    # views of their filled part): large scratch arrays cost more in first touches of fresh
    # memory than the arithmetic here, so per-cell work stays in small buffers.
    capacity = len(genes) + n_cells * (prefix + suffix)
    out = np.empty(capacity, np.int64)
    # raw values (float64), or log2(1 + value) as float32 (GeneCompass's), or none
    out_values = np.empty(capacity if values_kind == VALUES_RAW else 0, np.float64)
    out_log = np.empty(capacity if values_kind == VALUES_LOG2P1 else 0, np.float32)
    offsets = np.zeros(n_cells + 1, np.int64)
    values, tokens = np.empty(longest, np.float64), np.empty(longest, np.int64)
    order, scratch = np.empty(longest, np.int64), np.empty(longest, np.int64)
    histogram = np.empty(514, np.int64)
    scaled = np.empty(SMALL_COUNTS, np.float64)
    bits = values.view(np.uint64)
    for i in range(n_cells):
        total, single = n_counts[i], float32_cells[i]
        reciprocal = _scale_small_counts(scaled, total, single)
        m = 0
        previous = -1
        for j in range(indptr[i], indptr[i + 1]):
            if genes[j] < previous:  # ties need genes in input order: the numpy loop sorts them
                return offsets, out[:0], out_values[:0], out_log[:0], False
            previous = genes[j]
            count = counts[j]
            token = token_of_gene[genes[j]]
            if count > 0 and token >= 0:
                values[m] = _value(count, total, single, reciprocal, scaled, median[genes[j]])
                tokens[m] = token
                m += 1
        _order_cell(values, bits, 0, m, order, scratch, histogram)
        kept = min(m, limit)
        start = offsets[i]
        offsets[i + 1] = start + kept + prefix + suffix
        # special positions stay 0 (the caller writes the special tokens)
        _zero_specials(out, start, prefix, kept, suffix)
        for k in range(kept):
            out[start + prefix + k] = tokens[order[k]]
        if values_kind == VALUES_RAW:
            _zero_specials(out_values, start, prefix, kept, suffix)
            for k in range(kept):
                out_values[start + prefix + k] = values[order[k]]
        elif values_kind == VALUES_LOG2P1:
            _zero_specials(out_log, start, prefix, kept, suffix)
            for k in range(kept):
                out_log[start + prefix + k] = np.float32(np.log2(1.0 + values[order[k]]))
    end = offsets[n_cells]
    return (
        offsets,
        out[:end],
        out_values[: end if values_kind == VALUES_RAW else 0],
        out_log[: end if values_kind == VALUES_LOG2P1 else 0],
        True,
    )


def _row_sums(indptr, counts):
    sums = np.zeros(len(indptr) - 1, np.float64)
    for i in range(len(indptr) - 1):
        for j in range(indptr[i], indptr[i + 1]):
            sums[i] += counts[j]
    return sums


def _bin_cell(values, bits, first, n, levels, uniform, order, scratch, histogram, edges, bins):
    """scGPT's binning of one cell's positive values values[first:first + n] (see
    `binned.bin_values`), compiled: the values sorted (by `_order_cell`: descending, read back
    to front), numpy's 'linear' quantile at `levels` with its exact operations, then
    both-sided digitising by one walk beside the edges and the tie spread from `uniform`."""
    _order_cell(values, bits, first, n, order, scratch, histogram)
    for q in range(len(levels)):
        virtual = (n - 1) * levels[q]
        previous = np.floor(virtual)
        gamma = virtual - previous
        below = int(previous)
        above = min(below + 1, n - 1)
        a, b = values[first + order[n - 1 - below]], values[first + order[n - 1 - above]]  # ascending ranks
        difference = b - a
        edges[q] = b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma
    # digitise from both sides by walking the values in ascending order beside the edges
    # (np.searchsorted side='right' and side='left'), then spread ties with `uniform`
    at_or_below, below_value = 0, 0
    for r in range(n - 1, -1, -1):
        k = first + order[r]
        value = values[k]
        while at_or_below < len(edges) and edges[at_or_below] <= value:
            at_or_below += 1
        while below_value < len(edges) and edges[below_value] < value:
            below_value += 1
        bins[k] = np.int64(np.ceil(uniform[k] * (below_value - at_or_below) + at_or_below))


def _bin_cells(indptr, values, levels, uniform):
    """`_bin_cell` for every cell of a block (CSR `indptr` over `values`)."""
    longest = _longest_cell(indptr)
    order, scratch = np.empty(longest, np.int64), np.empty(longest, np.int64)
    histogram, edges = np.empty(514, np.int64), np.empty(len(levels), np.float64)
    bins = np.zeros(len(values), np.int64)
    bits = values.view(np.uint64)
    for i in range(len(indptr) - 1):
        if indptr[i + 1] > indptr[i]:
            _bin_cell(values, bits, indptr[i], indptr[i + 1] - indptr[i], levels, uniform, order, scratch, histogram, edges, bins)
    return bins


def sample_positions(lengths, first, max_len, uniform):
    """For each cell longer than `max_len`: its first `first` positions, then `max_len - first`
    of the others, a uniformly random subset in random order (partial Fisher-Yates, one
    uniform per pick, read in order from `uniform`). Returns the positions, cell after cell."""
    picked = np.empty(len(lengths) * max_len, np.int64)
    pool = np.empty(max(lengths.max() if len(lengths) else 0, 1), np.int64)
    at, draw = 0, 0
    for length in lengths:
        for k in range(first):
            picked[at + k] = k
        others = length - first
        for k in range(others):
            pool[k] = first + k
        for k in range(max_len - first):
            swap = k + int(uniform[draw] * (others - k))
            draw += 1
            pool[k], pool[swap] = pool[swap], pool[k]
            picked[at + first + k] = pool[k]
        at += max_len
    return picked


def expressed_values(indptr, genes, counts, in_vocab, token_of_gene, target_sum):
    """scGPT's Preprocessor values of a block, before log1p: each cell's expressed genes that
    have a token, with count / (cell's total over vocabulary genes) * target_sum (target_sum
    <= 0: the raw counts)."""
    n_cells = len(indptr) - 1
    kept_indptr = np.zeros(n_cells + 1, np.int64)
    kept_genes = np.empty(len(genes), genes.dtype)
    values = np.empty(len(genes), np.float64)
    m = 0
    for i in range(n_cells):
        total = 0.0
        for j in range(indptr[i], indptr[i + 1]):
            if in_vocab[genes[j]]:
                total += counts[j]
        for j in range(indptr[i], indptr[i + 1]):
            if counts[j] > 0 and token_of_gene[genes[j]] >= 0:
                kept_genes[m] = genes[j]
                values[m] = counts[j] / total * target_sum if target_sum > 0 else counts[j]
                m += 1
        kept_indptr[i + 1] = m
    return kept_indptr, kept_genes[:m], values[:m]


def lay_out(kept_indptr, tokens, values, first, cls_id, max_len, positions):
    """Each cell's `<cls>` (when `first`) and tokens with their values; cells longer than
    `max_len` take their `positions` (max_len per long cell, in cell order)."""
    n_cells = len(kept_indptr) - 1
    offsets = np.zeros(n_cells + 1, np.int64)
    for i in range(n_cells):
        offsets[i + 1] = offsets[i] + min(kept_indptr[i + 1] - kept_indptr[i] + first, max_len)
    ids = np.empty(offsets[-1], np.int64)
    out_values = np.empty(offsets[-1], np.float64)
    sampled = 0
    for i in range(n_cells):
        lo, at = kept_indptr[i], offsets[i]
        length = kept_indptr[i + 1] - lo + first
        for k in range(min(length, max_len)):
            p = k if length <= max_len else positions[sampled + k]
            if p < first:
                ids[at + k], out_values[at + k] = cls_id, 0.0
            else:
                ids[at + k], out_values[at + k] = tokens[lo + p - first], values[lo + p - first]
        if length > max_len:
            sampled += max_len
    return offsets, ids, out_values


if numba is not None:
    _longest_cell = numba.njit(cache=True, nogil=True)(_longest_cell)
    _zero_specials = numba.njit(cache=True, nogil=True)(_zero_specials)
    expressed_values = numba.njit(cache=True, nogil=True)(expressed_values)
    lay_out = numba.njit(cache=True, nogil=True)(lay_out)
    sample_positions = numba.njit(cache=True, nogil=True)(sample_positions)
    _order_cell = numba.njit(cache=True, nogil=True)(_order_cell)
    _bin_cell = numba.njit(cache=True, nogil=True)(_bin_cell)
    _bin_cells = numba.njit(cache=True, nogil=True)(_bin_cells)
    _scale_small_counts = numba.njit(cache=True, nogil=True)(_scale_small_counts)
    _value = numba.njit(cache=True, nogil=True)(_value)
    _rank = numba.njit(cache=True, nogil=True)(_rank)
    _row_sums = numba.njit(cache=True, nogil=True)(_row_sums)


def rank_cells_compiled(
    indptr,
    genes,
    counts,
    n_counts,
    token_of_gene,
    median,
    limit: int,
    prefix: int,
    suffix: int,
    values_kind: str = "raw",
    float32_cells=None,
):
    """`ragged.rank_cells`, compiled, for integer counts. None when some cell's genes are not in
    ascending order (the numpy loop sorts them first)."""
    kind = {"none": VALUES_NONE, "raw": VALUES_RAW, "log2p1": VALUES_LOG2P1}[values_kind]
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    n_counts = _row_sums(indptr, counts) if n_counts is None else np.ascontiguousarray(n_counts, dtype=np.float64)
    single = np.zeros(len(indptr) - 1, bool) if float32_cells is None else np.ascontiguousarray(float32_cells, dtype=bool)
    offsets, out, raw, log2p1, in_order = _rank(
        indptr, genes, counts, n_counts, single, token_of_gene, median, int(limit), int(prefix), int(suffix), kind
    )
    if not in_order:
        return None
    return offsets, out, log2p1 if kind == VALUES_LOG2P1 else raw


def bin_cells_compiled(indptr, values: np.ndarray, levels: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """`binned.bin_values` of every cell of a block (positive float64 values), compiled."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    return _bin_cells(indptr, np.ascontiguousarray(values, dtype=np.float64), levels, np.ascontiguousarray(uniform))
