"""Geneformer configuration: a BERT configuration, so folders stay plain `BertForMaskedLM`
checkpoints that `transformers` alone loads."""

from __future__ import annotations

from transformers import BertConfig

from celltron.errors import ConfigError
from celltron.model_zoo.common import check_modalities, config_from_size

# Named sizes, each as its release's config.json (ctheodoris/Geneformer on the Hugging Face Hub):
# - 10M: Geneformer-V1-10M, first released as the 6-layer gf-6L-30M-i2048 (config.json of
#   commit c45a71b): ReLU, hidden and attention dropout 0.02, layer norm eps 1e-12, 2,048 positions.
# - 104M, 316M: Geneformer-V2-104M and Geneformer-V2-316M: ReLU, layer norm eps 1e-12, 4,096
#   positions, hidden and attention dropout 0.1, not V1's 0.02 (their config.json files, as
#   issue 15 quotes them); shapes as listed by CZI's model page and Helical, whose parameter
#   counts they give.
# `vocab_size` is the release's token dictionary; `1b` is a preset for scale with no released
# weights (V2's shape family, V1's dropout).
_V1 = dict(hidden_act="relu", hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02, layer_norm_eps=1e-12)
_V2 = dict(_V1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
SIZES = {
    "debug": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=4096),
    "10M": dict(
        _V1,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=2048,
        vocab_size=25426,
    ),
    "104M": dict(
        _V2,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=4096,
        vocab_size=20275,
    ),
    "316M": dict(
        _V2,
        hidden_size=1152,
        num_hidden_layers=18,
        num_attention_heads=18,
        intermediate_size=4608,
        max_position_embeddings=4096,
        vocab_size=20275,
    ),
    "1b": dict(
        _V1,
        hidden_size=2048,
        num_hidden_layers=20,
        num_attention_heads=16,
        intermediate_size=8192,
        max_position_embeddings=4096,
        vocab_size=20275,
    ),
}


class GeneformerConfig(BertConfig):
    """BERT configuration plus how the cell embedding is pooled.

    Args:
        cell_embedding: 'cls' (first token; V2 vocabularies start cells with <cls>) or 'mean'
            (mean of the non-padding tokens), as Geneformer's embedding extractor offers.
        attention_backend: 'auto' (varlen kernels for packed batches on CUDA, SDPA otherwise),
            'sdpa', 'varlen' (PyTorch's) or 'flash_attn' (the optional flash-attn package).
        n_modalities: modality types of the tokens (1: RNA only, as Geneformer; 3: RNA, proteins,
            chromatin); they index BERT's token-type embeddings, widened to hold them.
        kwargs: BertConfig fields (vocab_size, hidden_size, num_hidden_layers, ...).
    """

    def __init__(self, cell_embedding: str = "mean", attention_backend: str = "auto", n_modalities: int = 1, **kwargs):
        kwargs.setdefault("architectures", ["BertForMaskedLM"])
        kwargs["type_vocab_size"] = max(kwargs.get("type_vocab_size", 2), n_modalities)
        super().__init__(**kwargs)
        self.n_modalities = check_modalities(n_modalities)
        if cell_embedding not in ("cls", "mean"):
            raise ConfigError(f"cell_embedding must be 'cls' or 'mean', got {cell_embedding!r}")
        self.cell_embedding = cell_embedding
        self.attention_backend = attention_backend

    @classmethod
    def from_size(cls, size: str, vocab_size: int | None = None, **overrides) -> GeneformerConfig:
        """A named size (SIZES); `vocab_size` overrides the size's own (debug sizes need one)."""
        return config_from_size(cls, SIZES, "geneformer", size, vocab_size, overrides)
