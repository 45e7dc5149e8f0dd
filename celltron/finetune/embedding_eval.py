"""Zero-shot evaluation of cell embeddings stored in an .h5ad (`obsm[key]`), beside the baseline
every user can compute from the same file: PCA of log-normalised expression.

Both are scored the same way: kNN classification of a label column (accuracy and macro-F1 by
stratified k-fold cross-validation, scikit-learn; `paired`: model − PCA per fold, with an
interval) and, with a batch column, the batch-integration metrics of `scib-metrics` (silhouette
label / batch, cLISI / iLISI, kBET per label, graph connectivity). Neighbour counts follow scib-metrics' own Benchmarker: 90 for LISI, 50 for kBET.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.errors import ConfigError, InputError
from celltron.finetune.report import paired_difference, results_table, save_figure, verdict, verdict_line, write_metrics
from celltron.inputs import MissingInputError, read_h5ad
from celltron.preprocessing import pca_baseline

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
BATCH_METRICS = ("silhouette_label", "clisi", "silhouette_batch", "ilisi", "kbet", "graph_connectivity")
LISI_NEIGHBORS, KBET_NEIGHBORS = 90, 50
BASELINE = "pca_knn"
EXACT_NEIGHBORS_MAX = 50_000  # exact kNN below (deterministic, fast); pynndescent's approximate search above


@dataclass
class EmbeddingData:
    """The cells of an .h5ad to evaluate.

    Attributes:
        path: the file read.
        embedding: (cells, dims) float32, from `obsm[key]`.
        labels: (cells,) label of each cell, as strings.
        batches: (cells,) batch of each cell, as strings, or None.
        counts: (cells, genes) raw counts, CSR (the baseline's input).
    """

    path: Path
    embedding: np.ndarray
    labels: np.ndarray
    batches: np.ndarray | None
    counts: sp.csr_matrix

    def subset(self, cells: np.ndarray) -> EmbeddingData:
        batches = None if self.batches is None else self.batches[cells]
        return EmbeddingData(self.path, self.embedding[cells], self.labels[cells], batches, self.counts[cells])


def require_eval_extra(*modules: str) -> None:
    """Fail before any work when the `eval` extra (scib-metrics, umap-learn) is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"evaluate-embedding needs {missing} for batch metrics and UMAP plots: pip install 'celltron[eval]'")


def _available_layers(adata) -> list[str]:
    return ["X"] + (["raw"] if adata.raw is not None else []) + list(adata.layers.keys())


def _counts(adata, path: Path, layer: str) -> sp.csr_matrix:
    """The matrix of `layer` ('X', 'raw' or a layer name) as float32 CSR."""
    if layer == "X":
        matrix = adata.X
    elif layer == "raw" and adata.raw is not None:
        matrix = adata.raw.X
    elif layer in adata.layers:
        matrix = adata.layers[layer]
    else:
        raise InputError(f"{path}: no layer {layer!r}; it has {_available_layers(adata)}. Pass --layer with one of them")
    if matrix is None:
        raise InputError(f"{path}: X is empty; pass --layer with the layer of raw counts (it has {_available_layers(adata)})")
    return sp.csr_matrix(matrix, dtype=np.float32)


def require_raw_counts(counts: sp.csr_matrix, path: Path, layer: str, available: list[str]) -> None:
    """Refuse a matrix that is not raw counts: the baseline's normalisation would be wrong on it.

    Args:
        counts: the matrix read from `layer`.
        available: the file's layers, named in the message.
    """
    values = counts.data
    problem = (
        "NaN or infinite values"
        if not np.isfinite(values).all()
        else "negative values (scaled or centred data?)"
        if (values < 0).any()
        else "non-integer values (normalised or log-transformed data?)"
        if (values != np.round(values)).any()
        else None
    )
    if problem:
        raise InputError(
            f"{path}: --layer {layer} is not raw counts: it holds {problem}. The PCA baseline normalises raw counts "
            f"(normalize_total 1e4 + log1p); pass --layer with the layer of raw UMI/read counts (this file has: {available})"
        )


def _column(adata, path: Path, key: str, flag: str) -> np.ndarray:
    """An obs column as strings (missing values as None)."""
    if key not in adata.obs.columns:
        raise InputError(f"{path}: obs has no column {key!r}; it has {list(adata.obs.columns)}. Pass {flag} with one of them")
    return np.array([None if pd.isna(v) else str(v) for v in adata.obs[key].astype(object)], dtype=object)


