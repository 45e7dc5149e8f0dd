"""`CorpusStream`: cells of a corpus as a torch IterableDataset, sharded and exactly resumable.

One plan for every rank. For (seed, epoch) the shards' blocks (`block_size` contiguous cells)
are put in a random order; that sequence of cells is cut into `world_size` equal ranges (the
few cells past the last whole range are dropped from this epoch and counted), and each rank's
range into near-equal ranges per DataLoader worker. A worker reads its range window by window
(`buffer_size` cells, as contiguous block reads) and yields each window's cells in a seeded
random order. Because every step is a function of (seed, epoch, rank, worker), a position is
two numbers per worker, (epoch, cells yielded in that epoch), and resuming skips to it
without reading what came before.

In training (`infinite=True`) the stream runs epoch after epoch, so no rank runs out while
another waits in a collective; runs are sized in steps.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from celltron.corpus._gather import Blocks
from celltron.corpus.store import CellBlock, Corpus, ShardReader
from celltron.errors import ConfigError

STATE_VERSION = 1
OPEN_SHARDS = 8  # shard readers a worker keeps open


@contextmanager
def _closing(shards: OrderedDict):
    try:
        yield
    finally:
        for reader in shards.values():
            reader.close()
        shards.clear()


def use_zarrs_pipeline() -> None:
    """Switch this process's zarr decoding to the zarrs codec pipeline."""
    try:
        import zarrs  # noqa: F401
    except ImportError as error:
        raise ImportError("CorpusStream(zarrs=True) needs the zarrs package: pip install 'celltron[fast]'") from error
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


