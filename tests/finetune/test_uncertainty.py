"""Intervals and OOD scores on simulated tasks with a known answer: conformal calibration on
training units gives the nominal coverage on exchangeable held-out units where the raw ensemble
spread does not, and error rises with the distance to the training set."""

import numpy as np
import pytest

from celltron.finetune.uncertainty import (
    NearestNeighbourOOD,
    conformal_scale,
    dropout_sampling,
    ensemble_summary,
    error_vs_score,
    gaussian_scale,
    interval,
    interval_report,
    mutual_information,
)


def _bootstrap_ridge_members(x_train, y_train, x_new, members: int, rng) -> np.ndarray:
    """A deep ensemble's stand-in: least squares on bootstrap resamples (each member sees other data)."""
    out = []
    for _ in range(members):
        rows = rng.integers(0, len(x_train), len(x_train))
        design = np.c_[x_train[rows], np.ones(len(rows))]
        coef = np.linalg.lstsq(design, y_train[rows], rcond=None)[0]
        out.append(np.c_[x_new, np.ones(len(x_new))] @ coef)
    return np.stack(out)


def _noisy_task(rng, n):
    x = rng.normal(size=(n, 3))
    noise = 0.3 + 0.5 * np.abs(x[:, 0])  # heteroscedastic
    return x, x @ np.array([1.0, -2.0, 0.5]) + noise * rng.normal(size=n)


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_conformal_calibration_on_training_units_gives_the_nominal_coverage(level):
    rng = np.random.default_rng(0)
    x_fit, y_fit = _noisy_task(rng, 300)
    x_cal, y_cal = _noisy_task(rng, 1000)  # inner held-out training units
    x_test, y_test = _noisy_task(rng, 3000)
    cal_members = _bootstrap_ridge_members(x_fit, y_fit, x_cal, 5, np.random.default_rng(1))
    test_members = _bootstrap_ridge_members(x_fit, y_fit, x_test, 5, np.random.default_rng(1))
    centre, spread = ensemble_summary(cal_members)
    scale = conformal_scale(y_cal, centre, spread, level)
    test_centre, test_spread = ensemble_summary(test_members)
    calibrated = interval_report(y_test, *interval(test_centre, test_spread, scale))
    raw = interval_report(y_test, *interval(test_centre, test_spread, gaussian_scale(level)))
    assert abs(calibrated["coverage"] - level) < 0.03
    # the members agree far more than the noise allows: the raw ensemble interval is over-confident
    assert raw["coverage"] < level - 0.3


def test_conformal_scale_is_the_corrected_quantile_and_widths_follow_the_spread():
    truth, centre = np.arange(1.0, 11.0), np.zeros(10)
    # |residual| / spread = 1..10; ceil(11 x 0.9) = 10th smallest
    assert conformal_scale(truth, centre, np.ones(10), 0.9) == 10.0
    assert conformal_scale(truth, centre, np.ones(10), 0.5) == 6.0
    low, high = interval(np.zeros(2), np.array([1.0, 2.0]), 3.0)
    np.testing.assert_allclose(high - low, [6.0, 12.0])
    with pytest.raises(ValueError, match="at least 2"):
        ensemble_summary(np.zeros((1, 4)))


def test_ood_score_rises_with_distance_and_error_rises_with_it():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 4))
    ood = NearestNeighbourOOD(train, neighbours=3)
    near = rng.normal(size=(400, 4))
    shift = np.linspace(0, 6, 400)
    far = rng.normal(size=(400, 4)) + shift[:, None]
    # units like the training ones score like them: about 10% at or above the 0.9 level
    assert abs(np.mean(ood.score(near) >= 0.9) - 0.1) < 0.06
    assert np.mean(ood.score(far[shift > 3]) >= 0.9) > 0.95
    # a model that extrapolates badly: error grows with the shift
    errors = shift * (1 + 0.3 * rng.random(400)) + rng.random(400)
    report = error_vs_score(errors, ood.distance(far))
    assert report["auroc_large_error"] > 0.85 and report["spearman"] > 0.7 and report["n_units"] == 400
    # the percentile saturates beyond the training set's reach (ties at 1), so ranks by distance
    assert error_vs_score(errors, ood.score(far))["auroc_large_error"] < report["auroc_large_error"]
    # a score unrelated to error: AUROC near one half
    unrelated = error_vs_score(rng.random(400), ood.score(near))
    assert abs(unrelated["auroc_large_error"] - 0.5) < 0.1