def read_embedding_data(path, key: str, label_key: str, batch_key: str | None = None, layer: str = "X") -> EmbeddingData:
    """Read the embedding, labels, batches and raw counts of an .h5ad, naming what is missing and the fix.

    Args:
        key: `obsm` entry holding the embedding (e.g. X_celltron).
        label_key: obs column of cell labels (e.g. cell_type).
        batch_key: obs column of batches, for the batch-integration metrics.
        layer: raw counts for the baseline: X, raw, or a layer name.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"--data {path}: no such file")
    adata = read_h5ad(path)
    if key not in adata.obsm:
        raise InputError(
            f"{path}: obsm has no {key!r}; it has {list(adata.obsm.keys())}. Pass --key with one of them, "
            "or store the model's cell embeddings there first (adata.obsm[KEY] = embeddings)"
        )
    embedding = np.asarray(adata.obsm[key].toarray() if sp.issparse(adata.obsm[key]) else adata.obsm[key], dtype=np.float32)
    if embedding.ndim != 2:
        raise InputError(f"{path}: obsm[{key!r}] must be a (cells, dims) matrix; it has shape {embedding.shape}")
    labels = _column(adata, path, label_key, "--label-key")
    batches = _column(adata, path, batch_key, "--batch-key") if batch_key else None
    counts = _counts(adata, path, layer)
    require_raw_counts(counts, path, layer, _available_layers(adata))
    return EmbeddingData(path, embedding, labels, batches, counts)


def usable_cells(data: EmbeddingData, folds: int) -> np.ndarray:
    """Cells with a finite embedding (`celltron embed` writes NaN for cells without a known gene),
    a label and a batch, whose label has at least `folds` cells: stratified k-fold needs every label
    in every fold. Returns their indices; the rest are logged."""
    keep = np.isfinite(data.embedding).all(axis=1) & pd.notna(data.labels)
    if data.batches is not None:
        keep &= pd.notna(data.batches)
    sizes = pd.Series(data.labels[keep]).value_counts()
    small = sizes.index[sizes < folds].tolist()
    keep &= ~np.isin(data.labels, small)
    if (~keep).any():
        log.warning(
            "%s: %d cells left out (NaN embedding, no label or batch, or labels with fewer than %d cells: %s)",
            data.path,
            (~keep).sum(),
            folds,
            small,
        )
    if len(np.unique(data.labels[keep])) < 2:
        raise InputError(
            f"{data.path}: fewer than two labels with at least {folds} cells each; check --label-key or lower --folds"
        )
    return np.flatnonzero(keep)


def knn_scores(embedding: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, neighbors: int = 15) -> dict:
    """kNN classification by stratified k-fold cross-validation: accuracy and macro-F1, mean over
    folds, their spread ("std") and per-fold values.

    Args:
        embedding: (cells, dims), compared by Euclidean distance as it is.
        labels: (cells,) every label with at least `folds` cells.
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    per_fold = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(embedding, labels):
        classifier = KNeighborsClassifier(min(neighbors, len(train))).fit(embedding[train], labels[train])
        predicted = classifier.predict(embedding[test])
        per_fold.append(
            {
                "accuracy": float(accuracy_score(labels[test], predicted)),
                "macro_f1": float(f1_score(labels[test], predicted, average="macro", zero_division=0)),
            }
        )
    out = {m: float(np.mean([f[m] for f in per_fold])) for m in CLASSIFICATION_METRICS}
    out["std"] = {m: float(np.std([f[m] for f in per_fold])) for m in CLASSIFICATION_METRICS}
    out["per_fold"] = per_fold
    return out


def neighbor_graph(embedding: np.ndarray, n_neighbors: int, seed: int = 0):
    """scib-metrics' NeighborsResults (self included) for `n_neighbors`: exact up to
    EXACT_NEIGHBORS_MAX cells, scib-metrics' pynndescent helper above."""
    from scib_metrics.nearest_neighbors import NeighborsResults, pynndescent
    from sklearn.neighbors import NearestNeighbors

    n_neighbors = min(n_neighbors, len(embedding) - 1)
    if len(embedding) > EXACT_NEIGHBORS_MAX:
        return pynndescent(embedding, n_neighbors, random_state=seed)
    distances, indices = NearestNeighbors(n_neighbors=n_neighbors).fit(embedding).kneighbors(embedding)
    return NeighborsResults(indices=indices, distances=distances)


