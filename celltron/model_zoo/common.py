"""Blocks shared by the model families: where cells lie in a batch, attention over padded or
packed cells (SDPA, or varlen kernels on CUDA), pooling, outputs, FLOPs."""

from __future__ import annotations

import importlib.util
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from celltron.errors import ConfigError
from celltron.io import write_folder_atomically  # noqa: F401  (its former home; imports of it from here keep working)

ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flash_attn")


@dataclass
class CellModelOutput(ModelOutput):
    """What every celltron model returns.

    Attributes:
        loss: training loss when targets were given.
        logits: masked-token logits (batch, tokens, vocab) where the family has a token head.
        last_hidden_state: final hidden states (batch, tokens, hidden).
        cell_embedding: one vector per cell (batch, or number of packed cells, hidden).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


@dataclass
class CellLayout:
    """Where each cell's tokens lie in a (rows, tokens) batch, padded (one cell per row) or
    packed (several cells per row, `cu_seqlens` per row, a padding tail counted as a segment).

    Attributes:
        starts: flat index (row * tokens + position) of every real cell's first token.
        lengths: tokens of every real cell.
        token_cell: (rows, tokens) index of the cell each token belongs to (padding: its row's
            last cell, so per-cell values can be broadcast to tokens without a gap).
        cu_seqlens: flat int32 cumulative offsets of every segment over rows * tokens, and the
            longest segment: what varlen attention kernels take (None for padded batches).
        segments: (rows, tokens) index of each token's segment within its row (packed only),
            from which SDPA's block-diagonal mask is built.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    token_cell: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    segments: torch.Tensor | None = None

    @property
    def n_cells(self) -> int:
        return len(self.starts)


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Which packed sequence each of `total` tokens belongs to."""
    lengths = torch.diff(cu_seqlens.to(torch.long))
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)


def _rows(cu_seqlens) -> list[torch.Tensor]:
    rows = cu_seqlens if isinstance(cu_seqlens, (list, tuple)) else list(cu_seqlens) if cu_seqlens.dim() == 2 else [cu_seqlens]
    return [torch.as_tensor(row).to(torch.long) for row in rows]


def cell_layout(attention_mask: torch.Tensor | None, cu_seqlens, shape: tuple[int, int], device) -> CellLayout:
    """The CellLayout of a padded batch (`cu_seqlens` None) or a packed one."""
    n_rows, n_tokens = shape
    if cu_seqlens is None:
        lengths = attention_mask.sum(1).long() if attention_mask is not None else torch.full((n_rows,), n_tokens, device=device)
        starts = torch.arange(n_rows, device=device) * n_tokens
        token_cell = torch.arange(n_rows, device=device)[:, None].expand(n_rows, n_tokens)
        return CellLayout(starts, lengths.to(device), token_cell)
    starts, lengths, token_cell, flat_offsets, segments = [], [], [], [], []
    n_cells = 0
    rows = [row.to(device) for row in _rows(cu_seqlens)]
    for r, row in enumerate(rows):
        seg_starts, seg_lengths = row[:-1], torch.diff(row)
        real = seg_lengths > 0
        if attention_mask is not None:
            real &= attention_mask[r, seg_starts.clamp(max=n_tokens - 1)].bool()
        n_real = int(real.sum())
        segment = segment_ids(row, n_tokens)
        segments.append(segment)
        token_cell.append(n_cells + segment.clamp(max=max(n_real - 1, 0)))
        starts.append(seg_starts[real] + r * n_tokens)
        lengths.append(seg_lengths[real])
        flat_offsets.append(row[:-1] + r * n_tokens)
        n_cells += n_real
    flat_cu = torch.cat(flat_offsets + [torch.tensor([n_rows * n_tokens], device=device)]).to(torch.int32)
    all_lengths = torch.diff(flat_cu)
    return CellLayout(
        torch.cat(starts), torch.cat(lengths), torch.stack(token_cell), flat_cu, int(all_lengths.max()), torch.stack(segments)
    )


def pool_cells(hidden: torch.Tensor, layout: CellLayout, style: str, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per cell: its first token ('cls') or the mean of its tokens ('mean')."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if style == "cls":
        return flat[layout.starts]
    if style != "mean":
        raise ConfigError(f"unknown cell embedding style {style!r}; use 'cls' or 'mean'")
    weights = torch.ones(hidden.shape[:2], device=hidden.device) if token_weights is None else token_weights
    weights = weights.to(hidden.dtype)
    if layout.cu_seqlens is None:  # one cell per row: a masked mean, no scatter
        return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    weights = weights.reshape(-1)
    sums = torch.zeros(layout.n_cells, hidden.shape[-1], device=hidden.device, dtype=hidden.dtype)
    sums.index_add_(0, layout.token_cell.reshape(-1), flat * weights[:, None])
    counts = torch.zeros(layout.n_cells, device=hidden.device, dtype=hidden.dtype).index_add_(
        0, layout.token_cell.reshape(-1), weights
    )
    return sums / counts.clamp(min=1)[:, None]


@dataclass
class AttentionPlan:
    """How every layer of one forward pass attends: an SDPA mask, or a varlen kernel."""

    backend: str
    mask: torch.Tensor | None = None
    layout: CellLayout | None = None


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def plan_attention(
    attention_mask, layout: CellLayout, n_tokens: int, device, backend: str = "auto", allowed: torch.Tensor | None = None
) -> AttentionPlan:
    """Choose the attention path once per forward.

    Packed batches on CUDA use a variable-length kernel (flash-attn's when installed, else
    PyTorch's `varlen_attn`), which never builds a (tokens x tokens) mask; everything else, and
    any extra `allowed` (batch, query, key) pattern, goes through SDPA with a boolean mask:
    padding keys hidden, packed cells block-diagonal.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    packed = layout.cu_seqlens is not None
    if backend == "auto":
        backend = "sdpa"
        if packed and allowed is None and torch.device(device).type == "cuda":
            backend = "flash_attn" if _flash_attn_installed() else "varlen"
    if backend != "sdpa":
        if not packed or allowed is not None:
            raise ConfigError(f"the {backend} attention backend needs packed batches (cu_seqlens) and no extra mask")
        return AttentionPlan(backend, layout=layout)
    mask = None
    if packed:
        mask = (layout.segments[:, :, None] == layout.segments[:, None, :])[:, None]
    elif attention_mask is not None and not bool(attention_mask.all()):
        mask = attention_mask.bool()[:, None, None, :]
    if allowed is not None:
        mask = allowed[:, None] if mask is None else mask & allowed[:, None]
    return AttentionPlan("sdpa", mask=mask)


_attention_records: list | None = None
_records_per_head = False


@contextmanager
def recording_attention(records: list, per_head: bool = False):
    """Within the block, every attention layer also appends its attention probabilities,
    averaged over heads, (batch, queries, keys), to `records`, in layer order: for analyses
    (GRN inference from attention), on the SDPA path only, at the cost of materialising them.
    `per_head` keeps the heads apart: (batch, heads, queries, keys)."""
    global _attention_records, _records_per_head
    previous = _attention_records, _records_per_head
    _attention_records, _records_per_head = records, per_head
    try:
        yield records
    finally:
        _attention_records, _records_per_head = previous


def _record_attention(query: torch.Tensor, key: torch.Tensor, mask) -> None:
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probabilities = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0)
    _attention_records.append(probabilities if _records_per_head else probabilities.mean(1))


