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
from contextlib import contextmanager
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
    UnitScore,
    aggregate,
    anchor,
    paired_difference,
    results_table,
    save_figure,
    verdict,
    verdict_line,
    write_metrics,
)
from celltron.finetune.settings import (
    InnerScores,
    at_learning_rate,
    learning_rates,
    predictions_by_length,
    run_folder,
    training_lengths,
)
from celltron.finetune.uncertainty import ENSEMBLE_SEED_STRIDE, dropout_sampling, mutual_information
from celltron.io import write_h5ad_atomically
from celltron.lab.data import check_vocabulary_coverage, load_model_tokenizer, read_configured_lab_data, tokenize_cells
from celltron.lab.inference import autocast, pad_cells, pick_device, to_device
from celltron.model_zoo.registry import base_of, load_pretrained, resolve_model_folder
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


def _classifier(hidden: int, n_classes: int, dropout: float) -> nn.Sequential:
    """LayerNorm, dropout and a linear layer onto the cell types. The LayerNorm puts embeddings
    of any scale on one footing, so that a head on a frozen encoder learns at the learning rate
    full fine-tuning uses."""
    return nn.Sequential(nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, n_classes))


def _loss_weights(class_weights: np.ndarray | None, n_classes: int) -> torch.Tensor:
    return torch.ones(n_classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)


def _classify(head: nn.Module, embedding: torch.Tensor, label, class_weights: torch.Tensor) -> AnnotationOutput:
    logits = head(embedding).float()
    loss = F.cross_entropy(logits, label, weight=class_weights) if label is not None else None
    return AnnotationOutput(loss=loss, logits=logits)


def _encoder_inputs(input_ids, attention_mask, values=None, modality_ids=None) -> dict:
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "heads": False}
    if values is not None:
        inputs["values"] = values
    if modality_ids is not None:  # multi-modal sequences (a joint model's tokens)
        inputs["modality_ids"] = modality_ids
    return inputs


class AnnotationModel(nn.Module):
    """A pretrained encoder's cell embedding (the family's pooling) through the classification
    head (`_classifier`), trained together.

    Args:
        encoder: the pretrained model (any family, possibly wrapped by peft).
        n_classes: number of cell types.
        class_weights: per-class loss weights (None: unweighted).
        dropout: dropout on the cell embedding.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, class_weights: np.ndarray | None = None, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.head = _classifier(self.config.hidden_size, n_classes, dropout)
        self.register_buffer("class_weights", _loss_weights(class_weights, n_classes))

    @property
    def config(self):
        return base_of(self.encoder).config

    def forward(self, input_ids, attention_mask, values=None, label=None, **unused) -> AnnotationOutput:
        embedding = self.encoder(**_encoder_inputs(input_ids, attention_mask, values)).cell_embedding
        return _classify(self.head, embedding, label, self.class_weights)


class ProbeModel(nn.Module):
    """The same head alone, on cell embeddings a frozen encoder computed once
    (annotate.encoder: frozen): a linear probe of the pretrained embedding."""

    def __init__(self, hidden: int, n_classes: int, class_weights: np.ndarray | None = None, dropout: float = 0.1):
        super().__init__()
        self.head = _classifier(hidden, n_classes, dropout)
        self.register_buffer("class_weights", _loss_weights(class_weights, n_classes))

    def forward(self, embedding, label=None, **unused) -> AnnotationOutput:
        return _classify(self.head, embedding, label, self.class_weights)


@torch.no_grad()
def frozen_cell_embeddings(
    folder: Path, tokens: RaggedTokens, pad_id: int, batch_size: int, passes: int = 0, seed: int = 0
) -> np.ndarray:
    """(cells, hidden) cell embeddings of the pretrained model in `folder`, in eval mode (no
    dropout), pooled as the annotation head pools them; on the GPU when there is one. With
    `passes`: (passes, cells, hidden), each with the encoder's dropout on (MC dropout, seeded)."""
    device = pick_device("auto")
    encoder = load_pretrained(folder).to(device)
    order = np.argsort(tokens.lengths, kind="stable")  # similar lengths share a batch
    out = np.zeros((max(passes, 1), len(tokens), base_of(encoder).config.hidden_size), dtype=np.float32)
    with _prediction_mode(encoder, passes, seed):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            inputs = _encoder_inputs(**to_device(pad_cells(tokens, rows, pad_id), device))
            for draw in range(len(out)):
                with autocast(device):
                    out[draw, rows] = encoder(**inputs).cell_embedding.float().cpu().numpy()
    return out if passes else out[0]


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


