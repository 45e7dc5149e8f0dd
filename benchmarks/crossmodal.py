"""Cross-modal tasks on the real paired sets (issue 19): prediction, alignment and joint annotation,
every baseline beside a pretrained multi-modal model and its random initialisation, 3 seeds.

    python -m benchmarks.crossmodal [--workdir runs/bench/crossmodal] [--seeds 0 1 2] [--prepare-only]
        [--peers | --peers-only] [--multivi-epochs 100]

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
batches held out. The multiome models (configs/pretrain/genecompass_multiome_joint_benchmark.yaml,
genecompass_multiome_benchmark.yaml) are pretrained on 9 batches; alignment and annotation with
them (and their random initialisations) run on the other 3 batches' cells alone (`--snare-only`:
just this part).

scvi-tools peers (--peers, or --peers-only without the models; celltron[scvi]): TotalVI on the
TEA-seq predict splits and MultiVI on the SNARE-seq random-cell alignment splits, run by the tasks
themselves (`crossmodal.peers`) beside the baselines.

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
MULTIOME_JOINT_CONFIG = REPO / "configs" / "pretrain" / "genecompass_multiome_joint_benchmark.yaml"
MULTIOME_PAIRED_CONFIG = REPO / "configs" / "pretrain" / "genecompass_multiome_benchmark.yaml"
SNARE_BATCH_KEY, SNARE_LABEL = "Batch", "cluster (remapped)"
SNARE_UNSEEN_BATCHES = 3  # of 12, never pretrained on: the multiome models' tasks run on their cells


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


def prepare(workdir: Path, shared_data, families=("joint", "paired")) -> dict[str, Path]:
    """The pretraining cells' list and files, their corpus, the models of `families` pretrained on
    them, and their random-initialisation copies; each built once (a finished step is never redone)."""
    import anndata as ad

    from benchmarks.multimodal_stream import build

    files = teaseq_files(shared_data)
    cells_file = pretraining_cells(workdir, files)
    names = cells_file.read_text().splitlines()
    subset = {}
    for modality, path in files.items():
        subset[modality] = workdir / f"pretraining_{modality}.h5ad"
        if not subset[modality].exists():
            data = ad.read_h5ad(path)
            data[names].copy().write_h5ad(subset[modality])
    corpus = build(workdir / "pretraining_corpus", modalities=subset)
    configs = {"joint": JOINT_CONFIG, "paired": PAIRED_CONFIG}
    return {"cells": cells_file, **models_once({f: configs[f] for f in families}, corpus, workdir)}


def models_once(configs: dict[str, Path], corpus: Path, folder: Path) -> dict[str, Path]:
    """{family: config} pretrained on `corpus` (joint: one model; paired: a dual-encoder export),
    each with its random-initialisation copy (`FAMILY_random`)."""
    from benchmarks._pretrained import random_init_copy

    models = {}
    for family, config in configs.items():
        models[family] = pretrained_once(config, corpus, folder / f"{family}_model")
        models[f"{family}_random"] = folder / f"{family}_model_random_init"
        if not models[f"{family}_random"].exists():
            copy = random_paired_copy if family == "paired" else random_init_copy
            copy(models[family], models[f"{family}_random"], seed=0)
    return models


def prepare_snare(workdir: Path, shared_data) -> dict[str, Path]:
    """SNARE-seq for the multiome models: 3 of the 12 batches (seed 1234) are set aside, the joint
    (RNA + chromatin tokens, masked) and paired (chromatin tower, masked + contrastive) GeneCompass
    models are pretrained on the other 9, and the tasks run on the set-aside batches' cells alone,
    so that no evaluated cell (training or held out) was pretrained on. Each step is done once."""
    import anndata as ad

    from benchmarks.multimodal_stream import build

    files, work = snareseq_files(shared_data), workdir / "snare"
    work.mkdir(parents=True, exist_ok=True)
    batches = ad.read_h5ad(files["rna"], backed="r").obs[SNARE_BATCH_KEY].astype(str).to_numpy()
    names = np.unique(batches)
    unseen = np.sort(np.random.default_rng(PRETRAIN_SEED).permutation(names)[:SNARE_UNSEEN_BATCHES])
    (work / "unseen_batches.txt").write_text("\n".join(unseen) + "\n")
    parts = {"pretraining": ~np.isin(batches, unseen), "tasks": np.isin(batches, unseen)}
    subsets = {part: {} for part in parts}
    for modality, path in files.items():
        data = None
        for part, rows in parts.items():
            subsets[part][modality] = work / f"{part}_{modality}.h5ad"
            if not subsets[part][modality].exists():
                data = ad.read_h5ad(path) if data is None else data
                data[rows].copy().write_h5ad(subsets[part][modality])
    corpus = build(work / "pretraining_corpus", modalities=subsets["pretraining"], genome="mm10")
    return {
        "data": subsets["tasks"],
        **models_once({"joint": MULTIOME_JOINT_CONFIG, "paired": MULTIOME_PAIRED_CONFIG}, corpus, work),
    }


def snare_model_runs(prepared: dict, results: Path, seeds) -> None:
    """Align and annotate on the unseen batches' cells: the baselines, each multiome model and its
    random initialisation (random cells held out: half of them per seed; annotation: 5 folds)."""
    models = {"baselines": None, **{name: prepared[name] for name in ("joint", "joint_random", "paired", "paired_random")}}
    for name, model in models.items():
        fields = {"target": "atac", "label_key": SNARE_LABEL}
        run_task("align", prepared["data"], results / f"snare_unseen_align_{name}", seeds, model, test_fraction=0.5, **fields)
        run_task("annotate", prepared["data"], results / f"snare_unseen_annotate_{name}", seeds, model, **fields)


def pretraining_cells(workdir: Path, files: dict[str, Path]) -> Path:
    """`pretraining_cells.txt`: the fixed 70% of TEA-seq cells (seed 1234) the models are
    pretrained on, always training cells of the tasks."""
    import anndata as ad

    workdir.mkdir(parents=True, exist_ok=True)
    cells_file = workdir / "pretraining_cells.txt"
    names = ad.read_h5ad(files["rna"], backed="r").obs_names
    rng = np.random.default_rng(PRETRAIN_SEED)
    chosen = np.sort(rng.permutation(len(names))[: int(round(PRETRAIN_SHARE * len(names)))])
    cells_file.write_text("\n".join(names[chosen].astype(str)) + "\n")
    return cells_file


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


def pretraining_effects(results: Path, prefix: str = "tea", tasks=("predict", "align", "annotate")) -> str:
    """Pretrained − random initialisation of the same shape, on the plain model heads (the anchored
    heads are the baseline wherever the model earned no weight): per protein (predict), per cell
    (align, each model variant), per fold (annotate); a unit held out by several seeds counts once,
    averaged over them; 95% intervals."""
    from celltron.finetune.report import paired_over_seeds

    def read(task: str, name: str) -> dict:
        return json.loads((results / f"{prefix}_{task}_{name}" / "metrics.json").read_text())

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

    lines = [f"{prefix}: pretrained − random initialisation (plain model, same splits):"]
    for family in ("joint", "paired"):
        if "predict" in tasks:
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


def peer_rows(workdir: Path, shared_data, seeds, multivi_epochs: int) -> str:
    """TotalVI (TEA-seq, RNA -> proteins, the predict task's splits) and MultiVI (SNARE-seq, the
    random-cell alignment splits) as the tasks' own peers (`crossmodal.peers`, celltron[scvi]):
    the same seeds, train_only cells and scoring as every other row, the baselines in the same run.
    One torch thread: on the 2-core VM two threads made scvi-tools' small ops far slower."""
    import torch

    torch.set_num_threads(1)
    tea, snare = teaseq_files(shared_data), snareseq_files(shared_data)
    cells = pretraining_cells(workdir, tea)
    results = workdir / "results"
    lines = []
    started = time.time()
    predict = run_task(
        "predict",
        tea,
        results / "tea_predict_peers",
        seeds,
        label_key="cell_type",
        train_only=str(cells),
        test_fraction=0.5,
        peers=("totalvi",),
    )
    totalvi, against = predict["peers"]["totalvi"], predict["peers_against_best"]["totalvi"]
    lines.append(
        f"TotalVI, TEA-seq RNA -> proteins: per-protein Pearson {totalvi['pearson']:.3f} ± {totalvi['std']['pearson']:.3f}, "
        f"Spearman {totalvi['spearman']:.3f}, per-cell {totalvi['cell_pearson']:.3f}, MSE {totalvi['mse']:.3f}; "
        f"− {against['baseline']} {against['mean']:+.3f} [{against['low']:+.3f}, {against['high']:+.3f}] over "
        f"{against['n_units']} proteins; {(time.time() - started) / len(seeds):.0f} s a seed (with the baselines)"
    )
    started = time.time()
    align = run_task(
        "align",
        snare,
        results / "snare_align_peers",
        seeds,
        target="atac",
        label_key="cluster (remapped)",
        peers=("multivi",),
        peer_epochs=multivi_epochs,
    )
    multivi, against = align["peers"]["multivi"], align["peers_against_cca"]["multivi"]
    lines.append(
        f"MultiVI ({multivi_epochs} epochs), SNARE-seq alignment: FOSCTTM {multivi['foscttm']:.3f} ± "
        f"{multivi['std']['foscttm']:.3f}, recall@10 {multivi['recall_at_10']:.3f}, transfer macro-F1 "
        f"{multivi['transfer_macro_f1']:.3f}; MultiVI − CCA FOSCTTM {against['mean']:+.3f} [{against['low']:+.3f}, "
        f"{against['high']:+.3f}] over {against['n_units']} cells (< 0: MultiVI better); "
        f"{(time.time() - started) / len(seeds):.0f} s a seed (with the baselines)"
    )
    return "\n".join(lines)


