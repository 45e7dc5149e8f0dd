"""The baselines every perturbation model is reported beside, fitted on training perturbations
only: no change (control mean), the training mean, additive shifts for doubles, and the
linear model of Ahlmann-Eltze et al."""

from __future__ import annotations

import numpy as np

from celltron.finetune.perturbation.evaluate import PerturbationData, evaluate


def control_mean_baseline(data: PerturbationData, train: list[str], test: list[str]) -> dict:
    """No change: every perturbation predicted as the control mean."""
    return {p: data.control_mean for p in test}


def train_mean_baseline(data: PerturbationData, train: list[str], test: list[str]) -> dict:
    """The mean of the training perturbations' means."""
    mean = np.mean([data.means[p] for p in train], axis=0)
    return {p: mean for p in test}


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
    data: PerturbationData, train: list[str], test: list[str], rank: int = 10, ridge: float = 0.1
) -> tuple[dict, list[str]]:
    """Ahlmann-Eltze et al.'s linear model: Y (genes x training perturbations, centred on their mean)
    ~ G W P^T, with G the top `rank` principal components of Y over genes, and P the rows of G of
    each perturbation's target genes (summed for combinations); W by ridge regression. A
    perturbation whose targets are not among the measured genes has no embedding and falls back
    to the training mean. Returns the predictions and the perturbations that fell back."""
    index = {g: i for i, g in enumerate(data.genes)}
    Y = np.stack([data.means[p] for p in train], axis=1)
    centre = Y.mean(1, keepdims=True)
    Yc = Y - centre
    U, _, _ = np.linalg.svd(Yc, full_matrices=False)
    G = U[:, : min(rank, U.shape[1])]

    def embedding(p: str):
        rows = [index[g] for g in data.targets(p) if g in index]
        return G[rows].sum(0) if len(rows) == len(data.targets(p)) else None

    fitted = [p for p in train if embedding(p) is not None]
    fallback = train_mean_baseline(data, train, test)
    if len(fitted) < 2:
        return fallback, list(test)
    P = np.stack([embedding(p) for p in fitted])
    Yf = np.stack([data.means[p] for p in fitted], axis=1) - centre
    k = G.shape[1]
    W = np.linalg.solve(G.T @ G + ridge * np.eye(k), G.T @ Yf @ P) @ np.linalg.inv(P.T @ P + ridge * np.eye(k))
    out, fell_back = {}, []
    for p in test:
        e = embedding(p)
        if e is None:
            out[p] = fallback[p]
            fell_back.append(p)
        else:
            out[p] = centre[:, 0] + G @ W @ e
    return out, fell_back


def baseline_report(data: PerturbationData, split: dict) -> dict:
    """Every baseline evaluated on the split's held-out perturbations."""
    train, test = split["train"], split["test"]
    linear, fell_back = linear_baseline(data, train, test)
    report = {
        "control_mean": evaluate(control_mean_baseline(data, train, test), data, test),
        "train_mean": evaluate(train_mean_baseline(data, train, test), data, test),
        "additive": evaluate(additive_baseline(data, train, test), data, test),
        "linear": evaluate(linear, data, test),
    }
    report["linear"]["fell_back_to_train_mean"] = fell_back
    return report