class _EmbeddingCollate:
    """Picklable collate of cached cell embeddings and labels (the frozen encoder's probe)."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray):
        self.embeddings, self.labels = embeddings, labels

    def __call__(self, rows: list[int]) -> dict:
        return {
            "embedding": torch.as_tensor(self.embeddings[rows]),
            "label": torch.as_tensor(self.labels[rows], dtype=torch.long),
            "n_cells": torch.tensor(len(rows)),
        }


@contextmanager
def _prediction_mode(model: nn.Module, passes: int, seed: int):
    """Eval mode (passes 0), or MC dropout: every dropout layer on, torch's random state forked
    and seeded (`uncertainty.dropout_sampling`)."""
    if passes:
        with dropout_sampling(model, seed):
            yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_probabilities(
    model: AnnotationModel,
    tokens: RaggedTokens,
    pad_id: int,
    batch_size: int,
    rows: np.ndarray | None = None,
    passes: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """(len(rows), classes) softmax probabilities of the cells `rows` of `tokens` (all by
    default), on the GPU when there is one; with `passes`, (passes, len(rows), classes): that
    many predictions with dropout on (MC dropout, seeded by `seed`)."""
    device = pick_device("auto")
    model = model.to(device)
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    order = np.argsort(tokens.lengths[rows], kind="stable")  # similar lengths share a batch
    out = np.zeros((max(passes, 1), len(rows), model.head[-1].out_features), dtype=np.float32)
    with _prediction_mode(model, passes, seed):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = to_device(pad_cells(tokens, rows[batch], pad_id), device)
            for draw in range(len(out)):
                with autocast(device):
                    logits = model(**inputs).logits
                out[draw, batch] = torch.softmax(logits.float(), -1).cpu().numpy()
    return out if passes else out[0]


@torch.no_grad()
def probe_probabilities(
    model: ProbeModel, embeddings: np.ndarray, rows: np.ndarray, passes: int = 0, seed: int = 0
) -> np.ndarray:
    """(len(rows), classes) softmax probabilities of the probe on cached embeddings; with
    `passes`, (passes, len(rows), classes) with the head's dropout on (MC dropout)."""
    device = next(model.parameters()).device
    parts = [rows[start : start + 4096] for start in range(0, len(rows), 4096)]
    with _prediction_mode(model, passes, seed):
        draws = [
            torch.cat([model(torch.as_tensor(embeddings[part]).to(device)).logits for part in parts])
            for _ in range(max(passes, 1))
        ]
    out = torch.softmax(torch.stack(draws).float(), -1).cpu().numpy()
    return out if passes else out[0]


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

    space = training_pca(counts, train, components, seed)
    classifier = LogisticRegression(max_iter=2000, class_weight="balanced" if balanced else None)
    classifier.fit(space(train), labels[train])
    out = np.zeros((len(cells), n_classes))
    out[:, classifier.classes_] = classifier.predict_proba(space(cells))
    return out


def training_pca(counts, train: np.ndarray, components: int, seed: int, residual: bool = False):
    """cells -> their coordinates on the top principal components of the `train` cells'
    log-normalised expression over their 2,000 most variable genes (genes and PCA from `train`).
    `residual`: one more coordinate, the norm of what those components leave out of the cell (a
    cell type absent from `train` projects near the others and differs in what is left out)."""
    normalised = log_normalise(counts)
    genes = variable_genes(normalised[train], PCA_TOP_GENES)
    pca = fit_pca(normalised[train][:, genes], components, seed)

    def space(cells):
        x = normalised[cells][:, genes]
        coordinates = pca.transform(x)
        if not residual:
            return coordinates
        left_out = np.empty(len(coordinates))
        for start in range(0, len(coordinates), RESIDUAL_BLOCK):  # dense cells x genes, a block at a time
            part = x[start : start + RESIDUAL_BLOCK]
            dense = part.toarray() if hasattr(part, "toarray") else np.asarray(part)
            left_out[start : start + len(dense)] = np.linalg.norm(
                dense - pca.inverse_transform(coordinates[start : start + len(dense)]), axis=1
            )
        return np.c_[coordinates, left_out]

    return space


OOD_REFERENCE_CELLS = 2000  # training cells an OOD score is measured against (seeded sample)
RESIDUAL_BLOCK = 4096  # cells whose dense expression is held at once for the PCA residual
OOD_NEIGHBOURS = 10


