"""Perturbation response, GEARS / scGPT style: from a control cell's tokens, with a flag on the
targeted genes (their token added when the cell does not express them), predict the
post-perturbation expression of every measured gene; works with all three families.

The head reads the flagged tokens' final hidden states (what the encoder makes of the
perturbed genes in this cell) and the cell embedding, and either mixes the training
perturbations' shifts by attention (retrieval) or scores each measured gene against its
pretrained gene embedding (bilinear); see PerturbationModel. An untrained head predicts the
training-mean baseline. Targets are pseudobulk means (the metrics score pseudobulk means); a
perturbation's prediction averages the predictions from many control cells.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from celltron.errors import ConfigError, InputError
from celltron.finetune.adapt import count_trainable, load_encoder
from celltron.finetune.perturbation import baselines
from celltron.finetune.perturbation.baselines import baseline_report
from celltron.finetune.perturbation.evaluate import METRICS, evaluate, heldout_split, pseudobulk, simulation_split
from celltron.finetune.perturbation.model import (
    PerturbationModel,
    PerturbationPairs,
    collate_pairs,
    predict_means,
    target_tokens,
    training_pairs,
)
from celltron.finetune.report import aggregate, plot_bars, results_table, save_figure, write_metrics
from celltron.io import write_h5ad_atomically, write_text_atomically
from celltron.lab.data import check_vocabulary_coverage, load_model_tokenizer, read_configured_lab_data, tokenize_cells
from celltron.model_zoo.registry import family_of, resolve_model_folder
from celltron.tokenizers.vocab import GeneVocab
from celltron.training.examples import train_task_model

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- inputs


def max_tokens_of(config) -> int | None:
    """Longest input the model takes (position embeddings), None where its family has no
    position limit (scGPT)."""
    return getattr(config, "max_position_embeddings", None) if family_of(config).has_position_limit else None


def specials_of(vocab) -> set:
    return {int(i) for i in vocab.special_ids()}


def model_folder_vocab(folder: Path):
    return GeneVocab.from_pretrained(folder)


# ---------------------------------------------------------------- the task


BASELINES = ("control_mean", "train_mean", "additive", "linear")


def make_split(config, perturbations: list[str], seed: int) -> dict:
    section = config.perturbation
    choose = simulation_split if section.split == "simulation" else heldout_split
    return choose(perturbations, section.test_fraction, seed)


def _screen(lab, section):
    """Pseudobulk means and DE genes of the lab data, per perturbation."""
    import anndata as ad
    import pandas as pd

    view = ad.AnnData(
        X=lab.counts,
        obs=lab.obs[[section.perturbation_key]].astype(str),
        var=pd.DataFrame(index=pd.Index(lab.gene_names.astype(str)).astype(object)),
    )
    return pseudobulk(view, section.perturbation_key, section.control, section.de_genes, str(lab.path))


class _Prepared:
    """Everything of one model and one lab dataset that every seed's run shares."""

    def __init__(self, config, folder: Path, lab, screen):
        section = config.perturbation
        self.folder = folder
        self.tokenizer = load_model_tokenizer(folder, lab)
        vocab = self.tokenizer.vocab
        check_vocabulary_coverage(lab, vocab)
        labels = lab.obs[section.perturbation_key].astype(str).to_numpy()
        self.labels = labels
        self.control_rows = np.flatnonzero(labels == section.control)
        self.control_tokens = tokenize_cells(lab, self.tokenizer, self.control_rows, seed=config.trainer.seed)
        self.gene_tokens = vocab.lookup_genes(lab.gene_ids)
        self.targets = target_tokens(screen.perturbations, vocab, lab.species, str(lab.path))
        self.specials, self.pad_id = specials_of(vocab), vocab.special_id("pad")


