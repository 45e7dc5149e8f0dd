"""`celltron corpus build`: raw-count inputs -> a shuffled, sharded Zarr v3 corpus.

The build runs in three steps, none of which needs the whole corpus in memory:

1. stage: read each input in row blocks, check that it holds raw counts, map its genes onto
   the corpus gene table (Ensembl IDs, duplicates summed), apply QC filters, drop empty cells,
   gather gene statistics, and spill the kept cells to staging files;
2. scatter: draw one seeded permutation of all kept cells (the first `val_fraction` of it is
   the validation split) and move each staged cell to the bucket of its output shard;
3. write: turn each bucket into an AnnData-Zarr shard, then write manifest.json.

Two cores share the work: the gene statistics, the inputs' checksums and each finished shard's
write run on worker threads (compiled loops, hashing, compression and file writes, which
release the GIL) while the main thread reads, maps and gathers the next block or shard; at most
one item waits for each worker, so memory stays bounded.

Everything is written under a temporary directory next to `out` and renamed at the end, so an
interrupted or failed build never leaves a directory that looks like a corpus; the one a killed
build leaves (`.NAME.partial-*`) is removed by the next build of the same `out`.

Rebuild semantics: a corpus is immutable. Adding data means building again from all inputs
(cells are shuffled across inputs and gene statistics are corpus-wide); `--overwrite`
replaces an existing corpus only once the new one is complete.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import fsspec
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from celltron import __version__
from celltron.corpus._gather import place_rows
from celltron.corpus.genes import ensembl_to_symbol, is_mitochondrial
from celltron.corpus.options import BuildOptions
from celltron.corpus.readers import InputError, Source, check_raw_counts, open_mapped_source, to_corpus_genes
from celltron.corpus.schema import (
    CHECKSUM_VERSION,
    FORMAT_NAME,
    MANIFEST,
    SCHEMA_VERSION,
    SHARD_WRITE_SETTINGS,
    checksum_files,
    dump_manifest,
    sha256_file,
    shard_name,
    write_shard,
)
from celltron.corpus.stats import GeneStatistics
from celltron.errors import ConfigError, OutputExistsError
from celltron.inputs import read_json
from celltron.io import never_replaced_reason, new_partial_dir, release_partial_dir

log = logging.getLogger(__name__)
BYTES_PER_NONZERO = 8  # int32 count + int32 gene index, uncompressed
RESERVED_OBS = ("dataset", "species", "n_counts")


@dataclass
class _Input:
    """An opened input with its gene mapping and what staging found in it."""

    source: Source
    species: str
    ensembl_ids: np.ndarray  # per input gene, its Ensembl ID or '' when unmapped
    report: dict
    checksum: Future  # the input's sha256, computed on a worker thread while the build reads it
    column_map: np.ndarray | None = None  # input gene -> corpus gene index, -1 when unmapped


@dataclass
class _Staged:
    """Per kept cell metadata, in staging order, plus the staging files."""

    names: list = field(default_factory=list)
    n_counts: list = field(default_factory=list)
    nnz: list = field(default_factory=list)
    input_index: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # (path, first staged cell, n cells): `spill_csr` files
    dataset_of_input: list = field(default_factory=list)
    species_of_input: list = field(default_factory=list)


def build_corpus(inputs, out, options: BuildOptions | None = None, overwrite: bool = False) -> dict:
    """Build a corpus at `out` from raw-count inputs; returns the manifest.

    Args:
        inputs: .h5ad files, 10x .h5 files and/or 10x mtx directories.
        out: the corpus directory to create.
        options: build options (defaults: seed 0, 1% validation, counts in X).
        overwrite: replace an existing corpus at `out` once the new one is complete.
    """
    options = options or BuildOptions()
    out = Path(out)
    _check_output(out, [Path(p) for p in inputs], overwrite)
    if not 0 <= options.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {options.val_fraction}")
    reserved = sorted(set(options.obs_keys) & set(RESERVED_OBS))
    if reserved:
        raise ConfigError(
            f"--obs-keys {reserved}: the corpus writes these columns itself ({', '.join(RESERVED_OBS)}); rename them in the input"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = new_partial_dir(out)
    try:
        manifest = _build_into(list(map(Path, inputs)), work, options)
        _replace(work, out)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Only ever replace a celltron corpus, and never one that holds an input."""
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to rebuild it, or choose another --out")
    why = never_replaced_reason(out.resolve(), ())  # inputs inside `out` are refused below, by name
    if why:
        raise OutputExistsError(f"--out {out}: {why}; celltron never replaces it, even with --overwrite; choose another --out")
    manifest = out / MANIFEST
    if not manifest.is_file() or read_json(manifest, "corpus manifest").get("format") != FORMAT_NAME:
        raise OutputExistsError(f"{out} exists and is not a celltron corpus (no {MANIFEST}); --overwrite only replaces corpora")
    for path in inputs:
        if out.resolve() in path.resolve().parents:
            raise InputError(f"input {path} lies inside --out {out}; the rebuild would delete it")


