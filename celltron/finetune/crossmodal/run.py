"""`celltron finetune cross-modal predict|align|annotate`: what labs do with paired cells, measured
as the field measures it (TotalVI, MultiVI, GLUE, scCLIP), beside the simple baselines, on
splits fixed per seed.

- predict: a target modality (proteins) of held-out cells from their RNA alone. Baselines: the
  mean profile; kNN and ridge regression on RNA PCA (k and alpha by inner CV on training cells).
  The best baseline is chosen per seed by inner CV over training cells on the per-protein
  Pearson. Optionally (`crossmodal.query`) proteins of an RNA-only experiment are predicted by
  the best baseline fitted on every paired cell.
- align: each modality of held-out cells embedded apart: CCA of RNA PCA and protein PCA or
  chromatin LSI, fitted on training pairs. FOSCTTM, recall@k, label transfer.
- annotate: cell types by kNN on the joint view (both modalities' blocks, each scaled to unit
  variance) beside RNA PCA alone, on the same stratified folds; paired per fold.

Writes metrics.json (`model`: null without a model, `baselines` by name: each metric's mean,
spread and per-seed values), predictions.h5ad, a UMAP PNG (align, annotate), and prints a table.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.errors import ConfigError, InputError
from celltron.finetune.crossmodal import baselines as bl
from celltron.finetune.crossmodal.data import PairedCells, align_panel, parse_modality_files, read_paired
from celltron.finetune.crossmodal.evaluate import (
    PREDICTION_METRICS,
    foscttm,
    label_transfer,
    prediction_scores,
    recall_at_k,
)
from celltron.finetune.crossmodal.features import RnaPca, clr, modality_view, rna_pca, standardised
from celltron.finetune.report import (
    aggregate,
    choose_best,
    paired_difference,
    paired_over_seeds,
    print_baseline_choice,
    results_table,
    save_figure,
    verdict,
    verdict_line,
    write_metrics,
)
from celltron.io import write_h5ad_atomically

log = logging.getLogger(__name__)
ALIGN_METRICS_BASE = ("foscttm", "transfer_accuracy", "transfer_macro_f1")
ANNOTATE_METRICS = ("accuracy", "macro_f1")
MIN_QUERY_GENES = 0.5  # share of the training RNA's genes a query must measure


def run_crossmodal(config, out, model: str | None = None, baselines_only: bool = False) -> dict:
    """The cross-modal task `config.crossmodal.task` end to end (module docstring)."""
    section, out = config.crossmodal, Path(out)
    use_model = model is not None and not baselines_only
    _check_task_modalities(section)
    if section.peers:
        from celltron.finetune.crossmodal.peers import require_scvi

        for peer in section.peers:
            require_scvi(peer)
    paired = read_paired(
        config.data.path or None, parse_modality_files(section.modalities), (section.source, section.target), config.data.layer
    )
    source, target = _canonical(section.source), _canonical(section.target)
    train_only = _train_only(section.train_only, paired)
    query = _read_query(section.query, paired, source, target) if section.query else None
    views = _model_views(config, model, paired, target) if use_model else None
    if views is not None and section.task == "align" and not views.reads_target:
        raise ConfigError(
            f"cross-modal align with --model {model}: the model reads RNA only; alignment needs a joint model whose "
            f"tokens include {target} (pretrained with multimodal.joint: [{target}]) or a paired export with a {target} "
            f"tower (multimodal.pair: {target})"
        )
    out.mkdir(parents=True, exist_ok=True)  # only once the data and the model are known to be usable
    if section.task == "predict":
        from celltron.finetune.crossmodal.model import masked_value_predictions

        embedding = None
        if views is not None:
            passes = views.rna_dropout_passes(section.dropout_passes) if section.intervals == "mc_dropout" else None
            embedding = (str(views.folder), views.rna(), masked_value_predictions(views), passes)
        return _predict(paired, section, source, target, out, query, train_only, embedding)
    if section.task == "align":
        return _align(paired, section, source, target, out, train_only, views)
    return _annotate(paired, section, source, target, out, views, train_only)


def _model_views(config, model: str, paired: PairedCells, target: str):
    from celltron.finetune.crossmodal.model import ModelViews
    from celltron.model_zoo.registry import resolve_model_folder

    folder = resolve_model_folder(model)
    other = next(m for m in (target, _canonical(config.crossmodal.source)) if m != "rna")  # the modality besides RNA
    return ModelViews(folder, paired, other, config.data.batch_size, config.trainer.seed, config.data)


def _train_only(path: str, paired: PairedCells) -> np.ndarray:
    """Per cell, whether `crossmodal.train_only` names it (always a training cell)."""
    if not path:
        return np.zeros(paired.n_cells, dtype=bool)
    from celltron.inputs import existing

    text = existing(path, "crossmodal.train_only cell list").read_text()
    names = {line.strip() for line in text.splitlines() if line.strip()}
    flags = np.isin(paired.cell_names, list(names))
    if not flags.any():
        raise InputError(f"{path} (crossmodal.train_only): none of its {len(names)} cell names is a cell of {paired.path}")
    if flags.all():
        raise InputError(f"{path} (crossmodal.train_only): it names every cell of {paired.path}, so none is left to hold out")
    return flags


def _canonical(name: str) -> str:
    from celltron.corpus.modalities import modality_name

    return modality_name(name, "--source/--target")


def _check_task_modalities(section) -> None:
    source, target = _canonical(section.source), _canonical(section.target)
    if section.task == "predict" and (source, target) != ("rna", "adt"):
        raise ConfigError(
            f"cross-modal predict: --source {section.source} --target {section.target}: prediction is RNA -> proteins "
            "(--source rna --target adt); for RNA with chromatin use align or annotate"
        )


def _header(task: str, paired: PairedCells, source: str, target: str) -> dict:
    return {
        "task": f"cross-modal {task}",
        "data": {m: str(f) for m, f in paired.files.items()},
        "source": source,
        "target": target,
    }


# ---------------------------------------------------------------- splits


def split_cells(paired: PairedCells, section, seed: int, train_only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out cells of one seed: random cells, or whole batches (split batch).
    Cells flagged in `train_only` are always training cells; held-out cells (or batches) are a
    `test_fraction` share of the others."""
    cells = np.arange(paired.n_cells)
    fixed = np.zeros(paired.n_cells, dtype=bool) if train_only is None else train_only
    if section.split == "random":
        from sklearn.model_selection import train_test_split

        _, test = train_test_split(cells[~fixed], test_size=section.test_fraction, random_state=seed)
        return np.setdiff1d(cells, test), np.sort(test)
    from sklearn.model_selection import GroupShuffleSplit

    batches = paired.column(section.batch_key, "--batch-key")
    open_batches = np.setdiff1d(batches, batches[fixed])
    if len(np.unique(batches)) < 2 or len(open_batches) < 1:
        raise InputError(
            f"{paired.path}: obs[{section.batch_key!r}] has no batch that can be held out whole (one batch, or every batch "
            "holds train_only cells); split batch needs one (or use --split random)"
        )
    eligible = cells[np.isin(batches, open_batches)]
    if len(open_batches) == 1:
        test = eligible
    else:
        splitter = GroupShuffleSplit(1, test_size=section.test_fraction, random_state=seed)
        _, held = next(splitter.split(eligible, groups=batches[eligible]))
        test = eligible[held]
    return np.setdiff1d(cells, test), np.sort(test)