def baseline_uncertainty(
    config, lab, labels: np.ndarray, train: np.ndarray, test: np.ndarray, n_classes: int, seed: int, probabilities=None
):
    """The baseline's conformal prediction sets and every held-out cell's OOD score, for one seed.

    Sets: the labels whose probability is at least 1 − q, q the split-conformal quantile (at
    annotate.interval_level) of 1 − the true label's probability over the training cells, each
    predicted out of fold (inner stratified folds over the training cells alone). OOD: a cell's
    mean distance to its nearest training cells in a PCA of training cells (plus the norm of
    what the PCA leaves out of the cell), as a percentile of the same distance of other training
    cells: the first inner fold's training cells give the PCA and the reference, its held-out
    cells the calibration (split conformal: a PCA fitted on a cell flatters it, so the reference
    cells' own distances would not do); flagged at the level.

    Returns (per test cell: set membership (cells x classes, bool), OOD distance, OOD score)."""
    from sklearn.model_selection import StratifiedKFold

    from celltron.finetune.uncertainty import NearestNeighbourOOD, conformal_scale

    section = config.annotate
    out_of_fold = np.zeros((len(train), n_classes))
    smallest = int(np.bincount(labels[train])[np.unique(labels[train])].min())
    folds = StratifiedKFold(max(2, min(section.inner_folds, smallest)), shuffle=True, random_state=seed)
    splits = list(folds.split(train, labels[train]))
    for fit, held in splits:
        out_of_fold[held] = pca_logreg_probabilities(
            lab.counts, labels, train[fit], train[held], n_classes, section.pca_components, seed, section.balanced
        )
    nonconformity = 1.0 - out_of_fold[np.arange(len(train)), labels[train]]
    q = conformal_scale(nonconformity, np.zeros_like(nonconformity), np.ones_like(nonconformity), section.interval_level)
    if probabilities is None:  # the baseline's test probabilities, unless the caller has them
        probabilities = pca_logreg_probabilities(
            lab.counts, labels, train, test, n_classes, section.pca_components, seed, section.balanced
        )
    sets = probabilities >= 1.0 - q
    # OOD: the first inner fold's training cells give the space and the reference; its held-out
    # training cells, scored exactly as a test cell is, give the calibration (split conformal)
    fit, held = splits[0]
    space = training_pca(lab.counts, train[fit], section.pca_components, seed, residual=True)
    reference = space(_reference(train[fit], seed, OOD_REFERENCE_CELLS))
    scorer = NearestNeighbourOOD.calibrated_on(reference, space(train[held]), OOD_NEIGHBOURS)
    coordinates = space(test)
    return sets, scorer.distance(coordinates), scorer.score(coordinates)


def _reference(cells: np.ndarray, seed: int, size: int) -> np.ndarray:
    """The training cells OOD distances are measured against: a seeded sample of `size` (sorted)."""
    if len(cells) <= size:
        return np.sort(cells)
    return np.sort(np.random.default_rng(seed).choice(cells, size, replace=False))


def uncertainty_summary(per_seed: dict, level: float, predictor: str) -> dict:
    """Pooled over seeds: the baseline's set coverage and size; OOD flags and whether
    `predictor`'s errors (misclassified cells) rise with the OOD distance."""
    from celltron.finetune.uncertainty import error_vs_score

    covered = np.concatenate([r["covered"] for r in per_seed.values()])
    sizes = np.concatenate([r["sizes"] for r in per_seed.values()])
    wrong = np.concatenate([r["wrong"] for r in per_seed.values()]).astype(float)
    distance = np.concatenate([r["distance"] for r in per_seed.values()])
    flagged = np.concatenate([r["score"] for r in per_seed.values()]) >= level
    return {
        "model_sets": _model_sets_summary(per_seed, level),
        "model_plain_sets": _model_sets_summary(per_seed, level, "model_plain"),
        "sets": {
            "predictor": BASELINE,
            "level": level,
            "set": "labels with probability >= 1 - q, q the split-conformal quantile of 1 - p(true label) "
            "over training cells predicted out of fold",
            **_set_statistics(covered, sizes),
        },
        "ood": {
            "space": f"PCA of an inner fold's training cells and the norm it leaves out ({OOD_NEIGHBOURS} nearest of "
            f"up to {OOD_REFERENCE_CELLS} of them; calibrated on that fold's held-out training cells)",
            "n_flagged": int(flagged.sum()),
            "n_cells": int(len(flagged)),
            "error": f"{predictor} misclassified",
            "error_flagged": float(wrong[flagged].mean()) if flagged.any() else float("nan"),
            "error_unflagged": float(wrong[~flagged].mean()) if (~flagged).any() else float("nan"),
            **error_vs_score(wrong, distance),
        },
    }


