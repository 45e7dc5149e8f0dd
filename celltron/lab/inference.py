"""Where and in what precision a pretrained model runs for inference (embeddings, GRN scores):
the GPU in bf16 autocast when there is one, else the CPU in fp32."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from celltron.errors import ConfigError
from celltron.lab.options import PRECISIONS


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device; pass --device cpu (or auto)")
    return device


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (`auto` or `bf16`), fp32 otherwise; a context manager."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {PRECISIONS}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (non-blocking from pinned memory where possible)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def pad_cells(tokens, rows: np.ndarray, pad_id: int) -> dict:
    """A padded batch (input_ids, attention_mask, values for schemes that have them, and
    modality_ids for multi-modal sequences) of the cells `rows` of ragged `tokens`."""
    longest = max(len(tokens[r]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), longest), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), longest), dtype=torch.long),
    }
    if tokens.values is not None:
        batch["values"] = torch.zeros((len(rows), longest), dtype=torch.float32)
    modalities = getattr(tokens, "modality_ids", None)  # multi-modal sequences: each token's modality
    if modalities is not None:
        batch["modality_ids"] = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(tokens[r])
        batch["input_ids"][i, :n] = torch.as_tensor(tokens[r], dtype=torch.long)
        batch["attention_mask"][i, :n] = 1
        if tokens.values is not None:
            batch["values"][i, :n] = torch.as_tensor(tokens.cell_values(r), dtype=torch.float32)
        if modalities is not None:
            batch["modality_ids"][i, :n] = torch.as_tensor(modalities[tokens.offsets[r] : tokens.offsets[r + 1]])
    return batch
