"""Perturbation evaluation: splits by perturbation, metrics on pseudobulk means, and baselines
that recover what they should (additive on additive data, linear on linear data), on simulated
screens and on the real Papalexi 2021 THP-1 screen."""

import anndata as ad
import numpy as np
import pytest

from celltron.finetune.perturbation.baselines import (
    BASELINES,
    additive_baseline,
    baseline_report,
    choose_baseline,
    inner_folds,
    knockdown_prior_baseline,
    linear_baseline,
    train_mean_baseline,
)
from celltron.finetune.perturbation.evaluate import (
    METRICS,
    PerturbationData,
    evaluate,
    heldout_split,
    leave_one_out_folds,
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
    # no change carries no signal: its delta correlation is 0, not undefined (every predictor is scored)
    assert no_change["pearson_delta"] == 0 and no_change["mse"] > 0


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
    for name in BASELINES:
        assert set(METRICS) <= set(report[name]) and np.isfinite(report[name]["mse"])
    measured = set(data.genes)
    unmeasured = [p for p in split["test"] if p not in measured]
    assert report["linear"]["fell_back_to_train_mean"] == unmeasured
    with pytest.raises(ValueError, match="--control"):
        pseudobulk(adata, "perturbation", "NT", source="papalexi")


def test_notarget_metrics_leave_the_perturbed_gene_out_of_the_de_set_and_the_correlations():
    rng = np.random.default_rng(4)
    control = rng.random(50) * 3
    truth = control + rng.normal(0, 0.5, 50)
    truth[7] = control[7] - 4  # the knocked-down target: the largest change of all
    predicted = truth + rng.normal(0, 0.05, 50)
    predicted[7] = control[7]  # right everywhere except on the target
    de = np.argsort(-np.abs(truth - control))[:20]
    assert de[0] == 7
    de_notarget = np.argsort(-np.abs(truth - control))[1:21]  # the next DE gene takes its place
    result = perturbation_metrics(predicted, truth, control, de, targets=np.array([7]), de_notarget=de_notarget)
    assert result["mse_de20"] > 0.5 and result["pearson_delta_de20"] < 0.9
    assert result["mse_de20_notarget"] < 0.01 and result["pearson_delta_de20_notarget"] > 0.99
    assert result["pearson_delta_notarget"] > result["pearson_delta"]


def test_centroid_delta_gives_the_training_mean_no_credit_and_the_truth_full_credit():
    rng = np.random.default_rng(5)
    shared = rng.normal(0, 1, len(GENES))  # the response every perturbation shares
    data = _screen(lambda p: shared + rng.normal(0, 0.3, len(GENES)), [f"G{i}" for i in range(10)])
    train, test = data.perturbations[:8], data.perturbations[8:]
    mean_only = evaluate(train_mean_baseline(data, train, test), data, test, train)
    perfect = evaluate({p: data.means[p] for p in test}, data, test, train)
    # against control the shared response flatters the training mean; against the centroid it does not
    assert mean_only["pearson_delta"] > 0.8 and mean_only["pearson_delta_centroid"] == 0
    assert perfect["pearson_delta_centroid"] == pytest.approx(1)


def test_knockdown_prior_is_the_training_mean_plus_the_average_own_target_change():
    rng = np.random.default_rng(6)
    drop = {f"G{i}": -2.0 - 0.2 * i for i in range(6)}

    def effect(p):
        shift = rng.normal(0, 0.1, len(GENES))
        shift[int(p[1:])] = drop[p]
        return shift

    data = _screen(effect, list(drop))
    train, test = data.perturbations[:4], data.perturbations[4:]
    prior = knockdown_prior_baseline(data, train, test)
    mean = train_mean_baseline(data, train, test)
    own = np.mean([data.means[p][int(p[1:])] - data.control_mean[int(p[1:])] for p in train])
    for p in test:
        target = int(p[1:])
        assert prior[p][target] == pytest.approx(mean[p][target] + own)
        assert np.array_equal(np.delete(prior[p], target), np.delete(mean[p], target))
    # it wins on the target-dominated metric and is level with the training mean once the target is left out
    with_prior, with_mean = evaluate(prior, data, test, train), evaluate(mean, data, test, train)
    assert with_prior["mse_de20"] < with_mean["mse_de20"]
    assert with_prior["mse_de20_notarget"] == pytest.approx(with_mean["mse_de20_notarget"])


def test_leave_one_out_holds_each_perturbation_out_once_and_never_inside_a_training_combination():
    perturbations = ["A", "B", "C", "D", "A+B", "C+D", "B+C"]
    folds = leave_one_out_folds(perturbations)
    assert sorted(p for f in folds for p in f["test"]) == sorted(perturbations)
    for fold in folds:
        (held,) = fold["test"]
        assert held not in fold["train"]
        if "+" not in held:
            assert all(held not in p.split("+") for p in fold["train"])
    assert {"A", "B"} <= set(next(f for f in folds if f["test"] == ["A+B"])["train"])
    for fold in inner_folds(perturbations, 3, seed=0):
        singles = {p for p in fold["test"] if "+" not in p}
        assert not any(singles & set(p.split("+")) for p in fold["train"])


def test_the_best_baseline_is_chosen_on_training_perturbations_only():
    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(len(GENES), 3))
    W = rng.normal(size=(3, 3))
    targets = [f"G{i}" for i in range(30)]
    data = _screen(lambda p: embedding @ W @ embedding[int(p[1:])], targets)
    split = heldout_split(targets, 0.25, seed=0)
    chosen, scores = choose_baseline(data, split["train"], "pearson_delta_de20_notarget", seed=0)
    assert chosen == "linear" and set(scores) == set(BASELINES)  # a linear screen: the linear model wins
    # whatever the held-out perturbations hold, the choice and its scores stay the same
    for p in split["test"]:
        data.means[p] = data.control_mean + rng.normal(0, 5, len(GENES))
    assert choose_baseline(data, split["train"], "pearson_delta_de20_notarget", seed=0) == (chosen, scores)


