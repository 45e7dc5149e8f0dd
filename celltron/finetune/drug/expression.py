"""Drug response, `expression` mode (chemCPA / CPA style): from the control cells of a cell type,
a drug's Morgan fingerprint and a dose, predict the mean log-normalised expression of the cells
treated with that drug at that dose (a condition: drug x dose x cell type).

The model encodes the cell type's basal state (its control mean through an MLP, or, with
`--model`, the pretrained encoder's mean embedding of its control cells), adds the drug's
fingerprint embedding scaled by a Hill curve in log10(dose) whose slope and midpoint are read
from the same embedding (chemCPA's sigmoid doser, made to work for unseen drugs), and decodes
the shift from the control mean: decoder(basal + scale x drug) - decoder(basal), zero at dose 0.

Splits hold out drug x dose combinations (each drug keeps a dose in training) or whole drugs,
never cells. Metrics per held-out condition: R² of the mean expression over all genes and over
its top-20 DE genes (|Welch t| against the cell type's controls). Baselines: the control mean,
and the same drug's mean at its nearest training dose (for held-out drugs: the mean over the
training drugs at that dose).

Per seed, the best baseline is chosen on the headline (R², top-20 DE genes) by inner cross-
validation over the training conditions, folds made the way the outer split holds out (whole
training drugs, or training drug x dose combinations each drug keeping a dose). The anchored head
(the default) predicts that baseline plus w x (model − baseline), w chosen by the same inner folds
with one model trained per inner fold; w = 0 is the baseline exactly. `paired` is the head minus
the chosen baseline per held-out unit (a drug, or a drug x dose combination), averaged over cell
types and seeds, with a 95% interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.utils import ModelOutput

from celltron.errors import ConfigError, InputError
from celltron.finetune.drug.features import fingerprints
from celltron.finetune.perturbation.evaluate import top_de
from celltron.finetune.report import (
    UnitScore,
    aggregate,
    anchor,
    choose_best,
    paired_over_seeds,
    plot_bars,
    print_baseline_choice,
    results_table,
    write_metrics,
)
from celltron.finetune.settings import (
    InnerScores,
    at_learning_rate,
    finite_mean,
    learning_rates,
    predictions_by_length,
    run_folder,
    training_lengths,
)
from celltron.inputs import MissingInputError
from celltron.io import write_h5ad_atomically
from celltron.lab.data import read_configured_lab_data
from celltron.lab.embed import embed
from celltron.preprocessing import log_normalise, variable_genes
from celltron.training.examples import train_task_model

log = logging.getLogger(__name__)
SPLITS = ("heldout_combination", "heldout_drug")
METRICS = ("r2", "r2_de20")
BASELINES = ("control_mean", "other_dose")
HEADLINE = "r2_de20"  # the best baseline, the anchor weight and the paired difference are on this
INNER_FOLDS = 3
N_DE = 20
PLAIN = "model_plain"  # the anchored head's model part alone
NOTES = {
    "other_dose": "the same drug's mean at its nearest training dose (same cell type); for a held-out drug, "
    "the mean over the training drugs at that dose"
}


# ---------------------------------------------------------------- data


@dataclass
class DrugScreen:
    """Pseudobulk view of a drug screen.

    Attributes:
        genes: the predicted genes (the most variable ones).
        conditions: one row per (drug, dose, cell_type) of treated cells, with n_cells.
        means: (conditions, genes) mean log-normalised expression of each condition's cells.
        de: (conditions, N_DE) each condition's top DE genes against its cell type's controls.
        control: cell type -> mean expression of its control cells (genes,).
        control_rows: cell type -> row numbers of its control cells in the file.
    """

    genes: np.ndarray
    conditions: pd.DataFrame
    means: np.ndarray
    de: np.ndarray
    control: dict[str, np.ndarray]
    control_rows: dict[str, np.ndarray]


def cell_labels(lab, section) -> pd.DataFrame:
    """drug, dose and cell_type of every cell, and whether it is a control (the control label
    or dose 0), with errors naming the column and the fix."""
    obs = lab.obs
    dose = pd.to_numeric(pd.Series(np.asarray(obs[section.dose_key], dtype=object)), errors="coerce")  # categorical columns too
    if dose.isna().any():
        bad = obs[section.dose_key].astype(str)[dose.isna().to_numpy()].unique()[:3]
        raise InputError(
            f"{lab.path}: obs[{section.dose_key!r}] has non-numeric doses (e.g. {list(bad)}); give doses as "
            "numbers (any unit, 0 for controls), or name the dose column with --dose-key"
        )
    cell_type = obs[section.cell_type_key].astype(str) if section.cell_type_key else pd.Series("all", index=obs.index)
    labels = pd.DataFrame(
        {
            "drug": obs[section.drug_key].astype(str).to_numpy(),
            "dose": dose.to_numpy(dtype=float),
            "cell_type": cell_type.to_numpy(),
        }
    )
    labels["control"] = (labels.drug == section.control) | (labels.dose == 0)
    if not labels.control.any():
        raise InputError(
            f"{lab.path}: no control cells: none labelled {section.control!r} in obs[{section.drug_key!r}] "
            f"(labels include {sorted(labels.drug.unique())[:8]}) and none at dose 0; name the label with --control"
        )
    if (labels.dose[~labels.control] < 0).any():
        raise InputError(f"{lab.path}: obs[{section.dose_key!r}] has negative doses; give doses >= 0")
    return labels


def pseudobulk(lab, labels: pd.DataFrame, n_genes: int) -> DrugScreen:
    """Per-condition means and DE genes of treated cells; per-cell-type control means."""
    expression = log_normalise(lab.counts).astype(np.float32)  # sparse: screens have many cells
    columns = variable_genes(expression, n_genes)
    expression = expression[:, columns].tocsr()
    control_rows = {t: np.flatnonzero(labels.control & (labels.cell_type == t)) for t in sorted(labels.cell_type.unique())}
    control_cells = {t: expression[rows].toarray() for t, rows in control_rows.items() if len(rows)}
    treated = labels[~labels.control].assign(row=np.flatnonzero(~labels.control))
    groups = treated.groupby(["drug", "dose", "cell_type"], sort=True).row
    lacking = sorted(set(treated.cell_type) - set(control_cells))
    if lacking:
        raise InputError(
            f"{lab.path}: cell type(s) {lacking} have treated cells but no controls; every cell type needs "
            "control cells (or pass --cell-type-key '' to pool them)"
        )
    rows, means, de = [], [], []
    for (drug, dose, cell_type), members in groups:
        cells = expression[members.to_numpy()].toarray()
        rows.append({"drug": drug, "dose": dose, "cell_type": cell_type, "n_cells": len(cells)})
        means.append(cells.mean(0))
        de.append(top_de(cells, control_cells[cell_type], N_DE))
    return DrugScreen(
        np.asarray(lab.gene_names)[columns],
        pd.DataFrame(rows),
        np.stack(means),
        np.stack(de),
        {t: c.mean(0) for t, c in control_cells.items()},
        control_rows,
    )


def read_drug_smiles(path, drugs) -> dict[str, str]:
    """`DRUG<TAB>SMILES` lines, DRUG as labelled in the screen; other lines are ignored."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"--smiles {path}: no such file (DRUG<TAB>SMILES lines, DRUG as in the drug column)")
    table = dict(line.split("\t")[:2] for line in path.read_text().splitlines() if "\t" in line)
    found = {d: table[d].strip() for d in drugs if d in table}
    if not found:
        raise InputError(
            f"{path}: no line names a drug of the screen (e.g. {sorted(drugs)[:3]}); expected DRUG<TAB>SMILES "
            "with DRUG exactly as in the --drug-key column"
        )
    return found