def _replace(work: Path, out: Path) -> None:
    shutil.rmtree(work / "_staging", ignore_errors=True)
    release_partial_dir(work)
    if not out.exists():
        os.rename(work, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(work, out)
    except OSError:
        os.rename(old, out)  # put the previous corpus back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _build_into(paths: list[Path], work: Path, options: BuildOptions) -> dict:
    if not paths:
        raise InputError("no inputs given")
    # the inputs' checksums; removing spent staging files (unlinking a large file takes time)
    hashing = ThreadPoolExecutor(1, thread_name_prefix="celltron-checksums")
    files = ThreadPoolExecutor(1, thread_name_prefix="celltron-unlink")
    try:
        return _build_from(paths, work, options, hashing, files)
    finally:  # after an error, do not wait for inputs not yet hashed
        hashing.shutdown(wait=True, cancel_futures=True)
        files.shutdown(wait=True)


def _build_from(
    paths: list[Path], work: Path, options: BuildOptions, hashing: ThreadPoolExecutor, files: ThreadPoolExecutor
) -> dict:
    opened = _open_inputs(paths, options, hashing)
    try:
        gene_ids, species_of_gene = _gene_table(opened)
        for item in opened:
            item.column_map = _column_map(item, gene_ids)
        stats = GeneStatistics(len(gene_ids), exact_limit=options.exact_median_limit)
        staging = work / "_staging"
        staging.mkdir()
        mito = np.zeros(len(gene_ids), dtype=bool)
        for species in set(species_of_gene):
            members = species_of_gene == species
            mito[members] = is_mitochondrial(gene_ids[members], species)
        staged = _stage(opened, len(gene_ids), mito, stats, staging, options)
    finally:
        for item in opened:
            item.source.close()
    n_cells = len(staged.names)
    names = _unique_cell_names(staged, opened)
    plan = _shard_plan(n_cells, np.asarray(staged.nnz), options)
    categories = _obs_categories(staged)
    symbols = _gene_symbols(gene_ids, species_of_gene)
    var = _var_table(gene_ids, symbols, species_of_gene)
    # past the in-memory limit the medians' second pass reads the staged blocks as `_scatter` moves them
    second = None if stats.exact else stats.second_pass_over()
    n_counts = np.asarray(staged.n_counts, dtype=np.float64)
    with InBackground("celltron-medians") as medians_worker:

        def feed(block, first):
            medians_worker.submit(second.add, block, n_counts[first : first + block.shape[0]])

        discard = lambda path: files.submit(path.unlink)  # noqa: E731
        destinations = _scatter(plan, staged, staging, len(var), on_block=feed if second else None, discard=discard)
    medians = stats.nonzero_medians() if second is None else second.medians()
    splits = _write_splits(plan, destinations, staged, names, categories, var, work, options, files)
    for item in opened:
        item.report["sha256"] = item.checksum.result()
    genes = _gene_records(gene_ids, symbols, species_of_gene, stats, medians)
    manifest = _manifest(options, [item.report for item in opened], n_cells, splits, categories, stats, genes)
    (work / MANIFEST).write_bytes(dump_manifest(manifest))
    return manifest


def _manifest(options: BuildOptions, sources: list[dict], n_cells: int, splits, categories, stats, genes) -> dict:
    """The manifest's fields every corpus has (a multi-modal one adds `modalities`)."""
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "checksum_version": CHECKSUM_VERSION,
        "celltron_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "build": _build_record(options),
        "sources": sources,
        "n_cells": n_cells,
        "splits": splits,
        "obs_categories": categories,
        "gene_median": stats.describe_median(),
        "genes": genes,
    }


