"""A pretraining run, fully described: one typed dataclass per section; YAML only spells them
out (configs/pretrain/*.yaml), `--set section.field=value` changes single fields, and the CLI's
options are made from the fields (celltron.config loads, coerces and checks them all)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import celltron.config as typed_config
from celltron.config import check_sections, one_of, replace  # noqa: F401  (replace: part of this module's API)
from celltron.errors import ConfigError
from celltron.ranges import ranged
from celltron.training.config import LoggingSection, OptimSection, TrainerSection

GENE_EMBEDDING_INITS = ("random", "svd")


@dataclass
class ModelSection:
    """family: geneformer | scgpt | genecompass. size: a named size (`celltron models`).
    overrides: config fields changed from the size (e.g. {max_position_embeddings: 1024}).
    init_gene_embeddings: random (the family's own init) or svd (gene tokens from a truncated
        SVD of the log-normalised training cells, celltron.pretrain.svd_init; not on resume
        or --init-from).
    svd_cells: at most this many training cells are read for the svd init.
    priors: genecompass only: prior name -> .npy matrix with a row per token of this run's
        vocabulary (`celltron priors build`, celltron.pretrain.priors), fused into every gene token's
        input embedding; saved and reloaded with the model."""

    family: str = "geneformer"
    size: str = "debug"
    overrides: dict = field(default_factory=dict)
    init_gene_embeddings: str = one_of("random", GENE_EMBEDDING_INITS)
    svd_cells: int = ranged(50_000, ">= 1")
    priors: dict = field(default_factory=dict)


@dataclass
class TokenizerSection:
    """scheme: geneformer-v1 | geneformer-v2 (geneformer), scgpt (scgpt), ortholog (genecompass).
    max_len: tokens per cell (default: the scheme's own)."""

    scheme: str = "geneformer-v2"
    max_len: int | None = ranged(None, ">= 1")


@dataclass
class DataSection:
    """Where cells come from and how they become batches.

    corpus: corpus directory or URL (s3://...); `--corpus` overrides it.
    storage_options: fsspec options for remote corpora.
    batch_size: cells per batch (padded), or rows of `max_tokens` tokens per batch (packed).
    packing: pack whole cells into rows of `max_tokens` (varlen attention) instead of padding.
    max_tokens: row length when packing.
    round_cells: cells tokenised, masked and batched together; padded batches are grouped by
        length within a round; resume restarts at a round and skips its used batches.
    num_workers: DataLoader worker processes (0: the main process).
    block_size, buffer_size: the corpus stream's block and shuffle-window sizes.
    mask_probability: share of tokens predicted (geneformer, genecompass MLM).
    mask_ratio: share of values hidden (scgpt).
    generative: scgpt only, predict the hidden values in the generative attention-mask mode.
    val_batches: validation batches per evaluation (from the corpus's val split).
    """

    corpus: str = ""
    storage_options: dict = field(default_factory=dict)
    batch_size: int = ranged(8, ">= 1")
    packing: bool = False
    max_tokens: int = ranged(4096, ">= 1")
    round_cells: int = ranged(512, ">= 1")
    num_workers: int = ranged(0, ">= 0")
    block_size: int = ranged(256, ">= 1")
    buffer_size: int = ranged(2048, ">= 1")
    mask_probability: float = ranged(0.15, "(0, 1)")
    mask_ratio: float = ranged(0.4, "(0, 1)")
    generative: bool = False
    val_batches: int = ranged(8, ">= 0")


OBJECTIVES = ("masked", "contrastive")
PAIRS = ("adt", "atac")
VALUE_FAMILIES = ("scgpt", "genecompass")  # towers that read token values: protein levels need them


def adt_order(family: str) -> str:
    """How a family's proteins are ordered: panel order with their CLR bins as values for a family
    that reads values; highest CLR first for one that reads none (Geneformer), so the order carries
    the levels, as it ranks genes."""
    return "panel" if family in VALUE_FAMILIES else "rank"


@dataclass
class MultimodalSection:
    """Pretraining on paired modalities (a corpus built from paired data), in one of two designs.

    joint: modalities (adt, atac) whose tokens follow each cell's RNA tokens in one sequence,
        read by the one model with a modality-type embedding per token (scGPT's multi-omic
        design); the family's masked objective covers every token. Proteins come as per-cell CLR
        bins, in panel order for a family that reads values and highest first for one that
        does not (Geneformer); chromatin as open bins chosen by TF-IDF or sampled.
    adt_budget: protein tokens per cell in a joint sequence (at most the panel).
    pair: the second modality, encoded by its own tower: adt (proteins) or atac (chromatin);
        None (the default): RNA only.
    objective: masked (the RNA family's own objective), contrastive (symmetric InfoNCE between
        the RNA tower's and the pair tower's cell embeddings, scCLIP-style), or both.
    weights: {objective: weight} of the summed loss.
    pair_family, pair_size: the pair tower, any family; one that reads no values (geneformer)
        gets the proteins highest-CLR first, so that their order carries the levels.
    pair_overrides: config fields of the pair tower changed from its size (as model.overrides).
    projection_dim: the shared space of the contrastive projections.
    adt_bins: bins of the proteins' per-cell CLR values (the pair tower's or joint tokens' values).
    atac_budget, atac_select: open bins per cell, chosen by TF-IDF or sampled.
    """

    joint: tuple[str, ...] = ()
    adt_budget: int = ranged(64, ">= 1")
    pair: str | None = one_of(None, PAIRS)
    objective: tuple[str, ...] = ("masked",)
    weights: dict[str, float] = ranged(allowed=">= 0", default_factory=lambda: {"masked": 1.0, "contrastive": 1.0})
    pair_family: str = one_of("scgpt", ("scgpt", "genecompass", "geneformer"))
    pair_size: str = "debug"
    pair_overrides: dict = field(default_factory=dict)
    projection_dim: int = ranged(64, ">= 1")
    adt_bins: int = ranged(51, ">= 3")
    atac_budget: int = ranged(256, ">= 1")
    atac_select: str = one_of("tfidf", ("tfidf", "sample"))

    def check(self, where: str, packing: bool) -> None:
        unknown = sorted(set(self.objective) - set(OBJECTIVES)) + sorted(set(self.weights) - set(OBJECTIVES))
        if unknown or not self.objective:
            raise ConfigError(
                f"{where}: multimodal.objective takes {list(OBJECTIVES)} (and weights of them), got {unknown or '[]'}"
            )
        if ("contrastive" in self.objective) != (self.pair is not None):
            raise ConfigError(
                f"{where}: the contrastive objective needs multimodal.pair (adt or atac), and a pair needs the contrastive "
                "objective; set both or neither"
            )
        if self.pair is not None and packing:
            raise ConfigError(f"{where}: data.packing with multimodal.pair: paired batches are padded; set data.packing: false")
        self._check_joint(where, packing)

    def _check_joint(self, where: str, packing: bool) -> None:
        unknown = [m for m in self.joint if m not in PAIRS]
        if unknown or len(set(self.joint)) != len(self.joint):
            raise ConfigError(
                f"{where}: multimodal.joint lists modalities after RNA, each once, of {list(PAIRS)}; got {list(self.joint)}"
            )
        if self.joint and self.pair is not None:
            raise ConfigError(
                f"{where}: multimodal.joint (one model reads every modality) and multimodal.pair (a tower per modality) "
                "are two designs; set one of them"
            )
        if self.joint and packing:
            raise ConfigError(f"{where}: data.packing with multimodal.joint: joint batches are padded; set data.packing: false")


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    multimodal: MultimodalSection = field(default_factory=MultimodalSection)

    def check(self, where: str = "config") -> PretrainConfig:
        """Refuse inconsistent settings, naming the field and the fix."""
        # here, not at module top: importing the config module (the CLI's --help) must not load torch;
        # checking a config reads the family registry, which does
        from celltron.model_zoo import FAMILIES

        check_sections(self, where)
        if self.model.family not in FAMILIES:
            raise ConfigError(f"{where}: model.family {self.model.family!r} is not one of {sorted(FAMILIES)}")
        if self.model.size not in FAMILIES[self.model.family].sizes:
            raise ConfigError(
                f"{where}: model.size {self.model.size!r} is not a {self.model.family} size; known: {sorted(FAMILIES[self.model.family].sizes)}"
            )
        spec = FAMILIES[self.model.family]
        if self.tokenizer.scheme not in spec.schemes:
            raise ConfigError(
                f"{where}: tokenizer.scheme {self.tokenizer.scheme!r} does not feed {self.model.family}; use {spec.schemes}"
            )
        if self.data.generative and not spec.supports_generative:
            generative = " or ".join(name for name, other in FAMILIES.items() if other.supports_generative)
            raise ConfigError(f"{where}: data.generative is {generative}'s mode; set it only with model.family: {generative}")
        self.multimodal.check(where, self.data.packing)
        refused = [m for m in self.multimodal.joint if m not in spec.modalities]
        if refused:
            raise ConfigError(f"{where}: multimodal.joint {refused}: {self.model.family} reads only {list(spec.modalities)}")
        if self.multimodal.pair and self.multimodal.pair_size not in FAMILIES[self.multimodal.pair_family].sizes:
            raise ConfigError(
                f"{where}: multimodal.pair_size {self.multimodal.pair_size!r} is not a {self.multimodal.pair_family} size"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path, overrides: list[str] | None = None) -> PretrainConfig:
    """A pretraining config from YAML, with `section.field=value` overrides (see celltron.config)."""
    return typed_config.load_config(PretrainConfig, path, overrides)
