"""`celltron finetune annotate`: a cell-type classification head on a pretrained encoder (fully
fine-tuned, with frozen layers, or with LoRA), beside a logistic regression on PCA features of
log-normalised expression, on the same stratified split of cells.

Writes under `out`: metrics.json (accuracy, macro-F1, per-class report and confusion matrix of
the held-out cells, mean and spread over seeds, for the model and `pca_logreg`; `paired`: model −
baseline per seed, with an interval), predictions.h5ad (the lab's cells with predicted labels
and probabilities in obs / obsm), a confusion-matrix PNG, and prints the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers.utils import ModelOutput

from celltron.errors import ConfigError, InputError
from celltron.finetune.adapt import count_trainable, load_encoder
from celltron.finetune.report import (
    aggregate,
    anchor,
    choose_best,
    paired_difference,
    results_table,
    save_figure,
    verdict,
    verdict_line,
    write_metrics,
)
from celltron.io import write_h5ad_atomically
from celltron.lab.data import check_vocabulary_coverage, load_model_tokenizer, read_configured_lab_data, tokenize_cells
from celltron.lab.inference import autocast, pad_cells, pick_device, to_device
from celltron.model_zoo.registry import base_of, resolve_model_folder
from celltron.preprocessing import PCA_TOP_GENES, fit_pca, log_normalise, variable_genes
from celltron.tokenizers.ragged import RaggedTokens
from celltron.training.examples import train_task_model

log = logging.getLogger(__name__)
METRICS = ("accuracy", "macro_f1")
BASELINE = "pca_logreg"


@dataclass
class AnnotationOutput(ModelOutput):
    """loss: cross-entropy (with labels). logits: (batch, classes)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class AnnotationModel(nn.Module):
    """A pretrained encoder's cell embedding (the family's pooling) through LayerNorm, dropout and
    a linear layer onto the cell types. The LayerNorm puts embeddings of any scale on one footing,
    so that a head on a frozen encoder learns at the learning rate full fine-tuning uses.

    Args:
        encoder: the pretrained model (any family, possibly wrapped by peft).
        n_classes: number of cell types.
        class_weights: per-class loss weights (None: unweighted).
        dropout: dropout on the cell embedding.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, class_weights: np.ndarray | None = None, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = self.config.hidden_size
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        weights = torch.ones(n_classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)

    @property
    def config(self):
        return base_of(self.encoder).config

    def forward(self, input_ids, attention_mask, values=None, label=None, **unused) -> AnnotationOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "heads": False}
        if values is not None:
            inputs["values"] = values
        logits = self.head(self.encoder(**inputs).cell_embedding).float()
        loss = F.cross_entropy(logits, label, weight=self.class_weights) if label is not None else None
        return AnnotationOutput(loss=loss, logits=logits)


class LabelledCells(Dataset):
    """The training cells' row numbers; `_Collate` turns a batch of them into tokens and labels."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])


def collate_cells(rows: list[int], tokens: RaggedTokens, labels: np.ndarray, pad_id: int) -> dict:
    batch = pad_cells(tokens, np.asarray(rows), pad_id)
    batch["label"] = torch.as_tensor(labels[rows], dtype=torch.long)
    batch["n_cells"] = torch.tensor(len(rows))
    batch["n_tokens"] = batch["attention_mask"].sum()
    return batch


class _Collate:
    """Picklable collate (DataLoader workers) over the shared tokens."""

    def __init__(self, tokens: RaggedTokens, labels: np.ndarray, pad_id: int):
        self.tokens, self.labels, self.pad_id = tokens, labels, pad_id

    def __call__(self, rows: list[int]) -> dict:
        return collate_cells(rows, self.tokens, self.labels, self.pad_id)