def read_screen(config):
    """The screen as pseudobulk, the drugs' fingerprints, and the drugs left out for want of
    a parsable SMILES (their cells are dropped)."""
    section, data = config.drug, config.data
    if not data.path:
        raise ConfigError("no screen: pass --data SCREEN.h5ad (or set data.path in the config)")
    if not section.smiles:
        raise ConfigError("drug.smiles is not set: pass --smiles with DRUG<TAB>SMILES lines for the screen's drugs")
    keys = [section.drug_key, section.dose_key] + ([section.cell_type_key] if section.cell_type_key else [])
    lab = read_configured_lab_data(data, keys)
    labels = cell_labels(lab, section)
    treated_drugs = sorted(labels.drug[~labels.control].unique())
    prints = fingerprints(read_drug_smiles(section.smiles, treated_drugs))
    missing = sorted(set(treated_drugs) - set(prints))
    if missing:
        log.warning(
            "%s: %d of %d drugs have no parsable SMILES in %s and are left out (e.g. %s)",
            lab.path,
            len(missing),
            len(treated_drugs),
            section.smiles,
            ", ".join(missing[:5]),
        )
        keep = (labels.control | labels.drug.isin(prints)).to_numpy()
        lab = replace(lab, counts=lab.counts[keep], obs=lab.obs[keep].reset_index(drop=True), cell_names=lab.cell_names[keep])
        labels = labels[keep].reset_index(drop=True)
    screen = pseudobulk(lab, labels, section.n_genes)
    if screen.conditions.drug.nunique() < 2:
        raise InputError(f"{lab.path}: {screen.conditions.drug.nunique()} drug(s) with a fingerprint; a split needs at least 2")
    return lab, screen, prints, missing


