"""The README's main job: pretraining the debug Geneformer on the bundled corpus learns
something (masked-gene accuracy beats always answering the most frequent gene), and leaves an
exported model that gives the trained model's outputs."""

import csv

import torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM

import celltron  # noqa: F401
from celltron.model_zoo.geneformer import GeneformerConfig, GeneformerForMaskedLM
from celltron.pretrain.demo import run_demo
from celltron.training.checkpoints import model_state_from_checkpoint
from tests.pretrain.conftest import CONFIGS


def test_demo_pretrains_exports_and_beats_the_baseline(tmp_path, capsys):
    scores = run_demo(tmp_path, CONFIGS / "pretrain" / "geneformer_debug.yaml", progress=False)
    printed = capsys.readouterr().out
    result = scores["result"]
    assert result.steps == 400 and not result.interrupted
    assert scores["accuracy"] > 2 * scores["baseline_accuracy"], scores
    for shown in ("metrics.csv", "loss.png", "export", "masked-gene accuracy"):
        assert shown in printed

    rows = [r for r in csv.DictReader((result.out / "metrics.csv").open()) if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(10, 401, 10))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 0.5
    assert all(float(r["tokens_per_s"]) > 0 and float(r["cells_per_s"]) > 0 for r in rows)
    assert result.loss_curve.stat().st_size > 1000

    exported = AutoModelForMaskedLM.from_pretrained(result.export).eval()
    assert isinstance(exported, BertForMaskedLM)
    trained = GeneformerForMaskedLM(GeneformerConfig.from_pretrained(result.out / "model")).eval()
    trained.load_state_dict(model_state_from_checkpoint(result.checkpoint))
    ids = torch.randint(4, exported.config.vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
