"""scGPT's family record (see celltron.model_zoo.spec.Family) and its masking."""

from __future__ import annotations

import torch

from celltron.model_zoo.scgpt.configuration_scgpt import SIZES, ScGPTConfig
from celltron.model_zoo.scgpt.modeling_scgpt import EncoderLayer, ScGPTModel, scgpt_flops_per_token
from celltron.model_zoo.spec import EncoderParts, Family, VocabIds
from celltron.tokenizers.collate import ValueMaskingCollator


class Generative:
    """scGPT's generative mode: the hidden values are the genes to generate."""

    def __init__(self, collator: ValueMaskingCollator):
        self.collator, self.pad_value = collator, collator.pad_value

    def __call__(self, cells):
        batch = self.collator(cells)
        batch["gen_mask"] = (batch["values"] == self.collator.mask_value) & batch["attention_mask"].bool()
        return batch


def mask_values(ids: VocabIds, data, generator: torch.Generator):
    """scGPT's masked expression objective: `data.mask_ratio` of each cell's values hidden;
    with `data.generative`, those are the genes to generate."""
    collator = ValueMaskingCollator(ids.pad_id, mask_ratio=data.mask_ratio, generator=generator)
    return Generative(collator) if data.generative else collator


FAMILY = Family(
    name="scgpt",
    config_class=ScGPTConfig,
    model_class=ScGPTModel,
    sizes=SIZES,
    counting_vocab=60697,
    schemes=("scgpt",),
    masking=mask_values,
    layer_class=EncoderLayer,
    # scGPT's q/k/v projection is one packed Parameter (PyTorch's layout), so LoRA adapts the
    # attention output and feed-forward Linears
    parts=EncoderParts(
        "transformer_encoder", ("encoder.", "value_encoder."), "transformer_encoder.layers", ("out_proj", "linear1", "linear2")
    ),
    flops=scgpt_flops_per_token,
    supports_generative=True,
    masks=("mask_ratio", "values"),
    has_position_limit=False,  # no position embeddings: cells are sets of genes
    auto_classes=("AutoModel",),
    load_with="AutoModel",
    converter="celltron.model_zoo.scgpt.convert:convert_scgpt",
)
