"""Raw-count inputs -> sharded Zarr v3 corpus -> streamed cells."""

from __future__ import annotations

from celltron._lazy import lazy_exports

# The names below load on first use (PEP 562): importing a light submodule such as
# celltron.corpus.constants (the CLI's --help) must not load numpy, zarr and anndata, and
# CorpusStream is a torch IterableDataset that building or reading a corpus must not pay for.
_EXPORTS = {
    "BuildOptions": "celltron.corpus.options",
    "build_corpus": "celltron.corpus.build",
    "Corpus": "celltron.corpus.store",
    "CorpusStream": "celltron.corpus.stream",
    "collate_cells": "celltron.corpus.stream",
}

__all__ = ["BuildOptions", "Corpus", "CorpusStream", "build_corpus", "collate_cells"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