def multi_head_attention(query, key, value, n_heads: int, plan: AttentionPlan, dropout: float) -> torch.Tensor:
    """(batch, tokens, hidden) projections -> attended (batch, tokens, hidden)."""
    batch, tokens, hidden = query.shape
    head_dim = hidden // n_heads
    if plan.backend == "sdpa":
        split = lambda x: x.view(batch, tokens, n_heads, head_dim).transpose(1, 2)  # noqa: E731
        if _attention_records is not None:
            _record_attention(split(query), split(key), plan.mask)
        attended = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=plan.mask, dropout_p=dropout)
        return attended.transpose(1, 2).reshape(batch, tokens, hidden)
    flat = lambda x: x.reshape(batch * tokens, n_heads, head_dim)  # noqa: E731
    cu, longest = plan.layout.cu_seqlens, plan.layout.max_seqlen
    if plan.backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        attended = flash_attn_varlen_func(flat(query), flat(key), flat(value), cu, cu, longest, longest, dropout_p=dropout)
    else:
        from torch.nn.attention.varlen import varlen_attn

        # PyTorch's varlen kernel has no attention-probability dropout: training on this path
        # skips that (small, 0.02 in Geneformer) dropout; hidden-state dropout still applies.
        attended = varlen_attn(flat(query), flat(key), flat(value), cu, cu, longest, longest)
    return attended.reshape(batch, tokens, hidden)


