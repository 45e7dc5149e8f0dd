"""Predictive intervals and OOD flags, measured on held-out units: the gene-graph perturbation
head (Papalexi 2021 held-out perturbations, Norman 2019 GEARS simulation split; 5-member
ensemble and MC dropout) and the best baseline's intervals in the same runs (with
--perturbation-model, also the frozen model head's and the model-feature graph head's; with
--only perturbation_plain, the frozen model head plain, calibrated on inner models fitted for
it), the drug-response best baseline (GDSC, unseen compounds and random pairs) and the drug model's
MC-dropout intervals (unseen compounds), the annotation baseline's prediction sets (PBMC 4k; and
each cell type held out of training whole) and a pretrained model's probe (the anchored head's
and the model alone's sets, and the plain head's), the cross-modal best baseline (TEA-seq RNA -> proteins) and the
joint benchmark model's head and ridge alone (and, with --only annotate_spread / crossmodal_dropout,
the probe predicting with MC dropout or as an ensemble, and the ridge's MC-dropout intervals
through the joint encoder). For each: the interval level, coverage on held-out
outputs (calibrated on training units by split conformal, and the uncalibrated Gaussian interval
where there is a spread), the mean width, how many units are flagged OOD, and whether error
rises with the OOD distance (AUROC of "large error", above the median, and Spearman).

    python -m benchmarks.uncertainty --out runs/bench/uncertainty [--only TASK] [--perturbation-model benchmark:geneformer]

Runs what is missing under `--out` (the perturbation runs are those of
benchmarks/perturbation_graph.py, read from `--graph-out` when already there).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks import drug_response, perturbation_graph
from benchmarks._data import add_shared_data_option, shared_paths
from benchmarks._pretrained import resolve_model
from celltron.cli import main as celltron

GRAPH_VARIANTS = ("GRN + co-expression", "GRN + co-expression, MC dropout")
MODEL_VARIANT = "GRN + co-expression, model features"  # with --perturbation-model: the frozen model head too
PERTURBATION_RUNS = (("papalexi", "heldout"), ("norman", "simulation"))
DRUG_SPLITS = ("drug", "random")


def _cell(value, digits=3) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _weights(choices: dict) -> str:
    """The anchor weight chosen per seed, in seed order: "0, 0.25, 0"."""
    return ", ".join(f"{choice['weight']:g}" for choice in choices.values())


def perturbation_rows(shared_data: Path, graph_out: Path, seeds: list[int], model: Path | None = None) -> list[str]:
    """Per dataset: the gene-graph head's intervals (ensemble, MC dropout), the best baseline's
    (the first variant's run; every run has the same), and with `model` the frozen model head's
    (anchored) beside the model-feature graph head."""
    rows = []
    variants = (*GRAPH_VARIANTS, MODEL_VARIANT) if model is not None else GRAPH_VARIANTS
    for dataset, split in PERTURBATION_RUNS:
        results = perturbation_graph.run(shared_data, graph_out, dataset, split, seeds, model, variants)
        named = [(f"gene-graph head, {variant}", results[variant]["graph_uncertainty"]) for variant in results]
        named.append(("best baseline", results[GRAPH_VARIANTS[0]]["baseline_uncertainty"]))
        if MODEL_VARIANT in results:  # the model run chooses its best baseline among more (linear_model)
            named.append(("best baseline of the model run", results[MODEL_VARIANT]["baseline_uncertainty"]))
            named.append(("frozen model head, anchored", results[MODEL_VARIANT]["model_uncertainty"]))
        rows += [_perturbation_row(f"{dataset} {split}, {who}", u) for who, u in named if u]
    return rows


def perturbation_plain_rows(shared_data: Path, out: Path, seeds: list[int], model: Path) -> list[str]:
    """Per dataset: the frozen model head, plain (the model alone at optim.lr and the full length,
    nothing chosen), whose intervals are calibrated on inner models fitted for them, beside the
    best baseline of the same run."""
    from benchmarks.perturbation import DATASETS, REFERENCE

    rows = []
    for dataset, split in PERTURBATION_RUNS:
        data, reference = shared_paths(shared_data, DATASETS[dataset], REFERENCE)
        folder = out / "perturbation_plain" / dataset / split
        if not (folder / "metrics.json").exists():
            args = ["--model", str(model), "--encoder", "frozen", "--head", "plain", "--data", str(data), "--split", split]
            args += ["--seeds", *map(str, seeds), "--coexpression-reference", str(reference), "--out", str(folder)]
            assert celltron(["finetune", "perturbation", *args]) == 0
        metrics = json.loads((folder / "metrics.json").read_text())
        named = (
            ("best baseline of the plain-head run", metrics["baseline_uncertainty"]),
            ("frozen model head, plain", metrics["model_uncertainty"]),
        )
        rows += [_perturbation_row(f"{dataset} {split}, {who}", u) for who, u in named]
    return rows


def perturbation_strata_rows(shared_data: Path, out: Path, seeds: list[int]) -> list[str]:
    """Per dataset, the best baseline's intervals (a --baselines-only run, no graph head) with one
    scale per fold and with a second scale for the genes each prediction moves most
    (perturbation.interval_strata predicted_change), on the same splits."""
    from benchmarks.perturbation import DATASETS, REFERENCE

    rows = []
    for dataset, split in PERTURBATION_RUNS:
        data, reference = shared_paths(shared_data, DATASETS[dataset], REFERENCE)
        for strata in ("none", "predicted_change"):
            folder = out / "perturbation_strata" / dataset / split / strata
            if not (folder / "metrics.json").exists():
                args = ["--baselines-only", "--data", str(data), "--split", split, "--seeds", *map(str, seeds)]
                args += ["--coexpression-reference", str(reference), "--out", str(folder)]
                args += ["--set", f"perturbation.interval_strata={strata}"]
                assert celltron(["finetune", "perturbation", *args]) == 0
            u = json.loads((folder / "metrics.json").read_text())["baseline_uncertainty"]
            who = "one scale" if strata == "none" else (f"two scales (moved genes {_cell(u['coverage_predicted_change'])})")
            rows.append(_perturbation_row(f"{dataset} {split}, best baseline, {who}", u))
    return rows


def _perturbation_row(who: str, u: dict) -> str:
    ood = u["ood"]
    flagged = f"{ood['n_flagged']} of {u['n_units']} ({ood['space']} space)" if ood["space"] else "no space"
    return (
        f"| perturbation: {who} | {u['method']} | {u['level']:g} | "
        f"{_cell(u['coverage'])} (DE genes {_cell(u['coverage_de_notarget'])}) | {_cell(u['coverage_gaussian'])} | "
        f"{_cell(u['mean_width'])} | {flagged} | {_cell(ood['error_flagged'])} vs {_cell(ood['error_unflagged'])} | "
        f"{_cell(ood['auroc_large_error'], 2)} | {_cell(ood['spearman'], 2)} |"
    )


def drug_rows(shared_data: Path, out: Path, seeds: list[int]) -> list[str]:
    results = drug_response.run(shared_data, out / "drug", seeds, 1, ("--baselines-only",), DRUG_SPLITS)
    # the plot of error against the OOD score, next to the results (unseen compounds)
    shutil.copyfile(out / "drug" / "drug" / "ood_error.png", Path(__file__).parent / "uncertainty_drug_ood_error.png")
    rows = []
    for split, metrics in results.items():
        u = metrics["uncertainty"]
        ood, covered = u["ood"], u["coverage"]
        flagged = covered.get("flagged", {}).get("coverage")
        rows.append(
            f"| drug response: GDSC {split} split, best baseline | split conformal | {u['level']:g} | "
            f"{_cell(covered['all']['coverage'])} (flagged pairs {_cell(flagged)}, unflagged "
            f"{_cell(covered.get('unflagged', {}).get('coverage'))}) | n/a | {_cell(covered['all']['mean_width'])} | "
            f"{ood['n_flagged_pairs']} of {ood['n_pairs']} pairs | {_cell(ood['error_flagged'])} vs {_cell(ood['error_unflagged'])} "
            f"(per {ood['unit']}) | {_cell(ood['auroc_large_error'], 2)} | {_cell(ood['spearman'], 2)} |"
        )
    return rows


def drug_model_rows(shared_data: Path, out: Path, seeds: list[int], steps: int = 1500) -> list[str]:
    """The drug model's own MC-dropout intervals (fingerprints and learned cell-line embeddings,
    no pretrained model), unseen compounds: the anchored head (at weight 0 it is the best
    baseline and reports its interval, so the row lists the weights) and the plain head (the
    model alone, always calibrated from its own spread)."""
    rows = []
    for head in ("anchored", "plain"):
        arguments = ("--head", head, "--intervals", "mc_dropout")
        folder = out / ("drug_model" if head == "anchored" else "drug_model_plain")
        for split, metrics in drug_response.run(shared_data, folder, seeds, steps, arguments, ("drug",)).items():
            u = metrics["model_uncertainty"]
            covered, gaussian = u["coverage"], u["uncalibrated_gaussian"] or {}
            weights = _weights(u["calibration_per_seed"])
            rows.append(
                f"| drug response: GDSC {split} split, model, {head} head (weights {weights}) | MC dropout, split conformal | "
                f"{u['level']:g} | {_cell(covered['all']['coverage'])} (flagged pairs "
                f"{_cell(covered.get('flagged', {}).get('coverage'))}) | {_cell(gaussian.get('coverage'))} | "
                f"{_cell(covered['all']['mean_width'])} | | | | |"
            )
    return rows


def annotation_rows(shared_data: Path, out: Path, seeds: list[int]) -> list[str]:
    """PBMC 4k labelled cells (the '?' ones left out), baseline only: prediction-set coverage, and
    OOD flags on the held-out cells; then each cell type in turn held out of training whole
    (80 other cells held out beside it): how its cells score against the other held-out ones."""
    from benchmarks.embedding import LABEL, labelled_copy
    from celltron.finetune.annotate import baseline_uncertainty, run_annotate
    from celltron.finetune.config import FinetuneConfig
    from celltron.lab.data import read_lab_data
    from celltron.pretrain.config import replace

    out.mkdir(parents=True, exist_ok=True)
    path = labelled_copy(shared_data, out)
    config = replace(FinetuneConfig(), data={"path": str(path)}, annotate={"label_key": LABEL, "seeds": tuple(seeds)}).check()
    metrics = run_annotate(config, None, out / "annotate", baselines_only=True)
    sets, ood = metrics["uncertainty"]["sets"], metrics["uncertainty"]["ood"]
    rows = [
        f"| annotation: PBMC 4k, stratified split, pca_logreg | conformal sets | {sets['level']:g} | "
        f"{_cell(sets['coverage'])} (mean set size {_cell(sets['mean_size'], 2)}) | n/a | n/a | "
        f"{ood['n_flagged']} of {ood['n_cells']} cells | {_cell(ood['error_flagged'])} vs {_cell(ood['error_unflagged'])} "
        f"(misclassified) | {_cell(ood['auroc_large_error'], 2)} | {_cell(ood['spearman'], 2)} |"
    ]
    lab = read_lab_data(path, [LABEL])
    classes, labels = np.unique(lab.obs[LABEL].astype(str).to_numpy(), return_inverse=True)
    novel_lines = [
        "| cell type held out of training | its cells: mean OOD score, flagged | other held-out cells: mean, flagged |",
        "|---|---|---|",
    ]
    for k, name in enumerate(classes):
        known = np.flatnonzero(labels != k)
        held = np.random.default_rng(0).choice(known, 80, replace=False)
        train, test = np.setdiff1d(known, held), np.concatenate([held, np.flatnonzero(labels == k)])
        _, _, score = baseline_uncertainty(config, lab, labels, train, test, len(classes), seed=0)
        novel = labels[test] == k
        novel_lines.append(
            f"| {name} ({novel.sum()} cells) | {score[novel].mean():.2f}, {np.mean(score[novel] >= 0.9):.0%} | "
            f"{score[~novel].mean():.2f}, {np.mean(score[~novel] >= 0.9):.0%} |"
        )
    return rows, novel_lines


def crossmodal_rows(shared_data: Path, out: Path, seeds: list[int]) -> list[str]:
    """TEA-seq PBMC RNA -> 46 proteins, random split, baselines only."""
    from benchmarks.crossmodal import teaseq_files
    from celltron.finetune.config import FinetuneConfig
    from celltron.finetune.crossmodal.run import run_crossmodal
    from celltron.pretrain.config import replace

    files = teaseq_files(shared_data)
    modalities = tuple(f"{name}={file}" for name, file in files.items())
    config = replace(FinetuneConfig(), crossmodal={"task": "predict", "modalities": modalities, "seeds": tuple(seeds)}).check()
    metrics = run_crossmodal(config, out / "crossmodal", baselines_only=True)
    u, ood = metrics["uncertainty"], metrics["uncertainty"]["ood"]
    return [
        f"| cross-modal: TEA-seq RNA -> proteins, best baseline | split conformal per protein | {u['level']:g} | "
        f"{_cell(u['coverage'])} (proteins {_cell(u['coverage_per_protein']['min'])}-{_cell(u['coverage_per_protein']['max'])}) | "
        f"n/a | {_cell(u['mean_width'])} | {ood['n_flagged']} of {ood['n_cells']} cells | {_cell(ood['error_flagged'])} vs "
        f"{_cell(ood['error_unflagged'])} | {_cell(ood['auroc_large_error'], 2)} | {_cell(ood['spearman'], 2)} |"
    ]


def annotation_model_rows(shared_data: Path, out: Path, seeds: list[int], model: Path, steps: int = 1000) -> list[str]:
    """PBMC 4k, the frozen-encoder probe of a pretrained model (benchmarks/embedding.py's probe
    protocol and held-out cells): the anchored head's sets and the model alone's, beside the
    baseline's on the same cells."""
    from benchmarks.embedding import PROBE_FLAGS, annotation, labelled_copy

    out.mkdir(parents=True, exist_ok=True)
    data = labelled_copy(shared_data, out)
    metrics = annotation(model, data, out, seeds, steps, PROBE_FLAGS, "annotate_probe")
    u = metrics["uncertainty"]
    weights = _weights(metrics["anchor_weights"])
    # the plain head at optim.lr and the full length (nothing chosen): its sets from inner models fitted for them
    plain = annotation(model, data, out, seeds, steps, ["--encoder", "frozen", "--head", "plain"], "annotate_probe_plain")
    named = (
        ("pca_logreg (same run)", u["sets"]),
        (f"model, anchored head (weights {weights})", u["model_sets"]),
        ("model alone, at the anchored head's setting", u["model_plain_sets"]),
        (
            "model, plain head (optim.lr, full length; sets from 2 inner models fitted for them)",
            plain["uncertainty"]["model_plain_sets"],
        ),
    )
    return [
        f"| annotation: PBMC 4k, {_model_name(model)} probe, {who} | "
        f"conformal sets | {sets['level']:g} | {_cell(sets['coverage'])} (mean set size {_cell(sets['mean_size'], 2)}, "
        f"one label {_cell(sets['singletons'], 2)}) | n/a | n/a | | | | |"
        for who, sets in named
    ]


