"""`celltron corpus build` of multi-modal inputs: RNA with surface proteins (ADT) and/or open
chromatin (ATAC) measured in the same cells -> a corpus whose shards are MuData-Zarr stores.

The steps are build.py's (stage in blocks, one seeded shuffle, scatter into shard buckets, write,
then rename the finished directory into place), run per modality over the same cells:

- features: RNA genes map to Ensembl IDs as in an RNA corpus; proteins to canonical antigen names
  (proteins.py; unknown names kept verbatim and reported); ATAC peaks to fixed genomic bins
  (peaks.py) on one genome build. Each modality's feature table is the union over inputs.
- cells: every modality is checked for raw integer counts; RNA's QC filters apply to cells
  measured in RNA; a cell with no counts in any modality is dropped. Mosaic cells (measured in
  only some modalities) keep an empty row in the others and `measured = False`.

A shard `train/shard-00000.zarr` holds `mod/<modality>/` for each modality, every one an
AnnData-Zarr store laid out exactly as an RNA corpus shard (X: sharded, crc32c-checked CSR of
int32 counts; obs: the corpus columns, that modality's `n_counts` and `measured`; var), plus
MuData's root `obs` and `obsm/<modality>` masks, so `mudata.read_zarr` opens it. The manifest's
`genes` is the RNA table, as in every corpus; `modalities` adds each modality's feature table and
statistics.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import fsspec
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from tqdm.auto import tqdm

from celltron.corpus.build import (
    RESERVED_OBS,
    _check_output,
    _gather_bucket,
    _gene_records,
    _gene_symbols,
    _manifest,
    _numbered,
    _replace,
    _scatter,
    _shard_plan,
    _var_table,
    spill_csr,
    staged_blocks,
)
from celltron.corpus.genes import is_mitochondrial
from celltron.corpus.modalities import MultiModalInput, open_multimodal
from celltron.corpus.options import BuildOptions
from celltron.corpus.peaks import PeakBins, bin_counts, common_build, peak_bins
from celltron.corpus.proteins import canonical_proteins
from celltron.corpus.readers import check_raw_counts, map_source_genes, to_corpus_genes
from celltron.corpus.schema import (
    MANIFEST,
    checksum_files,
    dump_manifest,
    sha256_file,
    shard_name,
    write_shard,
)
from celltron.corpus.stats import GeneStatistics
from celltron.errors import ConfigError, InputError
from celltron.io import new_partial_dir


@dataclass
class _Opened:
    """One multi-modal input with its feature mappings (input feature -> corpus feature)."""

    data: MultiModalInput
    report: dict
    species: str | None = None
    rna_ids: np.ndarray | None = None  # per input gene, its Ensembl ID or ''
    proteins: object = None  # ProteinNames
    bins: PeakBins | None = None
    column_maps: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _ModalityStaging:
    """What `_scatter` needs of one modality: its staged files (and the cell count, as names)."""

    names: list
    files: list = field(default_factory=list)


def build_multimodal_corpus(
    inputs: list[str | Path] | None,
    out,
    options: BuildOptions | None = None,
    overwrite: bool = False,
    modalities: dict[str, str | Path] | None = None,
) -> dict:
    """Build a multi-modal corpus at `out`; returns the manifest.

    Args:
        inputs: MuData .h5mu files and/or 10x .h5 files with several feature types.
        modalities: or one file per modality ({"rna": A.h5ad, "adt": B.h5ad}), joined on cell names.
        options: build options (`genome`, `atac_bin_size` and `mosaic` are the multi-modal ones).
    """
    options = options or BuildOptions()
    out = Path(out)
    paths = [Path(p) for p in (inputs or [])] + [Path(p) for p in (modalities or {}).values()]
    _check_output(out, paths, overwrite)
    reserved = sorted(set(options.obs_keys) & set(RESERVED_OBS))
    if reserved:
        raise ConfigError(f"--obs-keys {reserved}: the corpus writes these columns itself ({', '.join(RESERVED_OBS)})")
    opened = []
    try:
        for path in inputs or []:
            opened.append(open_multimodal(path, mosaic=options.mosaic, layer=options.layer, gene_column=options.gene_column))
        if modalities:
            opened.append(
                open_multimodal(
                    modalities=modalities, mosaic=options.mosaic, layer=options.layer, gene_column=options.gene_column
                )
            )
        if not opened:
            raise InputError("no inputs given")
        out.parent.mkdir(parents=True, exist_ok=True)
        work = new_partial_dir(out)
        try:
            manifest = _build_into(opened, work, options)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        for item in opened:
            item.close()
    try:
        _replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------- features


def _feature_tables(opened: list[_Opened], options: BuildOptions) -> dict[str, dict]:
    """Per modality, the corpus feature table (the union over inputs) and each input's column map."""
    present = [m for m in ("rna", "adt", "atac") if any(m in item.data.sources for item in opened)]
    if "rna" not in present:
        raise InputError(
            f"{', '.join(str(i.data.path) for i in opened)}: no RNA modality; a corpus is keyed by its cells' "
            "transcriptomes, so every multi-modal corpus needs RNA (gene expression) in at least one input"
        )
    tables: dict[str, dict] = {}
    for item in opened:
        if "rna" in item.data.sources:
            mapping = map_source_genes(item.data.sources["rna"], options.species, options.min_mapped_fraction)
            item.species, item.rna_ids = mapping.species, mapping.ensembl_ids
            item.report.update(species=mapping.species, n_genes_unmapped=mapping.n_unmapped)
        if "adt" in item.data.sources:
            source = item.data.sources["adt"]
            item.proteins = canonical_proteins(source.gene_names, f"{source.path} (adt)")
            item.report["adt"] = {"n_features_in": len(source.gene_names), "unknown": list(item.proteins.unknown)}
            item.report["adt"]["renamed"] = item.proteins.renamed()
        if "atac" in item.data.sources:
            source = item.data.sources["atac"]
            item.bins = peak_bins(source.gene_names, options.atac_bin_size, f"{source.path} (atac)")
            item.report["atac"] = {"n_peaks_in": len(source.gene_names), "n_bins": len(item.bins.bins)}
    species_of = {g: item.species for item in opened if item.rna_ids is not None for g in item.rna_ids if g}
    gene_ids = np.array(sorted(species_of), dtype=object).astype(str)
    species_of_gene = np.array([species_of[g] for g in gene_ids], dtype=object).astype(str)
    tables["rna"] = {"names": gene_ids, "species": species_of_gene}
    if "adt" in present:
        genes_of = {}
        for item in opened:
            if item.proteins is not None:
                genes_of.update(zip(item.proteins.canonical, item.proteins.genes))
        names = np.array(sorted(genes_of, key=str.lower), dtype=object).astype(str)
        tables["adt"] = {"names": names, "genes": [";".join(genes_of[n]) for n in names]}
    if "atac" in present:
        genome = common_build({str(i.data.path): i.data.genome for i in opened if i.bins is not None}, options.genome)
        every = np.concatenate([i.bins.bins for i in opened if i.bins is not None])
        tables["atac"] = {"names": peak_bins(_bin_intervals(every), options.atac_bin_size).bins, "genome": genome}
    for item in opened:
        item.column_maps = _column_maps(item, tables)
    return tables