def test_responsive_perturbations_change_genes_besides_their_target(tmp_path):
    rng = np.random.default_rng(7)
    genes = [f"G{i}" for i in range(60)]
    base = np.full(60, 5.0)
    effects = {"G0": np.where(np.arange(60) < 20, 1.5, 1.0), "G1": np.ones(60)}  # G0 moves 20 genes; G1 only itself
    effects["G0"][0] = effects["G1"][1] = 0.05  # both knock their target down hard
    labels = ["control"] * 300 + ["G0"] * 200 + ["G1"] * 200
    rates = np.stack([base * (effects[label] if label != "control" else 1.0) for label in labels])
    adata = ad.AnnData(X=rng.poisson(rates).astype(np.float32), obs={"perturbation": labels})
    adata.var_names = genes
    data = pseudobulk(adata, "perturbation", "control")
    assert data.n_significant["G1"] < 3 <= 15 < data.n_significant["G0"]
    assert data.responsive(10) == ["G0"]
    assert 1 not in data.de_genes_notarget["G1"] and len(data.de_genes_notarget["G1"]) == 20


def test_the_linear_model_embeds_unmeasured_targets_from_an_outside_gene_embedding():
    rng = np.random.default_rng(8)
    genes = {f"G{i}": rng.normal(size=3) for i in range(40)} | {f"U{i}": rng.normal(size=3) for i in range(10)}
    readout = np.stack([genes[g] for g in GENES])
    W = rng.normal(size=(3, 3))
    targets = [f"U{i}" for i in range(10)] + [f"G{i}" for i in range(20)]  # U genes are not measured
    data = _screen(lambda p: readout @ W @ genes[p], targets)
    split = heldout_split(targets, 0.3, seed=1)
    _, fell_back = linear_baseline(data, split["train"], split["test"])
    assert set(fell_back) == {p for p in split["test"] if p.startswith("U")}  # no expression-derived embedding
    predicted, fell_back = linear_baseline(data, split["train"], split["test"], rank=3, ridge=1e-6, embedding=genes)
    assert fell_back == [] and evaluate(predicted, data, split["test"])["pearson_delta"] > 0.99
