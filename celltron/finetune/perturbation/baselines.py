"""The baselines every perturbation model is reported beside, fitted on training perturbations
only: no change (control mean), the training mean, the training mean with the average
knockdown on the targets (`knockdown_prior`), additive shifts for doubles, and the linear
model of Ahlmann-Eltze et al.; and the choice of the best of them by inner cross-validation
over training perturbations."""

from __future__ import annotations

import numpy as np

from celltron.finetune.perturbation.evaluate import PerturbationData, evaluate_folds, higher_is_better
from celltron.finetune.report import choose_best

BASELINES = ("control_mean", "train_mean", "knockdown_prior", "additive", "linear")


def control_mean_baseline(data: PerturbationData, train: list[str], test: list[str]) -> dict:
    """No change: every perturbation predicted as the control mean."""
    return {p: data.control_mean for p in test}


def train_mean_baseline(data: PerturbationData, train: list[str], test: list[str]) -> dict:
    """The mean of the training perturbations' means."""
    mean = np.mean([data.means[p] for p in train], axis=0)
    return {p: mean for p in test}


def knockdown_prior_baseline(data: PerturbationData, train: list[str], test: list[str]) -> dict:
    """No learning beyond one number: the training mean, plus on each measured target gene the
    training perturbations' mean change of their own measured targets from control (what
    CRISPRi/a does to the gene it targets)."""
    changes = [data.means[p][i] - data.control_mean[i] for p in train for i in data.target_indices(p)]
    knockdown = float(np.mean(changes)) if changes else 0.0
    mean = np.mean([data.means[p] for p in train], axis=0)
    out = {}
    for p in test:
        predicted = mean.copy()
        predicted[data.target_indices(p)] += knockdown
        out[p] = predicted
    return out


def additive_baseline(data: PerturbationData, train: list[str], test: list[str]) -> dict:
    """Control plus the sum of the single-gene shifts seen in training; a perturbation with a gene
    never seen alone falls back to the training mean."""
    shifts = {p: data.means[p] - data.control_mean for p in train if "+" not in p}
    fallback = train_mean_baseline(data, train, test)
    out = {}
    for p in test:
        genes = data.targets(p)
        out[p] = data.control_mean + sum(shifts[g] for g in genes) if all(g in shifts for g in genes) else fallback[p]
    return out


def linear_baseline(
    data: PerturbationData,
    train: list[str],
    test: list[str],
    rank: int = 10,
    ridge: float = 0.1,
    embedding: dict[str, np.ndarray] | None = None,
) -> tuple[dict, list[str]]:
    """Ahlmann-Eltze et al.'s linear model: Y (genes x training perturbations, centred on their mean)
    ~ G W P^T, with G the top `rank` principal components of Y over genes, and P each
    perturbation's embedding: the sum over its target genes of their rows of G (targets must be
    measured genes) or, with `embedding` ({gene: vector}), of their vectors there (any gene it
    covers, centred on the training perturbations' mean); W by ridge regression. A perturbation with a target that has no embedding falls back
    to the training mean. Returns the predictions and the perturbations that fell back."""
    index = {g: i for i, g in enumerate(data.genes)}
    Y = np.stack([data.means[p] for p in train], axis=1)
    centre = Y.mean(1, keepdims=True)
    U, _, _ = np.linalg.svd(Y - centre, full_matrices=False)
    G = U[:, : min(rank, U.shape[1])]
    rows = embedding if embedding is not None else {g: G[i] for g, i in index.items()}

    def embedding_of(p: str):
        targets = data.targets(p)
        return np.sum([rows[g] for g in targets], axis=0) if all(g in rows for g in targets) else None

    fitted = [p for p in train if embedding_of(p) is not None]
    fallback = train_mean_baseline(data, train, test)
    if len(fitted) < 2:
        return fallback, list(test)
    P = np.stack([embedding_of(p) for p in fitted])
    # an outside embedding is not centred on these perturbations as PCA rows are: centre it
    # like the response, so the fit needs no intercept
    offset = P.mean(0) if embedding is not None else np.zeros(P.shape[1])
    P = P - offset
    Yf = np.stack([data.means[p] for p in fitted], axis=1) - centre
    k, d = G.shape[1], P.shape[1]
    W = np.linalg.solve(G.T @ G + ridge * np.eye(k), G.T @ Yf @ P) @ np.linalg.inv(P.T @ P + ridge * np.eye(d))
    out, fell_back = {}, []
    for p in test:
        e = embedding_of(p)
        if e is None:
            out[p] = fallback[p]
            fell_back.append(p)
        else:
            out[p] = centre[:, 0] + G @ W @ (e - offset)
    return out, fell_back


