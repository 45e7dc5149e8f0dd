"""Predictive intervals and out-of-distribution flags, shared by the fine-tuning tasks.

Intervals. Several predictions of each output (a deep ensemble: members trained with
different seeds on the same training units; or MC dropout: one model, dropout kept on at
prediction) give a centre (their mean) and a spread (their standard deviation). A spread is
not an interval: ensembles of a few members are over-confident. The interval is centre ±
scale x spread, the scale calibrated on training units alone by split-conformal prediction
over inner cross-validation (`conformal_scale`): the level-quantile (finite-sample corrected)
of |truth − centre| / spread over the inner held-out outputs. Coverage on held-out units is
then close to the level when they resemble the training units; the uncalibrated Gaussian
interval (scale = the normal quantile) is reported beside it.

Out-of-distribution score. A unit's distance to its k nearest training units in a vector space
(an embedding or a prior), calibrated on the training units by leave-one-out: each training
unit's distance to its k nearest other training units. The score reported is the share of
those training scores below the unit's (0.97: farther than 97% of the training units are from
the rest); a unit is flagged when its score is at least the level.

Measured on held-out units (`interval_report`, `error_vs_score`): coverage against the
level, mean width, and whether error rises with the distance (AUROC of "large error", above
the median held-out error, against the distance; Spearman correlation of error and distance).
The distance ranks, not the percentile: beyond the training units' reach every unit's
percentile is 1, and the ties would hide the ordering.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

SPREAD_FLOOR = 1e-6  # relative to the mean spread: outputs every member agrees on still get a width
QUERY_BLOCK = 2048  # rows whose distances to the training units are held at once
ENSEMBLE_SEED_STRIDE = 1000  # ensemble member k trains with seed + k x this (never another seed's own)


def ensemble_summary(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (mean) and spread (standard deviation, ddof 1) over the first axis (members)."""
    members = np.asarray(members, dtype=np.float64)
    if members.shape[0] < 2:
        raise ValueError(f"an interval needs at least 2 members or passes, got {members.shape[0]}")
    return members.mean(0), members.std(0, ddof=1)


def mutual_information(draws: np.ndarray) -> np.ndarray:
    """Per row, how much several predictions of class probabilities (draws, rows, classes: MC
    dropout passes or ensemble members) disagree: the entropy of their mean minus their mean
    entropy (nats; 0 when every draw agrees, up to log(draws) or log(classes)). It is the
    epistemic part of the predictive entropy (BALD), the classification counterpart of a
    regression's spread."""
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim != 3 or draws.shape[0] < 2:
        raise ValueError(f"need (draws >= 2, rows, classes) probabilities, got shape {draws.shape}")

    def entropy(p: np.ndarray) -> np.ndarray:
        return -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=-1)

    return np.maximum(entropy(draws.mean(0)) - entropy(draws).mean(0), 0.0)


@contextmanager
def dropout_sampling(model, seed: int):
    """Within: every dropout layer of `model` samples (train mode) while the rest stays in eval
    mode, and torch's random state is forked and seeded, so passes are reproducible and a
    training run that predicts mid-way continues with the random state it had."""
    import torch
    from torch import nn

    was_training = model.training
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield model
    finally:
        model.train(was_training)


def floored_spread(spread: np.ndarray, reference: float) -> np.ndarray:
    """Spreads floored at SPREAD_FLOOR x `reference` (a mean spread), as calibration and intervals floor them."""
    return np.maximum(spread, SPREAD_FLOOR * max(reference, 1e-12))


def conformal_scale(truth, centre, spread, level: float) -> float:
    """The scale that makes centre ± scale x spread cover `level` of these (inner held-out)
    outputs: the ceil((n + 1) level)-th smallest |truth − centre| / spread (split conformal).
    Outputs with a non-finite value are left out."""
    truth, centre, spread = (np.ravel(np.asarray(a, dtype=np.float64)) for a in (truth, centre, spread))
    finite = np.isfinite(spread)
    reference = float(np.mean(spread[finite])) if finite.any() else 0.0
    scores = np.abs(truth - centre) / floored_spread(spread, reference)
    scores = np.sort(scores[np.isfinite(scores)])
    if not len(scores):
        raise ValueError("no finite inner residuals to calibrate an interval on")
    rank = int(np.ceil((len(scores) + 1) * level)) - 1
    return float(scores[min(rank, len(scores) - 1)])


def gaussian_scale(level: float) -> float:
    """The normal quantile of a central `level` interval (the uncalibrated scale)."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def interval(centre, spread, scale: float, reference_spread: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) = centre ∓ scale x spread (spread floored as in calibration)."""
    centre, spread = np.asarray(centre, dtype=np.float64), np.asarray(spread, dtype=np.float64)
    width = scale * floored_spread(spread, reference_spread if reference_spread is not None else float(np.mean(spread)))
    return centre - width, centre + width