def _split_record(paired, section, splits: dict) -> dict:
    record = {"kind": section.split, "test_fraction": section.test_fraction}
    record["per_seed"] = {str(s): {"train": len(tr), "test": len(te)} for s, (tr, te) in splits.items()}
    if section.train_only:
        record["train_only"] = section.train_only
    if section.split == "batch":
        batches = paired.column(section.batch_key, "--batch-key")
        record["batch_key"] = section.batch_key
        record["held_out_batches"] = {str(s): sorted(set(batches[te])) for s, (_, te) in splits.items()}
    return record


# ---------------------------------------------------------------- predict


def _baseline_predictors(features, targets, train, section, seed) -> tuple[dict, dict, dict]:
    """{name: predictor}, {name: inner CV score on training cells}, {name: chosen setting}."""
    knn, knn_choice = bl.tuned("knn", section.knn_k, features, targets, train, section.inner_folds, seed)
    ridge, ridge_choice = bl.tuned("ridge", section.ridge_alphas, features, targets, train, section.inner_folds, seed)
    predictors = {"mean_profile": bl.mean_profile, "knn_rna_pca": knn, "ridge_rna_pca": ridge}
    inner = {
        "mean_profile": bl.inner_score(bl.mean_profile, features, targets, train, section.inner_folds, seed),
        "knn_rna_pca": knn_choice["scores"][str(knn_choice["chosen"])],
        "ridge_rna_pca": ridge_choice["scores"][str(ridge_choice["chosen"])],
    }
    settings = {"knn_rna_pca": {"k": knn_choice}, "ridge_rna_pca": {"alpha": ridge_choice}}
    return predictors, inner, settings


def _predict(
    paired: PairedCells, section, source: str, target: str, out: Path, query=None, train_only=None, embedding=None
) -> dict:
    """`embedding`: (model folder, frozen RNA cell embeddings) when a model is evaluated."""
    targets = clr(paired.counts[target])
    proteins = paired.features[target]
    cell_types = paired.column(section.label_key, "--label-key") if section.label_key else None
    runs: dict[str, dict] = {}
    model_runs, plain_runs, alphas, splits, chosen, settings, first = {}, {}, {}, {}, {}, {}, None
    peer_runs, peer_records, masked_runs, layers = {}, {}, {}, {}
    uncertain = {}  # seed -> the best baseline's interval coverage and the held-out cells' OOD scores
    batches = paired.column(section.batch_key, "--batch-key") if section.split == "batch" else None
    for seed in section.seeds:
        train, test = splits[seed] = split_cells(paired, section, seed, train_only)
        features = rna_pca(paired.counts[source], train, section.components, seed, section.top_genes)
        predictors, inner, settings[seed] = _baseline_predictors(features, targets, train, section, seed)
        best = choose_best(inner)
        chosen[seed] = {"name": best, "score": inner[best], "inner_scores": inner}
        types = None if cell_types is None else cell_types[test]
        for name, predictor in predictors.items():
            predicted = predictor(features, targets, train)
            runs.setdefault(name, {})[seed] = prediction_scores(targets[test], predicted[test], proteins, types)
            if name == best:
                best_predicted = predicted
        for name, predicted in _peer_proteins(paired, section, source, target, train, test, seed, peer_records).items():
            peer_runs.setdefault(name, {})[seed] = prediction_scores(targets[test], predicted, proteins, types)
            _held_out_layer(layers, name, predicted, test, targets.shape)
        reported = best_predicted
        if section.interval_level > 0:
            uncertain[seed] = prediction_uncertainty(
                paired.counts[source], targets, train, test, predictors[best], features, best_predicted, section, seed, batches
            )
        shown = (best_predicted, train, test, best)
        if embedding is not None:
            head, plain, alphas[seed], weight = _model_head(
                embedding[1],
                targets,
                train,
                section,
                seed,
                lambda fit: predictors[best](features, targets, fit),
                best_predicted,
                train_only,
            )
            model_runs[seed] = prediction_scores(targets[test], head[test], proteins, types)
            if embedding[2] is not None:
                from celltron.finetune.crossmodal.model import calibrated

                masked = calibrated(embedding[2], targets, train, train_only)[test]
                masked_runs[seed] = prediction_scores(targets[test], masked, proteins, types)
                _held_out_layer(layers, "model_masked_values", masked, test, targets.shape)
            plain_runs[seed] = prediction_scores(targets[test], plain[test], proteins, types)
            chosen[seed].update(weight)
            shown = (head, train, test, f"{section.head} head on {embedding[0]}")
            reported = head
        if seed in uncertain:
            uncertain[seed]["error"] = np.abs(reported[test] - targets[test]).mean(1)
            if embedding is not None:
                uncertain[seed].update(
                    _model_intervals(
                        embedding[1],
                        targets,
                        train,
                        test,
                        (head, plain),
                        section,
                        seed,
                        batches,
                        train_only,
                        lambda fit: predictors[best](features, targets, fit),
                        weight,
                    )
                )
                if embedding[3] is not None:
                    uncertain[seed]["model_dropout"] = dropout_interval(
                        embedding[1], embedding[3], targets, train, test, section, seed, batches, train_only
                    )
        first = first or shown
    metrics = {
        **_header("predict", paired, source, target),
        "model_folder": None if embedding is None else embedding[0],
        "model": _aggregate_prediction(model_runs) if model_runs else None,
        "head": section.head if model_runs else None,
        "model_plain": _aggregate_prediction(plain_runs) if model_runs and section.head == "anchored" else None,
        "model_masked_values": _aggregate_prediction(masked_runs) if masked_runs else None,
        "paired_masked_values": _model_against_best(masked_runs, runs, chosen) if masked_runs else None,
        "model_settings": {str(s): a for s, a in alphas.items()} or None,
        "baselines": {name: _aggregate_prediction(per_seed) for name, per_seed in runs.items()},
        "best_baseline": {
            "chosen_on": f"{section.inner_folds}-fold inner CV over training cells, mean per-protein Pearson",
            "per_seed": {str(s): c for s, c in chosen.items()},
        },
        "paired": _model_against_best(model_runs, runs, chosen) if model_runs else None,
        "paired_plain": _model_against_best(plain_runs, runs, chosen) if model_runs else None,
        "peers": {name: _aggregate_prediction(per_seed) for name, per_seed in peer_runs.items()} or None,
        "peers_against_best": {name: _model_against_best(r, runs, chosen) for name, r in peer_runs.items()} or None,
        "peer_runs": peer_records or None,
        "baseline_settings": {str(s): v for s, v in settings.items()},
        "split": _split_record(paired, section, splits),
        "seeds": list(section.seeds),
        "n_proteins": len(proteins),
        "uncertainty": uncertainty_summary(uncertain, section.interval_level, "model" if model_runs else "best baseline")
        if uncertain
        else None,
        "notes": _prediction_notes(section, embedding is not None, bool(masked_runs)),
    }
    if query is not None:
        metrics["query"] = _predict_query(paired, section, source, target, out, query)
    write_metrics(out / "metrics.json", metrics)
    _write_prediction_cells(out / "predictions.h5ad", paired, target, targets, *first, layers)
    plain = {"model, plain head": metrics["model_plain"]} if metrics["model_plain"] else {}
    if masked_runs:
        plain["model, masked values"] = metrics["model_masked_values"]
    shown_rows = {**plain, **metrics["baselines"], **{f"{n} (peer)": r for n, r in (metrics["peers"] or {}).items()}}
    print(results_table({**metrics, "baselines": shown_rows}, PREDICTION_METRICS, metrics["notes"]))
    print_baseline_choice(metrics, "per-protein Pearson")
    _print_peers(metrics["peers_against_best"], "per-protein Pearson", "the best baseline")
    if masked_runs:
        line = verdict_line("per-protein Pearson", "best baseline", metrics["paired_masked_values"], "proteins", "training cells")
        print(f"masked values (zero-shot, calibrated): {line}")
    u = metrics["uncertainty"]
    if not u:
        return metrics
    print(
        f"best baseline, {u['level']:g} intervals per protein (split conformal on training cells): coverage "
        f"{u['coverage']:.3f}, mean width {u['mean_width']:.2f}; OOD: {u['ood']['n_flagged']} of {u['ood']['n_cells']} "
        f"held-out cells flagged, AUROC of large error {u['ood']['auroc_large_error']:.2f}"
    )
    for key, who in (
        ("model_intervals", "model head"),
        ("model_plain_intervals", "model alone"),
        ("model_dropout_intervals", "model alone, MC dropout"),
    ):
        if u.get(key):
            m = u[key]
            print(
                f"{who}, {u['level']:g} intervals per protein (split conformal on training cells): coverage "
                f"{m['coverage']:.3f}, mean width {m['mean_width']:.2f}"
            )
    return metrics