def _fine_tune(config, prepared: _Prepared, screen, split: dict, seed: int, out: Path, resume: str | None):
    """Train one seed's model; returns the model on the first process, None on the others."""
    import lightning.pytorch as pl

    section = config.perturbation
    train = [p for p in split["train"] if p in prepared.targets]
    pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
    encoder = load_encoder(prepared.folder, config.model)
    shifts = np.stack([screen.means[p] - screen.control_mean for p in train])
    model = PerturbationModel(
        encoder,
        prepared.gene_tokens,
        screen.control_mean,
        shifts,
        [prepared.targets[p] for p in train],
        section.head,
        section.de_weight,
    )
    trainable, total = count_trainable(model)
    log.info("fine-tuning %d of %d parameters", trainable, total)
    means = np.stack([screen.means[p] for p in train]).astype(np.float32)
    de_masks = np.zeros(means.shape, dtype=bool)
    for row, p in enumerate(train):
        de_masks[row, screen.de_genes[p]] = True
    pairs = training_pairs(prepared.labels, train, len(prepared.control_rows), seed)
    dataset = PerturbationPairs(
        prepared.control_tokens,
        pairs,
        [prepared.targets[p] for p in train],
        means,
        de_masks,
        prepared.specials,
        max_tokens_of(model.config),
    )
    pad_id = prepared.pad_id
    model, first = train_task_model(config, model, dataset, lambda e: collate_pairs(e, pad_id), out, seed, resume)
    return model if first else None