def main() -> None:
    from benchmarks._data import add_shared_data_option

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/crossmodal"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument(
        "--peers", action="store_true", help="also run TotalVI and MultiVI (celltron[scvi]) as the tasks' peers, same splits"
    )
    parser.add_argument("--peers-only", action="store_true", help="only the scvi-tools peers' runs (no models needed)")
    parser.add_argument("--snare-only", action="store_true", help="only the SNARE-seq multiome models' part")
    parser.add_argument(
        "--joint-predict-only", action="store_true", help="only TEA-seq prediction with the joint model and its random init"
    )
    parser.add_argument("--multivi-epochs", type=int, default=100)
    add_shared_data_option(parser)
    args = parser.parse_args()
    started = time.time()
    if args.peers_only:
        print(peer_rows(args.workdir, args.shared_data, args.seeds, args.multivi_epochs))
        return
    if args.joint_predict_only:
        prepared = prepare(args.workdir, args.shared_data, families=("joint",))
        held_out = {"label_key": "cell_type", "train_only": str(prepared["cells"]), "test_fraction": 0.5}
        for name in ("joint", "joint_random"):
            run_task(
                "predict",
                teaseq_files(args.shared_data),
                args.workdir / "results" / f"tea_predict_{name}",
                args.seeds,
                prepared[name],
                **held_out,
            )
        return
    if args.snare_only:
        snare_model_runs(prepare_snare(args.workdir, args.shared_data), args.workdir / "results", args.seeds)
        print(pretraining_effects(args.workdir / "results", "snare_unseen", ("align", "annotate")))
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
    snare_model_runs(prepare_snare(args.workdir, args.shared_data), results, args.seeds)
    print(pretraining_effects(results, "snare_unseen", ("align", "annotate")))
    if args.peers:
        print(peer_rows(args.workdir, args.shared_data, args.seeds, args.multivi_epochs))
    print(f"\n{platform.node()}, {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
