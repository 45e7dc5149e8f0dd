"""scGPT: gene tokens plus their expression values through a Transformer encoder, with scGPT's
heads: masked expression regression, MVC (expression from the cell embedding), a cell-class
head, and the generative attention-mask mode.

Parameter names follow scGPT's `TransformerModel` with PyTorch encoder layers (`in_proj_weight`),
so the converter only renames flash-attn's `Wqkv`. Attention goes through the shared SDPA /
varlen path, so packed batches work as in the other families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from celltron.model_zoo.common import (
    CellModelOutput,
    cell_layout,
    encoder_flops_per_token,
    modality_embedding,
    multi_head_attention,
    plan_attention,
    pool_cells,
    run_layers,
)
from celltron.model_zoo.scgpt.configuration_scgpt import ScGPTConfig


@dataclass
class ScGPTOutput(CellModelOutput):
    """CellModelOutput plus scGPT's per-token predictions.

    Attributes:
        expression: predicted expression of every token (batch, tokens).
        mvc_expression: expression predicted from the cell embedding (MVC head), if built.
        zero_probs, mvc_zero_probs: Bernoulli probabilities of the explicit-zero heads, if built.
        class_logits: cell-class logits (cells, n_cls), when asked for with `cell_labels` or `classify`.
    """

    expression: torch.Tensor | None = None
    mvc_expression: torch.Tensor | None = None
    zero_probs: torch.Tensor | None = None
    mvc_zero_probs: torch.Tensor | None = None
    class_logits: torch.Tensor | None = None


class GeneEncoder(nn.Module):
    """Token embedding followed by a LayerNorm (scGPT's GeneEncoder; also its batch encoder)."""

    def __init__(self, n_tokens: int, hidden: int, padding_idx: int | None = None):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, hidden, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.linear1 = nn.Linear(1, config.hidden_size)
        self.linear2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.max_value = config.max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class CategoryValueEncoder(GeneEncoder):
    """Bin index -> embedding -> LayerNorm."""

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return super().forward(values.long())


class SelfAttention(nn.Module):
    """Packed q/k/v projection with PyTorch's MultiheadAttention parameter names."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        hidden = config.hidden_size
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden))
        self.out_proj = nn.Linear(hidden, hidden)
        self.n_heads, self.dropout = config.num_attention_heads, config.dropout

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, hidden: torch.Tensor, plan) -> torch.Tensor:
        query, key, value = F.linear(hidden, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        p = self.dropout if self.training else 0.0
        return self.out_proj(multi_head_attention(query, key, value, self.n_heads, plan, p))


class EncoderLayer(nn.Module):
    """PyTorch's TransformerEncoderLayer (ReLU feed-forward), post- or pre-LayerNorm."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.linear1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)
        self.pre_norm = config.norm_scheme == "pre"

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout1(self.self_attn(self.norm1(x), plan))
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, plan)))
        return self.norm2(x + self._feed_forward(x))


class TransformerEncoder(nn.Module):
    def __init__(self, config: ScGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, hidden: torch.Tensor, plan) -> torch.Tensor:
        return run_layers(self.layers, hidden, plan, self.gradient_checkpointing and self.training)


def _mlp_head(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Linear(hidden, 1))