def check_batch_metrics(metrics) -> tuple[str, ...]:
    unknown = sorted(set(metrics) - set(BATCH_METRICS))
    if unknown:
        raise ConfigError(f"--batch-metrics: unknown {unknown}; available: {list(BATCH_METRICS)}")
    return tuple(metrics)


def batch_scores(
    embedding: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    neighbors: int = 15,
    seed: int = 0,
    metrics: tuple[str, ...] = BATCH_METRICS,
) -> dict:
    """scib-metrics' bio-conservation (silhouette_label, clisi) and batch-correction (silhouette_batch,
    ilisi, kbet, graph_connectivity) metrics; all in [0, 1], higher is better.

    Args:
        neighbors: the kNN graph for graph connectivity (LISI and kBET use scib-metrics' own counts).
        metrics: which to compute (kbet is the slow one: its diffusion step compiles pynndescent first).
    """
    import scib_metrics

    graph = neighbor_graph(embedding, max(LISI_NEIGHBORS, KBET_NEIGHBORS, neighbors), seed)

    def at(n: int):  # one search, subset per metric (as scib-metrics' Benchmarker does)
        return graph.subset_neighbors(min(n, graph.n_neighbors))

    compute = {
        "silhouette_label": lambda: scib_metrics.silhouette_label(embedding, labels),
        "clisi": lambda: scib_metrics.clisi_knn(at(LISI_NEIGHBORS), labels),
        "silhouette_batch": lambda: scib_metrics.silhouette_batch(embedding, labels, batches),
        "ilisi": lambda: scib_metrics.ilisi_knn(at(LISI_NEIGHBORS), batches),
        "kbet": lambda: scib_metrics.kbet_per_label(at(KBET_NEIGHBORS), batches, labels),
        "graph_connectivity": lambda: scib_metrics.graph_connectivity(at(neighbors), labels),
    }
    return {name: float(compute[name]()) for name in check_batch_metrics(metrics)}


def score_embedding(
    embedding: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    neighbors: int = 15,
    batch_metrics: tuple[str, ...] = BATCH_METRICS,
) -> dict:
    """kNN classification metrics and, given batches, the batch-integration metrics of one embedding."""
    scores = knn_scores(embedding, labels, folds, seed, neighbors)
    if batches is not None:
        scores.update(batch_scores(embedding, labels.astype(str), batches.astype(str), neighbors, seed, batch_metrics))
    return scores


def evaluate_embedding(
    data,
    key: str,
    label_key: str,
    batch_key: str | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    neighbors: int = 15,
    layer: str = "X",
    max_cells: int | None = None,
    batch_metrics: tuple[str, ...] = BATCH_METRICS,
    return_embeddings: bool = False,
):
    """Score `obsm[key]` of an .h5ad beside the PCA baseline of the same file's expression.

    Args:
        data: the .h5ad path.
        key: obsm entry of the embedding; label_key / batch_key: obs columns.
        folds, seed: the stratified k-fold split (the same folds for the model and the baseline).
        neighbors: k of the kNN classifier and of the graph-connectivity graph.
        layer: raw counts for the baseline: X, raw, or a layer name.
        max_cells: evaluate a seeded sample of this many cells (silhouettes are quadratic in cells).
        batch_metrics: the scib-metrics metrics computed when batch_key is given (default: all).
        return_embeddings: also return {"model": ..., "pca": ...} and the labels, for plotting.

    Returns:
        {"model": {...}, "baselines": {"pca_knn": {...}}, "split": {...}} (and the embeddings and labels).
    """
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if batch_key:
        require_eval_extra("scib_metrics")
        batch_metrics = check_batch_metrics(batch_metrics)
    full = read_embedding_data(data, key, label_key, batch_key, layer)
    sample = np.arange(len(full.labels))
    if max_cells is not None and len(sample) > max_cells:  # sample first, so the label-size rule holds in the sample
        sample = np.sort(np.random.default_rng(seed).choice(sample, max_cells, replace=False))
    sampled = full.subset(sample)
    cells = usable_cells(sampled, folds)
    subset = sampled.subset(cells)
    embeddings = {"model": subset.embedding, "pca": pca_baseline(subset.counts, seed=seed)}
    model, pca = (
        score_embedding(e, subset.labels, subset.batches, folds, seed, neighbors, batch_metrics) for e in embeddings.values()
    )
    majority = pd.Series(subset.labels).value_counts(normalize=True).iloc[0]
    metrics = {
        "model": model,
        "baselines": {BASELINE: pca},
        "paired": paired_per_fold(model, pca),
        "split": {
            "folds": folds,
            "seed": seed,
            "n_cells": len(cells),
            "n_cells_in_file": len(full.labels),
            "n_labels": int(len(np.unique(subset.labels))),
            "majority_label_fraction": float(majority),
            "neighbors": neighbors,
            "embedding_key": key,
            "embedding_dims": int(subset.embedding.shape[1]),
            "pca_components": int(embeddings["pca"].shape[1]),
            "label_key": label_key,
            "batch_key": batch_key,
        },
    }
    return (metrics, embeddings, subset.labels) if return_embeddings else metrics


