"""Predictive intervals and OOD flags for perturbation predictions: the gene-graph head's and the
best baseline's (celltron.finetune.uncertainty does the arithmetic).

Each output is a measured gene of a held-out perturbation. Its interval is the prediction ±
scale x a spread, the scale calibrated per fold on the inner folds over the training
perturbations (split conformal over their genes), never on held-out ones. The spread is, for the
gene-graph head, its members' (ensemble) or dropout passes' standard deviation around their mean;
for the best baseline, which has no spread of its own, the gene's standard deviation over the
training perturbations' means (`gene_scale`: genes that vary more between perturbations get wider
intervals). A perturbation's OOD score is the distance of its embedding (the sum of its targets'
vectors in the co-expression reference, else in the model's gene tokens, else in the graph head's
own node states) to its nearest training perturbations, calibrated on the training perturbations
by leave-one-out in a fixed space, and in the head's node states (trained on them) by the inner
folds' held-out perturbations; with none of these spaces (a baseline without a reference or a
model) there is no OOD score. Perturbations the graph head predicts as the training mean (out of
its reach) have no spread and get no interval; they are counted.

With `interval_strata: predicted_change` (Mondrian conformal) the scale is calibrated twice:
once over the genes each prediction moves most from the control mean (its top n_de by
|prediction − control|, n_de the DE-set size), once over the rest. Which genes those are is
known from the prediction alone, before any truth, so held-out perturbations' DE genes can get
a wider scale without it being chosen on them; coverage on true DE genes rises only as far as
the predicted and the true changes overlap.
"""

from __future__ import annotations

import numpy as np

from celltron.finetune.perturbation import baselines
from celltron.finetune.perturbation.evaluate import evaluate_folds, higher_is_better
from celltron.finetune.perturbation.graph import GraphPrediction
from celltron.finetune.uncertainty import (
    NearestNeighbourOOD,
    conformal_scale,
    error_vs_score,
    floored_spread,
    gaussian_scale,
    interval,
    interval_report,
    plot_error_vs_score,
)


def ood_space(screen) -> tuple[str, dict | None]:
    """The vector space OOD scores are measured in: the co-expression reference, else the
    model's gene tokens, else (None) the graph head's node states."""
    for name in ("coexpression", "model"):
        if screen.gene_embeddings.get(name):
            return name, screen.gene_embeddings[name]
    return "graph", None


GRAPH_CENTRE = "the gene-graph head alone (predictions.h5ad layer graph_plain; graph under --head plain), not the anchored blend"
BASELINE_CENTRE = "the best baseline (predictions.h5ad layer best_baseline)"
MODEL_CENTRE = (
    "the model head (the anchored blend as reported; calibrated on the inner folds that also chose its setting and "
    "weight, so slightly optimistic)"
)
PLAIN_MODEL_CENTRE = (
    "the model head (plain: the model alone; calibrated on inner folds fitted for this calibration alone, "
    "inner_folds extra fits per outer fold)"
)
BASELINE_METHOD = "split conformal, spread = the gene's standard deviation over the training perturbations"


def gene_scale(screen, train: list[str]) -> np.ndarray:
    """Per gene, the standard deviation of the training perturbations' mean expression: the
    baseline's interval spread (a fixed function of the training perturbations alone)."""
    return np.std(np.stack([screen.means[p] for p in train]), axis=0)


def with_gene_scale(screen, predictions: dict[str, np.ndarray], train: list[str]) -> GraphPrediction:
    """`predictions` (of perturbations held out of `train`) with the gene scale of `train` as
    every prediction's spread: a predictor without a spread of its own, made intervalable."""
    scale = gene_scale(screen, train)
    return GraphPrediction(mean=predictions, fell_back=[], spread={p: scale for p in predictions})


def baseline_prediction(screen, name: str, train: list[str], test: list[str]) -> GraphPrediction:
    """Baseline `name` fitted on `train`, predicting `test`, with the gene scale of `train`."""
    return with_gene_scale(screen, baselines.predict(name, screen, train, test)[0], train)


def baseline_inner_predictions(section, screen, folds: list[dict], seed: int) -> list[tuple[dict, GraphPrediction]]:
    """Per inner fold (`baselines.usable_inner_folds` over the training perturbations): the
    baseline chosen on that fold's training perturbations alone, predicting its held-out ones,
    with their gene scale (the baseline's calibration; the anchored heads' inner baselines)."""
    out = []
    for fold in folds:
        best, _ = baselines.choose_baseline(screen, fold["train"], section.headline, seed, section.inner_folds)
        out.append((fold, baseline_prediction(screen, best, fold["train"], fold["test"])))
    return out


