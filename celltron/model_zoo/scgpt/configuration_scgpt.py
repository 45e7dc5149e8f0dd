"""scGPT configuration: the fields of scGPT's `TransformerModel`, named as in transformers."""

from __future__ import annotations

from transformers import PretrainedConfig

from celltron.errors import ConfigError
from celltron.model_zoo.common import check_modalities, config_from_size

SIZES = {
    "debug": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    # scGPT whole-human (args.json of the released checkpoint): embsize 512, nheads 8,
    # d_hid 512, nlayers 12, dropout 0.2, continuous values, MVC; ~51M parameters with its
    # 60,697-token vocabulary.
    "whole-human": dict(
        hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=512, dropout=0.2, vocab_size=60697
    ),
}


class ScGPTConfig(PretrainedConfig):
    """scGPT: gene-token embedding + value encoder + Transformer encoder + expression heads.

    Args:
        vocab_size: gene tokens (scGPT whole-human: 60,697).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: scGPT's embsize,
            nlayers, nheads and d_hid.
        dropout: dropout in the encoder layers and the value encoder.
        layer_norm_eps: of the encoder layers (scGPT: PyTorch's default 1e-5).
        norm_scheme: 'post' (scGPT's released models) or 'pre' LayerNorm.
        input_emb_style: 'continuous' (an MLP of the value), 'category' (an embedding of the
            bin index, `n_input_bins` of them) or 'scaling' (gene embedding times value).
        n_input_bins: bins for 'category' (scGPT: n_bins + 2).
        max_value: values are clipped to this before the continuous encoder.
        pad_value, mask_value: value of padding and of hidden (masked) expression.
        cell_embedding: 'cls' (first token, scGPT's default) or 'mean' of the cell's tokens.
        do_mvc: build the MVC head (expression from the cell embedding and gene embeddings).
        mvc_decoder_style: 'inner product' (scGPT's default; the only one supported).
        explicit_zero_prob: also predict the probability of a non-zero value (Bernoulli heads).
        use_batch_labels, num_batch_labels: a batch (donor/technology) embedding concatenated
            to the hidden state before the expression heads.
        n_cls, nlayers_cls: the cell-class head (scGPT builds one even when unused).
        condition_vocab_size: per-token condition embedding (e.g. perturbation flags), 0 = none.
        n_modalities: modality types of the tokens (1: RNA only; up to 3: RNA, proteins,
            chromatin): above 1, a modality embedding is added to every token (scGPT's multi-omic
            `mod_encoder`).
        generative: build the flag embedding of scGPT's generative attention-mask mode.
        attention_backend: see GeneformerConfig.
    """

    model_type = "celltron_scgpt"

    def __init__(
        self,
        vocab_size: int = 60697,
        hidden_size: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        intermediate_size: int = 512,
        dropout: float = 0.2,
        layer_norm_eps: float = 1e-5,
        norm_scheme: str = "post",
        input_emb_style: str = "continuous",
        n_input_bins: int = 53,
        max_value: float = 512.0,
        pad_token_id: int = 0,
        pad_value: float = -2.0,
        mask_value: float = -1.0,
        cell_embedding: str = "cls",
        do_mvc: bool = True,
        mvc_decoder_style: str = "inner product",
        explicit_zero_prob: bool = False,
        use_batch_labels: bool = False,
        num_batch_labels: int = 0,
        n_cls: int = 1,
        nlayers_cls: int = 3,
        condition_vocab_size: int = 0,
        generative: bool = True,
        attention_backend: str = "auto",
        initializer_range: float = 0.02,
        n_modalities: int = 1,
        **kwargs,
    ):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.n_modalities = check_modalities(n_modalities)
        if input_emb_style not in ("continuous", "category", "scaling"):
            raise ConfigError(f"input_emb_style must be continuous, category or scaling, got {input_emb_style!r}")
        if norm_scheme not in ("pre", "post"):
            raise ConfigError(f"norm_scheme must be 'pre' or 'post', got {norm_scheme!r}")
        if mvc_decoder_style != "inner product":
            raise ConfigError(f"only the 'inner product' MVC decoder is supported, got {mvc_decoder_style!r}")
        if cell_embedding not in ("cls", "mean"):
            raise ConfigError(f"cell_embedding must be 'cls' or 'mean', got {cell_embedding!r}")
        if use_batch_labels and num_batch_labels < 1:
            raise ConfigError("use_batch_labels needs num_batch_labels >= 1")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size, self.dropout = num_attention_heads, intermediate_size, dropout
        self.layer_norm_eps, self.norm_scheme, self.input_emb_style = layer_norm_eps, norm_scheme, input_emb_style
        self.n_input_bins, self.max_value, self.pad_value, self.mask_value = n_input_bins, max_value, pad_value, mask_value
        self.cell_embedding, self.do_mvc, self.mvc_decoder_style = cell_embedding, do_mvc, mvc_decoder_style
        self.explicit_zero_prob, self.use_batch_labels, self.num_batch_labels = (
            explicit_zero_prob,
            use_batch_labels,
            num_batch_labels,
        )
        self.n_cls, self.nlayers_cls, self.condition_vocab_size = n_cls, nlayers_cls, condition_vocab_size
        self.generative, self.attention_backend, self.initializer_range = generative, attention_backend, initializer_range

    @classmethod
    def from_size(cls, size: str, vocab_size: int | None = None, **overrides) -> ScGPTConfig:
        """A named size (SIZES); `vocab_size` overrides the size's own (debug sizes need one)."""
        return config_from_size(cls, SIZES, "scgpt", size, vocab_size, overrides)
