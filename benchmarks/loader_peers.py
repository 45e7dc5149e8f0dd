"""One loader, prepared or measured, in whatever environment has it installed.

`benchmarks/loaders.py` runs this file with each loader's own Python (celltron's venv for
CorpusStream, a Python 3.12 venv for annbatch, one venv per other peer), so it imports nothing
of celltron's at module level and only the loader under test inside its function.

    python benchmarks/loader_peers.py prepare LOADER H5AD STORE
    python benchmarks/loader_peers.py measure LOADER H5AD STORE '{"batch_size": 64, ...}'

Each prints one JSON line (last line of stdout). Every loader yields, per batch, its count
matrix (a CSR of raw counts, or the loader's nearest equivalent, named in `OUTPUT`) and the
source rows of its cells (the .h5ad's `obs["src"]`), from which the shuffle measures are taken.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory comes first on sys.path, and benchmarks/tokenize.py
# would shadow the standard library's `tokenize` (imported by numpy's dependencies).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

WINDOW = 64  # shuffle quality is measured over windows of 64 delivered cells
BIN = 1024  # ... as the contiguous runs, and the 1,024-cell source ranges, each window touches

OUTPUT = {
    "celltron": "CSR (scipy, from the stream's flat batch arrays, built in the consumer)",
    "annbatch": "CSR (scipy)",
    "scdataset": "CSR (scipy, AnnData backed rows)",
    "scdl": "CSR (torch sparse, collate_sparse_matrix_batch)",
    "soma": "CSR (scipy, return_sparse_X=True)",
    "slaf": "COO table (polars, raw_mode=True; its native output)",
}


# ---------------------------------------------------------------- shuffle quality


def shuffle_quality(ids: np.ndarray) -> tuple[float, float]:
    """Mean, over consecutive windows of 64 delivered cells, of the number of contiguous runs
    of source rows (64: no two neighbours together; 1: one slice) and of distinct 1,024-cell
    source ranges touched (a uniformly random sample of 64 out of 200k rows touches ~55)."""
    windows = ids[: len(ids) // WINDOW * WINDOW].reshape(-1, WINDOW)
    if not len(windows):
        return float("nan"), float("nan")
    ordered = np.sort(windows, axis=1)
    runs = 1 + (np.diff(ordered, axis=1) != 1).sum(axis=1)
    bins = ordered // BIN
    distinct_bins = 1 + (np.diff(bins, axis=1) != 0).sum(axis=1)
    return float(runs.mean()), float(distinct_bins.mean())


# ---------------------------------------------------------------- timing


def measure(make_batches: Callable[[], Iterator[tuple[object, np.ndarray]]], seconds: float, repeats: int) -> dict:
    """Cells/s over `seconds` after the first batch (start-up), `repeats` times, each with a
    fresh iterator; the shuffle measures from the first repeat's source rows."""
    rates, ids, first_batch_s = [], [], []
    for repeat in range(repeats):
        start = time.perf_counter()
        batches = make_batches()
        _, first_ids = next(batches)
        first_batch_s.append(time.perf_counter() - start)
        seen = [np.asarray(first_ids)] if repeat == 0 else None
        cells, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            _, src = next(batches)
            cells += len(src)
            if seen is not None:
                seen.append(np.asarray(src))
        rates.append(cells / elapsed)
        if seen is not None:
            ids = np.concatenate(seen).astype(np.int64)
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    runs, bins = shuffle_quality(ids)
    return {"rates": rates, "runs64": runs, "bins64": bins, "first_batch_s": min(first_batch_s), "cells_seen": len(ids)}


def epochs(one_epoch: Callable[[int], Iterator[tuple[object, np.ndarray]]]) -> Iterator[tuple[object, np.ndarray]]:
    """Epoch after epoch (a small dataset is read many times within the timed seconds)."""
    epoch = 0
    while True:
        yield from one_epoch(epoch)
        epoch += 1


def source_rows(h5ad: str) -> np.ndarray:
    import anndata as ad

    return ad.read_h5ad(h5ad, backed="r").obs["src"].to_numpy()


# ---------------------------------------------------------------- celltron


