"""Cell embeddings and cell-type annotation on the labelled PBMC 4k set (never used for
pretraining): zero-shot kNN of the model's embeddings vs PCA, then the fine-tuned annotation
head vs logistic regression on PCA, several seeds.

    python -m benchmarks.embedding --model runs/demo/pretrain/export --out runs/bench/embedding

The 20 cells labelled '?' are left out. Prints markdown tables and the embedding speed.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/pretrain/export"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/embedding"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = labelled_copy(args.shared_data, args.out)
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
