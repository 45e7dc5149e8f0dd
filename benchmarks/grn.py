"""GRN inference on real PBMCs against TRRUST: each model method beside the co-expression and
GENIE3-style baselines, over several seeded samples of cells.

    python -m benchmarks.grn --model runs/pbmc_geneformer/export --out runs/bench/grn

The data is the labelled PBMC 4k set (kept out of the pretraining corpus); the truth is TRRUST
v2 human. Every method is scored on the held-out blocks of a TF x target block split (TFs and
targets held out together), beside the degree prior (training TFs' edges only). Prints a
markdown table of AUPRC ratio and EPR (mean ± spread over seeds) and, per method and seed, the
model − best baseline (chosen on training edges) with its bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._tables import mean_std_table
from celltron.cli import main as celltron

FILES = ("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad", "grn/trrust_rawdata.human.tsv")  # data, truth: in the shared data
METHODS = ("embedding", "attention", "in-silico")
COLUMNS = ("auprc_ratio", "epr")


def run(shared_data: Path, model: Path, out: Path, seeds: list[int], cells: int, genes: int) -> dict:
    data, truth = shared_paths(shared_data, *FILES)
    results: dict = {}
    for method in METHODS:
        for seed in seeds:
            folder = out / f"{method}_seed{seed}"
            if not (folder / "metrics.json").exists():
                assert (
                    celltron(
                        [
                            "grn",
                            "--model",
                            str(model),
                            "--data",
                            str(data),
                            "--gene-column",
                            "gene_symbol_original",
                            "--truth",
                            str(truth),
                            "--method",
                            method,
                            "--out",
                            str(folder),
                            "--seed",
                            str(seed),
                            "--max-cells",
                            str(cells),
                            "--top-genes",
                            str(genes),
                        ]
                    )
                    == 0
                )
            metrics = json.loads((folder / "metrics.json").read_text())
            results.setdefault(f"model: {method}", []).append(metrics["model"])
            results.setdefault("paired", []).append((method, seed, metrics["paired"]))
            if method == METHODS[0]:
                for name, baseline in metrics["baselines"].items():
                    results.setdefault(f"baseline: {name}", []).append(baseline)
            if "cells_x_tfs_per_second" in metrics:
                results.setdefault("speed", []).append(metrics["cells_x_tfs_per_second"])
    return results


def table(results: dict) -> str:
    rows = [
        (name, {**{c: np.mean([r[c] for r in runs]) for c in COLUMNS}, "std": {c: np.std([r[c] for r in runs]) for c in COLUMNS}})
        for name, runs in results.items()
        if name not in ("speed", "paired")
    ]
    text = mean_std_table(rows, COLUMNS)
    for method, seed, d in results.get("paired", []):
        text += (
            f"\n- {method}, seed {seed}: model − {'/'.join(dict.fromkeys(d['baselines']))} on {d['metric']}: {d['mean']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}] — {d['verdict']}"
        )
    if "speed" in results:
        text += f"\n\nin-silico deletion: {np.mean(results['speed']):.1f} cells x TFs per second"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/pbmc_geneformer/export"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/grn"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--genes", type=int, default=1000, help="targets: the most variable genes")
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(table(run(args.shared_data, args.model, args.out, args.seeds, args.cells, args.genes)))


if __name__ == "__main__":
    main()