@dataclass(frozen=True)
class Segment:
    """Cells [start, stop) of one shard."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def block_order(shard_sizes: list[int], block_size: int, seed: int, epoch: int) -> list[Segment]:
    """All blocks of the split in the random order of (seed, epoch)."""
    blocks = [Segment(s, a, min(a + block_size, n)) for s, n in enumerate(shard_sizes) for a in range(0, n, block_size)]
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(blocks))
    return [blocks[i] for i in order]


def cut(blocks: list[Segment], lo: int, hi: int) -> list[Segment]:
    """The segments covering cells [lo, hi) of the concatenated block sequence."""
    out, offset = [], 0
    for block in blocks:
        end = offset + len(block)
        if end > lo and offset < hi:
            a, b = max(lo, offset) - offset, min(hi, end) - offset
            out.append(Segment(block.shard, block.start + a, block.start + b))
        offset = end
        if offset >= hi:
            break
    return out


@dataclass(frozen=True)
class EpochPlan:
    """What one (rank, worker) reads in one epoch, and what the epoch drops."""

    segments: list[Segment]
    n_cells: int
    cells_per_rank: int
    dropped: int


class CorpusStream(IterableDataset):
    """Stream cells of a corpus split.

    Each item is a dict: `genes` (int32 corpus gene indices), `counts` (int32 raw counts),
    `n_counts`, `cell_index` (position of the cell in the split), and one int code per obs
    column (`dataset`, `species`, labels; -1 = missing; categories in
    `corpus.manifest['obs_categories']`), passed through `transform` when one is given.
    Every block is checked as it is read (`ShardReader`): damaged data raises
    `CorpusDamagedError` (a `DataIntegrityError`) naming the shard and the cells.

    Args:
        corpus: a `Corpus` or its location (path or URL).
        split: 'train' or 'val'.
        seed: seeds block order and window shuffles.
        block_size: cells per block (the unit of the cross-shard shuffle and of reads).
        buffer_size: cells per shuffle window.
        infinite: run epoch after epoch (training); otherwise stop after one epoch.
        shuffle: shuffle blocks and windows; False streams cells in corpus order.
        rank, world_size: this process's place among data-parallel ranks; default from
            torch.distributed, then the RANK / WORLD_SIZE environment variables.
        transform: function applied to each cell dict (tokenizers plug in here), or to each
            batch when `batch_size` is set.
        batch_size: yield batches of this many cells instead of cells: the dict `collate_cells`
            makes of the same cells in the same order (flat `genes`/`counts` with `offsets`, one
            array per scalar field), gathered straight from the blocks read, without a dict per
            cell. Use it with `DataLoader(stream, batch_size=None)`. Positions (resume) still
            count cells; the last batch of a finite stream may be smaller.
        storage_options: fsspec options for remote corpora.
        prefetch: read the next window in a background thread while this one is yielded.
        zarrs: decode with the Rust `zarrs` codec pipeline (the `fast` extra) instead of
            celltron's own reader of local shards (`corpus.sharded`, which is as fast or faster
            and fork-safe). It sets zarr's codec pipeline for the whole process, and a process
            that has decoded with zarrs must not fork DataLoader workers that use it (they
            hang): use `multiprocessing_context="spawn"` for such loaders.
    """

    def __init__(
        self,
        corpus: Corpus | str,
        split: str = "train",
        seed: int = 0,
        block_size: int = 1024,
        buffer_size: int = 8192,
        infinite: bool | None = None,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[dict], Any] | None = None,
        storage_options: dict | None = None,
        prefetch: bool = True,
        zarrs: bool = False,
        batch_size: int | None = None,
    ):
        super().__init__()
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus, storage_options)
        self.split = split
        self.seed = seed
        self.block_size = block_size
        self.buffer_size = buffer_size
        self.infinite = split == "train" if infinite is None else infinite
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.transform = transform
        self.prefetch = prefetch
        self.zarrs = zarrs
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"CorpusStream batch_size must be >= 1 (or None for single cells), got {batch_size}")
        self.batch_size = batch_size
        self.epoch = 0
        self.shard_sizes = [record["n_cells"] for record in self.corpus.shards(split)]
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._positions: dict[int, tuple[int, int]] = {}
        self._num_workers: int | None = None  # seen while iterating, reported by state_dict
        self._resume_workers: int | None = None  # required by a loaded state
        self._loaded = False
        # A plain DataLoader always asks worker 0 first. After k batches the next batch is due
        # from stream (k mod workers), so on resume worker w continues stream (w + rotation).
        self._rotation = 0

    # ------------------------------------------------------------ placement

    def _placement(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def __getstate__(self) -> dict:
        # Fix rank/world in the main process: spawned workers have no process group.
        state = self.__dict__.copy()
        state["rank"], state["world_size"] = self._placement()
        return state

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch`. A state just loaded for this same epoch is kept
        (trainers call set_epoch at the start of the resumed epoch too); otherwise resume
        positions are forgotten."""
        if self._loaded and epoch == self.epoch:
            return
        self.epoch = epoch
        self._positions, self._rotation, self._resume_workers, self._loaded = {}, 0, None, False

    # ------------------------------------------------------------ plan

    def plan(
        self, epoch: int, rank: int | None = None, world_size: int | None = None, worker: int = 0, num_workers: int = 1
    ) -> EpochPlan:
        """The cells (rank, worker) reads in `epoch`; a pure function, no data is read."""
        if rank is None or world_size is None:
            rank, world_size = self._placement()
        if self.shuffle:
            blocks = block_order(self.shard_sizes, self.block_size, self.seed, epoch)
        else:
            blocks = [Segment(s, 0, n) for s, n in enumerate(self.shard_sizes)]
        total = int(sum(self.shard_sizes))
        per_rank = total // world_size
        lo = rank * per_rank + worker * per_rank // num_workers
        hi = rank * per_rank + (worker + 1) * per_rank // num_workers
        return EpochPlan(cut(blocks, lo, hi), hi - lo, per_rank, total - per_rank * world_size)

    def dropped_cells(self, epoch: int) -> int:
        """Cells left out of `epoch` so that every rank gets the same number."""
        return self.plan(epoch, 0, self._placement()[1]).dropped

    def cells_per_epoch(self) -> int:
        """Cells one rank sees per epoch."""
        return self.plan(self.epoch).cells_per_rank

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        rank, world_size = self._placement()
        worker, num_workers = self._worker()
        if self._resume_workers is not None and self._resume_workers != num_workers:
            raise ConfigError(
                f"resume state was saved with {self._resume_workers} DataLoader workers, now {num_workers}; "
                "resume with the same num_workers (the data order depends on it)"
            )
        self._num_workers = num_workers
        if self.zarrs:
            use_zarrs_pipeline()
        worker = (worker + self._rotation) % num_workers
        shards: OrderedDict[int, ShardReader] = OrderedDict()
        # the pool exits first (waiting for a prefetch in flight), then the readers close
        with _closing(shards), ThreadPoolExecutor(max_workers=4) as pool:
            windows = self._windows(rank, world_size, worker, num_workers, shards, pool)
            items = self._one_by_one(windows, worker) if self.batch_size is None else self._batched(windows, worker)
            for item in items:
                yield item if self.transform is None else self.transform(item)

    def _windows(self, rank: int, world_size: int, worker: int, num_workers: int, shards, pool) -> Iterator:
        """(epoch, cells of the epoch before this piece, the window read, the order to yield its
        cells in), window after window, epoch after epoch, from this worker's position on. The
        next window is read in the background while this one is used, across epoch ends too (a
        small corpus may be one window an epoch)."""
        start = self._positions.get(worker, (self.epoch, 0))
        specs = self._window_specs(rank, world_size, worker, num_workers, start)
        spec, pending, epoch = next(specs, None), None, None
        while spec is not None:
            if epoch is not None and spec[0] != epoch:
                self._positions[worker] = (spec[0], 0)
            epoch, plan, lo, hi, skip = spec
            current = pending.result() if pending is not None else self._read_window(plan, lo, hi, shards, pool)
            spec, pending = next(specs, None), None
            if self.prefetch and spec is not None:
                pending = pool.submit(self._read_window, spec[1], spec[2], spec[3], shards, pool)
            yield epoch, lo + skip, current, self._window_order(epoch, (rank, worker), lo, hi - lo)[skip:]
        if not self.infinite:  # a finite stream's end: the next epoch starts from its first cell
            self._positions[worker] = (start[0] + 1, 0)

    def _window_specs(self, rank: int, world_size: int, worker: int, num_workers: int, start) -> Iterator[tuple]:
        """(epoch, plan, first cell, end, cells to skip) of each window this worker reads from
        `start` (epoch, cells of it already yielded) on."""
        epoch, offset = start
        while True:
            plan = self.plan(epoch, rank, world_size, worker, num_workers)
            if plan.n_cells == 0 and self.infinite:
                raise ConfigError(
                    f"rank {rank} worker {worker} gets no cells per epoch ({sum(self.shard_sizes)} cells "
                    f"over {world_size} ranks x {num_workers} workers); use fewer workers or ranks"
                )
            for lo in range(offset // self.buffer_size * self.buffer_size, plan.n_cells, self.buffer_size):
                yield epoch, plan, lo, min(lo + self.buffer_size, plan.n_cells), max(offset - lo, 0)
            epoch, offset = epoch + 1, 0
            if not self.infinite:
                return

    def _one_by_one(self, windows: Iterator, worker: int) -> Iterator[dict]:
        for epoch, before, blocks, order in windows:
            for done, cell in enumerate(self._cells(blocks, order), start=before + 1):
                self._positions[worker] = (epoch, done)
                yield cell

    def _batched(self, windows: Iterator, worker: int) -> Iterator[dict]:
        """Batches of `batch_size` cells in the order `_one_by_one` yields them (a batch may
        span windows and epochs, as a DataLoader's batches of single cells do)."""
        pieces, n_cells = [], 0
        for epoch, before, window, order in windows:
            taken = 0
            while taken < len(order):
                take = min(self.batch_size - n_cells, len(order) - taken)
                pieces.append((window, order[taken : taken + take]))
                n_cells, taken = n_cells + take, taken + take
                if n_cells == self.batch_size:
                    self._positions[worker] = (epoch, before + taken)
                    yield gather_cells(pieces)
                    pieces, n_cells = [], 0
        if pieces:  # a finite stream's last, smaller batch
            yield gather_cells(pieces)

    def _window_order(self, epoch: int, who: tuple[int, int], lo: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, who[0], who[1], lo]).permutation(n)

    def _read_window(self, plan: EpochPlan, lo: int, hi: int, shards: OrderedDict, pool) -> list[CellBlock] | Window:
        segments = cut(plan.segments, lo, hi)
        self._open_readers({s.shard for s in segments}, shards)
        reads = (
            [pool.submit(shards[s.shard].read, s.start, s.stop, int(self.shard_offsets[s.shard] + s.start)) for s in segments]
            if len(segments) > 1
            else None
        )
        if reads is None:
            s = segments[0]
            blocks = [shards[s.shard].read(s.start, s.stop, int(self.shard_offsets[s.shard] + s.start))]
        else:
            blocks = [r.result() for r in reads]
        return blocks if self.batch_size is None else Window.of(blocks)

    def _open_readers(self, needed: set[int], shards: OrderedDict) -> None:
        """Keep readers for the shards this window needs, closing the least recently used
        others beyond OPEN_SHARDS (each open shard holds file descriptors and its indptr)."""
        for shard in sorted(needed):
            if shard in shards:
                shards.move_to_end(shard)
            else:
                shards[shard] = ShardReader(self.corpus, self.corpus.shards(self.split)[shard])
        while len(shards) > max(OPEN_SHARDS, len(needed)):
            oldest = next(iter(shards))
            if oldest in needed:
                break
            shards.pop(oldest).close()

    @staticmethod
    def _cells(blocks: list[CellBlock], order: np.ndarray) -> Iterator[dict]:
        sizes = np.array([len(b) for b in blocks])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        which = np.searchsorted(starts, order, side="right") - 1
        for position, b in zip(order.tolist(), which.tolist()):
            block = blocks[b]
            row = position - starts[b]
            lo, hi = block.indptr[row], block.indptr[row + 1]
            cell = {"genes": block.genes[lo:hi], "counts": block.counts[lo:hi], "cell_index": block.first_index + row}
            for key, values in block.obs.items():
                cell[key] = values[row]
            for modality, other in block.modalities.items():  # multi-modal corpora: adt_features, adt_counts, ...
                lo, hi = other.indptr[row], other.indptr[row + 1]
                cell[f"{modality}_features"], cell[f"{modality}_counts"] = other.genes[lo:hi], other.counts[lo:hi]
                cell[f"{modality}_n_counts"], cell[f"{modality}_measured"] = (
                    other.obs["n_counts"][row],
                    other.obs["measured"][row],
                )
            yield cell

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Where this stream (or, inside a DataLoader worker, this worker) stands."""
        rank, world_size = self._placement()
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "block_size": self.block_size,
            "buffer_size": self.buffer_size,
            "n_cells": int(sum(self.shard_sizes)),
            "rank": rank,
            "world_size": world_size,
            "num_workers": self._num_workers,
            "epoch": self.epoch,
            "positions": {int(w): list(p) for w, p in self._positions.items()},
            "worker_rotation": self._rotation,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` (from `state_dict` or `state_after_batches`) left off."""
        mine = self.state_dict()
        for key in ("version", "split", "seed", "block_size", "buffer_size", "n_cells", "world_size"):
            if state.get(key) != mine[key]:
                raise ConfigError(
                    f"cannot resume CorpusStream: state has {key}={state.get(key)!r}, this stream has "
                    f"{key}={mine[key]!r}; resume with the same corpus and stream settings"
                )
        self.epoch = state["epoch"]
        self._num_workers = self._resume_workers = state["num_workers"]
        self._positions = {int(w): tuple(p) for w, p in state["positions"].items()}
        self._rotation = state.get("worker_rotation", 0)
        self._loaded = True

    def state_after_batches(self, batches: int, batch_size: int, num_workers: int) -> dict:
        """The state after a plain DataLoader (in-order, round-robin over workers) has handed
        out `batches` batches of `batch_size` cells in training mode (`num_workers` as passed
        to the DataLoader; 0 means the main process)."""
        if not self.infinite:
            raise ValueError("state_after_batches needs an infinite (training) stream")
        num_workers = max(num_workers, 1)
        rank, world_size = self._placement()
        state = self.state_dict()
        state["num_workers"] = num_workers
        state["worker_rotation"] = batches % num_workers
        state["positions"] = {}
        for worker in range(num_workers):
            cells = len(range(worker, batches, num_workers)) * batch_size
            # a worker's share of an epoch has the same size every epoch
            length = self.plan(self.epoch, rank, world_size, worker, num_workers).n_cells
            if length == 0:
                raise ConfigError(f"rank {rank} worker {worker} gets no cells per epoch; use fewer workers or ranks")
            epochs, offset = divmod(cells, length)
            state["positions"][worker] = [self.epoch + epochs, offset]
        return state


