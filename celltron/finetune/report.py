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
    lines = ["".ljust(width) + "".join(c.rjust(22) for c in columns)]
    for name, result in rows:
        cells = []
        for column in columns:
            mean, spread = result.get(column), (result.get("std") or {}).get(column)
            cells.append(
                "n/a".rjust(22) if mean is None or not np.isfinite(mean) else f"{mean:.3f} ± {spread or 0:.3f}".rjust(22)
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
