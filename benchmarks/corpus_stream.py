"""Streaming throughput: `CorpusStream` against reading the same cells from .h5ad files.

Builds (once, cached under --workdir) a synthetic corpus of 200k cells x 20k genes with ~2k
non-zeros per cell, and a corpus of the five PBMC files in the shared data directory, then
prints cells/s for:

- CorpusStream through a DataLoader (batch 64, collate_fn=list) with 0, 1 and 2 workers, and
  with `collate_cells` (flat arrays per batch) in 1 and 2 workers,
  and (synthetic corpus) the same with zarr's Rust codec pipeline (zarrs);
- anndata backed mode, random batches of 64 cells (`adata.X[sorted idx]`, `adata[idx].X`),
  which is how most people feed a model from an .h5ad today;
- h5py random batches of 64 with a cached indptr (a careful hand-written reader);
- contiguous blocks of 1024 cells from the same .h5ad (backed X slices, h5py slices);
- then (--profile-seconds) a cProfile of CorpusStream in one process and each of its stages
  on its own: block reads, per-cell dicts, DataLoader batching, the worker hand-off.

With --integrity it only measures what the checks on every read cost (crc32c of each inner
chunk, indptr on open; value checks for corpora without inner checksums): CorpusStream
(num_workers=0) and 1,024-cell block reads, checks on and off (the benchmark-only switch
CELLTRON_BENCHMARK_NO_READ_CHECKS=1), alternating rounds, on the synthetic corpus and on a copy
rewritten without inner checksums (the format of corpora built before them).

Every method is timed for --seconds after its first batch (file opening, worker start-up and
the first window are start-up, not throughput), with every file read once beforehand so all
reads come from the page cache. Each dataset's cells are also written as an uncompressed
.h5ad (anndata's default) and a gzip one (`write_h5ad(compression="gzip")`); for PBMC that
is the five files concatenated, i.e. the corpus's cells. Ratios are against anndata-backed
random batches of 64 on the uncompressed file, the faster of the two for anndata.

    python -m benchmarks.corpus_stream            # full run (200k synthetic cells), ~8 min the first time
    python -m benchmarks.corpus_stream --quick    # 20k synthetic cells, 3 s per method
    python -m benchmarks.corpus_stream --quick --integrity   # cost of the read checks only, ~2 min
    (python benchmarks/corpus_stream.py works too)
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory comes first on sys.path, and benchmarks/tokenize.py
# would then shadow the standard library's `tokenize` (imported by inspect, dataclasses, ...).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402  (after the sys.path fix above, as are the imports below)
import contextlib
import cProfile
import datetime
import glob
import io
import json
import pickle
import platform
import pstats
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import anndata as ad
import fsspec
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import zarr
from torch.utils.data import DataLoader

from celltron.corpus import BuildOptions, Corpus, CorpusStream, build_corpus, collate_cells
from celltron.corpus.genes import symbol_to_ensembl
from celltron.corpus.schema import CHECKSUM_VERSION, checksum_files
from celltron.corpus.store import NO_READ_CHECKS_ENV, ShardReader

# the five PBMC sets: scrna/human/ of the project's shared data ($CELLTRON_SHARED_DATA, else shared/data beside the repository)
PBMC_DIR = (
    Path(os.environ.get("CELLTRON_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "scrna" / "human"
)
BATCH = 64
BLOCK = 1024
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


# ---------------------------------------------------------------- machine


def machine_lines() -> list[str]:
    """Where and with what the numbers were taken."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    mem = next((line.split()[1] for line in _read_lines("/proc/meminfo") if line.startswith("MemTotal")), "0")
    versions = {name: _version(name) for name in ("torch", "zarr", "anndata", "numpy", "h5py", "zarrs")}
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.node()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), {int(mem) / 2**20:.1f} GiB RAM",
        f"versions: python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"celltron commit: {_git_commit()}",
    ]


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _zarrs_importable() -> bool:
    try:
        import zarrs  # noqa: F401  (optional: the 'fast' extra)
    except ImportError:
        return False
    return True


def _git_commit() -> str:
    # rev-parse only reads the repository; it never touches the index or the work tree.
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- synthetic data


def human_gene_ids(n_genes: int) -> np.ndarray:
    """The first `n_genes` (sorted) human Ensembl IDs that the corpus builder keeps as they are.

    Targets of the bundled symbol table: some other IDs of the BioMart table are retired IDs
    the builder maps onto a current one (and then sums), which would shrink the gene count.
    """
    table = symbol_to_ensembl("human")
    ids = sorted({g for g in table.values() if g.startswith("ENSG") and table.get(g, g) == g})
    if len(ids) < n_genes:
        raise SystemExit(f"only {len(ids)} human Ensembl IDs are bundled; ask for --genes <= {len(ids)}")
    return np.asarray(ids[:n_genes])


