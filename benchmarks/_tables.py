"""Markdown tables of results averaged over seeds, shared by the fine-tuning benchmarks."""

from __future__ import annotations


def mean_std_table(rows, columns) -> str:
    """One row per (name, metrics): each cell `mean ± std` from `metrics[column]` and
    `metrics["std"][column]` (std 0 when missing), `n/a` where the metric is absent."""
    lines = ["| predictor | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows:
        spreads = metrics.get("std") or {}
        cells = ["n/a" if metrics.get(c) is None else f"{metrics[c]:.3f} ± {spreads.get(c) or 0:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
