"""Cell embeddings and cell-type annotation on the labelled PBMC 4k set (never used for
pretraining): zero-shot kNN of the model's embeddings vs PCA, then the fine-tuned annotation
head vs logistic regression on PCA, several seeds.

    python -m benchmarks.embedding --model runs/demo/pretrain/export --out runs/bench/embedding

The 20 cells labelled '?' are left out. Prints markdown tables and the embedding speed.

    python -m benchmarks.embedding --model runs/pbmc_geneformer/export --variants [--variant-cells 1000]

measures the embedding choices instead (issue 17): last layer vs the mean of the last 2 and of
all layers, mean vs cls pooling, the saved max_len vs every detected gene (up to the position
table), each alone paired with PCA on the same folds, and the model that chooses among them by
inner cross-validation on each outer fold's training cells. A seeded sample of cells keeps it
within minutes on a CPU (every detected gene is ~5x the tokens, and attention is quadratic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._tables import mean_std_table
from celltron.cli import main as celltron

DATA = "scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad"  # in the shared data
LABEL = "Annotation"
COLUMNS = ("accuracy", "macro_f1")


def labelled_copy(shared_data: Path, out: Path) -> Path:
    path = out / "pbmc4k_labelled.h5ad"
    if not path.exists():
        adata = ad.read_h5ad(*shared_paths(shared_data, DATA))
        adata[adata.obs[LABEL].astype(str) != "?"].copy().write_h5ad(path)
    return path


def zero_shot(model: Path, data: Path, out: Path) -> tuple[dict, float]:
    embedded = out / "pbmc4k_embedded.h5ad"
    start = time.perf_counter()
    assert celltron(["embed", "--model", str(model), "--data", str(data), "--out", str(embedded), "--no-progress"]) == 0
    seconds = time.perf_counter() - start
    folder = out / "zero_shot"
    assert (
        celltron(
            ["evaluate-embedding", "--data", str(embedded), "--key", "X_celltron", "--label-key", LABEL, "--out", str(folder)]
        )
        == 0
    )
    return json.loads((folder / "metrics.json").read_text()), ad.read_h5ad(embedded, backed="r").n_obs / seconds


def annotation(model: Path, data: Path, out: Path, seeds: list[int], steps: int, extra: list[str]) -> dict:
    folder = out / ("annotate" + "".join(extra).replace("-", "_"))
    if not (folder / "metrics.json").exists():
        assert (
            celltron(
                [
                    "finetune",
                    "annotate",
                    "--model",
                    str(model),
                    "--data",
                    str(data),
                    "--label-key",
                    LABEL,
                    "--out",
                    str(folder),
                    "--seeds",
                    *map(str, seeds),
                    "--max-steps",
                    str(steps),
                    *extra,
                ]
            )
            == 0
        )
    return json.loads((folder / "metrics.json").read_text())


def table(rows: list[tuple[str, dict]]) -> str:
    return mean_std_table(rows, COLUMNS)


def variants(layers: int) -> dict[str, list[str]]:
    """obsm key -> the `celltron embed` flags of each embedding choice measured."""
    return {
        "X_last_mean": ["--layer", "-1", "--pool", "mean"],
        "X_last_cls": ["--layer", "-1", "--pool", "cls"],
        "X_last2_mean": ["--layers", "-1", "-2", "--pool", "mean"],
        f"X_all{layers}_mean": ["--layers", *map(str, range(layers)), "--pool", "mean"],
        "X_allgenes_mean": ["--layer", "-1", "--pool", "mean", "--max-len", "all", "--batch-size", "8"],
    }


def sampled_copy(data: Path, out: Path, cells: int, seed: int = 0) -> Path:
    """A seeded sample of `cells` labelled cells (the whole set when it has no more)."""
    path = out / f"pbmc4k_labelled_{cells}.h5ad"
    if not path.exists():
        adata = ad.read_h5ad(data)
        keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, min(cells, adata.n_obs), replace=False))
        adata[keep].copy().write_h5ad(path)
    return path


def embed_variants(model: Path, data: Path, choices: dict[str, list[str]]) -> dict[str, float]:
    """Each choice's embedding into obsm of `data` (in place); seconds per choice."""
    seconds = {}
    for key, flags in choices.items():
        start = time.perf_counter()
        command = ["embed", "--model", str(model), "--data", str(data), "--out", str(data), "--key", key, "--no-progress"]
        assert celltron([*command, *flags]) == 0
        seconds[key] = time.perf_counter() - start
    return seconds


def difference(paired: dict) -> str:
    return f"{paired['mean']:+.3f} [{paired['low']:+.3f}, {paired['high']:+.3f}]"


