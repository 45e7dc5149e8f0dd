"""GeneCompass configuration: a BERT configuration plus the knowledge-embedding and dual-loss
settings."""

from __future__ import annotations

from transformers import BertConfig

from celltron.errors import ConfigError
from celltron.model_zoo.common import check_modalities, config_from_size

SIZES = {
    "debug": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=2048),
    # GeneCompass base: "same as the size of BERT base" (xCompass-AI/GeneCompass pretraining
    # script): 12 layers, 768 hidden, 12 heads, 3072 intermediate, GELU, 2048 positions.
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=2048
    ),
    # GeneCompass small: 6 layers (its README); the width is not published, so base's is kept.
    "small": dict(
        hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=2048
    ),
}


class GeneCompassConfig(BertConfig):
    """BERT configuration plus GeneCompass's input embedding and objective.

    Args:
        prior_dims: name -> width of each prior-knowledge matrix (promoter, co-expression, gene
            family, GRN; one row per token), e.g. {"promoter": 768}. Empty: no priors.
        species_token_ids: vocabulary ids of the species tokens (`<human>`, `<mouse>`) that
            start each cell; each gets its own species embedding.
        id_loss_weight, value_loss_weight: weights of the masked gene-id cross-entropy and the
            masked value MSE (GeneCompass: 0.2 and 0.8).
        cell_embedding: 'cls' (the species token) or 'mean' of the cell's tokens.
        attention_backend: see GeneformerConfig.
        kwargs: BertConfig fields.
    """

    model_type = "celltron_genecompass"

    def __init__(
        self,
        prior_dims: dict | None = None,
        species_token_ids: list | None = None,
        id_loss_weight: float = 0.2,
        value_loss_weight: float = 0.8,
        cell_embedding: str = "mean",
        attention_backend: str = "auto",
        n_modalities: int = 1,
        **kwargs,
    ):
        kwargs["type_vocab_size"] = max(kwargs.get("type_vocab_size", 2), n_modalities)  # modality types index it
        kwargs.setdefault("hidden_act", "gelu")
        kwargs.setdefault("hidden_dropout_prob", 0.02)
        kwargs.setdefault("attention_probs_dropout_prob", 0.02)
        super().__init__(**kwargs)
        if cell_embedding not in ("cls", "mean"):
            raise ConfigError(f"cell_embedding must be 'cls' or 'mean', got {cell_embedding!r}")
        self.prior_dims = dict(prior_dims or {})
        self.species_token_ids = [int(t) for t in (species_token_ids or [])]
        self.id_loss_weight, self.value_loss_weight = id_loss_weight, value_loss_weight
        self.cell_embedding, self.attention_backend = cell_embedding, attention_backend
        self.n_modalities = check_modalities(n_modalities)

    @classmethod
    def from_size(cls, size: str, vocab_size: int | None = None, **overrides) -> GeneCompassConfig:
        """A named size (SIZES); `vocab_size` overrides the size's own (debug sizes need one)."""
        return config_from_size(cls, SIZES, "genecompass", size, vocab_size, overrides)
