"""How `celltron embed` embeds: typed options (the CLI's flags are made from these fields).
Kept apart from embed.py, which needs torch, so that the CLI can describe them without it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from celltron.config import check_fields, one_of
from celltron.corpus.constants import MIN_MAPPED_FRACTION
from celltron.ranges import ranged

PRECISIONS = ("auto", "32", "bf16")  # of inference: bf16 autocast on CUDA, fp32 on CPU
ALL_GENES = 0  # max_len meaning every detected gene, up to what the model family allows


def max_len_flag(text: str) -> int:
    """--max-len's value: a number of tokens (>= 1), or 'all' / 0 for every detected gene."""
    if text.lower() == "all":
        return ALL_GENES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give tokens per cell (>= 1), or 'all' for every detected gene")
    return value


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed.

    Attributes:
        key: obsm (and varm) key the embeddings are written under.
        pool: 'cls' (the first token: <cls>, or the species token) or 'mean' of the gene tokens
            (special tokens left out); None takes the model config's `cell_embedding`.
        layer: which Transformer layer's output (-1: the last; -2: the one before, Geneformer's
            own default for cell embeddings).
        layers: several layers (e.g. -1 -2): their token states averaged, then pooled; empty: `layer` alone.
        max_len: tokens per cell for this run; None: the length the model was pretrained with;
            0 (or 'all'): every detected gene, up to the model's position table.
        batch_size: cells per forward pass.
        block_cells: cells read and tokenised at a time (bounds memory).
        gene_embeddings: also write each gene's contextual embedding averaged over the cells
            where it is a token (`varm[key]`; NaN for genes never tokenised).
        device: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.
        precision: 'auto' (bf16 autocast on CUDA, fp32 on CPU), '32' or 'bf16'.
        devices: processes, one per device (GPUs when on CUDA), each embedding a contiguous range.
        input_layer: the counts: 'X', 'raw' or a layer name.
        gene_column: var column holding gene symbols or Ensembl IDs (default: var names).
        species: 'human' or 'mouse' (default: inferred from the genes).
        min_mapped_fraction: refuse the input unless this share of its counts maps to Ensembl IDs
            and has tokens in the model's vocabulary.
        seed: seeds the tokenizer's sampling (scGPT's max_len sampling).
        progress: show a progress bar.
    """

    key: str = "X_celltron"
    pool: str | None = one_of(None, ("cls", "mean"))
    layer: int = -1
    layers: tuple[int, ...] = ()
    max_len: int | None = ranged(None, ">= 0")
    batch_size: int = ranged(32, ">= 1")
    block_cells: int = ranged(2048, ">= 1")
    gene_embeddings: bool = False
    device: str = "auto"
    precision: str = one_of("auto", PRECISIONS)
    devices: int = ranged(1, ">= 1")
    input_layer: str = "X"
    gene_column: str | None = None
    species: str | None = one_of(None, ("human", "mouse"))
    min_mapped_fraction: float = ranged(MIN_MAPPED_FRACTION, "[0, 1]")
    seed: int = ranged(0, ">= 0")
    progress: bool = True

    def __post_init__(self):
        # frozen: normalise through object.__setattr__ (the CLI hands lists; 'all' reads better than 0)
        object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.max_len, str) and self.max_len.lower() == "all":
            object.__setattr__(self, "max_len", ALL_GENES)
        check_fields(self, "embed option")

    @property
    def chosen_layers(self) -> tuple[int, ...]:
        """The layers whose token states are pooled: `layers`, or `layer` alone."""
        return self.layers or (self.layer,)
