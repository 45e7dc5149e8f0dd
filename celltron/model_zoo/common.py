"""Blocks shared by the model families: attention over padded or packed cells, outputs, FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput


@dataclass
class CellModelOutput(ModelOutput):
    """What every celltron model returns.

    Attributes:
        loss: training loss when labels were given.
        logits: masked-token logits (batch, tokens, vocab) where the family has a token head.
        last_hidden_state: final hidden states (batch, tokens, hidden).
        cell_embedding: one vector per cell (batch or number of packed cells, hidden).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Which packed sequence each of `total` tokens belongs to."""
    lengths = torch.diff(cu_seqlens.to(torch.long))
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)


def attention_bias(attention_mask: torch.Tensor | None, cu_seqlens, n_tokens: int) -> torch.Tensor | None:
    """A boolean SDPA mask (batch, 1, query, key): padding keys are hidden, and packed
    sequences only see themselves (block-diagonal). None when nothing needs masking."""
    if cu_seqlens is not None:
        rows = cu_seqlens if isinstance(cu_seqlens, (list, tuple)) else [cu_seqlens]
        masks = []
        for row in rows:
            segment = segment_ids(torch.as_tensor(row), n_tokens)
            masks.append(segment[:, None] == segment[None, :])
        return torch.stack(masks)[:, None]
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def multi_head_attention(query, key, value, n_heads: int, mask, dropout: float) -> torch.Tensor:
    """(batch, tokens, hidden) projections -> attended (batch, tokens, hidden) through SDPA
    (flash / memory-efficient kernels on CUDA, a block-diagonal or padding mask on CPU)."""
    batch, tokens, hidden = query.shape
    split = lambda x: x.view(batch, tokens, n_heads, hidden // n_heads).transpose(1, 2)  # noqa: E731
    attended = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask, dropout_p=dropout)
    return attended.transpose(1, 2).reshape(batch, tokens, hidden)


def encoder_flops_per_token(n_layers: int, hidden: int, intermediate: int, seq_len: int, vocab: int) -> float:
    """Training FLOPs per token of a BERT-style encoder: 6 x (matmul parameters) for forward and
    backward, plus the attention scores and weighted sum (2 matmuls of seq_len x hidden per
    layer, x 6 for forward + backward), plus the output projection onto the vocabulary."""
    matmul_params = n_layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = n_layers * 2 * seq_len * hidden
    return 6.0 * (matmul_params + attention + hidden * vocab)
