"""Gene regulatory network evaluation: ground-truth TF -> target tables (TRRUST format), ranked
edge lists scored against them (AUPRC and its ratio over random, early precision ratio), and the
co-expression baselines every inference method is reported beside.

Evaluation follows BEELINE: the truth is restricted to genes present in the data, and to the
candidate edges (TFs x targets) the methods score; a random ranking has precision equal to the
density of true edges among the candidates.

TRRUST is degree-biased (a few hub targets hold many of its edges), so methods are scored on
held-out TF x target blocks (`block_folds`), beside `degree_prior`, a baseline that reads only
the training TFs' edges; intervals resample held-out TFs, and the model is compared with the
baseline chosen on each fold's training edges.

The anchored head (`anchored_scores`) ranks each held-out block by the chosen baseline's ranks
blended with the model's, the model's weight chosen by inner TF x target blocks of the fold's
training block (each scored as the outer held-out block is, on a baseline built without it): weight 0 is
the baseline itself, so the head can only add to the strongest baseline, never hide behind it.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd

from celltron.errors import ConfigError
from celltron.finetune.grn.calibration import calibration_summary, fold_calibration
from celltron.finetune.report import CHOICE_RESAMPLES, choose_best, earned_weight, percentile_interval, unit_resamples, verdict

EDGE_COLUMNS = ("tf", "target", "score", "method", "group")
GRN_METRICS = ("auprc", "auprc_ratio", "epr", "n_true_edges", "n_scored_edges")


def candidate_edges(tfs, targets) -> pd.DataFrame:
    """Every TF x target pair, self-edges excluded."""
    tf, target = np.meshgrid(np.asarray(tfs, dtype=object), np.asarray(targets, dtype=object), indexing="ij")
    edges = pd.DataFrame({"tf": tf.ravel(), "target": target.ravel()})
    return edges[edges.tf != edges.target].reset_index(drop=True)


def evaluate_edges(edges: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """AUPRC (average precision over the ranking), its ratio over random (the density of true
    edges among the scored ones), and the early precision ratio (precision in the top k edges,
    k = true edges among the scored, over the density). Truth is restricted to scored edges."""
    ranked = edges.sort_values("score", ascending=False, kind="stable")
    return _metrics_of_ranking(is_true_edge(ranked, truth))


def is_true_edge(edges: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """Whether each (tf, target) row of `edges` is an edge of `truth`."""
    pairs = pd.MultiIndex.from_arrays([edges.tf.to_numpy(), edges.target.to_numpy()])
    return np.asarray(pairs.isin(pd.MultiIndex.from_arrays([truth.tf.to_numpy(), truth.target.to_numpy()])), dtype=bool)


def _metrics_of_ranking(hits: np.ndarray) -> dict:
    """`evaluate_edges`'s metrics from whether each edge, best-scored first, is true."""
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


# ------------------------------------------------------- held-out blocks: a split that cannot leak

INTERVAL_METRICS = ("auprc", "auprc_ratio", "epr")
BOOTSTRAP_RESAMPLES = 1000
CHOICE_METRIC = "auprc_ratio"  # the best baseline is chosen, and the model compared with it, on this


def block_folds(tfs, targets, n_folds: int = 3, seed: int = 0) -> list[dict]:
    """A seeded TF x target block split: TFs are dealt into `n_folds` folds and, independently,
    targets too. Fold i tests the pairs fold-i TFs x fold-i targets and trains on the TFs and
    targets of the other folds, so no TF and no target is on both sides (the off-diagonal blocks,
    a test TF with a training target or the reverse, are neither). Each dict holds sorted
    "test_tfs", "test_targets", "train_tfs", "train_targets"."""
    tfs, targets = sorted(set(tfs)), sorted(set(targets))
    if n_folds < 2:
        raise ConfigError(f"--folds {n_folds}: a held-out split needs at least 2 folds; use --folds 2 or more")
    if n_folds > min(len(tfs), len(targets)):
        raise ConfigError(
            f"--folds {n_folds}: only {len(tfs)} TFs and {len(targets)} targets to deal into folds; "
            "lower --folds, or raise --top-genes / give more TFs with --tfs"
        )
    rng = np.random.default_rng(seed)
    # dealt round-robin after a shuffle: fold sizes differ by at most one
    tf_fold = rng.permutation(np.arange(len(tfs)) % n_folds)
    target_fold = rng.permutation(np.arange(len(targets)) % n_folds)
    return [
        {
            "test_tfs": [t for t, f in zip(tfs, tf_fold) if f == fold],
            "test_targets": [t for t, f in zip(targets, target_fold) if f == fold],
            "train_tfs": [t for t, f in zip(tfs, tf_fold) if f != fold],
            "train_targets": [t for t, f in zip(targets, target_fold) if f != fold],
        }
        for fold in range(n_folds)
    ]


