"""What every fine-tuning task writes: metrics aggregated over seeds (mean, spread, per-seed
and per-item values), `metrics.json` written atomically, a printed table of the model beside
its baselines, and a PNG of the main result."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from celltron.inputs import read_json
from celltron.io import write_file_atomically, write_json_atomically


def aggregate(per_seed: dict[int, dict], metrics: tuple[str, ...], item_key: str) -> dict:
    """{METRIC: mean over seeds, "std": {METRIC: spread}, "per_seed": {...}, item_key: {seed: ...}}
    from one evaluation per seed (each {METRIC: value, item_key: {...}})."""
    out: dict = {}
    for metric in metrics:
        values = [per_seed[s][metric] for s in per_seed if np.isfinite(per_seed[s][metric])]
        out[metric] = float(np.mean(values)) if values else float("nan")
        out.setdefault("std", {})[metric] = float(np.std(values)) if len(values) > 1 else 0.0 if values else float("nan")
    out["per_seed"] = {str(s): {m: per_seed[s][m] for m in metrics} for s in per_seed}
    out[item_key] = {str(s): per_seed[s][item_key] for s in per_seed}
    return out


def _json_safe(value):
    """NaN (no defined correlation) as null, so the file is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def write_metrics(path: Path, metrics: dict) -> Path:
    write_json_atomically(path, _json_safe(metrics))
    return path


def read_metrics(path) -> dict:
    return read_json(path, "metrics file", "pass a metrics.json written by `celltron finetune` or `celltron grn`")


def results_table(metrics: dict, columns: tuple[str, ...], notes: dict[str, str] | None = None) -> str:
    """Rows: the model (when trained) and each baseline; cells: mean ± spread over seeds."""
    rows = ([("model", metrics["model"])] if metrics.get("model") else []) + list(metrics["baselines"].items())
    width = max(len(name) for name, _ in rows) + 2
    cell = max(22, *(len(c) + 2 for c in columns))
    lines = ["".ljust(width) + "".join(c.rjust(cell) for c in columns)]
    for name, result in rows:
        cells = []
        for column in columns:
            mean, spread = result.get(column), (result.get("std") or {}).get(column)
            cells.append(
                "n/a".rjust(cell) if mean is None or not np.isfinite(mean) else f"{mean:.3f} ± {spread or 0:.3f}".rjust(cell)
            )
        lines.append(name.ljust(width) + "".join(cells))
    for name, note in (notes or {}).items():
        lines.append(f"{name}: {note}")
    return "\n".join(lines)


def plot_bars(metrics: dict, metric: str, png: Path, title: str) -> Path:
    """Bar chart of one metric for the model and its baselines, spread over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ([("model", metrics["model"])] if metrics.get("model") else []) + list(metrics["baselines"].items())
    names = [name for name, _ in rows]
    means = [np.nan_to_num(result.get(metric, np.nan) if result.get(metric) is not None else np.nan) for _, result in rows]
    spreads = [np.nan_to_num((result.get("std") or {}).get(metric) or 0.0) for _, result in rows]
    figure, axes = plt.subplots(figsize=(1.4 * len(names) + 2, 3.5))
    axes.bar(names, means, yerr=spreads, color=["#c44e52" if n == "model" else "#8c8c8c" for n in names], capsize=4)
    axes.set_ylabel(metric)
    axes.set_title(title)
    figure.tight_layout()
    return save_figure(figure, png)


def save_figure(figure, png: Path) -> Path:
    """Write a matplotlib figure to `png` under a temporary name, then rename; closes it."""
    import matplotlib.pyplot as plt

    try:
        return write_file_atomically(png, lambda tmp: figure.savefig(tmp, dpi=120))
    finally:
        plt.close(figure)


# ---------------------------------------------------------------- model against the best baseline

BOOTSTRAP_SAMPLES = 2000
MIN_BOOTSTRAP_UNITS = 10  # fewer units: a Student t interval (a percentile bootstrap is too narrow there)


def mean_interval(values, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of `values` (one per unit: perturbation, drug, TF, fold) with a `level` interval:
    a percentile bootstrap over units from MIN_BOOTSTRAP_UNITS units on, a Student t interval
    below. Non-finite values are left out; {"mean", "low", "high", "n_units", "interval"}."""
    from scipy import stats

    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n_units": 0, "interval": "none"}
    mean = float(values.mean())
    if n == 1:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n_units": 1, "interval": "none"}
    tail = (1 - level) / 2
    if n >= MIN_BOOTSTRAP_UNITS:
        draws = np.random.default_rng(seed).integers(0, n, (BOOTSTRAP_SAMPLES, n))
        low, high = np.quantile(values[draws].mean(1), [tail, 1 - tail])
        kind = "bootstrap"
    else:
        half = stats.t.ppf(1 - tail, n - 1) * values.std(ddof=1) / np.sqrt(n)
        low, high, kind = mean - half, mean + half, "t"
    return {"mean": mean, "low": float(low), "high": float(high), "n_units": n, "interval": kind}


