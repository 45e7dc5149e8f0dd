"""Drug response, `ic50` mode (DeepCDR / scFoundation style): predict ln(IC50) of (cell line,
drug) pairs. Drugs are RDKit Morgan fingerprints of their SMILES plus a learned embedding; cell
lines are learned embeddings (matrix completion: no cell-line expression is available offline).

Splits: random pairs, leave-cell-line-out, leave-drug-out. Metrics: Pearson and Spearman overall
and per drug (the honest figure: a drug-mean predictor already scores high overall), RMSE.
Baselines: drug mean, cell-line mean, their additive combination, ridge on fingerprints and
cell-line indicators, and (for unseen drugs) the nearest training drug by Tanimoto similarity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.utils import ModelOutput

log = logging.getLogger(__name__)
SPLITS = ("random", "cell_line", "drug")
DRUG_METRICS = ("pearson", "spearman", "rmse", "pearson_per_drug")
BASELINES = ("drug_mean", "cell_line_mean", "additive", "ridge", "nearest_drug")
MIN_PAIRS_PER_DRUG = 10


# ---------------------------------------------------------------- data


def read_ic50(path) -> pd.DataFrame:
    """The GDSC table (rows `GDSC:<drug_id>`, columns cell lines, ln(IC50), NA where unmeasured)
    as long (drug, cell_line, ln_ic50) rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file (a drugs x cell lines CSV of ln(IC50))")
    wide = pd.read_csv(path, index_col=0)
    long = wide.stack().rename("ln_ic50").reset_index()
    long.columns = ["drug", "cell_line", "ln_ic50"]
    if long.empty:
        raise ValueError(f"{path}: no ln(IC50) values (expected drugs as rows, cell lines as columns)")
    return long


def read_smiles(drug_list, smiles_file) -> dict[str, str]:
    """`GDSC:<drug_id>` -> SMILES, joining the GDSC drug list (drug_id, PubCHEM) with a
    `PubChem CID<TAB>SMILES` file."""
    drugs = pd.read_csv(drug_list, dtype=str)
    for column in ("drug_id", "PubCHEM"):
        if column not in drugs.columns:
            raise ValueError(f"{drug_list}: no column {column!r}; expected the GDSC drug list (drug_id, Name, ..., PubCHEM)")
    smiles = dict(line.split("\t")[:2] for line in Path(smiles_file).read_text().splitlines() if "\t" in line)
    out = {}
    for drug_id, cids in zip(drugs.drug_id, drugs.PubCHEM.fillna("")):
        found = next((smiles[c.strip()] for c in cids.split(",") if c.strip() in smiles), None)
        if found:
            out[f"GDSC:{drug_id}"] = found.strip()
    return out


def fingerprints(smiles: dict[str, str], bits: int = 1024, radius: int = 2) -> dict[str, np.ndarray]:
    """Morgan (ECFP-like) bit vectors; drugs whose SMILES RDKit cannot parse are left out."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError as error:
        raise ImportError("drug fingerprints need RDKit: pip install 'celltron[chem]'") from error
    RDLogger.DisableLog("rdApp.*")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    out = {}
    for drug, text in smiles.items():
        molecule = Chem.MolFromSmiles(text)
        if molecule is not None:
            out[drug] = generator.GetFingerprintAsNumPy(molecule).astype(np.float32)
    return out


def split_pairs(pairs: pd.DataFrame, kind: str, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: random pairs, or whole cell lines / drugs held out."""
    if kind not in SPLITS:
        raise ValueError(f"--split {kind!r}: use one of {SPLITS}")
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random(len(pairs)) < test_fraction
    column = "cell_line" if kind == "cell_line" else "drug"
    groups = np.array(sorted(pairs[column].unique()))
    held = set(rng.choice(groups, max(1, int(round(len(groups) * test_fraction))), replace=False))
    return pairs[column].isin(held).to_numpy()


# ---------------------------------------------------------------- metrics