def block_edges(edges: pd.DataFrame, tfs, targets) -> pd.DataFrame:
    """The rows of `edges` from one of `tfs` to one of `targets`, in their order."""
    return edges[edges.tf.isin(set(tfs)) & edges.target.isin(set(targets))].reset_index(drop=True)


def degree_prior_scores(truth: pd.DataFrame, train_tfs, tfs, targets) -> pd.DataFrame:
    """A baseline that reads no expression: the score of (tf, target) is how many TFs of
    `train_tfs`, other than `tf` itself, regulate `target` in `truth` (ties stay ties).

    It reads exactly the truth edges whose TF is in `train_tfs` (to any target, in whichever
    target fold): known biology about other TFs. A pair's own label never enters its score: for
    a held-out TF (not in `train_tfs`) nothing of its edges is read; for a training TF its own
    edge is left out of the count, so training pairs can be scored to choose a baseline. With
    `train_tfs` = every TF it is the leave-own-TF-out degree over the whole candidate set."""
    edges = candidate_edges(tfs, targets)
    known = truth[truth.tf.isin(set(train_tfs))].drop_duplicates()
    regulators = edges.target.map(known.groupby("target").size()).fillna(0).to_numpy()
    own = edges.tf.isin(set(train_tfs)).to_numpy() & is_true_edge(edges, known)
    edges["score"] = regulators - own
    edges["method"] = "degree_prior"
    return edges


def tf_resamples(n_tfs: int, n: int = BOOTSTRAP_RESAMPLES, seed=0) -> np.ndarray:
    """(n, n_tfs) indices of TFs drawn with replacement: the bootstrap's unit is the held-out TF
    (its edges move together), and sharing one draw between methods makes their difference paired."""
    return unit_resamples(n_tfs, n, seed)