class PerturbationUncertainty:
    """Per seed and held-out perturbation: interval coverage, width and the OOD score of one
    predictor (the gene-graph head by default, `centred_on` says which); the intervals
    themselves for predictions.h5ad."""

    def __init__(self, section, screen, graph_of_seed=None, method: str | None = None, centred_on: str = GRAPH_CENTRE):
        self.screen, self.graph_of_seed, self.centred_on = screen, graph_of_seed, centred_on
        self.method = method or section.intervals
        self.level, self.neighbours = section.interval_level, section.ood_neighbours
        self.metric = section.headline
        self.space_name, self.space = ood_space(screen)
        self.records: dict[int, dict[str, dict]] = {}
        self.bounds: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.scales: dict[int, list] = {}
        self.strata = getattr(section, "interval_strata", "none")

    @property
    def scored_space(self) -> str | None:
        """The space OOD scores are measured in, None without one (no reference, model or graph)."""
        return self.space_name if self.space is not None or self.graph_of_seed is not None else None

    def add_fold(self, seed: int, fold: dict, outer, inner: list) -> None:
        """Calibrate on `inner` ([(inner fold, GraphPrediction)] over the training perturbations),
        then record the outer fold's held-out perturbations (`outer`: GraphPrediction)."""
        (rest, changed), reference = self._calibrate(inner)
        self.scales.setdefault(seed, []).append(rest if self.strata == "none" else [rest, changed])
        ood = self._ood(seed, fold, outer, inner)
        scores = evaluate_folds(outer.mean, self.screen, [fold])["per_perturbation"]
        for p in fold["test"]:
            value = scores[p][self.metric]
            record = {"error": 1.0 - value if higher_is_better(self.metric) else value, **ood[p]}
            if outer.spread is not None and p in outer.spread and np.isfinite(rest):
                moved = self._moved(p, outer.mean[p])
                scale = np.where(moved, changed, rest) if self.strata != "none" else rest
                low, high = interval(outer.mean[p], outer.spread[p], scale, reference)
                self.bounds.setdefault(seed, {})[p] = (low, high)
                record.update(self._coverage(p, outer, low, high, reference, moved))
            self.records.setdefault(seed, {})[p] = record

    def _moved(self, p: str, centre: np.ndarray) -> np.ndarray:
        """Genes the prediction `centre` of `p` moves most from the control mean (its top n_de)."""
        n = min(len(self.screen.de_genes[p]), len(centre))
        moved = np.zeros(len(centre), dtype=bool)
        moved[np.argsort(-np.abs(centre - self.screen.control_mean), kind="stable")[:n]] = True
        return moved

    def _calibrate(self, inner: list) -> tuple[tuple[float, float], float]:
        """((scale of the genes a prediction moves least, of those it moves most), the mean
        spread); with interval_strata none both are the one scale over every gene."""
        truth, centre, spread, moved = [], [], [], []
        for _, prediction in inner:
            for p, s in (prediction.spread or {}).items():
                truth.append(self.screen.means[p])
                centre.append(prediction.mean[p])
                spread.append(s)
                moved.append(self._moved(p, prediction.mean[p]))
        if not truth:
            return (float("nan"), float("nan")), float("nan")
        truth, centre, spread, moved = map(np.stack, (truth, centre, spread, moved))
        reference = float(np.mean(spread))
        if self.strata == "none":
            scale = conformal_scale(truth, centre, spread, self.level)
            return (scale, scale), reference
        # each stratum floored as the whole is (the reference is every gene's mean spread)
        floored = floored_spread(spread, reference)
        rest = conformal_scale(truth[~moved], centre[~moved], floored[~moved], self.level)
        return (rest, conformal_scale(truth[moved], centre[moved], floored[moved], self.level)), reference

    def _coverage(self, p: str, outer, low, high, reference: float, moved: np.ndarray) -> dict:
        truth = self.screen.means[p]
        de = self.screen.de_genes_notarget[p]
        gaussian = interval(outer.mean[p], outer.spread[p], gaussian_scale(self.level), reference)
        return {
            **interval_report(truth, low, high),
            "coverage_de": interval_report(truth[de], low[de], high[de])["coverage"],
            "coverage_moved": interval_report(truth[moved], low[moved], high[moved])["coverage"],
            "coverage_gaussian": interval_report(truth, *gaussian)["coverage"],
        }

    def _ood(self, seed: int, fold: dict, outer, inner: list) -> dict[str, dict]:
        vectors = self._vectors(seed, outer)
        if self.scored_space is None:  # no space at all (a baseline without a reference or a model): no score, no flag
            return {p: {"ood_distance": float("nan"), "ood_score": float("nan"), "ood_flagged": False} for p in fold["test"]}
        train = [vectors[p] for p in fold["train"] if vectors.get(p) is not None]
        out = {}
        scorer = None
        if len(train) >= 2:
            scorer = NearestNeighbourOOD(np.stack(train), self.neighbours, calibration=self._inner_distances(seed, inner))
        for p in fold["test"]:
            if scorer is None or vectors.get(p) is None:  # nothing to measure against: flagged
                out[p] = {"ood_distance": float("nan"), "ood_score": float("nan"), "ood_flagged": True}
                continue
            distance, score = float(scorer.distance(vectors[p])[0]), float(scorer.score(vectors[p])[0])
            out[p] = {"ood_distance": distance, "ood_score": score, "ood_flagged": bool(score >= self.level)}
        return out

    def _inner_distances(self, seed: int, inner: list) -> np.ndarray | None:
        """In the head's own node states (a space trained on the training perturbations, which
        flatters them): the distances of each inner fold's held-out perturbations to its training
        ones, in that fold's head's space, as the calibration. None in a fixed space (the
        training perturbations' leave-one-out distances serve) or without inner folds."""
        if self.space is not None or not inner:
            return None
        distances = []
        for fold, prediction in inner:
            vectors = self._vectors(seed, prediction)
            train = [vectors[p] for p in fold["train"] if vectors.get(p) is not None]
            held = [vectors[p] for p in fold["test"] if vectors.get(p) is not None]
            if len(train) >= 2 and held:
                distances.append(NearestNeighbourOOD(np.stack(train), self.neighbours).distance(np.stack(held)))
        return np.concatenate(distances) if distances else None

    def _vectors(self, seed: int, outer) -> dict[str, np.ndarray | None]:
        """Each perturbation's embedding: the sum of its targets' vectors (None if one has none)."""
        if self.space is not None:
            rows = self.space
        elif outer.node_states is not None and self.graph_of_seed is not None:
            graph = self.graph_of_seed(seed)
            rows = {g: outer.node_states[i] for g, i in graph.index.items()}
        else:
            return {}
        out = {}
        for p in self.screen.perturbations:
            genes = self.screen.targets(p)
            out[p] = np.sum([rows[g] for g in genes], axis=0) if all(g in rows for g in genes) else None
        return out

    def summary(self) -> dict:
        """Pooled over seeds and held-out perturbations (a perturbation held out by two seeds
        counts twice: each seed's model predicts it)."""
        units = [r for per_seed in self.records.values() for r in per_seed.values()]
        with_interval = [r for r in units if "coverage" in r]
        flagged = [r for r in units if r["ood_flagged"]]
        unflagged = [r for r in units if not r["ood_flagged"]]
        measured = [r for r in units if np.isfinite(r["ood_distance"])]
        return {
            "method": self.method,
            "level": self.level,
            "calibrated_on": "inner folds over each fold's training perturbations (split conformal over their genes)",
            "centred_on": self.centred_on,
            "scale_per_seed": {str(s): v for s, v in self.scales.items()},
            "n_units": len(units),
            "n_with_interval": len(with_interval),
            "coverage": _mean(with_interval, "coverage"),
            "coverage_de_notarget": _mean(with_interval, "coverage_de"),
            "strata": self.strata,
            "coverage_predicted_change": _mean(with_interval, "coverage_moved"),
            "coverage_gaussian": _mean(with_interval, "coverage_gaussian"),
            "mean_width": _mean(with_interval, "mean_width"),
            "ood": {
                "space": self.scored_space,
                "neighbours": self.neighbours,
                "flag": self._flag_rule(),
                "n_flagged": len(flagged),
                "error": f"1 - {self.metric}" if higher_is_better(self.metric) else self.metric,
                "error_flagged": _mean(flagged, "error"),
                "error_unflagged": _mean(unflagged, "error"),
                **error_vs_score([r["error"] for r in measured], [r["ood_distance"] for r in measured]),
            },
            "per_seed": {str(s): per for s, per in self.records.items()},
        }

    def _flag_rule(self) -> str:
        if self.scored_space is None:
            return "none: no space to measure a distance in"
        calibration = "leave-one-out ones" if self.space is not None else "held out of inner folds, in those folds' heads"
        return f"distance beyond {self.level:g} of the calibration distances (training perturbations' {calibration})"

    def plot(self, png) -> None:
        units = [r for per_seed in self.records.values() for r in per_seed.values() if np.isfinite(r["ood_distance"])]
        if units:
            plot_error_vs_score(
                png,
                [r["error"] for r in units],
                [r["ood_distance"] for r in units],
                [r["ood_flagged"] for r in units],
                f"{self.centred_on.split(' (')[0]}, held-out perturbations ({self.space_name} space)",
                f"error (1 - {self.metric})" if higher_is_better(self.metric) else self.metric,
                "distance to the nearest training perturbations",
            )


def _mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r and np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")