SPREADS = (("mc_dropout", "MC dropout, 20 passes"), ("ensemble", "5-member ensemble"))


def annotation_spread_rows(
    shared_data: Path, out: Path, seeds: list[int], model: Path, encoder: str = "frozen", steps: int | None = None
) -> list[str]:
    """PBMC 4k, the plain head (optim.lr, the full length) on a frozen encoder (a probe, 1,000
    steps) or a tuned one (the config's 300 steps), predicting with MC dropout or as an ensemble
    (annotate.intervals): its sets (calibrated on inner models fitted for them) and whether the
    draws' disagreement marks its errors; the single-model plain head is the reference. MC dropout
    of a probe samples only the head's dropout; of a tuned encoder, the encoder's too."""
    from benchmarks.embedding import annotation, labelled_copy

    out.mkdir(parents=True, exist_ok=True)
    data = labelled_copy(shared_data, out)
    steps = steps or (1000 if encoder == "frozen" else 300)
    prefix, who_head = ("annotate_probe", "probe") if encoder == "frozen" else ("annotate_tuned", "tuned encoder")
    plain_flags = ["--encoder", encoder, "--head", "plain"]
    single = annotation(model, data, out, seeds, steps, plain_flags, f"{prefix}_plain")
    sets = single["uncertainty"]["model_plain_sets"]
    rows = [
        f"| annotation: PBMC 4k, {_model_name(model)} {who_head}, plain head, one model (macro-F1 "
        f"{_cell(single['model']['macro_f1'])}) | conformal sets | {sets['level']:g} | {_cell(sets['coverage'])} "
        f"(mean set size {_cell(sets['mean_size'], 2)}, one label {_cell(sets['singletons'], 2)}) | n/a | n/a | | | | |"
    ]
    for kind, who in SPREADS:
        metrics = annotation(model, data, out, seeds, steps, [*plain_flags, "--intervals", kind], f"{prefix}_{kind}")
        sets, spread = metrics["uncertainty"]["model_plain_sets"], metrics["model_spread"]
        rows.append(
            f"| annotation: PBMC 4k, {_model_name(model)} {who_head}, plain head, {who} (macro-F1 "
            f"{_cell(metrics['model']['macro_f1'])}) | conformal sets on the draws' mean | {sets['level']:g} | "
            f"{_cell(sets['coverage'])} (mean set size {_cell(sets['mean_size'], 2)}, one label "
            f"{_cell(sets['singletons'], 2)}) | n/a | n/a | disagreement (mutual information): misclassified "
            f"{_cell(spread['mean_wrong'])} vs {_cell(spread['mean_right'])} (AUROC of 1 − top probability "
            f"{_cell(spread['top_probability']['auroc_large_error'], 2)}) | | {_cell(spread['auroc_large_error'], 2)} | "
            f"{_cell(spread['spearman'], 2)} |"
        )
    return rows


