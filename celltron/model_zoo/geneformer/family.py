"""Geneformer's family record (see celltron.model_zoo.spec.Family)."""

from __future__ import annotations

from celltron.model_zoo.common import Layer
from celltron.model_zoo.geneformer.configuration_geneformer import SIZES, GeneformerConfig
from celltron.model_zoo.geneformer.modeling_geneformer import GeneformerForMaskedLM, geneformer_flops_per_token
from celltron.model_zoo.spec import EncoderParts, Family, mask_tokens, positions_for

FAMILY = Family(
    name="geneformer",
    config_class=GeneformerConfig,
    model_class=GeneformerForMaskedLM,
    sizes=SIZES,
    counting_vocab=20275,
    schemes=("geneformer-v1", "geneformer-v2"),
    masking=mask_tokens,
    layer_class=Layer,
    parts=EncoderParts(
        "bert.encoder", ("bert.embeddings.",), "bert.encoder.layer", ("query", "key", "value", "intermediate.dense")
    ),
    flops=geneformer_flops_per_token,
    build_defaults=positions_for,
    # folders are plain BERT checkpoints (`model_type: bert`) that transformers loads as they are
    auto_classes=(),
    load_with="AutoModelForMaskedLM",
    model_types=("bert",),
    converter="celltron.model_zoo.geneformer.convert:convert_geneformer",
)
