"""Readers for raw-count inputs: AnnData .h5ad, 10x Genomics .h5 and 10x mtx directories.

Every reader exposes the same small surface (`Source`): cell names, gene names, the obs table,
and `read_rows(start, stop)` returning a CSR block of cells x genes. Rows are read in blocks so
that an input larger than memory can still be converted.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

from celltron.corpus.genes import MIN_MAPPED_FRACTION, GeneMapping, map_input_genes
from celltron.errors import InputError
from celltron.inputs import open_h5


@dataclass
class Source:
    """One input dataset, opened for block reads.

    Attributes:
        path: the file or directory it was read from.
        name: short dataset name (file stem), stored in the corpus `obs['dataset']`.
        layer: which matrix holds the counts ('X', 'raw' or a layer name).
        gene_names: per gene, its Ensembl ID or symbol as found in the file.
        cell_names: per cell, its barcode / obs name.
        obs: the input's cell annotations (may be empty).
        read_rows: function (start, stop) -> CSR block of those cells.
        modality: rna, adt or atac (multi-modal inputs; named in errors).
    """

    path: Path
    name: str
    layer: str
    gene_names: np.ndarray
    cell_names: np.ndarray
    obs: pd.DataFrame
    read_rows: Callable[[int, int], sp.csr_matrix]
    close: Callable[[], None] = field(default=lambda: None)
    modality: str = "rna"

    @property
    def n_cells(self) -> int:
        return len(self.cell_names)


def open_source(path: str | Path, layer: str = "X", gene_column: str | None = None) -> Source:
    """Open an input for block reads, choosing the reader by what the path is."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        return _open_mtx_dir(path, gene_column)
    if path.suffix == ".h5ad":
        return _open_h5ad(path, layer, gene_column)
    if path.suffix == ".h5":
        return _open_10x_h5(path)
    raise InputError(
        f"{path}: unknown input format; expected a .h5ad file, a 10x .h5 file, or a 10x mtx "
        "directory (matrix.mtx[.gz], features.tsv[.gz] or genes.tsv[.gz], barcodes.tsv[.gz])"
    )


def _decode(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object).astype(str)


# ---------------------------------------------------------------- h5ad


def _h5ad_matrix_path(handle: h5py.File, path: Path, layer: str, group: str = "") -> tuple[str, str]:
    """Where the counts matrix and its var table live for `layer` (under `group`: an AnnData
    stored inside a larger file, e.g. one modality of a MuData file)."""
    if layer == "X":
        where, var = "X", "var"
    elif layer == "raw":
        where, var = "raw/X", "raw/var"
    else:
        where, var = f"layers/{layer}", "var"
    where, var = group + where, group + var
    if where not in handle:
        raise InputError(
            f"{path}: no matrix for --layer {layer} (looked for '{where}'); available: "
            f"{', '.join(h5ad_layers(handle[group] if group else handle)) or 'none'}"
        )
    return where, var


def h5ad_layers(handle: h5py.File) -> list[str]:
    """Names that --layer accepts for this file."""
    names = ["X"] if "X" in handle else []
    names += [f"{name}" for name in handle.get("layers", {}).keys()]
    if "raw/X" in handle:
        names.append("raw")
    return names


def _open_h5ad(path: Path, layer: str, gene_column: str | None) -> Source:
    handle = open_h5(path, require=("obs", "var"))
    return anndata_group_source(handle, path, "", layer, gene_column, path.stem)


