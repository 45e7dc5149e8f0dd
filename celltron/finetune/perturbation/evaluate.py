"""Perturbation response: the data, the splits (by perturbation, never by cell), the metrics on
pseudobulk means, and the baselines every model is reported beside (no change, training mean,
additive, and the linear model of Ahlmann-Eltze et al.).

Expression is log1p of counts normalised to 10,000 per cell. A perturbation is a set of target
genes written `A` or `A+B`; the control label names unperturbed cells.

Honest scoring. A measured target gene moves most under its own perturbation (CRISPRi/a acts
on it), so a rule with no learning scores well on metrics that include it; every metric is
therefore also reported with the perturbed genes left out (`*_notarget`: out of the DE set,
which takes the next DE genes instead, and out of every correlation and error). The
centroid-referenced delta correlates changes from the training perturbations' mean rather
than from control, so a prediction gets no credit for the response all perturbations share.
A correlation of a prediction without variation is 0: it carries no signal (not undefined,
so every predictor is scored on every perturbation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from celltron.errors import InputError
from celltron.preprocessing import log_normalise

BASE_METRICS = (
    "mse",
    "pearson",
    "pearson_delta",
    "pearson_delta_centroid",
    "mse_de20",
    "pearson_de20",
    "pearson_delta_de20",
    "direction_de20",
)
METRICS = BASE_METRICS + tuple(f"{m}_notarget" for m in BASE_METRICS)
TABLE_METRICS = (
    "pearson_delta_de20",
    "pearson_delta_de20_notarget",
    "pearson_delta_centroid_notarget",
    "mse_de20_notarget",
    "direction_de20_notarget",
)
RESPONSIVE_FDR = 0.05


def higher_is_better(metric: str) -> bool:
    return not metric.startswith("mse")


@dataclass
class PerturbationData:
    """Pseudobulk view of a perturbation screen.

    Attributes:
        genes: measured gene names (columns).
        perturbations: perturbation labels other than the control, sorted.
        control_mean: mean expression of control cells (genes,).
        means: perturbation -> mean expression of its cells (genes,).
        de_genes: perturbation -> indices of its top DE genes (largest |Welch t| against control).
        de_genes_notarget: the same with the perturbation's own measured targets left out.
        n_significant: perturbation -> genes other than its targets that differ from control at
            FDR 0.05 (Welch t-test, Benjamini-Hochberg over genes); None when not computed.
        gene_embeddings: source name -> {gene: vector}, embeddings of genes (measured or not)
            from outside the screen (the model's gene tokens, co-expression in a reference),
            each giving the linear baseline a variant `linear_<source>`.
    """

    genes: np.ndarray
    perturbations: list[str]
    control_mean: np.ndarray
    means: dict[str, np.ndarray]
    de_genes: dict[str, np.ndarray]
    de_genes_notarget: dict[str, np.ndarray] | None = None
    n_significant: dict[str, int] | None = None
    gene_embeddings: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self):
        self._index = {str(g): i for i, g in enumerate(self.genes)}
        if self.de_genes_notarget is None:  # hand-built data: the DE genes minus the targets
            self.de_genes_notarget = {
                p: np.setdiff1d(de, self.target_indices(p), assume_unique=True) for p, de in self.de_genes.items()
            }

    @staticmethod
    def targets(perturbation: str) -> list[str]:
        return perturbation.split("+")

    def target_indices(self, perturbation: str) -> np.ndarray:
        """Columns of the perturbation's target genes that are measured."""
        return np.asarray([self._index[g] for g in self.targets(perturbation) if g in self._index], dtype=np.int64)

    def responsive(self, min_de_genes: int) -> list[str]:
        """Perturbations with at least `min_de_genes` genes besides their targets changed at FDR 0.05."""
        if self.n_significant is None:
            return []
        return [p for p in self.perturbations if self.n_significant[p] >= min_de_genes]


def pseudobulk(adata, perturbation_key: str, control: str, n_de: int = 20, source: str = "data") -> PerturbationData:
    """Means per perturbation, their top `n_de` DE genes (with and without their targets) and how
    many genes besides the targets each changes at FDR 0.05, from an AnnData of raw counts."""
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
    genes = np.asarray(adata.var_names)
    index = {str(g): i for i, g in enumerate(genes)}
    control_cells = expression[labels == control]
    means, de, de_notarget, significant = {}, {}, {}, {}
    for perturbation in sorted(set(labels) - {control}):
        cells = expression[labels == perturbation]
        means[perturbation] = cells.mean(0)
        targets = [index[g] for g in PerturbationData.targets(perturbation) if g in index]
        t, p_values = _welch(cells, control_cells)
        order = np.argsort(-np.abs(t), kind="stable")
        de[perturbation] = order[:n_de]
        de_notarget[perturbation] = order[~np.isin(order, targets)][:n_de]
        significant[perturbation] = _count_significant(np.delete(p_values, targets))
    return PerturbationData(genes, sorted(means), control_cells.mean(0), means, de, de_notarget, significant)


def top_de(cells: np.ndarray, control: np.ndarray, n: int) -> np.ndarray:
    """Genes with the largest |Welch t| between the perturbed and the control cells."""
    return np.argsort(-np.abs(_welch(cells, control)[0]), kind="stable")[:n]


def _welch(cells: np.ndarray, control: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t statistic per gene between perturbed and control cells, and its two-sided p-value
    (1 where both groups are constant)."""
    from scipy import stats

    n1, n2 = max(len(cells), 2), max(len(control), 2)
    v1, v2 = cells.var(0, ddof=1) / n1, control.var(0, ddof=1) / n2
    spread = np.sqrt(v1 + v2)
    t = (cells.mean(0) - control.mean(0)) / np.maximum(spread, 1e-8)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    p = np.where(spread > 0, 2 * stats.t.sf(np.abs(t), np.nan_to_num(df, nan=1.0)), 1.0)
    return t, p


def _count_significant(p_values: np.ndarray) -> int:
    from scipy.stats import false_discovery_control

    if len(p_values) == 0:
        return 0
    return int((false_discovery_control(p_values) < RESPONSIVE_FDR).sum())


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


def leave_one_out_folds(perturbations: list[str]) -> list[dict[str, list[str]]]:
    """Each perturbation held out once. A single held out removes from training every
    combination holding its gene (what is held out must not be seen inside a combination); a
    held-out combination trains on everything else, its singles included (GEARS's seen-2 case)."""
    folds = []
    for held in sorted(perturbations):
        genes = set(held.split("+"))
        train = [p for p in sorted(perturbations) if p != held and not ("+" not in held and genes & set(p.split("+")))]
        folds.append({"train": train, "test": [held]})
    return folds


# ---------------------------------------------------------------- metrics


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side has no variation (no signal to credit)."""
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _metric_set(predicted, truth, control, centroid, genes: np.ndarray, de: np.ndarray) -> dict[str, float]:
    p, t, c, m = predicted[genes], truth[genes], control[genes], centroid[genes]
    return {
        "mse": float(np.mean((p - t) ** 2)),
        "pearson": _pearson(p, t),
        "pearson_delta": _pearson(p - c, t - c),
        "pearson_delta_centroid": _pearson(p - m, t - m),
        "mse_de20": float(np.mean((predicted[de] - truth[de]) ** 2)),
        "pearson_de20": _pearson(predicted[de], truth[de]),
        "pearson_delta_de20": _pearson(predicted[de] - control[de], truth[de] - control[de]),
        "direction_de20": float(np.mean(np.sign(predicted[de] - control[de]) == np.sign(truth[de] - control[de]))),
    }


def perturbation_metrics(
    predicted: np.ndarray,
    truth: np.ndarray,
    control: np.ndarray,
    de: np.ndarray,
    targets: np.ndarray | None = None,
    de_notarget: np.ndarray | None = None,
    centroid: np.ndarray | None = None,
) -> dict[str, float]:
    """The metric set of one held-out perturbation, on pseudobulk means: over all genes and its DE
    genes, and again without its measured `targets` (DE genes `de_notarget`). `centroid` (the
    training perturbations' mean) references the centroid delta; without it, the control."""
    targets = np.asarray([] if targets is None else targets, dtype=np.int64)
    centroid = control if centroid is None else centroid
    everything = np.arange(len(truth))
    others = np.setdiff1d(everything, targets)
    de_notarget = np.setdiff1d(de, targets, assume_unique=True) if de_notarget is None else de_notarget
    out = _metric_set(predicted, truth, control, centroid, everything, de)
    out.update({f"{k}_notarget": v for k, v in _metric_set(predicted, truth, control, centroid, others, de_notarget).items()})
    return out


def evaluate(predictions: dict[str, np.ndarray], data: PerturbationData, test: list[str], train: list[str] | None = None) -> dict:
    """Mean of each metric over the held-out perturbations, and the per-perturbation values.
    `train`: the perturbations the predictions were fitted on (the centroid delta's reference)."""
    return evaluate_folds(predictions, data, [{"train": train or [], "test": list(test)}])


def evaluate_folds(
    predictions: dict[str, np.ndarray], data: PerturbationData, folds: list[dict], only: list[str] | None = None
) -> dict:
    """`evaluate` over folds whose test sets are disjoint (one prediction per perturbation), each
    perturbation referenced to its own fold's training centroid; `only`: score just these."""
    per = {}
    for fold in folds:
        centroid = np.mean([data.means[p] for p in fold["train"]], axis=0) if fold["train"] else None
        for p in fold["test"]:
            if only is None or p in only:
                per[p] = perturbation_metrics(
                    predictions[p],
                    data.means[p],
                    data.control_mean,
                    data.de_genes[p],
                    data.target_indices(p),
                    data.de_genes_notarget[p],
                    centroid,
                )
    means = {m: float(np.mean([v[m] for v in per.values()])) if per else float("nan") for m in METRICS}
    return {**means, "per_perturbation": per}
