"""Pretraining throughput of the multi-modal configs, each beside the same config on RNA alone.

Every `configs/pretrain/*_citeseq_*` config runs on the whole TEA-seq set (1,262 PBMCs, RNA + 46
proteins) and every `*_multiome_*` config on the whole SNARE-seq set (10,309 mouse cortex cells,
RNA + ATAC in 5 kb bins), both built from ../shared/data/multiomics into `--workdir` once. For each
config: `--steps` training steps (no validation, no checkpoint), then the same config with the
`multimodal` section at its defaults (RNA alone, masked objective: what the run costs without the
other modality), back to back in one process. Rates are the mean of the logged intervals after the
first two (start-up).

    python -m benchmarks.multimodal_pretrain [--steps 30] [--only scgpt_citeseq_debug ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
RUNS = {
    "citeseq": (
        "geneformer_citeseq_debug",
        "scgpt_citeseq_debug",
        "geneformer_citeseq_benchmark",
        "scgpt_citeseq_benchmark",
    ),
    "multiome": (
        "genecompass_multiome_debug",
        "genecompass_multiome_joint_debug",
        "genecompass_multiome_benchmark",
        "genecompass_multiome_joint_benchmark",
    ),
}


def corpora(workdir: Path, shared_data) -> dict[str, Path]:
    from benchmarks._data import shared_paths
    from benchmarks.multimodal_stream import build

    tea_rna, tea_adt, snare_rna, snare_atac = shared_paths(
        shared_data,
        "multiomics/teaseq_pbmc_1262cells_rna.h5ad",
        "multiomics/teaseq_pbmc_1262cells_adt.h5ad",
        "multiomics/snareseq_mouse_cortex_10309cells_rna.h5ad",
        "multiomics/snareseq_mouse_cortex_10309cells_atac.h5ad",
    )
    return {
        "citeseq": build(workdir / "teaseq_multi", modalities={"rna": tea_rna, "adt": tea_adt}),
        "multiome": build(workdir / "snareseq_multi", modalities={"rna": snare_rna, "atac": snare_atac}, genome="mm10"),
    }


def rates(config, steps: int) -> dict:
    """cells/s and tokens per cell (non-padding) of `steps` steps of `config`."""
    from celltron.pretrain.config import replace
    from celltron.pretrain.run import pretrain

    every = max(steps // 10, 1)
    quick = {"log_every": every, "max_steps": steps, "val_every": 10**9, "checkpoint_every": 10**9}
    with tempfile.TemporaryDirectory() as out:
        pretrain(replace(config, trainer=quick, logging={"progress_bar": False, "wandb": False}), out)
        rows = [r for r in csv.DictReader((Path(out) / "metrics.csv").open()) if r["loss"]][2:]
    cells = sum(float(r["cells_per_s"]) for r in rows) / len(rows)
    tokens = sum(float(r["tokens_per_s"]) for r in rows) / len(rows)
    return {"cells/s": cells, "tokens/cell": tokens / cells}


def describe(config) -> str:
    section = config.multimodal
    if section.joint:
        return f"joint {'+'.join(['rna', *section.joint])}, masked"
    return f"paired {section.pair} tower ({section.pair_family}), {' + '.join(section.objective)}"


def main() -> None:
    from benchmarks._data import add_shared_data_option
    from celltron.pretrain.config import MultimodalSection, load_config, replace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/celltron-bench/multimodal"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="config names (without .yaml) to run; default all")
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {args.steps} steps per run"
    )
    built = corpora(args.workdir, args.shared_data)
    print(
        "\n| config | design | batch | tokens/cell | cells/s | RNA alone cells/s | ratio | full run (max_steps), min |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for data, names in RUNS.items():
        for name in names:
            if args.only and name not in args.only:
                continue
            config = replace(load_config(CONFIGS / f"{name}.yaml"), data={"corpus": str(built[data])})
            multi = rates(config, args.steps)
            alone = rates(replace(config, multimodal=vars(MultimodalSection())), args.steps)
            minutes = config.trainer.max_steps * config.data.batch_size / multi["cells/s"] / 60
            print(
                f"| {name} | {describe(config)} | {config.data.batch_size} | {multi['tokens/cell']:.0f} | "
                f"{multi['cells/s']:.1f} | {alone['cells/s']:.1f} | {multi['cells/s'] / alone['cells/s']:.2f} | {minutes:.0f} |",
                flush=True,
            )
    print("\nratio: cells/s with the other modality / the same config on RNA alone (multimodal section at its defaults)")


if __name__ == "__main__":
    main()