# ---------------------------------------------------------------- inputs and genes


def _open_inputs(paths: list[Path], options: BuildOptions, hashing: ThreadPoolExecutor) -> list[_Input]:
    opened = []
    for path in paths:
        mapped = open_mapped_source(path, options.layer, options.gene_column, options.species, options.min_mapped_fraction)
        source, mapping, species = mapped.source, mapped.mapping, mapped.species
        missing = [key for key in options.obs_keys if key not in source.obs.columns]
        if missing and source.path.suffix == ".h5ad":
            log.warning("%s: obs has no column(s) %s; they are left empty for its cells", path, missing)
        weight = float(options.weights.get(path.name, options.weights.get(source.name, 1.0)))
        report = {
            "path": path.name,
            "dataset": source.name,
            "sha256": None,  # `checksum`'s, once it is done
            "species": species,
            "layer": source.layer,
            "weight": weight,
            "n_cells_in": source.n_cells,
            "n_genes_in": len(source.gene_names),
            "n_genes_unmapped": mapping.n_unmapped,
        }
        checksum = hashing.submit(_input_checksum, path)
        opened.append(_Input(source=source, species=species, ensembl_ids=mapping.ensembl_ids, report=report, checksum=checksum))
    _unique_dataset_names(opened)
    return opened


def _unique_dataset_names(opened: list[_Input]) -> None:
    """Cell Ranger names every sample's output the same (filtered_feature_bc_matrix): prefix
    clashing names with their folder, then number any that still clash."""
    names = [item.source.name for item in opened]
    for i, item in enumerate(opened):
        if names.count(item.source.name) > 1:
            item.source.name = f"{item.source.path.parent.name}_{item.source.name}"
    for item, name in zip(opened, _numbered([item.source.name for item in opened])):
        item.source.name = item.report["dataset"] = name


def _numbered(names: list[str]) -> list[str]:
    """Names with a repeat numbered: a, a-2, a-3."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _input_checksum(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    return checksum_files(fsspec.filesystem("file"), str(path.resolve()))


def _gene_table(opened: list[_Input]) -> tuple[np.ndarray, np.ndarray]:
    """The union of mapped Ensembl IDs over all inputs, sorted, with each gene's species."""
    species_of = {}
    for item in opened:
        for gene in item.ensembl_ids:
            if gene:
                species_of[gene] = item.species
    gene_ids = np.array(sorted(species_of), dtype=object).astype(str)
    return gene_ids, np.array([species_of[g] for g in gene_ids], dtype=object).astype(str)


def _column_map(item: _Input, gene_ids: np.ndarray) -> np.ndarray:
    position = {gene: i for i, gene in enumerate(gene_ids)}
    return np.array([position.get(gene, -1) for gene in item.ensembl_ids], dtype=np.int64)


def _gene_symbols(gene_ids: np.ndarray, species_of_gene: np.ndarray) -> list[str]:
    tables = {species: ensembl_to_symbol(species) for species in set(species_of_gene)}
    return [tables[s].get(g, "") for g, s in zip(gene_ids, species_of_gene)]


def _var_table(gene_ids: np.ndarray, symbols: list[str], species_of_gene: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene_symbol": symbols,
            "species": pd.Categorical(species_of_gene),
        },
        index=pd.Index(gene_ids, name="ensembl_id"),
    )


# ---------------------------------------------------------------- staging


