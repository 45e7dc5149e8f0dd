"""GeneCompass: a BERT encoder whose input embedding fuses each gene's token, its expression
value and prior knowledge about the gene, with a species embedding starting every cell, trained
on masked gene ids and masked values at once.

The fused embedding follows GeneCompass: [gene embedding, value, one projection per prior]
are concatenated and mapped back to the hidden width by Linear -> LayerNorm -> GELU -> Linear;
absolute positions are then added as in BERT. Prior matrices are fixed buffers, one row per
token (see `celltron.tokenizers.ortholog.align_prior_knowledge`), saved with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
from celltron.model_zoo.genecompass.configuration_genecompass import GeneCompassConfig


@dataclass
class GeneCompassOutput(CellModelOutput):
    """CellModelOutput plus `predicted_values`, the value predicted for every token (batch, tokens)."""

    predicted_values: torch.Tensor | None = None


class KnowledgeEmbeddings(nn.Module):
    def __init__(self, config: GeneCompassConfig):
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden, padding_idx=config.pad_token_id)
        self.prior_names = sorted(config.prior_dims)
        for name in self.prior_names:
            self.register_buffer(f"prior_{name}", torch.zeros(config.vocab_size, config.prior_dims[name]))
        self.prior_projections = nn.ModuleDict({name: nn.Linear(config.prior_dims[name], hidden) for name in self.prior_names})
        width = hidden * (1 + len(self.prior_names)) + 1
        self.fuse = nn.Sequential(
            nn.Linear(width, hidden), nn.LayerNorm(hidden, eps=config.layer_norm_eps), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.species_embeddings = nn.Embedding(max(len(config.species_token_ids), 1), hidden)
        self.species_token_ids = list(config.species_token_ids)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, values: torch.Tensor, position_ids: torch.Tensor, modality_ids=None
    ) -> torch.Tensor:
        parts = [self.word_embeddings(input_ids), values.unsqueeze(-1).to(self.word_embeddings.weight.dtype)]
        for name in self.prior_names:
            parts.append(self.prior_projections[name](getattr(self, f"prior_{name}")[input_ids]))
        genes = self.fuse(torch.cat(parts, dim=-1))
        if self.species_token_ids:
            # computed from the config, not a buffer: nothing to lose when loading a checkpoint
            match = input_ids[..., None] == torch.tensor(self.species_token_ids, device=input_ids.device)
            species = self.species_embeddings(match.long().argmax(-1))
            genes = torch.where(match.any(-1)[..., None], species, genes)
        hidden = genes + self.position_embeddings(position_ids) + modality_embedding(self.token_type_embeddings, modality_ids)
        return self.dropout(self.LayerNorm(hidden))


class Heads(nn.Module):
    """Masked gene-id logits (decoder tied to the word embeddings) and per-token values."""

    def __init__(self, config: GeneCompassConfig):
        super().__init__()
        hidden = config.hidden_size
        self.transform = nn.Sequential(
            nn.Linear(hidden, hidden), ACT2FN[config.hidden_act], nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        )
        self.decoder = nn.Linear(hidden, config.vocab_size)
        self.value = nn.Sequential(nn.Linear(hidden, hidden), ACT2FN[config.hidden_act], nn.Linear(hidden, 1))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(self.transform(hidden)), self.value(hidden).squeeze(-1)


class GeneCompassPreTrainedModel(PreTrainedModel):
    config_class = GeneCompassConfig
    base_model_prefix = "genecompass"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class GeneCompassForPretraining(GeneCompassPreTrainedModel):
    """GeneCompass with its two heads. Forward takes MLMCollator(values_key='values') batches,
    padded or packed (`cu_seqlens`, `position_ids`)."""

    _tied_weights_keys = {"heads.decoder.weight": "embeddings.word_embeddings.weight"}

    def __init__(self, config: GeneCompassConfig):
        super().__init__(config)
        self.embeddings = KnowledgeEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.heads = Heads(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.heads.decoder

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self.heads.decoder = embeddings

    @torch.no_grad()
    def fused_gene_embeddings(self, value: float = 0.0) -> torch.Tensor:
        """(vocab_size, hidden): every token's fused embedding (its learned vector, `value` and
        its prior rows through their projections and the fusion MLP), before position and
        context. `get_input_embeddings` is the learned vector alone, which leaves the priors out."""
        ids = torch.arange(self.config.vocab_size, device=self.embeddings.word_embeddings.weight.device)
        return self.gene_token_embeddings(ids, value)

    def gene_token_embeddings(self, tokens: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """(*tokens.shape, hidden): the fused embedding of each token in `tokens`, as
        `fused_gene_embeddings`, differentiable (fine-tuning heads read genes this way)."""
        embeddings = self.embeddings
        weight = embeddings.word_embeddings.weight
        parts = [
            embeddings.word_embeddings(tokens),
            torch.full((*tokens.shape, 1), value, dtype=weight.dtype, device=weight.device),
        ]
        for name in embeddings.prior_names:
            parts.append(embeddings.prior_projections[name](getattr(embeddings, f"prior_{name}")[tokens]))
        return embeddings.fuse(torch.cat(parts, dim=-1))

    def set_prior_knowledge(self, name: str, matrix) -> None:
        """Fill prior `name` with a (vocab_size, prior_dims[name]) matrix aligned to the tokens."""
        if name not in self.config.prior_dims:
            raise KeyError(f"no prior {name!r} in this model's config; it has {sorted(self.config.prior_dims)}")
        buffer = getattr(self.embeddings, f"prior_{name}")
        matrix = torch.as_tensor(np.asarray(matrix), dtype=buffer.dtype)
        if matrix.shape != buffer.shape:
            raise ValueError(f"prior {name!r} must be {tuple(buffer.shape)} (tokens x width), got {tuple(matrix.shape)}")
        buffer.copy_(matrix)

    def forward(
        self,
        input_ids,
        values,
        attention_mask=None,
        position_ids=None,
        cu_seqlens=None,
        labels=None,
        target_values=None,
        masked_logits_only: bool = False,
        heads: bool = True,
        modality_ids=None,
        **unused,
    ) -> GeneCompassOutput:
        """`masked_logits_only` (with labels): id logits and predicted values of the masked
        tokens only, (masked tokens, ...) in the order of `labels != -100`. `heads=False`: hidden
        states and cell embeddings only (fine-tuning heads sit on them)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        layout = cell_layout(attention_mask, cu_seqlens, tuple(input_ids.shape), input_ids.device)
        plan = plan_attention(attention_mask, layout, input_ids.shape[1], input_ids.device, self.config.attention_backend)
        hidden = self.encoder(self.embeddings(input_ids, values, position_ids, modality_ids), plan)
        cells = pool_cells(hidden, layout, self.config.cell_embedding, attention_mask)
        if not heads:
            return GeneCompassOutput(last_hidden_state=hidden, cell_embedding=cells)
        loss = None
        if masked_logits_only and labels is not None:
            chosen = labels != -100
            logits, predicted_values = self.heads(hidden[chosen])
            labels, target_values = labels[chosen], target_values[chosen] if target_values is not None else None
        else:
            logits, predicted_values = self.heads(hidden)
        if labels is not None:
            loss = self._loss(logits, predicted_values, labels, target_values)
        return GeneCompassOutput(
            loss=loss, logits=logits, last_hidden_state=hidden, cell_embedding=cells, predicted_values=predicted_values
        )

    def _loss(self, logits, predicted_values, labels, target_values) -> torch.Tensor:
        """id_loss_weight x cross-entropy of the masked ids + value_loss_weight x MSE of their values."""
        if not (labels != -100).any():
            return logits.sum() * 0
        id_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        if target_values is None:
            return id_loss
        chosen = labels != -100
        value_loss = F.mse_loss(predicted_values[chosen].float(), target_values[chosen].float()) if chosen.any() else id_loss * 0
        return self.config.id_loss_weight * id_loss + self.config.value_loss_weight * value_loss


def genecompass_flops_per_token(config: GeneCompassConfig, seq_len: int) -> float:
    """Training FLOPs per token: the encoder with its vocabulary head, the fusion MLP and prior
    projections, the head transform and the value head; all x6 for forward and backward."""
    h = config.hidden_size
    width = h * (1 + len(config.prior_dims)) + 1
    extra = width * h + h * h + sum(d * h for d in config.prior_dims.values()) + h * h + h * h + h
    return (
        encoder_flops_per_token(config.num_hidden_layers, h, config.intermediate_size, seq_len, config.vocab_size) + 6.0 * extra
    )
