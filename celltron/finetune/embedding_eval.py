"""Zero-shot evaluation of cell embeddings stored in an .h5ad (`obsm[key]`), beside the baseline
every user can compute from the same file: PCA of log-normalised expression.

Both are scored the same way: kNN classification of a label column (accuracy and macro-F1 by
stratified k-fold cross-validation, scikit-learn; `paired`: model − PCA per fold, with an
interval) and, with a batch column, the batch-integration metrics of `scib-metrics` (silhouette
label / batch, cLISI / iLISI, kBET per label, graph connectivity). Neighbour counts follow scib-metrics' own Benchmarker: 90 for LISI, 50 for kBET.

Several embeddings of the same cells (variants: layers, pooling, tokens per cell, each in its own
obsm key) are one model with a choice to make. Each outer fold then chooses its variant by an
inner cross-validation over that fold's training cells only (the held-out cells are never
passed to the choice), and the model's score in that fold is the chosen variant's; every variant
is also scored on its own, paired with PCA on the same folds.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.errors import ConfigError, InputError
from celltron.finetune.report import (
    choose_best,
    paired_difference,
    results_table,
    save_figure,
    verdict,
    verdict_line,
    write_metrics,
)
from celltron.inputs import MissingInputError, read_h5ad
from celltron.preprocessing import pca_baseline

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
BATCH_METRICS = ("silhouette_label", "clisi", "silhouette_batch", "ilisi", "kbet", "graph_connectivity")
LISI_NEIGHBORS, KBET_NEIGHBORS = 90, 50
BASELINE = "pca_knn"
EXACT_NEIGHBORS_MAX = 50_000  # exact kNN below (deterministic, fast); pynndescent's approximate search above
INNER_FOLDS = 3  # the variant choice's folds inside each outer fold's training cells


@dataclass
class EmbeddingData:
    """The cells of an .h5ad to evaluate.

    Attributes:
        path: the file read.
        variants: {obsm key: (cells, dims) float32 embedding}, in the order given.
        labels: (cells,) label of each cell, as strings.
        batches: (cells,) batch of each cell, as strings, or None.
        counts: (cells, genes) raw counts, CSR (the baseline's input).
    """

    path: Path
    variants: dict[str, np.ndarray]
    labels: np.ndarray
    batches: np.ndarray | None
    counts: sp.csr_matrix

    @property
    def embedding(self) -> np.ndarray:
        """The first variant's embedding (the only one, usually)."""
        return next(iter(self.variants.values()))

    def subset(self, cells: np.ndarray) -> EmbeddingData:
        batches = None if self.batches is None else self.batches[cells]
        variants = {key: embedding[cells] for key, embedding in self.variants.items()}
        return EmbeddingData(self.path, variants, self.labels[cells], batches, self.counts[cells])


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


def as_keys(key: str | Sequence[str]) -> tuple[str, ...]:
    """One obsm key, or several (variants of one model's embedding), as a tuple without repeats."""
    keys = (key,) if isinstance(key, str) else tuple(key)
    if not keys:
        raise ConfigError("--key: name at least one obsm entry")
    if len(set(keys)) < len(keys):
        raise ConfigError(f"--key {' '.join(keys)}: a key is named twice")
    return keys


def _obsm_embedding(adata, path: Path, key: str) -> np.ndarray:
    if key not in adata.obsm:
        raise InputError(
            f"{path}: obsm has no {key!r}; it has {list(adata.obsm.keys())}. Pass --key with one of them, "
            "or store the model's cell embeddings there first (adata.obsm[KEY] = embeddings)"
        )
    embedding = np.asarray(adata.obsm[key].toarray() if sp.issparse(adata.obsm[key]) else adata.obsm[key], dtype=np.float32)
    if embedding.ndim != 2:
        raise InputError(f"{path}: obsm[{key!r}] must be a (cells, dims) matrix; it has shape {embedding.shape}")
    return embedding


def read_embedding_data(
    path, key: str | Sequence[str], label_key: str, batch_key: str | None = None, layer: str = "X"
) -> EmbeddingData:
    """Read the embedding(s), labels, batches and raw counts of an .h5ad, naming what is missing and the fix.

    Args:
        key: `obsm` entry holding the embedding (e.g. X_celltron), or several: variants of one model's.
        label_key: obs column of cell labels (e.g. cell_type).
        batch_key: obs column of batches, for the batch-integration metrics.
        layer: raw counts for the baseline: X, raw, or a layer name.
    """
    path = Path(path)
    keys = as_keys(key)
    if not path.exists():
        raise MissingInputError(f"--data {path}: no such file")
    adata = read_h5ad(path)
    variants = {k: _obsm_embedding(adata, path, k) for k in keys}
    labels = _column(adata, path, label_key, "--label-key")
    batches = _column(adata, path, batch_key, "--batch-key") if batch_key else None
    counts = _counts(adata, path, layer)
    require_raw_counts(counts, path, layer, _available_layers(adata))
    return EmbeddingData(path, variants, labels, batches, counts)


def usable_cells(data: EmbeddingData, folds: int) -> np.ndarray:
    """Cells with a finite embedding in every variant (`celltron embed` writes NaN for cells without
    a known gene), a label and a batch, whose label has at least `folds` cells: stratified k-fold
    needs every label in every fold. Returns their indices; the rest are logged."""
    keep = pd.notna(data.labels)
    for embedding in data.variants.values():  # every variant is scored on the same cells
        keep &= np.isfinite(embedding).all(axis=1)
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


def outer_folds(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified k-fold split shared by every embedding and the baseline: (train, test) indices."""
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def fold_scores(embedding: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, neighbors: int) -> dict:
    """Accuracy and macro-F1 of a kNN classifier fitted on the `train` rows, predicting the `test` rows."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(min(neighbors, len(train))).fit(embedding[train], labels[train])
    predicted = classifier.predict(embedding[test])
    return {
        "accuracy": float(accuracy_score(labels[test], predicted)),
        "macro_f1": float(f1_score(labels[test], predicted, average="macro", zero_division=0)),
    }


def summarise_folds(per_fold: list[dict]) -> dict:
    """Mean of each classification metric over folds, their spread ("std") and the per-fold values."""
    out = {m: float(np.mean([f[m] for f in per_fold])) for m in CLASSIFICATION_METRICS}
    out["std"] = {m: float(np.std([f[m] for f in per_fold])) for m in CLASSIFICATION_METRICS}
    out["per_fold"] = per_fold
    return out


def knn_scores(embedding: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, neighbors: int = 15) -> dict:
    """kNN classification by stratified k-fold cross-validation: accuracy and macro-F1, mean over
    folds, their spread ("std") and per-fold values.

    Args:
        embedding: (cells, dims), compared by Euclidean distance as it is.
        labels: (cells,) every label with at least `folds` cells.
    """
    split = outer_folds(labels, folds, seed)
    return summarise_folds([fold_scores(embedding, labels, train, test, neighbors) for train, test in split])


def inner_cv_score(embedding: np.ndarray, labels: np.ndarray, folds: int, seed: int, neighbors: int, metric: str) -> float:
    """Mean `metric` of kNN over a stratified `folds`-fold split of the cells given (an outer
    fold's training cells: the caller passes only those)."""
    from sklearn.model_selection import StratifiedKFold

    with warnings.catch_warnings():  # a label with fewer training cells than inner folds: sklearn warns, and copes
        warnings.simplefilter("ignore", UserWarning)
        split = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(embedding, labels))
    return float(np.mean([fold_scores(embedding, labels, train, test, neighbors)[metric] for train, test in split]))


def choose_variant(
    variants: dict[str, np.ndarray], labels: np.ndarray, folds: int, seed: int, neighbors: int, metric: str
) -> tuple[str, dict[str, float]]:
    """The variant with the best inner-CV `metric` on these cells (ties: the first named) and every
    variant's inner score."""
    scores = {name: inner_cv_score(embedding, labels, folds, seed, neighbors, metric) for name, embedding in variants.items()}
    return choose_best(scores), scores


def choose_for_fold(
    variants: dict[str, np.ndarray], labels: np.ndarray, train: np.ndarray, folds: int, seed: int, neighbors: int, metric: str
) -> tuple[str, dict[str, float]]:
    """`choose_variant` on an outer fold's training cells `train`: the held-out rows (embeddings
    and labels) are cut away before the choice sees anything."""
    training = {name: embedding[train] for name, embedding in variants.items()}
    return choose_variant(training, labels[train], folds, seed, neighbors, metric)


def chosen_variant_scores(
    variants: dict[str, np.ndarray],
    labels: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    neighbors: int = 15,
    inner_folds: int = INNER_FOLDS,
    choose_by: str = "accuracy",
) -> dict:
    """As `knn_scores`, for a model whose variant each outer fold chooses by inner cross-validation
    over its own training cells; each fold records its `variant` and the `inner_scores`."""
    per_fold = []
    for train, test in outer_folds(labels, folds, seed):
        chosen, inner = choose_for_fold(variants, labels, train, inner_folds, seed, neighbors, choose_by)
        per_fold.append(
            {**fold_scores(variants[chosen], labels, train, test, neighbors), "variant": chosen, "inner_scores": inner}
        )
    return summarise_folds(per_fold)


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
    key: str | Sequence[str],
    label_key: str,
    batch_key: str | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    neighbors: int = 15,
    layer: str = "X",
    max_cells: int | None = None,
    batch_metrics: tuple[str, ...] = BATCH_METRICS,
    inner_folds: int = INNER_FOLDS,
    choose_by: str = "accuracy",
    return_embeddings: bool = False,
):
    """Score `obsm[key]` of an .h5ad beside the PCA baseline of the same file's expression.

    Args:
        data: the .h5ad path.
        key: obsm entry of the embedding, or several: variants of one model, chosen per outer fold
            by inner cross-validation on its training cells; label_key / batch_key: obs columns.
        folds, seed: the stratified k-fold split (the same folds for the model and the baseline).
        neighbors: k of the kNN classifier and of the graph-connectivity graph.
        layer: raw counts for the baseline: X, raw, or a layer name.
        max_cells: evaluate a seeded sample of this many cells (silhouettes are quadratic in cells).
        batch_metrics: the scib-metrics metrics computed when batch_key is given (default: all).
        inner_folds, choose_by: with several keys, the inner cross-validation's folds and the
            classification metric it chooses by.
        return_embeddings: also return {"model": ..., "pca": ...} and the labels, for plotting.

    Returns:
        {"model": {...}, "baselines": {"pca_knn": {...}}, "split": {...}} (and the embeddings and
        labels); with several keys also "variants" (each scored alone) and "selection".
    """
    keys = as_keys(key)
    check_selection(folds, inner_folds, choose_by)
    if batch_key:
        require_eval_extra("scib_metrics")
        batch_metrics = check_batch_metrics(batch_metrics)
    full = read_embedding_data(data, keys, label_key, batch_key, layer)
    sample = np.arange(len(full.labels))
    if max_cells is not None and len(sample) > max_cells:  # sample first, so the label-size rule holds in the sample
        sample = np.sort(np.random.default_rng(seed).choice(sample, max_cells, replace=False))
    sampled = full.subset(sample)
    cells = usable_cells(sampled, folds)
    subset = sampled.subset(cells)
    pca_embedding = pca_baseline(subset.counts, seed=seed)
    pca = score_embedding(pca_embedding, subset.labels, subset.batches, folds, seed, neighbors, batch_metrics)
    selection = None
    if len(keys) == 1:
        model = score_embedding(subset.embedding, subset.labels, subset.batches, folds, seed, neighbors, batch_metrics)
        shown = keys[0]
    else:
        model = chosen_variant_scores(subset.variants, subset.labels, folds, seed, neighbors, inner_folds, choose_by)
        selection = selection_record(model, keys, inner_folds, choose_by)
        shown = selection["most_chosen"]
        if subset.batches is not None:  # one value over all cells, not per fold: of the variant chosen most often
            labels, batches = subset.labels.astype(str), subset.batches.astype(str)
            model.update(batch_scores(subset.variants[shown], labels, batches, neighbors, seed, batch_metrics))
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
            "embedding_key": shown,
            "embedding_dims": int(subset.variants[shown].shape[1]),
            "pca_components": int(pca_embedding.shape[1]),
            "label_key": label_key,
            "batch_key": batch_key,
        },
    }
    if selection is not None:
        metrics["selection"] = selection
        metrics["variants"] = score_variants(subset, pca, folds, seed, neighbors)
    embeddings = {"model": subset.variants[shown], "pca": pca_embedding}
    return (metrics, embeddings, subset.labels) if return_embeddings else metrics


