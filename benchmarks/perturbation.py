"""Perturbation response on the Papalexi 2021 THP-1 screen: the fine-tuned model beside the
baselines (control mean, training mean, additive, linear), held-out perturbations, several
seeds. Every variant runs `celltron finetune perturbation` with the same splits.

    python -m benchmarks.perturbation --model runs/pbmc_geneformer/export --out runs/bench/perturbation

The model folder is the Geneformer pretrained on the PBMC corpus (configs/pretrain/geneformer_pbmc.yaml,
commands in benchmarks/perturbation.md). Variants: the retrieval head fine-tuned with the
encoder, on the frozen encoder, and on the same architecture from random weights (does
pretraining help?), and the bilinear head.
Prints a markdown table of the metrics over seeds (mean ± spread).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._tables import mean_std_table
from celltron.cli import main as celltron

DATA = "perturbation/papalexi2021_thp1_lowmoi_sceptredata.h5ad"  # in the shared data
COLUMNS = ("pearson_delta_de20", "direction_de20", "mse_de20", "pearson_delta", "mse")


def random_init_copy(folder: Path, out: Path) -> Path:
    """The model's architecture and tokenizer with fresh random weights."""
    from transformers import AutoConfig

    import celltron  # noqa: F401  (Auto classes)
    from celltron.model_zoo.registry import family_of

    config = AutoConfig.from_pretrained(folder)
    spec = family_of(config)
    model = spec.model_class(spec.config_class.from_pretrained(folder))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for item in folder.iterdir():
        if item.suffix == ".json" and item.name != "config.json":
            shutil.copy2(item, out / item.name)
    return out


def run(shared_data: Path, model: Path, out: Path, seeds: list[int], steps: int) -> dict[str, dict]:
    (data,) = shared_paths(shared_data, DATA)
    common = ["--data", str(data), "--seeds", *map(str, seeds), "--max-steps", str(steps)]
    random = str(random_init_copy(model, out / "random_init_model"))
    variants = {
        "retrieval head, full fine-tuning": ["--model", str(model), "--set", "perturbation.head=retrieval"],
        "retrieval head, frozen encoder": ["--model", str(model), "--freeze", "4", "--set", "perturbation.head=retrieval"],
        "retrieval head, random init": ["--model", random, "--set", "perturbation.head=retrieval"],
        "bilinear head, full fine-tuning": ["--model", str(model), "--set", "perturbation.head=bilinear"],
    }
    results = {}
    for name, args in variants.items():
        folder = out / name.replace(" ", "_").replace(",", "")
        if not (folder / "metrics.json").exists():
            assert celltron(["finetune", "perturbation", *args, *common, "--out", str(folder)]) == 0
        results[name] = json.loads((folder / "metrics.json").read_text())
    return results


def table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    rows = [(f"model: {name}", metrics["model"]) for name, metrics in results.items()]
    rows += [(f"baseline: {name}", metrics) for name, metrics in first["baselines"].items()]
    return mean_std_table(rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/pbmc_geneformer/export"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/perturbation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(table(run(args.shared_data, args.model, args.out, args.seeds, args.steps)))


if __name__ == "__main__":
    main()