def _stage(opened, n_genes, mito, stats, staging: Path, options: BuildOptions) -> _Staged:
    staged = _Staged(labels={key: [] for key in options.obs_keys})
    staged.dataset_of_input = [item.source.name for item in opened]
    staged.species_of_input = [item.species for item in opened]
    total = sum(item.source.n_cells for item in opened)
    bar = tqdm(total=total, unit="cells", desc="reading inputs", disable=not options.progress)
    with InBackground("celltron-statistics") as statistics, InBackground("celltron-staging") as spilling:
        for index, item in enumerate(opened):
            report = item.report
            report.update(n_empty_dropped=0, n_qc_dropped=0, unmapped_counts=0)
            for start in range(0, item.source.n_cells, options.read_block_cells):
                stop = min(start + options.read_block_cells, item.source.n_cells)
                block = item.source.read_rows(start, stop).tocsr()
                check_raw_counts(block, item.source, start)
                report["dtype"] = str(block.dtype)  # Geneformer's arithmetic follows it (tokenizers.rank_value)
                # n_counts is the cell's total over all input genes, mapped or not (Geneformer's n_counts)
                # summed in float64: float32 inputs would round block totals above 2**24 counts
                totals = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
                kept_rows, kept = _filter_block(block, totals, item, n_genes, mito, options)
                spilling.submit(spill_csr, _staging_file(staging, staged, kept), kept)  # nothing changes `kept`
                statistics.submit(stats.add, kept, totals[kept_rows])
                _record_cells(staged, item, index, totals, kept, kept_rows, start)
                bar.update(stop - start)
            report["n_cells_kept"] = report["n_cells_in"] - report["n_empty_dropped"] - report["n_qc_dropped"]
    bar.close()
    return staged


class InBackground:
    """Runs calls on `workers` threads while the caller goes on (one worker: in order); a
    submit waits while `workers` calls are pending, so the caller holds at most `workers` + 1
    items. An error in a call is raised by a later `submit` or on leaving the `with` block."""

    def __init__(self, name: str, workers: int = 1):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.workers = workers
        self.pending: list[Future] = []

    def submit(self, function, *args) -> Future:
        while len(self.pending) >= self.workers:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(function, *args))
        return self.pending[-1]

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self) -> InBackground:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _filter_block(block, totals, item: _Input, n_genes, mito, options: BuildOptions):
    """Map genes, then drop empty cells and cells failing QC; returns kept row numbers + block."""
    mapped = to_corpus_genes(block, item.column_map, n_genes)
    item.report["unmapped_counts"] += int(round(totals.sum() - mapped.sum(dtype=np.int64)))
    mapped_totals = np.asarray(mapped.sum(axis=1)).ravel()
    empty = mapped_totals == 0
    passes = (np.diff(mapped.indptr) >= options.min_genes) & (totals >= options.min_counts)
    if options.max_mito_fraction is not None:
        mito_counts = np.asarray(mapped[:, np.flatnonzero(mito)].sum(axis=1)).ravel()
        passes &= mito_counts <= options.max_mito_fraction * np.maximum(totals, 1)
    item.report["n_empty_dropped"] += int(empty.sum())
    item.report["n_qc_dropped"] += int((~empty & ~passes).sum())
    kept_rows = np.flatnonzero(~empty & passes)
    return kept_rows, mapped if len(kept_rows) == mapped.shape[0] else mapped[kept_rows]  # most blocks keep every cell


def _staging_file(staging: Path, staged: _Staged, kept: sp.csr_matrix) -> Path:
    """The staging file of the next block, recorded before its cells are."""
    path = staging / f"block-{len(staged.files):06d}.csr"
    staged.files.append((path, len(staged.names), kept.shape[0]))
    return path


def spill_csr(path: Path, block: sp.csr_matrix, rows: np.ndarray | None = None) -> None:
    """A staging file: (rows,) indptr as int64, then indices and counts as int32, back to back
    and raw (no archive: np.savez's zip format spent a CRC32 on every byte). The 64-bit arrays
    come first, so every array starts aligned."""
    with open(path, "wb") as handle:
        if rows is not None:
            handle.write(np.ascontiguousarray(rows, dtype=np.int64).data)
        for array, dtype in ((block.indptr, np.int64), (block.indices, np.int32), (block.data, np.int32)):
            handle.write(np.ascontiguousarray(array, dtype=dtype).data)