def resampled_metrics(edges: pd.DataFrame, truth: pd.DataFrame, units, draws: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: one value per row of `draws`}: each row lists TFs (indices into `units`) drawn
    with replacement, and the metric is recomputed on their edges, a TF drawn k times counting
    its edges k times (copies adjacent in the ranking, as `evaluate_edges` would order them)."""
    ranked = edges.sort_values("score", ascending=False, kind="stable")
    hits = is_true_edge(ranked, truth)
    unit_of_edge = pd.Index(units).get_indexer(ranked.tf)
    values = {metric: np.empty(len(draws)) for metric in INTERVAL_METRICS}
    for row, drawn in enumerate(draws):
        copies = np.bincount(drawn, minlength=len(units))[unit_of_edge]
        metrics = _metrics_of_ranking(np.repeat(hits, copies))
        for metric in INTERVAL_METRICS:
            values[metric][row] = metrics[metric]
    return values


def bootstrap_edges_metric(
    edges: pd.DataFrame, truth: pd.DataFrame, metric: str = "auprc_ratio", n: int = BOOTSTRAP_RESAMPLES, seed=0
) -> dict:
    """`metric` of `edges` ("mean", the point estimate) with a 95% percentile bootstrap interval
    ("low", "high") over their TFs resampled with replacement ("n_units" TFs)."""
    units = sorted(set(edges.tf))
    draws = resampled_metrics(edges, truth, units, tf_resamples(len(units), n, seed))[metric]
    low, high = percentile_interval(draws)
    return {"mean": evaluate_edges(edges, truth)[metric], "low": low, "high": high, "n_units": len(units)}


def evaluate_on_folds(
    model: pd.DataFrame | dict[str, pd.DataFrame] | None,
    baselines: dict[str, pd.DataFrame],
    truth: pd.DataFrame,
    tfs,
    targets,
    folds: list[dict],
    seed: int = 0,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    anchor_weights=None,
) -> dict:
    """Every method scored on each fold's held-out block, beside `degree_prior`.

    `model` and `baselines` are edge lists over all candidate pairs (they read no truth, so are
    computed once); `degree_prior` is rebuilt per fold from that fold's training TFs. Returns
    {"methods": {name: metrics averaged over folds, "n_true_edges"/"n_scored_edges" summed,
    "folds": per-fold metrics, "interval": {metric: [low, high]} over held-out TFs resampled},
    "best_baseline": per fold, the baseline with the best AUPRC ratio on its training edges,
    "paired": model − that baseline on the held-out blocks (None without a model),
    "uncertainty": the reported predictor's calibrated edge probabilities (grn.calibration)}.

    `model` may be several views of the model's scores ({name: edges}, e.g. one per attention
    layer and head): each fold then scores the view with the best AUPRC ratio on its training
    block (ties to the first named), recorded in "best_baseline" ("model_view", "view_scores").

    With `anchor_weights` (the anchored head) "model" is the anchored score (`anchor_on_fold`),
    its weight chosen per fold by inner folds over the training block and recorded in
    "best_baseline" ("weight", "weight_scores", "gain_low", "inner_folds"); the model's own scores
    are then scored as "model_plain"."""
    anchored = model is not None and anchor_weights is not None
    views = model if isinstance(model, dict) else ({"model": model} if model is not None else {})
    runs = dict(baselines)
    names = [*(["model"] if views else []), *runs, "degree_prior", *(["model_plain"] if anchored else [])]
    fold_metrics: dict[str, list] = {name: [] for name in names}
    fold_draws: dict[str, list] = {name: [] for name in fold_metrics}
    chosen, calibration = [], []
    for index, fold in enumerate(folds):
        fold_runs = {**runs, "degree_prior": degree_prior_scores(truth, fold["train_tfs"], tfs, targets)}
        pick = best_baseline_on_training_edges(fold_runs, truth, fold)
        if views:
            fold_runs["model"], view_choice = view_on_training_edges(views, truth, fold)
            pick |= view_choice
        if anchored:
            fold_runs["model_plain"] = fold_runs["model"]
            baseline_for = _baseline_builder(pick["name"], runs, truth, tfs, targets)
            model_for = partial(_view_for_fold, views, truth)  # the view, too, is chosen inside each inner fold
            fold_runs["model"], choice = anchor_on_fold(
                fold_runs[pick["name"]],
                fold_runs["model_plain"],
                truth,
                fold,
                anchor_weights,
                baseline_for,
                model_for,
                [seed, index],
            )
            pick |= choice
        chosen.append(pick)
        # the reported predictor's scores as edge probabilities, mapped on the training block alone
        calibration.append(_fold_probabilities(fold_runs, "model" if views else pick["name"], pick, truth, fold))
        # one draw of held-out TFs per fold, shared by every method: differences are paired
        draws = tf_resamples(len(fold["test_tfs"]), n_resamples, seed=[seed, index])
        for name, edges in fold_runs.items():
            test = block_edges(edges, fold["test_tfs"], fold["test_targets"])
            fold_metrics[name].append(evaluate_edges(test, truth))
            fold_draws[name].append(resampled_metrics(test, truth, fold["test_tfs"], draws))
    methods = {name: _pooled(fold_metrics[name], fold_draws[name]) for name in fold_metrics}
    paired = None
    if model is not None:
        paired = _paired_with_best(fold_metrics, fold_draws, chosen, sum(len(f["test_tfs"]) for f in folds))
    reported = ("model (anchored head)" if anchored else "model") if views else "best baseline (chosen per fold)"
    return {
        "methods": methods,
        "best_baseline": chosen,
        "paired": paired,
        "uncertainty": calibration_summary(calibration, reported),
    }


def _fold_probabilities(fold_runs: dict, reported: str, pick: dict, truth: pd.DataFrame, fold: dict) -> dict:
    """The reported predictor's held-out edge probabilities on one fold (`calibration.fold_calibration`),
    mapped on its training block. `fold_runs[reported]` holds the held-out scores; with an
    anchored head ("model_plain" present) the training block is anchored the same way at the
    fold's weight."""
    train_tfs, train_targets = fold["train_tfs"], fold["train_targets"]
    if reported == "model" and "model_plain" in fold_runs:
        baseline, plain = (block_edges(fold_runs[n], train_tfs, train_targets) for n in (pick["name"], "model_plain"))
        train = anchored_scores(baseline, plain, pick["weight"])
    else:
        train = block_edges(fold_runs[reported], train_tfs, train_targets)
    test = block_edges(fold_runs[reported], fold["test_tfs"], fold["test_targets"])
    probabilities = fold_calibration(train.score, is_true_edge(train, truth), test.score)
    return {**probabilities, "hit": is_true_edge(test, truth)}


