"""Gene-token embeddings from a truncated SVD of the corpus against random initialisation: the
same small Geneformer pretrained twice on the PBMC corpus, same seed and steps, differing only in
`model.init_gene_embeddings`; validation masked-gene loss and accuracy at each evaluation, and
what the SVD pass costs.

    python -m benchmarks.svd_init                       # 300 steps each (about 5 minutes per run on 2 CPU cores)
    python -m benchmarks.svd_init --steps 1500 --val-every 250
    python -m benchmarks.svd_init --parallel            # both runs at once, half the threads each

The corpus is built first when it is missing (the command of configs/pretrain/geneformer_pbmc.yaml).
Runs go to runs/svd_init_bench/{random,svd}/ and are replaced each time.

Then downstream (`--no-downstream` skips it): both exported models embed the same seeded sample of
labelled PBMC 4k cells (never pretrained on; the sample of benchmarks/embedding.py --variants),
last layer, mean pooling, and kNN labels are scored on the same outer folds as PCA of the same
cells; printed: each model against PCA and svd − random per fold, each with its 95% interval.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks._data import add_shared_data_option

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pretrain" / "geneformer_pbmc.yaml"
INITS = ("random", "svd")
PBMC_INPUTS = ("10x_pbmc3k_2700cells_raw.h5ad", "scWGParis_*.h5ad")


def ensure_corpus(corpus: Path, shared_data: Path) -> None:
    """Build the PBMC corpus as the config's header says, unless it is there."""
    if (corpus / "manifest.json").exists():
        return
    inputs = sorted(p for pattern in PBMC_INPUTS for p in (shared_data / "scrna" / "human").glob(pattern))
    if not inputs:
        raise SystemExit(f"no PBMC inputs under {shared_data / 'scrna' / 'human'}; pass --shared-data DIR")
    command = [sys.executable, "-m", "celltron.cli", "corpus", "build", *map(str, inputs), "--out", str(corpus)]
    subprocess.run([*command, "--config", str(ROOT / "configs" / "corpus" / "pbmc.yaml")], check=True)


def svd_pass(config, corpus: str) -> dict:
    """The SVD pass alone, as the svd run does it (its tokenizer, hidden size and cell cap)."""
    from celltron.corpus.store import Corpus
    from celltron.pretrain.data import corpus_tokenizer
    from celltron.pretrain.svd_init import corpus_gene_vectors

    opened = Corpus(corpus)
    tokenizer = corpus_tokenizer(opened, config.tokenizer.scheme, config.tokenizer.max_len, config.trainer.seed)
    found = corpus_gene_vectors(opened, tokenizer.vocab, config.model.overrides["hidden_size"], config.model.svd_cells)
    return {
        "cells": found.cells,
        "gene tokens": len(found.token_ids),
        "vocabulary": len(tokenizer.vocab),
        "seconds": found.seconds,
        "FD bound": found.relative_error,
    }


def pretrain_once(config, init: str, out: Path) -> None:
    from celltron.pretrain.config import replace
    from celltron.pretrain.run import pretrain

    if out.exists():
        shutil.rmtree(out)  # a fresh run each time (the folder is this benchmark's own)
    pretrain(replace(config, model={"init_gene_embeddings": init}), out)


def pretrain_both_at_once(args, out: Path) -> None:
    """The two runs as two processes sharing the cores, each with half of the threads."""
    threads = str(max((os.cpu_count() or 2) // 2, 1))
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    common = ["--corpus", str(args.corpus), "--out", str(out), "--steps", str(args.steps), "--val-every", str(args.val_every)]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.svd_init", *common, "--seed", str(args.seed), "--only", init], env=environment
        )
        for init in INITS
    ]
    if any(run.wait() for run in runs):
        raise SystemExit("a pretraining run failed (its error is above)")


def evaluations(run_dir: Path) -> dict:
    """{step: (val loss, val accuracy, train loss)} from a run's metrics.csv."""
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    train = {int(r["step"]): float(r["loss"]) for r in rows if r["loss"]}
    return {
        int(r["step"]): (float(r["val_loss"]), float(r["val_masked_accuracy"]), train.get(int(r["step"]), float("nan")))
        for r in rows
        if r["val_loss"]
    }


