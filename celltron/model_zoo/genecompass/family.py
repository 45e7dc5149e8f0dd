"""GeneCompass's family record (see celltron.model_zoo.spec.Family)."""

from __future__ import annotations

from functools import partial

from celltron.model_zoo.common import Layer
from celltron.model_zoo.genecompass.configuration_genecompass import SIZES, GeneCompassConfig
from celltron.model_zoo.genecompass.modeling_genecompass import GeneCompassForPretraining, genecompass_flops_per_token
from celltron.model_zoo.spec import EncoderParts, Family, mask_tokens, positions_for

NOT_SPECIES = ("pad", "mask", "cls", "eos")


def build_defaults(tokenizer, size_settings: dict) -> dict:
    """The position table (see positions_for) and the vocabulary's species tokens, which start
    every cell."""
    vocab = tokenizer.vocab
    species = sorted(role for role in vocab.specials if role not in NOT_SPECIES)
    return {"species_token_ids": [vocab.special_id(s) for s in species], **positions_for(tokenizer, size_settings)}


FAMILY = Family(
    name="genecompass",
    config_class=GeneCompassConfig,
    model_class=GeneCompassForPretraining,
    sizes=SIZES,
    # GeneCompass's vocabulary is built from its corpus (human + mouse genes); 50,000 is an
    # assumed round figure for listing only.
    counting_vocab=50000,
    schemes=("ortholog",),
    masking=partial(mask_tokens, values_key="values"),  # gene ids and their values, masked together
    layer_class=Layer,
    parts=EncoderParts("encoder", ("embeddings.",), "encoder.layer", ("query", "key", "value", "intermediate.dense")),
    flops=genecompass_flops_per_token,
    build_defaults=build_defaults,
    auto_classes=("AutoModel", "AutoModelForMaskedLM"),
    load_with="AutoModelForMaskedLM",
)