def _bin_intervals(bins: np.ndarray) -> list[str]:
    """Bin names as peaks (each its own interval), to order and deduplicate them by `peak_bins`."""
    return sorted(set(map(str, bins)))


def _column_maps(item: _Opened, tables: dict[str, dict]) -> dict[str, np.ndarray]:
    def positions(table_names, keys) -> np.ndarray:
        where = {name: i for i, name in enumerate(table_names)}
        return np.array([where.get(k, -1) for k in keys], dtype=np.int64)

    maps = {}
    if item.rna_ids is not None:
        maps["rna"] = positions(tables["rna"]["names"], item.rna_ids)
    if item.proteins is not None:
        maps["adt"] = positions(tables["adt"]["names"], item.proteins.canonical)
    if item.bins is not None:
        maps["atac"] = positions(tables["atac"]["names"], item.bins.bins)  # input bins -> corpus bins
    return maps


# ---------------------------------------------------------------- staging


@dataclass
class _Cells:
    """Per kept cell, in staging order."""

    names: list = field(default_factory=list)
    input_index: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    n_counts: dict = field(default_factory=dict)  # modality -> per cell total (RNA: over every input gene)
    measured: dict = field(default_factory=dict)  # modality -> per cell bool
    nnz: list = field(default_factory=list)  # over every modality