def load_csr(path: Path, n_rows: int, n_genes: int, with_rows: bool = False):
    """A `spill_csr` file back: the CSR block, and its row numbers when it was written with them."""
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) < 8 * (n_rows + 1) + (8 * n_rows if with_rows else 0):
        raise RuntimeError(
            f"staging file {path}: {len(raw)} bytes, too short for {n_rows} rows; the build's temporary files were changed"
        )
    at = 0
    rows = None
    if with_rows:
        rows, at = raw[: 8 * n_rows].view(np.int64), 8 * n_rows
    indptr = raw[at : at + 8 * (n_rows + 1)].view(np.int64)
    at += 8 * (n_rows + 1)
    nnz = int(indptr[-1])
    indices = raw[at : at + 4 * nnz].view(np.int32)
    data = raw[at + 4 * nnz : at + 8 * nnz].view(np.int32)
    if at + 8 * nnz != len(raw):
        raise RuntimeError(
            f"staging file {path}: {len(raw)} bytes, expected {at + 8 * nnz}; the build's temporary files were changed"
        )
    block = sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_genes))
    return (block, rows) if with_rows else block


def staged_blocks(files: list, n_counts, n_genes: int):
    """The staged blocks again, in staging order, as (CSR block, its cells' n_counts): the second
    pass of an exact median (`GeneStatistics.nonzero_medians`)."""
    n_counts = np.asarray(n_counts, dtype=np.float64)
    for path, first, count in files:
        yield load_csr(path, count, n_genes), n_counts[first : first + count]


def _record_cells(staged: _Staged, item: _Input, index: int, totals, kept, kept_rows, start: int) -> None:
    staged.names.extend(item.source.cell_names[start + kept_rows])
    staged.n_counts.extend(np.rint(totals[kept_rows]).astype(np.int64))
    staged.nnz.extend(np.diff(kept.indptr))
    staged.input_index.extend([index] * len(kept_rows))
    obs = item.source.obs
    for key in staged.labels:
        column = obs[key].iloc[start + kept_rows] if key in obs.columns else None
        values = [None] * len(kept_rows) if column is None else [None if pd.isna(v) else str(v) for v in column]
        staged.labels[key].extend(values)


def _unique_cell_names(staged: _Staged, opened: list[_Input]) -> np.ndarray:
    """Original cell names; a name shared by several cells gets its dataset name appended."""
    names = pd.Series(staged.names, dtype=object)
    datasets = pd.Series([opened[i].source.name for i in staged.input_index], dtype=object)
    clashing = names.duplicated(keep=False)
    names[clashing] = names[clashing] + "-" + datasets[clashing]
    still = names.duplicated(keep=False)  # duplicates inside one input
    names[still] = names[still] + "-" + names[still].groupby(names[still]).cumcount().astype(str)
    return names.to_numpy().astype(str)


# ---------------------------------------------------------------- shuffle and write


