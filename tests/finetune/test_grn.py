"""GRN: edge scoring against a truth (AUPRC, its ratio over random, EPR), the co-expression
baselines on a network with known edges, and `celltron grn` on real PBMCs with TRRUST."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from celltron.cli import main
from celltron.finetune.grn.evaluate import candidate_edges, coexpression_scores, evaluate_edges, read_truth
from celltron.finetune.grn.run import bundled_tfs
from tests.conftest import shared_file

TFS, TARGETS = ["T1", "T2", "T3"], [f"G{i}" for i in range(20)]
TRUTH = pd.DataFrame({"tf": ["T1", "T1", "T2", "T3"], "target": ["G0", "G1", "G5", "G9"]})


def _scored(score_of) -> pd.DataFrame:
    edges = candidate_edges(TFS, TARGETS)
    edges["score"] = [score_of(tf, target) for tf, target in zip(edges.tf, edges.target)]
    return edges


def test_a_perfect_ranking_scores_one_and_its_reverse_scores_low():
    truth = set(zip(TRUTH.tf, TRUTH.target))
    perfect = evaluate_edges(_scored(lambda tf, t: float((tf, t) in truth)), TRUTH)
    density = 4 / (3 * 20)
    assert (
        perfect["auprc"] == 1
        and perfect["auprc_ratio"] == pytest.approx(1 / density)
        and perfect["epr"] == pytest.approx(1 / density)
    )
    assert perfect["n_true_edges"] == 4 and perfect["n_scored_edges"] == 60
    reverse = evaluate_edges(_scored(lambda tf, t: -float((tf, t) in truth)), TRUTH)
    assert reverse["epr"] == 0 and reverse["auprc_ratio"] < 1


def test_random_scores_have_a_ratio_near_one():
    rng = np.random.default_rng(0)
    tfs, targets = [f"T{i}" for i in range(30)], [f"G{i}" for i in range(300)]
    truth = pd.DataFrame({"tf": rng.choice(tfs, 400), "target": rng.choice(targets, 400)}).drop_duplicates()
    ratios = []
    for seed in range(5):
        edges = candidate_edges(tfs, targets)
        edges["score"] = np.random.default_rng(seed).random(len(edges))
        ratios.append(evaluate_edges(edges, truth)["auprc_ratio"])
    assert 0.8 < np.mean(ratios) < 1.25


def test_coexpression_finds_targets_driven_by_their_tfs():
    rng = np.random.default_rng(1)
    cells = 400
    tf_levels = rng.normal(size=(cells, 3))
    expression = rng.normal(size=(cells, 20))
    for tf, target in zip(TRUTH.tf, TRUTH.target):
        expression[:, TARGETS.index(target)] += 2 * tf_levels[:, TFS.index(tf)]
    matrix = np.concatenate([tf_levels, expression], axis=1)
    for method in ("pearson", "spearman"):
        edges = coexpression_scores(matrix, TFS + TARGETS, TFS, TARGETS, method)
        assert evaluate_edges(edges, TRUTH)["auprc"] == pytest.approx(1)


def test_truth_tables_read_with_or_without_a_header(tmp_path):
    (tmp_path / "a.tsv").write_text("TF\tTarget\nT1\tG0\nT1\tG0\nT2\tG5\n")
    (tmp_path / "b.tsv").write_text("T1\tG0\tActivation\t123\n")
    assert read_truth(tmp_path / "a.tsv").values.tolist() == [["T1", "G0"], ["T2", "G5"]]
    assert read_truth(tmp_path / "b.tsv").values.tolist() == [["T1", "G0"]]
    with pytest.raises(FileNotFoundError, match="--truth"):
        read_truth(tmp_path / "missing.tsv")


def test_bundled_tf_lists_hold_known_regulators():
    assert {"STAT1", "IRF1", "SPI1", "TP53"} <= set(bundled_tfs("human"))
    assert {"Stat1", "Irf1", "Spi1", "Trp53"} <= set(bundled_tfs("mouse"))


def test_grn_cli_scores_model_edges_beside_the_baselines_on_pbmc(pretrained_geneformer, tmp_path):
    data = shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")
    truth = shared_file("grn/trrust_rawdata.human.tsv")
    code = main(
        [
            "grn",
            "--model",
            str(pretrained_geneformer),
            "--data",
            str(data),
            "--gene-column",
            "gene_symbol_original",
            "--truth",
            str(truth),
            "--out",
            str(tmp_path),
            "--max-cells",
            "150",
            "--top-genes",
            "300",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "embedding"
    assert set(metrics["baselines"]) == {"coexpression_pearson", "coexpression_spearman", "genie3_extra_trees"}
    for result in [metrics["model"], *metrics["baselines"].values()]:
        assert {"auprc", "auprc_ratio", "epr", "n_true_edges", "n_scored_edges"} <= set(result)
        assert result["n_true_edges"] > 20
    # co-expression recovers TRRUST edges far above random on real PBMCs
    assert metrics["baselines"]["coexpression_pearson"]["auprc_ratio"] > 1.5
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    assert list(edges.columns) == ["tf", "target", "score", "method", "group"]
    assert edges.score.is_monotonic_decreasing and set(edges.tf) <= set(bundled_tfs("human"))


def test_tree_baseline_finds_nonlinear_regulation():
    from celltron.finetune.grn.evaluate import tree_scores

    rng = np.random.default_rng(2)
    tf_levels = rng.normal(size=(500, 3))
    expression = rng.normal(size=(500, 20)) * 0.3
    for tf, target in zip(TRUTH.tf, TRUTH.target):
        expression[:, TARGETS.index(target)] += np.abs(tf_levels[:, TFS.index(tf)])  # no linear correlation
    matrix = np.concatenate([tf_levels, expression], axis=1)
    trees = evaluate_edges(tree_scores(matrix, TFS + TARGETS, TFS, TARGETS, n_jobs=1), TRUTH)
    linear = evaluate_edges(coexpression_scores(matrix, TFS + TARGETS, TFS, TARGETS, "pearson"), TRUTH)
    assert trees["auprc"] > 0.9 > linear["auprc"]


def test_attention_method_scores_pairs_the_cells_hold(pretrained_geneformer, tmp_path):
    data = shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")
    code = main(
        [
            "grn",
            "--model",
            str(pretrained_geneformer),
            "--data",
            str(data),
            "--gene-column",
            "gene_symbol_original",
            "--method",
            "attention",
            "--out",
            str(tmp_path),
            "--max-cells",
            "40",
            "--top-genes",
            "200",
        ]
    )
    assert code == 0
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    assert set(edges.method) == {"attention"}
    seen = edges[edges.score >= 0]
    assert len(seen) > 100 and seen.score.max() <= 1  # attention probabilities; unseen pairs rank last at -1
    assert (edges.score[: len(seen)] >= 0).all()


def test_in_silico_deletion_scores_embedding_shifts_and_reports_its_speed(pretrained_geneformer, tmp_path):
    data = shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")
    truth = shared_file("grn/trrust_rawdata.human.tsv")
    code = main(
        [
            "grn",
            "--model",
            str(pretrained_geneformer),
            "--data",
            str(data),
            "--gene-column",
            "gene_symbol_original",
            "--method",
            "in-silico",
            "--truth",
            str(truth),
            "--out",
            str(tmp_path),
            "--max-cells",
            "20",
            "--top-genes",
            "150",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "in-silico" and metrics["cells_x_tfs_per_second"] > 0
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    seen = edges[edges.score >= 0]
    assert len(seen) > 50 and seen.score.max() <= 2  # 1 - cosine


def test_each_deletion_shift_equals_running_the_cell_without_that_tf(pretrained_geneformer):
    """The batched shifts equal, pair by pair, 1 - cosine between a target's embedding in the
    cell and in the cell run again on its own without the TF (positions after it move left)."""
    import torch

    from celltron.finetune.grn.run import _cell_batch, _deletion_shifts
    from celltron.model_zoo.registry import load_pretrained

    model = load_pretrained(pretrained_geneformer).eval()
    ids = np.array([2, 40, 41, 42, 43, 44, 45, 46])
    tf_at, target_at = [2, 5], np.array([1, 3, 5, 7])
    with torch.no_grad():
        hidden = model(**_cell_batch(ids, None, tf_at, model.config.pad_token_id), heads=False).last_hidden_state
        shift, real = _deletion_shifts(hidden, tf_at, target_at)
        for k, p in enumerate(tf_at):
            kept = torch.as_tensor(np.delete(ids, p))[None]
            alone = model(input_ids=kept, attention_mask=torch.ones_like(kept), heads=False).last_hidden_state[0]
            for j, q in enumerate(target_at):
                assert real[k, j] == (q != p)
                if q != p:
                    expected = 1 - torch.cosine_similarity(hidden[0, q], alone[q - int(q > p)], dim=0)
                    assert shift[k, j] == pytest.approx(float(expected), abs=1e-5)


def test_mouse_cells_use_the_mouse_tf_list_and_trrust_mouse(tmp_path):
    data = shared_file("scrna/mouse/dentategyrus_100obs.h5ad")
    truth = shared_file("grn/trrust_rawdata.mouse.tsv")
    assert main(["grn", "--data", str(data), "--truth", str(truth), "--out", str(tmp_path), "--top-genes", "300"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    assert set(edges.tf) <= set(bundled_tfs("mouse")) and edges.tf.str.match(r"^[A-Z][a-z0-9]").all()  # mouse symbols
    assert metrics["baselines"]["coexpression_pearson"]["n_true_edges"] > 20
