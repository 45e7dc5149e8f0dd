"""Calibrated edge probabilities: the GRN task's uncertainty.

An edge score is a ranking, not a probability, and a truth edge is yes or no, so an interval
around the score means nothing. What a lab can act on is how likely a predicted edge is to be
real. Per fold of the TF x target block split, the reported predictor's scores on the training
block (training TFs x training targets) are mapped to the share of true edges by isotonic
regression (monotone: a higher score never gets a lower probability), and that map gives every
held-out pair a probability. Measured on the held-out blocks: the Brier score beside the
training density's (a constant probability), the expected calibration error over equal-count
bins, and for the top `TOP_K` held-out pairs per fold, the expected number of true edges (the
sum of their probabilities, with a normal-approximation interval at the level) against the
number observed.
"""

from __future__ import annotations

import numpy as np

TOP_K = 100  # held-out pairs per fold whose expected and observed true edges are compared
BINS = 10  # equal-count bins of the expected calibration error
LEVEL = 0.9  # of the interval around the expected number of true edges in the top TOP_K


def fold_calibration(train_scores, train_hits: np.ndarray, test_scores) -> dict:
    """One fold: the isotonic map of the reported predictor's training-block scores onto whether
    each pair is a truth edge, applied to its held-out block's scores."""
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    fitted.fit(np.asarray(train_scores, dtype=np.float64), train_hits.astype(np.float64))
    return {"probability": fitted.predict(np.asarray(test_scores, dtype=np.float64)), "density": float(train_hits.mean())}


def expected_calibration_error(probability: np.ndarray, hit: np.ndarray, bins: int = BINS) -> float:
    """Mean over equal-count bins (ordered by probability) of |mean probability − share true|,
    weighted by the bins' sizes."""
    order = np.argsort(probability, kind="stable")
    parts = [part for part in np.array_split(order, bins) if len(part)]
    return float(sum(len(p) * abs(probability[p].mean() - hit[p].mean()) for p in parts) / len(probability))


def top_k_expectation(probability: np.ndarray, hit: np.ndarray, k: int = TOP_K, level: float = LEVEL) -> dict:
    """The top `k` pairs by probability (ties in their order): the expected number of true edges,
    its interval (normal approximation to the sum of independent Bernoullis, floored at 0), and
    the number observed."""
    from scipy import stats

    top = np.argsort(-probability, kind="stable")[:k]
    p = probability[top]
    expected, spread = float(p.sum()), float(np.sqrt((p * (1 - p)).sum()))
    half = stats.norm.ppf(0.5 + level / 2) * spread
    observed = int(hit[top].sum())
    return {
        "k": int(len(top)),
        "expected": expected,
        "low": max(expected - half, 0.0),
        "high": expected + half,
        "observed": observed,
        "inside": bool(expected - half <= observed <= expected + half),
    }


def calibration_summary(folds: list[dict], reported: str) -> dict:
    """Pooled over folds: Brier score (and the training density's), expected calibration error,
    and per fold the top-k expectation."""
    probability = np.concatenate([f["probability"] for f in folds])
    hit = np.concatenate([f["hit"] for f in folds]).astype(np.float64)
    constant = np.concatenate([np.full(len(f["hit"]), f["density"]) for f in folds])
    top = [top_k_expectation(f["probability"], f["hit"]) for f in folds]
    return {
        "predictor": reported,
        "probability": "isotonic regression of the reported scores on each fold's training block (training TFs x "
        "training targets), applied to its held-out block",
        "brier": float(np.mean((probability - hit) ** 2)),
        "brier_training_density": float(np.mean((constant - hit) ** 2)),
        "expected_calibration_error": expected_calibration_error(probability, hit),
        "mean_probability": float(probability.mean()),
        "share_true": float(hit.mean()),
        "top_k": {"level": LEVEL, "per_fold": top, "inside": int(sum(t["inside"] for t in top)), "folds": len(top)},
    }