# ---------------------------------------------------------------- splits


def split_conditions(conditions: pd.DataFrame, kind: str, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask over conditions: whole drugs held out, or drug x dose combinations
    (every cell type of a combination together), each drug keeping at least one training dose."""
    if kind not in SPLITS:
        raise ConfigError(f"--split {kind!r}: use one of {SPLITS} in expression mode")
    rng = np.random.default_rng(seed)
    drugs = np.array(sorted(conditions.drug.unique()))
    if kind == "heldout_drug":
        held = rng.choice(drugs, min(len(drugs) - 1, max(1, int(round(len(drugs) * test_fraction)))), replace=False)
        return conditions.drug.isin(held).to_numpy()
    combos = conditions[["drug", "dose"]].drop_duplicates().sort_values(["drug", "dose"]).to_numpy()
    wanted = max(1, int(round(len(combos) * test_fraction)))
    doses_left = conditions.groupby("drug").dose.nunique().to_dict()
    held = set()
    for drug, dose in combos[rng.permutation(len(combos))]:
        if len(held) < wanted and doses_left[drug] > 1:
            held.add((drug, dose))
            doses_left[drug] -= 1
    if not held:
        raise ConfigError(
            "--split heldout_combination: every drug was given at a single dose, so no combination can be held "
            "out while its drug stays in training; use --split heldout_drug"
        )
    return np.array([(d, x) in held for d, x in zip(conditions.drug, conditions.dose)])


def inner_folds(conditions: pd.DataFrame, train: np.ndarray, kind: str, folds: int, seed: int) -> list[np.ndarray]:
    """Test masks over all conditions that partition the training ones the way `kind` holds out:
    whole training drugs dealt into `folds` folds, or each training drug's doses dealt round the
    folds from a random start (a drug with d >= 2 training doses has at most ceil(d / folds) <
    d of them in any fold, so it keeps a training dose; a drug with one is never held out).
    Empty folds are dropped; fewer than two folds is an error naming the fix."""
    rng = np.random.default_rng([seed, 17])
    train = np.asarray(train, dtype=bool)
    fold_of = np.full(len(conditions), -1)
    if kind == "heldout_drug":
        drugs = rng.permutation(sorted(conditions.drug[train].unique()))
        by_drug = {drug: i % folds for i, drug in enumerate(drugs)}
        fold_of[train] = conditions.drug[train].map(by_drug).to_numpy()
    else:
        for drug, doses in conditions[train].groupby("drug").dose:
            doses = rng.permutation(sorted(doses.unique()))
            if len(doses) < 2:
                continue
            start = rng.integers(folds)
            by_dose = {dose: (start + i) % folds for i, dose in enumerate(doses)}
            rows = train & (conditions.drug == drug).to_numpy()
            fold_of[rows] = conditions.dose[rows].map(by_dose).to_numpy()
    masks = [fold_of == j for j in range(folds) if (fold_of == j).any()]
    if len(masks) < 2:
        raise ConfigError(
            f"--split {kind}: the training conditions of seed {seed} give {len(masks)} inner fold(s); choosing the best "
            "baseline and the anchor weight needs two: hold out fewer (lower --test-fraction), or give more drugs or doses"
        )
    return masks


# ---------------------------------------------------------------- metrics


def r2(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Coefficient of determination of `truth` by `predicted` across genes."""
    total = float(np.sum((truth - truth.mean()) ** 2))
    return 1.0 - float(np.sum((truth - predicted) ** 2)) / total if total > 0 else float("nan")


def evaluate(predicted: np.ndarray, screen: DrugScreen, test: np.ndarray) -> dict:
    """Mean R² (all genes, top-20 DE genes) over the held-out conditions, and each condition's."""
    per = {}
    for row, index in zip(predicted, np.flatnonzero(test)):
        condition = screen.conditions.iloc[index]
        truth, de = screen.means[index], screen.de[index]
        per[f"{condition.drug}|{condition.dose:g}|{condition.cell_type}"] = {
            "r2": r2(row, truth),
            "r2_de20": r2(row[de], truth[de]),
        }
    means = {m: float(np.nanmean([v[m] for v in per.values()])) for m in METRICS}
    return {**means, "per_condition": per}


def _per_condition_score(predicted: np.ndarray, screen: DrugScreen, test: np.ndarray) -> UnitScore:
    """HEADLINE over the held-out conditions, each condition a unit the weight rule resamples."""
    return UnitScore.of_units([v[HEADLINE] for v in evaluate(predicted, screen, test)["per_condition"].values()])


# ---------------------------------------------------------------- baselines


def baseline_predictions(
    screen: DrugScreen, test: np.ndarray, train: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], int]:
    """Each baseline's (test conditions, genes) predictions from the `train` conditions (default:
    every other one), and how many held-out conditions had no training dose of their drug
    (other_dose fell back to the training drugs' mean)."""
    conditions = screen.conditions
    train = ~test if train is None else np.asarray(train, dtype=bool)
    control = np.stack([screen.control[t] for t in conditions.cell_type[test]])
    other, fell_back = [], 0
    for index in np.flatnonzero(test):
        drug, dose, cell_type = conditions.iloc[index][["drug", "dose", "cell_type"]]
        same = train & (conditions.cell_type == cell_type).to_numpy()
        mine = same & (conditions.drug == drug).to_numpy()
        fell_back += not mine.any()
        other.append(_nearest_dose_mean(screen, mine if mine.any() else same, dose))
    return {"control_mean": control, "other_dose": np.stack(other)}, fell_back