def detection_rates(n_genes: int, nnz_per_cell: int, rng: np.random.Generator) -> np.ndarray:
    """Per-gene probability of being detected in an average cell, summing to `nnz_per_cell`.

    Zipf-like, so a few housekeeping genes are in nearly every cell and most genes are rare,
    as in real data; popularity is shuffled over gene IDs so it does not follow ID order.
    """
    weight = 1.0 / (rng.permutation(n_genes) + 20.0) ** 0.7
    lo, hi = 0.0, nnz_per_cell / weight.min()
    for _ in range(60):  # bisect the scale that hits the target after capping at 0.95
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(mid * weight, 0.95).sum() < nnz_per_cell else (lo, mid)
    return np.minimum(lo * weight, 0.95).astype(np.float32)


def synthetic_block(rates: np.ndarray, n_cells: int, rng: np.random.Generator) -> sp.csr_matrix:
    """`n_cells` cells of integer counts >= 1 as float32 CSR (a dense mask per block only)."""
    depth = rng.lognormal(0.0, 0.3, size=(n_cells, 1)).astype(np.float32)
    depth /= np.exp(0.3**2 / 2)  # mean depth 1, so the mean number of genes stays on target
    prob = np.minimum(depth * rates, 0.95)
    rows, cols = np.nonzero(rng.random(prob.shape, dtype=np.float32) < prob)  # row-major: CSR order
    # Overdispersed counts (gamma-Poisson), larger for popular genes and deeper cells.
    mean_extra = 6.0 * prob[rows, cols] * rng.gamma(2.0, 0.5, size=len(rows))
    counts = 1.0 + rng.poisson(mean_extra)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_cells))])
    return sp.csr_matrix((counts.astype(np.float32), cols.astype(np.int32), indptr), shape=(n_cells, len(rates)))


def write_synthetic_h5ad(path: Path, n_cells: int, n_genes: int, nnz_per_cell: int, seed: int = 0, block: int = 1000) -> None:
    """Write the synthetic .h5ad block by block (never the whole matrix in memory).

    anndata writes obs/var and the file skeleton; X is then written with anndata's own
    sparse writer and appended to, giving the same layout (uncompressed, chunked, float32
    CSR) as `AnnData.write_h5ad` of an in-memory matrix.
    """
    rng = np.random.default_rng(seed)
    rates = detection_rates(n_genes, nnz_per_cell, rng)
    partial = path.with_suffix(".partial.h5ad")
    # `src`: the row number, so loaders that reorder the cells (preshuffled stores) still say which cells they gave
    obs = pd.DataFrame({"src": np.arange(n_cells)}, index=pd.Index([f"cell{i:07d}" for i in range(n_cells)], name="cell"))
    var = pd.DataFrame(index=pd.Index(human_gene_ids(n_genes), name="gene_ids"))
    ad.AnnData(obs=obs, var=var).write_h5ad(partial)
    chunks = one_shot_chunks(n_cells * nnz_per_cell, np.float32)
    with h5py.File(partial, "r+") as handle:
        for start in range(0, n_cells, block):
            counts = synthetic_block(rates, min(block, n_cells - start), rng)
            if start == 0:
                ad.io.write_elem(handle, "X", counts, dataset_kwargs={"chunks": chunks})
                x = ad.io.sparse_dataset(handle["X"])
            else:
                x.append(counts)
    partial.rename(path)  # only a complete file gets the name that is reused


def one_shot_chunks(n_values: int, dtype) -> tuple[int, ...]:
    """The chunk shape h5py picks for X's data when anndata writes the whole matrix at once.

    Appending block by block would otherwise keep the (much smaller) chunks sized for the
    first block, and the h5ad baselines would pay for a layout real files do not have.
    """
    with h5py.File(io.BytesIO(), "w") as probe:  # in memory; nothing is allocated for the data
        return probe.create_dataset("x", shape=(n_values,), dtype=dtype, maxshape=(None,)).chunks


# ---------------------------------------------------------------- corpora


def ensure_synthetic(workdir: Path, n_cells: int, n_genes: int, nnz: int) -> tuple[Path, str]:
    """The synthetic .h5ad (generated unless cached); returns its path and a timing note."""
    path = workdir / f"synthetic_{n_cells}x{n_genes}_{nnz}nnz.h5ad"
    if path.exists():
        return path, "cached"
    start = time.perf_counter()
    write_synthetic_h5ad(path, n_cells, n_genes, nnz)
    return path, f"generated in {time.perf_counter() - start:.1f} s"