def wall_seconds(run_dir: Path) -> float:
    """From the run's config (written first) to its export (written last)."""
    return (run_dir / "export").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT / "runs" / "pbmc_corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "svd_init_bench")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", action="store_true", help="run the two pretrainings at once, half the threads each")
    parser.add_argument("--only", choices=INITS, help="run only this pretraining (what --parallel starts)")
    parser.add_argument("--no-downstream", action="store_true", help="skip the kNN-label comparison of the embeddings")
    parser.add_argument("--cells", type=int, default=1000, help="downstream: a seeded sample of this many labelled cells")
    parser.add_argument("--folds", type=int, default=10, help="downstream: outer folds (10: bootstrap intervals)")
    add_shared_data_option(parser)
    args = parser.parse_args()

    from celltron.pretrain.config import load_config, replace

    ensure_corpus(args.corpus, args.shared_data)
    config = replace(
        load_config(CONFIG),
        data={"corpus": str(args.corpus)},
        trainer={
            "max_steps": args.steps,
            "val_every": args.val_every,
            "log_every": args.val_every,
            "checkpoint_every": args.steps,
            "seed": args.seed,
        },
        logging={"progress_bar": False, "wandb": False},
    )
    if args.only:
        pretrain_once(config, args.only, args.out / args.only)
        return
    if args.parallel:
        pretrain_both_at_once(args, args.out)
    else:
        for init in INITS:
            pretrain_once(config, init, args.out / init)
    cost = svd_pass(config, str(args.corpus))  # alone, after the runs: the svd run paid it too
    report(config, args, cost, {init: args.out / init for init in INITS})
    if not args.no_downstream:
        print(downstream({init: args.out / init / "export" for init in INITS}, args))


def report(config, args, cost: dict, runs: dict) -> None:
    print(f"Geneformer {config.model.overrides} on {args.corpus.name}, seed {args.seed}, {args.steps} steps")
    print(
        f"SVD pass: {cost['cells']} cells, {cost['gene tokens']} of {cost['vocabulary']} tokens, "
        f"{cost['seconds']:.1f} s (FD error bound {cost['FD bound']:.3f} of the top eigenvalue)\n"
    )
    print(
        "| step | val loss random | val loss svd | Δ (svd − random) | val acc random | val acc svd | train loss random | train loss svd |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    random, svd = evaluations(runs["random"]), evaluations(runs["svd"])
    for step in sorted(set(random) & set(svd)):
        (rl, ra, rt), (sl, sa, st) = random[step], svd[step]
        print(f"| {step} | {rl:.3f} | {sl:.3f} | {sl - rl:+.3f} | {ra:.3f} | {sa:.3f} | {rt:.3f} | {st:.3f} |")
    print(
        f"\nwall time: random {wall_seconds(runs['random']):.0f} s, svd {wall_seconds(runs['svd']):.0f} s (including its SVD pass)"
    )


def downstream(models: dict[str, Path], args) -> str:
    """kNN labels from each model's cell embeddings on the same folds as PCA; the per-fold
    differences from PCA and svd − random, each with its 95% interval."""
    from benchmarks.embedding import COLUMNS, LABEL, difference, embed_variants, labelled_copy, sampled_copy, variants
    from celltron.cli import main as celltron
    from celltron.finetune.report import mean_interval, verdict

    folder = args.out / "downstream"
    folder.mkdir(parents=True, exist_ok=True)
    sample = sampled_copy(labelled_copy(args.shared_data, folder), folder, args.cells)
    keys = {init: f"X_{init}" for init in models}
    for init, model in models.items():
        embed_variants(model, sample, {keys[init]: variants(1)["X_last_mean"]})
    scores = folder / "scores"
    command = ["evaluate-embedding", "--data", str(sample), "--label-key", LABEL, "--out", str(scores), "--no-umap"]
    assert celltron([*command, "--key", *keys.values(), "--folds", str(args.folds)]) == 0
    metrics = json.loads((scores / "metrics.json").read_text())
    found = {init: metrics["variants"][key] for init, key in keys.items()}
    lines = [
        f"\nDownstream: kNN labels of {metrics['split']['n_cells']} labelled PBMC 4k cells, "
        f"{metrics['split']['folds']} folds (last layer, mean pooling)\n",
        "| embedding | " + " | ".join(COLUMNS) + " | " + " | ".join(f"Δ {m} vs PCA" for m in COLUMNS) + " |",
        "|---" * (1 + 2 * len(COLUMNS)) + "|",
    ]
    for init, variant in found.items():
        cells = [f"{variant[m]:.3f} ± {variant['std'][m]:.3f}" for m in COLUMNS]
        lines.append(f"| {init} init | " + " | ".join(cells + [difference(variant["paired"][m]) for m in COLUMNS]) + " |")
    pca = metrics["baselines"]["pca_knn"]
    lines.append("| PCA | " + " | ".join(f"{pca[m]:.3f} ± {pca['std'][m]:.3f}" for m in COLUMNS) + " |" + " |" * len(COLUMNS))
    for metric in COLUMNS:
        per_fold = zip(found["svd"]["per_fold"], found["random"]["per_fold"])
        d = mean_interval([svd[metric] - random[metric] for svd, random in per_fold])
        d["improvement"] = {k: d[k] for k in ("mean", "low", "high")}
        said = verdict(d).replace("the model", "SVD initialisation").replace("the baseline", "random initialisation")
        lines.append(f"- svd − random on {metric}, per fold: {difference(d)} — {said}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