def _nearest_dose_mean(screen: DrugScreen, candidates: np.ndarray, dose: float) -> np.ndarray:
    """Mean of the candidate conditions at the training dose nearest `dose` in log10."""
    doses = screen.conditions.dose.to_numpy()
    distance = np.abs(np.log10(doses) - np.log10(dose))
    chosen = candidates & np.isclose(distance, distance[candidates].min())
    return screen.means[chosen].mean(0)


def choose_baseline(screen: DrugScreen, folds: list[np.ndarray], train: np.ndarray) -> dict:
    """The baseline with the best mean headline over the inner folds (each fold predicted from the
    training conditions outside it): {"name", "score", "inner_scores"}."""
    scores = {name: [] for name in BASELINES}
    for held in folds:
        predicted, _ = baseline_predictions(screen, held, train & ~held)
        for name in BASELINES:
            scores[name].append(evaluate(predicted[name], screen, held)[HEADLINE])
    means = {name: finite_mean(values) for name, values in scores.items()}
    name = choose_best(means)
    return {"name": name, "score": means[name], "inner_scores": means}


def unit_of(condition: str, kind: str) -> str:
    """The held-out unit a condition key ("drug|dose|cell type") belongs to: its drug for
    held-out drugs, its drug x dose combination otherwise (cell types of a unit move together)."""
    drug, dose, _ = condition.split("|", 2)
    return drug if kind == "heldout_drug" else f"{drug}|{dose}"