def ensure_gzip_copy(plain: Path) -> tuple[Path, str]:
    """`plain` rewritten with `write_h5ad(compression="gzip")`, as many shared files are."""
    path = plain.with_name(plain.name.replace(".h5ad", ".gzip.h5ad"))
    if path.exists():
        return path, "cached"
    start = time.perf_counter()
    _write_atomically(ad.read_h5ad(plain), path, compression="gzip")
    return path, f"written in {time.perf_counter() - start:.1f} s"


def ensure_concatenation(inputs: list[Path], path: Path) -> tuple[Path, str]:
    """The PBMC inputs as one uncompressed .h5ad (outer join of genes): the same cells the
    corpus holds, for the h5ad baselines."""
    if path.exists():
        return path, "cached"
    start = time.perf_counter()
    joined = ad.concat(
        [ad.read_h5ad(p) for p in inputs], join="outer", label="source", keys=[p.stem for p in inputs], index_unique="-"
    )
    joined.X = sp.csr_matrix(joined.X, dtype=np.float32)
    joined.obs["src"] = np.arange(joined.n_obs)  # the row number, as in the synthetic file
    _write_atomically(joined, path)
    return path, f"written in {time.perf_counter() - start:.1f} s"


def _write_atomically(adata: ad.AnnData, path: Path, **options) -> None:
    partial = path.with_suffix(".partial.h5ad")
    adata.write_h5ad(partial, **options)
    partial.rename(path)  # only a complete file gets the name that is reused


def ensure_corpus(inputs: list[Path], out: Path, compression: str = BuildOptions.compression) -> tuple[Corpus, str]:
    """Build `out` from `inputs` unless a complete corpus with this codec is already there;
    returns it and a note with its build time (kept in a side file, as the corpus itself is
    immutable)."""
    record = out.with_name(out.name + ".build.json")
    if (out / "manifest.json").exists() and record.exists():
        saved = json.loads(record.read_text())
        current = json.loads((out / "manifest.json").read_text()).get("checksum_version") == CHECKSUM_VERSION
        if saved.get("compression") == compression and current:  # else built before inner checksums: rebuild
            return Corpus(out), f"cached (built in {saved['seconds']:.1f} s on {saved['date']}, {compression})"
    start = time.perf_counter()
    build_corpus(inputs, out, BuildOptions(progress=False, val_fraction=0.01, compression=compression), overwrite=True)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds, "date": datetime.date.today().isoformat(), "compression": compression}))
    return Corpus(out), f"built in {seconds:.1f} s ({compression})"


def corpus_summary(corpus: Corpus) -> str:
    m = corpus.manifest
    train = m["splits"]["train"]
    nnz = sum(s["nnz"] for s in train["shards"])
    size = sum(f.stat().st_size for f in Path(corpus.root).rglob("*") if f.is_file())
    return (
        f"{m['n_cells']} cells, {corpus.n_genes} genes, train {train['n_cells']} cells in {len(train['shards'])} shards, "
        f"{nnz / max(train['n_cells'], 1):.0f} non-zeros/cell, {size / 2**20:.0f} MiB on disk"
    )


def h5ad_summary(path: Path) -> str:
    with h5py.File(path, "r") as handle:
        data = handle["X/data"]
        n_cells = len(handle["X/indptr"]) - 1
        return (
            f"{path.name}: {n_cells} cells, {data.shape[0] / n_cells:.0f} non-zeros/cell, {data.dtype}, "
            f"compression={data.compression or 'none'}, chunks={data.chunks}, {path.stat().st_size / 2**20:.0f} MiB"
        )


def warm_page_cache(paths: list[Path]) -> float:
    """Read every file below `paths` once, so timed reads come from memory; returns GiB read."""
    total = 0
    for root in paths:
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
        for file in files:
            with open(file, "rb", buffering=0) as handle:
                while chunk := handle.read(1 << 24):
                    total += len(chunk)
    return total / 2**30


# ---------------------------------------------------------------- readers under test


def zarr_pipeline(use_zarrs: bool):
    """A context with zarr's codec pipeline switched to zarrs (or a no-op context)."""
    return zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}) if use_zarrs else contextlib.nullcontext()


def _use_zarrs_in_worker(_worker_id: int) -> None:
    # DataLoader workers are separate processes: the main process's zarr config is not
    # guaranteed to reach them (it does under fork, not under spawn/forkserver).
    zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE})


