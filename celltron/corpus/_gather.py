"""Rows of a window's CSR blocks copied into one batch.

A compiled slice-copy loop (numba, a core dependency; it runs without the GIL) reads the
blocks where they are, so a window is never concatenated; `CELLTRON_NUMBA=0` (or a missing
numba) gives the same arrays from numpy fancy indexing, one pass per block."""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
    from numba.typed import List as TypedList
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = TypedList = None


def compiled() -> bool:
    return numba is not None and os.environ.get("CELLTRON_NUMBA", "1") != "0"


class Blocks:
    """The CSR arrays (indptr, indices, values) of a window's blocks, in window order."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p[0]) - 1 for p in parts])]).astype(np.int64)
        # typed lists cost a few microseconds per block, paid once per window, not per batch
        self.typed = tuple(TypedList([p[k] for p in parts]) for k in range(3)) if compiled() else None

    def locate(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block, row in block) of window positions `order`."""
        which = np.searchsorted(self.starts, order, side="right") - 1
        return which, order - self.starts[which]

    def gather(self, which: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, indices, values) of the chosen rows, in the chosen order."""
        if self.typed is not None:
            lengths = _lengths(self.typed[0], which, rows)
        else:
            lengths = np.empty(len(rows), dtype=np.int64)
            for b, (indptr, _, _) in enumerate(self.parts):
                mine = which == b
                lengths[mine] = indptr[rows[mine] + 1] - indptr[rows[mine]]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        indices = np.empty(offsets[-1], dtype=self.parts[0][1].dtype)
        values = np.empty(offsets[-1], dtype=self.parts[0][2].dtype)
        if self.typed is not None:
            _copy_slices(*self.typed, which, rows, offsets, indices, values)
        else:
            self._copy_with_numpy(which, rows, offsets, lengths, indices, values)
        return offsets, indices, values

    def _copy_with_numpy(self, which, rows, offsets, lengths, indices, values) -> None:
        for b, (indptr, block_indices, block_values) in enumerate(self.parts):
            mine = np.flatnonzero(which == b)
            if not len(mine):
                continue
            n = lengths[mine]
            within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
            source = np.repeat(indptr[rows[mine]].astype(np.int64), n) + within
            destination = np.repeat(offsets[mine], n) + within
            indices[destination] = block_indices[source]
            values[destination] = block_values[source]


def _lengths(indptrs, which, rows):
    out = np.empty(len(rows), dtype=np.int64)
    for i in range(len(rows)):
        indptr = indptrs[which[i]]
        out[i] = indptr[rows[i] + 1] - indptr[rows[i]]
    return out


def _copy_slices(indptrs, indices, values, which, rows, offsets, out_indices, out_values):
    for i in range(len(rows)):
        b = which[i]
        lo = indptrs[b][rows[i]]
        at, n = offsets[i], offsets[i + 1] - offsets[i]
        out_indices[at : at + n] = indices[b][lo : lo + n]
        out_values[at : at + n] = values[b][lo : lo + n]


if numba is not None:
    _lengths = numba.njit(cache=True, nogil=True)(_lengths)
    _copy_slices = numba.njit(cache=True, nogil=True)(_copy_slices)


def place_rows(indptr, rows, piece_indptr, piece_indices, piece_values, indices, values) -> None:
    """Copy a CSR piece's row k into row rows[k] of the CSR (indptr, indices, values), whose
    row pointers are already final (the corpus build assembles a shuffled shard this way,
    straight from its staging files, with no second copy to put rows in order)."""
    if compiled():
        _place_rows(indptr, rows, piece_indptr, piece_indices, piece_values, indices, values)
        return
    lengths = np.diff(piece_indptr)
    shift = np.repeat(indptr[rows] - piece_indptr[:-1], lengths)
    destination = np.arange(piece_indptr[0], piece_indptr[-1], dtype=np.int64) + shift
    indices[destination] = piece_indices[piece_indptr[0] : piece_indptr[-1]]
    values[destination] = piece_values[piece_indptr[0] : piece_indptr[-1]]


def _place_rows(indptr, rows, piece_indptr, piece_indices, piece_values, indices, values):
    for k in range(len(rows)):
        lo, at = piece_indptr[k], indptr[rows[k]]
        n = piece_indptr[k + 1] - lo
        indices[at : at + n] = piece_indices[lo : lo + n]
        values[at : at + n] = piece_values[lo : lo + n]


if numba is not None:
    _place_rows = numba.njit(cache=True, nogil=True)(_place_rows)
