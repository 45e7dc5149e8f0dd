"""Cross-modal tasks on the real paired sets (issue 19): prediction, alignment and joint annotation,
every baseline beside a pretrained multi-modal model and its random initialisation, 3 seeds.

    python -m benchmarks.crossmodal [--workdir runs/bench/crossmodal] [--seeds 0 1 2] [--prepare-only]
        [--scvi-python runs/scvi-py311/bin/python [--peers-only] [--multivi-epochs 100]]

No evaluated cell is ever pretrained on. TEA-seq (1,262 PBMCs, RNA + 46 proteins): a fixed 70% of
the cells (seed 1234, `pretraining_cells.txt`) build the corpus the joint model
(configs/pretrain/scgpt_citeseq_benchmark.yaml: scGPT, RNA + protein tokens, masked values) is
pretrained on, as is the paired model (configs/pretrain/geneformer_citeseq_benchmark.yaml: a
Geneformer RNA tower and an scGPT protein tower, masked + contrastive); those cells are always
training cells of the tasks (`crossmodal.train_only`), and held-out cells are half of the other
30%, drawn per seed (annotation: 5 folds over them). Each pretrained model and its random-
initialisation copy (same shape, same tokenizer) are built once under --workdir and reused; the
last lines compare each plain model with its random initialisation.

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
PAIRED_CONFIG = REPO / "configs" / "pretrain" / "geneformer_citeseq_benchmark.yaml"
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
    joint = pretrained_once(JOINT_CONFIG, corpus, workdir / "joint_model")
    paired = pretrained_once(PAIRED_CONFIG, corpus, workdir / "paired_model")
    joint_random, paired_random = workdir / "joint_model_random_init", workdir / "paired_model_random_init"
    if not joint_random.exists():
        random_init_copy(joint, joint_random, seed=0)
    if not paired_random.exists():
        random_paired_copy(paired, paired_random, seed=0)
    return {"cells": cells_file, "joint": joint, "joint_random": joint_random, "paired": paired, "paired_random": paired_random}


def pretrained_once(config_path: Path, corpus: Path, run: Path) -> Path:
    """The export of `config_path` pretrained on `corpus` under `run` (reused when it exists)."""
    export = run / "export"
    if not export.exists():
        from celltron.pretrain.config import load_config
        from celltron.pretrain.run import pretrain

        started = time.time()
        pretrain(load_config(config_path, [f"data.corpus={corpus}"]), run)
        (run / "pretraining_seconds.txt").write_text(f"{time.time() - started:.0f}\n")
    return export


def random_paired_copy(folder: Path, out: Path, seed: int) -> Path:
    """A paired export's shape with fresh random weights: both towers and the projections, the RNA
    tower at the root as in the export, and the same tokenizer files and pair tokens."""
    import shutil

    import torch
    from transformers import AutoConfig

    import celltron  # noqa: F401  (Auto classes)
    from celltron.model_zoo.contrastive import PAIR_TOKENS_FILE, PAIRED_DIR, DualEncoder
    from celltron.model_zoo.registry import family_of

    trained = DualEncoder.from_pretrained(folder / PAIRED_DIR)
    torch.manual_seed(seed)
    towers = {}
    for modality in trained.modalities:
        spec = family_of(AutoConfig.from_pretrained(folder / PAIRED_DIR / modality))
        towers[modality] = spec.model_class(spec.config_class.from_pretrained(folder / PAIRED_DIR / modality))
    fresh = DualEncoder(towers, trained.projection_dim)
    if out.exists():
        shutil.rmtree(out)
    towers["rna"].save_pretrained(out)
    for item in folder.iterdir():  # the tokenizer's files
        if item.suffix == ".json" and item.name != "config.json":
            shutil.copy2(item, out / item.name)
    fresh.save_pretrained(out / PAIRED_DIR)
    shutil.copy2(folder / PAIRED_DIR / PAIR_TOKENS_FILE, out / PAIRED_DIR / PAIR_TOKENS_FILE)
    return out


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


def pretraining_effects(results: Path) -> str:
    """Pretrained − random initialisation of the same shape, on the plain model heads (the anchored
    heads are the baseline wherever the model earned no weight): per protein (predict), per cell
    (align, each model variant), per fold (annotate); a unit held out by several seeds counts once,
    averaged over them; 95% intervals."""
    from celltron.finetune.report import paired_over_seeds

    def read(task: str, name: str) -> dict:
        return json.loads((results / f"tea_{task}_{name}" / "metrics.json").read_text())

    def effect(trained: dict, random: dict, higher_is_better: bool = True) -> str:
        sign = 1 if higher_is_better else -1
        d = paired_over_seeds(
            {s: {u: sign * v for u, v in units.items()} for s, units in trained.items()},
            {s: {u: sign * v for u, v in units.items()} for s, units in random.items()},
            "",
            "units",
            "random",
        )
        mean, low, high = (sign * d[k] for k in ("mean", "low", "high"))
        low, high = min(low, high), max(low, high)
        return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] over {d['n_units']} units"

    lines = ["pretrained − random initialisation (plain model, same splits):"]
    for family in ("joint", "paired"):
        runs = [read("predict", n)["model_plain"]["per_protein"] for n in (family, f"{family}_random")]
        per_protein = [{s: {p: v["pearson"] for p, v in run.items()} for s, run in r.items()} for r in runs]
        lines.append(f"  {family} predict, per-protein Pearson: {effect(*per_protein)}")
        runs = [read("align", n)["model_variants"] for n in (family, f"{family}_random")]
        for variant in ("model_zero_shot", "model_cca"):
            lines.append(
                f"  {family} align {variant}, FOSCTTM (lower is better): {effect(*(r[variant]['per_cell'] for r in runs), False)}"
            )
        runs = [read("annotate", n)["model_variants"] for n in (family, f"{family}_random")]
        for variant in runs[0]:
            folds = [{"all": {u: v["macro_f1"] for u, v in r[variant]["per_fold"].items()}} for r in runs]
            lines.append(f"  {family} annotate {variant}, macro-F1: {effect(*folds)}")
    return "\n".join(lines)


def peer_rows(workdir: Path, shared_data, seeds, scvi_python: str, multivi_epochs: int) -> str:
    """TotalVI (TEA-seq, RNA -> proteins) and MultiVI (SNARE-seq, alignment) on the benchmark's own
    splits (the same seeds, the same train_only cells), scored by the same functions; each run in
    `scvi_python` (an environment with scvi-tools) through benchmarks/scvi_peers.py."""
    import subprocess
    import tempfile

    from celltron.finetune.config import FinetuneConfig
    from celltron.finetune.crossmodal.data import parse_modality_files, read_paired
    from celltron.finetune.crossmodal.evaluate import PREDICTION_METRICS, foscttm, prediction_scores, recall_at_k
    from celltron.finetune.crossmodal.features import clr
    from celltron.finetune.crossmodal.run import _train_only, split_cells
    from celltron.finetune.report import aggregate, paired_over_seeds, write_metrics

    script = REPO / "benchmarks" / "scvi_peers.py"
    results = workdir / "results"
    tea, snare = teaseq_files(shared_data), snareseq_files(shared_data)
    base = FinetuneConfig().crossmodal
    lines = []

    def run_peer(kind, files, train, test, seed, extra=()):
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "split.npz", train=train, test=test)
            command = [scvi_python, str(script), "--rna", str(files["rna"]), "--other", str(files[kind]), "--kind", kind]
            command += ["--split", f"{tmp}/split.npz", "--out", f"{tmp}/out.npz", "--seed", str(seed), *extra]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            return dict(np.load(f"{tmp}/out.npz", allow_pickle=True)), summary

    # TotalVI: the predict task's splits (half of the cells the models were not pretrained on)
    section = replace(base, test_fraction=0.5, train_only=str(workdir / "pretraining_cells.txt"))
    paired = read_paired(None, parse_modality_files([f"{m}={p}" for m, p in tea.items()]), ("rna", "adt"))
    seen = _train_only(section.train_only, paired)
    measured = clr(paired.counts["adt"])
    runs, summaries = {}, {}
    for seed in seeds:
        train, test = split_cells(paired, section, seed, seen)
        out, summaries[seed] = run_peer("adt", tea, train, test, seed)
        runs[seed] = prediction_scores(measured[test], clr(out["predicted"]), paired.features["adt"])
    knn = json.loads((results / "tea_predict_baselines" / "metrics.json").read_text())["baselines"]["knn_rna_pca"]
    totalvi = aggregate(runs, PREDICTION_METRICS, "per_protein")
    difference = paired_over_seeds(
        {s: {p: v["pearson"] for p, v in r["per_protein"].items()} for s, r in runs.items()},
        {s: {p: v["pearson"] for p, v in knn["per_protein"][str(s)].items()} for s in runs},
        "per-protein Pearson",
        "proteins",
        "knn_rna_pca",
    )
    (results / "tea_predict_totalvi").mkdir(parents=True, exist_ok=True)
    write_metrics(
        results / "tea_predict_totalvi" / "metrics.json", {"totalvi": totalvi, "against_knn": difference, "runs": summaries}
    )
    lines.append(
        f"TotalVI, TEA-seq RNA -> proteins: per-protein Pearson {totalvi['pearson']:.3f} ± {totalvi['std']['pearson']:.3f}, "
        f"Spearman {totalvi['spearman']:.3f}, per-cell {totalvi['cell_pearson']:.3f}, MSE {totalvi['mse']:.3f}; "
        f"− kNN on RNA PCA {difference['mean']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}] over 46 proteins; "
        f"{np.mean([v['runtime_seconds'] for v in summaries.values()]):.0f} s a seed"
    )
    # MultiVI: the SNARE-seq random-cell alignment splits
    paired = read_paired(None, parse_modality_files([f"{m}={p}" for m, p in snare.items()]), ("rna", "atac"))
    runs, summaries = {}, {}
    for seed in seeds:
        train, test = split_cells(paired, base, seed)
        out, summaries[seed] = run_peer("atac", snare, train, test, seed, ("--epochs", str(multivi_epochs)))
        per_cell = foscttm(out["latent_rna"], out["latent_other"])
        runs[seed] = {
            "foscttm": float(per_cell.mean()),
            **recall_at_k(out["latent_rna"], out["latent_other"], base.recall_k),
            "per_cell": {str(paired.cell_names[c]): float(v) for c, v in zip(test, per_cell)},
        }
    names = ("foscttm", *(f"recall_at_{k}" for k in base.recall_k))
    multivi = aggregate(runs, names, "per_cell")
    cca = json.loads((results / "snare_align_random" / "metrics.json").read_text())["baselines"]["cca"]
    difference = paired_over_seeds(
        {s: {c: -v for c, v in r["per_cell"].items()} for s, r in runs.items()},
        {s: {c: -v for c, v in cca["per_cell"][str(s)].items()} for s in runs},
        "FOSCTTM, negated (higher is better)",
        "cells",
        "cca",
    )
    (results / "snare_align_multivi").mkdir(parents=True, exist_ok=True)
    write_metrics(
        results / "snare_align_multivi" / "metrics.json", {"multivi": multivi, "against_cca": difference, "runs": summaries}
    )
    lines.append(
        f"MultiVI ({multivi_epochs} epochs), SNARE-seq alignment: FOSCTTM {multivi['foscttm']:.3f} ± {multivi['std']['foscttm']:.3f}, "
        f"recall@10 {multivi['recall_at_10']:.3f}; CCA − MultiVI FOSCTTM {difference['mean']:+.3f} "
        f"[{difference['low']:+.3f}, {difference['high']:+.3f}] over {difference['n_units']} cells (> 0: MultiVI better); "
        f"{np.mean([v['runtime_seconds'] for v in summaries.values()]):.0f} s a seed"
    )
    return "\n".join(lines)


def main() -> None:
    from benchmarks._data import add_shared_data_option

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/crossmodal"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument(
        "--scvi-python",
        help="a Python with scvi-tools (see benchmarks/scvi_peers.py): run TotalVI and MultiVI on the same splits, "
        "after the tasks have run (their results are read from --workdir)",
    )
    parser.add_argument("--peers-only", action="store_true", help="with --scvi-python: only the scvi-tools rows")
    parser.add_argument("--multivi-epochs", type=int, default=100)
    add_shared_data_option(parser)
    args = parser.parse_args()
    started = time.time()
    if args.peers_only:
        print(peer_rows(args.workdir, args.shared_data, args.seeds, args.scvi_python, args.multivi_epochs))
        return
    prepared = prepare(args.workdir, args.shared_data)
    if args.prepare_only:
        print(json.dumps({k: str(v) for k, v in prepared.items()}))
        return
    results = args.workdir / "results"
    tea, snare = teaseq_files(args.shared_data), snareseq_files(args.shared_data)
    # held-out cells: half of the 379 cells the model was not pretrained on, per seed
    held_out = {"label_key": "cell_type", "train_only": str(prepared["cells"]), "test_fraction": 0.5}
    annotate = {k: v for k, v in held_out.items() if k != "test_fraction"}  # folds over the 379 open cells
    models = {"baselines": None, **{name: prepared[name] for name in ("joint", "joint_random", "paired", "paired_random")}}
    for name, model in models.items():
        for task, fields in (("predict", held_out), ("align", held_out), ("annotate", annotate)):
            run_task(task, tea, results / f"tea_{task}_{name}", args.seeds, model, **fields)
    print(pretraining_effects(results))
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
    if args.scvi_python:
        print(peer_rows(args.workdir, args.shared_data, args.seeds, args.scvi_python, args.multivi_epochs))
    print(f"\n{platform.node()}, {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
