"""Raw-count inputs -> sharded Zarr v3 corpus -> streamed cells."""

from celltron.corpus.build import BuildOptions, build_corpus
from celltron.corpus.store import Corpus
from celltron.corpus.stream import CorpusStream, collate_cells

__all__ = ["BuildOptions", "Corpus", "CorpusStream", "build_corpus", "collate_cells"]