def _model_name(model: Path) -> str:
    return model.name if model.name != "export" else model.parent.parent.name


def crossmodal_model_rows(shared_data: Path, workdir: Path, seeds: list[int], intervals: str = "none") -> list[str]:
    """TEA-seq RNA -> proteins with the joint benchmark model (benchmarks/crossmodal.py
    --joint-predict-only: held-out cells are half of those it was not pretrained on): the
    baseline's, the anchored head's and the model alone's per-protein intervals, same cells."""
    from benchmarks import crossmodal

    prepared = crossmodal.prepare(workdir, shared_data, families=("joint",))
    held_out = {"label_key": "cell_type", "train_only": str(prepared["cells"]), "test_fraction": 0.5}
    suffix = "" if intervals == "none" else f"_{intervals}"
    metrics = crossmodal.run_task(
        "predict",
        crossmodal.teaseq_files(shared_data),
        workdir / "results" / f"tea_predict_joint{suffix}",
        seeds,
        prepared["joint"],
        intervals=intervals,
        **held_out,
    )
    u = metrics["uncertainty"]
    weights = _weights(metrics["best_baseline"]["per_seed"])
    named = (
        ("best baseline (same run)", u),
        (f"joint model, anchored head (weights {weights})", u["model_intervals"]),
        ("joint model alone (ridge)", u["model_plain_intervals"]),
    )
    rows = [
        f"| cross-modal: TEA-seq RNA -> proteins, cells not pretrained on, {who} | split conformal per protein | "
        f"{u['level']:g} | {_cell(i['coverage'])} (proteins {_cell(i['coverage_per_protein']['min'])}-"
        f"{_cell(i['coverage_per_protein']['max'])}) | n/a | {_cell(i['mean_width'])} | | | | |"
        for who, i in named
    ]
    dropout = u.get("model_dropout_intervals")
    if dropout:
        spread = dropout["spread_vs_error"]
        rows.append(
            f"| cross-modal: the same cells, joint model alone (ridge), MC dropout through the encoder "
            f"({dropout['passes']} passes; per-protein scale {_cell(dropout['scale_per_protein']['min'], 1)}-"
            f"{_cell(dropout['scale_per_protein']['max'], 1)} spreads) | conformal x spread per protein | {u['level']:g} | "
            f"{_cell(dropout['coverage'])} (proteins {_cell(dropout['coverage_per_protein']['min'])}-"
            f"{_cell(dropout['coverage_per_protein']['max'])}) | {_cell(dropout['gaussian_coverage'])} | "
            f"{_cell(dropout['mean_width'])} | cell spread vs its error | | {_cell(spread['auroc_large_error'], 2)} | "
            f"{_cell(spread['spearman'], 2)} |"
        )
    return rows


