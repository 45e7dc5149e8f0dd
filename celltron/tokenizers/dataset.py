"""`celltron tokenize`: a corpus or an .h5ad file -> a Hugging Face `datasets` dataset on disk.

Columns: `input_ids`, `values` (scGPT and ortholog schemes), `length`, and requested obs
columns — the format Geneformer users already feed to their models. The tokenizer's
vocabulary is saved beside it (`vocab.json`) with a `tokenizer_config.json`.

For the scgpt scheme, `hvg=N` first selects N highly variable genes as scGPT's Preprocessor
does (`select_hvg`: scanpy's flavors, two streaming passes over the cells, over the .h5ad or a
corpus's training split) and the tokenizer keeps only those (`genes_subset`, recorded in its
config).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm.auto import tqdm

from celltron.corpus.genes import MIN_MAPPED_FRACTION, check_token_coverage
from celltron.corpus.readers import open_mapped_source, to_corpus_genes
from celltron.corpus.stats import GeneStatistics
from celltron.corpus.store import Corpus, ShardReader
from celltron.errors import ConfigError, InputError, OutputExistsError
from celltron.io import new_partial_dir
from celltron.preprocessing import log_normalise
from celltron.tokenizers.hvg import DISPERSION_FLAVORS, highly_variable_genes
from celltron.tokenizers.ragged import RaggedTokens
from celltron.tokenizers.rank_value import float32_datasets, is_float32
from celltron.tokenizers.schemes import SCHEMES, Block, make_tokenizer, scheme_class
from celltron.tokenizers.threads import available_cores, encode_blocks
from celltron.tokenizers.vocab import GeneVocab

# Block, make_tokenizer and SCHEMES were long imported from here; they live in schemes.py
__all__ = ["SCHEMES", "Block", "check_scheme_coverage", "make_tokenizer", "select_hvg", "tokenize_to_dataset"]


@dataclass
class _Input:
    gene_ids: np.ndarray
    gene_species: np.ndarray
    medians: dict[str, float]
    n_cells: int
    blocks: Iterator[Block]
    # another pass over the same cells, carrying the given obs columns (HVG selection reads twice)
    read: Callable[[tuple], Iterator[Block]] | None = None
    # per gene of the source (an .h5ad's own genes, mapped or not; a corpus's genes): its Ensembl
    # ID ('' unmapped), name and counts, to tell how much of the data a vocabulary covers
    source_genes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _corpus_input(corpus: Corpus, split: str, obs_keys, block_cells: int) -> _Input:
    genes = corpus.manifest["genes"]
    categories = corpus.manifest["obs_categories"]

    def check(keys):
        missing = [k for k in keys if k not in categories]
        if missing:
            raise InputError(f"{corpus.location}: corpus has no obs column(s) {missing}; it has {sorted(categories)}")

    check(obs_keys)
    records = corpus.shards(split)
    float32_of_dataset = float32_datasets(corpus.manifest)

    def blocks(obs_keys=obs_keys):
        check(obs_keys)
        for record in records:
            reader = ShardReader(corpus, record)
            for start in range(0, record["n_cells"], block_cells):
                b = reader.read(start, min(start + block_cells, record["n_cells"]))
                decode = lambda key: [categories[key][c] if c >= 0 else None for c in b.obs[key]]  # noqa: E731
                yield Block(
                    b.indptr,
                    b.genes,
                    b.counts,
                    b.obs["n_counts"],
                    decode("species"),
                    {k: decode(k) for k in obs_keys},
                    float32_of_dataset[b.obs["dataset"]],
                )

    n_cells = sum(r["n_cells"] for r in records)
    source_genes = (corpus.gene_ids, corpus.gene_ids, np.asarray(genes["count_sum"], dtype=np.float64))
    return _Input(
        corpus.gene_ids, np.asarray(genes["species"]), corpus.gene_medians(), n_cells, blocks(), blocks, source_genes=source_genes
    )


def _h5ad_input(
    path: Path,
    obs_keys,
    block_cells: int,
    layer: str,
    gene_column,
    species,
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
    scheme: str | None = None,
) -> _Input:
    opened = open_mapped_source(path, layer, gene_column, species, min_mapped_fraction, obs_keys)
    source, mapping, species = opened.source, opened.mapping, opened.species
    source_genes = (mapping.ensembl_ids, mapping.names, mapping.gene_counts)
    if scheme is not None:  # before the pass over every cell below
        check_scheme_coverage(scheme, source_genes, {species}, path, min_mapped_fraction)
    gene_ids, column_map = opened.mapped_genes()  # first-seen order, so ties keep the file's gene order
    has_totals = "n_counts" in source.obs.columns
    float32 = is_float32(source.read_rows(0, min(1, source.n_cells)).dtype)  # the matrix's dtype, from its first row

    def read(start, stop):
        raw = opened.read_counts(start, stop)
        mapped = to_corpus_genes(raw, column_map, len(gene_ids))
        totals = source.obs["n_counts"].to_numpy()[start:stop] if has_totals else np.asarray(raw.sum(axis=1)).ravel()
        return mapped, totals

    def all_blocks():
        for start in range(0, source.n_cells, block_cells):
            yield read(start, min(start + block_cells, source.n_cells))

    stats = GeneStatistics(len(gene_ids))
    for block in all_blocks():
        stats.add(*block)
    # a file past the in-memory limit is read a second time for exact medians
    medians = {g: float(m) for g, m in zip(gene_ids, stats.nonzero_medians(all_blocks)) if np.isfinite(m)}

    def blocks(obs_keys=obs_keys):
        opened.require_obs(obs_keys)
        for start in range(0, source.n_cells, block_cells):
            stop = min(start + block_cells, source.n_cells)
            mapped, totals = read(start, stop)
            obs = {k: source.obs[k].iloc[start:stop].tolist() for k in obs_keys}
            yield Block(mapped.indptr, mapped.indices, mapped.data, totals, [species] * (stop - start), obs, float32)

    return _Input(
        gene_ids,
        np.full(len(gene_ids), species),
        medians,
        source.n_cells,
        blocks(),
        blocks,
        source_genes=source_genes,
    )


def check_scheme_coverage(
    scheme: str, source_genes, species: set[str], source, min_fraction: float = MIN_MAPPED_FRACTION
) -> None:
    """Refuse data whose counts mostly fall on genes `scheme`'s fixed vocabulary has no token for
    (mouse genes and the human-only Geneformer or scGPT vocabularies): its cells would come out
    with no gene tokens. `source_genes`: Ensembl IDs, names and counts per gene of the source.
    The ortholog vocabulary is built from the data's own genes, so it always covers them."""
    if source_genes is None:
        return
    vocab = scheme_class(scheme).fixed_vocab(scheme)
    if vocab is None:
        return
    other = sorted(species - {"human"})
    hint = f"the {vocab.name} vocabulary holds human genes and these are {'/'.join(other)}: " if other else ""
    check_token_coverage(
        *source_genes,
        vocab,
        str(source),
        f"{hint}use --scheme ortholog, whose vocabulary is built from the data's own human and mouse genes",
        min_fraction,
    )


def select_hvg(
    data: _Input, n_top_genes: int, flavor: str = "seurat_v3", batch_key: str | None = None, span: float = 0.3
) -> list[str]:
    """Ensembl IDs of the `n_top_genes` highly variable genes over `data`'s cells, as scGPT's
    Preprocessor selects them (scanpy's `highly_variable_genes`), among the genes scGPT's
    vocabulary covers (scGPT's tutorials drop the others first) and these cells express.
    seurat_v3 reads raw counts; seurat and cell_ranger read log1p(counts per 10,000)."""
    columns = np.flatnonzero(GeneVocab.from_scgpt().lookup_genes(data.gene_ids) >= 0)
    keys = (batch_key,) if batch_key else ()
    n_genes = len(data.gene_ids)

    def blocks():
        for block in data.read(keys):
            x = sp.csr_matrix((block.counts, block.genes, block.indptr), shape=(len(block.indptr) - 1, n_genes))[:, columns]
            yield (log_normalise(x) if flavor in DISPERSION_FLAVORS else x), (block.obs[batch_key] if batch_key else None)

    candidates = data.gene_ids[columns]
    result = highly_variable_genes(blocks, n_top_genes, flavor=flavor, span=span, expressed_only=True, gene_names=candidates)
    return candidates[result.selected].tolist()


def _missing(value) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _arrow_table(tokens: RaggedTokens, block: Block) -> pa.Table:
    offsets = pa.array(tokens.offsets.astype(np.int32))
    columns = {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(tokens.input_ids.astype(np.int32)))}
    if tokens.values is not None:
        columns["values"] = pa.ListArray.from_arrays(offsets, pa.array(tokens.values.astype(np.float32)))
    columns["length"] = pa.array(tokens.lengths.astype(np.int32))
    for key, values in block.obs.items():
        # labels as strings with nulls, one fixed type, so every block has the same schema
        columns[key] = pa.array([None if _missing(v) else str(v) for v in values], type=pa.string())
    return pa.table(columns)


def tokenize_to_dataset(
    source,
    scheme: str,
    out,
    obs_keys=(),
    split: str = "train",
    max_len: int | None = None,
    seed: int = 0,
    layer: str = "X",
    gene_column: str | None = None,
    species: str | None = None,
    block_cells: int = 2048,
    storage_options: dict | None = None,
    progress: bool = True,
    hvg: int | None = None,
    hvg_flavor: str = "seurat_v3",
    hvg_batch_key: str | None = None,
    hvg_span: float = 0.3,
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
    threads: int | None = None,
) -> dict:
    """Tokenise every cell of a corpus split or an .h5ad file into a `datasets` dataset at `out`,
    blocks of `block_cells` on `threads` threads (None: every available core; the dataset is the
    same for any number, `celltron.tokenizers.threads`).

    `hvg` (scgpt scheme only) keeps the `hvg` highly variable genes (`select_hvg`), chosen over
    the .h5ad's cells or a corpus's training split (whichever split is tokenised, so that train
    and val get the same genes). Refuses data of which less than `min_mapped_fraction` of the
    counts map to Ensembl IDs, or reach the scheme's vocabulary. Returns a summary: cells,
    tokens, seconds, cells_per_second, threads.
    """
    import datasets

    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose another --out or remove it")
    if hvg is not None and not scheme_class(scheme).TAKES_GENES_SUBSET:
        raise ConfigError(
            f"--hvg selects highly variable genes as scGPT's Preprocessor does; scheme {scheme!r} "
            "has no such step (use --scheme scgpt)"
        )
    path = Path(str(source))
    if path.suffix == ".h5ad":
        data = selection = _h5ad_input(path, obs_keys, block_cells, layer, gene_column, species, min_mapped_fraction, scheme)
    else:
        corpus = Corpus(source, storage_options)
        data = selection = _corpus_input(corpus, split, obs_keys, block_cells)
        check_scheme_coverage(scheme, data.source_genes, set(data.gene_species), corpus.location, min_mapped_fraction)
        if split != "train":
            selection = _corpus_input(corpus, "train", (), block_cells)
    genes_subset = None if hvg is None else select_hvg(selection, hvg, hvg_flavor, hvg_batch_key, hvg_span)
    tokenizer, vocab = make_tokenizer(scheme, data, max_len, seed, genes_subset)
    work = new_partial_dir(out)  # removes stale partial directories of `out` left by killed runs
    try:
        summary = _write(tokenizer, data, work, seed, threads, progress)
        dataset = datasets.Dataset.from_file(str(work / "tokens.arrow"))
        dataset.save_to_disk(str(work / "dataset"))
        del dataset
        (work / "tokens.arrow").unlink()
        tokenizer.save_pretrained(work / "dataset")
        record = {"scheme": scheme, "source": str(source), "split": split, "seed": seed, **summary}
        if hvg is not None:
            record["hvg"] = {"n_top_genes": hvg, "flavor": hvg_flavor, "batch_key": hvg_batch_key, "span": hvg_span}
        (work / "dataset" / "tokenize_summary.json").write_text(json.dumps(record, indent=1))
        (work / "dataset").rename(out)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(tokenizer, data: _Input, work: Path, seed: int, threads: int | None, progress: bool) -> dict:
    start = time.perf_counter()
    cells = tokens = 0
    writer = None
    bar = tqdm(total=data.n_cells, unit="cells", desc="tokenizing", disable=not progress)
    for block, encoded in encode_blocks(tokenizer, data.blocks, seed, threads):
        table = _arrow_table(encoded, block)
        if writer is None:
            writer = pa.ipc.new_stream(str(work / "tokens.arrow"), table.schema)
        writer.write_table(table)
        cells += table.num_rows
        tokens += int(np.sum(table["length"].to_numpy()))
        bar.update(table.num_rows)
    bar.close()
    if writer is None:
        raise InputError("no cells to tokenize")
    writer.close()
    seconds = time.perf_counter() - start
    return {
        "cells": cells,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "cells_per_second": round(cells / seconds, 1),
        "threads": available_cores() if threads is None else threads,
    }