def collate_cells(cells: list[dict]) -> dict[str, np.ndarray]:
    """Batch raw cells as flat numpy arrays: `genes` and `counts` concatenated, `offsets` (cell
    i is `[offsets[i]:offsets[i + 1]]`), and one array per scalar field (n_counts, cell_index,
    obs codes); a multi-modal corpus's other modalities likewise (`adt_features`, `adt_counts`,
    `adt_offsets`, `adt_n_counts`, `adt_measured`). As a DataLoader `collate_fn` it runs in the worker, so a batch crosses to the
    main process as a few pickled arrays instead of one dict per cell. (numpy, not torch: torch
    tensors from workers go through shared memory, which costs more for batches this small.)"""
    batch = _ragged(cells, "genes", "counts", "offsets")
    ragged = {"genes", "counts"}
    for key in cells[0]:  # a multi-modal corpus's other modalities, the same way: adt_features, adt_counts, adt_offsets
        if key.endswith("_features"):
            modality = key.removesuffix("_features")
            batch |= _ragged(cells, key, f"{modality}_counts", f"{modality}_offsets")
            ragged |= {key, f"{modality}_counts"}
    for key in cells[0]:
        if key not in ragged:
            batch[key] = np.array([cell[key] for cell in cells])
    return batch


def gather_cells(pieces: list[tuple[Window, np.ndarray]]) -> dict[str, np.ndarray]:
    """`collate_cells` of the cells at `order` of each piece's window, in that order, gathered
    from the window's arrays without a dict per cell."""
    parts = [window.gather(order) for window, order in pieces]
    if len(parts) == 1:
        return parts[0]
    batch = {}
    for key in parts[0]:
        if key.endswith("offsets"):
            starts = np.cumsum([0] + [p[key][-1] for p in parts[:-1]])
            batch[key] = np.concatenate([parts[0][key][:1]] + [p[key][1:] + s for p, s in zip(parts, starts)])
        else:
            batch[key] = np.concatenate([p[key] for p in parts])
    return batch


