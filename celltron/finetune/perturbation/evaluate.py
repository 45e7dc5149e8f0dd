"""Perturbation response: the data, the splits (by perturbation, never by cell), the metrics on
pseudobulk means, and the baselines every model is reported beside (no change, training mean,
additive, and the linear model of Ahlmann-Eltze et al.).

Expression is log1p of counts normalised to 10,000 per cell. A perturbation is a set of target
genes written `A` or `A+B`; the control label names unperturbed cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from celltron.errors import InputError
from celltron.preprocessing import log_normalise

METRICS = ("mse", "pearson", "pearson_delta", "mse_de20", "pearson_de20", "pearson_delta_de20", "direction_de20")


@dataclass
class PerturbationData:
    """Pseudobulk view of a perturbation screen.

    Attributes:
        genes: measured gene names (columns).
        perturbations: perturbation labels other than the control, sorted.
        control_mean: mean expression of control cells (genes,).
        means: perturbation -> mean expression of its cells (genes,).
        de_genes: perturbation -> indices of its top DE genes (largest |Welch t| against control).
    """

    genes: np.ndarray
    perturbations: list[str]
    control_mean: np.ndarray
    means: dict[str, np.ndarray]
    de_genes: dict[str, np.ndarray]

    @staticmethod
    def targets(perturbation: str) -> list[str]:
        return perturbation.split("+")


def pseudobulk(adata, perturbation_key: str, control: str, n_de: int = 20, source: str = "data") -> PerturbationData:
    """Means per perturbation and their top `n_de` DE genes, from an AnnData of raw counts."""
    if perturbation_key not in adata.obs:
        raise InputError(
            f"{source}: obs has no column {perturbation_key!r} (--perturbation-key); it has {list(adata.obs.columns)}"
        )
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    if control not in set(labels):
        raise InputError(
            f"{source}: no control cells labelled {control!r} in obs[{perturbation_key!r}] (--control); "
            f"labels include {sorted(set(labels))[:10]}"
        )
    expression = log_normalise(adata.X).toarray()
    is_control = labels == control
    control_cells = expression[is_control]
    control_mean = control_cells.mean(0)
    means, de = {}, {}
    for perturbation in sorted(set(labels) - {control}):
        cells = expression[labels == perturbation]
        means[perturbation] = cells.mean(0)
        de[perturbation] = _top_de(cells, control_cells, n_de)
    return PerturbationData(np.asarray(adata.var_names), sorted(means), control_mean, means, de)


def _top_de(cells: np.ndarray, control: np.ndarray, n: int) -> np.ndarray:
    """Genes with the largest |Welch t| between the perturbed and the control cells."""
    difference = cells.mean(0) - control.mean(0)
    spread = np.sqrt(cells.var(0, ddof=1) / max(len(cells), 2) + control.var(0, ddof=1) / max(len(control), 2))
    t = np.abs(difference) / np.maximum(spread, 1e-8)
    return np.argsort(-t, kind="stable")[:n]


# ---------------------------------------------------------------- splits


def heldout_split(perturbations: list[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded share of the perturbations held out (train / test)."""
    order = np.random.default_rng(seed).permutation(sorted(perturbations))
    n_test = max(1, int(round(len(order) * test_fraction)))
    return {"train": sorted(order[n_test:].tolist()), "test": sorted(order[:n_test].tolist())}


def simulation_split(perturbations: list[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """GEARS's simulation split: a share of the single-gene perturbations is unseen; each combination
    is held out and labelled by how many of its genes were seen alone in training
    (`combo_seen0/1/2`), except combinations whose genes were all seen, of which half train."""
    singles = sorted(p for p in perturbations if "+" not in p)
    combos = sorted(p for p in perturbations if "+" in p)
    split = heldout_split(singles, test_fraction, seed)
    seen = set(split["train"])
    out = {"train": list(split["train"]), "unseen_single": split["test"], "combo_seen0": [], "combo_seen1": [], "combo_seen2": []}
    rng = np.random.default_rng(seed + 1)
    for combo in combos:
        known = sum(gene in seen for gene in combo.split("+"))
        if known == 2 and rng.random() < 0.5:
            out["train"].append(combo)
        else:
            out[f"combo_seen{known}"].append(combo)
    out["test"] = sorted(out["unseen_single"] + out["combo_seen0"] + out["combo_seen1"] + out["combo_seen2"])
    out["train"] = sorted(out["train"])
    return out


# ---------------------------------------------------------------- metrics


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def perturbation_metrics(predicted: np.ndarray, truth: np.ndarray, control: np.ndarray, de: np.ndarray) -> dict[str, float]:
    """The metric set of one held-out perturbation, on pseudobulk means."""
    return {
        "mse": float(np.mean((predicted - truth) ** 2)),
        "pearson": _pearson(predicted, truth),
        "pearson_delta": _pearson(predicted - control, truth - control),
        "mse_de20": float(np.mean((predicted[de] - truth[de]) ** 2)),
        "pearson_de20": _pearson(predicted[de], truth[de]),
        "pearson_delta_de20": _pearson(predicted[de] - control[de], truth[de] - control[de]),
        "direction_de20": float(np.mean(np.sign(predicted[de] - control[de]) == np.sign(truth[de] - control[de]))),
    }


def evaluate(predictions: dict[str, np.ndarray], data: PerturbationData, test: list[str]) -> dict:
    """Mean of each metric over the held-out perturbations, and the per-perturbation values."""
    per = {p: perturbation_metrics(predictions[p], data.means[p], data.control_mean, data.de_genes[p]) for p in test}
    means = {m: _nanmean([per[p][m] for p in test]) for m in METRICS}
    return {**means, "per_perturbation": per}


def _nanmean(values: list[float]) -> float:
    """Mean of the defined values; NaN when none is (a no-change prediction has no delta correlation)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ---------------------------------------------------------------- baselines