def grn_lines(shared_data: Path, out: Path, seeds: list[int]) -> list[str]:
    """PBMC 4k against TRRUST, baselines only (500 cells, 1,000 targets, 3 TF x target blocks per
    seed): the best baseline's calibrated edge probabilities on the held-out blocks."""
    from benchmarks.grn import FILES

    data, truth = shared_paths(shared_data, *FILES)
    lines = [
        "| seed | Brier | Brier, training density | skill (1 − ratio) | calibration error | mean probability vs share true | "
        "top 100 per fold: expected [0.9 interval] vs observed |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        folder = out / "grn" / f"seed{seed}"
        if not (folder / "metrics.json").exists():
            command = ["grn", "--data", str(data), "--gene-column", "gene_symbol_original", "--truth", str(truth)]
            assert (
                celltron([*command, "--seed", str(seed), "--max-cells", "500", "--top-genes", "1000", "--out", str(folder)]) == 0
            )
        u = json.loads((folder / "metrics.json").read_text())["uncertainty"]
        tops = "; ".join(
            f"{t['expected']:.1f} [{max(t['low'], 0):.1f}, {t['high']:.1f}] vs {t['observed']}" for t in u["top_k"]["per_fold"]
        )
        skill = 1 - u["brier"] / u["brier_training_density"]
        lines.append(
            f"| {seed} | {u['brier']:.3e} | {u['brier_training_density']:.3e} | {skill:+.3f} | "
            f"{u['expected_calibration_error']:.2e} | {u['mean_probability']:.2e} vs {u['share_true']:.2e} | {tops} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/uncertainty"))
    parser.add_argument("--graph-out", type=Path, default=Path("runs/bench/graph"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--only",
        choices=[
            "perturbation",
            "perturbation_plain",
            "drug",
            "drug_model",
            "annotate",
            "annotate_model",
            "crossmodal",
            "crossmodal_model",
            "annotate_spread",
            "annotate_tuned_spread",
            "perturbation_strata",
            "crossmodal_dropout",
            "grn",
        ],
        help="one task's rows alone",
    )
    parser.add_argument(
        "--model", default="benchmark:geneformer", help="the annotation probe's pretrained model (annotate_model rows)"
    )
    parser.add_argument("--crossmodal-workdir", type=Path, default=Path("runs/bench/crossmodal"))
    parser.add_argument(
        "--perturbation-model", help="also the frozen model head and model-feature graph head (e.g. benchmark:geneformer)"
    )
    add_shared_data_option(parser)
    args = parser.parse_args()
    header = (
        "| task | intervals | level | coverage (calibrated) | coverage (Gaussian) | mean width | flagged OOD | "
        "error flagged vs not | AUROC large error | Spearman |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    resolved = functools.cache(lambda name: resolve_model(name, shared_data=args.shared_data))
    if args.only in (None, "perturbation"):
        model = resolved(args.perturbation_model) if args.perturbation_model else None
        rows += perturbation_rows(args.shared_data, args.graph_out, args.seeds, model)
    if args.only in (None, "perturbation_plain"):
        model = resolved(args.perturbation_model or args.model)
        rows += perturbation_plain_rows(args.shared_data, args.out, args.seeds, model)
    if args.only in (None, "drug"):
        rows += drug_rows(args.shared_data, args.out, args.seeds)
    if args.only in (None, "drug_model"):
        rows += drug_model_rows(args.shared_data, args.out, args.seeds)
    novel = []
    if args.only in (None, "annotate"):
        annotation, novel = annotation_rows(args.shared_data, args.out, args.seeds)
        rows += annotation
    if args.only in (None, "annotate_model"):
        model = resolved(args.model)
        rows += annotation_model_rows(args.shared_data, args.out / "annotate_model", args.seeds, model)
    if args.only in (None, "crossmodal"):
        rows += crossmodal_rows(args.shared_data, args.out, args.seeds)
    if args.only in (None, "crossmodal_model"):
        rows += crossmodal_model_rows(args.shared_data, args.crossmodal_workdir, args.seeds)
    if args.only in (None, "annotate_spread"):
        model = resolved(args.model)
        rows += annotation_spread_rows(args.shared_data, args.out / "annotate_model", args.seeds, model)
    if args.only in (None, "annotate_tuned_spread"):
        model = resolved(args.model)
        rows += annotation_spread_rows(args.shared_data, args.out / "annotate_model", args.seeds, model, "tuned")
    if args.only in (None, "perturbation_strata"):
        rows += perturbation_strata_rows(args.shared_data, args.out, args.seeds)
    if args.only in (None, "crossmodal_dropout"):
        rows += crossmodal_model_rows(args.shared_data, args.crossmodal_workdir, args.seeds, "mc_dropout")
    print(header)
    print("\n".join(rows))
    if novel:
        print("\nAnnotation, one cell type held out of training whole (seed 0; flagged: OOD score >= 0.9):\n")
        print("\n".join(novel))
    if args.only in (None, "grn"):
        print("\nGRN, PBMC 4k vs TRRUST, the best baseline's edge probabilities on held-out TF x target blocks:\n")
        print("\n".join(grn_lines(args.shared_data, args.out, args.seeds)))


if __name__ == "__main__":
    main()