def paired_difference(model: dict, baseline: dict, higher_is_better: bool = True, seed: int = 0) -> dict:
    """Per-unit model − baseline over the units both score (dicts unit -> value), as
    `mean_interval`, with `improvement` the difference signed so that > 0 favours the model."""
    units = sorted(u for u in model if u in baseline and _finite(model[u]) and _finite(baseline[u]))
    sign = 1.0 if higher_is_better else -1.0
    out = mean_interval([model[u] - baseline[u] for u in units], seed=seed)
    out["units"] = units
    out["improvement"] = {k: sign * out[k] for k in ("mean", "low", "high")}
    if not higher_is_better:  # the interval's ends swap when the sign does
        out["improvement"]["low"], out["improvement"]["high"] = out["improvement"]["high"], out["improvement"]["low"]
    return out


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


def verdict(difference: dict) -> str:
    """Whether the model added signal beyond the baseline: the interval of the improvement
    lies above zero (adds), below it (worse), or straddles it (no detectable difference)."""
    low, high = difference["improvement"]["low"], difference["improvement"]["high"]
    if not (_finite(low) and _finite(high)):
        return "too few units to tell"
    if low > 0:
        return "the model adds signal beyond the baseline"
    if high < 0:
        return "the model is worse than the baseline"
    return "no detectable difference: the model adds nothing measurable beyond the baseline"


def verdict_line(metric: str, baseline: str, difference: dict, unit: str, chosen_on: str | None = "training units") -> str:
    """One printed line: the model against the named baseline, the difference with its interval.
    `chosen_on`: what the baseline was chosen on; None when it is the only baseline."""
    d = difference
    how = f"best baseline, chosen on {chosen_on}" if chosen_on else "the only baseline"
    bounds = f"[{d['low']:+.3f}, {d['high']:+.3f}]" if _finite(d["low"]) and _finite(d["high"]) else "(no interval)"
    units = f"{d['n_units']} {unit}" if d["n_units"] != 1 else f"1 {unit.removesuffix('s')}"
    return f"model − {baseline} ({how}) on {metric}: {d['mean']:+.3f} {bounds} over {units} — {verdict(d)}"


def anchor(baseline: np.ndarray, model: np.ndarray, weight: float) -> np.ndarray:
    """The anchored head's prediction: the baseline plus `weight` times the model's residual from
    it (weight 0: the baseline itself, bit for bit)."""
    return baseline if weight == 0 else baseline + weight * (model - baseline)


TIE_TOLERANCE = 1e-9  # relative: scores this close are the same score computed in another order


def choose_best(scores: dict[str, float], higher_is_better: bool = True) -> str:
    """The name with the best finite score (ties: the first named); scores come from training units.
    Scores within TIE_TOLERANCE of the best tie: a blend w x model + (1 − w) x baseline equal to
    the baseline scores differently in the last bits for each w, and such noise must not pick a
    larger weight over the baseline's own."""
    finite = {k: float(v) for k, v in scores.items() if _finite(v)}
    if not finite:
        return next(iter(scores))
    best = max(finite.values()) if higher_is_better else min(finite.values())
    return next(k for k, v in finite.items() if abs(v - best) <= tie_tolerance(best))


def tie_tolerance(score: float) -> float:
    """How close two scores near `score` must be to be the same score computed in another order."""
    return TIE_TOLERANCE * max(1.0, abs(score) if np.isfinite(score) else 1.0)


CHOICE_RESAMPLES = 200  # bootstrap draws of inner held-out units behind each anchor-weight choice


