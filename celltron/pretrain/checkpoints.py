"""Checkpoints: written atomically, found again for `--resume auto`, exported to a Hugging Face
folder (DeepSpeed ZeRO shards consolidated)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

STEP = re.compile(r"step=(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `X.ckpt` as `X.ckpt.partial`, then rename: a checkpoint file is complete or absent."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def is_complete(path: Path) -> bool:
    """A .ckpt file (renamed into place when done) or a DeepSpeed checkpoint folder whose
    `latest` tag file, written last, exists."""
    if path.is_file():
        return path.suffix == ".ckpt"
    return path.is_dir() and (path / "latest").exists()


def checkpoint_step(path: Path) -> int:
    match = STEP.search(path.name)
    return int(match.group(1)) if match else -1


def latest_checkpoint(directory) -> Path | None:
    """The complete checkpoint with the highest step in `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete = [p for p in directory.iterdir() if is_complete(p) and checkpoint_step(p) >= 0]
    return max(complete, key=checkpoint_step, default=None)


def model_state_from_checkpoint(path) -> dict:
    """The model's weights (keys as in the model's own state_dict) from a Lightning .ckpt file
    or a DeepSpeed checkpoint folder of any ZeRO stage (shards gathered into fp32)."""
    path = Path(path)
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    # Lightning's DeepSpeed engine wraps the module as `_forward_module`; the model is `model.`
    weights = {}
    for key, value in state.items():
        key = key.removeprefix("_forward_module.")
        if key.startswith("model."):
            weights[key.removeprefix("model.")] = value
    if not weights:
        raise ValueError(f"{path}: holds no celltron model weights (no 'model.*' keys); is it a celltron pretraining checkpoint?")
    return weights