def stream_batches(corpus: Corpus, num_workers: int, use_zarrs: bool = False, flat: bool = False) -> Iterator[int]:
    """CorpusStream (training mode, epoch after epoch) through a plain DataLoader; `flat`
    collates in the worker with `collate_cells` (a few arrays per batch cross processes)."""
    stream = CorpusStream(corpus, split="train", infinite=True)
    options = {}
    if use_zarrs and num_workers:
        # zarrs' Rust thread pool does not survive fork: once the main process has decoded
        # with zarrs, forked workers that use zarrs wait forever. Spawned workers start clean.
        options = {"worker_init_fn": _use_zarrs_in_worker, "multiprocessing_context": "spawn"}
    collate = collate_cells if flat else list
    loader = DataLoader(stream, batch_size=BATCH, num_workers=num_workers, collate_fn=collate, **options)
    with zarr_pipeline(use_zarrs):
        for batch in loader:
            yield len(batch["offsets"]) - 1 if flat else len(batch)


def anndata_random_batches(path: Path, view: bool = False, seed: int = 0) -> Iterator[int]:
    """Random batches of 64 cells from a backed AnnData (`X[idx]`, or `adata[idx].X`)."""
    adata = ad.read_h5ad(path, backed="r")
    rng = np.random.default_rng(seed)
    try:
        while True:
            idx = np.sort(rng.choice(adata.n_obs, BATCH, replace=False))  # h5py wants sorted indices
            x = adata[idx].X if view else adata.X[idx]
            yield x.shape[0]
    finally:
        adata.file.close()


def anndata_blocks(path: Path, seed: int = 0) -> Iterator[int]:
    """Contiguous blocks of 1024 cells, in random block order, from a backed AnnData's X."""
    adata = ad.read_h5ad(path, backed="r")
    x = adata.X  # one sparse-dataset object for the whole run
    try:
        for start in _block_starts(adata.n_obs, seed):
            yield x[start : start + BLOCK].shape[0]
    finally:
        adata.file.close()


def _block_starts(n_cells: int, seed: int) -> Iterator[int]:
    rng = np.random.default_rng(seed)
    starts = np.arange(0, n_cells, BLOCK)
    while True:
        yield from rng.permutation(starts).tolist()


class H5CSR:
    """An .h5ad's X read with plain h5py, indptr cached in memory (what a careful user writes)."""

    def __init__(self, path: Path):
        self.handle = h5py.File(path, "r")
        group = self.handle["X"]
        self.indptr = group["indptr"][:].astype(np.int64)
        self.data, self.indices = group["data"], group["indices"]
        self.n_cells, self.n_genes = len(self.indptr) - 1, int(group.attrs["shape"][1])

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = self.indptr[start], self.indptr[stop]
        return sp.csr_matrix(
            (self.data[lo:hi], self.indices[lo:hi], self.indptr[start : stop + 1] - lo), shape=(stop - start, self.n_genes)
        )

    def close(self) -> None:
        self.handle.close()


def h5py_random_batches(path: Path, seed: int = 0) -> Iterator[int]:
    """Random batches of 64: one h5py slice per cell, stacked."""
    reader = H5CSR(path)
    rng = np.random.default_rng(seed)
    try:
        while True:
            idx = np.sort(rng.choice(reader.n_cells, BATCH, replace=False))
            yield sp.vstack([reader.rows(i, i + 1) for i in idx.tolist()], format="csr").shape[0]
    finally:
        reader.close()


def h5py_blocks(path: Path, seed: int = 0) -> Iterator[int]:
    """Contiguous blocks of 1024 cells via h5py slices, in random block order."""
    reader = H5CSR(path)
    try:
        for start in _block_starts(reader.n_cells, seed):
            yield reader.rows(start, min(start + BLOCK, reader.n_cells)).shape[0]
    finally:
        reader.close()


# ---------------------------------------------------------------- timing


