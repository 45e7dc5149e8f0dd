"""Ragged token sequences of a block of cells, and the ranking shared by rank-based schemes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from celltron.tokenizers import _kernels

NORMALISED_TOTAL = _kernels.NORMALISED_TOTAL


@dataclass
class RaggedTokens:
    """Token ids (and values, for schemes that have them) of a block of cells: cell i is
    `[offsets[i]:offsets[i + 1]]` of each array."""

    input_ids: np.ndarray
    offsets: np.ndarray
    values: np.ndarray | None = None
    modality_ids: np.ndarray | None = None  # multi-modal tokens: 0 RNA, 1 proteins, 2 chromatin (tokenizers/multimodal.py)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.input_ids[self.offsets[i] : self.offsets[i + 1]]

    def cell_values(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def bind_genes(vocab, gene_ids, medians: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per input gene: its token id and median; genes without a token or a positive median get
    token -1 (dropped) and a harmless median of 1."""
    gene_ids = np.asarray(gene_ids, dtype=str)
    median = np.array([medians.get(g, np.nan) for g in gene_ids], dtype=np.float64)
    token = vocab.lookup_genes(gene_ids)
    usable = (token >= 0) & np.isfinite(median) & (median > 0)
    return np.where(usable, token, -1), np.where(usable, median, 1.0)


def sorted_within_cells(cell: np.ndarray, genes: np.ndarray, counts: np.ndarray):
    """Genes in input order within each cell (CSR from a corpus already is), for tie-breaking."""
    descending = np.diff(genes) < 0
    if not (descending & (np.diff(cell) == 0)).any():
        return genes, counts
    order = np.lexsort((genes, cell))
    return genes[order], counts[order]


def rank_cells(
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
    """Rank each cell's expressed, tokenised genes by count / n_counts x 10,000 / median,
    highest first (ties in input gene order), keep the first `limit`, and lay them out with
    room for `prefix` and `suffix` special tokens per cell. `float32_cells` (a flag per cell)
    marks cells of float32 sources, whose values take Geneformer's float32 steps
    (`_kernels.geneformer_values`).

    Returns:
        offsets of the laid-out cells, the output array of token ids (specials still to be
        written), and by `values_kind`: 'raw' the normalised value of every placed token
        (float64), 'log2p1' log2(1 + that value) (float32, GeneCompass's), 'none' nothing
        (an empty array); 0 at special positions.
    """
    counts = np.asarray(counts)
    integral = np.issubdtype(counts.dtype, np.integer)  # the kernel takes raw counts
    if _kernels.available() and integral:
        ranked = _kernels.rank_cells_compiled(
            indptr, genes, counts, n_counts, token_of_gene, median, limit, prefix, suffix, values_kind, float32_cells
        )
        if ranked is not None:
            return ranked
    n_cells = len(indptr) - 1
    cell = np.repeat(np.arange(n_cells), np.diff(indptr))
    genes, counts = sorted_within_cells(cell, genes, counts)
    if n_counts is None:
        n_counts = np.bincount(cell, weights=counts, minlength=n_cells)
    tokens = token_of_gene[genes]
    keep = (tokens >= 0) & (counts > 0)
    cell, genes, tokens = cell[keep], genes[keep], tokens[keep]
    # Same operations in the same order as Geneformer (count / n_counts * 10,000 / median), so
    # near-ties round alike; negated so that an ascending stable sort ranks the highest first.
    single = None if float32_cells is None else np.asarray(float32_cells, dtype=bool)[cell]
    negated = -_kernels.geneformer_values(counts[keep], np.asarray(n_counts, dtype=np.float64)[cell], median[genes], single)
    kept_indptr = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=n_cells))])
    lengths = np.minimum(np.diff(kept_indptr), limit)
    offsets = np.concatenate([[0], np.cumsum(lengths + prefix + suffix)])
    out = np.zeros(offsets[-1], dtype=np.int64)  # special positions stay 0 until the caller fills them
    values = np.zeros(offsets[-1], dtype=np.float64)
    # One small sort per cell is faster than a global sort of the block. Quicksort, then the
    # stable sort only for cells with exact ties, which must keep input gene order; once ties
    # turn out to be the rule (medians shared by many genes), go straight to the stable sort.
    ties = 0
    for i in range(n_cells):
        lo, hi = kept_indptr[i], kept_indptr[i + 1]
        segment = negated[lo:hi]
        if ties > 8 and ties * 2 > i:
            ranked = np.argsort(segment, kind="stable")
        else:
            ranked = np.argsort(segment)
            if (np.diff(segment[ranked]) == 0).any():
                ties += 1
                ranked = np.argsort(segment, kind="stable")
        ranked = ranked[: lengths[i]]
        start = offsets[i] + prefix
        out[start : start + lengths[i]] = tokens[lo:hi][ranked]
        values[start : start + lengths[i]] = -negated[lo:hi][ranked]
    if values_kind == "log2p1":
        return offsets, out, np.log2(1.0 + values).astype(np.float32)
    return offsets, out, values if values_kind == "raw" else values[:0]
