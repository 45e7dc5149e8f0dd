"""A pretrained encoder made ready for a task head: loaded from a folder (or the Hub), its
pretraining heads set aside, its first layers frozen or LoRA adapters added, and a hook that
adds per-token embeddings (task flags) to the encoder's input."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from celltron.errors import ConfigError
from celltron.finetune.config import AdaptSection
from celltron.model_zoo.registry import check_vocabulary, family_of, load_pretrained, model_folder

log = logging.getLogger(__name__)


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


PARTS = {
    "geneformer": EncoderParts(
        "bert.encoder", ("bert.embeddings.",), "bert.encoder.layer", ("query", "key", "value", "intermediate.dense")
    ),
    "genecompass": EncoderParts("encoder", ("embeddings.",), "encoder.layer", ("query", "key", "value", "intermediate.dense")),
    # scGPT's q/k/v projection is one packed Parameter (PyTorch's layout), so LoRA adapts the
    # attention output and feed-forward Linears
    "scgpt": EncoderParts(
        "transformer_encoder", ("encoder.", "value_encoder."), "transformer_encoder.layers", ("out_proj", "linear1", "linear2")
    ),
}


def resolve_model_folder(model: str) -> Path:
    """A local folder, or a Hub repository id (`owner/name[@revision]`) fetched into the local cache;
    a model whose vocabulary is not its tokenizer's is refused here, before any work."""
    folder = model_folder(model)
    check_vocabulary(folder)
    return folder


def parts_of(model: nn.Module) -> EncoderParts:
    return PARTS[family_of(model.config).name]


def _attribute(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def load_encoder(folder, adapt: AdaptSection) -> nn.Module:
    """The pretrained model in `folder`, with only what the encoder uses left trainable, then
    frozen layers or LoRA adapters as `adapt` asks."""
    model = load_pretrained(folder)
    parts = parts_of(model)
    used = (*parts.embeddings, parts.encoder + ".")
    # named_parameters lists a tied weight once, under its first (embedding) name, so the
    # heads' share of tied weights stays trainable
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(used))
    if adapt.freeze_layers:
        freeze_layers(model, parts, adapt.freeze_layers)
    if adapt.lora_rank:
        model = add_lora(model, parts, adapt)
    return model


def freeze_layers(model: nn.Module, parts: EncoderParts, n: int) -> None:
    layers = _attribute(model, parts.layers)
    if n > len(layers):
        raise ConfigError(f"--freeze {n}: the model has only {len(layers)} layers")
    for name, parameter in model.named_parameters():
        if name.startswith(parts.embeddings):
            parameter.requires_grad_(False)
    for layer in list(layers)[:n]:
        layer.requires_grad_(False)


def add_lora(model: nn.Module, parts: EncoderParts, adapt: AdaptSection) -> nn.Module:
    """LoRA adapters on the encoder's Linear layers (peft); everything else of the encoder frozen."""
    from peft import LoraConfig, get_peft_model

    alpha = adapt.lora_alpha if adapt.lora_alpha is not None else 2 * adapt.lora_rank
    targets = rf"{re.escape(parts.encoder)}\..*\.({'|'.join(re.escape(t) for t in parts.lora_targets)})"
    config = LoraConfig(r=adapt.lora_rank, lora_alpha=alpha, lora_dropout=adapt.lora_dropout, target_modules=targets)
    return get_peft_model(model, config)


def base_of(model: nn.Module) -> nn.Module:
    """The family model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class InputFlags:
    """Adds `embedding(flags)` to the encoder's input hidden states: scGPT's perturbation flags,
    usable with every family. Set `flags` ((batch, tokens) ints) before each forward."""

    def __init__(self, model: nn.Module, embedding: nn.Embedding):
        self.embedding, self.flags = embedding, None
        encoder = _attribute(base_of(model), parts_of(base_of(model)).encoder)
        self.handle = encoder.register_forward_pre_hook(self._add)

    def _add(self, module, args):
        if self.flags is None:
            return None
        hidden, *rest = args
        return (hidden + self.embedding(self.flags).to(hidden.dtype), *rest)