def interval_report(truth, low, high) -> dict:
    """Share of outputs inside their interval, and the interval's mean width."""
    truth, low, high = (np.ravel(np.asarray(a, dtype=np.float64)) for a in (truth, low, high))
    return {"coverage": float(np.mean((truth >= low) & (truth <= high))), "mean_width": float(np.mean(high - low))}


class NearestNeighbourOOD:
    """Distance to the k nearest training units, as a percentile of the training units' own
    leave-one-out distances; see the module docstring. `metric`: euclidean, or tanimoto (1 −
    Tanimoto similarity of bit vectors, e.g. drug fingerprints). `calibration`: the reference
    distances, when the leave-one-out ones would be biased (a space fitted on the training units)."""

    def __init__(self, train_vectors: np.ndarray, neighbours: int = 3, metric: str = "euclidean", calibration=None):
        train = np.asarray(train_vectors, dtype=np.float64)
        if len(train) < 2:
            raise ValueError("an out-of-distribution score needs at least 2 training units")
        if metric not in ("euclidean", "tanimoto"):
            raise ValueError(f"unknown OOD metric {metric!r}; use euclidean or tanimoto")
        self.train, self.metric = train, metric
        self.k = max(1, min(neighbours, len(train) - 1))
        if calibration is not None:  # distances of units held out of inner fits (a space fitted on them flatters them)
            self.train_scores = np.sort(np.asarray(calibration, dtype=np.float64))
            return
        self.train_scores = np.sort(self._nearest(train, leave_one_out=True))

    @classmethod
    def calibrated_on(cls, reference, held, neighbours: int = 3, metric: str = "euclidean") -> NearestNeighbourOOD:
        """Scored against `reference`, calibrated on the distances of `held` units (training
        units kept out of the reference and of whatever fitted the space): split conformal."""
        scorer = cls(reference, neighbours, metric, calibration=np.empty(0))
        scorer.train_scores = np.sort(scorer.distance(held))
        return scorer

    def _distances(self, a: np.ndarray) -> np.ndarray:
        b = self.train
        if self.metric == "tanimoto":
            shared = a @ b.T
            return 1.0 - shared / np.maximum(a.sum(1)[:, None] + b.sum(1)[None, :] - shared, 1)
        squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
        return np.sqrt(np.maximum(squared, 0))

    def _nearest(self, vectors: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
        """Mean distance of each row to its k nearest training units, QUERY_BLOCK rows at a time
        (queries x training units at once would not fit for large sets); `leave_one_out`: the
        rows are the training units, each skipping itself."""
        vectors = np.asarray(vectors, dtype=np.float64)
        out = np.empty(len(vectors))
        for start in range(0, len(vectors), QUERY_BLOCK):
            distances = self._distances(vectors[start : start + QUERY_BLOCK])
            if leave_one_out:
                rows = np.arange(len(distances))
                distances[rows, start + rows] = np.inf
            out[start : start + len(distances)] = np.partition(distances, self.k - 1, axis=1)[:, : self.k].mean(1)
        return out

    def distance(self, vectors: np.ndarray) -> np.ndarray:
        """Mean distance to the k nearest training units."""
        return self._nearest(np.atleast_2d(vectors))

    def score(self, vectors: np.ndarray) -> np.ndarray:
        """Share of the training units' leave-one-out distances below each unit's distance."""
        return np.searchsorted(self.train_scores, self.distance(vectors), side="left") / len(self.train_scores)


def error_vs_score(errors, scores) -> dict:
    """Whether error rises with the OOD score over held-out units: AUROC of the score for
    "large error" (above the median error; for 0/1 errors, an error) and the Spearman
    correlation of error and score."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    errors, scores = np.asarray(errors, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(errors) & np.isfinite(scores)
    errors, scores = errors[keep], scores[keep]
    out = {"n_units": int(len(errors)), "auroc_large_error": float("nan"), "spearman": float("nan")}
    if len(errors) < 4:
        return out
    # 0/1 errors (misclassified or not): large is wrong; otherwise above the median
    threshold = 0.0 if np.isin(errors, (0.0, 1.0)).all() else float(np.median(errors))
    large = errors > threshold
    out["large_error_above"] = threshold
    if 0 < large.sum() < len(large):
        out["auroc_large_error"] = float(roc_auc_score(large, scores))
    if np.ptp(scores) > 0 and np.ptp(errors) > 0:
        out["spearman"] = float(spearmanr(errors, scores).statistic)
    return out


def plot_error_vs_score(png, errors, scores, flagged, title: str, error_label: str, score_label: str) -> None:
    """Held-out units' error against their OOD score (or distance), flagged units marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from celltron.finetune.report import save_figure

    errors, scores, flagged = np.asarray(errors), np.asarray(scores), np.asarray(flagged, dtype=bool)
    figure, axes = plt.subplots(figsize=(4.8, 4))
    axes.scatter(scores[~flagged], errors[~flagged], s=14, label="in distribution")
    axes.scatter(scores[flagged], errors[flagged], s=18, marker="x", color="#c33", label="flagged")
    axes.set_xlabel(score_label)
    axes.set_ylabel(error_label)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, png)
