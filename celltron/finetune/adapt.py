"""A pretrained encoder made ready for a task head: loaded from a folder (or the Hub), its
pretraining heads set aside, its first layers frozen or LoRA adapters added, and a hook that
adds per-token embeddings (task flags) to the encoder's input."""

from __future__ import annotations

import logging
import re

from torch import nn

from celltron.errors import ConfigError
from celltron.finetune.config import AdaptSection
from celltron.model_zoo.registry import base_of, load_pretrained, parts_of
from celltron.model_zoo.spec import EncoderParts, attribute

log = logging.getLogger(__name__)


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
    layers = attribute(model, parts.layers)
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


def count_trainable(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class InputFlags:
    """Adds `embedding(flags)` to the encoder's input hidden states: scGPT's perturbation flags,
    usable with every family. Set `flags` ((batch, tokens) ints) before each forward."""

    def __init__(self, model: nn.Module, embedding: nn.Embedding):
        self.embedding, self.flags = embedding, None
        encoder = attribute(base_of(model), parts_of(base_of(model)).encoder)
        self.handle = encoder.register_forward_pre_hook(self._add)

    def _add(self, module, args):
        if self.flags is None:
            return None
        hidden, *rest = args
        return (hidden + self.embedding(self.flags).to(hidden.dtype), *rest)
