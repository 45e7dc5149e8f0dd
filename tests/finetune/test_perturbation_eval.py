"""Perturbation evaluation: splits by perturbation, metrics on pseudobulk means, and baselines
that recover what they should (additive on additive data, linear on linear data), on simulated
screens and on the real Papalexi 2021 THP-1 screen."""

import anndata as ad
import numpy as np
import pytest

from celltron.finetune.perturbation.baselines import additive_baseline, baseline_report, linear_baseline
from celltron.finetune.perturbation.evaluate import (
    METRICS,
    PerturbationData,
    evaluate,
    heldout_split,
    perturbation_metrics,
    pseudobulk,
    simulation_split,
)
from tests.conftest import shared_file

GENES = np.array([f"G{i}" for i in range(40)])


def _screen(shift_of, perturbations) -> PerturbationData:
    rng = np.random.default_rng(0)
    control = rng.random(len(GENES)) * 3
    means = {p: control + shift_of(p) for p in perturbations}
    de = {p: np.argsort(-np.abs(means[p] - control))[:20] for p in perturbations}
    return PerturbationData(GENES, sorted(perturbations), control, means, de)


def test_metrics_of_a_perfect_and_of_a_no_change_prediction():
    rng = np.random.default_rng(1)
    control, truth = rng.random(50), rng.random(50)
    de = np.arange(20)
    perfect = perturbation_metrics(truth, truth, control, de)
    assert perfect["mse"] == 0 and perfect["pearson_delta"] == pytest.approx(1) and perfect["direction_de20"] == 1
    no_change = perturbation_metrics(control, truth, control, de)
    assert np.isnan(no_change["pearson_delta"]) and no_change["mse"] > 0


def test_additive_baseline_is_exact_on_additive_combinations():
    rng = np.random.default_rng(2)
    singles = [f"G{i}" for i in range(8)]
    shift = {g: rng.normal(size=len(GENES)) for g in singles}
    combos = ["G0+G1", "G2+G3", "G4+G7"]
    data = _screen(lambda p: sum(shift[g] for g in p.split("+")), singles + combos)
    predicted = additive_baseline(data, singles, combos)
    result = evaluate(predicted, data, combos)
    assert result["mse"] < 1e-20 and result["pearson_delta"] == pytest.approx(1)
    # with an interaction term the additive baseline is no longer exact
    data = _screen(lambda p: sum(shift[g] for g in p.split("+")) + (0.5 if "+" in p else 0), singles + combos)
    assert evaluate(additive_baseline(data, singles, combos), data, combos)["mse"] > 0.2


def test_linear_baseline_recovers_unseen_perturbations_of_a_linear_screen():
    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(len(GENES), 3))
    W = rng.normal(size=(3, 3))
    targets = [f"G{i}" for i in range(30)]
    effect = lambda p: embedding @ W @ embedding[int(p[1:])] if p in targets else np.zeros(len(GENES))  # noqa: E731
    data = _screen(effect, targets + ["OUTSIDE"])
    split = heldout_split(targets, 0.25, seed=0)
    predicted, fell_back = linear_baseline(data, split["train"], split["test"] + ["OUTSIDE"], rank=3, ridge=1e-6)
    assert fell_back == ["OUTSIDE"]  # no measured target gene: training mean
    assert evaluate(predicted, data, split["test"])["pearson_delta"] > 0.99


def test_simulation_split_groups_combinations_by_seen_genes():
    singles = [f"S{i}" for i in range(20)]
    combos = [f"S{i}+S{j}" for i in range(0, 20, 2) for j in range(1, 20, 4)]
    split = simulation_split(singles + combos, 0.3, seed=7)
    assert split == simulation_split(singles + combos, 0.3, seed=7)
    train_singles = {p for p in split["train"] if "+" not in p}
    assert not train_singles & set(split["unseen_single"])
    for seen in (0, 1, 2):
        for combo in split[f"combo_seen{seen}"]:
            assert sum(g in train_singles for g in combo.split("+")) == seen
    assert set(split["train"]).isdisjoint(split["test"])
    assert sorted(split["train"] + split["test"]) == sorted(singles + combos)


def test_baselines_on_the_papalexi_screen():
    adata = ad.read_h5ad(shared_file("perturbation/papalexi2021_thp1_lowmoi_sceptredata.h5ad"))
    data = pseudobulk(adata, "perturbation", "control", source="papalexi")
    assert len(data.perturbations) == 25 and data.control_mean.shape == (299,)
    split = heldout_split(data.perturbations, 0.3, seed=0)
    report = baseline_report(data, split)
    for name in ("control_mean", "train_mean", "additive", "linear"):
        assert set(METRICS) <= set(report[name]) and np.isfinite(report[name]["mse"])
    measured = set(data.genes)
    unmeasured = [p for p in split["test"] if p not in measured]
    assert report["linear"]["fell_back_to_train_mean"] == unmeasured
    with pytest.raises(ValueError, match="--control"):
        pseudobulk(adata, "perturbation", "NT", source="papalexi")