def per_unit(per_condition: dict[str, dict], kind: str) -> dict[str, float]:
    """The headline averaged over each held-out unit's conditions."""
    values: dict[str, list] = {}
    for condition, metrics in per_condition.items():
        values.setdefault(unit_of(condition, kind), []).append(metrics[HEADLINE])
    return {unit: finite_mean(v) for unit, v in values.items()}


def paired_over_units(model_runs: dict, baseline_runs: dict, best: dict, kind: str) -> dict:
    """Head − each seed's chosen baseline on the headline per held-out unit; a unit held out under
    several seeds counts once, its values averaged over those seeds."""
    model = {seed: per_unit(run["per_condition"], kind) for seed, run in model_runs.items()}
    baseline = {seed: per_unit(baseline_runs[best[seed]["name"]][seed]["per_condition"], kind) for seed in model_runs}
    names = " / ".join(sorted({best[seed]["name"] for seed in model_runs}))
    unit = "drugs" if kind == "heldout_drug" else "drug x dose combinations"
    return paired_over_seeds(model, baseline, HEADLINE, unit, names)


# ---------------------------------------------------------------- model


@dataclass
class DrugExpressionOutput(ModelOutput):
    loss: torch.Tensor | None = None
    predicted: torch.Tensor | None = None


def _mlp(inputs: int, hidden: int, outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, outputs))


class DrugExpressionModel(nn.Module):
    """Treated mean expression = control mean + decoder(basal + s x drug) - decoder(basal), with
    s = sigmoid(softplus(slope(drug)) x (log10 dose - midpoint(drug))) a Hill curve per drug.

    Args:
        fingerprints: (drugs, bits) fingerprint of each drug index.
        basal: (cell types, features) what the model knows of each cell type's untreated state.
        control: (cell types, genes) control mean expression, to which the shift is added.
        log_dose_centre: mean training log10 dose (the doser's midpoints start there).
        hidden: width of the latent space and the MLPs.
    """

    def __init__(
        self,
        fingerprints: np.ndarray,
        basal: np.ndarray,
        control: np.ndarray,
        log_dose_centre: float,
        hidden: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        for name, value in (("fingerprints", fingerprints), ("basal", basal), ("control", control)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))
        self.register_buffer("centre", torch.tensor(float(log_dose_centre)))
        self.chemistry = _mlp(fingerprints.shape[1], hidden, hidden, dropout)
        self.basal_encoder = _mlp(basal.shape[1], hidden, hidden, dropout)
        self.doser = nn.Linear(hidden, 2)  # slope and midpoint of the drug's Hill curve
        self.decoder = _mlp(hidden, hidden, control.shape[1], dropout)

    def dose_scale(self, drug_vector: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        slope, midpoint = self.doser(drug_vector).unbind(-1)
        return torch.sigmoid(nn.functional.softplus(slope + 1.0) * (torch.log10(dose) - self.centre - midpoint))

    def forward(self, drug, dose, cell_type, target=None, **unused) -> DrugExpressionOutput:
        drug_vector = self.chemistry(self.fingerprints[drug])
        basal = self.basal_encoder(self.basal[cell_type])
        scale = self.dose_scale(drug_vector, dose)[:, None]
        shift = self.decoder(basal + scale * drug_vector) - self.decoder(basal)
        predicted = self.control[cell_type] + shift
        loss = torch.mean((predicted - target) ** 2) if target is not None else None
        return DrugExpressionOutput(loss=loss, predicted=predicted)


class Conditions(Dataset):
    def __init__(self, drug: np.ndarray, dose: np.ndarray, cell_type: np.ndarray, target: np.ndarray):
        self.drug, self.dose, self.cell_type, self.target = drug, dose, cell_type, target

    def __len__(self) -> int:
        return len(self.drug)

    def __getitem__(self, i: int) -> int:
        return i


class CollateConditions:
    def __init__(self, dataset: Conditions):
        self.data = dataset

    def __call__(self, rows: list[int]) -> dict:
        d = self.data
        return {
            "drug": torch.as_tensor(d.drug[rows]),
            "dose": torch.as_tensor(d.dose[rows], dtype=torch.float32),
            "cell_type": torch.as_tensor(d.cell_type[rows]),
            "target": torch.as_tensor(d.target[rows], dtype=torch.float32),
            "n_cells": torch.tensor(len(rows)),
        }


# ---------------------------------------------------------------- the task


def basal_features(screen: DrugScreen, lab, model: str | None, section, seed: int) -> tuple[np.ndarray, str]:
    """Each cell type's basal state: the pretrained model's mean embedding of up to
    `control_cells` of its control cells, or (without a model) its control mean expression."""
    types = sorted(screen.control)
    if model is None:
        return np.stack([screen.control[t] for t in types]), "control_mean"
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(screen.control_rows[t])[: section.control_cells] for t in types]
    embedded = _embed_rows(lab, np.concatenate(rows), model)
    bounds = np.cumsum([0] + [len(r) for r in rows])
    return np.stack([np.nanmean(embedded[a:b], 0) for a, b in zip(bounds[:-1], bounds[1:])]), "pretrained_embedding"


