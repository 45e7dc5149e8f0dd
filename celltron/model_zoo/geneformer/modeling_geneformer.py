"""Geneformer: a BERT encoder over rank-value gene tokens with a masked-gene head.

Parameter names follow `transformers.BertForMaskedLM`, so a Geneformer checkpoint folder loads
here unchanged and a folder saved here loads in `transformers` alone. Attention goes through
`scaled_dot_product_attention`; packed batches (`cu_seqlens`) get a block-diagonal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from celltron.model_zoo.common import (
    BertEncoder,
    CellModelOutput,
    cell_layout,
    encoder_flops_per_token,
    modality_embedding,
    plan_attention,
    pool_cells,
)
from celltron.model_zoo.geneformer.configuration_geneformer import GeneformerConfig


class Embeddings(nn.Module):
    def __init__(self, config: GeneformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, modality_ids=None) -> torch.Tensor:
        # Geneformer never uses segment ids: every token has type 0, unless tokens of several
        # modalities say theirs (the token-type table then holds the modality types).
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(hidden + modality_embedding(self.token_type_embeddings, modality_ids)))


class Backbone(nn.Module):
    """Embeddings + encoder (the `bert.` prefix of BertForMaskedLM)."""

    def __init__(self, config: GeneformerConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = BertEncoder(config)


class PredictionTransform(nn.Module):
    def __init__(self, config: GeneformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class Predictions(nn.Module):
    def __init__(self, config: GeneformerConfig):
        super().__init__()
        self.transform = PredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        # BERT keeps the output bias as its own parameter, tied to the decoder's
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class MaskedGeneHead(nn.Module):
    """The `cls.` prefix of BertForMaskedLM: transform, then a decoder tied to the embeddings."""

    def __init__(self, config: GeneformerConfig):
        super().__init__()
        self.predictions = Predictions(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions.decoder(self.predictions.transform(hidden))


class GeneformerPreTrainedModel(PreTrainedModel):
    config_class = GeneformerConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class GeneformerForMaskedLM(GeneformerPreTrainedModel):
    """Geneformer with its masked-gene head.

    Forward takes the collators' batches: padded (`input_ids`, `attention_mask`) or packed
    (`input_ids` of shape (rows, tokens) with `position_ids` and `cu_seqlens`).
    """

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: GeneformerConfig):
        super().__init__(config)
        self.bert = Backbone(config)
        self.cls = MaskedGeneHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = embeddings

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cu_seqlens=None,
        labels=None,
        masked_logits_only: bool = False,
        heads: bool = True,
        modality_ids=None,
        **unused,
    ) -> CellModelOutput:
        """`masked_logits_only` (with labels): project only the masked tokens onto the vocabulary,
        and return logits of shape (masked tokens, vocab) in the order of `labels != -100` (the
        vocabulary projection of every token dominates a small model's cost). `heads=False`:
        hidden states and cell embeddings only (fine-tuning heads sit on them)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        layout = cell_layout(attention_mask, cu_seqlens, tuple(input_ids.shape), input_ids.device)
        plan = plan_attention(attention_mask, layout, input_ids.shape[1], input_ids.device, self.config.attention_backend)
        hidden = self.bert.encoder(self.bert.embeddings(input_ids, position_ids, modality_ids), plan)
        cells = pool_cells(hidden, layout, self.config.cell_embedding, attention_mask)
        if not heads:
            return CellModelOutput(last_hidden_state=hidden, cell_embedding=cells)
        if masked_logits_only and labels is not None:
            chosen = labels != -100
            logits = self.cls(hidden[chosen])
            loss = F.cross_entropy(logits.float(), labels[chosen]) if logits.shape[0] else logits.sum() * 0
            return CellModelOutput(loss=loss, logits=logits, last_hidden_state=hidden, cell_embedding=cells)
        logits = self.cls(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return CellModelOutput(loss=loss, logits=logits, last_hidden_state=hidden, cell_embedding=cells)


def geneformer_flops_per_token(config: GeneformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: the encoder, its vocabulary projection and the head's hidden x
    hidden transform; all x6 for forward and backward."""
    h = config.hidden_size
    return (
        encoder_flops_per_token(config.num_hidden_layers, h, config.intermediate_size, seq_len, config.vocab_size) + 6.0 * h * h
    )
