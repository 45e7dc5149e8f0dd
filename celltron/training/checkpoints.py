"""Checkpoints: written atomically with a record of their size and CRC-32, checked and found
again for `--resume auto` (damaged ones skipped, named), exported to a Hugging Face folder
(DeepSpeed ZeRO shards consolidated)."""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
import zlib
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from celltron.errors import CheckpointError
from celltron.inputs import load_torch_checkpoint
from celltron.io import write_text_atomically

log = logging.getLogger(__name__)
STEP = re.compile(r"step=(\d+)")
INTEGRITY_SUFFIX = ".integrity.json"


def integrity_file(path: Path) -> Path:
    """The record of a checkpoint file's size and CRC-32, written beside it once it is complete."""
    return path.with_name(path.name + INTEGRITY_SUFFIX)


class _Checksummed:
    """A write-only stream that keeps the size and CRC-32 of what passes through it: the
    checksum costs no second read of a multi-GB checkpoint."""

    def __init__(self, handle):
        self.handle, self.size, self.crc32 = handle, 0, 0

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)
        self.size += memoryview(data).nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `X.ckpt` as `X.ckpt.partial`, rename it, then record its size and CRC-32 in
    `X.ckpt.integrity.json`: a checkpoint file is complete or absent, and one damaged later (a
    full disk, a partial copy, a truncation) is recognised before anything trains on it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (local checkpoint files only)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with partial.open("wb") as handle:
                stream = _Checksummed(handle)
                torch.save(checkpoint, stream)
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the rename makes it the checkpoint
            integrity_file(path).unlink(missing_ok=True)  # the record of an earlier file of this name
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # left only when saving failed or was interrupted
        write_text_atomically(integrity_file(path), json.dumps({"size": stream.size, "crc32": f"{stream.crc32:08x}"}) + "\n")

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        integrity_file(Path(path)).unlink(missing_ok=True)


def is_complete(path: Path) -> bool:
    """Whether `path` looks like a finished checkpoint: a .ckpt file (renamed into place when
    done) or a DeepSpeed checkpoint folder whose `latest` tag file, written last, exists.
    `checkpoint_problem` says whether its contents are intact."""
    if path.is_file():
        return path.suffix == ".ckpt"
    return path.is_dir() and (path / "latest").exists()


def _zip_problem(path: Path) -> str | None:
    """A torch checkpoint is a zip archive: its central directory (at the very end of the file)
    is readable and every record lies inside the file, or the file was cut short. Reads only the
    directory, so it costs milliseconds for any size."""
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            if any(entry.header_offset + entry.compress_size > size for entry in archive.infolist()):
                return "a record runs past the end of the file (truncated)"
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"not a readable torch checkpoint ({error}); truncated or not a checkpoint"
    return None


def _file_crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(64 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _file_problem(path: Path, checksum: bool) -> str | None:
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    record = None
    if integrity_file(path).exists():  # written by this version; older checkpoints have only the zip check
        try:
            record = json.loads(integrity_file(path).read_text())
            expected = int(record["size"])
        except (ValueError, KeyError, TypeError):
            return f"its integrity record {integrity_file(path).name} is unreadable"
        if size != expected:
            return f"it holds {size:,} bytes where {expected:,} were written (truncated or changed since)"
    problem = _zip_problem(path)
    if problem is None and checksum and record is not None and _file_crc32(path) != record.get("crc32"):
        problem = "its contents differ from what was written (CRC-32 mismatch)"
    return problem


def _deepspeed_problem(folder: Path) -> str | None:
    """DeepSpeed writes its `latest` tag file last; the shard folder it names must hold the
    (non-empty, readable) files."""
    latest = folder / "latest"
    if not latest.is_file():
        return "no 'latest' tag file (the save did not finish)"
    tag = latest.read_text().strip()
    shards = folder / tag
    files = sorted(p for p in shards.iterdir() if p.is_file()) if tag and shards.is_dir() else []
    if not files:
        return f"'latest' names {tag or '(nothing)'}/, which holds no files"
    for shard in files:
        if shard.stat().st_size == 0:
            return f"{tag}/{shard.name} is empty"
        problem = _zip_problem(shard) if shard.suffix == ".pt" else None
        if problem:
            return f"{tag}/{shard.name}: {problem}"
    return None


def checkpoint_problem(path, checksum: bool = False) -> str | None:
    """What makes the checkpoint at `path` unusable, or None when it is intact.

    Cheap by default (the size recorded when it was written, the zip directory of torch's
    format, DeepSpeed's shard files); `checksum` also re-reads a file to compare its CRC-32 with
    the one recorded while writing (a full read: for export, not for every resume).
    """
    path = Path(path)
    if path.is_dir():
        return _deepspeed_problem(path)
    if not path.is_file():
        return "no such checkpoint file or DeepSpeed checkpoint folder"
    return _file_problem(path, checksum)


def check_checkpoint(path, checksum: bool = False) -> Path:
    """`path` if it is an intact checkpoint; else a CheckpointError naming it and what is wrong."""
    problem = checkpoint_problem(path, checksum)
    if problem:
        raise CheckpointError(
            f"{path}: damaged checkpoint: {problem}; resume from an earlier one (--resume auto picks the newest "
            "intact checkpoint) or delete it"
        )
    return Path(path)


def checkpoint_step(path: Path) -> int:
    match = STEP.search(path.name)
    return int(match.group(1)) if match else -1


def latest_checkpoint(directory) -> Path | None:
    """The intact checkpoint with the highest step in `directory`, or None when there is none.
    Damaged ones (see `checkpoint_problem`) are skipped with a warning naming them; a directory
    whose every checkpoint is damaged is a CheckpointError, not a fresh start."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.iterdir() if is_complete(p) and checkpoint_step(p) >= 0]
    candidates.sort(key=checkpoint_step, reverse=True)
    damaged = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("%s: damaged checkpoint skipped by --resume auto: %s", path, problem)
        damaged.append(path.name)
    if damaged:
        raise CheckpointError(
            f"{directory}: every checkpoint is damaged ({', '.join(damaged)}); delete them to start the run "
            "afresh, or resume from a copy with --resume PATH"
        )
    return None


def model_state_from_checkpoint(path) -> dict:
    """The model's weights (keys as in the model's own state_dict) from a Lightning .ckpt file
    or a DeepSpeed checkpoint folder of any ZeRO stage (shards gathered into fp32)."""
    path = Path(path)
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    else:
        state = load_torch_checkpoint(path, weights_only=False)["state_dict"]
    # Lightning's DeepSpeed engine wraps the module as `_forward_module`; the model is `model.`
    weights = {}
    for key, value in state.items():
        key = key.removeprefix("_forward_module.")
        if key.startswith("model."):
            weights[key.removeprefix("model.")] = value
    if not weights:
        raise CheckpointError(
            f"{path}: holds no celltron model weights (no 'model.*' keys); is it a celltron pretraining checkpoint?"
        )
    return weights
