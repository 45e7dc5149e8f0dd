"""Do knowledge priors help a GeneCompass model? The same config, corpus, steps and seeds with no
prior, the GRN prior, the co-expression prior and both; each model's cell embeddings of the
labelled PBMC 4k set (never pretrained on) scored by kNN on the same folds, and each run's
validation losses; as a control, the same architecture untrained (random weights) with and
without the co-expression prior.

    python -m benchmarks.priors [--config genecompass_debug.yaml] [--steps 400] [--seeds 0 1 2]
        [--dims 32] [--out runs/bench/priors] [--variants none coexpression] [--pretrain-only]

`--pretrain-only` stops after pretraining, so that variants can pretrain in parallel processes
(one `--variants` each) before one process embeds and scores them all.

The corpus is the benchmarks' PBMC corpus (benchmarks/_pretrained.py: every human raw-count PBMC
set except PBMC 4k). Priors: `celltron priors build` on it, ortholog scheme, GRN from TRRUST
human, co-expression from its training cells (`--dims` wide). Each variant's difference from no
prior is paired per fold (the seeds' mean on each of 10 folds), with a 95% interval over folds.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._pretrained import benchmark_corpus
from benchmarks.embedding import LABEL, labelled_copy
from celltron.cli import main as celltron
from celltron.finetune.report import mean_interval, verdict
from celltron.pretrain.config import load_config, replace
from celltron.pretrain.priors import build_priors
from celltron.pretrain.run import pretrain

REPO = Path(__file__).resolve().parents[1]
TRRUST = "grn/trrust_rawdata.human.tsv"  # in the shared data
VARIANTS = {"none": (), "grn": ("grn",), "coexpression": ("coexpression",), "grn+coexpression": ("grn", "coexpression")}


def run_name(variant: str, seed: int) -> str:
    """A pretrained variant's folder name: X_grn_coexpression_s0 for grn+coexpression, seed 0."""
    return f"X_{variant.replace('+', '_')}_s{seed}"


# the control: random weights with and without the co-expression prior (is its lift learned?)
UNTRAINED = {"none": (), "coexpression": ("coexpression",)}
METRICS = ("accuracy", "macro_f1")


def priors_folder(corpus: Path, shared_data: Path, out: Path, dims: int) -> Path:
    folder = out / f"priors-d{dims}"
    if not (folder / "priors.json").exists():
        (grn,) = shared_paths(shared_data, TRRUST)
        build_priors(folder, corpus, "ortholog", grn=grn, coexpression=True, dims=dims)
    return folder