@torch.no_grad()
def predict_probabilities(
    model: AnnotationModel, tokens: RaggedTokens, pad_id: int, batch_size: int, rows: np.ndarray | None = None
) -> np.ndarray:
    """(len(rows), classes) softmax probabilities of the cells `rows` of `tokens` (all by
    default), on the GPU when there is one."""
    device = pick_device("auto")
    model = model.to(device).eval()
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    order = np.argsort(tokens.lengths[rows], kind="stable")  # similar lengths share a batch
    out = np.zeros((len(rows), model.head[-1].out_features), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        with autocast(device):
            logits = model(**to_device(pad_cells(tokens, rows[batch], pad_id), device)).logits
        out[batch] = torch.softmax(logits.float(), -1).cpu().numpy()
    return out


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int, source: str, names=None
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test cell indices with every class in both, seeded.

    Args:
        labels: class index of each cell. names: class names, for the error message.
    """
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(labels, return_counts=True)
    rare = [str(names[c]) if names is not None else str(c) for c in classes[counts < 2]]
    if rare:
        raise InputError(
            f"{source}: class(es) {rare} have fewer than 2 cells, too few to appear in both training and "
            "test cells; drop them or merge them into another label"
        )
    return train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, the per-class report and the confusion matrix (rows: truth)."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    indices = list(range(len(classes)))
    report = classification_report(truth, predicted, labels=indices, target_names=classes, output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=indices, average="macro", zero_division=0)),
        "per_class": {c: report[c] for c in classes},
        "confusion_matrix": confusion_matrix(truth, predicted, labels=indices).tolist(),
    }


def pca_logreg(
    counts, labels: np.ndarray, train: np.ndarray, test: np.ndarray, components: int, seed: int, balanced: bool
) -> np.ndarray:
    """The baseline: logistic regression on PCA of log-normalised expression over the 2,000 most
    variable genes (genes and PCA chosen on the training cells alone); returns the test cells'
    predicted class indices."""
    return pca_logreg_probabilities(counts, labels, train, test, int(labels.max()) + 1, components, seed, balanced).argmax(1)


def pca_logreg_probabilities(
    counts, labels: np.ndarray, train: np.ndarray, cells: np.ndarray, n_classes: int, components: int, seed: int, balanced: bool
) -> np.ndarray:
    """The baseline's (len(cells), n_classes) class probabilities, fitted on the `train` cells
    alone (a class absent from them gets probability 0)."""
    from sklearn.linear_model import LogisticRegression

    normalised = log_normalise(counts)
    genes = variable_genes(normalised[train], PCA_TOP_GENES)
    pca = fit_pca(normalised[train][:, genes], components, seed)
    classifier = LogisticRegression(max_iter=2000, class_weight="balanced" if balanced else None)
    classifier.fit(pca.transform(normalised[train][:, genes]), labels[train])
    out = np.zeros((len(cells), n_classes))
    out[:, classifier.classes_] = classifier.predict_proba(pca.transform(normalised[cells][:, genes]))
    return out


def balanced_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (classes x count) per class, as scikit-learn's class_weight='balanced'."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return len(labels) / (n_classes * np.maximum(counts, 1))


class _Task:
    """What fine-tuning one split needs besides its cells: the config, the model folder, the
    tokenised cells and their labels (shared by the outer and the inner folds)."""

    def __init__(self, config, folder: Path, tokens: RaggedTokens, labels: np.ndarray, n_classes: int, pad_id: int, resume, lab):
        self.config, self.folder, self.tokens, self.labels = config, folder, tokens, labels
        self.n_classes, self.pad_id, self.resume, self.lab = n_classes, pad_id, resume, lab

    def fine_tune(self, train: np.ndarray, seed: int, out: Path):
        """Train a model on the `train` cells; returns it on the first process, None on the others."""
        import lightning.pytorch as pl

        config = self.config
        pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
        weights = balanced_weights(self.labels[train], self.n_classes) if config.annotate.balanced else None
        model = AnnotationModel(load_encoder(self.folder, config.model), self.n_classes, weights, config.annotate.dropout)
        trainable, total = count_trainable(model)
        log.info("fine-tuning %d of %d parameters", trainable, total)
        dataset = LabelledCells(train)
        collate = _Collate(self.tokens, self.labels, self.pad_id)
        model, first = train_task_model(config, model, dataset, collate, out, seed, self.resume)
        return model if first else None


def _baseline_probabilities(config, lab, labels, train, cells, n_classes: int, seed: int) -> np.ndarray:
    section = config.annotate
    return pca_logreg_probabilities(lab.counts, labels, train, cells, n_classes, section.pca_components, seed, section.balanced)


def choose_weight(task: _Task, train: np.ndarray, seed: int, out: Path) -> tuple[float | None, dict]:
    """The anchored head's weight, by stratified inner cross-validation over the training cells:
    per inner fold, the baseline and a model are fitted on the inner training cells and each
    weight's blend is scored (macro-F1) on the inner held-out cells; the best mean wins (ties: the
    smaller weight). Returns it and every weight's score; None on processes other than the first."""
    from sklearn.model_selection import StratifiedKFold

    config, labels = task.config, task.labels
    weights = sorted(set(config.annotate.anchor_weights))
    folds = StratifiedKFold(config.annotate.inner_folds, shuffle=True, random_state=seed)
    scores, first = {str(w): [] for w in weights}, True
    for j, (fit, held) in enumerate(folds.split(train, labels[train])):
        fit, held = train[fit], train[held]
        baseline = _baseline_probabilities(config, task.lab, labels, fit, held, task.n_classes, seed)
        trained = task.fine_tune(fit, seed, out / f"inner{j}")
        if trained is None:
            first = False
            continue
        model = predict_probabilities(trained, task.tokens, task.pad_id, config.data.batch_size, held)
        for w in weights:
            predicted = anchor(baseline, model, w).argmax(1)
            scores[str(w)].append(
                classification_metrics(labels[held], predicted, [str(c) for c in range(task.n_classes)])["macro_f1"]
            )
    if not first:
        return None, {}
    means = {w: float(np.mean(v)) for w, v in scores.items()}
    return float(choose_best(means)), means


