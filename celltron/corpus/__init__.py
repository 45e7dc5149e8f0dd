"""Raw-count inputs -> sharded Zarr v3 corpus -> streamed cells."""

from __future__ import annotations

import importlib

# The names below load on first use (PEP 562): importing a light submodule such as
# celltron.corpus.constants (the CLI's --help) must not load numpy, zarr and anndata, and
# CorpusStream is a torch IterableDataset that building or reading a corpus must not pay for.
_EXPORTS = {
    "BuildOptions": "celltron.corpus.build",
    "build_corpus": "celltron.corpus.build",
    "Corpus": "celltron.corpus.store",
    "CorpusStream": "celltron.corpus.stream",
    "collate_cells": "celltron.corpus.stream",
}

__all__ = ["BuildOptions", "Corpus", "CorpusStream", "build_corpus", "collate_cells"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