def _embed_rows(lab, rows: np.ndarray, model: str) -> np.ndarray:
    """The pretrained model's mean-pooled embedding of some of the lab's cells (a temporary file:
    embedding reads .h5ad files)."""
    import tempfile

    import anndata as ad

    with tempfile.TemporaryDirectory(prefix="celltron-drug-") as work:
        path = Path(work) / "controls.h5ad"
        ad.AnnData(X=lab.counts[rows], var=pd.DataFrame(index=pd.Index(np.asarray(lab.gene_names).astype(str)))).write_h5ad(path)
        return embed(model, path, pool="mean", species=lab.species, min_mapped_fraction=lab.min_mapped_fraction)


def _standardised(matrix: np.ndarray) -> np.ndarray:
    spread = matrix.std(0)
    return (matrix - matrix.mean(0)) / np.maximum(spread, 1e-3 * spread.max() + 1e-12)


def _indices(screen: DrugScreen, prints: dict) -> tuple[dict, dict]:
    """Row of each drug and of each cell type in the model's tables (sorted names)."""
    return {d: i for i, d in enumerate(sorted(prints))}, {t: i for i, t in enumerate(sorted(screen.control))}


def _fit_model(
    config, screen: DrugScreen, prints: dict, basal: np.ndarray, train: np.ndarray, out: Path, seed: int, callbacks=None
):
    """Train on the training conditions' means; returns ((model, drug index, cell-type index),
    whether this process is the first); every process gets the same model."""
    import lightning.pytorch as pl

    drug_index, type_index = _indices(screen, prints)
    conditions = screen.conditions[train]
    dose = conditions.dose.to_numpy()
    pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
    model = DrugExpressionModel(
        np.stack([prints[d] for d in sorted(prints)]),
        _standardised(basal),
        np.stack([screen.control[t] for t in sorted(screen.control)]),
        float(np.log10(dose).mean()),
        config.drug.hidden,
    )
    dataset = Conditions(
        conditions.drug.map(drug_index).to_numpy(), dose, conditions.cell_type.map(type_index).to_numpy(), screen.means[train]
    )
    model, first = train_task_model(config, model, dataset, CollateConditions(dataset), out, seed, callbacks=callbacks)
    return (model, drug_index, type_index), first


@torch.no_grad()
def _predict(fitted, conditions: pd.DataFrame) -> np.ndarray:
    model, drug_index, type_index = fitted
    was_training = model.training
    model.eval()
    predicted = model(
        drug=torch.as_tensor(conditions.drug.map(drug_index).to_numpy()),
        dose=torch.as_tensor(conditions.dose.to_numpy(), dtype=torch.float32),
        cell_type=torch.as_tensor(conditions.cell_type.map(type_index).to_numpy()),
    ).predicted.numpy()
    model.train(was_training)
    return predicted