def check_selection(folds: int, inner_folds: int, choose_by: str) -> None:
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if inner_folds < 2:
        raise ConfigError(f"--inner-folds {inner_folds}: the variant choice's cross-validation needs at least 2 folds")
    if choose_by not in CLASSIFICATION_METRICS:
        raise ConfigError(f"--choose-by {choose_by!r}: use one of {list(CLASSIFICATION_METRICS)}")


def selection_record(model: dict, keys: tuple[str, ...], inner_folds: int, choose_by: str) -> dict:
    """What metrics.json says of the variant choice: candidates, how, and each outer fold's pick."""
    chosen = [fold["variant"] for fold in model["per_fold"]]
    counts = {key: chosen.count(key) for key in keys}
    return {
        "candidates": list(keys),
        "inner_folds": inner_folds,
        "choose_by": choose_by,
        "chosen_on": "inner cross-validation over each outer fold's training cells",
        "chosen_per_fold": chosen,
        "inner_scores_per_fold": [fold["inner_scores"] for fold in model["per_fold"]],
        "times_chosen": counts,
        "most_chosen": max(keys, key=counts.get),  # ties: the first named
    }


def score_variants(subset: EmbeddingData, pca: dict, folds: int, seed: int, neighbors: int) -> dict:
    """Every variant scored alone on the outer folds, paired with the baseline (what each choice
    is worth); kNN metrics only: the batch metrics are the chosen model's."""
    out = {}
    for name, embedding in subset.variants.items():
        scores = knn_scores(embedding, subset.labels, folds, seed, neighbors)
        out[name] = {**scores, "paired": paired_per_fold(scores, pca)}
    return out


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


def selection_lines(metrics: dict) -> str:
    """The variant choice in print: what each fold chose, and every variant alone against the baseline."""
    selection = metrics["selection"]
    lines = [
        f"model: per outer fold, the variant with the best {selection['choose_by']} by {selection['inner_folds']}-fold "
        f"inner cross-validation on that fold's training cells; chosen {selection['times_chosen']}",
        "each variant alone (same folds):",
    ]
    width = max(len(name) for name in selection["candidates"]) + 2
    for name in selection["candidates"]:
        variant = metrics["variants"][name]
        cells = [
            f"{m} {variant[m]:.3f} ± {variant['std'][m]:.3f} (− PCA {variant['paired'][m]['mean']:+.3f} "
            f"[{variant['paired'][m]['low']:+.3f}, {variant['paired'][m]['high']:+.3f}])"
            for m in CLASSIFICATION_METRICS
        ]
        lines.append("  " + name.ljust(width) + "   ".join(cells))
    return "\n".join(lines)


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
    data, key: str | Sequence[str], label_key: str, out, batch_key: str | None = None, *, umap: bool = True, **options
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
            f"embedding obsm[{split['embedding_key']!r}]": embeddings["model"],
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
    if "selection" in metrics:
        print(selection_lines(metrics))
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
