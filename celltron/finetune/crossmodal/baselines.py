"""The simple baselines every cross-modal result stands beside.

RNA -> protein: the training cells' mean protein profile; kNN regression and ridge regression on
RNA PCA, their k and alpha chosen by inner cross-validation over the training cells. Alignment:
CCA between the two modalities' views (RNA PCA, protein PCA or chromatin LSI) fitted on training
pairs, each held-out cell then embedded from one modality alone (Seurat's CCA idea for paired
data). CCA is solved in closed form here (regularised whitening and one SVD): exact and
deterministic, where scikit-learn's CCA iterates NIPALS per component.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.model_selection import KFold

from celltron.finetune.crossmodal.evaluate import per_protein_scores
from celltron.finetune.report import choose_best

Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (features, targets, train rows) -> all rows


def mean_profile(features: np.ndarray, targets: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Every cell gets the training cells' mean profile."""
    return np.broadcast_to(targets[train].mean(0), (len(features), targets.shape[1])).copy()


def knn_regression(k: int) -> Predictor:
    def predict(features, targets, train):
        from sklearn.neighbors import KNeighborsRegressor

        model = KNeighborsRegressor(min(k, len(train)), weights="distance").fit(features[train], targets[train])
        return model.predict(features)

    return predict


def ridge_regression(alpha: float) -> Predictor:
    def predict(features, targets, train):
        from sklearn.linear_model import Ridge

        return Ridge(alpha=alpha).fit(features[train], targets[train]).predict(features)

    return predict


def inner_score(predictor: Predictor, features, targets, train: np.ndarray, folds: int, seed: int) -> float:
    """Mean over inner folds of the training cells of the per-protein Pearson (the headline)."""
    scores = []
    for fit, held in KFold(folds, shuffle=True, random_state=seed).split(train):
        predicted = predictor(features, targets, train[fit])[train[held]]
        pearson = per_protein_scores(targets[train[held]], predicted)["pearson"]
        finite = pearson[np.isfinite(pearson)]
        scores.append(float(finite.mean()) if len(finite) else float("nan"))
    finite = [s for s in scores if np.isfinite(s)]
    return float(np.mean(finite)) if finite else float("nan")


def tuned(kind: str, grid, features, targets, train, folds: int, seed: int) -> tuple[Predictor, dict]:
    """The predictor of `kind` (knn: k, ridge: alpha) whose setting scores best by inner CV on
    the training cells (ties: the first listed); returns it and {"chosen", "scores"}."""
    make = {"knn": knn_regression, "ridge": ridge_regression}[kind]
    scores = {str(value): inner_score(make(value), features, targets, train, folds, seed) for value in grid}
    chosen = choose_best(scores)
    value = type(grid[0])(float(chosen)) if kind == "ridge" else int(chosen)
    return make(value), {"chosen": value, "scores": scores}


def cca(first: np.ndarray, second: np.ndarray, train: np.ndarray, components: int, ridge: float = 1e-3):
    """Canonical directions of two views fitted on the `train` rows; returns both views of every
    row projected onto the first `components` canonical pairs (unit variance on training rows)
    and the canonical correlations.

    Regularised CCA: each view's covariance gets `ridge` times its mean variance on the
    diagonal, then the whitened cross-covariance's SVD gives the directions."""
    x, y = first[train], second[train]
    x_mean, y_mean = x.mean(0), y.mean(0)
    x, y = x - x_mean, y - y_mean
    n = len(train) - 1
    whiten_x = _inverse_sqrt(x.T @ x / n, ridge)
    whiten_y = _inverse_sqrt(y.T @ y / n, ridge)
    u, correlations, vt = np.linalg.svd(whiten_x @ (x.T @ y / n) @ whiten_y)
    k = min(components, len(correlations))
    to_x, to_y = whiten_x @ u[:, :k], whiten_y @ vt.T[:, :k]
    return (first - x_mean) @ to_x, (second - y_mean) @ to_y, correlations[:k]


def _inverse_sqrt(covariance: np.ndarray, ridge: float) -> np.ndarray:
    regularised = covariance + ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    values, vectors = np.linalg.eigh(regularised)
    return vectors @ np.diag(1.0 / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: each embedding compared by direction, as cosine distance."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