def _model_predictions(config, screen, prints, basal, train, held, out: Path, seed: int, lr: float, lengths):
    """Train on the `train` conditions at learning rate `lr` and predict the `held` ones as
    training passes each of `lengths`: ({steps: predictions}, whether this process is the first)."""
    drug_index, type_index = _indices(screen, prints)
    conditions = screen.conditions[held]

    def train_model(callbacks):
        fitted, first = _fit_model(at_learning_rate(config, lr), screen, prints, basal, train, out, seed, callbacks)
        return fitted[0], first

    return predictions_by_length(
        train_model,
        lambda model: _predict((model, drug_index, type_index), conditions),
        config.trainer.max_steps,
        lengths,
        out,
    )


def choose_weight(config, screen, prints, basal, train, folds, baseline: str, out: Path, seed: int) -> dict:
    """The anchored head's learning rate, training length and weight by the inner folds, one model
    per fold and learning rate (drug.learning_rates; optim.lr when empty) trained on the training
    conditions outside the fold, its predictions taken after each of drug.step_fractions of
    trainer.max_steps: the setting whose model alone has the best mean headline, then the weight
    (of drug.anchor_weights) by `report.earned_weight` on the blends at that setting (the
    smallest unless a larger one gains beyond the interval over resampled inner held-out
    conditions). Ties go to the first learning rate, the shorter length, the smaller weight.
    Every process computes the same choice.

    Returns:
        {"learning_rate", "steps", "setting_scores", "weight", "weight_scores", "gain_low"}.
    """
    section = config.drug
    rates = learning_rates(section, config.optim)
    scores = InnerScores(rates, training_lengths(section, config.trainer.max_steps), section.anchor_weights, seed)
    for index, held in enumerate(folds):
        base = baseline_predictions(screen, held, train & ~held)[0][baseline]
        for lr in rates:
            folder = run_folder(out / f"inner{index}", lr, rates)
            by_length, _ = _model_predictions(
                config, screen, prints, basal, train & ~held, held, folder, seed, lr, scores.lengths
            )
            scores.add(lr, by_length, base, lambda predicted: _per_condition_score(predicted, screen, held))
    return scores.choose()


def run_drug_expression(config, model: str | None, out, baselines_only: bool = False) -> dict | None:
    """Expression mode end to end: splits per seed, baselines (the best chosen by inner
    cross-validation over training conditions), the model (anchored on that baseline by default),
    then metrics.json, predictions.h5ad, a printed table and a plot under `out`. Returns the
    metrics (None on processes other than the first)."""
    section, out = config.drug, Path(out)
    lab, screen, prints, missing = read_screen(config)
    kind = section.split_kind()
    anchored = section.head == "anchored" and not baselines_only
    model_runs, plain_runs, baseline_runs = {}, {}, {n: {} for n in BASELINES}
    splits, predictions, best, first = {}, {}, {}, True
    basal, basal_kind = basal_features(screen, lab, None if baselines_only else model, section, config.trainer.seed)
    for seed in section.seeds:
        test = split_conditions(screen.conditions, kind, section.test_fraction, seed)
        folds = inner_folds(screen.conditions, ~test, kind, INNER_FOLDS, seed)
        best[seed] = choose_baseline(screen, folds, ~test)
        predicted, fell_back = baseline_predictions(screen, test)
        held = screen.conditions[test]
        splits[str(seed)] = {
            "train_conditions": int((~test).sum()),
            "test_conditions": int(test.sum()),
            "test_drugs": sorted(held.drug.unique()),
            "test_combinations": int(len(held[["drug", "dose"]].drop_duplicates())),
            "other_dose_fell_back": fell_back,
            "inner_folds": len(folds),
        }
        for name in BASELINES:
            baseline_runs[name][seed] = evaluate(predicted[name], screen, test)
        if baselines_only:
            predictions[seed] = (test, predicted)
            continue
        choice = {"learning_rate": config.optim.lr, "steps": config.trainer.max_steps, "weight": 1.0}
        if anchored:
            choice = choose_weight(config, screen, prints, basal, ~test, folds, best[seed]["name"], out / f"seed{seed}", seed)
            best[seed] |= choice
        by_length, first_process = _model_predictions(
            config, screen, prints, basal, ~test, test, out / f"seed{seed}", seed, choice["learning_rate"], (choice["steps"],)
        )
        if not first_process:
            first = False
            continue
        plain = by_length[choice["steps"]]
        plain_runs[seed] = evaluate(plain, screen, test)
        predicted["model"] = anchor(predicted[best[seed]["name"]], plain, choice["weight"]) if anchored else plain
        model_runs[seed] = evaluate(predicted["model"], screen, test)
        if anchored:
            predicted[PLAIN] = plain
        predictions[seed] = (test, predicted)
    if not first:
        return None
    metrics = {
        "task": "drug_response",
        "mode": "expression",
        "data": str(lab.path),
        "model_folder": model,
        "method": None if baselines_only else "fingerprint_doser_mlp",
        "head": None if baselines_only else section.head,
        "basal": basal_kind,
        "model": aggregate(model_runs, METRICS, "per_condition") if model_runs else None,
        "model_plain": aggregate(plain_runs, METRICS, "per_condition") if anchored else None,
        "baselines": {name: aggregate(baseline_runs[name], METRICS, "per_condition") for name in BASELINES},
        "best_baseline": {
            "metric": HEADLINE,
            "chosen_on": chosen_on(kind),
            "per_seed": {str(seed): choice for seed, choice in best.items()},
        },
        "paired": paired_over_units(model_runs, baseline_runs, best, kind) if model_runs else None,
        "split": {"kind": kind, "test_fraction": section.test_fraction, "per_seed": splits},
        "seeds": list(section.seeds),
        "genes": int(len(screen.genes)),
        "conditions": int(len(screen.conditions)),
        "drugs_without_smiles": missing,
        "notes": NOTES,
    }
    return write_results(out, metrics, screen, predictions)