@dataclass
class Result:
    dataset: str
    method: str
    cells: int
    seconds: float
    startup: float

    @property
    def rate(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else float("nan")


def measure(dataset: str, method: str, batches: Iterator[int], seconds: float) -> Result:
    """Cells/s of `batches` over `seconds`, counted from the end of its first batch."""
    start = time.perf_counter()
    try:
        next(batches)  # opening files, forking workers, reading the first window
        startup = time.perf_counter() - start
        start, cells, elapsed = time.perf_counter(), 0, 0.0
        while elapsed < seconds:
            cells += next(batches)
            elapsed = time.perf_counter() - start
    finally:
        batches.close()  # runs the generators' cleanup: closes files, stops DataLoader workers
    result = Result(dataset, method, cells, elapsed, startup)
    print(
        f"  {method:<58} {result.rate:>10,.0f} cells/s  ({cells:,} cells in {elapsed:.1f} s; start-up {startup:.2f} s)",
        flush=True,
    )
    return result


PLAIN, GZIP = " (uncompressed)", " (gzip)"
BASELINE = "anndata backed X[sorted random 64]" + PLAIN  # the ratio column's denominator


def stream_methods(corpus: Corpus, with_zarrs: bool) -> list[tuple[str, Callable[[], Iterator[int]]]]:
    methods = [(f"CorpusStream, DataLoader num_workers={w}", lambda w=w: stream_batches(corpus, w)) for w in (0, 1, 2)]
    methods += [
        (f"CorpusStream, collate_cells, num_workers={w}", lambda w=w: stream_batches(corpus, w, flat=True)) for w in (1, 2)
    ]
    if with_zarrs:
        methods += [
            (
                f"CorpusStream + zarrs pipeline, num_workers={w}{' (spawn)' if w else ''}",
                lambda w=w: stream_batches(corpus, w, True),
            )
            for w in (0, 1, 2)
        ]
    return methods


def h5ad_methods(plain: Path, gzipped: Path) -> list[tuple[str, Callable[[], Iterator[int]]]]:
    """Every reader on the uncompressed file; random batches and blocks on the gzip one."""
    return [
        (BASELINE, lambda: anndata_random_batches(plain)),
        (f"anndata backed adata[random 64].X{PLAIN}", lambda: anndata_random_batches(plain, view=True)),
        (f"h5py random 64, cached indptr{PLAIN}", lambda: h5py_random_batches(plain)),
        (f"anndata backed X[1024-cell blocks]{PLAIN}", lambda: anndata_blocks(plain)),
        (f"h5py 1024-cell blocks, cached indptr{PLAIN}", lambda: h5py_blocks(plain)),
        (f"anndata backed X[sorted random 64]{GZIP}", lambda: anndata_random_batches(gzipped)),
        (f"anndata backed X[1024-cell blocks]{GZIP}", lambda: anndata_blocks(gzipped)),
        (f"h5py 1024-cell blocks, cached indptr{GZIP}", lambda: h5py_blocks(gzipped)),
    ]


def run_methods(dataset: str, methods, seconds: float) -> list[Result]:
    print(f"{dataset}:", flush=True)
    return [measure(dataset, name, make(), seconds) for name, make in methods]


def check_zarrs(corpus: Corpus) -> bool:
    """Whether zarrs imports and really becomes the pipeline of arrays opened under it."""
    if not _zarrs_importable():
        print("zarrs: not installed; skipping the zarrs rows (pip install 'celltron[fast]')")
        return False
    with zarr_pipeline(True):
        reader = ShardReader(corpus, corpus.shards("train")[0])
        name = type(reader.data._async_array.codec_pipeline).__name__
    print(f"zarrs: codec pipeline of arrays opened under the setting: {name}")
    return name == "ZarrsCodecPipeline"


# ---------------------------------------------------------------- where the time goes


def profile_stream(corpus: Corpus, seconds: float, prefetch: bool, top: int = 10) -> None:
    """cProfile of CorpusStream (num_workers=0) for `seconds`; prints the top functions.

    cProfile sees the main thread only: reads done in the stream's prefetch thread and zarr's
    decode threads show up as waiting (`result`, `wait`), hence the prefetch=False variant.
    """
    stream = CorpusStream(corpus, split="train", infinite=True, prefetch=prefetch)
    loader = iter(DataLoader(stream, batch_size=BATCH, num_workers=0, collate_fn=list))
    next(loader)
    profiler, cells, start = cProfile.Profile(), 0, time.perf_counter()
    profiler.enable()
    while time.perf_counter() - start < seconds:
        cells += len(next(loader))
    profiler.disable()
    elapsed = time.perf_counter() - start
    print(
        f"\ncProfile, CorpusStream num_workers=0, prefetch={prefetch}: {cells / elapsed:,.0f} cells/s under the profiler; "
        f"top {top} by cumulative time (main thread)"
    )
    print(f"| {'ncalls':>9} | {'tottime s':>9} | {'cumtime s':>9} | function |")
    print(f"|{'-' * 11}|{'-' * 11}|{'-' * 11}|----------|")
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: item[1][3], reverse=True)[:top]
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        print(f"| {ncalls:>9} | {tottime:>9.2f} | {cumtime:>9.2f} | `{func}` ({where}) |")


