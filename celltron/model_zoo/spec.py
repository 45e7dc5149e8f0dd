"""What a model family is, in one record (in the spirit of torchtitan's `TrainSpec`): everything
the rest of celltron asks about a family, so that no module branches on a family's name.

Each family declares its record in its own folder (`celltron/model_zoo/<family>/family.py`,
`FAMILY = Family(...)`); `celltron.model_zoo.registry` registers the built-in ones, and
`register_family` adds any other. This module imports no family code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from celltron.tokenizers.collate import MLMCollator


@dataclass(frozen=True)
class EncoderParts:
    """Where a family keeps what a task head uses.

    encoder: attribute path of the Transformer layers' module (its input gets the task flags).
    embeddings: parameter-name prefixes of the input embeddings.
    layers: attribute path of the list of layers.
    lora_targets: names of the Linear modules LoRA adapts (attention and feed-forward).
    """

    encoder: str
    embeddings: tuple[str, ...]
    layers: str
    lora_targets: tuple[str, ...]


def attribute(module: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted attribute path ('bert.encoder.layer')."""
    for name in path.split("."):
        module = getattr(module, name)
    return module


@dataclass(frozen=True)
class VocabIds:
    """What a masking collator needs of a vocabulary: its <pad> and <mask> ids (mask None where
    there is none), the special-token ids (never masked) and the number of ids."""

    pad_id: int
    mask_id: int | None
    special_ids: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, vocab) -> VocabIds:
        mask_id = vocab.special_id("mask") if "mask" in vocab.specials else None
        return cls(vocab.special_id("pad"), mask_id, tuple(int(i) for i in vocab.special_ids()), len(vocab))


def mask_tokens(ids: VocabIds, data, generator: torch.Generator, values_key: str | None = None) -> MLMCollator:
    """Masked-gene modelling (BERT's 80/10/10) on `data.mask_probability` of the tokens; with
    `values_key`, the per-token values of the chosen tokens are hidden and predicted too."""
    return MLMCollator(
        ids.pad_id,
        ids.mask_id,
        list(ids.special_ids),
        ids.size,
        data.mask_probability,
        generator=generator,
        values_key=values_key,
    )


def positions_for(tokenizer, size_settings: dict) -> dict:
    """A position-embedding table long enough for the tokenizer's cells (its max_len, or a
    multi-modal tokenizer's whole sequence, plus <cls> and <eos>), never shorter than the size's
    own (512 when the size names none)."""
    longest = getattr(tokenizer, "sequence_max_len", getattr(tokenizer, "max_len", 2048)) + 2
    return {"max_position_embeddings": max(size_settings.get("max_position_embeddings", 512), longest)}


def no_defaults(tokenizer, size_settings: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    """A model family.

    name: the family's name (config files' model.family, `celltron convert FAMILY`).
    config_class, model_class: the Hugging Face config and model; config_class.from_size(size,
        vocab_size=..., **overrides) builds a named size.
    sizes: named sizes, {size: config fields}.
    counting_vocab: vocabulary size used to count parameters when a size does not fix one.
    schemes: tokenizer schemes (celltron.tokenizers.schemes.SCHEMES) that feed the family.
    masking: (VocabIds, data section, generator) -> the padded masking collator of pretraining
        (a module-level function or functools.partial: DataLoader workers may pickle it).
    layer_class: the Transformer layer, FSDP's wrapping unit and activation checkpointing's.
    parts: where the encoder, its embeddings, its layers and LoRA's Linear targets are.
    flops: (config, seq_len) -> training FLOPs per token (MFU).
    supports_generative: pretraining's data.generative mode exists for the family.
    masks: (data-section field giving the masked share, what it hides), for model cards.
    build_defaults: (tokenizer, the size's config fields) -> config fields a pretraining run
        sets unless model.overrides does (position table, species tokens, ...).
    has_position_limit: inputs are bounded by config.max_position_embeddings.
    auto_classes: names of transformers Auto classes registered for the family (AutoConfig
        too when any); empty for families whose folders transformers loads already.
    load_with: the Auto class a model card tells users to load the family's folders with.
    model_types: further config.json `model_type`s whose folders are this family's (plain
        `bert` folders are Geneformer's).
    converter: "module:function" converting an official checkpoint, called as
        function(source, out, overwrite=..., **options); None when there is none.
    modalities: what the family's tokens may measure (rna; adt proteins, atac chromatin where
        its config's `n_modalities` adds a modality-type embedding per token: `modality_ids`).
    """

    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    sizes: dict
    counting_vocab: int
    schemes: tuple[str, ...]
    masking: Callable[[VocabIds, Any, torch.Generator], Callable]
    layer_class: type[nn.Module]
    parts: EncoderParts
    flops: Callable[[PretrainedConfig, int], float]
    supports_generative: bool = False
    masks: tuple[str, str] = ("mask_probability", "tokens")
    build_defaults: Callable[[Any, dict], dict] = no_defaults
    has_position_limit: bool = True
    auto_classes: tuple[str, ...] = ("AutoModel",)
    load_with: str = "AutoModel"
    model_types: tuple[str, ...] = ()
    converter: str | None = None
    modalities: tuple[str, ...] = ("rna", "adt", "atac")
