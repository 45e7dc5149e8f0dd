"""GRN inference on real PBMCs against TRRUST: each model method beside the co-expression and
GENIE3-style baselines, over several seeded samples of cells.

    python -m benchmarks.grn --model runs/pbmc_geneformer/export --out runs/bench/grn
    python -m benchmarks.grn --model benchmark:geneformer --random-init --methods embedding attention

`--model benchmark:<family>` takes the family's cached benchmark model (benchmarks/_pretrained.py);
`--random-init` also runs every method with the same architecture from random weights and prints,
per method, the model alone pretrained − random init on the AUPRC ratio, paired per held-out
block (folds x seeds), with its interval: did pretraining help?

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
from benchmarks._pretrained import resolve_model, resolve_random_init
from benchmarks._tables import mean_std_table
from celltron.cli import main as celltron

FILES = ("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad", "grn/trrust_rawdata.human.tsv")  # data, truth: in the shared data
METHODS = ("embedding", "attention", "in-silico")
COLUMNS = ("auprc_ratio", "epr")
EXTRAS = ("speed", "paired", "model_plain", "choices", "coverage")


def run(
    shared_data: Path,
    model: Path,
    out: Path,
    seeds: list[int],
    cells: int,
    genes: int,
    tokens: str = "candidates",
    methods=METHODS,
    prefix: str = "",
) -> dict:
    data, truth = shared_paths(shared_data, *FILES)
    results: dict = {}
    for method in methods:
        for seed in seeds:
            folder = out / f"{prefix}{method}_{tokens}_seed{seed}"
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
                            "--tokens",
                            tokens,
                        ]
                    )
                    == 0
                )
            metrics = json.loads((folder / "metrics.json").read_text())
            results.setdefault(f"model: {method}", []).append(metrics["model"])
            results.setdefault("paired", []).append((method, seed, metrics["paired"]))
            results.setdefault("model_plain", []).append((method, seed, metrics["model_plain"]))
            results.setdefault("choices", []).append((method, seed, metrics["best_baseline"]))
            results.setdefault("coverage", []).append((method, seed, metrics["coverage"]))
            if method == methods[0]:
                for name, baseline in metrics["baselines"].items():
                    results.setdefault(f"baseline: {name}", []).append(baseline)
            if "cells_x_tfs_per_second" in metrics:
                results.setdefault("speed", []).append(metrics["cells_x_tfs_per_second"])
    return results


def pretrained_minus_random(pretrained: dict, random: dict) -> str:
    """Per method, the model alone (no baseline blended in) pretrained − random init on the AUPRC
    ratio of each held-out TF x target block, paired over folds and seeds, with its interval."""
    from celltron.finetune.report import mean_interval, verdict

    def per_block(results: dict) -> dict:
        blocks: dict = {}
        for method, seed, plain in results.get("model_plain", []):
            for i, fold in enumerate((plain or {}).get("folds", [])):
                blocks.setdefault(method, {})[(seed, i)] = fold["auprc_ratio"]
        return blocks

    ours, theirs = per_block(pretrained), per_block(random)
    lines = []
    for method in ours:
        units = sorted(set(ours[method]) & set(theirs.get(method, {})))
        d = mean_interval([ours[method][u] - theirs[method][u] for u in units])
        d["improvement"] = {k: d[k] for k in ("mean", "low", "high")}
        said = verdict(d).replace("the model", "pretraining").replace("the baseline", "random init")
        mean_random = np.nanmean([theirs[method][u] for u in units])
        lines.append(
            f"\n- {method}: model alone, random init AUPRC ratio {mean_random:.2f}; pretrained − random init per block: "
            f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] over {len(units)} blocks — {said}"
        )
    return "".join(lines)


def table(results: dict) -> str:
    rows = [
        (name, {**{c: np.mean([r[c] for r in runs]) for c in COLUMNS}, "std": {c: np.std([r[c] for r in runs]) for c in COLUMNS}})
        for name, runs in results.items()
        if name not in EXTRAS
    ]
    plain = {}
    for method, _, result in results.get("model_plain", []):
        if result:
            plain.setdefault(f"model alone: {method}", []).append(result)
    rows += [
        (name, {**{c: np.mean([r[c] for r in runs]) for c in COLUMNS}, "std": {c: np.std([r[c] for r in runs]) for c in COLUMNS}})
        for name, runs in plain.items()
    ]
    text = mean_std_table(rows, COLUMNS)
    for method, seed, d in results.get("paired", []):
        text += (
            f"\n- {method}, seed {seed}: anchored head − {'/'.join(dict.fromkeys(d['baselines']))} on {d['metric']}: "
            f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] — {d['verdict']}"
        )
    for method, seed, picks in results.get("choices", []):
        chosen = ", ".join(
            f"{p['name']} w={p.get('weight', 'n/a')}" + (f" view={p['model_view']}" if "model_view" in p else "") for p in picks
        )
        text += f"\n- {method}, seed {seed}, per fold (chosen on training edges): {chosen}"
    for method, seed, c in results.get("coverage", []):
        text += (
            f"\n- {method}, seed {seed}: truth edges scoreable ({c['scoreable_when']}) of {c['truth_edges']}: "
            f"tokenizer's tokens {c['tokenizer']['truth_edges']}, candidates first {c['candidates']['truth_edges']}; "
            f"candidate pairs {c['tokenizer']['candidate_pairs']} -> {c['candidates']['candidate_pairs']} of {c['candidate_pairs']}"
        )
    if "speed" in results:
        text += f"\n\nin-silico deletion: {np.mean(results['speed']):.1f} cells x TFs per second"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="runs/pbmc_geneformer/export",
        help="a pretrained model folder, or benchmark:geneformer|scgpt|genecompass for the cached benchmark model",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/grn"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--genes", type=int, default=1000, help="targets: the most variable genes")
    parser.add_argument("--tokens", choices=["candidates", "tokenizer"], default="candidates", help="celltron grn --tokens")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--random-init", action="store_true", help="also the same architecture from random weights, paired")
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model, shared_data=args.shared_data)
    options = (args.seeds, args.cells, args.genes, args.tokens, args.methods)
    results = run(args.shared_data, model, args.out, *options)
    print(table(results))
    if args.random_init:
        random = resolve_random_init(args.model, model, args.out / "random_init_model", shared_data=args.shared_data)
        random_results = run(args.shared_data, random, args.out, *options, prefix="random_init_")
        print("\n### random init (same architecture, random weights)\n")
        print(table(random_results))
        print("\n### pretrained − random init (did pretraining help?)" + pretrained_minus_random(results, random_results))


if __name__ == "__main__":
    main()
