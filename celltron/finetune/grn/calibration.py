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
import pandas as pd

from celltron.finetune.grn.evaluate import anchored_scores, block_edges, is_true_edge

TOP_K = 100  # held-out pairs per fold whose expected and observed true edges are compared
BINS = 10  # equal-count bins of the expected calibration error
LEVEL = 0.9  # of the interval around the expected number of true edges in the top TOP_K


def fold_calibration(fold_runs: dict, reported: str, pick: dict, truth: pd.DataFrame, fold: dict) -> dict:
    """One fold: the isotonic map fitted on the reported predictor's training block, applied to
    its held-out block. `fold_runs[reported]` holds the held-out scores; with an anchored head
    ("model_plain" present) the training block is anchored the same way at the fold's weight."""
    from sklearn.isotonic import IsotonicRegression

    train_tfs, train_targets = fold["train_tfs"], fold["train_targets"]
    if reported == "model" and "model_plain" in fold_runs:
        baseline, plain = (block_edges(fold_runs[n], train_tfs, train_targets) for n in (pick["name"], "model_plain"))
        train = anchored_scores(baseline, plain, pick["weight"])
    else:
        train = block_edges(fold_runs[reported], train_tfs, train_targets)
    test = block_edges(fold_runs[reported], fold["test_tfs"], fold["test_targets"])
    train_hits, test_hits = is_true_edge(train, truth), is_true_edge(test, truth)
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    fitted.fit(train.score.to_numpy(np.float64), train_hits.astype(np.float64))
    probability = fitted.predict(test.score.to_numpy(np.float64))
    return {"probability": probability, "hit": test_hits, "density": float(train_hits.mean())}


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