def prepare_celltron(h5ad: str, store: str) -> None:
    from celltron.corpus import BuildOptions, build_corpus

    # every cell in the training split (the build shuffles them; shard obs names map them back)
    build_corpus([h5ad], store, BuildOptions(progress=False, val_fraction=0.0), overwrite=True)


def batches_celltron(h5ad: str, store: str, settings: dict) -> Callable[[], Iterator]:
    import scipy.sparse as sp
    from torch.utils.data import DataLoader

    from celltron.corpus import Corpus, CorpusStream, collate_cells

    corpus = Corpus(store)
    src = corpus_source_rows(corpus, h5ad)
    n_genes = corpus.n_genes

    def make() -> Iterator:
        # batches gathered by the stream (the default here), or single cells batched by collate_cells
        per_cell = settings.get("per_cell", False)
        stream = CorpusStream(
            corpus,
            split="train",
            infinite=True,
            block_size=settings["block"],
            buffer_size=settings["buffer"],
            seed=1,
            batch_size=None if per_cell else settings["batch_size"],
        )
        workers = settings.get("workers", 0)
        if per_cell:
            loader = DataLoader(stream, batch_size=settings["batch_size"], num_workers=workers, collate_fn=collate_cells)
        else:
            loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=as_is)
        for batch in loader:
            n = len(batch["offsets"]) - 1
            x = sp.csr_matrix((batch["counts"], batch["genes"], batch["offsets"]), shape=(n, n_genes))
            yield x, src[batch["cell_index"]]

    return make


def as_is(batch):
    """A DataLoader's conversion of an already collated batch: none (numpy arrays stay numpy)."""
    return batch


def corpus_source_rows(corpus, h5ad: str) -> np.ndarray:
    """The .h5ad row of each training cell, in corpus order: the build preshuffles the cells
    (one seeded permutation), and each shard's obs names say which cells it holds."""
    import anndata as ad
    import pandas as pd
    import zarr

    names = [
        ad.io.read_elem(zarr.open_group(f"{corpus.root}/{record['path']}", mode="r")["obs"]).index
        for record in corpus.shards("train")
    ]
    source = pd.Series(source_rows(h5ad), index=ad.read_h5ad(h5ad, backed="r").obs_names)
    return source.loc[np.concatenate(names)].to_numpy()


# ---------------------------------------------------------------- annbatch


def prepare_annbatch(h5ad: str, store: str) -> None:
    import zarr
    from annbatch import DatasetCollection

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})  # annbatch's documented setting
    DatasetCollection(store).add_adatas([h5ad], shuffle=True)  # its recommended preparation: a preshuffled store


def batches_annbatch(h5ad: str, store: str, settings: dict) -> Callable[[], Iterator]:
    import zarr
    from annbatch import DatasetCollection, Loader

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    collection = DatasetCollection(store, mode="r")

    def make() -> Iterator:
        options = {k: settings[k] for k in ("chunk_size", "preload_nchunks") if k in settings}
        loader = Loader(batch_size=settings["batch_size"], shuffle=True, rng=np.random.default_rng(1), **options)
        loader.use_collection(collection)
        for batch in epochs(lambda _: iter(loader)):
            yield batch["X"], batch["obs"]["src"].to_numpy()

    return make


# ---------------------------------------------------------------- scDataset


def batches_scdataset(h5ad: str, store: str, settings: dict) -> Callable[[], Iterator]:
    import anndata as ad
    from scdataset import BlockShuffling, scDataset
    from torch.utils.data import DataLoader

    def fetch(adata, indices):  # scDataset sorts each fetch's indices; its documented to_memory() of the view
        rows = adata[indices].to_memory()
        return rows.X, rows.obs["src"].to_numpy()

    def batch(fetched, indices):
        x, src = fetched
        return x[indices], src[indices]

    def make() -> Iterator:
        adata = ad.read_h5ad(h5ad, backed="r")
        dataset = scDataset(
            adata,
            BlockShuffling(block_size=settings.get("block_size", 8)),
            batch_size=settings["batch_size"],
            fetch_factor=settings.get("fetch_factor", 16),
            fetch_callback=fetch,
            batch_callback=batch,
            seed=1,
        )
        loader = DataLoader(dataset, batch_size=None, num_workers=settings.get("workers", 0))
        yield from epochs(lambda _: iter(loader))

    return make