def run_annotate(config, model: str | None, out, baselines_only: bool = False, resume: str | None = None) -> dict | None:
    """Cell-type annotation end to end: a stratified split per seed, the PCA + logistic
    regression baseline, fine-tuning and evaluation on the held-out cells, then metrics.json,
    predictions.h5ad, the confusion matrix PNG and the printed table under `out`. Returns the
    metrics (None on processes other than the first)."""
    section, out = config.annotate, Path(out)
    if not config.data.path:
        raise ConfigError("no lab data: pass --data LAB.h5ad (or set data.path in the config)")
    if model is None and not baselines_only:
        raise ConfigError("no model: pass --model DIR_OR_HUB_ID, or --baselines-only for the baseline alone")
    lab = read_configured_lab_data(config.data, [section.label_key])
    names = lab.obs[section.label_key]
    if names.isna().any():
        raise InputError(
            f"{lab.path}: obs[{section.label_key!r}] has {int(names.isna().sum())} cells without a label; "
            "drop them or give them a label first"
        )
    classes, labels = np.unique(names.astype(str).to_numpy(), return_inverse=True)
    classes = [str(c) for c in classes]
    folder = None if baselines_only else resolve_model_folder(model)
    if folder is not None:
        tokenizer = load_model_tokenizer(folder, lab)
        check_vocabulary_coverage(lab, tokenizer.vocab)
        tokens, pad_id = tokenize_cells(lab, tokenizer, seed=config.trainer.seed), tokenizer.vocab.special_id("pad")
    out.mkdir(parents=True, exist_ok=True)  # only once the data and the model are known to be usable
    runs, plain_runs, baseline_runs, splits, weights, first_probabilities, first = {}, {}, {}, {}, {}, None, True
    anchored = section.head == "anchored"
    task = _Task(config, folder, tokens, labels, len(classes), pad_id, resume, lab) if folder is not None else None
    everyone = np.arange(len(labels))
    for seed in section.seeds:
        train, test = stratified_split(labels, section.test_fraction, seed, f"{lab.path}: obs[{section.label_key!r}]", classes)
        splits[seed] = {"train": len(train), "test": len(test)}
        baseline = _baseline_probabilities(config, lab, labels, train, everyone, len(classes), seed)
        baseline_runs[seed] = classification_metrics(labels[test], baseline[test].argmax(1), classes)
        if folder is None:
            continue
        weight = 1.0
        if anchored:
            weight, weight_scores = choose_weight(task, train, seed, out / f"seed{seed}")
            weights[seed] = {"weight": weight, "weight_scores": weight_scores}
        trained = task.fine_tune(train, seed, out / f"seed{seed}")
        if trained is None or weight is None:
            first = False  # every process trains every seed together; only the first reports
            continue
        plain = predict_probabilities(trained, tokens, pad_id, config.data.batch_size)
        probabilities = anchor(baseline, plain, weight) if anchored else plain
        runs[seed] = classification_metrics(labels[test], probabilities[test].argmax(1), classes)
        plain_runs[seed] = classification_metrics(labels[test], plain[test].argmax(1), classes)
        if first_probabilities is None:
            first_probabilities, first_test = probabilities, test
    if not first:
        return None
    metrics = {
        "task": "annotate",
        "data": str(lab.path),
        "model_folder": str(folder) if folder else None,
        "classes": classes,
        "model": _aggregate(runs) if runs else None,
        "head": section.head if runs else None,
        "model_plain": _aggregate(plain_runs) if runs and anchored else None,
        "anchor_weights": {str(s): w for s, w in weights.items()} if runs and anchored else None,
        "baselines": {BASELINE: _aggregate(baseline_runs)},
        "paired": paired_per_seed(runs, baseline_runs) if runs else None,
        "split": {
            "kind": "stratified by label",
            "test_fraction": section.test_fraction,
            "per_seed": {str(s): v for s, v in splits.items()},
        },
        "seeds": list(section.seeds),
        "notes": {
            "pca_logreg": f"logistic regression on {section.pca_components} principal components of log-normalised "
            "expression, 2,000 most variable genes (genes and PCA from the training cells)"
            f"{', balanced class weights' if section.balanced else ''}"
        },
    }
    return _write_results(out, metrics, lab, section.label_key, classes, first_probabilities, first_test if runs else None)


