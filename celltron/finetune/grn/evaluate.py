"""Gene regulatory network evaluation: ground-truth TF -> target tables (TRRUST format), ranked
edge lists scored against them (AUPRC and its ratio over random, early precision ratio), and the
co-expression baselines every inference method is reported beside.

Evaluation follows BEELINE: the truth is restricted to genes present in the data, and to the
candidate edges (TFs x targets) the methods score; a random ranking has precision equal to the
density of true edges among the candidates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from celltron.errors import ConfigError, InputError
from celltron.inputs import MissingInputError

EDGE_COLUMNS = ("tf", "target", "score", "method", "group")
GRN_METRICS = ("auprc", "auprc_ratio", "epr", "n_true_edges", "n_scored_edges")


def read_truth(path) -> pd.DataFrame:
    """A TRRUST-style table (tab-separated TF, target[, mode, PubMed IDs], header optional) as
    unique directed (tf, target) pairs."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"--truth {path}: no such file")
    table = pd.read_csv(path, sep="\t", header=None, dtype=str, comment="#")
    if table.shape[1] < 2:
        raise InputError(
            f"--truth {path}: expected tab-separated columns TF, target (TRRUST format); got {table.shape[1]} column(s)"
        )
    table = table.iloc[:, :2].set_axis(["tf", "target"], axis=1).dropna()
    if table.iloc[0].str.lower().tolist() in (["tf", "target"], ["tf", "gene"]):
        table = table.iloc[1:]
    return table.drop_duplicates().reset_index(drop=True)


def candidate_edges(tfs, targets) -> pd.DataFrame:
    """Every TF x target pair, self-edges excluded."""
    tf, target = np.meshgrid(np.asarray(tfs, dtype=object), np.asarray(targets, dtype=object), indexing="ij")
    edges = pd.DataFrame({"tf": tf.ravel(), "target": target.ravel()})
    return edges[edges.tf != edges.target].reset_index(drop=True)


def evaluate_edges(edges: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """AUPRC (average precision over the ranking), its ratio over random (the density of true
    edges among the scored ones), and the early precision ratio (precision in the top k edges,
    k = true edges among the scored, over the density). Truth is restricted to scored edges."""
    true_pairs = set(zip(truth.tf, truth.target))
    ranked = edges.sort_values("score", ascending=False, kind="stable")
    hits = np.fromiter(
        ((tf, target) in true_pairs for tf, target in zip(ranked.tf, ranked.target)), dtype=bool, count=len(ranked)
    )
    n_true, n = int(hits.sum()), len(hits)
    if n_true == 0:
        return {"auprc": float("nan"), "auprc_ratio": float("nan"), "epr": float("nan"), "n_true_edges": 0, "n_scored_edges": n}
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    auprc = float(precision_at_hits.mean())
    density = n_true / n
    early = float(hits[:n_true].mean())
    return {"auprc": auprc, "auprc_ratio": auprc / density, "epr": early / density, "n_true_edges": n_true, "n_scored_edges": n}


def _ranks(matrix: np.ndarray) -> np.ndarray:
    """Column-wise average ranks (for Spearman correlation)."""
    return pd.DataFrame(matrix).rank(axis=0).to_numpy()


def coexpression_scores(expression: np.ndarray, genes, tfs, targets, method: str = "pearson") -> pd.DataFrame:
    """|correlation| across cells of each TF with each target: the co-expression baseline.

    Args:
        expression: (cells, genes) log-normalised expression.
        method: pearson or spearman.
    """
    if method not in ("pearson", "spearman"):
        raise ConfigError(f"unknown co-expression method {method!r}; use pearson or spearman")
    index = {g: i for i, g in enumerate(genes)}
    values = _ranks(expression) if method == "spearman" else np.asarray(expression, dtype=np.float64)
    centred = values - values.mean(0)
    norms = np.sqrt((centred**2).sum(0))
    norms[norms == 0] = np.inf  # constant genes correlate with nothing
    unit = centred / norms
    correlation = unit[:, [index[t] for t in tfs]].T @ unit[:, [index[t] for t in targets]]
    edges = candidate_edges(tfs, targets)
    rows = pd.Index(tfs).get_indexer(edges.tf)
    cols = pd.Index(targets).get_indexer(edges.target)
    edges["score"] = np.abs(correlation[rows, cols])
    edges["method"] = f"coexpression_{method}"
    return edges


def tree_scores(expression: np.ndarray, genes, tfs, targets, n_trees: int = 50, seed: int = 0, n_jobs: int = -1) -> pd.DataFrame:
    """GENIE3's baseline: for each target, extremely randomised trees regress its expression on
    the TFs' (leaving the target itself out); a TF's importance is the edge score."""
    from sklearn.ensemble import ExtraTreesRegressor

    index = {g: i for i, g in enumerate(genes)}
    tf_matrix = np.asarray(expression[:, [index[t] for t in tfs]], dtype=np.float32)
    scores = np.zeros((len(tfs), len(targets)))
    tf_position = {t: i for i, t in enumerate(tfs)}
    for column, target in enumerate(targets):
        y = np.asarray(expression[:, index[target]], dtype=np.float32)
        if y.std() == 0:
            continue
        keep = np.array([t != target for t in tfs])
        forest = ExtraTreesRegressor(
            n_estimators=n_trees, max_features="sqrt", min_samples_leaf=5, random_state=seed, n_jobs=n_jobs
        )
        forest.fit(tf_matrix[:, keep], y)
        scores[keep, column] = forest.feature_importances_
    edges = candidate_edges(tfs, targets)
    edges["score"] = scores[[tf_position[t] for t in edges.tf], pd.Index(targets).get_indexer(edges.target)]
    edges["method"] = "genie3_extra_trees"
    return edges
