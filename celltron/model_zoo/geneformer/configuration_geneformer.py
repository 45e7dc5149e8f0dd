"""Geneformer configuration: a BERT configuration, so folders stay plain `BertForMaskedLM`
checkpoints that `transformers` alone loads."""

from __future__ import annotations

from transformers import BertConfig

# Named sizes. Only the test size so far: the published shapes (10M / 104M / 316M) are added
# with the size registry once checked against the released config.json files.
SIZES = {
    "debug": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=4096),
}


class GeneformerConfig(BertConfig):
    """BERT configuration plus how the cell embedding is pooled.

    Args:
        cell_embedding: 'cls' (first token; V2 vocabularies start cells with <cls>) or 'mean'
            (mean of the non-padding tokens), as Geneformer's embedding extractor offers.
        kwargs: BertConfig fields (vocab_size, hidden_size, num_hidden_layers, ...).
    """

    def __init__(self, cell_embedding: str = "mean", **kwargs):
        kwargs.setdefault("architectures", ["BertForMaskedLM"])
        super().__init__(**kwargs)
        if cell_embedding not in ("cls", "mean"):
            raise ValueError(f"cell_embedding must be 'cls' or 'mean', got {cell_embedding!r}")
        self.cell_embedding = cell_embedding

    @classmethod
    def from_size(cls, size: str, vocab_size: int, **overrides) -> "GeneformerConfig":
        if size not in SIZES:
            raise ValueError(f"unknown geneformer size {size!r}; known: {', '.join(SIZES)}")
        return cls(vocab_size=vocab_size, **{**SIZES[size], **overrides})