def _set_statistics(covered: np.ndarray, sizes: np.ndarray) -> dict:
    """Coverage of the true label, mean set size, and the shares of one-label and empty sets."""
    return {
        "coverage": float(covered.mean()),
        "mean_size": float(sizes.mean()),
        "singletons": float(np.mean(sizes == 1)),
        "empty": float(np.mean(sizes == 0)),
    }


def _model_sets_summary(per_seed: dict, level: float, key: str = "model") -> dict | None:
    """The anchored head's own prediction sets (`key` "model") or the model alone's at the same
    setting ("model_plain"), pooled over seeds (None without them)."""
    records = {s: r[key] for s, r in per_seed.items() if key in r}
    if not records:
        return None
    covered = np.concatenate([r["covered"] for r in records.values()])
    sizes = np.concatenate([r["sizes"] for r in records.values()])
    who = "the anchored head" if key == "model" else "the model alone, at the anchored head's learning rate and length"
    blend = "chosen blend" if key == "model" else "model alone (weight 1)"
    folds = "the folds that chose the setting; no extra fit"
    extra = next((r["extra_fits"] for r in records.values() if "extra_fits" in r), None)
    if extra:  # a plain head: no folds chose anything, so they were fitted for the sets
        who, folds = "the plain head: the model alone", f"fitted for this calibration alone, {extra} extra fits per seed"
    return {
        "predictor": f"model ({who})",
        "level": level,
        "set": "labels with the probability >= 1 - q, q the split-conformal quantile of 1 - p(true label) of the "
        f"{blend} on the inner folds' held-out training cells ({folds})",
        **_set_statistics(covered, sizes),
        "threshold_per_seed": {str(s): r["threshold"] for s, r in records.items()},
        "inner_cells_per_seed": {str(s): r["inner_cells"] for s, r in records.items()},
    }


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

    def fine_tune(self, train: np.ndarray, seed: int, out: Path, lr: float, callbacks=None) -> tuple[nn.Module, bool]:
        """Train a model on the `train` cells at learning rate `lr`; returns it and whether this
        process is the first (every process gets the same model: the choices made with it agree)."""
        import lightning.pytorch as pl

        config = at_learning_rate(self.config, lr)
        pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
        model, dataset, collate = self._model_and_data(train)
        trainable, total = count_trainable(model)
        log.info("fine-tuning %d of %d parameters at learning rate %g", trainable, total, lr)
        return train_task_model(config, model, dataset, collate, out, seed, self.resume, callbacks)

    def _model_and_data(self, train: np.ndarray):
        config = self.config
        model = AnnotationModel(
            load_encoder(self.folder, config.model), self.n_classes, self._weights(train), config.annotate.dropout
        )
        return model, LabelledCells(train), _Collate(self.tokens, self.labels, self.pad_id)

    def _weights(self, train: np.ndarray) -> np.ndarray | None:
        return balanced_weights(self.labels[train], self.n_classes) if self.config.annotate.balanced else None

    @property
    def passes(self) -> int:
        """MC dropout passes per prediction (0: one prediction, dropout off)."""
        section = self.config.annotate
        return section.dropout_passes if section.intervals == "mc_dropout" else 0

    @property
    def members(self) -> int:
        """Models trained per fit: an ensemble's members, or one."""
        section = self.config.annotate
        return section.ensemble_members if section.intervals == "ensemble" else 1

    def predict(self, model: nn.Module, rows: np.ndarray, seed: int = 0) -> np.ndarray:
        """(draws, len(rows), classes): one prediction, or the MC dropout passes."""
        predicted = predict_probabilities(model, self.tokens, self.pad_id, self.config.data.batch_size, rows, self.passes, seed)
        return predicted if self.passes else predicted[None]


