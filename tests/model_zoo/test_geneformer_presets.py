"""The Geneformer presets are the released models' configurations, field by field."""

import pytest

from celltron.model_zoo.geneformer.configuration_geneformer import SIZES, GeneformerConfig

FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
)

# Geneformer-V1-10M = gf-6L-30M-i2048: config.json at huggingface.co/ctheodoris/Geneformer, commit
# c45a71b ("upload Geneformer 6L-30M config"); the same values in the fine-tuned
# geneformer-6L-30M_CellClassifier_cardiomyopathies_220224/config.json.
V1_10M = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=2048,
    vocab_size=25426,
    hidden_act="relu",
    hidden_dropout_prob=0.02,
    attention_probs_dropout_prob=0.02,
    layer_norm_eps=1e-12,
)
# Geneformer-V2-104M and -316M (commit 7cf49a3, "add V2 models"): dropouts 0.1 as issue 15 quotes
# their config.json files; shapes as CZI's model page and Helical list them (316M: 316,354,867
# weights, pinned in test_registry); vocabulary = token_dictionary_gc104M.pkl (20,275 entries).
V2 = dict(
    max_position_embeddings=4096,
    vocab_size=20275,
    hidden_act="relu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    layer_norm_eps=1e-12,
)
V2_104M = dict(V2, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
V2_316M = dict(V2, hidden_size=1152, num_hidden_layers=18, num_attention_heads=18, intermediate_size=4608)


@pytest.mark.parametrize("size, release", [("10M", V1_10M), ("104M", V2_104M), ("316M", V2_316M)])
def test_presets_match_the_released_configurations(size, release):
    config = GeneformerConfig.from_size(size)
    assert {field: getattr(config, field) for field in FIELDS} == release
    assert set(release) == set(FIELDS) and set(SIZES[size]) <= set(FIELDS)  # every preset field is pinned here


def test_overrides_still_win_over_a_release():
    config = GeneformerConfig.from_size("104M", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.0, 0.0)