def test_mutual_information_is_zero_when_draws_agree_and_log2_for_two_opposite_certain_draws():
    agree = np.tile(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), (4, 1, 1))
    np.testing.assert_allclose(mutual_information(agree), 0.0, atol=1e-12)
    opposite = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(mutual_information(opposite), np.log(2))
    # the same mean, but one pair of draws disagrees and the other does not: only the first scores
    mixed = np.array([[[0.9, 0.1], [0.5, 0.5]], [[0.1, 0.9], [0.5, 0.5]]])
    score = mutual_information(mixed)
    assert score[0] > 0.3 and score[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="draws >= 2"):
        mutual_information(agree[:1])


def test_dropout_sampling_turns_on_dropout_alone_reproducibly_and_restores_the_model_and_random_state():
    import torch
    from torch import nn

    model = nn.Sequential(nn.LayerNorm(8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        fixed = model(x)
        torch.manual_seed(5)
        state = torch.random.get_rng_state()
        with dropout_sampling(model, seed=1):
            assert model[1].training and not model[0].training and not model.training
            first = [model(x) for _ in range(2)]
        assert torch.equal(torch.random.get_rng_state(), state)  # training goes on from where it was
        with dropout_sampling(model, seed=1):
            again = [model(x) for _ in range(2)]
    assert not model.training and not model[1].training
    assert not torch.allclose(first[0], fixed) and not torch.allclose(first[0], first[1])  # passes differ
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same seed, the same passes
    model.train()
    with dropout_sampling(model, seed=0):
        pass
    assert model.training and model[0].training  # a model in training returns to training


def _under_predicting_screen(seed: int = 0):
    """60 perturbations of 200 genes, each moving its own 20 genes a lot; the prediction moves
    the same genes half as far, so its errors concentrate on the genes it moves most."""
    from celltron.finetune.perturbation.evaluate import PerturbationData
    from celltron.finetune.perturbation.graph import GraphPrediction

    rng = np.random.default_rng(seed)
    names = [f"G{i}" for i in range(200)]
    control = rng.normal(2.0, 0.5, 200)
    means, predicted, de = {}, {}, {}
    for i in range(60):
        p = f"P{i}"
        genes = rng.choice(200, 20, replace=False)
        change = np.zeros(200)
        change[genes] = rng.normal(0, 2.0, 20)
        means[p] = control + change + rng.normal(0, 0.1, 200)
        predicted[p] = control + 0.5 * change + rng.normal(0, 0.1, 200)
        de[p] = genes[np.argsort(-np.abs(change[genes]))]
    screen = PerturbationData(np.asarray(names), list(means), control, means, de)
    ones = {p: np.ones(200) for p in means}

    def prediction(ps):
        return GraphPrediction(mean={p: predicted[p] for p in ps}, fell_back=[], spread={p: ones[p] for p in ps})

    return screen, prediction


@pytest.mark.parametrize("strata", ["none", "predicted_change"])
def test_a_second_scale_for_the_genes_a_prediction_moves_covers_the_de_genes(strata):
    """Mondrian conformal by predicted change: one scale over every gene leaves the DE genes,
    where the errors are, under-covered; a scale of their own, calibrated on inner folds of the
    training perturbations, brings them to the level without widening the rest."""
    from types import SimpleNamespace

    from celltron.finetune.perturbation.intervals import BASELINE_CENTRE, PerturbationUncertainty

    screen, prediction = _under_predicting_screen()
    section = SimpleNamespace(
        interval_level=0.9, ood_neighbours=3, headline="pearson_delta_de20", intervals="none", interval_strata=strata
    )
    record = PerturbationUncertainty(section, screen, None, "split conformal", BASELINE_CENTRE)
    perturbations = screen.perturbations
    train, test = perturbations[:45], perturbations[45:]
    inner = []
    for k in range(3):
        held = train[k::3]
        inner.append(({"train": [p for p in train if p not in held], "test": held}, prediction(held)))
    record.add_fold(0, {"train": train, "test": test}, prediction(test), inner)
    summary = record.summary()
    assert summary["n_with_interval"] == 15 and 0.85 <= summary["coverage"] <= 0.98
    if strata == "none":
        assert summary["coverage_de_notarget"] < 0.6 and isinstance(summary["scale_per_seed"]["0"][0], float)
    else:
        rest, changed = summary["scale_per_seed"]["0"][0]
        assert changed > 5 * rest
        assert summary["coverage_de_notarget"] >= 0.8 and summary["coverage_predicted_change"] >= 0.8