class _ProbeTask(_Task):
    """annotate.encoder frozen: every cell embedded once by the pretrained encoder (a fixed
    function of each cell alone, so held-out cells' embeddings tell the head nothing of their
    labels), then only the head trains on the cached embeddings."""

    def __init__(self, *args):
        super().__init__(*args)
        self.embeddings = frozen_cell_embeddings(self.folder, self.tokens, self.pad_id, self.config.data.batch_size)

    def _model_and_data(self, train: np.ndarray):
        model = ProbeModel(self.embeddings.shape[1], self.n_classes, self._weights(train), self.config.annotate.dropout)
        return model, LabelledCells(train), _EmbeddingCollate(self.embeddings, self.labels)

    def predict(self, model: nn.Module, rows: np.ndarray, seed: int = 0) -> np.ndarray:
        predicted = probe_probabilities(model, self.embeddings, np.asarray(rows), self.passes, seed)
        return predicted if self.passes else predicted[None]


def _baseline_probabilities(config, lab, labels, train, cells, n_classes: int, seed: int) -> np.ndarray:
    section = config.annotate
    return pca_logreg_probabilities(lab.counts, labels, train, cells, n_classes, section.pca_components, seed, section.balanced)


def _draws(
    task: _Task, train: np.ndarray, seed: int, out: Path, lr: float, lengths, rows: np.ndarray
) -> tuple[dict[int, np.ndarray], bool]:
    """Train on `train` at `lr` and predict the cells `rows` as training passes each of
    `lengths`: ({steps: (draws, len(rows), classes) probabilities}, whether this process is the
    first). One run and one draw, or MC dropout's passes of that run, or one run per ensemble
    member (member k trains with seed + k x ENSEMBLE_SEED_STRIDE, under out/member{k})."""
    members, first = [], True
    for k in range(task.members):
        member_seed, where = seed + ENSEMBLE_SEED_STRIDE * k, out / f"member{k}" if k else out
        by_length, first = predictions_by_length(
            lambda callbacks, s=member_seed, w=where: task.fine_tune(train, s, w, lr, callbacks),
            lambda model, s=member_seed: task.predict(model, rows, s),
            task.config.trainer.max_steps,
            lengths,
            where,
        )
        members.append(by_length)
    return {steps: np.concatenate([m[steps] for m in members]) for steps in members[0]}, first


def _predictions(
    task: _Task, train: np.ndarray, seed: int, out: Path, lr: float, lengths, rows: np.ndarray
) -> tuple[dict[int, np.ndarray], bool]:
    """As `_draws`, each length's probabilities the mean over the draws: ({steps: (len(rows),
    classes)}, whether this process is the first)."""
    draws, first = _draws(task, train, seed, out, lr, lengths, rows)
    return {steps: d.mean(0) for steps, d in draws.items()}, first


