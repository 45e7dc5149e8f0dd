"""Pretraining runs: every family learns on the bundled corpus; a run stopped by SIGTERM and
resumed logs exactly the losses of the uninterrupted run; checkpoints export; configs refuse
what cannot work."""

import csv
import os
import signal

import lightning.pytorch as pl
import pytest
import torch

import celltron  # noqa: F401
from celltron.cli import main
from celltron.model_zoo import FAMILIES
from celltron.pretrain.config import load_config, replace
from celltron.pretrain.run import pretrain
from tests.pretrain.conftest import CONFIGS


def _losses(run_dir) -> list[tuple[int, float]]:
    """(step, loss) rows of metrics.csv, in file order."""
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["loss"]]


def _quick(name, corpus, **sections):
    config = load_config(CONFIGS / "pretrain" / name)
    base = {"data": {"corpus": str(corpus.location)}, "logging": {"progress_bar": False, "wandb": False}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return replace(config, **base)


@pytest.mark.parametrize("name", ["scgpt_debug.yaml", "genecompass_debug.yaml"])
def test_family_learns_on_the_bundled_corpus(name, demo_corpus, tmp_path):
    config = _quick(
        name,
        demo_corpus,
        trainer={"max_steps": 60, "log_every": 10, "val_every": 60, "checkpoint_every": 60},
        optim={"warmup_steps": 10},
    )
    result = pretrain(config, tmp_path)
    losses = dict(_losses(tmp_path))
    assert losses[60] < losses[10]
    model = FAMILIES[config.model.family].model_class.from_pretrained(result.export)
    assert model.config.vocab_size == len(model.get_input_embeddings().weight)
    (validation,) = [r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r["val_loss"]]
    if config.model.family == "genecompass":  # predicts masked ids: its accuracy beside any constant guess's
        constant = float(validation["val_masked_accuracy_constant"])
        assert 0 < constant < 1 and 0 <= float(validation["val_masked_accuracy"]) <= 1


class _SendSigterm(pl.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_then_resume_gives_the_uninterrupted_losses(demo_corpus, tmp_path):
    """Packed batches, two DataLoader workers, dropout: the hardest case for an exact resume."""
    config = _quick(
        "geneformer_debug.yaml",
        demo_corpus,
        data={"packing": True, "max_tokens": 600, "batch_size": 2, "round_cells": 48, "num_workers": 2},
        trainer={"max_steps": 10, "log_every": 1, "val_every": 100, "checkpoint_every": 100},
        model={"overrides": {"hidden_dropout_prob": 0.1}},
    )
    whole = pretrain(config, tmp_path / "whole")
    stopped = pretrain(config, tmp_path / "stopped", callbacks=[_SendSigterm(at_step=4)])
    assert stopped.interrupted and stopped.stopped_by == "signal" and stopped.steps == 4 and stopped.export is None
    assert (tmp_path / "stopped" / "checkpoints" / "step=4.ckpt").exists()
    resumed = pretrain(config, tmp_path / "stopped", resume="auto")
    assert resumed.steps == 10
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "stopped")
    assert [step for step, _ in got] == list(range(1, 11))  # steps 5-10 continue, nothing repeated
    assert got == expected  # exactly, in fp32 with deterministic settings
    assert len({loss for _, loss in got}) == 10

    # `celltron export` turns the final checkpoint into the same folder the run exported
    assert main(["export", str(resumed.checkpoint), "--out", str(tmp_path / "again")]) == 0
    a = FAMILIES["geneformer"].model_class.from_pretrained(whole.export).eval()
    b = FAMILIES["geneformer"].model_class.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(4, a.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {family: geneformer}\ntokenizer: {scheme: scgpt}\n")
    with pytest.raises(ValueError, match="tokenizer.scheme 'scgpt' does not feed geneformer"):
        load_config(bad)
    bad.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ValueError, match=r"\[optim\].*learning_rate"):
        load_config(bad)
    config = load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml", ["optim.lr=3e-4", "model.overrides.hidden_size=64"])
    assert config.optim.lr == 3e-4 and config.model.overrides == {"hidden_size": 64}
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml", ["lr=3"])


def test_pretrain_without_a_corpus_says_how(tmp_path, capsys):
    assert main(["pretrain", str(CONFIGS / "pretrain" / "geneformer_debug.yaml"), "--out", str(tmp_path)]) == 2
    assert "--corpus" in capsys.readouterr().err


def test_init_from_an_exported_model_continues_where_it_ended(demo_corpus, tmp_path):
    config = _quick(
        "genecompass_debug.yaml",
        demo_corpus,
        trainer={"max_steps": 30, "log_every": 10, "val_every": 100, "checkpoint_every": 100},
    )
    first = pretrain(config, tmp_path / "first")
    again = pretrain(replace(config, trainer={"max_steps": 10, "log_every": 10}), tmp_path / "again", init_from=str(first.export))
    scratch = pretrain(replace(config, trainer={"max_steps": 10, "log_every": 10}), tmp_path / "scratch")
    assert dict(_losses(tmp_path / "again"))[10] < dict(_losses(tmp_path / "scratch"))[10]
    assert again.export is not None and scratch.export is not None


def test_wandb_logs_offline_without_a_key(demo_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = _quick(
        "scgpt_debug.yaml",
        demo_corpus,
        logging={"wandb": True, "name": "offline-test"},
        trainer={"max_steps": 4, "log_every": 2, "val_every": 100, "checkpoint_every": 100},
    )
    pretrain(config, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