def _stage(opened: list[_Opened], tables: dict, staging: Path, options: BuildOptions):
    modalities = list(tables)
    cells = _Cells(labels={k: [] for k in options.obs_keys})
    cells.n_counts = {m: [] for m in modalities}
    cells.measured = {m: [] for m in modalities}
    staged = {m: _ModalityStaging(cells.names) for m in modalities}
    stats = {m: GeneStatistics(len(tables[m]["names"]), exact_limit=options.exact_median_limit) for m in modalities}
    mito = _mitochondrial(tables["rna"])
    bar = tqdm(total=sum(i.data.n_cells for i in opened), unit="cells", desc="reading inputs", disable=not options.progress)
    for index, item in enumerate(opened):
        item.report.update(n_empty_dropped=0, n_qc_dropped=0, unmapped_counts=0)
        for start in range(0, item.data.n_cells, options.read_block_cells):
            stop = min(start + options.read_block_cells, item.data.n_cells)
            mapped, totals, measured = _read_block(item, tables, start, stop)
            keep = _kept(item, mapped, totals, measured, mito, options)
            rows = np.flatnonzero(keep)
            for m in modalities:
                block = mapped[m][rows]
                _spill(block, staging, staged[m], m)
                stats[m].add(block, np.maximum(totals[m][rows], 1))
                cells.n_counts[m].extend(np.rint(totals[m][rows]).astype(np.int64))
                cells.measured[m].extend(measured[m][rows])
            cells.nnz.extend(sum(np.diff(mapped[m][rows].indptr) for m in modalities))
            cells.names.extend(item.data.cell_names[start + rows])
            cells.input_index.extend([index] * len(rows))
            _record_labels(cells, item, start + rows, options.obs_keys)
            bar.update(stop - start)
        item.report["n_cells_kept"] = item.report["n_cells_in"] - item.report["n_empty_dropped"] - item.report["n_qc_dropped"]
    bar.close()
    return cells, staged, stats


def _mitochondrial(rna: dict) -> np.ndarray:
    mito = np.zeros(len(rna["names"]), dtype=bool)
    for species in set(rna["species"]):
        members = rna["species"] == species
        mito[members] = is_mitochondrial(rna["names"][members], species)
    return mito


def _read_block(item: _Opened, tables: dict, start: int, stop: int):
    """Every modality's counts of joint cells [start, stop) on corpus features (empty rows for a
    modality the input lacks or the cell was not measured in), per cell totals, and `measured`."""
    mapped, totals, measured = {}, {}, {}
    n = stop - start
    for m, table in tables.items():
        n_features = len(table["names"])
        if m not in item.data.sources:
            mapped[m], totals[m], measured[m] = sp.csr_matrix((n, n_features), dtype=np.int64), np.zeros(n), np.zeros(n, bool)
            continue
        source = item.data.sources[m]
        block = item.data.read_cells(m, start, stop).tocsr()
        check_raw_counts(block, dataclasses.replace(source, cell_names=item.data.cell_names), start)
        totals[m] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        if m == "atac":
            block = bin_counts(block, item.bins)  # peaks -> this input's bins; mapped onto the corpus's below
        mapped[m] = to_corpus_genes(block, item.column_maps[m], n_features)
        measured[m] = item.data.rows[m][start:stop] >= 0
    return mapped, totals, measured


def _kept(item: _Opened, mapped: dict, totals: dict, measured: dict, mito: np.ndarray, options: BuildOptions) -> np.ndarray:
    """Cells with counts in some modality that pass RNA's QC where RNA was measured."""
    rna = mapped["rna"]
    item.report["unmapped_counts"] += int(round(totals["rna"].sum() - rna.sum(dtype=np.int64)))
    empty = np.all([np.asarray(block.sum(axis=1)).ravel() == 0 for block in mapped.values()], axis=0)
    passes = (np.diff(rna.indptr) >= options.min_genes) & (totals["rna"] >= options.min_counts)
    if options.max_mito_fraction is not None:
        mito_counts = np.asarray(rna[:, np.flatnonzero(mito)].sum(axis=1)).ravel()
        passes &= mito_counts <= options.max_mito_fraction * np.maximum(totals["rna"], 1)
    passes |= ~measured["rna"]  # RNA's filters judge RNA; a cell without RNA is judged by the rest
    item.report["n_empty_dropped"] += int(empty.sum())
    item.report["n_qc_dropped"] += int((~empty & ~passes).sum())
    return ~empty & passes