def macro_f1(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over classes 0..n_classes-1 (a class neither true nor predicted scores 0), as
    `classification_metrics`, without its report: the weight rule recomputes it on hundreds of
    resampled cell sets."""
    counts = np.bincount(truth * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    hits, together = np.diag(counts), counts.sum(0) + counts.sum(1)
    return float(np.where(together > 0, 2 * hits / np.maximum(together, 1), 0.0).mean())


def _macro_f1_score(truth: np.ndarray, probabilities: np.ndarray, n_classes: int) -> UnitScore:
    """Macro-F1 of the held-out cells, recomputable on resampled cells (the weight rule's units)."""
    predicted = probabilities.argmax(1)

    def on(rows):
        return macro_f1(truth, predicted, n_classes) if rows is None else macro_f1(truth[rows], predicted[rows], n_classes)

    return UnitScore.recomputed(len(truth), on)


def choose_settings(task: _Task, train: np.ndarray, seed: int, out: Path, inner: list | None = None) -> dict:
    """The anchored head's learning rate, training length and weight, by stratified inner cross-
    validation over the training cells: per inner fold, the baseline and one model per learning
    rate are fitted on the inner training cells (each model's predictions taken after every
    length) and scored on the inner held-out cells on macro-F1. The setting (learning rate,
    length) is the one whose model alone scores best (mean over folds; ties: the first learning
    rate listed, the shorter length); the weight, by `report.earned_weight` on the blends at
    that setting: the smallest unless a larger one gains beyond the interval over resampled inner
    held-out cells. Every process computes the same choice from the same models.

    Returns:
        {"learning_rate", "steps", "setting_scores": {"lr=..,steps=..": the model's inner score},
        "weight", "weight_scores": {str(weight): the blend's inner score at the chosen setting},
        "gain_low": {str(weight): the lower bound of its gain over the smallest}}.
        `inner` (a list) receives each fold's (held-out cells, baseline probabilities, {lr:
        {steps: model probabilities}}), from which `inner_conformal_threshold` calibrates the
        chosen head's prediction sets without another fit.
    """
    config, labels, n = task.config, task.labels, task.n_classes
    section = config.annotate
    rates = learning_rates(section, config.optim)
    scores = InnerScores(rates, training_lengths(section, config.trainer.max_steps), section.anchor_weights, seed)
    for j, (fit, held) in enumerate(inner_splits(task, train, seed)):
        baseline = _baseline_probabilities(config, task.lab, labels, fit, held, n, seed)
        models = {}
        for lr in rates:
            by_length, _ = _predictions(task, fit, seed, run_folder(out / f"inner{j}", lr, rates), lr, scores.lengths, held)
            scores.add(lr, by_length, baseline, lambda probabilities: _macro_f1_score(labels[held], probabilities, n))
            models[lr] = by_length
        if inner is not None:
            inner.append((held, baseline, models))
    return scores.choose()


def inner_splits(task: _Task, train: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit cells, held-out cells) of each stratified inner fold over the training cells `train`."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(task.config.annotate.inner_folds, shuffle=True, random_state=seed)
    return [(train[fit], train[held]) for fit, held in folds.split(train, task.labels[train])]


def calibration_folds(task: _Task, train: np.ndarray, seed: int, out: Path, choice: dict) -> list:
    """A plain head's inner folds, fitted only to calibrate its prediction sets (CV+ style): the
    folds `choose_settings` would use, one model per fold at the head's own learning rate and
    length, its probabilities on the fold's held-out training cells. Entries as `choose_settings`
    fills `inner`, with a zero baseline (the plain head is the model alone: weight 1)."""
    rate, steps = choice["learning_rate"], choice["steps"]
    inner = []
    for j, (fit, held) in enumerate(inner_splits(task, train, seed)):
        by_length, _ = _predictions(task, fit, seed, out / f"inner{j}", rate, (steps,), held)
        inner.append((held, np.zeros((len(held), task.n_classes)), {rate: by_length}))
    return inner


def inner_conformal_threshold(inner: list, labels: np.ndarray, choice: dict, level: float) -> tuple[float, int]:
    """The anchored head's prediction-set threshold q: the split-conformal quantile (at `level`)
    of 1 − p(true label) of the chosen blend (learning rate, length, weight of `choice`) on the
    inner folds' held-out training cells, as `choose_settings` predicted them (`inner`). Returns
    (q, inner cells)."""
    from celltron.finetune.uncertainty import conformal_scale

    scores = []
    for held, baseline, models in inner:
        blend = anchor(baseline, models[choice["learning_rate"]][choice["steps"]], choice["weight"])
        scores.append(1.0 - blend[np.arange(len(held)), labels[held]])
    scores = np.concatenate(scores)
    return conformal_scale(scores, np.zeros_like(scores), np.ones_like(scores), level), int(len(scores))


def _sets_record(inner: list, labels: np.ndarray, choice: dict, probabilities: np.ndarray, test: np.ndarray, section):
    """(the held-out cells' set coverage and sizes with the threshold, every cell's sets) of the
    blend `choice` describes, calibrated by `inner_conformal_threshold`."""
    q, n_inner = inner_conformal_threshold(inner, labels, choice, section.interval_level)
    sets = probabilities >= 1.0 - q
    record = {"covered": sets[test, labels[test]], "sizes": sets[test].sum(1), "threshold": q, "inner_cells": n_inner}
    return record, sets


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
    first_sets = None  # the first seed's model prediction sets (anchored head, interval_level > 0)
    spreads, first_disagreement = {}, None  # annotate.intervals: the draws' disagreement on held-out cells
    uncertain = {}  # seed -> the baseline's sets and the held-out cells' OOD scores
    anchored = section.head == "anchored"
    task = None
    if folder is not None:
        kind = _ProbeTask if section.encoder == "frozen" else _Task
        task = kind(config, folder, tokens, labels, len(classes), pad_id, resume, lab)
    everyone = np.arange(len(labels))
    for seed in section.seeds:
        train, test = stratified_split(labels, section.test_fraction, seed, f"{lab.path}: obs[{section.label_key!r}]", classes)
        splits[seed] = {"train": len(train), "test": len(test)}
        baseline = _baseline_probabilities(config, lab, labels, train, everyone, len(classes), seed)
        baseline_runs[seed] = classification_metrics(labels[test], baseline[test].argmax(1), classes)
        if section.interval_level > 0:
            sets, distance, score = baseline_uncertainty(config, lab, labels, train, test, len(classes), seed, baseline[test])
            uncertain[seed] = {
                "covered": sets[np.arange(len(test)), labels[test]],
                "sizes": sets.sum(1),
                "wrong": baseline[test].argmax(1) != labels[test],
                "distance": distance,
                "score": score,
            }
        if folder is None:
            continue
        choice, inner = {"learning_rate": config.optim.lr, "steps": config.trainer.max_steps, "weight": 1.0}, []
        if anchored:
            choice = weights[seed] = choose_settings(task, train, seed, out / f"seed{seed}", inner)
        elif section.interval_level > 0:  # the plain head's sets need held-out training cells of their own
            inner = calibration_folds(task, train, seed, out / f"seed{seed}", choice)
        draws, first_process = _draws(
            task, train, seed, out / f"seed{seed}", choice["learning_rate"], (choice["steps"],), everyone
        )
        if not first_process:
            first = False  # every process trains every seed together; only the first reports
            continue
        draws = draws[choice["steps"]]
        plain = draws.mean(0)
        disagreement = mutual_information(draws) if len(draws) > 1 else None  # passes or members: per cell
        if disagreement is not None:
            spreads[seed] = {
                "disagreement": disagreement[test],
                "doubt": 1.0 - plain[test].max(1),
                "wrong": plain[test].argmax(1) != labels[test],
            }
        probabilities = anchor(baseline, plain, choice["weight"]) if anchored else plain
        runs[seed] = classification_metrics(labels[test], probabilities[test].argmax(1), classes)
        if seed in uncertain:
            uncertain[seed]["wrong"] = probabilities[test].argmax(1) != labels[test]
            if anchored:  # the head's own sets, calibrated on the inner folds it was chosen on
                uncertain[seed]["model"], model_sets = _sets_record(inner, labels, choice, probabilities, test, section)
                # the model alone (weight 1 at the same setting): its inner predictions are already there
                uncertain[seed]["model_plain"], _ = _sets_record(inner, labels, {**choice, "weight": 1.0}, plain, test, section)
            else:  # the plain head is the model alone, calibrated on folds fitted for that alone
                uncertain[seed]["model_plain"], model_sets = _sets_record(inner, labels, choice, plain, test, section)
                uncertain[seed]["model_plain"]["extra_fits"] = len(inner)
            if first_probabilities is None:
                first_sets = model_sets
        plain_runs[seed] = classification_metrics(labels[test], plain[test].argmax(1), classes)
        if first_probabilities is None:
            first_probabilities, first_test, first_disagreement = probabilities, test, disagreement
    if not first:
        return None
    metrics = {
        "task": "annotate",
        "data": str(lab.path),
        "model_folder": str(folder) if folder else None,
        "classes": classes,
        "model": _aggregate(runs) if runs else None,
        "head": section.head if runs else None,
        "encoder": section.encoder if runs else None,
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
        "uncertainty": uncertainty_summary(uncertain, section.interval_level, "model" if runs else BASELINE)
        if uncertain
        else None,
        "model_spread": spread_summary(spreads, section, task) if spreads else None,
        "notes": {
            "pca_logreg": f"logistic regression on {section.pca_components} principal components of log-normalised "
            "expression, 2,000 most variable genes (genes and PCA from the training cells)"
            f"{', balanced class weights' if section.balanced else ''}"
        },
    }
    return _write_results(
        out,
        metrics,
        lab,
        section.label_key,
        classes,
        first_probabilities,
        first_test if runs else None,
        first_sets,
        first_disagreement,
    )


def spread_summary(spreads: dict, section, task: _Task) -> dict:
    """Pooled over seeds' held-out cells: does the draws' disagreement (mutual information) say
    when the model alone is wrong? AUROC of misclassified against it, Spearman, and the mean
    disagreement of wrong and right cells."""
    from celltron.finetune.uncertainty import error_vs_score

    disagreement = np.concatenate([r["disagreement"] for r in spreads.values()])
    doubt = np.concatenate([r["doubt"] for r in spreads.values()])
    wrong = np.concatenate([r["wrong"] for r in spreads.values()])
    method = (
        f"mc_dropout: {task.passes} passes of one model, every dropout layer on"
        if section.intervals == "mc_dropout"
        else f"ensemble: {task.members} models from seeds seed + k x {ENSEMBLE_SEED_STRIDE}"
    )
    return {
        "method": method,
        "score": "mutual information of the draws' class probabilities (nats): entropy of the mean minus mean entropy",
        "predictor": "the model alone (the mean of the draws)",
        "mean_wrong": float(disagreement[wrong].mean()) if wrong.any() else float("nan"),
        "mean_right": float(disagreement[~wrong].mean()) if (~wrong).any() else float("nan"),
        "misclassified": float(wrong.mean()),
        **error_vs_score(wrong.astype(float), disagreement),
        # the yardstick: does the averaged model's own doubt (1 − its top probability) mark errors better?
        "top_probability": {"score": "1 − the mean's top class probability", **error_vs_score(wrong.astype(float), doubt)},
    }


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


def _write_results(
    out: Path, metrics: dict, lab, label_key: str, classes: list[str], probabilities, test, sets=None, disagreement=None
) -> dict:
    write_metrics(out / "metrics.json", metrics)
    if probabilities is not None:
        _write_predictions(out / "predictions.h5ad", lab, label_key, classes, probabilities, test, sets, disagreement)
        _plot_confusion(out / "confusion_matrix.png", np.asarray(metrics["model"]["confusion_matrix"]), classes)
    plain = {"model, plain head": metrics["model_plain"]} if metrics.get("model_plain") else {}
    print(results_table({**metrics, "baselines": {**plain, **metrics["baselines"]}}, METRICS, metrics["notes"]))
    if metrics.get("anchor_weights"):
        chosen = ", ".join(
            f"seed {s}: w {c['weight']} (lr {c['learning_rate']:g}, {c['steps']} steps)"
            for s, c in metrics["anchor_weights"].items()
        )
        print(
            f"anchored head: {BASELINE} + w x (model − {BASELINE}) in class probabilities; learning rate and length "
            f"by inner CV on the model's macro-F1, w on the blend's: {chosen}"
        )
    for metric, difference in (metrics["paired"] or {}).items():
        print(verdict_line(metric, BASELINE, difference, "seeds", chosen_on=None))
    spread = metrics.get("model_spread")
    if spread:
        print(
            f"model disagreement ({spread['method']}): {spread['mean_wrong']:.3f} on misclassified held-out cells vs "
            f"{spread['mean_right']:.3f} on the rest, AUROC {spread['auroc_large_error']:.2f} (1 − top probability: "
            f"{spread['top_probability']['auroc_large_error']:.2f})"
        )
    if not metrics.get("uncertainty"):
        return metrics
    sets, ood = metrics["uncertainty"]["sets"], metrics["uncertainty"]["ood"]
    print(
        f"{BASELINE} {sets['level']:g} prediction sets (split conformal on training cells): coverage {sets['coverage']:.3f}, "
        f"mean size {sets['mean_size']:.2f}; OOD: {ood['n_flagged']} of {ood['n_cells']} held-out cells flagged, "
        f"misclassified {ood['error_flagged']:.3f} flagged vs {ood['error_unflagged']:.3f} not, AUROC {ood['auroc_large_error']:.2f}"
    )
    for key, who in (("model_sets", "anchored head"), ("model_plain_sets", "model alone")):
        model_sets = metrics["uncertainty"].get(key)
        if model_sets:
            print(
                f"{who} {model_sets['level']:g} prediction sets (split conformal on its inner folds): coverage "
                f"{model_sets['coverage']:.3f}, mean size {model_sets['mean_size']:.2f}, empty {model_sets['empty']:.3f}"
            )
    return metrics


def _write_predictions(
    path: Path,
    lab,
    label_key: str,
    classes: list[str],
    probabilities: np.ndarray,
    test: np.ndarray,
    sets=None,
    disagreement=None,
) -> None:
    """The lab's cells (raw counts, obs) with the first seed's model predictions: obs
    `{label_key}_predicted`, `{label_key}_probability` (of the predicted label),
    `celltron_split` and, with annotate.intervals, `{label_key}_disagreement` (the model's
    draws' mutual information: high where they disagree); obsm `{label_key}_probabilities` (cells x classes, uns lists the classes)
    and, given, `{label_key}_prediction_set` (cells x classes, bool: the head's conformal sets;
    calibrated for held-out cells, over-confident on the training cells it saw)."""
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
    if disagreement is not None:
        obs[f"{label_key}_disagreement"] = disagreement
    adata = ad.AnnData(X=lab.counts, obs=obs, var=pd.DataFrame(index=pd.Index(lab.gene_names.astype(str)).astype(object)))
    adata.var_names_make_unique()
    adata.obsm[f"{label_key}_probabilities"] = probabilities
    if sets is not None:
        adata.obsm[f"{label_key}_prediction_set"] = sets
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