def _view_for_fold(views: dict[str, pd.DataFrame], truth: pd.DataFrame, fold: dict) -> pd.DataFrame:
    return view_on_training_edges(views, truth, fold)[0]


def _baseline_builder(name: str, runs: dict, truth: pd.DataFrame, tfs, targets):
    """train_tfs -> the named baseline's edges as built from those training TFs: the degree prior
    is rebuilt (it reads their truth edges), an expression baseline reads no truth and is as is."""
    if name == "degree_prior":
        return lambda train_tfs: degree_prior_scores(truth, train_tfs, tfs, targets)
    return lambda train_tfs: runs[name]


def best_baseline_on_training_edges(baselines: dict[str, pd.DataFrame], truth: pd.DataFrame, fold: dict) -> dict:
    """The baseline with the best AUPRC ratio on the fold's training block (training TFs x
    training targets): the choice never sees a held-out pair."""
    scores = {
        name: evaluate_edges(block_edges(edges, fold["train_tfs"], fold["train_targets"]), truth)[CHOICE_METRIC]
        for name, edges in baselines.items()
    }
    name = choose_best(scores)
    return {"name": name, "metric": CHOICE_METRIC, "training_score": scores[name], "training_scores": scores}


def view_on_training_edges(views: dict[str, pd.DataFrame], truth: pd.DataFrame, fold: dict) -> tuple[pd.DataFrame, dict]:
    """The view of the model's scores with the best AUPRC ratio on the fold's training block
    (first named on ties), and the record of that choice ({} for a single view)."""
    if len(views) == 1:
        return next(iter(views.values())), {}
    scores = {
        name: evaluate_edges(block_edges(edges, fold["train_tfs"], fold["train_targets"]), truth)[CHOICE_METRIC]
        for name, edges in views.items()
    }
    name = choose_best(scores)
    return views[name], {"model_view": name, "view_scores": scores}


ANCHOR_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the model's share of the anchored ranking


def check_anchor_weights(weights) -> tuple[float, ...]:
    """`weights` ascending without repeats (the choice keeps the first best, so ties go to the
    smaller weight: the baseline unless the model earns its share); refuses any outside [0, 1]."""
    weights = [float(w) for w in weights]
    if not weights:
        raise ConfigError("--anchor-weights: give at least one weight in [0, 1], e.g. --anchor-weights 0 0.5 1")
    outside = [w for w in weights if not 0 <= w <= 1]  # NaN fails this too
    if outside:
        raise ConfigError(
            f"--anchor-weights: {', '.join(f'{w:g}' for w in outside)} outside [0, 1]; each weight is the model's "
            "share of the anchored ranking (0: the baseline alone, 1: the model alone), e.g. --anchor-weights 0 0.5 1"
        )
    return tuple(sorted(set(weights)))


def rank_normalised(scores) -> np.ndarray:
    """Average ranks over n, in (0, 1]: ties share a rank, the lowest score ranks lowest (so a
    pair the model never saw, at its floor score, ranks last)."""
    values = pd.Series(np.asarray(scores, dtype=np.float64))
    return (values.rank(method="average") / max(len(values), 1)).to_numpy()


