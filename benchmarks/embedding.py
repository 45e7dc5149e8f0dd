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
from benchmarks._pretrained import resolve_model, resolve_random_init
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


def annotation(model: Path, data: Path, out: Path, seeds: list[int], steps: int, extra: list[str], name: str) -> dict:
    folder = out / name
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


def chosen(choice: dict) -> str:
    """An anchored head's choice per seed: the weight, and the learning rate and length when chosen."""
    if "learning_rate" not in choice:
        return str(choice["weight"])
    return f"w {choice['weight']}, lr {choice['learning_rate']:g}, {choice['steps']} steps"


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


def pretrained_minus_random(random: Path, sample: Path, out: Path, folds: int, pretrained: dict) -> str:
    """The same architecture with random weights (`random`) embedded like the "X_last_mean"
    variant and scored on the same folds; the per-fold difference pretrained − random with its
    interval."""
    from celltron.finetune.report import mean_interval, verdict

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


def measure_variants(model: Path, data: Path, out: Path, cells: int, folds: int, random_init: Path | None = None) -> None:
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
        print(pretrained_minus_random(random_init, sample, out, folds, metrics["variants"]["X_last_mean"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="runs/demo/pretrain/export",
        help="a pretrained model folder, or benchmark:geneformer|scgpt|genecompass for the cached benchmark model",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/embedding"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="annotation fine-tuning modes")
    parser.add_argument("--variants", action="store_true", help="measure the embedding choices (layers, pooling, max_len)")
    parser.add_argument("--variant-cells", type=int, default=1000, help="with --variants: a seeded sample of this many cells")
    parser.add_argument("--folds", type=int, default=10, help="with --variants: outer folds (10: bootstrap intervals)")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="also the same architecture from random weights: with --variants paired per fold, else a "
        "fine-tuned annotation row paired per seed",
    )
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = labelled_copy(args.shared_data, args.out)
    model = resolve_model(args.model, shared_data=args.shared_data)
    random = None
    if args.random_init:
        random = resolve_random_init(args.model, model, args.out / "random_init_model", shared_data=args.shared_data)
    if args.variants:
        measure_variants(model, data, args.out, args.variant_cells, args.folds, random)
        return
    shot, cells_per_second = zero_shot(model, data, args.out)
    print(f"\n### zero-shot kNN ({shot['split'].get('folds')}-fold, {shot['split'].get('n_cells')} cells)\n")
    print(table([("model embedding (kNN)", shot["model"]), ("baseline: PCA (kNN)", shot["baselines"]["pca_knn"])]))
    print(f"\nembedding speed: {cells_per_second:,.0f} cells/s (CPU, model load included)")
    print(annotation_tables(model, random, data, args.out, args.seeds, args.steps, args.modes))


MODES = ("full", "frozen", "lora", "probe")
# the probe's learning rates and lengths, chosen by inner CV on the training cells
PROBE_LEARNING_RATES = "[0.001,0.003,0.01,0.03,0.1]"
PROBE_STEP_FRACTIONS = "[0.25,0.5,1]"
PROBE_FLAGS = ["--encoder", "frozen", "--set", f"annotate.learning_rates={PROBE_LEARNING_RATES}"] + [
    "--set",
    f"annotate.step_fractions={PROBE_STEP_FRACTIONS}",
]


def annotation_tables(model: Path, random: Path | None, data: Path, out: Path, seeds, steps: int, modes) -> str:
    """Fine-tuned annotation per mode (the anchored head, the model alone, the baseline), the
    anchored head − baseline per seed, and with `random` the first mode's fine-tuning from random
    weights, paired per seed (same held-out cells)."""
    from celltron.finetune.report import paired_difference, verdict

    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    flags = {
        "full": [],
        "frozen": ["--freeze", str(layers)],
        "lora": ["--lora", "8"],
        "probe": PROBE_FLAGS,
    }
    label = {
        "full": "full fine-tuning",
        "frozen": "frozen encoder",
        "lora": "LoRA r=8",
        "probe": "frozen encoder, head on cached embeddings (lr, length by inner CV)",
    }
    rows, lines, runs = [], [], {}
    for mode in modes:
        runs[mode] = metrics = annotation(model, data, out, seeds, steps, flags[mode], name=f"annotate_{mode}")
        rows.append((f"anchored head, {label[mode]}", metrics["model"]))
        if metrics.get("model_plain"):
            rows.append((f"model alone, {label[mode]}", metrics["model_plain"]))
        for metric, d in metrics["paired"].items():
            lines.append(f"- {label[mode]}: anchored head − pca_logreg on {metric}: {difference(d)} — {d['verdict']}")
        weights = ", ".join(f"seed {s}: {chosen(w)}" for s, w in (metrics.get("anchor_weights") or {}).items())
        lines.append(f"- {label[mode]}: chosen by inner CV on training cells: {weights}")
    if random is not None:  # the same architecture from random weights, in the first mode
        mode = modes[0] if modes else "full"
        scratch = annotation(random, data, out, seeds, steps, flags[mode], name=f"annotate_random_init_{mode}")
        rows.append((f"random init, {label[mode]}: anchored head", scratch["model"]))
        rows.append((f"random init, {label[mode]}: model alone", scratch["model_plain"]))
        pretrained = runs.get(mode) or annotation(model, data, out, seeds, steps, flags[mode], name=f"annotate_{mode}")
        for head in ("model", "model_plain"):
            for metric in COLUMNS:
                ours = {s: r[metric] for s, r in pretrained[head]["per_seed"].items()}
                theirs = {s: r[metric] for s, r in scratch[head]["per_seed"].items()}
                d = paired_difference(ours, theirs)
                said = verdict(d).replace("the model", "pretraining").replace("the baseline", "random init")
                what = "anchored head" if head == "model" else "model alone"
                lines.append(f"- pretrained − random init ({what}, {label[mode]}) on {metric}: {difference(d)} — {said}")
    rows.append(("baseline: PCA + logistic regression", runs[modes[0]]["baselines"]["pca_logreg"] if modes else {}))
    header = f"\n### annotation (held-out 20% of cells, seeds {', '.join(map(str, seeds))}, {steps} steps)\n\n"
    return header + table(rows) + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
