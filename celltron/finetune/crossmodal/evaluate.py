"""Scores of the cross-modal tasks, as the benchmarks of the field compute them.

Prediction (RNA -> protein, TotalVI's and the NeurIPS 2021 multimodal challenge's): per protein,
Pearson and Spearman correlation across held-out cells of predicted and measured CLR values,
averaged over proteins; also per cell type, and the per-cell Pearson across the panel and the
mean squared error. A constant prediction (the mean profile) has no correlation across cells:
NaN, reported as n/a, never as 0.

Alignment (MultiVI's, GLUE's, scCLIP's): each modality of held-out cells embedded apart, then
FOSCTTM (per cell, the share of the other modality's cells closer than its true partner, both
directions averaged; 0 is perfect, 0.5 chance), recall@k of the true partner, and label transfer
(a kNN classifier on labelled training cells of the source modality predicting held-out cells
from their target modality, as a lab moves labels from an RNA atlas to new ATAC or protein data).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _columns_correlation(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column pair (NaN where either column is constant)."""
    t = truth - truth.mean(0)
    p = predicted - predicted.mean(0)
    denominator = np.sqrt((t**2).sum(0) * (p**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (t * p).sum(0) / denominator
    return np.where(denominator > 1e-12 * max(1.0, float(np.abs(truth).max(initial=0))), out, np.nan)


def per_protein_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """{"pearson", "spearman"}: one value per protein (column), across the cells (rows)."""
    ranks_truth = stats.rankdata(truth, axis=0)
    ranks_predicted = stats.rankdata(predicted, axis=0)
    return {
        "pearson": _columns_correlation(truth, predicted),
        "spearman": _columns_correlation(ranks_truth, ranks_predicted),
    }


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


PREDICTION_METRICS = ("pearson", "spearman", "cell_pearson", "mse")
MIN_TYPE_CELLS = 10  # a cell type's per-protein correlations need this many held-out cells


def prediction_scores(truth: np.ndarray, predicted: np.ndarray, proteins, cell_types: np.ndarray | None = None) -> dict:
    """The prediction metrics of held-out cells (CLR values, cells x proteins): the means, and
    per protein and per cell type (types with at least MIN_TYPE_CELLS held-out cells)."""
    per_protein = per_protein_scores(truth, predicted)
    cell_pearson = _columns_correlation(truth.T, predicted.T)
    out = {
        "pearson": _nanmean(per_protein["pearson"]),
        "spearman": _nanmean(per_protein["spearman"]),
        "cell_pearson": _nanmean(cell_pearson),
        "mse": float(np.mean((truth - predicted) ** 2)),
        "per_protein": {
            str(name): {"pearson": float(p), "spearman": float(s)}
            for name, p, s in zip(proteins, per_protein["pearson"], per_protein["spearman"])
        },
    }
    if cell_types is not None:
        out["per_cell_type"] = {}
        for name in np.unique(cell_types):
            rows = cell_types == name
            if rows.sum() >= MIN_TYPE_CELLS:
                scores = per_protein_scores(truth[rows], predicted[rows])
                out["per_cell_type"][str(name)] = {
                    "pearson": _nanmean(scores["pearson"]),
                    "spearman": _nanmean(scores["spearman"]),
                    "n_cells": int(rows.sum()),
                }
    return out


def _distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Euclidean distances, (len(first), len(second))."""
    squared = (first**2).sum(1)[:, None] + (second**2).sum(1)[None, :] - 2 * first @ second.T
    return np.sqrt(np.maximum(squared, 0))


def foscttm(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per cell, the fraction of samples closer than the true match: row i of `first` and row i
    of `second` are the same cell; the share of the other modality's cells (its partner
    excluded) nearer than the partner, averaged over the two directions."""
    distances = _distances(first, second)
    true = np.diag(distances)
    n = len(true)
    if n < 2:
        return np.full(n, np.nan)
    closer_to_first = (distances < true[:, None]).sum(1)  # row i: cells of `second` nearer to first[i]
    closer_to_second = (distances < true[None, :]).sum(0)  # column j: cells of `first` nearer to second[j]
    return (closer_to_first + closer_to_second) / (2.0 * (n - 1))


def recall_at_k(first: np.ndarray, second: np.ndarray, ks) -> dict[str, float]:
    """Share of cells whose true partner is among the k nearest of the other modality, both
    directions averaged, per k."""
    distances = _distances(first, second)
    true = np.diag(distances)
    rank_forward = (distances < true[:, None]).sum(1)  # partner's rank among the row's candidates
    rank_backward = (distances < true[None, :]).sum(0)
    return {f"recall_at_{k}": float(((rank_forward < k).mean() + (rank_backward < k).mean()) / 2) for k in ks}


def label_transfer(
    reference: np.ndarray, reference_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray, neighbors: int
) -> dict[str, float]:
    """Accuracy and macro-F1 (over the query's labels) of a kNN classifier fitted on the
    reference embeddings, predicting the query's."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(min(neighbors, len(reference))).fit(reference, reference_labels)
    predicted = classifier.predict(query)
    present = np.unique(query_labels)
    return {
        "transfer_accuracy": float(accuracy_score(query_labels, predicted)),
        "transfer_macro_f1": float(f1_score(query_labels, predicted, labels=present, average="macro", zero_division=0)),
    }