def _model_predictions(config, prepared: _Prepared, model, test: list[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = min(config.perturbation.eval_cells, len(prepared.control_rows))
    cells = np.sort(rng.choice(len(prepared.control_rows), n, replace=False))
    predicted = predict_means(
        model,
        prepared.control_tokens,
        cells,
        [prepared.targets[p] for p in test],
        prepared.specials,
        max_tokens_of(model.config),
        prepared.pad_id,
        config.data.batch_size,
    )
    return dict(zip(test, predicted))


def _write_config(config, out: Path) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        import yaml

        write_text_atomically(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def run_perturbation(config, model: str | None, out, baselines_only: bool = False, resume: str | None = None) -> dict | None:
    """The perturbation task end to end: splits per seed, baselines, fine-tuning and
    evaluation, then metrics.json, predictions.h5ad, a printed table and plots under `out`.
    Returns the metrics (None on processes other than the first)."""
    out = Path(out)
    section = config.perturbation
    if not config.data.path:
        raise ConfigError("no lab data: pass --data LAB.h5ad (or set data.path in the config)")
    if model is None and not baselines_only:
        raise ConfigError("no model: pass --model DIR_OR_HUB_ID, or --baselines-only for the baselines alone")
    lab = read_configured_lab_data(config.data, [section.perturbation_key])
    screen = _screen(lab, section)
    prepared = None if baselines_only else _Prepared(config, resolve_model_folder(model), lab, screen)
    usable = sorted(prepared.targets) if prepared else screen.perturbations
    excluded = sorted(set(screen.perturbations) - set(usable))
    if len(usable) < 3:
        raise InputError(
            f"{lab.path}: {len(usable)} usable perturbation(s) in obs[{section.perturbation_key!r}]; "
            "a split needs at least 3 besides the control"
        )
    _write_config(config, out)  # only now: a run refused for its inputs leaves no --out behind

    splits, model_runs, baseline_runs, predictions, fell_back = {}, {}, {n: {} for n in BASELINES}, {}, {}
    first = True
    for seed in section.seeds:
        split = make_split(config, usable, seed)
        splits[seed] = split
        report = baseline_report(screen, split)
        fell_back[str(seed)] = report["linear"].pop("fell_back_to_train_mean")
        for name in BASELINES:
            baseline_runs[name][seed] = report[name]
        predictions[seed] = {name: _baseline_predictions(name, screen, split) for name in BASELINES}
        if prepared is None:
            continue
        trained = _fine_tune(config, prepared, screen, split, seed, out / f"seed{seed}", resume)
        if trained is None:
            first = False
            continue
        predicted = _model_predictions(config, prepared, trained, split["test"], seed)
        model_runs[seed] = evaluate(predicted, screen, split["test"])
        predictions[seed]["model"] = predicted
    if not first:
        return None
    metrics = {
        "task": "perturbation",
        "data": str(lab.path),
        "model_folder": str(prepared.folder) if prepared else None,
        "model": aggregate(model_runs, METRICS, "per_perturbation") if model_runs else None,
        "baselines": {name: aggregate(baseline_runs[name], METRICS, "per_perturbation") for name in BASELINES},
        "split": {
            "kind": section.split,
            "test_fraction": section.test_fraction,
            "per_seed": {str(s): v for s, v in splits.items()},
        },
        "seeds": list(section.seeds),
        "excluded_perturbations": excluded,
        "notes": {
            "linear": "perturbations whose targets are not measured genes have no expression-derived embedding; "
            "the linear baseline predicts the training mean for them (fell_back_to_train_mean)"
        },
    }
    metrics["baselines"]["linear"]["fell_back_to_train_mean"] = fell_back
    if section.split == "simulation":
        metrics["groups"] = _group_metrics(screen, splits, predictions)
    return write_results(out, metrics, screen, splits, predictions)


def _baseline_predictions(name: str, screen, split: dict) -> dict[str, np.ndarray]:
    train, test = split["train"], split["test"]
    if name == "linear":
        return baselines.linear_baseline(screen, train, test)[0]
    return {
        "control_mean": baselines.control_mean_baseline,
        "train_mean": baselines.train_mean_baseline,
        "additive": baselines.additive_baseline,
    }[name](screen, train, test)


def _group_metrics(screen, splits: dict, predictions: dict) -> dict:
    """Simulation split: each predictor's metrics per group (unseen_single, combo_seen0/1/2), over seeds."""
    groups = {}
    for group in ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"):
        for name in ("model", *BASELINES):
            runs = {
                s: evaluate(predictions[s][name], screen, splits[s][group])
                for s in splits
                if splits[s][group] and name in predictions[s]
            }
            if runs:
                groups.setdefault(group, {})[name] = aggregate(runs, METRICS, "per_perturbation")
    return groups


def write_results(out: Path, metrics: dict, screen, splits: dict, predictions: dict) -> dict:
    """metrics.json, predictions.h5ad (one row per seed and held-out perturbation: the model's
    prediction in X, truth, control and each baseline as layers), the table and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    _write_predictions(out / "predictions.h5ad", screen, splits, predictions)
    plot_bars(
        metrics, "pearson_delta_de20", out / "pearson_delta_de20.png", "Pearson delta, top-20 DE genes (held-out perturbations)"
    )
    if metrics.get("model"):
        _plot_delta_scatter(out / "delta_scatter.png", screen, splits, predictions)
    print(results_table(metrics, METRICS, {"linear": "falls back to the training mean where no target is a measured gene"}))
    return metrics


def _write_predictions(path: Path, screen, splits: dict, predictions: dict) -> None:
    import anndata as ad
    import pandas as pd

    rows, obs = [], []
    for seed, split in splits.items():
        for p in split["test"]:
            group = next(
                (g for g in ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2") if p in split.get(g, [])), "test"
            )
            rows.append(p)
            obs.append({"perturbation": p, "seed": int(seed), "group": group})
    layers = {"truth": np.stack([screen.means[p] for p in rows]), "control_mean": np.tile(screen.control_mean, (len(rows), 1))}
    for name in BASELINES:
        layers[name] = np.stack([predictions[o["seed"]][name][o["perturbation"]] for o in obs])
    has_model = all("model" in predictions[s] for s in splits)
    X = np.stack([predictions[o["seed"]]["model"][o["perturbation"]] for o in obs]) if has_model else layers["truth"]
    adata = ad.AnnData(
        X=X.astype(np.float32),
        obs=pd.DataFrame(obs, index=[f"{o['seed']}:{o['perturbation']}" for o in obs]),
        var=pd.DataFrame(index=pd.Index(screen.genes.astype(str))),
        layers={k: v.astype(np.float32) for k, v in layers.items()},
    )
    adata.uns["X"] = "model prediction" if has_model else "truth (baselines only)"
    write_h5ad_atomically(adata, path)


def _plot_delta_scatter(png: Path, screen, splits: dict, predictions: dict) -> None:
    """Predicted against true change from control over each held-out perturbation's DE genes (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = next(iter(splits))
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    for p in splits[seed]["test"]:
        de = screen.de_genes[p]
        axes.scatter(
            screen.means[p][de] - screen.control_mean[de],
            predictions[seed]["model"][p][de] - screen.control_mean[de],
            s=10,
            label=p,
        )
    axes.axhline(0, color="#999", lw=0.5)
    axes.axvline(0, color="#999", lw=0.5)
    axes.set_xlabel("true change from control (DE genes)")
    axes.set_ylabel("predicted change")
    axes.set_title(f"held-out perturbations, seed {seed}")
    if len(splits[seed]["test"]) <= 10:
        axes.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, png)