def variants_table(metrics: dict, choices: dict[str, list[str]], seconds: dict[str, float]) -> str:
    """One row per choice (and the chosen model, and PCA): scores ± spread over folds and the
    paired difference from PCA per fold with its 95% interval."""
    head = "| embedding | flags | accuracy | macro_f1 | Δ accuracy vs PCA | Δ macro_f1 vs PCA | embed s |"
    lines = [head, "|---" * 7 + "|"]

    def row(name: str, flags: str, scores: dict, paired: dict | None, time_s: str) -> str:
        cells = [f"{scores[m]:.3f} ± {scores['std'][m]:.3f}" for m in COLUMNS]
        deltas = [difference(paired[m]) if paired else "" for m in COLUMNS]
        return f"| {name} | {flags} | " + " | ".join(cells + deltas) + f" | {time_s} |"

    for key, flags in choices.items():
        variant = metrics["variants"][key]
        lines.append(row(key, " ".join(flags), variant, variant["paired"], f"{seconds.get(key, float('nan')):.0f}"))
    chosen = metrics["selection"]["times_chosen"]
    picked = ", ".join(f"{k} ×{n}" for k, n in chosen.items() if n)
    lines.append(row("inner-CV choice", f"chosen per fold: {picked}", metrics["model"], metrics["paired"], ""))
    lines.append(row("baseline: PCA", "", metrics["baselines"]["pca_knn"], None, ""))
    return "\n".join(lines)


def pretrained_minus_random(model: Path, sample: Path, out: Path, folds: int, pretrained: dict) -> str:
    """The same architecture with random weights embedded like the "X_last_mean" variant and
    scored on the same folds; the per-fold difference pretrained − random with its interval."""
    from benchmarks._pretrained import random_init_copy
    from celltron.finetune.report import mean_interval, verdict

    random = random_init_copy(model, out / "random_init_model", seed=0)
    embed_variants(random, sample, {"X_random_last_mean": variants(1)["X_last_mean"]})
    folder = out / "random_init"
    command = ["evaluate-embedding", "--data", str(sample), "--label-key", LABEL, "--out", str(folder), "--no-umap"]
    assert celltron([*command, "--key", "X_random_last_mean", "--folds", str(folds)]) == 0
    scores = json.loads((folder / "metrics.json").read_text())["model"]
    lines = [f"\nrandom init (last layer, mean), kNN: accuracy {scores['accuracy']:.3f}, macro_f1 {scores['macro_f1']:.3f}"]
    for metric in COLUMNS:
        diff = [a[metric] - b[metric] for a, b in zip(pretrained["per_fold"], scores["per_fold"])]
        d = mean_interval(diff)
        d["improvement"] = {k: d[k] for k in ("mean", "low", "high")}
        said = verdict(d).replace("the model", "pretraining").replace("the baseline", "random init")
        lines.append(f"- pretrained − random init on {metric}, per fold: {difference(d)} over {len(diff)} folds — {said}")
    return "\n".join(lines)


def measure_variants(model: Path, data: Path, out: Path, cells: int, folds: int, random_init: bool = False) -> None:
    """Embed every choice into one sampled file, evaluate them together, print the table."""
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    choices = variants(layers)
    sample = sampled_copy(data, out, cells)
    seconds = embed_variants(model, sample, choices)
    folder = out / "variants"
    command = ["evaluate-embedding", "--data", str(sample), "--label-key", LABEL, "--out", str(folder), "--no-umap"]
    assert celltron([*command, "--key", *choices, "--folds", str(folds)]) == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    split = metrics["split"]
    print(
        f"\n### embedding choices: kNN (k={split['neighbors']}, {split['folds']}-fold, {split['n_cells']} of "
        f"{split['n_cells_in_file']} sampled cells; inner CV {metrics['selection']['inner_folds']}-fold by "
        f"{metrics['selection']['choose_by']})\n"
    )
    print(variants_table(metrics, choices, seconds))
    if random_init:
        print(pretrained_minus_random(model, sample, out, folds, metrics["variants"]["X_last_mean"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/pretrain/export"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/embedding"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", action="store_true", help="measure the embedding choices (layers, pooling, max_len)")
    parser.add_argument("--variant-cells", type=int, default=1000, help="with --variants: a seeded sample of this many cells")
    parser.add_argument("--folds", type=int, default=10, help="with --variants: outer folds (10: bootstrap intervals)")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="with --variants: also the same architecture from random weights, paired per fold",
    )
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = labelled_copy(args.shared_data, args.out)
    if args.variants:
        measure_variants(args.model, data, args.out, args.variant_cells, args.folds, args.random_init)
        return
    shot, cells_per_second = zero_shot(args.model, data, args.out)
    print(f"\n### zero-shot kNN ({shot['split'].get('folds')}-fold, {shot['split'].get('n_cells')} cells)\n")
    print(table([("model embedding (kNN)", shot["model"]), ("baseline: PCA (kNN)", shot["baselines"]["pca_knn"])]))
    print(f"\nembedding speed: {cells_per_second:,.0f} cells/s (CPU, model load included)")
    layers = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    rows = []
    for label, extra in (("full fine-tuning", []), ("frozen encoder", ["--freeze", str(layers)]), ("LoRA r=8", ["--lora", "8"])):
        metrics = annotation(args.model, data, args.out, args.seeds, args.steps, extra)
        rows.append((f"model: annotation head, {label}", metrics["model"]))
    rows.append(("baseline: PCA + logistic regression", metrics["baselines"]["pca_logreg"]))
    print(f"\n### annotation (held-out 20% of cells, seeds {', '.join(map(str, args.seeds))})\n")
    print(table(rows))
    print(
        "\nper class F1 (model, full fine-tuning, seed",
        args.seeds[0],
        "):",
        {
            c: round(r["f1-score"], 3)
            for c, r in metrics_of(args.out)["model"]["reports"][str(args.seeds[0])]["per_class"].items()
        },
    )


def metrics_of(out: Path) -> dict:
    return json.loads((out / "annotate" / "metrics.json").read_text())


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