def chosen_on(kind: str, folds: int = INNER_FOLDS) -> str:
    """How the best baseline (and the anchor weight) were chosen, in words."""
    units = "drugs" if kind == "heldout_drug" else "drug x dose combinations"
    return f"training {units}, {folds}-fold inner cross-validation"


def write_results(out: Path, metrics: dict, screen: DrugScreen, predictions: dict) -> dict:
    """metrics.json, predictions.h5ad, the R² (DE genes) bar plot and the printed table."""
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    _write_predictions(out / "predictions.h5ad", screen, predictions)
    # the anchored head's model part alone is shown beside the baselines, for comparison
    plain = {"model, plain head": metrics["model_plain"]} if metrics.get("model_plain") else {}
    shown = {**metrics, "baselines": {**plain, **metrics["baselines"]}}
    plot_bars(shown, HEADLINE, out / "r2_de20.png", f"R², top-20 DE genes ({metrics['split']['kind']} split)")
    print(results_table(shown, METRICS, metrics["notes"]))
    print_baseline_choice(metrics, HEADLINE)
    return metrics


def _write_predictions(path: Path, screen: DrugScreen, predictions: dict) -> None:
    """One row per seed and held-out condition: the model's prediction in X (the truth when
    only baselines ran), truth, control mean and the baselines as layers."""
    import anndata as ad

    obs, layers = [], {}
    has_model = all("model" in p for _, p in predictions.values())
    for seed, (test, predicted) in predictions.items():
        obs.append(screen.conditions[test].assign(seed=seed))
        for name, value in {"truth": screen.means[test], **predicted}.items():
            layers.setdefault(name, []).append(value)
    obs = pd.concat(obs).reset_index(drop=True)
    obs.index = [f"{r.seed}:{r.drug}|{r.dose:g}|{r.cell_type}" for r in obs.itertuples()]
    layers = {k: np.concatenate(v).astype(np.float32) for k, v in layers.items()}
    X = layers.pop("model") if has_model else layers["truth"]
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(screen.genes.astype(str))), layers=layers)
    adata.uns["X"] = "model prediction" if has_model else "truth (baselines only)"
    write_h5ad_atomically(adata, path)