class ExprDecoder(nn.Module):
    """Per-token expression (and optionally non-zero probability) from the hidden state."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        d_in = config.hidden_size * (2 if config.use_batch_labels else 1)
        self.fc = _mlp_head(d_in, config.hidden_size)
        if config.explicit_zero_prob:
            self.zero_logit = _mlp_head(d_in, config.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        zero = torch.sigmoid(self.zero_logit(x).squeeze(-1)) if hasattr(self, "zero_logit") else None
        return self.fc(x).squeeze(-1), zero


class ClsDecoder(nn.Module):
    def __init__(self, config: ScGPTConfig):
        super().__init__()
        hidden = config.hidden_size
        self._decoder = nn.ModuleList()
        for _ in range(config.nlayers_cls - 1):
            self._decoder.extend([nn.Linear(hidden, hidden), nn.ReLU(), nn.LayerNorm(hidden)])
        self.out_layer = nn.Linear(hidden, config.n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """'inner product' MVC: expression of gene g = W(sigmoid(query(gene embedding g))) . cell."""

    def __init__(self, config: ScGPTConfig):
        super().__init__()
        hidden = config.hidden_size
        d_in = hidden * (2 if config.use_batch_labels else 1)
        self.gene2query = nn.Linear(hidden, hidden)
        self.W = nn.Linear(hidden, d_in, bias=False)
        if config.explicit_zero_prob:
            self.W_zero_logit = nn.Linear(hidden, d_in)

    def forward(self, cell_per_token: torch.Tensor, gene_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = torch.sigmoid(self.gene2query(gene_embs))
        pred = (self.W(query) * cell_per_token).sum(-1)
        zero = torch.sigmoid((self.W_zero_logit(query) * cell_per_token).sum(-1)) if hasattr(self, "W_zero_logit") else None
        return pred, zero


class ScGPTPreTrainedModel(PreTrainedModel):
    config_class = ScGPTConfig
    base_model_prefix = "scgpt"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisations (what scGPT trains from), gene embedding U(-0.1, 0.1).
        The gene embedding's rule is applied when the embedding itself is visited: transformers
        does not visit a module without parameters of its own (the gene encoder), so a rule keyed
        on the encoder never ran and the embedding kept nn.Embedding's N(0, 1)."""
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, SelfAttention)):
            module.reset_parameters()
        if module is getattr(getattr(self, "encoder", None), "embedding", None):
            nn.init.uniform_(module.weight, -0.1, 0.1)