def anndata_group_source(
    handle: h5py.File, path: Path, group: str, layer: str, gene_column: str | None, name: str, close: bool = True
) -> Source:
    """A Source over the AnnData stored at `group` of an open HDF5 file ("" for an .h5ad; "mod/rna/"
    for a modality of a MuData .h5mu). `close`: the Source closes the file when closed."""
    from anndata.io import read_elem

    where, var_where = _h5ad_matrix_path(handle, path, layer, group)
    var = read_elem(handle[var_where])
    if gene_column is not None and gene_column not in var.columns:
        handle.close()
        raise InputError(
            f"{path}: --gene-column {gene_column!r} is not a column of {var_where} "
            f"(columns: {', '.join(map(str, var.columns)) or 'none'})"
        )
    genes = var.index.to_numpy() if gene_column is None else var[gene_column].to_numpy()
    obs = read_elem(handle[group + "obs"])
    element = handle[where]
    encoding = element.attrs.get("encoding-type", "array")
    if encoding == "csr_matrix":
        read_rows = _csr_rows(element)
    elif encoding == "csc_matrix":
        # Row blocks of a CSC matrix touch every column: convert once instead.
        whole = read_elem(element).tocsr()
        read_rows = lambda start, stop: whole[start:stop]  # noqa: E731
    else:
        read_rows = lambda start, stop: sp.csr_matrix(element[start:stop])  # noqa: E731
    closer = handle.close if close else (lambda: None)
    return Source(path, name, layer, _decode(genes), _decode(obs.index), obs, read_rows, closer)


def _csr_rows(element: h5py.Group):
    """Rows start:stop of an AnnData CSR group as a scipy CSR, read with h5py: the row pointers
    once, then each block's slice of data and indices (anndata's backed slicing gives the same
    arrays but checks package versions on every read, 4 ms a block)."""
    indptr = element["indptr"][:]
    n_rows, n_columns = (int(n) for n in element.attrs["shape"])

    def read_rows(start: int, stop: int) -> sp.csr_matrix:
        start, stop = min(start, n_rows), min(max(stop, start), n_rows)
        lo, hi = int(indptr[start]), int(indptr[stop])
        pointers = indptr[start : stop + 1] - lo
        return sp.csr_matrix((element["data"][lo:hi], element["indices"][lo:hi], pointers), shape=(stop - start, n_columns))

    return read_rows


# ---------------------------------------------------------------- 10x h5


def tenx_feature_types(path: Path) -> list[str]:
    """The feature types of a 10x h5 file in the order they first appear (Cell Ranger 2 files and
    files without the column hold gene expression only)."""
    with open_h5(path) as handle:
        features = handle["matrix/features"] if "matrix/features" in handle else {}
        if "feature_type" not in features:
            return ["Gene Expression"]
        return list(dict.fromkeys(_decode(features["feature_type"][:])))