def unit_resamples(n_units: int, n: int = CHOICE_RESAMPLES, seed=0) -> np.ndarray:
    """(n, n_units) indices of units drawn with replacement; one draw shared by every weight
    makes their differences paired."""
    return np.random.default_rng(seed).integers(0, n_units, (n, n_units))


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` share of the finite `values` (NaN when fewer than two)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def earned_weight(weights, scores: dict, resampled: dict, higher_is_better: bool = True) -> dict:
    """The anchored head's weight rule, one for every task: the smallest weight (the baseline's
    side), unless a larger weight improves on it beyond the 95% interval of the paired gain over
    resampled inner held-out units; of those that do, the best (ties: the smaller).
    `scores`: {weight: inner held-out score}; `resampled`: {weight: that score on each of the same
    unit draws}. A best-of-grid choice takes gains that are noise of a few inner units, and on
    the benchmarks and on simulated tasks those weights cost held-out units more than their
    interval (benchmarks/weight_rule.py, BENCHMARKS.md). {"weight", "weight_scores", "gain_low"}."""
    weights = sorted(float(w) for w in weights)
    sign = 1.0 if higher_is_better else -1.0
    smallest = np.asarray(resampled[weights[0]], dtype=np.float64)
    gain_low = {
        str(w): percentile_interval(sign * (np.asarray(resampled[w], dtype=np.float64) - smallest))[0] for w in weights[1:]
    }
    as_text = {str(w): float(scores[w]) for w in weights}
    # a gain within TIE_TOLERANCE is the same score computed in another order (a blend whose
    # per-unit correlation equals the baseline's), and rounding can make it "significant"
    floor = tie_tolerance(as_text[str(weights[0])])
    earned = {w: as_text[w] for w, low in gain_low.items() if np.isfinite(low) and low > floor}
    weight = float(choose_best(earned, higher_is_better)) if earned else weights[0]
    return {"weight": weight, "weight_scores": as_text, "gain_low": gain_low}


class UnitScore:
    """A score over a set of held-out units that can be recomputed on resampled units: either
    the mean of per-unit values (`of_units`) or a function of the units drawn (`recomputed`,
    e.g. macro-F1 over cells)."""

    def __init__(self, n_units: int, value: float, on_rows):
        self.n_units, self.value, self._on_rows = n_units, float(value), on_rows

    @classmethod
    def of_units(cls, values) -> UnitScore:
        """The mean of finite per-unit values; a draw's score is the mean of its units'."""
        values = np.asarray(values, dtype=np.float64)

        def on_rows(draws: np.ndarray) -> np.ndarray:
            picked = values[draws]
            finite = np.isfinite(picked)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(finite, picked, 0).sum(1) / finite.sum(1)

        finite = values[np.isfinite(values)]
        return cls(len(values), finite.mean() if len(finite) else np.nan, on_rows)

    @classmethod
    def recomputed(cls, n_units: int, score) -> UnitScore:
        """`score(rows)` on the units at `rows` (None: all of them, in order)."""
        return cls(n_units, score(None), lambda draws: np.array([score(rows) for rows in draws]))

    def resampled(self, draws: np.ndarray) -> np.ndarray:
        """The score on each row of unit draws (`unit_resamples(self.n_units, ...)`)."""
        return self._on_rows(draws)


def choose_weight(by_weight: dict, higher_is_better: bool = True, resamples: int = CHOICE_RESAMPLES, seed=0) -> dict:
    """`earned_weight` from inner folds: `by_weight` is {weight: [UnitScore of each inner fold]}
    (the same folds, in the same order, for every weight). A weight's score is the mean over
    folds; each fold's units are resampled (the same draws for every weight), and a draw's score
    is the mean over folds of the fold's resampled scores. Folds without a finite score are left
    out of both means."""
    folds = len(next(iter(by_weight.values())))
    scores, resampled = {}, {}
    for w, per_fold in by_weight.items():
        draws = [
            per_fold[k].resampled(unit_resamples(per_fold[k].n_units, resamples, seed=[*np.atleast_1d(seed), k]))
            if per_fold[k].n_units
            else np.full(resamples, np.nan)
            for k in range(folds)
        ]
        scores[w] = finite_mean([fold.value for fold in per_fold])
        stacked = np.vstack(draws)
        finite = np.isfinite(stacked)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled[w] = np.where(finite, stacked, 0).sum(0) / finite.sum(0)
    return earned_weight(list(by_weight), scores, resampled, higher_is_better)


def finite_mean(values) -> float:
    """The mean of the finite values (NaN when there is none)."""
    finite = [v for v in values if _finite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def paired_over_seeds(model: dict, baseline: dict, metric: str, unit: str, names: str) -> dict:
    """`paired_difference` of per-unit values from several seeds ({seed: {unit: value}} each, the
    baseline being that seed's chosen one): a unit held out under several seeds counts once, its
    model and baseline values averaged over the seeds where both are finite. Adds the metric,
    the baseline's `names`, the `unit` and the verdict."""
    model_values, baseline_values = {}, {}
    for seed, values in model.items():
        for key, value in values.items():
            other = baseline[seed].get(key)
            if _finite(value) and _finite(other):
                model_values.setdefault(key, []).append(value)
                baseline_values.setdefault(key, []).append(other)
    difference = paired_difference(
        {k: float(np.mean(v)) for k, v in model_values.items()}, {k: float(np.mean(v)) for k, v in baseline_values.items()}
    )
    return {**difference, "metric": metric, "baseline": names, "unit": unit, "verdict": verdict(difference)}


def print_baseline_choice(metrics: dict, metric: str) -> None:
    """The printed account of a task whose best baseline is chosen per seed ("best_baseline":
    {"chosen_on", "per_seed": {seed: {"name", "score"[, "weight"]}}}): the anchored head's weights,
    then the model against that baseline, or (baselines alone) which baseline each seed chose."""
    best, paired = metrics["best_baseline"], metrics.get("paired")
    if metrics.get("head") == "anchored":
        weights = ", ".join(f"seed {seed}: {c['weight']:g}" for seed, c in best["per_seed"].items() if "weight" in c)
        print(f"anchored head: best baseline + w x (model − best baseline), w chosen on {best['chosen_on']}: {weights}")
    if paired:
        print(verdict_line(metric, paired["baseline"], paired, paired["unit"], chosen_on=best["chosen_on"]))
        return
    chosen = ", ".join(f"seed {seed}: {c['name']} ({c['score']:.3f})" for seed, c in best["per_seed"].items())
    print(f"best baseline on {metric} (chosen on {best['chosen_on']}): {chosen}")