def time_stages(corpus: Corpus, seconds: float, with_zarrs: bool) -> None:
    """Cells/s of each stage of the stream on its own, in one process."""
    records = corpus.shards("train")
    rows = [("block reads (ShardReader.read, 1024 cells), celltron direct reader", _rate_reads(corpus, records, seconds, False))]
    if with_zarrs:
        rows.append(("block reads (ShardReader.read, 1024 cells), zarrs pipeline", _rate_reads(corpus, records, seconds, True)))
    window = _one_window(corpus, records[0])
    order = np.random.default_rng(0).permutation(sum(len(b) for b in window))
    cells = list(CorpusStream._cells(window, order))
    batches = [cells[a : a + BATCH] for a in range(0, len(cells), BATCH)]
    rows += [
        # CorpusStream._cells is the per-cell loop the stream runs over every window it reads.
        (
            "per-cell dicts from an in-memory window (CorpusStream._cells)",
            _rate(lambda: sum(1 for _ in CorpusStream._cells(window, order)), seconds),
        ),
        (
            "DataLoader batching of ready dicts (num_workers=0, collate list)",
            _rate(lambda: _replay_through_loader(cells), seconds),
        ),
        # A DataLoader worker hands every batch to the main process as a pickled queue message.
        (
            "worker -> main hand-off: pickle + unpickle of 64-cell batches",
            _rate(lambda: sum(len(_round_trip(b)) for b in batches), seconds),
        ),
    ]
    print("\nstages of CorpusStream on their own (synthetic corpus, one process):")
    print("| stage | cells/s |\n|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


def _one_window(corpus: Corpus, record: dict) -> list:
    """The first 8192 cells of a shard as the 1024-cell blocks a stream window holds."""
    reader = ShardReader(corpus, record)
    n = min(8192, record["n_cells"])
    return [reader.read(a, min(a + BLOCK, n)) for a in range(0, n, BLOCK)]


def _replay_through_loader(cells: list) -> int:
    return sum(len(b) for b in DataLoader(_Replay(cells), batch_size=BATCH, collate_fn=list))


def _round_trip(batch: list) -> list:
    return pickle.loads(ForkingPickler.dumps(batch))


class _Replay(torch.utils.data.IterableDataset):
    """Yields prepared items, so only the DataLoader's own cost is measured."""

    def __init__(self, items: list):
        super().__init__()
        self.items = items

    def __iter__(self):
        return iter(self.items)


def _rate(run: Callable[[], int], seconds: float) -> float:
    run()  # warm-up
    start, cells = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        cells += run()
    return cells / (time.perf_counter() - start)


def _rate_reads(corpus: Corpus, records: list[dict], seconds: float, use_zarrs: bool) -> float:
    with zarr_pipeline(use_zarrs):
        readers = [ShardReader(corpus, r) for r in records]
        blocks = [(s, a, min(a + BLOCK, r["n_cells"])) for s, r in enumerate(records) for a in range(0, r["n_cells"], BLOCK)]
        order = iter(np.random.default_rng(0).permutation(len(blocks)).tolist() * 1000)

        def read_one() -> int:
            shard, start, stop = blocks[next(order)]
            return len(readers[shard].read(start, stop))

        return _rate(read_one, seconds)


# ---------------------------------------------------------------- report


def print_table(results: list[Result]) -> None:
    baselines = {r.dataset: r.rate for r in results if r.method == BASELINE}
    print(f"\n| dataset | method | cells/s | ratio vs {BASELINE} |")
    print("|---|---|---:|---:|")
    for r in results:
        print(f"| {r.dataset} | {r.method} | {r.rate:,.0f} | {r.rate / baselines[r.dataset]:.1f}x |")


def print_goals(results: list[Result]) -> None:
    """The issue's targets: >= 10x anndata-backed random batches, >= 20k cells/s in one process."""
    print()
    for dataset in dict.fromkeys(r.dataset for r in results):
        rate = {r.method: r.rate for r in results if r.dataset == dataset}
        single = rate["CorpusStream, DataLoader num_workers=0"]
        plain, gzipped = single / rate[BASELINE], single / rate[f"anndata backed X[sorted random 64]{GZIP}"]
        best = max((v, k) for k, v in rate.items() if k.startswith("CorpusStream"))
        print(
            f"goal, {dataset}: CorpusStream num_workers=0 = {single:,.0f} cells/s "
            f"[>= 20,000: {'met' if single >= 20_000 else 'NOT met'}]; "
            f"{plain:.1f}x anndata random 64 on the uncompressed h5ad [>= 10x: {'met' if plain >= 10 else 'NOT met'}], "
            f"{gzipped:.1f}x on the gzip h5ad [>= 10x: {'met' if gzipped >= 10 else 'NOT met'}]; "
            f"best CorpusStream row: {best[1]} {best[0]:,.0f} cells/s"
        )


# ---------------------------------------------------------------- cost of the read checks


@contextlib.contextmanager
def read_checks(enabled: bool):
    """Readers opened inside run with the integrity checks on (the default) or off."""
    before = os.environ.pop(NO_READ_CHECKS_ENV, None)
    if not enabled:
        os.environ[NO_READ_CHECKS_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(NO_READ_CHECKS_ENV, None)
        if before is not None:
            os.environ[NO_READ_CHECKS_ENV] = before


def block_reads(corpus: Corpus, seed: int = 0) -> Iterator[int]:
    """1,024-cell blocks of the training split in random order (`ShardReader.read` alone)."""
    records = corpus.shards("train")
    readers = [ShardReader(corpus, r) for r in records]
    blocks = [(s, a, min(a + BLOCK, r["n_cells"])) for s, r in enumerate(records) for a in range(0, r["n_cells"], BLOCK)]
    rng = np.random.default_rng(seed)
    try:
        while True:
            for i in rng.permutation(len(blocks)).tolist():
                shard, start, stop = blocks[i]
                yield len(readers[shard].read(start, stop))
    finally:
        for reader in readers:
            reader.close()


def without_inner_checksums(corpus: Corpus, out: Path) -> tuple[Corpus, str]:
    """A copy of `corpus` whose X/data and X/indices carry no inner crc32c and whose manifest
    has no checksum_version: the format of corpora built before them (read with value checks)."""
    if (out / "manifest.json").exists():
        return Corpus(out), "cached"
    start, partial = time.perf_counter(), out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # ours: left by an interrupted earlier run
    shutil.copytree(corpus.root, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    fs = fsspec.filesystem("file")
    for split in ("train", "val"):
        for record in manifest["splits"][split]["shards"]:
            x = zarr.open_group(str(partial / record["path"] / "X"), mode="r+")
            for name in ("data", "indices"):
                values, chunks, shards = x[name][:], x[name].chunks, x[name].shards
                compressor = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4)
                x.create_array(
                    name,
                    shape=values.shape,
                    dtype=values.dtype,
                    chunks=chunks,
                    shards=shards,
                    compressors=compressor,
                    overwrite=True,
                )[:] = values
            record["sha256"] = checksum_files(fs, str(partial / record["path"]))
    manifest.pop("checksum_version")
    (partial / "manifest.json").write_text(json.dumps(manifest))
    partial.rename(out)
    return Corpus(out), f"rewritten in {time.perf_counter() - start:.1f} s"


def integrity_part(args) -> None:
    """Cells/s with the read checks on and off, alternating (`args.rounds` each), medians."""
    plain, note = ensure_synthetic(args.workdir, args.cells, args.genes, args.nnz)
    print(f"synthetic h5ad: {note}; {h5ad_summary(plain)}")
    corpus, note = ensure_corpus([plain], args.workdir / plain.name.replace(".h5ad", ".corpus"))
    print(f"synthetic corpus: {note}; {corpus_summary(corpus)}")
    old, note = without_inner_checksums(corpus, args.workdir / plain.name.replace(".h5ad", ".nocrc.corpus"))
    print(f"the same without inner checksums: {note}; {corpus_summary(old)}")
    print(f"page cache: read {warm_page_cache([Path(corpus.root), Path(old.root)]):.2f} GiB\n")
    rows = []
    for label, data in (("corpus with inner crc32c", corpus), ("corpus without (older format, value checks)", old)):
        for method, run in (
            ("CorpusStream, num_workers=0", lambda data=data: stream_batches(data, 0)),
            ("block reads (ShardReader.read, 1024 cells)", lambda data=data: block_reads(data)),
        ):
            rates = {True: [], False: []}
            for _ in range(args.rounds):  # alternating, so drift on a shared machine hits both settings
                for enabled in (True, False):
                    with read_checks(enabled):
                        result = measure(label, f"{method}, checks {'on' if enabled else 'off'}", run(), args.seconds)
                    rates[enabled].append(result.rate)
            on, off = float(np.median(rates[True])), float(np.median(rates[False]))
            rows.append((label, method, on, off))
    print(f"\nread checks, median of {args.rounds} alternating rounds of {args.seconds:g} s:")
    print("| corpus | method | checks on, cells/s | checks off, cells/s | cost |\n|---|---|---:|---:|---:|")
    for label, method, on, off in rows:
        print(f"| {label} | {method} | {on:,.0f} | {off:,.0f} | {1 - on / off:+.1%} |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/celltron-bench"), help="cache of generated files and corpora")
    parser.add_argument("--cells", type=int, default=200_000, help="synthetic cells (default 200000)")
    parser.add_argument("--genes", type=int, default=20_000, help="synthetic genes (default 20000)")
    parser.add_argument("--nnz", type=int, default=2_000, help="synthetic non-zeros per cell (default 2000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per method (default 10)")
    parser.add_argument("--profile-seconds", type=float, default=5.0, help="cProfile/stage timing seconds; 0 skips (default 5)")
    parser.add_argument(
        "--pbmc-dir", type=Path, default=PBMC_DIR, help="directory with the PBMC .h5ad files (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="20k synthetic cells, 3 s per method, 2 s profiles")
    parser.add_argument("--integrity", action="store_true", help="only the cost of the read checks (on vs off)")
    parser.add_argument("--rounds", type=int, default=3, help="--integrity: alternating rounds per setting (default 3)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.seconds, args.profile_seconds = (
            min(args.cells, 20_000),
            min(args.seconds, 3.0),
            min(args.profile_seconds, 2.0),
        )
    return args


def synthetic_part(args) -> tuple[list[Result], Corpus, bool]:
    plain, note = ensure_synthetic(args.workdir, args.cells, args.genes, args.nnz)
    print(f"synthetic h5ad: {note}; {h5ad_summary(plain)}")
    gzipped, note = ensure_gzip_copy(plain)
    print(f"synthetic h5ad, gzip copy: {note}; {h5ad_summary(gzipped)}")
    corpus, note = ensure_corpus([plain], args.workdir / plain.name.replace(".h5ad", ".corpus"))
    print(f"synthetic corpus: {note}; {corpus_summary(corpus)}")
    # the codec of corpora built before lz4 became the default, for comparison
    zstd_corpus, note = ensure_corpus([plain], args.workdir / plain.name.replace(".h5ad", ".zstd.corpus"), "zstd")
    print(f"synthetic corpus, zstd: {note}; {corpus_summary(zstd_corpus)}")
    print(f"page cache: read {warm_page_cache([plain, gzipped, Path(corpus.root), Path(zstd_corpus.root)]):.2f} GiB")
    with_zarrs = check_zarrs(corpus)
    methods = stream_methods(corpus, with_zarrs)
    methods.insert(1, ("CorpusStream, zstd corpus, num_workers=0", lambda: stream_batches(zstd_corpus, 0)))
    methods += h5ad_methods(plain, gzipped)
    return run_methods(f"synthetic {args.cells // 1000}k", methods, args.seconds), corpus, with_zarrs


def pbmc_part(args) -> list[Result]:
    inputs = sorted(Path(p) for p in glob.glob(str(args.pbmc_dir / "*.h5ad")))
    if len(inputs) < 5:
        print(
            f"\nPBMC: skipped: expected the five PBMC .h5ad files in {args.pbmc_dir}, found {len(inputs)} "
            "(fetch scrna/human/ of the project's shared data; pass --pbmc-dir or set CELLTRON_SHARED_DATA)"
        )
        return []
    corpus, note = ensure_corpus(inputs, args.workdir / "pbmc5.corpus")
    print(f"\nPBMC corpus ({len(inputs)} files): {note}; {corpus_summary(corpus)}")
    plain, note = ensure_concatenation(inputs, args.workdir / "pbmc5.concat.h5ad")
    print(f"PBMC h5ad, the {len(inputs)} files concatenated: {note}; {h5ad_summary(plain)}")
    gzipped, note = ensure_gzip_copy(plain)
    print(f"PBMC h5ad, gzip copy: {note}; {h5ad_summary(gzipped)}")
    print(f"page cache: read {warm_page_cache([plain, gzipped, Path(corpus.root)]):.2f} GiB")
    return run_methods(f"PBMC {len(inputs)} files", stream_methods(corpus, False) + h5ad_methods(plain, gzipped), args.seconds)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print("\n".join(machine_lines()))
    print(f"command: {' '.join(sys.orig_argv)}")
    print(
        f"settings: batch {BATCH}, CorpusStream defaults (block_size 1024, buffer_size 8192, prefetch), "
        f"{args.seconds:g} s per method after its first batch, all files in page cache\n"
    )
    if args.integrity:
        integrity_part(args)
        print(f"\ntotal time: {time.perf_counter() - started:.0f} s")
        return
    results, corpus, with_zarrs = synthetic_part(args)
    results += pbmc_part(args)
    print_table(results)
    print_goals(results)
    if args.profile_seconds > 0:
        profile_stream(corpus, args.profile_seconds, prefetch=True)
        profile_stream(corpus, args.profile_seconds, prefetch=False)
        time_stages(corpus, args.profile_seconds, with_zarrs)
    print(f"\ntotal time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