class ScGPTModel(ScGPTPreTrainedModel):
    """scGPT with its expression (MLM), MVC and cell-class heads.

    Forward takes the collators' batches: padded (`input_ids`, `values`, `attention_mask`) or
    packed (plus `cu_seqlens`). Per-cell inputs (`batch_labels`, `cell_labels`) are given one
    per cell, in batch (or pack) order.
    """

    def __init__(self, config: ScGPTConfig):
        super().__init__(config)
        self.encoder = GeneEncoder(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.input_emb_style == "continuous":
            self.value_encoder = ContinuousValueEncoder(config)
        elif config.input_emb_style == "category":
            self.value_encoder = CategoryValueEncoder(config.n_input_bins, config.hidden_size, padding_idx=int(config.pad_value))
        if config.use_batch_labels:
            self.batch_encoder = GeneEncoder(config.num_batch_labels, config.hidden_size)
        if config.condition_vocab_size:
            self.condition_encoder = nn.Embedding(config.condition_vocab_size, config.hidden_size)
        if config.generative:
            self.flag_encoder = nn.Embedding(2, config.hidden_size)
        if config.n_modalities > 1:
            self.modality_encoder = nn.Embedding(config.n_modalities, config.hidden_size)
        self.transformer_encoder = TransformerEncoder(config)
        self.decoder = ExprDecoder(config)
        self.cls_decoder = ClsDecoder(config)
        if config.do_mvc:
            self.mvc_decoder = MVCDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embedding

    def _embed(self, input_ids, values, condition_ids, gen_mask, modality_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        genes = self.encoder(input_ids)
        if self.config.input_emb_style == "scaling":
            total = genes * values.unsqueeze(-1).to(genes.dtype)
        else:
            total = genes + self.value_encoder(values)
        if condition_ids is not None:
            total = total + self.condition_encoder(condition_ids)
        if modality_ids is not None:
            if self.config.n_modalities == 1:
                raise ValueError("modality_ids given, but this model was built for RNA alone (n_modalities=1)")
            total = total + modality_embedding(self.modality_encoder, modality_ids)
        if gen_mask is not None:
            if not self.config.generative:
                raise ValueError(
                    "gen_mask given, but this model was built without the generative flag embedding (generative=False)"
                )
            # genes to generate carry no value: gene embedding + the 'generate' flag
            flagged = genes + self.flag_encoder.weight[1]
            total = torch.where(gen_mask[..., None], flagged, total)
        return total, genes

    def forward(
        self,
        input_ids,
        values,
        attention_mask=None,
        cu_seqlens=None,
        batch_labels=None,
        condition_ids=None,
        gen_mask=None,
        target_values=None,
        loss_mask=None,
        cell_labels=None,
        classify: bool = False,
        heads: bool = True,
        modality_ids=None,
        **unused,
    ) -> ScGPTOutput:
        """
        Args:
            input_ids, values: (batch, tokens) gene tokens and their (masked) values.
            attention_mask: 1 for real tokens; packed batches also give `cu_seqlens`.
            batch_labels: (cells,) batch index of each cell, when use_batch_labels.
            condition_ids: (batch, tokens) condition of each token, when condition_vocab_size.
            gen_mask: (batch, tokens) True for genes to generate (generative mode): they see the
                other genes and themselves, the other genes never see them.
            target_values: true values; with them the loss is computed on `loss_mask`
                (default: tokens to generate, or tokens whose value equals mask_value).
            cell_labels: (cells,) class of each cell, adds the cell-class cross-entropy.
            classify: return class_logits without a loss.
            heads: False returns hidden states and cell embeddings only (for fine-tuning heads).
            modality_ids: (batch, tokens) modality type of each token (0 RNA, 1 proteins, 2
                chromatin), for models built with n_modalities > 1.
        """
        layout = cell_layout(attention_mask, cu_seqlens, tuple(input_ids.shape), input_ids.device)
        allowed = None
        if gen_mask is not None:
            gen_mask = gen_mask.bool()
            eye = torch.eye(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
            allowed = ~gen_mask[:, None, :] | eye
        plan = plan_attention(
            attention_mask, layout, input_ids.shape[1], input_ids.device, self.config.attention_backend, allowed
        )
        total, gene_embs = self._embed(input_ids, values, condition_ids, gen_mask, modality_ids)
        hidden = self.transformer_encoder(total, plan)
        cells = pool_cells(hidden, layout, self.config.cell_embedding, attention_mask)
        if not heads:
            return ScGPTOutput(last_hidden_state=hidden, cell_embedding=cells)

        head_input, cell_input = hidden, cells
        if self.config.use_batch_labels:
            batch_emb = self.batch_encoder(batch_labels)
            head_input = torch.cat([hidden, batch_emb[layout.token_cell]], dim=-1)
            cell_input = torch.cat([cells, batch_emb], dim=-1)
        expression, zero_probs = self.decoder(head_input)
        out = ScGPTOutput(last_hidden_state=hidden, cell_embedding=cells, expression=expression, zero_probs=zero_probs)
        if self.config.do_mvc:
            out.mvc_expression, out.mvc_zero_probs = self.mvc_decoder(cell_input[layout.token_cell], gene_embs)
        if cell_labels is not None or classify:
            out.class_logits = self.cls_decoder(cells)
        if target_values is not None:
            if loss_mask is None:
                loss_mask = gen_mask if gen_mask is not None else values == self.config.mask_value
                if attention_mask is not None:
                    loss_mask = loss_mask & attention_mask.bool()
            out.loss = self._loss(out, target_values, loss_mask.bool(), cell_labels)
        elif cell_labels is not None:
            out.loss = F.cross_entropy(out.class_logits.float(), cell_labels)
        return out

    def _loss(self, out: ScGPTOutput, target: torch.Tensor, mask: torch.Tensor, cell_labels) -> torch.Tensor:
        """scGPT's pretraining sum: masked MSE of the expression and MVC heads, the Bernoulli
        NLL of the explicit-zero heads, and the cell-class cross-entropy when labels are given."""
        target = target.float()
        loss = masked_mse(out.expression, target, mask)
        if out.mvc_expression is not None:
            loss = loss + masked_mse(out.mvc_expression, target, mask)
        for probs in (out.zero_probs, out.mvc_zero_probs):
            if probs is not None:
                loss = loss + masked_bernoulli_nll(probs, target > 0, mask)
        if cell_labels is not None:
            loss = loss + F.cross_entropy(out.class_logits.float(), cell_labels)
        return loss


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked positions (scGPT's masked_mse_loss)."""
    mask = mask.float()
    return ((pred.float() - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def masked_bernoulli_nll(probs: torch.Tensor, nonzero: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of non-zero-ness under the predicted probabilities."""
    probs = probs.float().clamp(1e-7, 1 - 1e-7)
    log_likelihood = torch.where(nonzero, probs.log(), (1 - probs).log()) * mask.float()
    return -log_likelihood.sum() / mask.float().sum().clamp(min=1)


def scgpt_flops_per_token(config: ScGPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: the encoder (see encoder_flops_per_token), the value encoder's
    hidden x hidden matmul, the 3-layer expression head and, with MVC, its two hidden x hidden
    matmuls; all x6 for forward and backward."""
    h = config.hidden_size
    extra = h * h + (2 * h * h + h) + (2 * h * h if config.do_mvc else 0)
    return encoder_flops_per_token(config.num_hidden_layers, h, config.intermediate_size, seq_len, 0) + 6.0 * extra