def anchored_scores(baseline: pd.DataFrame, model: pd.DataFrame, weight: float) -> pd.DataFrame:
    """The rows of `baseline` scored (1 − weight) * rank(baseline) + weight * rank(model), ranks
    normalised over these rows: edge scores of different methods live on different scales, their
    ranks do not. Weight 0 returns the baseline's own scores, so its ranking (ties included) is
    the baseline's exactly; a pair `model` lacks ranks below every pair it scores."""
    anchored = baseline.assign(method="anchored")
    if weight == 0:
        return anchored
    pairs = pd.MultiIndex.from_arrays([baseline.tf.to_numpy(), baseline.target.to_numpy()])
    model_score = model.set_index(["tf", "target"]).score.reindex(pairs).fillna(-np.inf).to_numpy()
    anchored["score"] = (1 - weight) * rank_normalised(baseline.score) + weight * rank_normalised(model_score)
    return anchored


def choose_anchor_weight(
    baseline: pd.DataFrame, model: pd.DataFrame, truth: pd.DataFrame, weights, resamples: int = CHOICE_RESAMPLES, seed=0
) -> dict:
    """The weight (of `weights`, ascending) for the anchored ranking of `baseline`'s rows, chosen
    on those same rows: the smallest weight, unless a larger one gains AUPRC ratio over it beyond
    the 95% bootstrap interval of the gain (TFs resampled, the same draws for both); of those that
    do, the best (ties to the smaller). A best-of-grid choice alone picked weights whose gain was
    noise and cost held-out blocks more than the interval (benchmarks/grn.md). In-sample: the
    held-out protocol uses `choose_anchor_weight_by_inner_folds`.
    {"weight", "weight_scores": {str(weight): ratio}, "gain_low": {str(weight): the gain's lower bound}}."""
    weights = [float(w) for w in weights]
    units = sorted(set(baseline.tf))
    draws = tf_resamples(len(units), resamples, seed)
    ranked = {w: anchored_scores(baseline, model, w) for w in weights}
    scores = {w: evaluate_edges(edges, truth)[CHOICE_METRIC] for w, edges in ranked.items()}
    resampled = {w: resampled_metrics(edges, truth, units, draws)[CHOICE_METRIC] for w, edges in ranked.items()}
    return earned_weight(weights, scores, resampled)


INNER_FOLDS = 3  # inner TF x target blocks of a fold's training block, behind the anchor weight


def choose_anchor_weight_by_inner_folds(
    baseline_for,
    model,
    truth: pd.DataFrame,
    fold: dict,
    weights,
    n_inner: int = INNER_FOLDS,
    resamples: int = CHOICE_RESAMPLES,
    seed=0,
) -> dict:
    """The anchor weight for one outer fold, by inner cross-validation over its training block:
    the training TFs and targets are dealt into `n_inner` TF x target blocks (`block_folds`), each
    inner block is anchored on the baseline as it would be built without it (`baseline_for(train
    TFs)`: the degree prior counts only the inner training TFs' edges, as the outer held-out block
    counts only the outer training TFs'), and each weight is scored on the inner held-out blocks,
    averaged over them. The rule of `choose_anchor_weight` then applies to those held-out scores
    (a weight above the smallest only when its gain is beyond the 95% interval, inner held-out TFs
    resampled). A gain seen on the whole training block can be a gain on the very TFs it was
    measured on; an inner held-out gain is one that carried to other TFs (benchmarks/grn.md).
    `model` is the model's edges, or `model(fold)` gives them as chosen on a fold's training
    block (the attention view): every choice is then remade inside each inner fold, since a view
    picked on the whole training block has seen the inner held-out pairs and flatters its weight.
    Only the outer training block is read. Adds "inner_folds" (the count) to the record."""
    weights = [float(w) for w in weights]
    n_inner = min(n_inner, len(fold["train_tfs"]), len(fold["train_targets"]))
    if n_inner < 2:  # nothing to hold out inside the training block: the baseline alone
        return {"weight": float(weights[0]), "weight_scores": {}, "gain_low": {}, "inner_folds": 0}
    scores: dict[float, list] = {w: [] for w in weights}
    resampled: dict[float, list] = {w: [] for w in weights}
    seeds = list(np.atleast_1d(seed).astype(int))  # an int or a list of ints (outer seed, fold)
    for index, inner in enumerate(block_folds(fold["train_tfs"], fold["train_targets"], n_inner, seed=seeds)):
        inner_model = model(inner) if callable(model) else model
        test = [
            block_edges(edges, inner["test_tfs"], inner["test_targets"])
            for edges in (baseline_for(inner["train_tfs"]), inner_model)
        ]
        draws = tf_resamples(len(inner["test_tfs"]), resamples, seed=[*seeds, index])
        for w in weights:
            ranked = anchored_scores(*test, w)
            scores[w].append(evaluate_edges(ranked, truth)[CHOICE_METRIC])
            resampled[w].append(resampled_metrics(ranked, truth, inner["test_tfs"], draws)[CHOICE_METRIC])
    mean_scores = {w: _mean_over_folds(values) for w, values in scores.items()}
    mean_draws = {w: _mean_over_folds(values) for w, values in resampled.items()}
    return earned_weight(weights, mean_scores, mean_draws) | {"inner_folds": n_inner}


