"""Drug response (ic50 mode) on GDSC: the matrix-completion model beside its baselines, for the
random-pair, leave-cell-line-out and leave-drug-out splits, several seeds.

    python -m benchmarks.drug_response --out runs/bench/drug_response
    python -m benchmarks.drug_response --baselines-only --splits drug --out runs/bench/drug_baselines
    python -m benchmarks.drug_response --model benchmark:geneformer --expression CELL_LINES.h5ad \
        --out runs/bench/drug_response_geneformer

With `--model` (a folder, or `benchmark:<family>` for the family's cached benchmark model from
benchmarks/_pretrained.py) and `--expression` (raw counts, one row per cell line), each cell line
is the model's frozen embedding of its profile; the same architecture from random weights runs
beside it (does pretraining help?), each variant in its own folder under `--out`.

Prints one markdown table per split (mean ± spread over seeds): the anchored head (best baseline +
w x the model's residual, w by inner CV), the model alone, every baseline; then, per split, the
baseline chosen on training units per seed, the weight, and model − that baseline per held-out
drug with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._pretrained import resolve_model, resolve_random_init
from benchmarks._tables import mean_std_table
from celltron.cli import main as celltron

FILES = (
    "drug/GDSC_IC50_deepcdr_scfoundation.csv",
    "drug/GDSC_drug_list_2019-06-24.csv",
    "drug/DeepCDR_223drugs_pubchem_smiles.txt",
)
COLUMNS = ("pearson_per_drug", "pearson", "spearman", "rmse")


SPLITS = ("random", "cell_line", "drug")


def run(
    shared_data: Path, out: Path, seeds: list[int], steps: int, model_args: tuple[str, ...] = (), splits=SPLITS
) -> dict[str, dict]:
    """One `celltron finetune drug-response` per split; `model_args` (`--model`, `--expression`,
    `--baselines-only`, ...) are passed on. Results already in `out` are read, not recomputed."""
    ic50, drug_list, smiles = shared_paths(shared_data, *FILES)
    results = {}
    for split in splits:
        folder = out / split
        if not (folder / "metrics.json").exists():
            assert (
                celltron(
                    [
                        "finetune",
                        "drug-response",
                        "--mode",
                        "ic50",
                        "--data",
                        str(ic50),
                        "--drug-list",
                        str(drug_list),
                        "--smiles",
                        str(smiles),
                        "--split",
                        split,
                        "--seeds",
                        *map(str, seeds),
                        "--max-steps",
                        str(steps),
                        *model_args,
                        "--out",
                        str(folder),
                    ]
                )
                == 0
            )
        results[split] = json.loads((folder / "metrics.json").read_text())
    return results


def table(metrics: dict) -> str:
    rows = [("model: anchored head", metrics["model"])] if metrics.get("model") else []
    if metrics.get("model_plain"):
        rows.append(("model: matrix completion alone", metrics["model_plain"]))
    rows += [(f"baseline: {n}", m) for n, m in metrics["baselines"].items()]
    text = mean_std_table(rows, COLUMNS)
    chosen = metrics["best_baseline"]["per_seed"]
    text += (
        "\n\n- best baseline per seed (chosen on "
        + metrics["best_baseline"]["chosen_on"]
        + "): "
        + ", ".join(f"seed {seed}: {c['name']}" + (f", w = {c['weight']}" if "weight" in c else "") for seed, c in chosen.items())
    )
    d = metrics.get("paired")
    if d and d["mean"] is None:  # the headline is undefined (per-drug Pearson of an unseen cell line)
        text += f"\n- model − {d['baseline']} on {d['metric']}: undefined over {d['n_units']} drugs — {d['verdict']}"
    elif d:
        bounds = "(no interval)" if d["low"] is None else f"[{d['low']:+.3f}, {d['high']:+.3f}]"
        text += (
            f"\n- model − {d['baseline']} on {d['metric']}: {d['mean']:+.3f} {bounds} over {d['n_units']} drugs — {d['verdict']}"
        )
    return text


PRETRAINED, RANDOM = "pretrained", "random init"


def model_variants(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """The pretrained model and its random-initialisation copy, each with the cell lines'
    profiles; no variant (the model-free run) without `--model`."""
    if args.model is None:
        return {}
    if args.expression is None:
        raise SystemExit("--model needs --expression CELL_LINES.h5ad: in ic50 mode the model embeds cell-line profiles")
    model = resolve_model(args.model, shared_data=args.shared_data)
    random = resolve_random_init(args.model, model, args.out / "random_init_model", shared_data=args.shared_data)
    profiles = ("--expression", str(args.expression), *(("--cell-line-key", args.cell_line_key) if args.cell_line_key else ()))
    return {PRETRAINED: ("--model", str(model), *profiles), RANDOM: ("--model", str(random), *profiles)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/drug_response"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument(
        "--model",
        help="a pretrained model folder, or benchmark:geneformer|scgpt|genecompass for the cached benchmark model "
        "(benchmarks/_pretrained.py); needs --expression",
    )
    parser.add_argument("--expression", type=Path, help="cell-line profiles (.h5ad of raw counts, one row per cell line)")
    parser.add_argument("--cell-line-key", help="obs column of --expression holding the IC50 table's cell-line ids")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--baselines-only", action="store_true", help="the baselines and their choice, no model (minutes)")
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = model_variants(args)
    if not variants:  # the model-free run, in `--out` itself
        extra = ("--baselines-only",) if args.baselines_only else ()
        for split, metrics in run(args.shared_data, args.out, args.seeds, args.steps, extra, args.splits).items():
            print(f"\n### split: {split}\n\n{table(metrics)}")
    for name, model_args in variants.items():
        folder = args.out / name.replace(" ", "_")
        for split, metrics in run(args.shared_data, folder, args.seeds, args.steps, model_args, args.splits).items():
            print(f"\n### {name}, split: {split}\n\n{table(metrics)}")


if __name__ == "__main__":
    main()