def _pearson(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and np.std(a) > 1e-9 and np.std(b) > 1e-9 else float("nan")


def drug_response_metrics(predicted: np.ndarray, truth: np.ndarray, drugs: np.ndarray) -> dict:
    """Pearson, Spearman, RMSE over all held-out pairs; Pearson per drug averaged over drugs with
    at least MIN_PAIRS_PER_DRUG held-out pairs."""
    per_drug = {}
    for drug in np.unique(drugs):
        chosen = drugs == drug
        if chosen.sum() >= MIN_PAIRS_PER_DRUG:
            per_drug[str(drug)] = _pearson(predicted[chosen], truth[chosen])
    finite = [v for v in per_drug.values() if np.isfinite(v)]
    spearman = _pearson(pd.Series(predicted).rank().to_numpy(), pd.Series(truth).rank().to_numpy())
    return {"pearson": _pearson(predicted, truth), "spearman": spearman, "rmse": float(np.sqrt(np.mean((predicted - truth) ** 2))),
            "pearson_per_drug": float(np.mean(finite)) if finite else float("nan"), "per_drug": per_drug}


# ---------------------------------------------------------------- baselines


def _means(train: pd.DataFrame, column: str) -> dict:
    return train.groupby(column)["ln_ic50"].mean().to_dict()


def baseline_predictions(train: pd.DataFrame, test: pd.DataFrame, prints: dict[str, np.ndarray], ridge: float = 10.0) -> dict:
    """Every baseline's predictions of the test pairs; unseen drugs or cell lines fall back to
    the training mean of the other side (or the global mean)."""
    overall = float(train.ln_ic50.mean())
    drug_mean, cell_mean = _means(train, "drug"), _means(train, "cell_line")
    d = test.drug.map(drug_mean).to_numpy(dtype=float)
    c = test.cell_line.map(cell_mean).to_numpy(dtype=float)
    out = {
        "drug_mean": np.where(np.isnan(d), np.where(np.isnan(c), overall, c), d),
        "cell_line_mean": np.where(np.isnan(c), np.where(np.isnan(d), overall, d), c),
    }
    out["additive"] = np.nan_to_num(d, nan=overall) + np.nan_to_num(c, nan=overall) - overall
    out["ridge"] = _ridge(train, test, prints, ridge)
    out["nearest_drug"] = _nearest_drug(train, test, prints, out["cell_line_mean"])
    return out


def _ridge(train: pd.DataFrame, test: pd.DataFrame, prints: dict[str, np.ndarray], ridge: float) -> np.ndarray:
    """Ridge regression on [drug fingerprint, cell-line indicator] (dual form, sparse-friendly sizes)."""
    lines = {c: i for i, c in enumerate(sorted(train.cell_line.unique()))}

    def features(frame):
        fp = np.stack([prints[d] for d in frame.drug])
        onehot = np.zeros((len(frame), len(lines)), dtype=np.float32)
        known = frame.cell_line.map(lines)
        rows = np.flatnonzero(known.notna().to_numpy())
        onehot[rows, known.iloc[rows].astype(int).to_numpy()] = 1
        return np.concatenate([fp, onehot], axis=1)

    X, y = torch.as_tensor(features(train)), torch.as_tensor(train.ln_ic50.to_numpy(dtype=np.float32))
    centre = y.mean()
    # primal normal equations: features (~1.3k) are far fewer than training pairs
    A = X.T @ X + ridge * torch.eye(X.shape[1])
    w = torch.linalg.solve(A.double(), (X.T @ (y - centre)).double()).float()
    return (torch.as_tensor(features(test)) @ w + centre).numpy().astype(float)


def tanimoto(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tanimoto similarity between rows of two bit matrices."""
    shared = a @ b.T
    return shared / np.maximum(a.sum(1)[:, None] + b.sum(1)[None, :] - shared, 1)


def _nearest_drug(train: pd.DataFrame, test: pd.DataFrame, prints, fallback: np.ndarray) -> np.ndarray:
    """The most Tanimoto-similar training drug's value on the same cell line (a drug seen in
    training is its own nearest); the cell-line mean where that pair was not measured."""
    known = sorted(train.drug.unique())
    similar = tanimoto(np.stack([prints[d] for d in sorted(test.drug.unique())]), np.stack([prints[d] for d in known]))
    nearest = dict(zip(sorted(test.drug.unique()), np.array(known)[similar.argmax(1)]))
    value = train.set_index(["drug", "cell_line"]).ln_ic50
    value = value[~value.index.duplicated()]
    keys = pd.MultiIndex.from_arrays([test.drug.map(nearest), test.cell_line])
    found = value.reindex(keys).to_numpy(dtype=float)
    return np.where(np.isnan(found), fallback, found)


# ---------------------------------------------------------------- model


@dataclass
class DrugResponseOutput(ModelOutput):
    loss: torch.Tensor | None = None
    predicted: torch.Tensor | None = None


class DrugResponseModel(nn.Module):
    """ln(IC50) from a cell-line embedding and a drug representation (fingerprint MLP plus a
    learned embedding), through an MLP, plus drug and cell-line biases initialised at their
    training means. Unseen drugs or cell lines use index 0, a learned 'unknown' row.

    Args:
        fingerprints: (drugs + 1, bits) fingerprint of each drug index (row 0: unknown, zeros).
        n_cell_lines: cell lines seen in training (+1 for unknown).
        hidden: width of the embeddings and the MLP.
    """

    def __init__(self, fingerprints: np.ndarray, n_cell_lines: int, hidden: int = 128, dropout: float = 0.1,
                 drug_bias=None, cell_bias=None):
        super().__init__()
        self.register_buffer("fingerprints", torch.as_tensor(fingerprints, dtype=torch.float32))
        self.cell_lines = nn.Embedding(n_cell_lines, hidden)
        self.drugs = nn.Embedding(len(fingerprints), hidden)
        self.chemistry = nn.Sequential(nn.Linear(fingerprints.shape[1], hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.drug_bias = nn.Parameter(torch.as_tensor(drug_bias if drug_bias is not None else np.zeros(len(fingerprints)), dtype=torch.float32))
        self.cell_bias = nn.Parameter(torch.as_tensor(cell_bias if cell_bias is not None else np.zeros(n_cell_lines), dtype=torch.float32))
        for embedding in (self.cell_lines, self.drugs):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, drug, cell_line, target=None, **unused) -> DrugResponseOutput:
        drug_vector = self.chemistry(self.fingerprints[drug]) + self.drugs(drug)
        joint = torch.cat([drug_vector, self.cell_lines(cell_line)], dim=-1)
        predicted = self.head(joint).squeeze(-1) + self.drug_bias[drug] + self.cell_bias[cell_line]
        loss = torch.mean((predicted - target) ** 2) if target is not None else None
        return DrugResponseOutput(loss=loss, predicted=predicted)


class Pairs(Dataset):
    def __init__(self, drug: np.ndarray, cell_line: np.ndarray, target: np.ndarray | None):
        self.drug, self.cell_line, self.target = drug, cell_line, target

    def __len__(self) -> int:
        return len(self.drug)

    def __getitem__(self, i: int) -> dict:
        item = {"drug": int(self.drug[i]), "cell_line": int(self.cell_line[i])}
        if self.target is not None:
            item["target"] = float(self.target[i])
        return item


def collate_pairs(items: list[dict]) -> dict:
    batch = {"drug": torch.tensor([i["drug"] for i in items]), "cell_line": torch.tensor([i["cell_line"] for i in items])}
    if "target" in items[0]:
        batch["target"] = torch.tensor([i["target"] for i in items], dtype=torch.float32)
    batch["n_cells"] = torch.tensor(len(items))
    return batch


# ---------------------------------------------------------------- the task


def _indices(train: pd.DataFrame, drugs: list[str]):
    """Drug index for every drug with a fingerprint (0: none); cell-line index for training lines (0: unseen)."""
    drug_index = {d: i + 1 for i, d in enumerate(drugs)}
    cell_index = {c: i + 1 for i, c in enumerate(sorted(train.cell_line.unique()))}
    return drug_index, cell_index


def _fit_model(config, train: pd.DataFrame, prints: dict, out: Path, seed: int):
    import lightning.pytorch as pl

    from celltron.finetune.train import train_task_model

    drugs = sorted(prints)
    drug_index, cell_index = _indices(train, drugs)
    overall = float(train.ln_ic50.mean())
    drug_mean, cell_mean = _means(train, "drug"), _means(train, "cell_line")
    matrix = np.zeros((len(drugs) + 1, len(next(iter(prints.values())))), dtype=np.float32)
    matrix[1:] = np.stack([prints[d] for d in drugs])
    drug_bias = np.array([overall] + [drug_mean.get(d, overall) for d in drugs])
    cell_bias = np.array([0.0] + [cell_mean[c] - overall for c in sorted(cell_index, key=cell_index.get)])
    pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
    model = DrugResponseModel(matrix, len(cell_index) + 1, config.drug.hidden, drug_bias=drug_bias, cell_bias=cell_bias)
    dataset = Pairs(train.drug.map(drug_index).to_numpy(), train.cell_line.map(cell_index).to_numpy(), train.ln_ic50.to_numpy())
    model, first = train_task_model(config, model, dataset, collate_pairs, out, seed)
    return (model, drug_index, cell_index) if first else None


@torch.no_grad()
def _predict(fitted, test: pd.DataFrame) -> np.ndarray:
    model, drug_index, cell_index = fitted
    model.eval()
    drug = torch.as_tensor(test.drug.map(drug_index).fillna(0).astype(int).to_numpy())
    cell = torch.as_tensor(test.cell_line.map(cell_index).fillna(0).astype(int).to_numpy())
    return torch.cat([model(drug=d, cell_line=c).predicted for d, c in zip(drug.split(4096), cell.split(4096))]).numpy()


def run_drug_response(config, out, baselines_only: bool = False) -> dict | None:
    """ic50 mode end to end: splits per seed, baselines, the model, metrics.json, predictions.csv,
    a printed table and a plot under `out`."""
    from celltron.finetune.report import aggregate, plot_bars, results_table, write_metrics

    section, out = config.drug, Path(out)
    for name in ("drug_list", "smiles"):
        if not getattr(section, name):
            raise ValueError(f"drug.{name} is not set: pass --drug-list and --smiles (the GDSC drug list and a CID<TAB>SMILES file)")
    pairs = read_ic50(config.data.path)
    prints = fingerprints(read_smiles(section.drug_list, section.smiles))
    unknown = sorted(set(pairs.drug) - set(prints))
    if unknown:
        log.warning("%d of %d drugs have no parsable SMILES and are left out", len(unknown), pairs.drug.nunique())
    pairs = pairs[pairs.drug.isin(prints)].reset_index(drop=True)
    model_runs, baseline_runs, splits, rows, first = {}, {n: {} for n in BASELINES}, {}, [], True
    for seed in section.seeds:
        test_mask = split_pairs(pairs, section.split, section.test_fraction, seed)
        train, test = pairs[~test_mask], pairs[test_mask]
        splits[str(seed)] = {"train_pairs": int(len(train)), "test_pairs": int(len(test)),
                             "test_drugs": int(test.drug.nunique()), "test_cell_lines": int(test.cell_line.nunique())}
        predictions = baseline_predictions(train, test, prints)
        for name in BASELINES:
            baseline_runs[name][seed] = drug_response_metrics(predictions[name], test.ln_ic50.to_numpy(), test.drug.to_numpy())
        if not baselines_only:
            fitted = _fit_model(config, train, prints, out / f"seed{seed}", seed)
            if fitted is None:
                first = False
                continue
            predictions["model"] = _predict(fitted, test)
            model_runs[seed] = drug_response_metrics(predictions["model"], test.ln_ic50.to_numpy(), test.drug.to_numpy())
        rows.append(test.assign(seed=seed, **{f"pred_{k}": v for k, v in predictions.items()}))
    if not first:
        return None
    metrics = {
        "task": "drug_response", "mode": section.mode, "data": str(config.data.path),
        "method": None if baselines_only else "matrix_completion",
        "model": aggregate(model_runs, DRUG_METRICS, "per_drug") if model_runs else None,
        "baselines": {name: aggregate(baseline_runs[name], DRUG_METRICS, "per_drug") for name in BASELINES},
        "split": {"kind": section.split, "test_fraction": section.test_fraction, "per_seed": splits},
        "seeds": list(section.seeds), "drugs_without_smiles": unknown,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    table = pd.concat(rows)
    tmp = out / ".predictions.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "predictions.csv")
    plot_bars(metrics, "pearson_per_drug", out / "pearson_per_drug.png", f"Pearson per drug ({section.split} split)")
    print(results_table(metrics, DRUG_METRICS))
    return metrics
