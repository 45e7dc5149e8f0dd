"""How a corpus is built: the typed options of `celltron corpus build` (YAML in configs/corpus/,
or flags made from these fields). Kept apart from build.py, which needs the numeric stack, so that
the CLI can describe the options without loading it."""

from __future__ import annotations

from dataclasses import dataclass

from celltron.config import check_fields, load_flat, one_of
from celltron.corpus.constants import COMPRESSIONS, MIN_MAPPED_FRACTION
from celltron.ranges import ranged


@dataclass
class BuildOptions:
    """How a corpus is built.

    Attributes:
        seed: seeds the cross-input shuffle and the validation split.
        val_fraction: fraction of cells (chosen at random) written as the validation split.
        layer: where the counts are in .h5ad inputs: 'X', 'raw' or a layer name.
        species: 'human' or 'mouse' for every input; None infers it per input.
        gene_column: var column holding gene IDs/symbols in .h5ad inputs (default: var index).
        obs_keys: input obs columns copied to the corpus (e.g. cell-type labels).
        min_genes: drop cells with fewer expressed (mapped) genes.
        min_counts: drop cells with fewer total counts.
        max_mito_fraction: drop cells whose mitochondrial share of counts is higher.
        weights: per-input sampling weight (input file name -> weight), recorded in the manifest.
        shard_size_mb: target uncompressed size of one corpus shard (AnnData-Zarr store).
        chunk_nnz: non-zeros per inner zarr chunk (tens of cells per chunk).
        compression: X's inner-chunk codec: 'lz4' (blosc byte shuffle + LZ4, the default: smallest
            of the fast ones on count data), 'zstd' or 'none'.
        read_block_cells: cells read from an input per block.
        exact_median_limit: non-zeros kept in memory for exact gene medians; past it, a
            streaming sketch and a second pass over the staged blocks give the same medians.
        progress: show progress bars.
        min_mapped_fraction: refuse an input unless this share of its counts (over a sample of
            cells) is on genes that map to Ensembl IDs.
        genome: genome build of ATAC peaks (hg38, mm10, ...; GRCh38 etc. accepted), when the
            inputs do not say; checked against what they say.
        atac_bin_size: bases per genomic bin that ATAC peaks are summed into (the ATAC vocabulary).
        mosaic: keep cells measured in only some modalities (a per-cell mask), instead of
            refusing inputs whose modalities hold different cells.
    """

    seed: int = ranged(0, ">= 0")
    val_fraction: float = ranged(0.01, "[0, 1)")
    layer: str = "X"
    species: str | None = one_of(None, ("human", "mouse"))
    gene_column: str | None = None
    obs_keys: tuple[str, ...] = ()
    min_genes: int = ranged(0, ">= 0")
    min_counts: int = ranged(0, ">= 0")
    max_mito_fraction: float | None = ranged(None, "[0, 1]")
    weights: dict[str, float] = ranged(allowed="> 0", default_factory=dict)
    shard_size_mb: float = ranged(256.0, "> 0")
    chunk_nnz: int = ranged(65_536, ">= 1")
    compression: str = one_of("lz4", COMPRESSIONS)
    read_block_cells: int = ranged(8_192, ">= 1")
    exact_median_limit: int = ranged(16_000_000, ">= 0")
    progress: bool = True
    min_mapped_fraction: float = ranged(MIN_MAPPED_FRACTION, "[0, 1]")
    genome: str | None = None
    atac_bin_size: int = ranged(5000, ">= 1")
    mosaic: bool = False

    def __post_init__(self):
        # every way options are made (YAML, flags through dataclasses.replace, library calls) is checked
        check_fields(self, "build option")

    @classmethod
    def from_yaml(cls, path) -> BuildOptions:
        """Options from a YAML mapping of field names; unknown fields are an error."""
        return load_flat(cls, path, "build options file (see configs/corpus/)", of="build options")