@dataclass
class Window:
    """A window's blocks, ready for batches: their CSR arrays where they are (`Blocks`) and the
    scalars (cell_index, obs codes) concatenated; a multi-modal corpus's other modalities are
    Windows of the same cells. Built in the prefetch thread."""

    blocks: Blocks
    scalars: dict[str, np.ndarray]
    modalities: dict[str, Window]

    @classmethod
    def of(cls, blocks: list[CellBlock], with_index: bool = True) -> Window:
        scalars = {}
        if with_index:
            scalars["cell_index"] = np.concatenate([np.arange(len(b), dtype=np.int64) + b.first_index for b in blocks])
        for key in blocks[0].obs:
            scalars[key] = np.concatenate([b.obs[key] for b in blocks])
        modalities = {m: cls.of([b.modalities[m] for b in blocks], with_index=False) for m in blocks[0].modalities}
        return cls(Blocks([(b.indptr, b.genes, b.counts) for b in blocks]), scalars, modalities)

    def gather(self, order: np.ndarray) -> dict[str, np.ndarray]:
        which, rows = self.blocks.locate(order)
        batch = self._ragged(which, rows, "genes", "counts", "offsets")
        for key, values in self.scalars.items():
            batch[key] = values[order]
        for modality, other in self.modalities.items():
            batch |= other._ragged(which, rows, f"{modality}_features", f"{modality}_counts", f"{modality}_offsets")
            batch[f"{modality}_n_counts"] = other.scalars["n_counts"][order]
            batch[f"{modality}_measured"] = other.scalars["measured"][order]
        return batch

    def _ragged(self, which: np.ndarray, rows: np.ndarray, index_key: str, count_key: str, offsets_key: str) -> dict:
        """Each chosen cell's slice of (genes, counts), concatenated in the chosen order."""
        offsets, genes, counts = self.blocks.gather(which, rows)
        return {index_key: genes, count_key: counts, offsets_key: offsets}


def _ragged(cells: list[dict], index_key: str, count_key: str, offsets_key: str) -> dict[str, np.ndarray]:
    lengths = [len(cell[index_key]) for cell in cells]
    return {
        index_key: np.concatenate([cell[index_key] for cell in cells]),
        count_key: np.concatenate([cell[count_key] for cell in cells]),
        offsets_key: np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }
