"""Resuming never trains on a damaged checkpoint: `--resume auto` skips a truncated newest
checkpoint with a warning naming it and continues from the newest intact one; `--resume PATH`
to a damaged one is refused naming it; checkpoints of older versions (no integrity record)
still resume; DeepSpeed folders are checked through the files their `latest` tag names."""

from __future__ import annotations

import csv
import json
import logging
import zlib

import pytest
import torch

from celltron.cli import main
from celltron.errors import CheckpointError
from celltron.pretrain.config import load_config, replace
from celltron.pretrain.run import pretrain
from celltron.training.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint,
    checkpoint_problem,
    integrity_file,
    latest_checkpoint,
)
from tests.pretrain.conftest import CONFIGS


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _save(path, payload=None) -> None:
    AtomicCheckpointIO().save_checkpoint(payload or {"state_dict": {"model.w": torch.arange(5000.0)}, "global_step": 1}, path)


def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_finishes(demo_corpus, tmp_path, caplog, capsys):
    config = load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml")
    config = replace(
        config,
        data={"corpus": str(demo_corpus.location)},
        logging={"progress_bar": False, "wandb": False},
        trainer={"max_steps": 4, "log_every": 1, "val_every": 100, "checkpoint_every": 2},
    )
    first = pretrain(config, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert first.stopped_by is None and sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["step=2.ckpt", "step=4.ckpt"]
    _truncate(checkpoints / "step=4.ckpt")  # a full disk, a partial copy

    # an explicit --resume to it is refused, naming it, before the run writes anything
    args = [
        "pretrain",
        str(CONFIGS / "pretrain" / "geneformer_debug.yaml"),
        "--corpus",
        str(demo_corpus.location),
        "--out",
        str(tmp_path),
        "--max-steps",
        "6",
        "--set",
        "logging.progress_bar=false",
    ]
    capsys.readouterr()
    assert main([*args, "--resume", str(checkpoints / "step=4.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "step=4.ckpt: damaged checkpoint" in err and "truncated" in err and err.count("\n") == 1
    assert "max_steps: 4" in (tmp_path / "config.yaml").read_text()  # refused before the run wrote anything

    with caplog.at_level(logging.WARNING, logger="celltron.training.checkpoints"):
        resumed = pretrain(replace(config, trainer={"max_steps": 6}), tmp_path, resume="auto")
    skipped = [r.getMessage() for r in caplog.records if "damaged checkpoint skipped" in r.getMessage()]
    assert len(skipped) == 1 and "step=4.ckpt" in skipped[0]
    assert resumed.steps == 6 and resumed.export is not None
    steps = [int(row["step"]) for row in csv.DictReader((tmp_path / "metrics.csv").open()) if row["loss"]]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # continued from step 2, the newest intact checkpoint (not from scratch)


def test_latest_checkpoint_checks_size_and_structure_cheaply(tmp_path, caplog):
    _save(tmp_path / "step=1.ckpt")
    _save(tmp_path / "step=2.ckpt")
    record = json.loads(integrity_file(tmp_path / "step=2.ckpt").read_text())
    data = (tmp_path / "step=2.ckpt").read_bytes()
    assert record == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert latest_checkpoint(tmp_path).name == "step=2.ckpt"

    # an older version's checkpoints (no integrity record): intact ones still resume, cut ones do not
    integrity_file(tmp_path / "step=1.ckpt").unlink()
    integrity_file(tmp_path / "step=2.ckpt").unlink()
    _truncate(tmp_path / "step=2.ckpt", keep=0.9)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path).name == "step=1.ckpt"
    assert "step=2.ckpt: damaged checkpoint skipped" in caplog.text and "not a readable torch checkpoint" in caplog.text

    _truncate(tmp_path / "step=1.ckpt", keep=0.0)
    with pytest.raises(CheckpointError, match=r"every checkpoint is damaged \(step=2.ckpt, step=1.ckpt\); delete them"):
        latest_checkpoint(tmp_path)


def test_changed_contents_of_the_same_size_fail_the_checksum(tmp_path):
    path = tmp_path / "step=3.ckpt"
    _save(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensor's bytes, not the zip directory
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    assert checkpoint_problem(path) is None  # the cheap check (every resume) cannot see it
    with pytest.raises(CheckpointError, match=r"step=3.ckpt: damaged checkpoint: .*CRC-32 mismatch"):
        check_checkpoint(path, checksum=True)  # what export does before publishing weights


def test_an_interrupted_save_leaves_neither_a_partial_file_nor_a_checkpoint(tmp_path, monkeypatch):
    def interrupted(obj, stream):
        stream.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "step=5.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_deepspeed_folders_are_checked_through_their_latest_tag(tmp_path):
    folder = tmp_path / "step=4.ckpt"
    shards = folder / "checkpoint"
    shards.mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    assert "holds no files" in checkpoint_problem(folder)
    torch.save({"module": {}}, shards / "mp_rank_00_model_states.pt")
    (shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt is empty" in checkpoint_problem(folder)
    torch.save({"optimizer_state_dict": {}}, shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(folder) is None
    _truncate(shards / "mp_rank_00_model_states.pt")
    assert "mp_rank_00_model_states.pt: not a readable torch checkpoint" in checkpoint_problem(folder)