def _open_10x_h5(path: Path, feature_type: str = "Gene Expression") -> Source:
    """One feature type of a 10x h5 file (Cell Ranger / Cell Ranger ARC / feature barcoding)."""
    handle = open_h5(path)
    if "matrix" in handle:  # Cell Ranger 3+: one matrix group with a features table
        group = handle["matrix"]
        features = group["features"]
        gene_ids = _decode(features["id"][:])
        keep = np.ones(len(gene_ids), dtype=bool)
        if "feature_type" in features:
            keep = _decode(features["feature_type"][:]) == feature_type
        if feature_type != "Gene Expression":  # proteins and peaks are named, not given ids
            gene_ids = _decode(features["name"][:]) if "name" in features else gene_ids
    else:  # Cell Ranger 2: one group per genome with a genes table
        genomes = [key for key in handle.keys() if isinstance(handle[key], h5py.Group)]
        if len(genomes) != 1 or "genes" not in handle[genomes[0]]:
            handle.close()
            raise InputError(f"{path}: not a 10x Genomics h5 matrix (no 'matrix' group or single genome group)")
        group = handle[genomes[0]]
        gene_ids = _decode(group["genes"][:])
        keep = np.ones(len(gene_ids), dtype=bool)
    indptr = group["indptr"][:]
    n_genes = int(group["shape"][0])
    columns = np.flatnonzero(keep)

    def read_rows(start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(indptr[start]), int(indptr[stop])
        block = sp.csr_matrix(
            (group["data"][lo:hi], group["indices"][lo:hi], indptr[start : stop + 1] - lo),
            shape=(stop - start, n_genes),
        )
        return block if keep.all() else block[:, columns]

    barcodes = _decode(group["barcodes"][:])
    obs = pd.DataFrame(index=pd.Index(barcodes))
    name = path.name.removesuffix(".h5")
    return Source(path, name, "X", gene_ids[keep], barcodes, obs, read_rows, handle.close)


# ---------------------------------------------------------------- 10x mtx


def _first_existing(directory: Path, names: list[str]) -> Path | None:
    for name in names:
        if (directory / name).exists():
            return directory / name
    return None


def _read_tsv(path: Path) -> pd.DataFrame:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return pd.read_csv(handle, sep="\t", header=None, dtype=str)


def _open_mtx_dir(directory: Path, gene_column: str | None) -> Source:
    matrix_file = _first_existing(directory, ["matrix.mtx.gz", "matrix.mtx"])
    genes_file = _first_existing(directory, ["features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"])
    barcodes_file = _first_existing(directory, ["barcodes.tsv.gz", "barcodes.tsv"])
    missing = [
        n for n, f in [("matrix.mtx", matrix_file), ("features.tsv", genes_file), ("barcodes.tsv", barcodes_file)] if f is None
    ]
    if missing:
        raise InputError(f"{directory}: not a 10x mtx directory, missing {', '.join(missing)} (optionally .gz)")
    genes = _read_tsv(genes_file)
    barcodes = _read_tsv(barcodes_file)[0].to_numpy().astype(str)
    matrix = scipy.io.mmread(matrix_file).tocsc()  # genes x cells on disk
    if matrix.shape != (len(genes), len(barcodes)):
        raise InputError(
            f"{matrix_file}: shape {matrix.shape} does not match {len(genes)} genes in "
            f"{genes_file.name} x {len(barcodes)} cells in {barcodes_file.name}"
        )
    keep = np.ones(len(genes), dtype=bool)
    if genes.shape[1] >= 3:
        keep = genes[2].to_numpy() == "Gene Expression"
    column = 1 if gene_column in ("name", "symbol", "gene_symbols") else 0
    cells_by_genes = matrix.T.tocsr()[:, np.flatnonzero(keep)]
    obs = pd.DataFrame(index=pd.Index(barcodes))
    read_rows = lambda start, stop: cells_by_genes[start:stop]  # noqa: E731
    return Source(directory, directory.name, "X", genes[column].to_numpy().astype(str)[keep], barcodes, obs, read_rows)


# ---------------------------------------------------------------- gene mapping

SAMPLE_CELLS = 2_000  # cells whose counts decide whether enough of an input's genes map
SAMPLE_WINDOW = 250


def gene_count_sample(source: Source, max_cells: int = SAMPLE_CELLS, seed: int = 0) -> np.ndarray:
    """Counts per gene over at most `max_cells` cells: every cell of a small input, else windows of
    consecutive cells at seeded random starts (row blocks are cheap to read from compressed files;
    windows spread over the file see more than the first cell type of a sorted one). Magnitudes
    are summed, so a normalised or scaled matrix still gives a share; check_raw_counts judges it."""
    n_cells = source.n_cells
    if n_cells <= max_cells:
        starts = range(0, n_cells, SAMPLE_WINDOW)
    else:
        windows = max(max_cells // SAMPLE_WINDOW, 1)
        grid = np.random.default_rng(seed).choice(n_cells // SAMPLE_WINDOW, windows, replace=False)
        starts = sorted(int(g) * SAMPLE_WINDOW for g in grid)
    sums = np.zeros(len(source.gene_names), dtype=np.float64)
    for start in starts:
        block = abs(source.read_rows(start, min(start + SAMPLE_WINDOW, n_cells)))
        sums += np.nan_to_num(np.asarray(block.sum(axis=0, dtype=np.float64)).ravel())
    return sums


def map_source_genes(source: Source, species: str | None = None, min_fraction: float = MIN_MAPPED_FRACTION) -> GeneMapping:
    """Map an opened input's genes to Ensembl IDs by the one rule every verb applies
    (`genes.map_input_genes`), judged on the counts of a sample of its cells."""
    return map_input_genes(source.gene_names, species, str(source.path), gene_count_sample(source), min_fraction)


# ---------------------------------------------------------------- count checks


MAX_COUNT = int(np.iinfo(np.int32).max)  # one cell x gene count the corpus can store


def check_raw_counts(block: sp.csr_matrix, source: Source, first_row: int) -> None:
    """Refuse anything that is not raw non-negative integer counts, naming what to pass instead."""
    data = block.data
    bad = None
    if not np.isfinite(data).all():
        bad = ("NaN or infinite values", np.flatnonzero(~np.isfinite(data))[0])
    elif (data < 0).any():
        bad = ("negative values (scaled or centred data?)", np.flatnonzero(data < 0)[0])
    elif np.issubdtype(data.dtype, np.floating) and (data != np.round(data)).any():
        bad = ("non-integer values (normalised or log-transformed data?)", np.flatnonzero(data != np.round(data))[0])
    elif (data > MAX_COUNT).any():  # the corpus stores int32 counts: larger ones would wrap silently
        bad = (
            f"counts above {MAX_COUNT:,}, more than the corpus's int32 counts hold (summed or scaled data?)",
            np.flatnonzero(data > MAX_COUNT)[0],
        )
    if bad is None:
        return
    what, position = bad
    row = int(np.searchsorted(block.indptr, position, side="right") - 1)
    cell = str(source.cell_names[first_row + row])
    gene = str(source.gene_names[block.indices[position]])
    modality = "" if source.modality == "rna" else f" (modality {source.modality})"
    feature = "gene" if source.modality == "rna" else "feature"
    raise InputError(
        f"{source.path}{modality}: --layer {source.layer} holds {what}, e.g. {data[position].item()!r} at cell "
        f"{cell!r}, {feature} {gene!r}. celltron needs raw integer UMI/read counts: pass --layer with "
        f"the layer that holds them{_layer_hint(source)}, or the un-normalised file."
    )


def _layer_hint(source: Source) -> str:
    if source.path.suffix != ".h5ad":
        return ""
    with open_h5(source.path) as handle:
        others = [name for name in h5ad_layers(handle) if name != source.layer]
    return f" (this file also has: {', '.join(others)})" if others else " (this file has no other layers)"


# ---------------------------------------------------------------- opened and mapped


def to_corpus_genes(block: sp.csr_matrix, column_map: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Re-key a CSR block's columns onto corpus genes; drops unmapped genes, sums duplicates,
    drops zero counts; counts rounded to int64. Rows come out sorted by corpus gene (canonical).

    The compiled loop (`_remap_rows`, numba, one pass per row; a row is sorted and summed only
    when its mapped genes are out of order or repeat) gives the arrays the numpy path gives;
    `CELLTRON_NUMBA=0` runs the numpy path: CSR built directly, scipy's `sum_duplicates`
    (which sorts only when the block is not canonical) and `eliminate_zeros`."""
    counts = block.data if block.data.dtype.kind in "iu" else np.rint(block.data)
    if _remap_rows is not None and os.environ.get("CELLTRON_NUMBA", "1") != "0" and block.nnz < 2**31:
        indptr = np.empty(block.shape[0] + 1, dtype=np.int64)
        indices = np.empty(block.nnz, dtype=np.int32)
        data = np.empty(block.nnz, dtype=np.int64)
        kept = _remap_rows(block.indptr, block.indices, counts, np.asarray(column_map, dtype=np.int64), indptr, indices, data)
        if kept < 0.9 * block.nnz:  # do not hold the unmapped genes' room
            indices, data = indices[:kept].copy(), data[:kept].copy()
        remapped = sp.csr_matrix((data[:kept], indices[:kept], indptr), shape=(block.shape[0], n_genes))
        remapped.has_canonical_format = True
        return remapped
    columns = column_map[block.indices]
    keep = columns >= 0
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    indptr = kept_before[np.asarray(block.indptr, dtype=np.int64)]
    remapped = sp.csr_matrix((counts[keep].astype(np.int64), columns[keep], indptr), shape=(block.shape[0], n_genes))
    remapped.sum_duplicates()
    remapped.eliminate_zeros()
    return remapped


def _remap_rows_py(indptr, indices, counts, column_map, out_indptr, out_indices, out_counts):
    """Fill the out arrays with each row's mapped (gene, count) pairs, sorted by gene, repeats
    summed, zeros dropped; returns how many pairs were kept."""
    kept = 0
    out_indptr[0] = 0
    for row in range(len(indptr) - 1):
        start, last, ordered = kept, -1, True
        for j in range(indptr[row], indptr[row + 1]):
            gene = column_map[indices[j]]
            if gene < 0:
                continue
            ordered = ordered and gene > last
            last = gene
            out_indices[kept] = gene
            out_counts[kept] = np.int64(counts[j])
            kept += 1
        if not ordered:
            kept = start + _sort_and_sum(out_indices[start:kept], out_counts[start:kept])
        written = start
        for j in range(start, kept):  # after the sums: only a gene whose counts sum to 0 goes
            if out_counts[j] != 0:
                out_indices[written] = out_indices[j]
                out_counts[written] = out_counts[j]
                written += 1
        kept = written
        out_indptr[row + 1] = kept
    return kept


def _sort_and_sum(genes, counts):
    """Sort one row's pairs by gene in place, summing repeats; returns the pairs left."""
    order = np.argsort(genes, kind="mergesort")
    sorted_genes, sorted_counts = genes[order], counts[order]
    n = 0
    for k in range(len(order)):
        if n > 0 and sorted_genes[k] == genes[n - 1]:
            counts[n - 1] += sorted_counts[k]
        else:
            genes[n] = sorted_genes[k]
            counts[n] = sorted_counts[k]
            n += 1
    return n


if numba is not None:
    _sort_and_sum = numba.njit(cache=True, nogil=True)(_sort_and_sum)
    _remap_rows = numba.njit(cache=True, nogil=True)(_remap_rows_py)
else:  # pragma: no cover - exercised where numba is absent
    _remap_rows = None


def mapped_genes(ensembl_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique mapped Ensembl IDs (first-seen order, so ties keep the file's gene order) and, per
    input gene, its index among them (-1: unmapped)."""
    ensembl_ids = np.asarray(ensembl_ids)
    mapped = ensembl_ids[ensembl_ids != ""]
    _, first = np.unique(mapped, return_index=True)
    unique = mapped[np.sort(first)]
    position = {g: i for i, g in enumerate(unique)}
    return unique, np.array([position.get(g, -1) for g in ensembl_ids], dtype=np.int64)


@dataclass
class MappedSource:
    """An input opened for block reads with its genes mapped to Ensembl IDs (`open_mapped_source`).

    Attributes:
        source: the opened input.
        mapping: its species, each input gene's Ensembl ID ('' unmapped), names and counts (over
            a sample of cells).
        where: the input as the user named it, for messages.
    """

    source: Source
    mapping: GeneMapping
    where: str

    @property
    def species(self) -> str:
        return self.mapping.species

    @property
    def ensembl_ids(self) -> np.ndarray:
        return self.mapping.ensembl_ids

    @property
    def n_cells(self) -> int:
        return self.source.n_cells

    def mapped_genes(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique mapped Ensembl IDs and each input gene's index among them (`mapped_genes`)."""
        return mapped_genes(self.mapping.ensembl_ids)

    def require_obs(self, keys, fix: str = "") -> None:
        """Refuse obs columns the input lacks, naming those it has (and `fix`)."""
        require_obs(self.source, keys, self.where, fix)

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells [start, stop) over the input's own genes, checked to be raw counts."""
        block = self.source.read_rows(start, stop).tocsr()
        check_raw_counts(block, self.source, start)
        return block

    def close(self) -> None:
        self.source.close()


def require_obs(source: Source, keys, where, fix: str = "") -> None:
    """Refuse obs columns `source` lacks, naming those it has (and `fix`)."""
    missing = [k for k in keys if k not in source.obs.columns]
    if missing:
        raise InputError(
            f"{where}: obs has no column(s) {missing}; it has {list(source.obs.columns)}" + (f". {fix}" if fix else "")
        )


def open_mapped_source(
    path,
    layer: str = "X",
    gene_column: str | None = None,
    species: str | None = None,
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
    obs_keys=(),
    obs_fix: str = "",
) -> MappedSource:
    """Open an input (`open_source`), check its obs has `obs_keys` (`obs_fix`: what the user can
    do), then infer or check its species and map its genes to Ensembl IDs (`map_source_genes`),
    refused unless `min_mapped_fraction` of the sampled counts map. Closed again on any error."""
    source = open_source(path, layer=layer, gene_column=gene_column)
    try:
        require_obs(source, obs_keys, path, obs_fix)
        return MappedSource(source, map_source_genes(source, species, min_mapped_fraction), str(path))
    except BaseException:
        source.close()
        raise