def _spill(block: sp.csr_matrix, staging: Path, staged: _ModalityStaging, modality: str) -> None:
    (staging / modality).mkdir(exist_ok=True)
    path = staging / modality / f"block-{len(staged.files):06d}.csr"
    spill_csr(path, block)
    first = sum(count for _, _, count in staged.files)
    staged.files.append((path, first, block.shape[0]))


def _record_labels(cells: _Cells, item: _Opened, rows: np.ndarray, keys) -> None:
    """obs labels: from the first modality (RNA first) whose obs has the column and measured the cell."""
    for key in keys:
        values: list = [None] * len(rows)
        for m, source in item.data.sources.items():
            if key not in source.obs.columns:
                continue
            source_rows = item.data.rows[m][rows]
            column = source.obs[key].to_numpy()
            for i, r in enumerate(source_rows):
                if values[i] is None and r >= 0 and not pd.isna(column[r]):
                    values[i] = str(column[r])
        cells.labels[key].extend(values)


# ---------------------------------------------------------------- build


def _build_into(inputs: list[MultiModalInput], work: Path, options: BuildOptions) -> dict:
    opened = [_Opened(data, _report(data)) for data in inputs]
    _unique_names(opened)
    tables = _feature_tables(opened, options)
    staging = work / "_staging"
    staging.mkdir()
    cells, staged, stats = _stage(opened, tables, staging, options)
    # RNA medians before `_scatter` moves the staged blocks (read again past the in-memory limit)
    n_counts = np.maximum(cells.n_counts["rna"], 1)  # as `_stage` gave them to the statistics
    medians = stats["rna"].nonzero_medians(lambda: staged_blocks(staged["rna"].files, n_counts, len(tables["rna"]["names"])))
    n_cells = len(cells.names)
    plan = _shard_plan(n_cells, np.asarray(cells.nnz), options)
    names = _unique_cell_names(cells, opened)
    categories = {
        "dataset": sorted({i.data.name for i in opened}),
        "species": sorted({i.species for i in opened if i.species}),
        **{k: sorted({v for v in values if v is not None}) for k, values in cells.labels.items()},
    }
    symbols = _gene_symbols(tables["rna"]["names"], tables["rna"]["species"])
    var = {"rna": _var_table(tables["rna"]["names"], symbols, tables["rna"]["species"]), **_other_vars(tables)}
    # one folder per modality: the bucket files of `_scatter` are named by shard only
    destinations = {m: _scatter(plan, staged[m], staging / m, len(tables[m]["names"])) for m in tables}
    splits = _write_shards(plan, destinations, cells, opened, names, categories, var, work, options)
    genes = _gene_records(tables["rna"]["names"], symbols, tables["rna"]["species"], stats["rna"], medians)
    manifest = _manifest(options, [item.report for item in opened], n_cells, splits, categories, stats["rna"], genes)
    manifest["modalities"] = _modality_records(tables, stats, cells)
    (work / MANIFEST).write_bytes(dump_manifest(manifest))
    return manifest


def _report(data: MultiModalInput) -> dict:
    files = {m: s.path for m, s in data.sources.items()}
    return {
        "path": data.path.name,
        "dataset": data.name,
        "files": {m: p.name for m, p in files.items()},
        "sha256": {m: sha256_file(p) for m, p in files.items() if p.is_file()},
        "species": None,
        "layer": data.sources["rna"].layer if "rna" in data.sources else "X",
        "weight": 1.0,
        "modalities": list(data.sources),
        "n_cells_in": data.n_cells,
        "n_cells_per_modality": {m: int((r >= 0).sum()) for m, r in data.rows.items()},
        "n_genes_in": len(data.sources["rna"].gene_names) if "rna" in data.sources else 0,
        "n_genes_unmapped": 0,
    }


def _unique_names(opened: list[_Opened]) -> None:
    for item, name in zip(opened, _numbered([item.data.name for item in opened])):
        item.data.name = item.report["dataset"] = name


def _unique_cell_names(cells: _Cells, opened: list[_Opened]) -> np.ndarray:
    names = pd.Series(cells.names, dtype=object)
    datasets = pd.Series([opened[i].data.name for i in cells.input_index], dtype=object)
    clashing = names.duplicated(keep=False)
    names[clashing] = names[clashing] + "-" + datasets[clashing]
    return names.to_numpy().astype(str)


