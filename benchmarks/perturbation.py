"""Perturbation response on the Papalexi 2021 THP-1 screen: the fine-tuned model (anchored head
and its plain model part) beside the baselines (control mean, training mean, knockdown prior,
additive, linear) and the best of them chosen on training perturbations, several seeds. Every
variant runs `celltron finetune perturbation` with the same splits.

    python -m benchmarks.perturbation --model runs/pbmc_geneformer/export --out runs/bench/perturbation \
        [--split heldout|leave_one_out]

The model folder is the Geneformer pretrained on the PBMC corpus (configs/pretrain/geneformer_pbmc.yaml,
commands in benchmarks/perturbation.md), or `--model benchmark:<family>` for a family's cached
benchmark model (benchmarks/_pretrained.py; give each model its own `--out`, since results already
there are reused). Variants: the retrieval head fine-tuned with the encoder (`--encoders tuned`)
and on the frozen encoder (`--encoders frozen`: the encoder's views computed once, the head alone
trains), each also on the same architecture from random weights (does pretraining help?). Prints a markdown table of the metrics over seeds (mean ± spread), each
variant's model − best baseline per held-out perturbation with its 95% interval, and
pretrained − random initialisation the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._pretrained import random_init_copy, resolve_model, resolve_random_init
from benchmarks._tables import mean_std_table
from celltron.cli import main as celltron

DATASETS = {  # in the shared data
    "papalexi": "perturbation/papalexi2021_thp1_lowmoi_sceptredata.h5ad",
    "norman": "perturbation/norman2019_k562_crispra_3375cells.h5ad",
}
REFERENCE = "scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad"  # co-expression of unmeasured targets
COLUMNS = (
    "pearson_delta_de20_notarget",
    "pearson_delta_centroid_notarget",
    "direction_de20_notarget",
    "mse_de20_notarget",
    "pearson_delta_de20",
)
PRETRAINED, RANDOM = "retrieval head, full fine-tuning", "retrieval head, random init"
FROZEN, RANDOM_FROZEN = "retrieval head, frozen encoder", "retrieval head, random init, frozen encoder"
PAIRS = ((PRETRAINED, RANDOM), (FROZEN, RANDOM_FROZEN))  # pretrained, random init of the same variant
ENCODERS = {"tuned": (PRETRAINED, RANDOM), "frozen": (FROZEN, RANDOM_FROZEN)}
# a head alone on cached views trains in seconds, so the frozen variants choose its learning rate
# and length by the inner cross-validation too (the fine-tuned ones keep the config's, for time)
FROZEN_CHOICES = ["--set", "perturbation.learning_rates=[0.001,0.003,0.01]", "--set", "perturbation.step_fractions=[0.25,0.5,1]"]


def run(
    shared_data: Path,
    model: Path | None,
    out: Path,
    dataset: str,
    seeds: list[int],
    steps: int,
    split: str,
    encoders: tuple[str, ...] = ("tuned", "frozen"),
    random_model: Path | None = None,
) -> dict:
    """One `celltron finetune perturbation` per variant (baselines alone without a model); results
    already in `out` are read, not recomputed. `random_model`: the same architecture with random
    weights (default: a fresh copy of `model` in `out`)."""
    data, reference = shared_paths(shared_data, DATASETS[dataset], REFERENCE)
    common = ["--data", str(data), "--seeds", *map(str, seeds), "--split", split, "--coexpression-reference", str(reference)]
    if model is None:
        variants = {"baselines": ["--baselines-only"]}
    else:
        random = str(random_model or random_init_copy(model, out / "random_init_model"))
        every = {
            PRETRAINED: ["--model", str(model)],
            RANDOM: ["--model", random],
            FROZEN: ["--model", str(model), "--encoder", "frozen", *FROZEN_CHOICES],
            RANDOM_FROZEN: ["--model", random, "--encoder", "frozen", *FROZEN_CHOICES],
        }
        variants = {name: every[name] for encoder in encoders for name in ENCODERS[encoder]}
        common += ["--max-steps", str(steps), "--resume", "auto"]
    results = {}
    for name, args in variants.items():
        folder = out / dataset / split / name.replace(" ", "_").replace(",", "")
        if not (folder / "metrics.json").exists():
            assert celltron(["finetune", "perturbation", *args, *common, "--out", str(folder)]) == 0
        results[name] = json.loads((folder / "metrics.json").read_text())
    return results


def table(results: dict[str, dict]) -> str:
    """Each variant's anchored head and plain model, the baselines, and the best baseline chosen
    by inner CV; a variant whose baselines differ (linear_model reads its model's gene tokens)
    gets its own rows for those."""
    first = next(iter(results.values()))
    rows = []
    for name, metrics in results.items():
        if metrics["model"]:
            rows += [(f"model, anchored: {name}", metrics["model"]), (f"model, plain head: {name}", metrics["model_plain"])]
    rows += [(f"baseline: {name}", metrics) for name, metrics in first["baselines"].items()]
    rows.append(("best baseline (chosen by inner CV)", first["best_baseline"]))
    for name, metrics in list(results.items())[1:]:
        for baseline, values in metrics["baselines"].items():
            if differs(values, first["baselines"][baseline]):
                rows.append((f"baseline: {baseline} ({name})", values))
        if differs(metrics["best_baseline"], first["best_baseline"]):
            rows.append((f"best baseline ({name})", metrics["best_baseline"]))
    return mean_std_table(rows, COLUMNS)


def differs(a: dict, b: dict) -> bool:
    """Whether two predictors' shown figures differ (to the 3 decimals shown: BLAS on another
    thread count moves the last bits)."""
    return any(f"{a.get(column, 0):.3f}" != f"{b.get(column, 0):.3f}" for column in COLUMNS)


def comparisons(results: dict[str, dict]) -> str:
    """Each variant against the best baseline, and pretrained against random initialisation, per
    held-out perturbation (averaged over seeds) with a 95% interval."""
    from celltron.finetune.perturbation.evaluate import higher_is_better
    from celltron.finetune.perturbation.run import per_unit_means
    from celltron.finetune.report import paired_difference, verdict, verdict_line

    first = next(iter(results.values()))
    metric = first["best_baseline"]["metric"]
    chosen = [c["baseline"] for per_seed in first["best_baseline"]["chosen_per_seed"].values() for c in per_seed]
    lines = [
        "- best baseline per fold (inner CV on training perturbations): "
        + ", ".join(f"{n} x{chosen.count(n)}" for n in sorted(set(chosen), key=chosen.index))
    ]
    for name, metrics in results.items():
        for subset, difference in (metrics.get("paired") or {}).items():
            if subset != "metric" and difference["n_units"]:
                lines.append(f"- {name} ({subset}): " + verdict_line(metric, "best baseline", difference, "perturbations"))
    for pretrained, random in PAIRS:
        if pretrained not in results or random not in results:
            continue
        for head in ("model", "model_plain"):
            d = paired_difference(
                per_unit_means(results[pretrained][head]["per_perturbation"].values(), metric),
                per_unit_means(results[random][head]["per_perturbation"].values(), metric),
                higher_is_better(metric),
            )
            lines.append(
                f"- pretrained − random init ({pretrained}, {head}) on {metric}: {d['mean']:+.3f} "
                f"[{d['low']:+.3f}, {d['high']:+.3f}] over {d['n_units']} perturbations — "
                + verdict(d).replace("the model", "pretraining").replace("the baseline", "random init")
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="runs/pbmc_geneformer/export",
        help="a pretrained model folder, or benchmark:geneformer|scgpt|genecompass for the cached benchmark model "
        "(benchmarks/_pretrained.py: built on first use, about 30 minutes on 2 CPU cores; its random-init copy is cached too)",
    )
    parser.add_argument("--baselines-only", action="store_true", help="the baselines alone (no model needed)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="papalexi")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/perturbation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--split", choices=["heldout", "simulation", "leave_one_out"], default="heldout")
    parser.add_argument(
        "--encoders", nargs="+", choices=sorted(ENCODERS), default=["tuned", "frozen"], help="fine-tuned and/or frozen encoder"
    )
    parser.add_argument("--no-frozen", action="store_true", help="the fine-tuned encoder alone (--encoders tuned)")
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = random_model = None
    if not args.baselines_only:
        model = resolve_model(args.model, shared_data=args.shared_data)
        random_model = resolve_random_init(args.model, model, args.out / "random_init_model", shared_data=args.shared_data)
    encoders = ("tuned",) if args.no_frozen else tuple(args.encoders)
    results = run(args.shared_data, model, args.out, args.dataset, args.seeds, args.steps, args.split, encoders, random_model)
    print(table(results))
    print()
    print(comparisons(results))
    for name, metrics in results.items():
        for group, by_predictor in (metrics.get("groups") or {}).items():
            print(f"\n{name}, {group}:\n" + mean_std_table(list(by_predictor.items()), COLUMNS))


if __name__ == "__main__":
    main()