def pretrain_variant(config_name: str, corpus: Path, priors: Path, names, seed: int, steps: int, run: Path) -> dict:
    """One run (reused when its export exists): its export folder, seconds and last validation losses."""
    if not (run / "export" / "config.json").exists():
        config = load_config(REPO / "configs" / "pretrain" / config_name)
        config = replace(
            config,
            model={"priors": {name: str(priors / f"{name}.npy") for name in names}},
            data={"corpus": str(corpus)},
            trainer={"seed": seed, "max_steps": steps, "val_every": steps, "checkpoint_every": steps},
            logging={"progress_bar": False, "wandb": False},
        )
        start = time.perf_counter()
        pretrain(config, run)
        (run / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val_loss")]
    last = rows[-1]
    losses = {k: float(v) for k, v in last.items() if k.startswith("val_") and v}
    return {"export": run / "export", "seconds": float((run / "seconds.txt").read_text()), "val": losses}


def untrained_copy(export: Path, priors: Path, names, seed: int, out: Path) -> dict:
    """The same architecture with random weights (seeded) and the priors `names` filled in: what
    the priors alone give the pooled cell embedding, before any training."""
    import torch

    from benchmarks._pretrained import random_init_copy
    from celltron.model_zoo.registry import load_pretrained

    random_init_copy(export, out, seed=seed)
    if names:
        model = load_pretrained(out)
        for name in names:
            model.set_prior_knowledge(name, torch.as_tensor(np.load(priors / f"{name}.npy")))
        model.save_pretrained(out)
    return {"export": out, "seconds": 0.0, "val": {"val_loss": float("nan")}}


def embed_all(runs: dict, data: Path, out: Path) -> dict:
    """Every run's embedding into one copy of `data`, then kNN on the same 10 folds."""
    embedded = out / "pbmc4k_embedded.h5ad"
    source = data
    for key, run in runs.items():
        command = ["embed", "--model", str(run["export"]), "--data", str(source), "--out", str(embedded), "--key", key]
        assert celltron([*command, "--no-progress"]) == 0
        source = embedded
    folder = out / "knn"
    command = ["evaluate-embedding", "--data", str(embedded), "--label-key", LABEL, "--out", str(folder), "--no-umap"]
    assert celltron([*command, "--key", *runs, "--folds", "10"]) == 0
    return json.loads((folder / "metrics.json").read_text())


def per_fold_means(metrics: dict, keys: list[str], metric: str) -> np.ndarray:
    """The seeds' mean score on each fold."""
    return np.mean([[fold[metric] for fold in metrics["variants"][k]["per_fold"]] for k in keys], axis=0)


def tables(runs: dict, metrics: dict, seeds, variants=tuple(VARIANTS)) -> str:
    lines = ["| priors | " + " | ".join(METRICS) + " | Δ vs none, " + " | Δ vs none, ".join(METRICS) + " | val loss | s a run |"]
    lines.append("|---" * (3 + 2 * len(METRICS)) + "|")
    keys = {v: [run_name(v, s) for s in seeds] for v in variants}
    keys.update({f"untrained, {v}": [f"X_untrained_{v}_s{s}" for s in seeds] for v in UNTRAINED if v in variants})
    for variant, mine in keys.items():
        scores = [f"{per_fold_means(metrics, mine, m).mean():.3f}" for m in METRICS]
        deltas = []
        for m in METRICS:
            if variant == "none" or variant.startswith("untrained, none"):
                deltas.append("")
                continue
            reference = keys["untrained, none"] if variant.startswith("untrained") else keys["none"]
            d = mean_interval(per_fold_means(metrics, mine, m) - per_fold_means(metrics, reference, m))
            d["improvement"] = {k: d[k] for k in ("mean", "low", "high")}
            said = verdict(d).replace("the model", "the prior").replace("the baseline", "no prior")
            deltas.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({said})")
        loss = np.mean([runs[k]["val"]["val_loss"] for k in mine])
        seconds = np.mean([runs[k]["seconds"] for k in mine])
        trained = f"{loss:.3f} | {seconds:.0f}" if np.isfinite(loss) else "untrained | 0"
        lines.append(f"| {variant} | " + " | ".join(scores + deltas) + f" | {trained} |")
    pca = metrics["baselines"]["pca_knn"]
    lines.append(f"| baseline: PCA | {pca['accuracy']:.3f} | {pca['macro_f1']:.3f} |" + " |" * (2 + len(METRICS)))
    return "\n".join(lines)


def add_pretraining_options(parser: argparse.ArgumentParser) -> None:
    """The options every priors benchmark shares: the config, its length and seeds, the priors' width."""
    parser.add_argument("--config", default="genecompass_debug.yaml", help="a GeneCompass config in configs/pretrain/")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dims", type=int, default=32, help="width of the GRN and co-expression priors")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/priors"))
    add_shared_data_option(parser)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pretraining_options(parser)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="must include none")
    parser.add_argument("--pretrain-only", action="store_true", help="pretrain the variants, embed and score nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = benchmark_corpus(shared_data=args.shared_data) / "corpus"
    priors = priors_folder(corpus, args.shared_data, args.out, args.dims)
    manifest = json.loads((priors / "priors.json").read_text())
    runs = {}
    tag = f"{Path(args.config).stem}-{args.steps}steps-d{args.dims}"
    for variant, names in VARIANTS.items():
        if variant not in args.variants:
            continue
        for seed in args.seeds:
            key = run_name(variant, seed)
            runs[key] = pretrain_variant(args.config, corpus, priors, names, seed, args.steps, args.out / tag / key)
            print(f"{key}: val loss {runs[key]['val']['val_loss']:.3f}, {runs[key]['seconds']:.0f} s", flush=True)
    if args.pretrain_only:
        return
    if "none" not in args.variants:
        raise SystemExit("--variants: every prior is compared with none; include it")
    for variant, names in UNTRAINED.items():
        if variant not in args.variants:
            continue
        for seed in args.seeds:
            key = f"X_untrained_{variant}_s{seed}"
            trained = runs[run_name(variant, seed)]["export"]  # its config has the prior's width
            runs[key] = untrained_copy(trained, priors, names, seed, args.out / tag / key)
    metrics = embed_all(runs, labelled_copy(args.shared_data, args.out), args.out / tag)
    covered = {name: record["tokens_with_prior"] for name, record in manifest["priors"].items()}
    print(f"\n### {args.config}, {args.steps} steps, seeds {args.seeds}, priors {args.dims} wide (tokens covered: {covered})\n")
    print(tables(runs, metrics, args.seeds, args.variants))


if __name__ == "__main__":
    main()