def baseline_names(data: PerturbationData) -> tuple[str, ...]:
    """Every baseline the data allows: the fixed ones, and a linear variant per gene-embedding source."""
    return BASELINES + tuple(f"linear_{source}" for source in sorted(data.gene_embeddings))


def predict(name: str, data: PerturbationData, train: list[str], test: list[str]) -> tuple[dict, list[str]]:
    """The named baseline's predictions for `test`, fitted on `train`, and the perturbations it
    could not model and predicted as the training mean (the linear baseline's fallback)."""
    if name == "linear":
        return linear_baseline(data, train, test)
    if name.startswith("linear_"):
        return linear_baseline(data, train, test, embedding=data.gene_embeddings[name.removeprefix("linear_")])
    fit = {
        "control_mean": control_mean_baseline,
        "train_mean": train_mean_baseline,
        "knockdown_prior": knockdown_prior_baseline,
        "additive": additive_baseline,
    }[name]
    return fit(data, train, test), []


def inner_folds(perturbations: list[str], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Seeded k-fold over perturbations, held out the way the outer split holds them out: a
    held-out single removes the combinations holding its gene from that fold's training."""
    order = np.random.default_rng(seed).permutation(sorted(perturbations)).tolist()
    folds = []
    for chunk in np.array_split(np.arange(len(order)), min(n_folds, len(order))):
        test = sorted(order[i] for i in chunk)
        held_genes = {g for p in test if "+" not in p for g in p.split("+")}
        train = [p for p in sorted(perturbations) if p not in test and not held_genes & set(p.split("+"))]
        folds.append({"train": train, "test": test})
    return folds


def usable_inner_folds(perturbations: list[str], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """`inner_folds` that keep at least 2 training perturbations (fewer cannot fit a baseline)."""
    return [fold for fold in inner_folds(perturbations, n_folds, seed) if len(fold["train"]) >= 2]


def choose_baseline(
    data: PerturbationData, train: list[str], metric: str, seed: int, n_folds: int = 3
) -> tuple[str, dict[str, float]]:
    """The baseline with the best `metric` under inner cross-validation over the training
    perturbations only (no held-out perturbation is read); returns its name and every
    baseline's inner score."""
    folds = usable_inner_folds(train, n_folds, seed)
    scores = {}
    for name in baseline_names(data):
        predictions = {}
        for fold in folds:
            predictions.update(predict(name, data, fold["train"], fold["test"])[0])
        scores[name] = evaluate_folds(predictions, data, folds)[metric] if folds else float("nan")
    return choose_best(scores, higher_is_better(metric)), scores


def baseline_report(data: PerturbationData, split: dict) -> dict:
    """Every baseline evaluated on the split's held-out perturbations; the linear baseline's entry
    names the perturbations it predicted as the training mean (`fell_back_to_train_mean`)."""
    fold = {"train": split["train"], "test": split["test"]}
    report = {}
    for name in baseline_names(data):
        predictions, fell_back = predict(name, data, fold["train"], fold["test"])
        report[name] = evaluate_folds(predictions, data, [fold])
        if name.startswith("linear"):
            report[name]["fell_back_to_train_mean"] = fell_back
    return report