def paired_per_seed(runs: dict, baseline_runs: dict) -> dict:
    """{METRIC: model − baseline per seed, with its interval and verdict}: each seed's model and
    baseline were scored on the same held-out cells. One seed gives no interval (NaN bounds,
    "too few units to tell"): the spread of a difference needs several splits."""
    paired = {}
    for metric in METRICS:
        difference = paired_difference(
            {seed: run[metric] for seed, run in runs.items()}, {seed: run[metric] for seed, run in baseline_runs.items()}
        )
        paired[metric] = {**difference, "baseline": BASELINE, "unit": "seeds", "verdict": verdict(difference)}
    return paired


def _aggregate(per_seed: dict) -> dict:
    """Mean and spread of accuracy and macro-F1 over seeds; per-class reports and summed
    confusion matrices beside them."""
    summary = aggregate({s: {**m, "reports": {"per_class": m["per_class"]}} for s, m in per_seed.items()}, METRICS, "reports")
    summary["confusion_matrix"] = np.sum([m["confusion_matrix"] for m in per_seed.values()], axis=0).tolist()
    return summary


def _write_results(out: Path, metrics: dict, lab, label_key: str, classes: list[str], probabilities, test) -> dict:
    write_metrics(out / "metrics.json", metrics)
    if probabilities is not None:
        _write_predictions(out / "predictions.h5ad", lab, label_key, classes, probabilities, test)
        _plot_confusion(out / "confusion_matrix.png", np.asarray(metrics["model"]["confusion_matrix"]), classes)
    plain = {"model, plain head": metrics["model_plain"]} if metrics.get("model_plain") else {}
    print(results_table({**metrics, "baselines": {**plain, **metrics["baselines"]}}, METRICS, metrics["notes"]))
    if metrics.get("anchor_weights"):
        chosen = ", ".join(f"seed {s}: {c['weight']}" for s, c in metrics["anchor_weights"].items())
        print(f"anchored head: {BASELINE} + w x (model − {BASELINE}) in class probabilities, w by inner CV on macro-F1: {chosen}")
    for metric, difference in (metrics["paired"] or {}).items():
        print(verdict_line(metric, BASELINE, difference, "seeds", chosen_on=None))
    return metrics


def _write_predictions(path: Path, lab, label_key: str, classes: list[str], probabilities: np.ndarray, test: np.ndarray) -> None:
    """The lab's cells (raw counts, obs) with the first seed's model predictions: obs
    `{label_key}_predicted`, `{label_key}_probability` (of the predicted label) and
    `celltron_split`; obsm `{label_key}_probabilities` (cells x classes, uns lists the classes)."""
    import anndata as ad
    import pandas as pd

    obs = lab.obs.copy()
    obs.index = pd.Index(lab.cell_names.astype(str) if lab.cell_names is not None else obs.index.astype(str))
    best = probabilities.argmax(1)
    obs[f"{label_key}_predicted"] = pd.Categorical(np.asarray(classes)[best], categories=classes)
    obs[f"{label_key}_probability"] = probabilities[np.arange(len(best)), best]
    split = np.full(len(best), "train", dtype=object)
    split[test] = "test"
    obs["celltron_split"] = pd.Categorical(split)
    adata = ad.AnnData(X=lab.counts, obs=obs, var=pd.DataFrame(index=pd.Index(lab.gene_names.astype(str)).astype(object)))
    adata.var_names_make_unique()
    adata.obsm[f"{label_key}_probabilities"] = probabilities
    adata.uns[f"{label_key}_classes"] = list(classes)
    write_h5ad_atomically(adata, path)


def _plot_confusion(png: Path, matrix: np.ndarray, classes: list[str]) -> None:
    """Row-normalised confusion matrix of the held-out cells (all seeds), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = 1.0 + 0.55 * len(classes)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("held-out cells (share of each true class)")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    save_figure(figure, png)
