"""Cross-modal tasks on the real paired sets (issue 19): prediction, alignment and joint annotation,
every baseline beside a pretrained multi-modal model and its random initialisation, 3 seeds.

    python -m benchmarks.crossmodal [--workdir runs/bench/crossmodal] [--seeds 0 1 2] [--prepare-only]

No evaluated cell is ever pretrained on. TEA-seq (1,262 PBMCs, RNA + 46 proteins): a fixed 70% of
the cells (seed 1234, `pretraining_cells.txt`) build the corpus the joint model
(configs/pretrain/scgpt_citeseq_benchmark.yaml: scGPT, RNA + protein tokens, masked values) is
pretrained on; those cells are always training cells of the tasks (`crossmodal.train_only`), and
held-out cells are half of the other 30%, drawn per seed. The pretrained model and its random-initialisation
copy (same shape, same tokenizer) are built once under --workdir and reused.

SNARE-seq (10,309 mouse cortex cells, RNA + ATAC, 12 batches): baselines, random cells and whole
batches held out.

Prints one table per task and writes every run's metrics.json under --workdir/results.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
JOINT_CONFIG = REPO / "configs" / "pretrain" / "scgpt_citeseq_benchmark.yaml"
PRETRAIN_SHARE, PRETRAIN_SEED = 0.7, 1234


def teaseq_files(shared_data) -> dict[str, Path]:
    from benchmarks._data import shared_paths

    rna, adt = shared_paths(shared_data, "multiomics/teaseq_pbmc_1262cells_rna.h5ad", "multiomics/teaseq_pbmc_1262cells_adt.h5ad")
    return {"rna": rna, "adt": adt}


def snareseq_files(shared_data) -> dict[str, Path]:
    from benchmarks._data import shared_paths

    rna, atac = shared_paths(
        shared_data,
        "multiomics/snareseq_mouse_cortex_10309cells_rna.h5ad",
        "multiomics/snareseq_mouse_cortex_10309cells_atac.h5ad",
    )
    return {"rna": rna, "atac": atac}


def prepare(workdir: Path, shared_data) -> dict[str, Path]:
    """The pretraining cells' list and files, their corpus, the joint model pretrained on them,
    and its random-initialisation copy; each built once (a finished step is never redone)."""
    import anndata as ad

    from benchmarks._pretrained import random_init_copy
    from benchmarks.multimodal_stream import build

    files = teaseq_files(shared_data)
    workdir.mkdir(parents=True, exist_ok=True)
    cells_file = workdir / "pretraining_cells.txt"
    rna = ad.read_h5ad(files["rna"])
    rng = np.random.default_rng(PRETRAIN_SEED)
    chosen = np.sort(rng.permutation(rna.n_obs)[: int(round(PRETRAIN_SHARE * rna.n_obs))])
    names = rna.obs_names[chosen].astype(str)
    cells_file.write_text("\n".join(names) + "\n")
    subset = {}
    for modality, path in files.items():
        subset[modality] = workdir / f"pretraining_{modality}.h5ad"
        if not subset[modality].exists():
            data = ad.read_h5ad(path)
            data[names].copy().write_h5ad(subset[modality])
    corpus = build(workdir / "pretraining_corpus", modalities=subset)
    run = workdir / "joint_model"
    export = run / "export"
    if not export.exists():
        from celltron.pretrain.config import load_config
        from celltron.pretrain.run import pretrain

        config = load_config(JOINT_CONFIG, [f"data.corpus={corpus}"])
        started = time.time()
        pretrain(config, run)
        (run / "pretraining_seconds.txt").write_text(f"{time.time() - started:.0f}\n")
    random_copy = workdir / "joint_model_random_init"
    if not random_copy.exists():
        random_init_copy(export, random_copy, seed=0)
    return {"cells": cells_file, "model": export, "random": random_copy}


def run_task(task: str, modalities: dict[str, Path], out: Path, seeds, model=None, **fields) -> dict:
    from celltron.finetune.config import FinetuneConfig
    from celltron.finetune.crossmodal.run import run_crossmodal

    config = FinetuneConfig()
    section = replace(
        config.crossmodal,
        task=task,
        modalities=tuple(f"{m}={p}" for m, p in modalities.items()),
        seeds=tuple(seeds),
        **fields,
    )
    config = replace(config, crossmodal=section).check()
    return run_crossmodal(config, out, model=model)


def main() -> None:
    from benchmarks._data import add_shared_data_option

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/crossmodal"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prepare-only", action="store_true")
    add_shared_data_option(parser)
    args = parser.parse_args()
    started = time.time()
    prepared = prepare(args.workdir, args.shared_data)
    if args.prepare_only:
        print(json.dumps({k: str(v) for k, v in prepared.items()}))
        return
    results = args.workdir / "results"
    tea, snare = teaseq_files(args.shared_data), snareseq_files(args.shared_data)
    # held-out cells: half of the 379 cells the model was not pretrained on, per seed
    held_out = {"label_key": "cell_type", "train_only": str(prepared["cells"]), "test_fraction": 0.5}
    for name, model in (("baselines", None), ("pretrained", prepared["model"]), ("random_init", prepared["random"])):
        run_task("predict", tea, results / f"tea_predict_{name}", args.seeds, model, **held_out)
        run_task("align", tea, results / f"tea_align_{name}", args.seeds, model, **held_out)
        annotate = {k: v for k, v in held_out.items() if k != "test_fraction"}  # folds over the 379 open cells
        run_task("annotate", tea, results / f"tea_annotate_{name}", args.seeds, model, **annotate)
    label = "cluster (remapped)"
    run_task("align", snare, results / "snare_align_random", args.seeds, target="atac", label_key=label)
    run_task(
        "align",
        snare,
        results / "snare_align_batch",
        args.seeds,
        target="atac",
        label_key=label,
        split="batch",
        batch_key="Batch",
    )
    run_task("annotate", snare, results / "snare_annotate", args.seeds, target="atac", label_key=label)
    print(f"\n{platform.node()}, {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
