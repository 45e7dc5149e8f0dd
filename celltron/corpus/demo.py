"""The bundled demo: 10x PBMC 3k raw counts -> a corpus -> one streamed epoch."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from torch.utils.data import DataLoader

from celltron.corpus.build import BuildOptions, build_corpus
from celltron.corpus.store import Corpus
from celltron.corpus.stream import CorpusStream


def demo_h5ad() -> Path:
    """Path of the bundled PBMC 3k raw-count .h5ad (CC BY 4.0, see its PROVENANCE.md)."""
    return Path(str(resources.files("celltron.data.demo").joinpath("pbmc3k_raw.h5ad")))


def build_demo_corpus(out: Path, progress: bool = True) -> Corpus:
    """Build (or reuse, if already complete) the demo corpus at `out`."""
    if not (out / "manifest.json").exists():
        build_corpus([demo_h5ad()], out, BuildOptions(seed=0, val_fraction=0.05, progress=progress))
    return Corpus(out)


def stream_one_epoch(corpus: Corpus, num_workers: int = 0, batch_size: int = 64) -> tuple[int, float]:
    """Read every training cell once through a DataLoader; returns (cells, seconds)."""
    stream = CorpusStream(corpus, split="train", infinite=False)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    start = time.perf_counter()
    cells = sum(len(batch) for batch in loader)
    return cells, time.perf_counter() - start