# ---------------------------------------------------------------- bionemo-scdl


def prepare_scdl(h5ad: str, store: str) -> None:
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

    SingleCellMemMapDataset(store, h5ad_path=h5ad, use_X_not_raw=True)  # .h5ad -> memory-mapped CSR arrays


def batches_scdl(h5ad: str, store: str, settings: dict) -> Callable[[], Iterator]:
    import torch
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    dataset = SingleCellMemMapDataset(store)
    src = source_rows(h5ad)

    class IndexedRows(torch.utils.data.Dataset):  # each row with its index, so the batch knows its cells
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return dataset[i], i

    def collate(items):
        return collate_sparse_matrix_batch([x for x, _ in items]), np.array([i for _, i in items])

    def make() -> Iterator:
        sampler = BatchSampler(
            RandomSampler(IndexedRows(), generator=torch.Generator().manual_seed(1)), settings["batch_size"], False
        )
        loader = DataLoader(IndexedRows(), batch_sampler=sampler, collate_fn=collate, num_workers=settings.get("workers", 0))
        for x, rows in epochs(lambda _: iter(loader)):
            yield x, src[rows]

    return make


# ---------------------------------------------------------------- TileDB-SOMA ML


def prepare_soma(h5ad: str, store: str) -> None:
    import tiledbsoma.io

    tiledbsoma.io.from_h5ad(store, h5ad, measurement_name="RNA")


def batches_soma(h5ad: str, store: str, settings: dict) -> Callable[[], Iterator]:
    import tiledbsoma as soma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    def make() -> Iterator:
        with soma.Experiment.open(store) as experiment, experiment.axis_query(measurement_name="RNA") as query:
            options = {k: settings[k] for k in ("shuffle_chunk_size", "io_batch_size") if k in settings}
            dataset = ExperimentDataset(
                query,
                layer_name="data",
                obs_column_names=["src"],
                batch_size=settings["batch_size"],
                shuffle=True,
                seed=1,
                return_sparse_X=True,
                **options,
            )
            loader = experiment_dataloader(dataset, num_workers=settings.get("workers", 0))

            def one_epoch(epoch: int) -> Iterator:
                dataset.set_epoch(epoch)
                for x, obs in loader:
                    yield x, obs["src"].to_numpy()

            yield from epochs(one_epoch)

    return make


# ---------------------------------------------------------------- SLAF


def prepare_slaf(h5ad: str, store: str) -> None:
    from slaf.data import SLAFConverter

    SLAFConverter().convert(h5ad, store)


def batches_slaf(h5ad: str, store: str, settings: dict) -> Callable[[], Iterator]:
    from slaf import SLAFArray
    from slaf.ml import SLAFDataLoader

    array = SLAFArray(store)

    def make() -> Iterator:
        # raw counts (raw_mode), or its tokenised output when settings name a tokenizer
        tokenizer = settings.get("tokenizer")
        options = {"raw_mode": True} if tokenizer is None else {"tokenizer_type": tokenizer, "max_genes": settings["max_genes"]}
        loader = SLAFDataLoader(array, batch_size=settings["batch_size"], n_epochs=1000, verbose=False, **options)
        for batch in loader:
            yield batch.get("x", batch.get("input_ids")), np.asarray(batch["cell_ids"])

    return make


# ---------------------------------------------------------------- command line


def store_bytes(store: str) -> int:
    path = Path(store)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str]) -> None:
    action, loader, h5ad, store = argv[:4]
    if action == "prepare":
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        globals()[f"prepare_{loader}"](h5ad, store)
        result = {"seconds": time.perf_counter() - start, "bytes": store_bytes(store)}
    else:
        settings = json.loads(argv[4])
        make = globals()[f"batches_{loader}"](h5ad, store, settings)
        result = measure(make, settings["seconds"], settings["repeats"]) | {"output": OUTPUT[loader]}
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # loaders with background threads (slaf's prefetcher, soma's pools) would hold the exit


if __name__ == "__main__":
    main(sys.argv[1:])
