"""Highly variable genes as scanpy's `pp.highly_variable_genes` selects them, over a matrix in
memory or over blocks of cells streamed from a corpus larger than memory.

scGPT's Preprocessor keeps the `n_top_genes` most variable genes (flavor `seurat_v3` on raw
counts by default); `BinnedTokenizer(genes_subset=...)` then tokenises only those. Flavors, as
scanpy computes them:

- `seurat_v3` (Stuart et al. 2019), on raw counts. Per batch, a loess (span 0.3, degree 2;
  scikit-misc's, the one scanpy uses) of log10 variance on log10 mean gives each gene a
  regularised standard deviation; counts are clipped at mean + sqrt(cells) x that deviation, and
  the variance of the standardised clipped counts is the gene's normalised variance. Genes are
  ranked per batch; a gene's rank is its median rank over the batches where it is in the top
  `n_top_genes`. Genes are ordered by that rank, then by the number of such batches
  (`seurat_v3_paper`: by the number of batches first).
- `seurat` (Satija et al. 2015) and `cell_ranger` (Zheng et al. 2017), on log1p-normalised
  values. The dispersion (variance / mean, of expm1 values and then logged for `seurat`) is
  normalised within bins of mean expression: by the mean and std of 20 equal-width bins
  (`seurat`) or the median and MAD of 5%-quantile bins (`cell_ranger`). Every gene at or above
  the n-th highest normalised dispersion is kept (ties at the cut-off included). With batches,
  each batch selects among its expressed genes, and genes are ordered by the number of batches
  that select them, then by mean normalised dispersion.

Streaming: everything is a per-batch, per-gene sum, so one pass over the blocks gives means and
variances and `seurat_v3` takes a second pass for the clipped sums. Sums are added value by
value in cell order, as scanpy's loops add them, so on raw counts they are the very same numbers
and the selected set is scanpy's, ties included.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.errors import ConfigError, InputError

COUNT_FLAVORS = ("seurat_v3", "seurat_v3_paper")
DISPERSION_FLAVORS = ("seurat", "cell_ranger")
FLAVORS = COUNT_FLAVORS + DISPERSION_FLAVORS


@dataclass
class HighlyVariableGenes:
    """A selection and its per-gene statistics, under scanpy's column names (`means`,
    `variances`, `variances_norm`, `highly_variable_rank`, `highly_variable_nbatches` for
    seurat_v3; `means`, `dispersions`, `dispersions_norm`, `highly_variable_nbatches` for the
    dispersion flavors)."""

    flavor: str
    highly_variable: np.ndarray
    statistics: dict[str, np.ndarray]

    @property
    def selected(self) -> np.ndarray:
        """Indices of the selected genes, in gene order."""
        return np.flatnonzero(self.highly_variable)

    def to_frame(self, gene_names=None) -> pd.DataFrame:
        frame = pd.DataFrame(self.statistics, index=gene_names)
        frame["highly_variable"] = self.highly_variable
        return frame


def highly_variable_genes(
    data,
    n_top_genes: int,
    flavor: str = "seurat_v3",
    batch=None,
    span: float = 0.3,
    n_bins: int = 20,
    expressed_only: bool = False,
    gene_names=None,
) -> HighlyVariableGenes:
    """The `n_top_genes` most variable genes of cells x genes data, as scanpy selects them.

    Args:
        data: a matrix (scipy sparse, CSR best, or dense), or a callable returning an iterable
            of blocks over the same genes: matrices, or (matrix, batch labels) pairs. It is
            called once, or twice for seurat_v3, and must give the same cells each time.
        n_top_genes: genes to select.
        flavor: 'seurat_v3' (default; raw counts), 'seurat_v3_paper', 'seurat' or 'cell_ranger'
            (log1p-normalised values, natural log).
        batch: with a matrix, a batch label per cell (scanpy's `batch_key` column).
        span: the loess span of seurat_v3.
        n_bins: mean-expression bins of the seurat flavor.
        expressed_only: select among genes with a positive value in some cell, as scanpy does
            on data filtered with `filter_genes(min_cells=1)`; the others get zero statistics
            and are never selected. cell_ranger needs it where many genes are unexpressed.
        gene_names: used only to break ties of batched dispersion flavors as scanpy does (it
            orders genes by name there); gene order otherwise.
    """
    if flavor not in FLAVORS:
        raise ConfigError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < 1:
        raise ConfigError(f"n_top_genes must be a positive integer, got {n_top_genes!r}")
    if flavor in COUNT_FLAVORS:
        _loess()  # fail before reading any data
    blocks = _block_source(data, batch)
    check = _check_raw_counts if flavor in COUNT_FLAVORS else _check_non_negative
    # scanpy's seurat flavor takes mean and variance of expm1 values (the normalised counts)
    transform = (lambda x: x.expm1()) if flavor == "seurat" else (lambda x: x)
    batches, moments = _first_pass(blocks, check, transform)
    expressed = np.sum(moments.expressed, axis=0) > 0
    candidates = np.flatnonzero(expressed) if expressed_only else np.arange(moments.n_genes)
    if n_top_genes > len(candidates):
        among = "genes with a positive value in these cells" if expressed_only else "genes"
        raise ConfigError(f"n_top_genes={n_top_genes} is more than the {len(candidates)} {among}")
    if flavor in COUNT_FLAVORS:
        return _seurat_v3(blocks, batches, moments, n_top_genes, flavor, span, candidates)
    if batches.labels == [None]:
        return _dispersion_single(moments, n_top_genes, flavor, n_bins, candidates)
    return _dispersion_batched(batches, moments, n_top_genes, flavor, n_bins, candidates, gene_names)


def _loess():
    try:
        from skmisc.loess import loess
    except ImportError as error:
        raise ImportError(
            "seurat_v3 highly variable genes fit a loess with scikit-misc (as scanpy does); "
            "install it with: pip install 'celltron[hvg]'"
        ) from error
    return loess


def _as_csr(x) -> sp.csr_matrix:
    return x.tocsr() if sp.issparse(x) else sp.csr_matrix(np.asarray(x))


def _block_source(data, batch) -> Callable[[], Iterator[tuple[sp.csr_matrix, np.ndarray | None]]]:
    """Both inputs as a callable yielding (CSR block, batch labels or None)."""
    if callable(data):
        if batch is not None:
            raise ValueError("with blocks, give each block's batch labels with it: yield (matrix, labels)")

        def pairs(items: Iterable):
            for item in items:
                matrix, labels = item if isinstance(item, tuple) else (item, None)
                yield _as_csr(matrix), labels

        return lambda: pairs(data())
    if batch is not None and len(batch) != data.shape[0]:
        raise ValueError(f"{len(batch)} batch labels for {data.shape[0]} cells")
    matrix = _as_csr(data)
    return lambda: iter([(matrix, batch)])


def _check_raw_counts(values: np.ndarray) -> None:
    if values.size and (values.min() < 0 or not np.array_equal(values, np.round(values))):
        raise InputError(
            "seurat_v3 expects raw counts (non-negative integers) but found negative or non-integer "
            "values: pass the counts layer (e.g. --layer counts, or adata.layers['counts']), "
            "not normalised or log-transformed data"
        )


def _check_non_negative(values: np.ndarray) -> None:
    if values.size and values.min() < 0:
        raise InputError("seurat and cell_ranger expect log1p-normalised (non-negative) values, found negative ones")


class _Batches:
    """Batch labels in first-seen order, and the split of a block into its batches' rows."""

    def __init__(self):
        self.labels: list = []
        self._codes: dict = {}

    def split(self, x: sp.csr_matrix, labels, grow: bool = True) -> Iterator[tuple[int, sp.csr_matrix]]:
        if labels is None:
            yield self._code(None, grow), x
            return
        labels = np.asarray(labels)
        if len(labels) != x.shape[0]:
            raise ValueError(f"{len(labels)} batch labels for a block of {x.shape[0]} cells")
        if pd.isna(labels).any():
            raise InputError("some cells have no batch label")
        uniques, inverse = np.unique(labels, return_inverse=True)
        for i, label in enumerate(uniques):
            yield self._code(label, grow), x if len(uniques) == 1 else x[inverse == i]

    def _code(self, label, grow: bool) -> int:
        if label not in self._codes:
            if not grow:
                raise ValueError(f"batch {label!r} appeared only on the second pass: the blocks must be the same both times")
            if self.labels == [None] or (label is None and self.labels):
                raise ValueError("give batch labels with every block or with none")
            self._codes[label] = len(self.labels)
            self.labels.append(label)
        return self._codes[label]

    def in_label_order(self) -> list[int]:
        """Codes in the order of their sorted labels (scanpy goes through batches that way)."""
        return sorted(range(len(self.labels)), key=lambda code: self.labels[code] if self.labels[code] is not None else "")


def _add_in_order(total: np.ndarray, genes: np.ndarray, values: np.ndarray) -> None:
    """total[g] += every value of gene g, one at a time in the order given. np.bincount adds its
    weights in input order, and starting it from the running total (each gene's first weight)
    makes block-by-block sums the very same numbers as one loop over all cells, scanpy's way."""
    n = len(total)
    total[:] = np.bincount(np.concatenate([np.arange(n), genes]), weights=np.concatenate([total, values]), minlength=n)


def _mean_var(cells: int, sums: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance, with scanpy's operations in scanpy's order (same rounding)."""
    mean = sums / cells
    var = squares / cells - (sums / cells) ** 2
    if cells != 1:
        var *= cells / (cells - 1)
    return mean, var


class _Moments:
    """Per batch and gene: cells, sum, sum of squares, and cells with a positive value."""

    def __init__(self, n_genes: int):
        self.n_genes = n_genes
        self.cells: list[int] = []
        self.sums: list[np.ndarray] = []
        self.squares: list[np.ndarray] = []
        self.expressed: list[np.ndarray] = []

    def add(self, code: int, x: sp.csr_matrix) -> None:
        while len(self.cells) <= code:
            self.cells.append(0)
            for table in (self.sums, self.squares, self.expressed):
                table.append(np.zeros(self.n_genes))
        self.cells[code] += x.shape[0]
        values = x.data
        # squared in the data's own precision, as scanpy's kernel squares them
        squares = values * values if np.issubdtype(values.dtype, np.floating) else np.square(values.astype(np.float64))
        _add_in_order(self.sums[code], x.indices, values)
        _add_in_order(self.squares[code], x.indices, squares)
        self.expressed[code] += np.bincount(x.indices[values > 0], minlength=self.n_genes)

    def mean_var(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        return _mean_var(self.cells[code], self.sums[code], self.squares[code])

    def overall_mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        return _mean_var(sum(self.cells), np.sum(self.sums, axis=0), np.sum(self.squares, axis=0))


def _first_pass(blocks, check, transform) -> tuple[_Batches, _Moments]:
    batches, moments = _Batches(), None
    for x, labels in blocks():
        check(x.data)
        x = transform(x)
        if moments is None:
            moments = _Moments(x.shape[1])
        if x.shape[1] != moments.n_genes:
            raise ValueError(f"a block has {x.shape[1]} genes, an earlier one {moments.n_genes}")
        for code, rows in batches.split(x, labels):
            moments.add(code, rows)
    if moments is None or sum(moments.cells) == 0:
        raise InputError("no cells to select highly variable genes from")
    return batches, moments


def _scatter(values: np.ndarray, columns: np.ndarray, n: int, fill=0) -> np.ndarray:
    full = np.full(n, fill, dtype=np.asarray(values).dtype)
    full[columns] = values
    return full


# --- seurat_v3 -------------------------------------------------------------------------------


def _regularised_std(mean: np.ndarray, var: np.ndarray, span: float, where: str) -> np.ndarray:
    """sqrt of the loess fit of log10 variance on log10 mean (genes of zero variance: 1)."""
    varies = var > 0
    if not varies.any():
        raise InputError(f"seurat_v3: no gene varies among {where}, so there is no trend to fit; leave these cells out")
    fitted = np.zeros(len(mean))
    model = _loess()(np.log10(mean[varies]), np.log10(var[varies]), span=span, degree=2)
    try:
        model.fit()
    except ValueError as error:  # scikit-misc's near-singular fits; scanpy fails the same way
        raise InputError(
            f"seurat_v3's loess fit failed on {where} ({error}); with few cells, "
            f"a larger span than {span} (e.g. 0.5) usually fits"
        ) from error
    fitted[varies] = model.outputs.fitted_values
    return np.sqrt(10**fitted)


def _clipped_sums(blocks, batches: _Batches, moments: _Moments, clip: dict) -> tuple[dict, dict]:
    """Second pass: per batch and gene, sums and sums of squares of min(count, clip)."""
    sums = {code: np.zeros(moments.n_genes) for code in clip}
    squares = {code: np.zeros(moments.n_genes) for code in clip}
    cells = dict.fromkeys(clip, 0)
    for x, labels in blocks():
        for code, rows in batches.split(x, labels, grow=False):
            clipped = np.minimum(rows.data.astype(np.float64), clip[code][rows.indices])
            _add_in_order(sums[code], rows.indices, clipped)
            _add_in_order(squares[code], rows.indices, clipped**2)
            cells[code] += rows.shape[0]
    if [cells[code] for code in clip] != [moments.cells[code] for code in clip]:
        raise ValueError("the second pass over the blocks gave other cells than the first: they must be the same both times")
    return sums, squares


def _seurat_v3(blocks, batches, moments, n_top, flavor, span, candidates) -> HighlyVariableGenes:
    codes = batches.in_label_order()
    fits = {}
    for code in codes:
        label, n = batches.labels[code], moments.cells[code]
        where = f"{n} cells" if label is None else f"batch '{label}' ({n} cells)"
        if n < 2:
            raise InputError(f"seurat_v3 needs at least 2 cells per batch; {where}")
        mean, var = moments.mean_var(code)
        reg_std = _regularised_std(mean, var, span, where)
        fits[code] = mean, reg_std, reg_std * np.sqrt(moments.cells[code]) + mean
    sums, squares = _clipped_sums(blocks, batches, moments, {code: fit[2] for code, fit in fits.items()})
    normalised = []
    for code in codes:
        n, (mean, reg_std, _) = moments.cells[code], fits[code]
        # the variance of (clipped count - mean) / reg_std, expanded into the sums (scanpy's order)
        normalised.append((1 / ((n - 1) * np.square(reg_std))) * ((n * np.square(mean)) + squares[code] - 2 * sums[code] * mean))
    normalised = np.stack(normalised)
    # argsort twice gives ranks; the same calls as scanpy's so that exact ties rank the same way
    ranks = np.argsort(np.argsort(-normalised[:, candidates], axis=1), axis=1).astype(np.float32)
    n_batches = np.sum(ranks < n_top, axis=0)
    ranks[ranks >= n_top] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # genes in no batch's top: all-NaN median
        median_rank = np.nanmedian(ranks, axis=0)
    # lexsort is stable and puts NaN last: ties keep gene order, as pandas' sort_values does
    if flavor == "seurat_v3":
        order = np.lexsort((-n_batches, median_rank))
    else:
        order = np.lexsort((median_rank, -n_batches))
    means, variances = moments.overall_mean_var()
    n_genes = moments.n_genes
    statistics = {
        "means": means,
        "variances": variances,
        "variances_norm": np.mean(normalised, axis=0),
        "highly_variable_rank": _scatter(median_rank, candidates, n_genes, np.nan),
        "highly_variable_nbatches": _scatter(n_batches, candidates, n_genes),
    }
    chosen = np.zeros(n_genes, dtype=bool)
    chosen[candidates[order[:n_top]]] = True
    return HighlyVariableGenes(flavor, chosen, statistics)


# --- seurat and cell_ranger -------------------------------------------------------------------


def _mean_bins(means: np.ndarray, flavor: str, n_bins: int) -> np.ndarray:
    """Bin of each gene's mean: pandas.cut's bins (right-closed) as scanpy asks for them."""
    if flavor == "seurat":
        low, high = means.min(), means.max()
        if low == high:  # pandas widens a zero range by 0.1% on both sides
            low, high = (low - 0.001 * abs(low), high + 0.001 * abs(high)) if low != 0 else (-0.001, 0.001)
            edges = np.linspace(low, high, n_bins + 1)
        else:  # and otherwise lowers the first edge by 0.1% of the range, so the minimum is inside
            edges = np.linspace(low, high, n_bins + 1)
            edges[0] -= (high - low) * 0.001
    else:
        edges = np.r_[-np.inf, np.percentile(means, np.arange(10, 105, 5)), np.inf]
        if len(np.unique(edges)) < len(edges):
            raise InputError(
                "cell_ranger bins genes by 5% quantiles of their means, and these are not distinct here "
                "(many genes share a mean, e.g. unexpressed genes): select among expressed genes "
                "(expressed_only=True; scanpy raises here too)"
            )
    return np.searchsorted(edges, means, side="left") - 1


def _bin_statistics(dispersions: np.ndarray, bins: np.ndarray, flavor: str) -> tuple[np.ndarray, np.ndarray]:
    """Per bin, the centre and scale that normalise dispersions (NaN dispersions skipped)."""
    from scipy.stats import norm

    # statsmodels' `mad` (scanpy's) divides by the normal's third quartile: a MAD estimates a std
    mad_scale = norm.ppf(0.75)
    centre, scale = np.full(bins.max() + 1, np.nan), np.full(bins.max() + 1, np.nan)
    for b in np.unique(bins):
        values = dispersions[bins == b]
        if flavor == "cell_ranger":
            centre[b] = np.nanmedian(values)
            scale[b] = np.median(np.abs(values - np.median(values)) / mad_scale)  # statsmodels' mad
            continue
        values = values[~np.isnan(values)]
        if len(values) >= 2:
            centre[b], scale[b] = values.mean(), values.std(ddof=1)
        else:  # scanpy: a lone gene's std is undefined, so its normalised dispersion is 1
            centre[b], scale[b] = 0.0, values.mean() if len(values) else np.nan
    return centre, scale


def _dispersion_table(mean, var, flavor: str, n_bins: int, columns: np.ndarray) -> dict[str, np.ndarray]:
    """scanpy's per-batch table (means, dispersions, dispersions_norm) of the genes `columns`."""
    mean, var = mean[columns], var[columns]
    if len(columns) == 0:  # a batch that expresses none of the genes selects none
        return {"means": mean, "dispersions": var, "dispersions_norm": var}
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersions = var / mean
        if flavor == "seurat":
            dispersions[dispersions == 0] = np.nan
            dispersions = np.log(dispersions)
            mean = np.log1p(mean)
        bins = _mean_bins(mean, flavor, n_bins)
        centre, scale = _bin_statistics(dispersions, bins, flavor)
        normalised = (dispersions - centre[bins]) / scale[bins]
    return {"means": mean, "dispersions": dispersions, "dispersions_norm": normalised}


def _top_by_cutoff(normalised: np.ndarray, n_top: int) -> np.ndarray:
    """Every gene at or above the n-th highest normalised dispersion (NaN never), as scanpy does."""
    finite = np.sort(normalised[~np.isnan(normalised)])[::-1]
    if len(finite) == 0:
        return np.zeros(len(normalised), dtype=bool)
    cutoff = finite[min(n_top, len(finite)) - 1]
    return np.nan_to_num(normalised, nan=-np.inf) >= cutoff


def _dispersion_single(moments, n_top, flavor, n_bins, candidates) -> HighlyVariableGenes:
    table = _dispersion_table(*moments.mean_var(0), flavor, n_bins, candidates)
    chosen = _top_by_cutoff(table["dispersions_norm"], n_top)
    n_genes = moments.n_genes
    statistics = {key: _scatter(values, candidates, n_genes) for key, values in table.items()}
    return HighlyVariableGenes(flavor, _scatter(chosen, candidates, n_genes, False), statistics)


def _dispersion_batched(batches, moments, n_top, flavor, n_bins, candidates, gene_names) -> HighlyVariableGenes:
    n_genes = moments.n_genes
    tables, chosen = [], []
    for code in batches.in_label_order():
        expressed = np.flatnonzero(moments.expressed[code] > 0)
        table = _dispersion_table(*moments.mean_var(code), flavor, n_bins, expressed)
        tables.append({key: _scatter(values, expressed, n_genes) for key, values in table.items()})
        chosen.append(_scatter(_top_by_cutoff(table["dispersions_norm"], min(n_top, len(expressed))), expressed, n_genes, False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pandas' mean skips NaN; all-NaN stays NaN
        statistics = {key: np.nanmean([t[key] for t in tables], axis=0) for key in tables[0]}
    n_batches = np.sum(chosen, axis=0)
    statistics["highly_variable_nbatches"] = n_batches
    # scanpy sorts a table grouped (so ordered) by gene name: ties go by name
    names = np.arange(n_genes) if gene_names is None else np.asarray(gene_names)
    name_order = np.empty(n_genes, dtype=np.int64)
    name_order[np.argsort(names, kind="stable")] = np.arange(n_genes)
    normalised = statistics["dispersions_norm"]
    order = np.lexsort((name_order[candidates], -normalised[candidates], -n_batches[candidates]))
    highly_variable = np.zeros(n_genes, dtype=bool)
    highly_variable[candidates[order[:n_top]]] = True
    return HighlyVariableGenes(flavor, highly_variable, statistics)