def _other_vars(tables: dict) -> dict[str, pd.DataFrame]:
    var = {}
    if "adt" in tables:
        var["adt"] = pd.DataFrame({"genes": tables["adt"]["genes"]}, index=pd.Index(tables["adt"]["names"], name="antigen"))
    if "atac" in tables:
        var["atac"] = pd.DataFrame(index=pd.Index(np.asarray(tables["atac"]["names"], dtype=str), name="bin"))
    return var


def _obs(rows, cells: _Cells, opened, names, categories, modality: str) -> pd.DataFrame:
    input_index = np.asarray(cells.input_index)[rows]
    obs = pd.DataFrame(index=pd.Index(names[rows], name="cell"))
    obs["dataset"] = pd.Categorical([opened[i].data.name for i in input_index], categories=categories["dataset"])
    obs["species"] = pd.Categorical([opened[i].species for i in input_index], categories=categories["species"])
    obs["n_counts"] = np.asarray(cells.n_counts[modality], dtype=np.int64)[rows]
    obs["measured"] = np.asarray(cells.measured[modality], dtype=bool)[rows]
    for key, values in cells.labels.items():
        obs[key] = pd.Categorical(np.asarray(values, dtype=object)[rows], categories=categories[key])
    return obs


def _write_shards(plan, destinations, cells: _Cells, opened, names, categories, var, work: Path, options) -> dict:
    fs = fsspec.filesystem("file")
    splits = {}
    bar = tqdm(total=len(cells.names), unit="cells", desc="writing shards", disable=not options.progress)
    for split, shards in plan.items():
        records = []
        for number, rows in enumerate(shards):
            path = work / shard_name(split, number)
            path.parent.mkdir(parents=True, exist_ok=True)
            zarr.open_group(str(path), mode="w", zarr_format=3).create_group("mod")  # MuData's root, then each AnnData
            nnz = {}
            for m in var:
                counts = _gather_bucket(destinations[m][(split, number)], len(rows), len(var[m]))
                obs = _obs(rows, cells, opened, names, categories, m)
                write_shard(path / "mod" / m, counts, obs, var[m], options.chunk_nnz, options.compression)
                nnz[m] = int(counts.nnz)
            _write_mudata_root(path, list(var), _obs(rows, cells, opened, names, categories, "rna"), cells, rows)
            record = {"path": shard_name(split, number), "n_cells": len(rows), "nnz": nnz["rna"], "nnz_by_modality": nnz}
            record["sha256"] = checksum_files(fs, str(path))
            records.append(record)
            bar.update(len(rows))
        splits[split] = {"n_cells": int(sum(len(r) for r in shards)), "shards": records}
    bar.close()
    return splits


def _write_mudata_root(path: Path, modalities: list[str], obs: pd.DataFrame, cells: _Cells, rows) -> None:
    """MuData's root of a shard: global obs (without the per-modality counts) and one mask per
    modality in obsm, so `mudata.read_zarr` opens the store."""
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    masks = {m: np.asarray(cells.measured[m], dtype=bool)[rows] for m in modalities}
    with warnings.catch_warnings(), ad.settings.override(zarr_write_format=3):
        warnings.simplefilter("ignore", UserWarning)
        ad.io.write_elem(root, "obs", obs.drop(columns=["n_counts", "measured"]))
        ad.io.write_elem(root, "obsm", masks)
    root["mod"].attrs.update({"mod-order": modalities})
    root.attrs.update({"encoding-type": "MuData", "encoding-version": "0.1.0"})


def _modality_records(tables: dict, stats: dict, cells: _Cells) -> dict:
    records = {}
    for m, table in tables.items():
        record = {
            "n_features": len(table["names"]),
            "n_cells_measured": int(np.sum(cells.measured[m])),
            "features": {
                "name": [str(n) for n in table["names"]],
                "cells_expressing": stats[m].cells_expressing.tolist(),
                "count_sum": stats[m].count_sum.tolist(),
            },
        }
        if m == "adt":
            record["features"]["genes"] = table["genes"]
        if m == "atac":
            record["genome"] = table["genome"]
        records[m] = record
    return records