def paired_per_fold(model: dict, baseline: dict) -> dict:
    """{METRIC: model − baseline per fold, with its interval and verdict} for the kNN
    classification metrics; both were scored on the same folds, so fold i pairs with fold i."""

    def by_fold(scores: dict, metric: str) -> dict[int, float]:
        return {fold: values[metric] for fold, values in enumerate(scores["per_fold"])}

    paired = {}
    for metric in CLASSIFICATION_METRICS:
        difference = paired_difference(by_fold(model, metric), by_fold(baseline, metric))
        paired[metric] = {**difference, "baseline": BASELINE, "unit": "folds", "verdict": verdict(difference)}
    return paired


def plot_umaps(embeddings: dict[str, np.ndarray], labels: np.ndarray, png: Path, neighbors: int = 15, seed: int = 0) -> Path:
    """One UMAP panel per embedding (umap-learn), cells coloured by label; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    names = sorted(np.unique(labels))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    figure, axes = plt.subplots(1, len(embeddings), figsize=(5.5 * len(embeddings) + 2, 5), squeeze=False)
    for axis, (title, embedding) in zip(axes[0], embeddings.items()):
        with warnings.catch_warnings():  # umap-learn's notices about seeds and spectral initialisation
            warnings.simplefilter("ignore")
            xy = umap.UMAP(n_neighbors=min(neighbors, len(embedding) - 1), random_state=seed, n_jobs=1).fit_transform(embedding)
        for i, name in enumerate(names):
            mask = labels == name
            axis.scatter(xy[mask, 0], xy[mask, 1], s=3, color=colours(i % colours.N), label=name, rasterized=True)
        axis.set_title(title)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][-1].legend(markerscale=4, fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
    figure.tight_layout()
    save_figure(figure, png)
    return png


def run_embedding_evaluation(
    data, key: str, label_key: str, out, batch_key: str | None = None, *, umap: bool = True, **options
) -> dict:
    """`celltron evaluate-embedding`: evaluate, write OUT/metrics.json (and OUT/umap.png), print
    the tables; returns the metrics (see evaluate_embedding for the other arguments)."""
    if umap:
        require_eval_extra("umap")
    metrics, embeddings, labels = evaluate_embedding(data, key, label_key, batch_key, return_embeddings=True, **options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    split = metrics["split"]
    if umap:
        panels = {
            f"embedding obsm[{key!r}]": embeddings["model"],
            f"baseline: PCA ({split['pca_components']} components)": embeddings["pca"],
        }
        plot_umaps(panels, labels, out / "umap.png", split["neighbors"], split["seed"])
    print(
        f"kNN classification of {label_key!r} ({split['folds']}-fold, k={split['neighbors']}, {split['n_cells']} cells; "
        f"always guessing the most frequent label: accuracy {split['majority_label_fraction']:.3f})"
    )
    print(results_table(metrics, CLASSIFICATION_METRICS))
    for metric, difference in metrics["paired"].items():
        print(verdict_line(metric, BASELINE, difference, "folds", chosen_on=None))
    if batch_key:
        print(f"batch integration over {batch_key!r} (scib-metrics; higher is better)")
        print(
            results_table(
                metrics,
                tuple(m for m in BATCH_METRICS if m in metrics["model"]),
                {"note": "each batch metric is one value over all cells (no spread)"},
            )
        )
    return metrics