OOD_NEIGHBOURS = 10
OOD_REFERENCE_CELLS = 2000  # training cells an OOD distance is measured against (seeded sample)


def _inner_folds(train: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list:
    """Inner folds over the training cells, grouped as the outer split (whole batches under
    split batch; `groups`: each cell's batch) so calibration sees the same kind of novelty."""
    from sklearn.model_selection import GroupKFold, KFold

    if groups is not None and len(np.unique(groups[train])) >= 2:
        splitter = GroupKFold(min(folds, len(np.unique(groups[train]))))
        return list(splitter.split(train, groups=groups[train]))
    return list(KFold(folds, shuffle=True, random_state=seed).split(train))


def prediction_uncertainty(
    counts, targets, train, test, predictor, features, predicted, section, seed: int, groups: np.ndarray | None = None
) -> dict:
    """For one seed: the best baseline's interval per held-out cell and protein (its prediction
    ± q, q per protein the split-conformal quantile of its absolute errors on training cells
    predicted out of fold, inner KFold) and each held-out cell's OOD score (mean distance to its
    nearest training cells in an RNA PCA fitted on the first inner fold's training cells, as a
    percentile of the same distance of that fold's held-out training cells). Under split batch
    the inner folds hold out whole batches (`groups`), as the outer split does."""
    from celltron.finetune.uncertainty import NearestNeighbourOOD

    folds = _inner_folds(train, groups, section.inner_folds, seed)
    width = conformal_widths(targets, train, lambda fit: predictor(features, targets, fit), folds, section.interval_level)
    inside = np.abs(targets[test] - predicted[test]) <= width
    fit, held = folds[0]
    space = rna_pca(counts, train[fit], section.components, seed, section.top_genes)
    reference = train[fit]
    if len(reference) > OOD_REFERENCE_CELLS:
        reference = np.sort(np.random.default_rng(seed).choice(reference, OOD_REFERENCE_CELLS, replace=False))
    scorer = NearestNeighbourOOD.calibrated_on(space[reference], space[train[held]], OOD_NEIGHBOURS)
    return {
        "inside": inside,
        "width": np.broadcast_to(2 * width, inside.shape),
        "distance": scorer.distance(space[test]),
        "score": scorer.score(space[test]),
    }


def _scored_cells(held: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
    """An inner fold's held-out cells whose residuals calibrate an interval: those the model was
    not pretrained on (`seen`, per cell), which it scores too well."""
    return held if seen is None else held[~seen[held]]


def conformal_widths(targets, train, predict_fit, folds, level: float, seen=None) -> np.ndarray:
    """Per protein, the split-conformal quantile (at `level`) of the absolute errors of
    `predict_fit(fit cells)` (-> predictions for every cell) on the inner folds' held-out
    training cells; `seen` (per cell): cells a model was pretrained on, left out of the
    residuals (it scores them too well) though kept in the fits."""
    from celltron.finetune.uncertainty import conformal_scale

    residuals = []
    for fit, held in folds:
        held = _scored_cells(train[held], seen)
        residuals.append(np.abs(targets[held] - predict_fit(train[fit])[held]))
    residual = np.concatenate(residuals)
    unit = np.ones(len(residual))
    return np.array([conformal_scale(residual[:, j], 0 * unit, unit, level) for j in range(targets.shape[1])])


def model_interval(targets, train, test, head, refit, section, seed: int, groups=None, seen=None) -> dict:
    """The model head's interval per held-out cell and protein: its prediction `head` ± q, q per
    protein from `conformal_widths` of the head refitted (`refit(fit cells)`: ridge and, anchored,
    the best baseline, blended at the chosen weight) on the inner folds over the training cells."""
    folds = _inner_folds(train, groups, section.inner_folds, seed)
    width = conformal_widths(targets, train, refit, folds, section.interval_level, seen)
    inside = np.abs(targets[test] - head[test]) <= width
    return {"inside": inside, "width": np.broadcast_to(2 * width, inside.shape)}


def dropout_interval(embedding, passes, targets, train, test, section, seed: int, groups=None, seen=None) -> dict:
    """The model alone's MC-dropout interval per held-out cell and protein: its dropout-off
    prediction ± q x the passes' spread, q per protein the split-conformal quantile of
    |error| / spread on the inner folds' held-out training cells (the ridge refitted on each
    inner fold, `crossmodal.model.dropout_predictions`). Also the uncalibrated Gaussian
    interval's coverage and each held-out cell's mean spread and error."""
    from celltron.finetune.crossmodal.model import dropout_predictions
    from celltron.finetune.uncertainty import conformal_scale, ensemble_summary, gaussian_scale

    residuals, spreads = [], []
    for fit, held in _inner_folds(train, groups, section.inner_folds, seed):
        held = _scored_cells(train[held], seen)
        centre, draws = dropout_predictions(embedding, passes, targets, train[fit], section, seed)
        residuals.append(np.abs(targets[held] - centre[held]))
        spreads.append(ensemble_summary(draws[:, held])[1])
    residual, spread = np.concatenate(residuals), np.concatenate(spreads)
    zero = np.zeros(len(residual))
    scale = np.array(
        [conformal_scale(residual[:, j], zero, spread[:, j], section.interval_level) for j in range(targets.shape[1])]
    )
    centre, draws = dropout_predictions(embedding, passes, targets, train, section, seed)
    error, spread = np.abs(targets[test] - centre[test]), ensemble_summary(draws[:, test])[1]
    return {
        "inside": error <= scale * spread,
        "width": 2 * scale * spread,
        "gaussian_inside": error <= gaussian_scale(section.interval_level) * spread,
        "cell_spread": spread.mean(1),
        "cell_error": error.mean(1),
        "scale": scale,
        "passes": len(passes),
    }


def _model_intervals(embedding, targets, train, test, heads, section, seed: int, groups, seen, baseline, weight) -> dict:
    """{"model": the reported head's intervals, and anchored, "model_plain": the model alone's
    (its ridge refitted per inner fold)} for one seed; `heads` = (reported, plain) predictions."""
    head, plain = heads
    refit = _head_refit(embedding, targets, section, seed, baseline, weight)
    records = {"model": model_interval(targets, train, test, head, refit, section, seed, groups, seen)}
    if section.head == "anchored":
        alone = _head_refit(embedding, targets, section, seed, baseline, weight, alone=True)
        records["model_plain"] = model_interval(targets, train, test, plain, alone, section, seed, groups, seen)
    return records


def _interval_statistics(records: list[dict]) -> dict:
    """Coverage over every held-out cell and protein, its range over proteins, the mean width."""
    inside = np.concatenate([r["inside"] for r in records])
    per_protein = inside.mean(0)
    return {
        "coverage": float(inside.mean()),
        "coverage_per_protein": {"min": float(per_protein.min()), "max": float(per_protein.max())},
        "mean_width": float(np.mean(np.concatenate([r["width"] for r in records]))),
    }


def uncertainty_summary(per_seed: dict, level: float, predictor: str) -> dict:
    """Pooled over seeds and held-out cells: coverage of the best baseline's intervals (over all
    cells and proteins, and per protein's range), OOD flags, and whether `predictor`'s error
    (mean absolute CLR error over proteins) rises with the OOD distance."""
    from celltron.finetune.uncertainty import error_vs_score

    error = np.concatenate([r["error"] for r in per_seed.values()])
    distance = np.concatenate([r["distance"] for r in per_seed.values()])
    flagged = np.concatenate([r["score"] for r in per_seed.values()]) >= level
    models = [r["model"] for r in per_seed.values() if "model" in r]
    alone = [r["model_plain"] for r in per_seed.values() if "model_plain" in r]
    return {
        "predictor": "best baseline",
        "level": level,
        "interval": "prediction ± q per protein, q the split-conformal quantile of its absolute errors on training cells "
        "predicted out of fold",
        **_interval_statistics(list(per_seed.values())),
        "model_intervals": {
            "predictor": "model head (as reported: anchored or plain)",
            "interval": "prediction ± q per protein, q the split-conformal quantile of the head's absolute errors on "
            "training cells predicted out of fold (ridge and baseline refitted, the chosen weight)",
            **_interval_statistics(models),
        }
        if models
        else None,
        "model_dropout_intervals": _dropout_summary([r["model_dropout"] for r in per_seed.values() if "model_dropout" in r]),
        "model_plain_intervals": {
            "predictor": "the model alone (the anchored head's ridge, weight 1)",
            "interval": "prediction ± q per protein, q the split-conformal quantile of the ridge's absolute errors on "
            "training cells predicted out of fold (ridge refitted per inner fold)",
            **_interval_statistics(alone),
        }
        if alone
        else None,
        "ood": {
            "space": f"RNA PCA of an inner fold's training cells ({OOD_NEIGHBOURS} nearest; calibrated on that fold's "
            "held-out training cells)",
            "n_flagged": int(flagged.sum()),
            "n_cells": int(len(flagged)),
            "error": f"{predictor}: mean absolute CLR error over proteins",
            "error_flagged": float(error[flagged].mean()) if flagged.any() else float("nan"),
            "error_unflagged": float(error[~flagged].mean()) if (~flagged).any() else float("nan"),
            **error_vs_score(error, distance),
        },
    }


def _peer_settings(section):
    from celltron.finetune.crossmodal.peers import PeerSettings

    return PeerSettings(epochs=section.peer_epochs, genes=section.peer_genes)


def _peer_batches(paired, section):
    return paired.column(section.batch_key, "--batch-key") if section.batch_key else None


def _peer_proteins(paired, section, source, target, train, test, seed, records: dict) -> dict[str, np.ndarray]:
    """{peer: CLR of its predicted proteins for the held-out cells} for the predict task's peers."""
    if "totalvi" not in section.peers:
        return {}
    from celltron.finetune.crossmodal.peers import totalvi_proteins

    predicted, record = totalvi_proteins(
        paired.counts[source], paired.counts[target], train, test, seed, _peer_settings(section), _peer_batches(paired, section)
    )
    records.setdefault("totalvi", {})[str(seed)] = record
    return {"totalvi": clr(predicted)}


def _print_peers(against: dict | None, metric: str, baseline: str) -> None:
    for name, d in (against or {}).items():
        print(
            f"{name} (peer) − {baseline} ({d['baseline']}), {metric}: {d['mean']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}] over {d['n_units']} {d['unit']}"
        )


def _dropout_summary(records: list[dict]) -> dict | None:
    """Pooled over seeds: the MC-dropout intervals' coverage and width, the uncalibrated
    Gaussian interval's coverage, and whether a cell's spread rises with its error."""
    from celltron.finetune.uncertainty import error_vs_score

    if not records:
        return None
    return {
        "predictor": "the model alone (its ridge head, dropout off), MC dropout through the frozen encoder",
        "interval": "prediction ± q x the passes' standard deviation, q per protein the split-conformal quantile of "
        "|error| / spread on training cells predicted out of fold (ridge refitted per inner fold)",
        "passes": records[0]["passes"],
        **_interval_statistics(records),
        "gaussian_coverage": float(np.mean(np.concatenate([r["gaussian_inside"] for r in records]))),
        "scale_per_protein": {
            "min": float(min(r["scale"].min() for r in records)),
            "max": float(max(r["scale"].max() for r in records)),
        },
        "spread_vs_error": error_vs_score(
            np.concatenate([r["cell_error"] for r in records]), np.concatenate([r["cell_spread"] for r in records])
        ),
    }


def _model_head(embedding, targets, train, section, seed: int, baseline, baseline_predicted, seen=None):
    """The model's ridge head on its frozen embedding and, anchored, the blend with the best
    baseline at the weight chosen by inner CV; returns (head, plain, alpha record, weight record)."""
    from celltron.finetune.crossmodal.model import choose_anchor_weight, model_predictor
    from celltron.finetune.report import anchor

    model, alpha = model_predictor(embedding, targets, train, section, seed)
    plain = model(train)
    if section.head == "plain":
        return plain, plain, alpha, {}
    choice = choose_anchor_weight(baseline, model, targets, train, section.anchor_weights, section.inner_folds, seed, seen)
    return anchor(baseline_predicted, plain, choice["weight"]), plain, alpha, choice


def _head_refit(embedding, targets, section, seed: int, baseline, weight: dict, alone: bool = False):
    """fit cells -> the model head refitted on them (ridge, alpha by inner CV there; anchored:
    blended with the best baseline refitted there, at the weight chosen for the outer head;
    `alone`: the ridge alone, the anchored head's model part)."""
    from celltron.finetune.crossmodal.model import model_predictor
    from celltron.finetune.report import anchor

    blended = section.head == "anchored" and not alone
    if blended and weight["weight"] == 0:  # the head is the baseline: no ridge to fit
        return baseline

    def refit(fit):
        model, _ = model_predictor(embedding, targets, fit, section, seed)
        plain = model(fit)
        return anchor(baseline(fit), plain, weight["weight"]) if blended else plain

    return refit


def _model_against_best(model_runs: dict, runs: dict, chosen: dict) -> dict:
    """Per protein, the model − each seed's best baseline (per-protein Pearson of held-out cells,
    averaged over seeds), with a 95% interval over proteins."""

    def per_protein(run: dict) -> dict:
        return {p: v["pearson"] for p, v in run["per_protein"].items()}

    model = {s: per_protein(r) for s, r in model_runs.items()}
    best = {s: per_protein(runs[chosen[s]["name"]][s]) for s in model_runs}
    names = "/".join(sorted({chosen[s]["name"] for s in model_runs}))
    return paired_over_seeds(model, best, "per-protein Pearson", "proteins", names)


def _prediction_notes(section, with_model: bool, masked_values: bool = False) -> dict:
    notes = {
        "values": "CLR of protein counts (log1p minus the cell's mean over the panel); correlations per protein "
        "across held-out cells, averaged over proteins; cell_pearson: per cell across the panel",
        "mean_profile": "the training cells' mean protein profile: constant across cells, so per-protein "
        "correlations are undefined (n/a)",
        "knn_rna_pca": f"kNN regression (distance-weighted) on {section.components} PCs of log-normalised RNA "
        f"({_genes(section)}), k from {list(section.knn_k)} by inner CV",
        "ridge_rna_pca": f"ridge regression on the same PCs, alpha from {list(section.ridge_alphas)} by inner CV",
    }
    if masked_values:
        notes["model, masked values"] = (
            "a joint model's zero-shot proteins: its RNA tokens and every protein token with the value masked, read "
            "from the masked-value head; each protein's line to CLR fitted on training cells (outside --train-only when it names some; no other training)"
        )
    if "totalvi" in section.peers:
        notes["totalvi"] = (
            "TotalVI (scvi-tools, a peer): trained on training cells and the held-out cells' RNA (their proteins "
            "zeroed, a batch of their own, so missing); posterior mean proteins as if measured in a training batch, "
            f"CLR; {_peer_settings(section).epochs_of('totalvi')} epochs at most, {section.peer_genes} seurat_v3 genes; "
            "not a candidate for the best baseline"
        )
    if with_model:
        notes["model"] = (
            "ridge from the model's frozen RNA cell embedding (standardised on training cells, alpha by inner CV)"
            + (
                "; anchored: best baseline + w x (model − best baseline), w by inner CV over training cells"
                if section.head == "anchored"
                else ""
            )
        )
    return notes


def _genes(section) -> str:
    return f"{section.top_genes} most variable training genes" if section.top_genes else "every gene"


def _aggregate_prediction(per_seed: dict) -> dict:
    summary = aggregate(per_seed, PREDICTION_METRICS, "per_protein")
    types = {str(s): r["per_cell_type"] for s, r in per_seed.items() if "per_cell_type" in r}
    if types:
        summary["per_cell_type"] = types
    return summary


def _held_out_layer(layers: dict, name: str, predicted: np.ndarray, test: np.ndarray, shape) -> None:
    """The first seed's predictions of held-out cells as a layer (NaN for every other cell)."""
    if name not in layers:
        layers[name] = np.full(shape, np.nan, dtype=np.float32)
        layers[name][test] = predicted


def _write_prediction_cells(path: Path, paired, target, measured, predicted, train, test, name, layers=None) -> None:
    """Every paired cell: X the predicted CLR values of the first seed's best baseline (held-out
    cells out of sample; obs celltron_split says which), layer `measured` the measured CLR, and a
    layer per peer or model variant predicting held-out cells only (`layers`: NaN elsewhere)."""
    import anndata as ad

    split = np.full(paired.n_cells, "train", dtype=object)
    split[test] = "test"
    obs = paired.obs.copy()
    obs["celltron_split"] = pd.Categorical(split)
    adata = ad.AnnData(
        X=predicted.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(paired.features[target]).astype(object))
    )
    adata.layers["measured"] = measured.astype(np.float32)
    for layer, values in (layers or {}).items():
        adata.layers[layer] = values
    adata.uns["celltron"] = {"predictor": name, "values": f"CLR of {target} counts", "trained_on": "cells with split train"}
    write_h5ad_atomically(adata, path)


def _predict_query(paired, section, source: str, target: str, out: Path, query) -> dict:
    """The best baseline (chosen by inner CV over every paired cell) fitted on every paired cell,
    predicting the query's target modality from its RNA (`_read_query`); scored when the query
    measures it."""
    import anndata as ad

    query_rna, query_target, query_obs, where = query
    everyone = np.arange(paired.n_cells)
    seed = section.seeds[0]
    pca = RnaPca(paired.counts[source], section.components, seed, section.top_genes)
    features = np.vstack([pca.transform(paired.counts[source]), pca.transform(query_rna)])
    targets = np.vstack([clr(paired.counts[target]), np.zeros((query_rna.shape[0], len(paired.features[target])))])
    predictors, inner, _ = _baseline_predictors(features, targets, everyone, section, seed)
    best = choose_best(inner)
    predicted = predictors[best](features, targets, everyone)[paired.n_cells :]
    adata = ad.AnnData(
        X=predicted.astype(np.float32), obs=query_obs, var=pd.DataFrame(index=pd.Index(paired.features[target]).astype(object))
    )
    record = {"file": str(where), "n_cells": int(query_rna.shape[0]), "predictor": best, "inner_scores": inner}
    if query_target is not None:
        measured = clr(query_target)
        adata.layers["measured"] = measured.astype(np.float32)
        scores = prediction_scores(measured, predicted, paired.features[target])
        record["scores"] = {m: scores[m] for m in PREDICTION_METRICS}
    write_h5ad_atomically(adata, out / "query_predictions.h5ad")
    return record


def _read_query(path, paired, source: str, target: str):
    """The query's RNA counts over the training RNA's genes (by name; absent genes are zero), its
    target counts in the training panel's order when it has them, its obs, and its path."""
    from celltron.corpus.readers import check_raw_counts, open_source

    path = Path(path)
    target_counts = None
    if path.suffix == ".h5mu":
        from celltron.corpus.modalities import open_multimodal

        data = open_multimodal(path)
        has_target = target in data.sources
        data.close()
        query = read_paired(str(path), {}, (source, target) if has_target else (source, "adt" if source != "adt" else "rna"))
        if has_target:
            columns = align_panel(query.features[target], paired.features[target], f"{path} ({target})")
            target_counts = query.counts[target][:, columns]
        rna, genes, obs = query.counts[source], query.features[source], query.obs
    else:
        handle = open_source(path)
        try:
            rna = handle.read_rows(0, handle.n_cells).tocsr()
            check_raw_counts(rna, handle, 0)
            genes, obs = np.asarray(handle.gene_names).astype(str), handle.obs.copy()
            obs.index = pd.Index(np.asarray(handle.cell_names).astype(str))
        finally:
            handle.close()
    return _on_training_genes(rna, genes, paired.features[source], path), target_counts, obs, path


def _on_training_genes(counts: sp.csr_matrix, genes: np.ndarray, training: np.ndarray, path) -> sp.csr_matrix:
    position = {g: i for i, g in enumerate(np.asarray(genes).astype(str))}
    columns = np.asarray([position.get(g, -1) for g in np.asarray(training).astype(str)])
    share = float((columns >= 0).mean())
    if share < MIN_QUERY_GENES:
        raise InputError(
            f"{path}: only {share:.0%} of the training RNA's {len(training)} genes are among its genes (matched by name); "
            "pass RNA with the same gene naming (symbols or Ensembl IDs) as the paired data"
        )
    found = columns >= 0
    picked = counts.tocsc()[:, columns[found]]
    full = sp.lil_matrix((counts.shape[0], len(training)), dtype=counts.dtype)
    full[:, np.flatnonzero(found)] = picked
    return full.tocsr()


# ---------------------------------------------------------------- align


def align_scores(first, second, train, test, labels, section) -> dict:
    """FOSCTTM (per held-out cell and mean), recall@k and label transfer of one alignment."""
    per_cell = foscttm(first[test], second[test])
    scores = {"foscttm": float(per_cell.mean()), "per_cell": per_cell, **recall_at_k(first[test], second[test], section.recall_k)}
    if labels is not None:
        scores.update(label_transfer(first[train], labels[train], second[test], labels[test], section.neighbors))
    return scores


def _named_align_scores(first, second, train, test, labels, section, paired) -> dict:
    """`align_scores` with the per-cell FOSCTTM keyed by cell name (cells held out by several
    seeds are matched by name)."""
    scores = align_scores(first, second, train, test, labels, section)
    scores["per_cell"] = {str(paired.cell_names[c]): float(v) for c, v in zip(test, scores["per_cell"])}
    return scores


ALIGNERS = ("cca", "model_zero_shot", "model_cca")  # the baseline first: it is the head unless a model earns it


def _aligners(views: list[np.ndarray], model: dict[str, np.ndarray] | None, components: int) -> dict:
    """{name: fit rows -> (first, second) embeddings of every cell}: CCA of the baseline views,
    and with a model, its two single-modality embeddings compared as they are (centred on the
    fit rows) and aligned by CCA fitted on the fit rows."""

    def cca_of(first, second):
        return lambda fit: tuple(bl.unit_rows(x) for x in bl.cca(first, second, fit, components)[:2])

    aligners = {"cca": cca_of(*views)}
    if model is not None:
        first, second = model["first"], model["second"]
        aligners["model_zero_shot"] = lambda fit: (
            bl.unit_rows(first - first[fit].mean(0)),
            bl.unit_rows(second - second[fit].mean(0)),
        )
        aligners["model_cca"] = cca_of(first, second)
    return aligners


def choose_aligner(aligners: dict, train: np.ndarray, folds: int, seed: int, seen=None) -> dict:
    """The reported alignment by inner CV over the training cells: CCA of the baseline views
    unless a model alignment lowers the inner held-out cells' FOSCTTM beyond the 95% interval
    (`report.choose_weight`'s rule, the candidates in ALIGNERS order standing for weights 0, 1, 2);
    inner held-out cells are training cells the model was not pretrained on (`model.inner_folds`)."""
    from celltron.finetune.crossmodal.model import inner_folds
    from celltron.finetune.report import UnitScore, choose_weight

    names = list(aligners)
    by_index = {float(i): [] for i in range(len(names))}
    for fit, held in inner_folds(train, folds, seed, seen):
        for i, name in enumerate(names):
            first, second = aligners[name](fit)
            by_index[float(i)].append(UnitScore.of_units(foscttm(first[held], second[held])))
    choice = choose_weight(by_index, higher_is_better=False, seed=seed)
    return {
        "name": names[int(choice["weight"])],
        "inner_foscttm": {names[int(float(k))]: v for k, v in choice["weight_scores"].items()},
        "gain_low": {names[int(float(k))]: v for k, v in choice["gain_low"].items()},
    }


def _align(paired: PairedCells, section, source: str, target: str, out: Path, train_only=None, views=None) -> dict:
    labels = paired.column(section.label_key, "--label-key") if section.label_key else None
    metric_names = ("foscttm", *(f"recall_at_{k}" for k in section.recall_k))
    if labels is not None:
        metric_names += ("transfer_accuracy", "transfer_macro_f1")
    if section.umap:
        from celltron.finetune.embedding_eval import require_eval_extra

        require_eval_extra("umap")
    model = None
    if views is not None:
        rna, other = views.aligned()
        model = {"first": rna, "second": other} if source == "rna" else {"first": other, "second": rna}
    runs: dict[str, dict] = {}
    head_runs, chosen, splits, first_embedding, correlations = {}, {}, {}, None, {}
    peer_runs, peer_records = {}, {}
    for seed in section.seeds:
        train, test = splits[seed] = split_cells(paired, section, seed, train_only)
        base_views = [
            modality_view(m, paired.counts[m], train, section.components, seed, section.top_genes) for m in (source, target)
        ]
        correlations[str(seed)] = bl.cca(*base_views, train, section.cca_components)[2].tolist()
        aligners = _aligners(base_views, model, section.cca_components)
        for name, aligner in aligners.items():
            runs.setdefault(name, {})[seed] = _named_align_scores(*aligner(train), train, test, labels, section, paired)
        for name, (a, b) in _peer_alignments(paired, section, source, target, train, test, seed, peer_records).items():
            peer_runs.setdefault(name, {})[seed] = _named_align_scores(a, b, train, test, labels, section, paired)
        shown = "cca"
        if model is not None:
            chosen[seed] = choose_aligner(aligners, train, section.inner_folds, seed, train_only)
            head_runs[seed] = runs[chosen[seed]["name"]][seed]
            shown = chosen[seed]["name"]
        if first_embedding is None:
            a, b = aligners[shown](train)
            first_embedding = (a[test], b[test], test)
    aggregated = {name: aggregate(per_seed, metric_names, "per_cell") for name, per_seed in runs.items()}
    metrics = {
        **_header("align", paired, source, target),
        "model_folder": None if views is None else str(views.folder),
        "model": aggregate(head_runs, metric_names, "per_cell") if head_runs else None,
        "model_variants": {n: aggregated[n] for n in aggregated if n != "cca"} or None,
        "head_choice": {str(s): c for s, c in chosen.items()} or None,
        "baselines": {"cca": aggregated["cca"]},
        "paired": _per_cell_against(head_runs, runs["cca"], "foscttm") if head_runs else None,
        "peers": {name: aggregate(r, metric_names, "per_cell") for name, r in peer_runs.items()} or None,
        "peers_against_cca": {name: _per_cell_against(r, runs["cca"], "foscttm") for name, r in peer_runs.items()} or None,
        "peer_runs": peer_records or None,
        "canonical_correlations": correlations,
        "split": _split_record(paired, section, splits),
        "seeds": list(section.seeds),
        "notes": {
            "cca": f"CCA ({section.cca_components} pairs, fitted on training pairs) of {_view_name(source, section)} "
            f"and {_view_name(target, section)}; each held-out cell embedded from one modality alone, rows unit length",
            "foscttm": "fraction of samples closer than the true match, held-out cells, both directions (0 perfect, 0.5 chance)",
            "transfer": f"kNN ({section.neighbors}) on training cells' {source} embeddings predicting held-out cells "
            f"from their {target} embeddings",
        },
    }
    if peer_runs:
        metrics["notes"]["multivi"] = (
            "MultiVI (scvi-tools, a peer): trained on training pairs plus each held-out cell as an expression-only and "
            "an accessibility-only copy; the copies' latents are the alignment, training pairs' latents train the label "
            f"transfer; {_peer_settings(section).epochs_of('multivi')} epochs at most, {section.peer_genes} seurat_v3 genes, "
            "peaks in >= 1% of training cells"
        )
    if model is not None:
        metrics["notes"]["model"] = (
            f"the model's frozen embedding of each modality alone ({source} tokens; {target} tokens): model_zero_shot compares "
            "them as they are (centred on training cells), model_cca aligns them by CCA fitted on training pairs; the "
            "reported head is CCA of the baseline views unless a model alignment lowers inner held-out FOSCTTM beyond "
            "its 95% interval (inner CV over training cells)"
        )
    write_metrics(out / "metrics.json", metrics)
    _write_aligned_cells(out / "predictions.h5ad", paired, labels, source, target, *first_embedding)
    if section.umap:
        _plot_aligned(
            out / "umap.png", *first_embedding[:2], (source, target), None if labels is None else labels[first_embedding[2]]
        )
    variants = {f"  {name}": result for name, result in (metrics["model_variants"] or {}).items()}
    peers = {f"{name} (peer)": result for name, result in (metrics["peers"] or {}).items()}
    print(results_table({**metrics, "baselines": {**variants, **metrics["baselines"], **peers}}, metric_names, metrics["notes"]))
    _print_peers(metrics["peers_against_cca"], "FOSCTTM (lower is better)", "CCA")
    if metrics["paired"]:
        picks = ", ".join(f"seed {s}: {c['name']}" for s, c in chosen.items())
        print(f"reported alignment, chosen by inner CV over training cells: {picks}")
        print(verdict_line("FOSCTTM (lower is better)", "cca", metrics["paired"], "cells", chosen_on=None))
    return metrics


def _peer_alignments(paired, section, source, target, train, test, seed, records: dict) -> dict:
    """{peer: (first, second)} embeddings of every cell (training cells: their paired latent;
    held-out cells: each modality's copy) for the align task's peers."""
    if "multivi" not in section.peers:
        return {}
    from celltron.finetune.crossmodal.peers import multivi_latents

    latents, record = multivi_latents(
        paired.counts["rna"], paired.counts["atac"], train, test, seed, _peer_settings(section), _peer_batches(paired, section)
    )
    records.setdefault("multivi", {})[str(seed)] = record
    embedded = {}
    for modality in (source, target):
        embedding = np.zeros((paired.n_cells, latents["paired"].shape[1]), dtype=np.float32)
        embedding[train], embedding[test] = latents["paired"], latents[modality]
        embedded[modality] = embedding
    return {"multivi": (embedded[source], embedded[target])}


def _per_cell_against(model_runs: dict, baseline_runs: dict, metric: str, higher_is_better: bool = False) -> dict:
    """Per held-out cell, the model − the baseline (each averaged over the seeds that held the cell
    out), with a 95% interval over cells."""
    model, baseline = {}, {}
    for seed, run in model_runs.items():
        for cell, value in run["per_cell"].items():
            model.setdefault(cell, []).append(value)
            baseline.setdefault(cell, []).append(baseline_runs[seed]["per_cell"][cell])
    difference = paired_difference(
        {c: float(np.mean(v)) for c, v in model.items()},
        {c: float(np.mean(v)) for c, v in baseline.items()},
        higher_is_better=higher_is_better,
    )
    return {**difference, "metric": metric, "baseline": "cca", "unit": "cells", "verdict": verdict(difference)}


def _view_name(modality: str, section) -> str:
    return {
        "rna": f"RNA PCA ({section.components})",
        "adt": f"protein CLR PCA (up to {section.components})",
        "atac": f"chromatin LSI ({section.components}, first dropped)",
    }[modality]


def _write_aligned_cells(path: Path, paired, labels, source, target, first, second, test) -> None:
    """The first seed's held-out cells twice, once per modality: obsm X_aligned, obs modality,
    cell and (with labels) label."""
    import anndata as ad

    names = paired.cell_names[test]
    obs = pd.DataFrame(
        {"cell": np.concatenate([names, names]), "modality": pd.Categorical([source] * len(test) + [target] * len(test))},
        index=pd.Index([f"{n}:{source}" for n in names] + [f"{n}:{target}" for n in names]),
    )
    if labels is not None:
        obs["label"] = pd.Categorical(np.concatenate([labels[test], labels[test]]))
    adata = ad.AnnData(X=sp.csr_matrix((len(obs), 0), dtype=np.float32), obs=obs)
    adata.obsm["X_aligned"] = np.vstack([first, second]).astype(np.float32)
    write_h5ad_atomically(adata, path)


def _plot_aligned(png: Path, first, second, modalities, labels) -> Path:
    """One UMAP of the held-out cells of both modalities, coloured by modality and by label."""
    colourings = {"modality": np.repeat(np.asarray(modalities), [len(first), len(second)])}
    if labels is not None:
        colourings["label"] = np.concatenate([labels, labels])
    return plot_umap(np.vstack([first, second]), colourings, png)


def plot_umap(embedding: np.ndarray, colourings: dict[str, np.ndarray], png: Path, neighbors: int = 15, seed: int = 0) -> Path:
    """One UMAP (umap-learn) of `embedding`, a panel per colouring ({title: a label per row})."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    with warnings.catch_warnings():  # umap-learn's notices about seeds and spectral initialisation
        warnings.simplefilter("ignore")
        xy = umap.UMAP(n_neighbors=min(neighbors, len(embedding) - 1), random_state=seed, n_jobs=1).fit_transform(embedding)
    figure, axes = plt.subplots(1, len(colourings), figsize=(6.5 * len(colourings), 5), squeeze=False)
    for axis, (title, values) in zip(axes[0], colourings.items()):
        names = sorted(np.unique(values))
        palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
        for i, name in enumerate(names):
            rows = values == name
            axis.scatter(xy[rows, 0], xy[rows, 1], s=3, color=palette(i % palette.N), label=name, rasterized=True)
        axis.set_title(f"coloured by {title}")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(markerscale=4, fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    figure.tight_layout()
    return save_figure(figure, png)


# ---------------------------------------------------------------- annotate


def _usable_cells(paired, labels: np.ndarray, folds: int) -> tuple[np.ndarray, list[str]]:
    """Cells whose label has at least `folds` cells (a stratified fold needs one per fold)."""
    names, counts = np.unique(labels, return_counts=True)
    rare = [str(n) for n, c in zip(names, counts) if c < folds]
    keep = ~np.isin(labels, rare)
    if len(np.unique(labels[keep])) < 2:
        raise InputError(f"{paired.path}: fewer than two labels with at least {folds} cells; check --label-key or lower folds")
    return np.flatnonzero(keep), rare


def _annotate(paired: PairedCells, section, source: str, target: str, out: Path, views=None, train_only=None) -> dict:
    from sklearn.model_selection import StratifiedKFold

    from celltron.finetune.embedding_eval import fold_scores

    labels_all = paired.column(section.label_key, "--label-key")
    cells, dropped = _usable_cells(paired, labels_all, section.folds)
    counts = {m: paired.counts[m][cells] for m in (source, target)}
    labels = labels_all[cells]
    if section.umap:
        from celltron.finetune.embedding_eval import require_eval_extra

        require_eval_extra("umap")
    model_embeddings = _annotation_model_embeddings(views, cells)
    per_fold = {name: {} for name in ("rna_pca_knn", "joint_knn", *model_embeddings)}
    head, best, chosen = {}, {}, {}
    predicted = np.empty(len(cells), dtype=object)
    open_cells = np.arange(len(cells)) if train_only is None else np.flatnonzero(~train_only[cells])
    for seed in section.seeds:
        with warnings.catch_warnings():  # a label with fewer open cells than folds: sklearn warns, and copes
            warnings.simplefilter("ignore", UserWarning)
            folds = list(StratifiedKFold(section.folds, shuffle=True, random_state=seed).split(open_cells, labels[open_cells]))
        for k, (_, held) in enumerate(folds):
            test = open_cells[held]  # cells named by train_only are always training cells
            train = np.setdiff1d(np.arange(len(cells)), test)
            unit = f"{seed}:{k}"
            rna_view, joint = _annotation_views(counts, source, target, train, section, seed)
            embeddings = {"rna_pca_knn": rna_view, "joint_knn": joint, **model_embeddings}
            for name, embedding in embeddings.items():
                per_fold[name][unit] = fold_scores(embedding, labels, train, test, section.neighbors)
            if model_embeddings:
                seen = None if train_only is None else train_only[cells]
                chosen[unit] = choose_annotation_head(embeddings, labels, train, section, seed, seen)
                best[unit] = per_fold[chosen[unit]["best_baseline"]][unit]
                head[unit] = per_fold[chosen[unit]["name"]][unit]
            if seed == section.seeds[0]:
                shown = embeddings[chosen[unit]["name"]] if model_embeddings else joint
                predicted[test] = _knn_labels(shown, labels, train, test, section.neighbors)
    baselines = {name: _aggregate_folds(per_fold[name]) for name in ("rna_pca_knn", "joint_knn")}
    metrics = {
        **_header("annotate", paired, source, target),
        "label_key": section.label_key,
        "model_folder": None if views is None else str(views.folder),
        "model": _aggregate_folds(head) if head else None,
        "model_variants": {name: _aggregate_folds(per_fold[name]) for name in model_embeddings} or None,
        "head_choice": chosen or None,
        "baselines": baselines,
        "paired": _per_fold_against(head, best, "the chosen best baseline", "the model") if head else None,
        "joint_against_rna": _per_fold_against(per_fold["joint_knn"], per_fold["rna_pca_knn"], "rna_pca_knn", "the joint view"),
        "split": {
            "kind": "stratified k-fold",
            "folds": section.folds,
            "cells": len(cells),
            "held_out_cells": len(open_cells),
            "labels_dropped": dropped,
            **({"train_only": section.train_only} if section.train_only else {}),
        },
        "seeds": list(section.seeds),
        "notes": {
            "rna_pca_knn": f"kNN ({section.neighbors}) on {section.components} RNA PCs (fitted on each fold's training cells)",
            "joint_knn": f"kNN on RNA PCs and {_view_name(target, section)} side by side, each block scaled to unit "
            "variance on the fold's training cells",
        },
    }
    if model_embeddings:
        metrics["notes"]["model"] = (
            "per fold, the better baseline (inner CV on macro-F1) unless a kNN on the model's frozen embedding "
            f"({', '.join(model_embeddings)}) gains on inner held-out cells beyond the 95% interval"
        )
    write_metrics(out / "metrics.json", metrics)
    display = _annotation_views(counts, source, target, np.arange(len(cells)), section, section.seeds[0])[1]
    _write_joint_cells(out / "predictions.h5ad", paired, cells, labels, predicted, display, section.label_key)
    if section.umap:
        plot_umap(display, {"label": labels}, out / "umap.png")
    variants = {f"  {name}": result for name, result in (metrics["model_variants"] or {}).items()}
    print(results_table({**metrics, "baselines": {**variants, **baselines}}, ANNOTATE_METRICS, metrics["notes"]))
    for metric, difference in metrics["joint_against_rna"].items():
        line = verdict_line(metric, "rna_pca_knn", difference, "folds", chosen_on=None)
        print(line.replace("model −", "joint_knn −").replace("the model", "the joint view"))
    for metric, difference in (metrics["paired"] or {}).items():
        print(verdict_line(metric, "best baseline", difference, "folds", chosen_on="training cells"))
    return metrics


def _annotation_model_embeddings(views, cells: np.ndarray) -> dict[str, np.ndarray]:
    """The model's frozen embeddings of the labelled cells: of their RNA, and (a joint model that
    reads the other modality) of both modalities together."""
    if views is None:
        return {}
    embeddings = {"model_rna_knn": views.rna()[cells]}
    if views.reads_target:
        embeddings["model_joint_knn"] = views.joint()[cells]
    return embeddings


def choose_annotation_head(embeddings: dict, labels: np.ndarray, train: np.ndarray, section, seed: int, seen=None) -> dict:
    """Per outer fold, by stratified inner CV over its training cells: the better baseline on mean
    macro-F1, then the reported head: that baseline unless a model embedding's kNN gains on the
    inner held-out cells beyond the 95% interval (`report.choose_weight`'s rule, cells resampled;
    the candidates stand for weights 0, 1, 2 in order); inner held-out cells are training cells the
    model was not pretrained on (`seen`)."""
    from celltron.finetune.annotate import macro_f1
    from celltron.finetune.crossmodal.model import inner_folds
    from celltron.finetune.report import UnitScore, choose_weight

    names, codes = np.unique(labels, return_inverse=True)
    scores: dict[str, list] = {name: [] for name in embeddings}
    for fit, held in inner_folds(train, section.inner_folds, seed, seen, codes):
        for name, embedding in embeddings.items():
            guess = _knn_labels(embedding, codes, fit, held, section.neighbors).astype(np.int64)
            truth = codes[held]
            scores[name].append(
                UnitScore.recomputed(
                    len(held),
                    lambda rows, t=truth, g=guess: (
                        macro_f1(t, g, len(names)) if rows is None else macro_f1(t[rows], g[rows], len(names))
                    ),
                )
            )
    baseline_means = {name: float(np.mean([s.value for s in scores[name]])) for name in ("rna_pca_knn", "joint_knn")}
    best = choose_best(baseline_means)
    candidates = [best, *(name for name in embeddings if name.startswith("model_"))]
    choice = choose_weight({float(i): scores[name] for i, name in enumerate(candidates)}, seed=seed)
    return {
        "best_baseline": best,
        "baseline_inner_macro_f1": baseline_means,
        "name": candidates[int(choice["weight"])],
        "inner_macro_f1": {candidates[int(float(k))]: v for k, v in choice["weight_scores"].items()},
        "gain_low": {candidates[int(float(k))]: v for k, v in choice["gain_low"].items()},
    }


def _per_fold_against(model: dict, baseline: dict, baseline_name: str, who: str) -> dict:
    """{METRIC: model − baseline per fold, with its interval and verdict}, the same folds."""
    out = {}
    for metric in ANNOTATE_METRICS:
        difference = paired_difference({u: s[metric] for u, s in model.items()}, {u: s[metric] for u, s in baseline.items()})
        out[metric] = {
            **difference,
            "baseline": baseline_name,
            "unit": "folds",
            "verdict": verdict(difference).replace("the model", who),
        }
    return out


def _annotation_views(counts, source, target, train, section, seed) -> tuple[np.ndarray, np.ndarray]:
    """The source's view alone, and both modalities' views side by side (each block standardised)."""
    first = modality_view(source, counts[source], train, section.components, seed, section.top_genes)
    second = modality_view(target, counts[target], train, section.components, seed, section.top_genes)
    return first, np.hstack([standardised(first, train), standardised(second, train)])


def _knn_labels(embedding, labels, train, test, neighbors: int) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(min(neighbors, len(train))).fit(embedding[train], labels[train]).predict(embedding[test])


def _aggregate_folds(per_fold: dict) -> dict:
    out = {m: float(np.mean([f[m] for f in per_fold.values()])) for m in ANNOTATE_METRICS}
    out["std"] = {m: float(np.std([f[m] for f in per_fold.values()])) for m in ANNOTATE_METRICS}
    out["per_fold"] = per_fold
    return out


def _write_joint_cells(path: Path, paired, cells, labels, predicted, embedding, label_key: str) -> None:
    """The labelled cells with obsm X_joint (both modalities' views, fitted on every cell, for
    display) and obs `{label_key}_predicted` (the first seed's out-of-fold joint kNN labels)."""
    import anndata as ad

    obs = paired.obs.iloc[cells].copy()
    obs[f"{label_key}_predicted"] = pd.Categorical(predicted.astype(str))
    adata = ad.AnnData(X=sp.csr_matrix((len(cells), 0), dtype=np.float32), obs=obs)
    adata.obsm["X_joint"] = embedding.astype(np.float32)
    write_h5ad_atomically(adata, path)
