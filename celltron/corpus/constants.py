"""Corpus defaults the CLI shows in `--help`, kept apart from the modules that need numpy and
zarr so that `celltron --help` does not load them."""

COMPRESSIONS = ("zstd", "lz4", "none")  # X's inner-chunk codecs
MIN_MAPPED_FRACTION = 0.5  # default share of counts that must map (and reach tokens) before a verb goes on
