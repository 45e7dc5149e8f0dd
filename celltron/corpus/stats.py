"""Per-gene statistics gathered while a corpus is built.

For every gene: the number of cells expressing it, the sum of its counts, and the non-zero
median of `count / n_counts * 10_000` (Geneformer's normalised expression, which the
rank-value tokenizer divides by). The median is exact while the non-zeros seen so far fit in
memory (`exact_limit` values); past that the values move into a log-bucket sketch, whose
answer alone is within a relative error `SKETCH_RELATIVE_ERROR` of the exact median. Given the
blocks a second time (`nonzero_medians(blocks)`), the sketch names each gene's median bucket
and a second pass keeps only the values in it: the exact median again, in memory bounded by the
sketch and those buckets rather than by the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp

NORMALISED_TOTAL = 10_000.0
SKETCH_RELATIVE_ERROR = 0.005
# Normalised values below this land in the sketch's lowest bucket. A count of 1 in a cell of
# ten million counts is 1e-3, so real values stay above it.
SKETCH_MIN_VALUE = 1e-4
SKETCH_MAX_VALUE = NORMALISED_TOTAL


class LogBucketSketch:
    """Per-gene histogram over logarithmic buckets (DDSketch's mapping).

    A value x falls in bucket ceil(log_gamma(x)) with gamma = (1 + a) / (1 - a); answering a
    quantile with the bucket's centre 2 gamma^i / (gamma + 1) is within relative error a of
    the exact value of that rank.
    """

    def __init__(self, n_genes: int, relative_error: float = SKETCH_RELATIVE_ERROR):
        self.gamma = (1 + relative_error) / (1 - relative_error)
        self.log_gamma = math.log(self.gamma)
        self.offset = math.ceil(math.log(SKETCH_MIN_VALUE) / self.log_gamma)
        n_buckets = math.ceil(math.log(SKETCH_MAX_VALUE) / self.log_gamma) - self.offset + 1
        self.counts = np.zeros((n_genes, n_buckets), dtype=np.uint32)

    def buckets(self, values: np.ndarray) -> np.ndarray:
        """The bucket of each value (the same arithmetic on both passes of an exact median)."""
        buckets = np.ceil(np.log(np.maximum(values, SKETCH_MIN_VALUE)) / self.log_gamma)
        buckets -= self.offset
        np.minimum(buckets, self.counts.shape[1] - 1, out=buckets)  # in place: np.clip copies
        np.maximum(buckets, 0, out=buckets)
        return buckets.astype(np.int64)

    def add(self, genes: np.ndarray, values: np.ndarray) -> None:
        buckets = self.buckets(values)
        flat, repeats = np.unique(genes.astype(np.int64) * self.counts.shape[1] + buckets, return_counts=True)
        self.counts.reshape(-1)[flat] += repeats.astype(np.uint32)

    def middle_buckets(self, genes_per_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per gene: the buckets holding its two middle ranks, (n - 1) // 2 and n // 2 of n
        values (lower, upper; -1 for a gene with none), and how many of its values lie in lower
        buckets. Cumulative counts per chunk of genes, not for all at once."""
        n_genes = self.counts.shape[0]
        lower, upper, below = (np.full(n_genes, -1, dtype=np.int64) for _ in range(3))
        for start in range(0, n_genes, genes_per_chunk):
            cumulative = np.cumsum(self.counts[start : start + genes_per_chunk], axis=1, dtype=np.int64)
            for offset, row in enumerate(cumulative):
                total = row[-1]
                if total == 0:
                    continue
                gene = start + offset
                lower[gene] = np.searchsorted(row, (total - 1) // 2, side="right")
                upper[gene] = np.searchsorted(row, total // 2, side="right")
                below[gene] = row[lower[gene] - 1] if lower[gene] > 0 else 0
        return lower, upper, below

    def medians(self) -> np.ndarray:
        """Median per gene (mean of the two middle ranks, as numpy does); NaN where empty."""
        lower, upper, _ = self.middle_buckets()
        centres = 2 * self.gamma ** (np.arange(self.counts.shape[1]) + self.offset) / (self.gamma + 1)
        out = np.full(len(lower), np.nan)
        has = lower >= 0
        out[has] = (centres[lower[has]] + centres[upper[has]]) / 2
        return out


class GeneStatistics:
    """Accumulates per-gene statistics over CSR blocks of raw counts.

    Args:
        n_genes: number of genes (columns) in the corpus gene table.
        exact_limit: keep at most this many non-zero values for exact medians, then switch
            to the sketch.
    """

    def __init__(self, n_genes: int, exact_limit: int = 16_000_000):
        self.n_genes = n_genes
        self.exact_limit = exact_limit
        self.cells_expressing = np.zeros(n_genes, dtype=np.int64)
        self.count_sum = np.zeros(n_genes, dtype=np.int64)
        self._genes: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._held = 0
        self.sketch: LogBucketSketch | None = None
        self.second_pass = False  # the medians were made exact by a second pass over the blocks

    @property
    def exact(self) -> bool:
        return self.sketch is None

    def add(self, block: sp.csr_matrix, n_counts: np.ndarray) -> None:
        """Add a block of cells (CSR over corpus genes) with their total counts."""
        genes = block.indices
        self.cells_expressing += np.bincount(genes, minlength=self.n_genes)
        self.count_sum += np.bincount(genes, weights=block.data, minlength=self.n_genes).astype(np.int64)
        values = normalised_values(block, n_counts)
        if self.sketch is not None:
            self.sketch.add(genes, values)
            return
        self._genes.append(genes.astype(np.int32))
        self._values.append(values)
        self._held += len(values)
        if self._held > self.exact_limit:
            self._switch_to_sketch()

    def _switch_to_sketch(self) -> None:
        self.sketch = LogBucketSketch(self.n_genes)
        for genes, values in zip(self._genes, self._values):
            self.sketch.add(genes, values)
        self._genes, self._values, self._held = [], [], 0

    def nonzero_medians(self, blocks: Callable[[], Iterable[tuple]] | None = None) -> np.ndarray:
        """Per-gene non-zero median of normalised expression; NaN for genes never seen.
        `blocks()`: the blocks `add` was given, (block, n_counts) again; past `exact_limit` it
        makes the median exact by a second pass (`exact_from_second_pass`), without it the
        sketch answers."""
        if self.sketch is not None:
            if blocks is None:
                return self.sketch.medians()
            return self.exact_from_second_pass(blocks())
        if not self._genes:
            return np.full(self.n_genes, np.nan)
        genes = np.concatenate(self._genes)
        values = np.concatenate(self._values)
        order = np.lexsort((values, genes))
        values = values[order]
        starts = np.concatenate([[0], np.cumsum(self.cells_expressing)[:-1]])
        counts = self.cells_expressing
        out = np.full(self.n_genes, np.nan)
        has = counts > 0
        lower = starts[has] + (counts[has] - 1) // 2
        upper = starts[has] + counts[has] // 2
        out[has] = (values[lower] + values[upper]) / 2
        return out

    def exact_from_second_pass(self, blocks: Iterable[tuple]) -> np.ndarray:
        """Exact medians from the sketch and the blocks again: each gene keeps only the values
        in the buckets of its two middle ranks, sorts them, and reads those ranks off (the
        values below are counted by the sketch). The same numbers as holding every value."""
        lower, upper, below = self.sketch.middle_buckets()
        kept_genes, kept_values = [], []
        for block, n_counts in blocks:
            values = normalised_values(block, n_counts)
            genes = block.indices.astype(np.int64)
            buckets = self.sketch.buckets(values)
            keep = (buckets >= lower[genes]) & (buckets <= upper[genes])
            kept_genes.append(genes[keep])
            kept_values.append(values[keep])
        genes = np.concatenate(kept_genes) if kept_genes else np.zeros(0, np.int64)
        values = np.concatenate(kept_values) if kept_values else np.zeros(0)
        order = np.lexsort((values, genes))
        genes, values = genes[order], values[order]
        starts = np.searchsorted(genes, np.arange(self.n_genes))
        totals = self.cells_expressing
        out = np.full(self.n_genes, np.nan)
        has = totals > 0
        first = starts[has] - below[has]  # position the gene's rank 0 would have
        out[has] = (values[first + (totals[has] - 1) // 2] + values[first + totals[has] // 2]) / 2
        self.second_pass = True
        return out

    def describe_median(self) -> dict:
        """How the medians were computed, for the manifest."""
        if self.exact or self.second_pass:
            return {"method": "exact" if self.exact else "exact_two_pass"}
        return {"method": "log_bucket_sketch", "relative_error": SKETCH_RELATIVE_ERROR}


def normalised_values(block: sp.csr_matrix, n_counts) -> np.ndarray:
    """Each non-zero as count / n_counts x 10,000 (Geneformer's arithmetic, float64), in the
    block's order."""
    per_cell_total = np.repeat(np.asarray(n_counts, dtype=np.float64), np.diff(block.indptr))
    return block.data.astype(np.float64) / per_cell_total * NORMALISED_TOTAL