def _cells_per_shard(nnz: np.ndarray, shard_size_mb: float) -> int:
    bytes_per_cell = max(float(nnz.mean()), 1.0) * BYTES_PER_NONZERO
    return max(1, int(shard_size_mb * 1e6 // bytes_per_cell))


def _shard_plan(n_cells: int, nnz: np.ndarray, options: BuildOptions) -> dict[str, list[np.ndarray]]:
    """One seeded permutation of the kept cells: its first `val_fraction` is the validation
    split; each split cut into near-equal shards of about `shard_size_mb`."""
    if n_cells == 0:
        raise InputError("no cells left after dropping empty cells and QC filters; check the inputs and filters")
    order = np.random.default_rng(options.seed).permutation(n_cells)
    n_val = int(round(n_cells * options.val_fraction))
    per_shard = _cells_per_shard(nnz, options.shard_size_mb)
    return {"train": _split_into_shards(order[n_val:], per_shard), "val": _split_into_shards(order[:n_val], per_shard)}


def _split_into_shards(cells: np.ndarray, cells_per_shard: int) -> list[np.ndarray]:
    """Near-equal shards of at most `cells_per_shard` cells (no tiny last shard)."""
    if len(cells) == 0:
        return []
    return np.array_split(cells, -(-len(cells) // cells_per_shard))


def _obs_categories(staged: _Staged) -> dict[str, list[str]]:
    """One category list per obs column for the whole corpus, so codes agree across shards."""
    categories = {"dataset": sorted(set(staged.dataset_of_input)), "species": sorted(set(staged.species_of_input))}
    for key, values in staged.labels.items():
        categories[key] = sorted({v for v in values if v is not None})
    return categories


def _write_splits(plan, destinations, staged: _Staged, names, categories, var, work: Path, options: BuildOptions, files) -> dict:
    """Gather each shard's cells (main thread) while the shard before is written and hashed on
    a worker thread."""
    splits = {}
    total = sum(len(cells) for shards in plan.values() for cells in shards)
    bar = tqdm(total=total, unit="cells", desc="writing shards", disable=not options.progress)
    # two writers: zarr's encoding of one shard leaves part of a core idle
    with ad.settings.override(**SHARD_WRITE_SETTINGS), InBackground("celltron-shard-writer", workers=2) as writer:
        for split, shards in plan.items():
            records = []
            for number, cells in enumerate(shards):
                counts = _gather_bucket(
                    destinations[(split, number)], len(cells), len(var), lambda path: files.submit(path.unlink)
                )
                obs = _obs_table(cells, staged, names, categories)
                path = work / shard_name(split, number)
                path.parent.mkdir(parents=True, exist_ok=True)
                records.append(writer.submit(_write_one_shard, path, shard_name(split, number), counts, obs, var, options))
                bar.update(len(cells))
            splits[split] = {"n_cells": int(sum(len(c) for c in shards)), "shards": records}
    for split in splits.values():
        split["shards"] = [record.result() for record in split["shards"]]
    bar.close()
    return splits


def _write_one_shard(path: Path, name: str, counts: sp.csr_matrix, obs, var, options: BuildOptions) -> dict:
    write_shard(path, counts, obs, var, options.chunk_nnz, options.compression)
    sha256 = checksum_files(fsspec.filesystem("file"), str(path))
    return {"path": name, "n_cells": obs.shape[0], "nnz": int(counts.nnz), "sha256": sha256}


def _scatter(plan, staged: _Staged, staging: Path, n_genes: int, on_block=None, discard=Path.unlink) -> dict:
    """Move every staged cell into the bucket of its output shard; returns bucket file lists.
    `on_block(block, first staged cell)` sees each staged block as it passes; `discard(path)`
    removes a staged file once it is read."""
    n_cells = len(staged.names)
    shard_of = np.empty(n_cells, dtype=np.int64)
    row_in_shard = np.empty(n_cells, dtype=np.int64)
    keys = []
    for split, shards in plan.items():
        for number, cells in enumerate(shards):
            shard_of[cells] = len(keys)
            row_in_shard[cells] = np.arange(len(cells))
            keys.append((split, number))
    buckets = {key: [] for key in keys}
    for path, first, count in staged.files:
        if count == 0:
            continue
        block = load_csr(path, count, n_genes)
        if on_block is not None:
            on_block(block, first)
        cells = np.arange(first, first + count)
        for shard in np.unique(shard_of[cells]):
            rows = np.flatnonzero(shard_of[cells] == shard)
            piece = block[rows]
            target = staging / f"bucket-{shard:05d}-{len(buckets[keys[shard]]):06d}.csr"
            spill_csr(target, piece, rows=row_in_shard[cells[rows]])
            buckets[keys[shard]].append((target, len(rows)))
        discard(path)
    return buckets


def _gather_bucket(files: list, n_rows: int, n_genes: int, discard=Path.unlink) -> sp.csr_matrix:
    """Assemble one shard's cells, in shuffled order, from its bucket files (`discard`ed once
    read). The files' headers (row numbers, row pointers) give the shard's row pointers first;
    then each file's genes and counts are read into one reused buffer and copied to their rows:
    one copy, where reading everything stacked and then reordering the rows made two."""
    headers, lengths = [], np.zeros(n_rows, dtype=np.int64)
    seen = np.zeros(n_rows, dtype=np.int64)
    for path, n in files:
        rows, piece_indptr = _bucket_header(path, n, n_rows)
        lengths[rows] = np.diff(piece_indptr)
        np.add.at(seen, rows, 1)  # a row repeated within one file counts twice
        headers.append((path, rows, piece_indptr))
    if not (seen == 1).all():
        raise RuntimeError(
            f"a shard's staging files hold {int(seen.sum())} rows ({int((seen > 0).sum())} distinct), not its "
            f"{n_rows} once each; the build's temporary files were changed"
        )
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.int32)
    largest = max((int(piece_indptr[-1]) for _, _, piece_indptr in headers), default=0)
    piece_indices, piece_data = np.empty(largest, dtype=np.int32), np.empty(largest, dtype=np.int32)
    for path, rows, piece_indptr in headers:
        size = int(piece_indptr[-1])
        with open(path, "rb") as handle:
            handle.seek(8 * len(rows) + 8 * len(piece_indptr))
            for part in (piece_indices[:size], piece_data[:size]):
                if handle.readinto(part.data) != part.nbytes:
                    raise RuntimeError(
                        f"{path}: staging file shorter than its header says; the build's temporary files were changed"
                    )
        place_rows(indptr, rows, piece_indptr, piece_indices, piece_data, indices, data)
        discard(path)
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_genes))


def _bucket_header(path: Path, n: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A bucket file's row numbers in its shard and its row pointers (`spill_csr` layout),
    checked against the file's size."""
    rows, piece_indptr = np.empty(n, dtype=np.int64), np.empty(n + 1, dtype=np.int64)
    with open(path, "rb") as handle:
        for part in (rows, piece_indptr):
            if handle.readinto(part.data) != part.nbytes:
                raise RuntimeError(f"{path}: staging file shorter than its header; the build's temporary files were changed")
    size = path.stat().st_size
    consistent = piece_indptr[0] == 0 and (np.diff(piece_indptr) >= 0).all() and ((rows >= 0) & (rows < n_rows)).all()
    if not consistent or size != 16 * n + 8 + 8 * int(piece_indptr[-1]):
        raise RuntimeError(f"{path}: staging file does not match its header; the build's temporary files were changed")
    return rows, piece_indptr


def _obs_table(cells, staged: _Staged, names, categories) -> pd.DataFrame:
    input_index = np.asarray(staged.input_index)[cells]
    obs = pd.DataFrame(index=pd.Index(names[cells], name="cell"))
    for column, per_input in (("dataset", staged.dataset_of_input), ("species", staged.species_of_input)):
        values = np.asarray(per_input, dtype=object)[input_index]
        obs[column] = pd.Categorical(values, categories=categories[column])
    obs["n_counts"] = np.asarray(staged.n_counts, dtype=np.int64)[cells]
    for key, values in staged.labels.items():
        obs[key] = pd.Categorical(np.asarray(values, dtype=object)[cells], categories=categories[key])
    return obs


def _gene_records(gene_ids, symbols: list[str], species_of_gene, stats: GeneStatistics, medians: np.ndarray) -> dict:
    return {
        "ensembl_id": gene_ids.tolist(),
        "symbol": symbols,
        "species": species_of_gene.tolist(),
        "cells_expressing": stats.cells_expressing.tolist(),
        "count_sum": stats.count_sum.tolist(),
        "nonzero_median": [None if np.isnan(m) else float(m) for m in medians],
    }


def _build_record(options: BuildOptions) -> dict:
    record = asdict(options)
    record.pop("progress")
    record["obs_keys"] = list(options.obs_keys)
    return record