def anchor_on_fold(
    baseline: pd.DataFrame, model: pd.DataFrame, truth: pd.DataFrame, fold: dict, weights, baseline_for, model_for=None, seed=0
) -> tuple:
    """The anchored head on one fold: (its scores over the held-out block, the weight choice).
    `baseline` and `model` are the fold's own edges (the degree prior from its training TFs, the
    view chosen on its training block); `baseline_for(train_tfs)` and `model_for(fold)` (default:
    `model` as is) remake them for each inner fold of `choose_anchor_weight_by_inner_folds`, which
    chooses the weight, so no held-out pair is read. Only the weight is fitted: the model's scores
    read no truth, so need no inner refit."""
    inner_model = model_for if model_for is not None else model
    choice = choose_anchor_weight_by_inner_folds(baseline_for, inner_model, truth, fold, check_anchor_weights(weights), seed=seed)
    test = [block_edges(edges, fold["test_tfs"], fold["test_targets"]) for edges in (baseline, model)]
    return anchored_scores(*test, choice["weight"]), choice


def _pooled(per_fold: list[dict], draws: list[dict]) -> dict:
    """Metrics averaged over folds (counts summed), the folds' own, and intervals of the average."""
    pooled = {metric: _mean_over_folds([fold[metric] for fold in per_fold]) for metric in INTERVAL_METRICS}
    pooled |= {count: sum(fold[count] for fold in per_fold) for count in ("n_true_edges", "n_scored_edges")}
    pooled["folds"] = per_fold
    pooled["interval"] = {
        metric: list(percentile_interval(_mean_over_folds([fold[metric] for fold in draws]))) for metric in INTERVAL_METRICS
    }
    return pooled


def _paired_with_best(fold_metrics: dict, fold_draws: dict, chosen: list[dict], n_units: int) -> dict:
    """Model − each fold's chosen baseline on the held-out block, averaged over folds, with a
    percentile interval from the same resampled TFs for both (`report.verdict_line`'s shape)."""
    per_fold = [
        fold_metrics["model"][i][CHOICE_METRIC] - fold_metrics[pick["name"]][i][CHOICE_METRIC] for i, pick in enumerate(chosen)
    ]
    draws = [fold_draws["model"][i][CHOICE_METRIC] - fold_draws[pick["name"]][i][CHOICE_METRIC] for i, pick in enumerate(chosen)]
    mean = float(_mean_over_folds(per_fold))
    low, high = percentile_interval(_mean_over_folds(draws))
    difference = {
        "metric": CHOICE_METRIC,
        "baselines": [pick["name"] for pick in chosen],
        "mean": mean,
        "low": low,
        "high": high,
        "n_units": n_units,
        "improvement": {"mean": mean, "low": low, "high": high},
        "per_fold": per_fold,
    }
    difference["verdict"] = verdict(difference)
    return difference


def _mean_over_folds(values):
    """Mean over folds (the first axis) of the finite values; NaN where no fold has one (a
    held-out block without a true edge has no AUPRC)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    count = finite.sum(0)
    total = np.where(finite, values, 0.0).sum(0)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(mean) if mean.ndim == 0 else mean