# BERT encoder blocks (post-LayerNorm, parameter names of transformers' BertModel), shared by
# the geneformer and genecompass families.


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)


class AttentionOutput(nn.Module):
    def __init__(self, config: BertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Attention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = AttentionOutput(config, config.hidden_size)
        self.n_heads = config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, plan) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        attended = multi_head_attention(
            self.self.query(hidden), self.self.key(hidden), self.self.value(hidden), self.n_heads, plan, p
        )
        return self.output(attended, hidden)


class Intermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class Layer(nn.Module):
    """Post-LayerNorm BERT layer: attention, then feed-forward, each with a residual."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = AttentionOutput(config, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, plan) -> torch.Tensor:
        attended = self.attention(hidden, plan)
        return self.output(self.intermediate(attended), attended)


def run_layers(layers: nn.ModuleList, hidden: torch.Tensor, plan, checkpointing: bool) -> torch.Tensor:
    """Apply the layers in turn; with `checkpointing`, recompute each in the backward pass
    instead of keeping its activations (switched on by `activation_checkpointing_enable`)."""
    for layer in layers:
        if checkpointing:
            hidden = torch.utils.checkpoint.checkpoint(layer, hidden, plan, use_reentrant=False)
        else:
            hidden = layer(hidden, plan)
    return hidden


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, hidden: torch.Tensor, plan) -> torch.Tensor:
        return run_layers(self.layer, hidden, plan, self.gradient_checkpointing and self.training)


def encoder_flops_per_token(n_layers: int, hidden: int, intermediate: int, seq_len: int, vocab: int) -> float:
    """Training FLOPs per token of a Transformer encoder (the PaLM / Megatron accounting):
    6 x (matmul parameters) for forward and backward (2 FLOPs per multiply-add, x3 for the two
    backward matmuls), plus attention scores and the weighted sum (2 matmuls of seq_len x hidden
    per layer, also x6), plus the output projection onto `vocab` outputs (0 for regression heads).
    Embedding lookups, norms and activations are not counted."""
    matmul_params = n_layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = n_layers * 2 * seq_len * hidden
    return 6.0 * (matmul_params + attention + hidden * vocab)


def config_from_size(config_class, sizes: dict, family: str, size: str, vocab_size: int | None, overrides: dict):
    """A family's named size as a config; `vocab_size` (the tokenizer's) wins over the size's own."""
    if size not in sizes:
        raise ConfigError(f"unknown {family} size {size!r}; known: {', '.join(sizes)}")
    fields = {**sizes[size], **overrides}
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    return config_class(**fields)


MAX_MODALITIES = 3  # RNA, proteins, chromatin (celltron.tokenizers.multimodal.MODALITY_IDS)


def check_modalities(n_modalities: int) -> int:
    if not 1 <= int(n_modalities) <= MAX_MODALITIES:
        raise ConfigError(f"n_modalities must be 1 (RNA only) to {MAX_MODALITIES} (RNA, proteins, chromatin), got {n_modalities}")
    return int(n_modalities)


def modality_embedding(table: nn.Embedding, modality_ids) -> torch.Tensor:
    """Each token's modality-type embedding from `table`, or its row 0 for every token when no
    `modality_ids` are given (an RNA-only batch: what single-modality checkpoints were trained with)."""
    if modality_ids is None:
        return table.weight[0]
    if int(modality_ids.max()) >= table.num_embeddings:
        raise ValueError(
            f"modality id {int(modality_ids.max())} given, but this model has {table.num_embeddings} modality types; "
            "build it with n_modalities covering every modality of its tokens"
        )
    return table(modality_ids.long())
