"""Drug response, `ic50` mode (DeepCDR / scFoundation style): predict ln(IC50) of (cell line,
drug) pairs. Drugs are RDKit Morgan fingerprints of their SMILES plus a learned embedding. Cell
lines are learned embeddings (matrix completion), or, given their expression profiles
(`--expression`), the pretrained model's frozen embedding of each profile (its PCA without
`--model`) through an MLP, so that cell lines never seen in training are predicted too.

Splits: random pairs, leave-cell-line-out, leave-drug-out. Metrics: Pearson and Spearman overall
and per drug (the honest figure: a drug-mean predictor already scores high overall), RMSE.
Baselines: drug mean, cell-line mean, their additive combination, ridge on fingerprints and
cell-line indicators (plus the expression PCA when profiles are given), and, for unseen drugs,
the nearest training drug by Tanimoto similarity and `similar_drugs`: the kernel-weighted mean of
other training drugs' responses on the same cell line, the kernel mixing shared targets, a shared
target pathway (the GDSC drug list's columns) and Tanimoto similarity, its weights chosen per seed
by inner cross-validation over the training pairs. The model is judged against the best of them
on per-drug Pearson, chosen per seed by an inner cross-validation over the training pairs
(grouped as the split groups them): model − that baseline per held-out drug, with a 95% interval.
The anchored head (the default) predicts that baseline plus a weighted model residual, the
model's training length and the weight chosen by a second inner cross-validation (weight 0: the
baseline itself); `--head plain` is the model alone, trained the full length.

The `expression` mode (chemCPA style) lives in celltron.finetune.drug.expression.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.utils import ModelOutput

from celltron.errors import ConfigError, InputError
from celltron.finetune.drug import intervals as drug_intervals
from celltron.finetune.drug.expression import run_drug_expression
from celltron.finetune.drug.features import compounds, fingerprints, informative_pathway, parse_targets, target_vectors
from celltron.finetune.drug.target_priors import coverage as target_prior_coverage
from celltron.finetune.drug.target_priors import read_target_priors
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
    run_folder,
    training_lengths,
)
from celltron.finetune.uncertainty import ENSEMBLE_SEED_STRIDE, conformal_scale, interval
from celltron.inputs import MissingInputError, existing
from celltron.io import write_file_atomically
from celltron.lab.data import read_configured_lab_data
from celltron.lab.embed import embed
from celltron.preprocessing import log_normalise
from celltron.training.examples import PredictAtSteps, train_task_model

log = logging.getLogger(__name__)
SPLITS = ("random", "cell_line", "drug")
DRUG_METRICS = ("pearson", "spearman", "rmse", "pearson_per_drug")
BASELINES = ("drug_mean", "cell_line_mean", "additive", "ridge", "nearest_drug", "similar_drugs")
HEADLINE = "pearson_per_drug"  # the model is judged against the best baseline on this
INNER_FOLDS = 3  # inner cross-validation over the training units: the best baseline, the anchor weight
PLAIN = "model_plain"  # the anchored head's model part alone
MIN_PAIRS_PER_DRUG = 10
# the drug list's columns the similar_drugs kernel reads, by the kernel part they feed
MECHANISM_COLUMNS = {"target": "Targets", "pathway": "Target pathway"}


# ---------------------------------------------------------------- data


def read_ic50(path) -> pd.DataFrame:
    """The GDSC table (rows `GDSC:<drug_id>`, columns cell lines, ln(IC50), NA where unmeasured)
    as long (drug, cell_line, ln_ic50) rows."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"--data {path}: no such file (a drugs x cell lines CSV of ln(IC50))")
    wide = pd.read_csv(path, index_col=0)
    long = wide.stack().rename("ln_ic50").reset_index()
    long.columns = ["drug", "cell_line", "ln_ic50"]
    if long.empty:
        raise InputError(f"{path}: no ln(IC50) values (expected drugs as rows, cell lines as columns)")
    return long


def read_drug_list(drug_list, columns=("drug_id", "PubCHEM")) -> pd.DataFrame:
    """The GDSC drug list (drug_id, Name, Synonyms, Targets, Target pathway, PubCHEM, ...), as text."""
    drugs = pd.read_csv(existing(drug_list, "GDSC drug list (--drug-list)"), dtype=str)
    for column in columns:
        if column not in drugs.columns:
            raise InputError(f"{drug_list}: no column {column!r}; expected the GDSC drug list (drug_id, Name, ..., PubCHEM)")
    return drugs


def read_drug_names(drug_list) -> dict[str, str]:
    """`GDSC:<drug_id>` -> the drug's name in the GDSC drug list (none without a Name column:
    compounds are then told apart by SMILES alone)."""
    drugs = read_drug_list(drug_list, ("drug_id",))
    if "Name" not in drugs.columns:
        return {}
    return {f"GDSC:{drug_id}": name for drug_id, name in zip(drugs.drug_id, drugs.Name.fillna(""))}


def read_similar_drugs(drug_list, compound_of: dict[str, str], kind: str, target_priors: list | None = None) -> SimilarDrugs:
    """What the similar_drugs baseline knows of each drug: its targets and target pathway from
    the GDSC drug list, its compound (features.compounds), and with `target_priors` (gene tables
    from target_priors.read_target_priors) its targets' prior vector, which adds PRIOR_GRID to
    the kernels. A list without the Targets or "Target pathway" column still runs, with a
    warning: kernels using the missing part leave the grid (fingerprints alone when both are
    missing)."""
    drugs = read_drug_list(drug_list, ("drug_id",))
    ids = [f"GDSC:{drug_id}" for drug_id in drugs.drug_id]
    missing = {part for part, column in MECHANISM_COLUMNS.items() if column not in drugs.columns}
    if missing:
        log.warning(
            "%s: no column %s: the similar_drugs baseline uses %s alone",
            drug_list,
            " nor ".join(repr(MECHANISM_COLUMNS[part]) for part in sorted(missing)),
            "fingerprints" if len(missing) == len(MECHANISM_COLUMNS) else "the other columns and fingerprints",
        )
    targets = {} if "target" in missing else dict(zip(ids, map(parse_targets, drugs[MECHANISM_COLUMNS["target"]])))
    pathways = {} if "pathway" in missing else dict(zip(ids, map(informative_pathway, drugs[MECHANISM_COLUMNS["pathway"]])))
    vectors = target_vectors(targets, target_priors or [])
    candidates = KERNEL_GRID + (PRIOR_GRID if vectors else ())
    grid = tuple(kernel for kernel in candidates if not any(getattr(kernel, part) for part in missing))
    return SimilarDrugs(targets, pathways, compound_of, kind=kind, grid=grid, target_vectors=vectors)


def read_smiles(drug_list, smiles_file) -> dict[str, str]:
    """`GDSC:<drug_id>` -> SMILES, joining the GDSC drug list (drug_id, PubCHEM) with a
    `PubChem CID<TAB>SMILES` file."""
    drugs = read_drug_list(drug_list)
    smiles_text = existing(smiles_file, "CID<TAB>SMILES file (--smiles)").read_text()
    smiles = dict(line.split("\t")[:2] for line in smiles_text.splitlines() if "\t" in line)
    out = {}
    for drug_id, cids in zip(drugs.drug_id, drugs.PubCHEM.fillna("")):
        found = next((smiles[c.strip()] for c in cids.split(",") if c.strip() in smiles), None)
        if found:
            out[f"GDSC:{drug_id}"] = found.strip()
    return out


def split_pairs(
    pairs: pd.DataFrame, kind: str, test_fraction: float, seed: int, compound_of: dict[str, str] | None = None
) -> np.ndarray:
    """Boolean test mask: random pairs, whole cell lines held out, or whole compounds held out
    (`compound_of`: drug id -> its compound, see features.compounds; without it each id is one)."""
    if kind not in SPLITS:
        raise ConfigError(f"--split {kind!r}: use one of {SPLITS}")
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random(len(pairs)) < test_fraction
    units = split_units(pairs, kind, compound_of)
    groups = np.array(sorted(units.unique()))
    held = set(rng.choice(groups, max(1, int(round(len(groups) * test_fraction))), replace=False))
    return units.isin(held).to_numpy()


def split_units(pairs: pd.DataFrame, kind: str, compound_of: dict[str, str] | None = None) -> pd.Series:
    """What a split of `kind` holds out whole, per pair: its cell line, its compound, or (random)
    the pair itself."""
    if kind == "cell_line":
        return pairs.cell_line
    if kind == "drug":
        return pairs.drug.map(lambda drug: (compound_of or {}).get(drug, drug))
    return pd.Series(np.arange(len(pairs)), index=pairs.index)


def inner_folds(train: pd.DataFrame, kind: str, folds: int, seed: int, compound_of: dict | None = None) -> list[np.ndarray]:
    """Boolean held-out masks of `folds` folds over the training pairs, grouped as the outer split
    groups them (whole compounds, cell lines, or pairs), so that a baseline is chosen on the kind
    of generalisation it is then tested on. Fewer than two groups: no folds."""
    units = split_units(train, kind, compound_of).to_numpy()
    groups = np.random.default_rng(seed).permutation(np.unique(units))
    folds = min(folds, len(groups))
    if folds < 2:
        return []
    fold_of = dict(zip(groups, np.arange(len(groups)) % folds))
    assigned = np.array([fold_of[u] for u in units])
    return [assigned == fold for fold in range(folds)]


# ---------------------------------------------------------------- cell-line expression


@dataclass
class CellLineExpression:
    """Expression profiles of cell lines, one row per cell line.

    Attributes:
        path: the file read.
        names: the cell-line id of each row.
        log_expression: (lines, genes) counts normalised to 10,000 per line, log1p'd.
        embeddings: (lines, hidden) the pretrained model's mean-pooled embedding of each
            profile; None without a model.
    """

    path: Path
    names: np.ndarray
    log_expression: np.ndarray
    embeddings: np.ndarray | None = None

    def usable(self) -> np.ndarray:
        """Cell lines the model can use (with a model: those with a gene it knows)."""
        if self.embeddings is None:
            return self.names
        return self.names[np.isfinite(self.embeddings).all(1)]

    def pca(self, train_lines, components: int) -> dict[str, np.ndarray]:
        """Every cell line's coordinates on the top principal components of the training lines
        (fitted on them alone, so held-out lines do not shape the features)."""
        rows = np.flatnonzero(np.isin(self.names, list(train_lines)))
        centre = self.log_expression[rows].mean(0)
        _, _, axes = np.linalg.svd(self.log_expression[rows] - centre, full_matrices=False)
        coordinates = (self.log_expression - centre) @ axes[:components].T
        return dict(zip(self.names, coordinates.astype(np.float32)))

    def features(self, train_lines, components: int) -> dict[str, np.ndarray]:
        """What the model sees of each cell line: its embedding, or its PCA without a model."""
        if self.embeddings is None:
            return self.pca(train_lines, components)
        keep = np.isfinite(self.embeddings).all(1)
        return dict(zip(self.names[keep], self.embeddings[keep]))


def read_cell_line_expression(config, model: str | None) -> CellLineExpression:
    """The `--expression` file (raw counts, one row per cell line, ids in obs names or the
    `--cell-line-key` column), embedded by `model` (mean pooling) when one is given."""
    section, data = config.drug, config.data
    key = section.cell_line_key
    lab = read_configured_lab_data(data, [key] if key else [], path=section.expression)
    names = (lab.obs[key] if key else pd.Series(lab.cell_names)).astype(str).to_numpy()
    repeated = sorted(set(names[pd.Series(names).duplicated().to_numpy()]))
    if repeated:
        where = f"obs[{key!r}]" if key else "obs names"
        raise InputError(
            f"{lab.path}: {len(repeated)} cell line(s) have more than one row in {where} (e.g. {repeated[:3]}); "
            "give one profile per cell line (sum or average the replicates first)"
        )
    embeddings = None
    if model:
        embeddings = embed(
            model,
            lab.path,
            pool="mean",
            input_layer=data.layer,
            gene_column=data.gene_column,
            species=data.species,
            min_mapped_fraction=data.min_mapped_fraction,
        )
    return CellLineExpression(lab.path, names, log_normalise(lab.counts).toarray().astype(np.float32), embeddings)


def keep_profiled(pairs: pd.DataFrame, expression: CellLineExpression, key: str) -> tuple[pd.DataFrame, list[str]]:
    """The pairs whose cell line has a usable profile, and the cell lines left out. Missing
    profiles are common (expression and drug screens cover different lines), so they are
    dropped with a warning; none at all matching means the ids are of another kind."""
    lines = np.array(sorted(pairs.cell_line.astype(str).unique()))
    missing = sorted(set(lines) - set(expression.usable()))
    if len(missing) == len(lines):
        where = f"obs[{key!r}]" if key else "obs names"
        raise InputError(
            f"{expression.path}: none of the IC50 table's {len(lines)} cell lines has a profile in its {where} "
            f"(table: {list(lines[:3])}; file: {list(expression.names[:3])}). Name the obs column that holds "
            "the table's cell-line ids with --cell-line-key"
        )
    if missing:
        log.warning(
            "%s: %d of %d cell lines of the IC50 table have no usable expression profile (e.g. %s); their pairs "
            "are left out and listed in metrics.json",
            expression.path,
            len(missing),
            len(lines),
            ", ".join(missing[:5]),
        )
    return pairs[~pairs.cell_line.isin(missing)].reset_index(drop=True), missing


# ---------------------------------------------------------------- metrics


def _pearson(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and np.std(a) > 1e-9 and np.std(b) > 1e-9 else float("nan")


def scored_drugs(drugs: np.ndarray) -> dict[str, np.ndarray]:
    """Drug -> the positions of its pairs, for drugs with at least MIN_PAIRS_PER_DRUG pairs (those
    pearson_per_drug averages over)."""
    positions = pd.Series(np.arange(len(drugs))).groupby(np.asarray(drugs, dtype=str)).indices
    return {drug: rows for drug, rows in sorted(positions.items()) if len(rows) >= MIN_PAIRS_PER_DRUG}


def pearson_of_each_drug(predicted: np.ndarray, truth: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Pearson between predicted and true ln(IC50) over each drug's pairs (`groups`: scored_drugs)."""
    return {drug: _pearson(predicted[rows], truth[rows]) for drug, rows in groups.items()}


def drug_response_metrics(predicted: np.ndarray, truth: np.ndarray, drugs: np.ndarray) -> dict:
    """Pearson, Spearman, RMSE over all held-out pairs; Pearson per drug averaged over drugs with
    at least MIN_PAIRS_PER_DRUG held-out pairs."""
    per_drug = pearson_of_each_drug(predicted, truth, scored_drugs(drugs))
    finite = [v for v in per_drug.values() if np.isfinite(v)]
    spearman = _pearson(pd.Series(predicted).rank().to_numpy(), pd.Series(truth).rank().to_numpy())
    return {
        "pearson": _pearson(predicted, truth),
        "spearman": spearman,
        "rmse": float(np.sqrt(np.mean((predicted - truth) ** 2))),
        "pearson_per_drug": float(np.mean(finite)) if finite else float("nan"),
        "per_drug": per_drug,
    }


def _per_drug_score(predicted: np.ndarray, truth: np.ndarray, drugs: np.ndarray) -> UnitScore:
    """HEADLINE (Pearson per drug, averaged) with the drug as the unit the weight rule resamples."""
    return UnitScore.of_units(list(pearson_of_each_drug(predicted, truth, scored_drugs(drugs)).values()))


# ---------------------------------------------------------------- baselines


def _means(train: pd.DataFrame, column: str) -> dict:
    return train.groupby(column)["ln_ic50"].mean().to_dict()


def baseline_predictions(
    train: pd.DataFrame,
    test: pd.DataFrame,
    prints: dict[str, np.ndarray],
    ridge: float = 10.0,
    profiles: dict[str, np.ndarray] | None = None,
    similar: SimilarDrugs | None = None,
) -> dict:
    """Every baseline's predictions of the test pairs; unseen drugs or cell lines fall back to
    the training mean of the other side (or the global mean). `profiles` (cell line -> its
    expression PCA) are extra ridge features. `similar`: what similar_drugs knows of the drugs
    (None: fingerprints alone, ids as compounds); without its kernel, the kernel is chosen on
    `train` alone (choose_kernel)."""
    overall = float(train.ln_ic50.mean())
    drug_mean, cell_mean = _means(train, "drug"), _means(train, "cell_line")
    d = test.drug.map(drug_mean).to_numpy(dtype=float)
    c = test.cell_line.map(cell_mean).to_numpy(dtype=float)
    out = {
        "drug_mean": np.where(np.isnan(d), np.where(np.isnan(c), overall, c), d),
        "cell_line_mean": _cell_line_mean(train, test),
    }
    out["additive"] = np.nan_to_num(d, nan=overall) + np.nan_to_num(c, nan=overall) - overall
    out["ridge"] = _ridge(train, test, prints, ridge, profiles)
    out["nearest_drug"] = _nearest_drug(train, test, prints, out["cell_line_mean"])
    similar = similar if similar is not None else SimilarDrugs()
    kernel = similar.kernel or choose_kernel(train, prints, similar)[0]
    out["similar_drugs"] = Borrowing(train, test, prints, similar).predict(kernel, out["cell_line_mean"])
    return out


def _cell_line_mean(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """The cell line's training mean (an unseen line: the drug's, else the global mean)."""
    overall = float(train.ln_ic50.mean())
    d = test.drug.map(_means(train, "drug")).to_numpy(dtype=float)
    c = test.cell_line.map(_means(train, "cell_line")).to_numpy(dtype=float)
    return np.where(np.isnan(c), np.where(np.isnan(d), overall, d), c)


def _ridge(
    train: pd.DataFrame, test: pd.DataFrame, prints: dict[str, np.ndarray], ridge: float, profiles: dict | None = None
) -> np.ndarray:
    """Ridge regression on [drug fingerprint, cell-line indicator (, cell-line expression PCA)]."""
    lines = {c: i for i, c in enumerate(sorted(train.cell_line.unique()))}

    def features(frame):
        fp = np.stack([prints[d] for d in frame.drug])
        onehot = np.zeros((len(frame), len(lines)), dtype=np.float32)
        known = frame.cell_line.map(lines)
        rows = np.flatnonzero(known.notna().to_numpy())
        onehot[rows, known.iloc[rows].astype(int).to_numpy()] = 1
        if profiles is None:
            return np.concatenate([fp, onehot], axis=1)
        return np.concatenate([fp, onehot, np.stack([profiles[c] for c in frame.cell_line])], axis=1)

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


# ---------------------------------------------------------------- similar drugs (unseen drugs)


@dataclass(frozen=True)
class Kernel:
    """The similar_drugs kernel between two drugs: (target x Jaccard of their targets + pathway x
    [same informative target pathway] + structure x Tanimoto of their fingerprints + prior x the
    cosine of their targets' knowledge-prior rows, floored at 0) ** sharpness.
    Only the weights' ratios matter (the kernel's scale cancels in the weighted mean); sharpness
    concentrates the weight on the most similar drugs (large: nearest-drug-like)."""

    target: float
    pathway: float
    structure: float
    sharpness: float
    prior: float = 0.0

    def label(self) -> str:
        text = f"target={self.target:g} pathway={self.pathway:g} structure={self.structure:g} sharpness={self.sharpness:g}"
        return f"{text} prior={self.prior:g}" if self.prior else text


# (target, pathway, structure): each part alone, each pair, all three; structure alone first, so
# that ties (e.g. no annotations at all) go to the fingerprint kernel nearest_drug also uses
KERNEL_MIXES = ((0, 0, 1), (1, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
KERNEL_SHARPNESS = (1, 4, 16)  # 16 on Tanimoto alone is close to the nearest drug
KERNEL_GRID = tuple(Kernel(*mix, sharpness) for mix in KERNEL_MIXES for sharpness in KERNEL_SHARPNESS)
# with target priors (drug.target_grn / drug.target_table): the prior alone and added to every mix,
# after the grid without it, so that a tie keeps the kernel without the prior
PRIOR_GRID = tuple(Kernel(*mix, sharpness, prior=1) for mix in ((0, 0, 0), *KERNEL_MIXES) for sharpness in KERNEL_SHARPNESS)


@dataclass(frozen=True)
class SimilarDrugs:
    """What the similar_drugs baseline knows of the drugs beyond fingerprints, and how it chooses
    its kernel.

    Attributes:
        targets: drug id -> its targets (features.parse_targets; no entry: none known).
        pathways: drug id -> its informative target pathway ("" or no entry: none).
        compound_of: drug id -> its compound (features.compounds; no entry: the id itself). A
            drug never borrows from its own compound: itself or a GDSC1/GDSC2 twin.
        kind, seed: the inner folds that choose the kernel are grouped as a split of this kind.
        kernel: the kernel to predict with; None: chosen on the training pairs given.
        grid: the kernels choose_kernel chooses among.
        target_vectors: drug id -> its targets' knowledge-prior vector (features.target_vectors;
            no entry: none), read by kernels with a `prior` part.
    """

    targets: dict = field(default_factory=dict)
    pathways: dict = field(default_factory=dict)
    compound_of: dict = field(default_factory=dict)
    kind: str = "drug"
    seed: int = 0
    kernel: Kernel | None = None
    grid: tuple = KERNEL_GRID
    target_vectors: dict = field(default_factory=dict)


def similarity_parts(drugs, others, prints, similar: SimilarDrugs) -> tuple[np.ndarray, ...]:
    """(target Jaccard, same informative pathway as 0/1, fingerprint Tanimoto, target-prior
    cosine floored at 0) of each of `drugs` (rows) to each of `others` (columns). Drugs without
    targets, pathway or a target-prior vector share none."""
    known = [similar.targets.get(d, frozenset()) for d in [*drugs, *others]]
    column_of = {target: i for i, target in enumerate(sorted(frozenset().union(*known)))}

    def target_bits(names) -> np.ndarray:
        bits = np.zeros((len(names), len(column_of)), dtype=np.float32)
        for row, drug in enumerate(names):
            bits[row, [column_of[t] for t in similar.targets.get(drug, ())]] = 1
        return bits

    jaccard = tanimoto(target_bits(drugs), target_bits(others))
    mine = np.array([similar.pathways.get(d, "") for d in drugs], dtype=object)[:, None]
    theirs = np.array([similar.pathways.get(d, "") for d in others], dtype=object)[None, :]
    pathway = ((mine == theirs) & (mine != "")).astype(np.float64)
    structure = tanimoto(np.stack([prints[d] for d in drugs]), np.stack([prints[d] for d in others]))
    return jaccard, pathway, structure, _prior_cosine(drugs, others, similar.target_vectors)


def _prior_cosine(drugs, others, vectors: dict) -> np.ndarray:
    """The dot product of the drugs' target-prior vectors (unit blocks: a cosine), floored at 0;
    0 where either drug has none."""
    if not vectors:
        return np.zeros((len(drugs), len(others)))
    width = len(next(iter(vectors.values())))

    def stacked(names) -> np.ndarray:
        return np.stack([vectors.get(d, np.zeros(width)) for d in names]) if len(names) else np.zeros((0, width))

    return np.clip(stacked(drugs) @ stacked(others).T, 0.0, None)


class Borrowing:
    """similar_drugs' prediction of the `test` pairs from the `train` pairs under any kernel: each
    test pair (d, c) gets the kernel-weighted mean of other training drugs' responses on c.

    Each neighbour's response enters relative to its own training mean, and the test drug's level
    is the kernel-weighted mean of those means: where every neighbour was measured on c this is
    the plain weighted mean, but GDSC leaves ~20% of pairs unmeasured, and without centring a
    neighbour missing on some lines would move the prediction across lines by its own level.
    Everything but the kernel is computed once, so that a grid of kernels costs little.
    """

    def __init__(self, train: pd.DataFrame, test: pd.DataFrame, prints: dict, similar: SimilarDrugs):
        wide = train.pivot_table(index="drug", columns="cell_line", values="ln_ic50", aggfunc="mean")
        values = wide.to_numpy(dtype=np.float64)
        self.measured = np.isfinite(values).astype(np.float64)
        self.levels = np.nanmean(values, axis=1)
        self.residuals = np.nan_to_num(values - self.levels[:, None])
        drugs = sorted(test.drug.unique())
        self.parts = similarity_parts(drugs, list(wide.index), prints, similar)
        compound = np.vectorize(lambda d: similar.compound_of.get(d, d), otypes=[object])
        self.same_compound = (
            compound(np.array(drugs, dtype=object))[:, None] == compound(wide.index.to_numpy(dtype=object))[None, :]
        )
        self.rows = test.drug.map({d: i for i, d in enumerate(drugs)}).to_numpy()
        lines = {c: j for j, c in enumerate(wide.columns)}
        self.columns = test.cell_line.map(lines).fillna(-1).astype(int).to_numpy()  # -1: a line no training drug saw

    def weights(self, kernel: Kernel) -> np.ndarray:
        """(test drugs, training drugs) kernel weights; zero on the drug's own compound."""
        jaccard, pathway, structure, prior = self.parts
        mixed = kernel.target * jaccard + kernel.pathway * pathway + kernel.structure * structure
        if kernel.prior:
            mixed = mixed + kernel.prior * prior
        weights = mixed**kernel.sharpness
        weights[self.same_compound] = 0.0
        return weights

    def predict(self, kernel: Kernel, fallback: np.ndarray) -> np.ndarray:
        """The test pairs' predictions; `fallback` (the cell-line mean) where no similar drug was
        measured on the pair's cell line (zero kernel mass there)."""
        weights = self.weights(kernel)
        rows, columns = self.rows, np.maximum(self.columns, 0)
        mass = (weights @ self.measured)[rows, columns]
        borrowed = (weights @ self.residuals)[rows, columns]
        total = weights.sum(1)
        level = (weights @ self.levels / np.where(total > 0, total, 1.0))[rows]
        found = (self.columns >= 0) & (mass > 1e-12)
        return np.where(found, borrowed / np.where(found, mass, 1.0) + level, fallback)


def choose_kernel(train: pd.DataFrame, prints: dict, similar: SimilarDrugs) -> tuple[Kernel, dict]:
    """similar_drugs' kernel, by inner cross-validation over the training pairs alone, grouped as
    the outer split (inner_folds): each kernel of the grid predicts each inner fold's held-out
    pairs from the others; the best mean HEADLINE over folds wins (ties: the first in the grid).

    Returns:
        (the kernel, {"kernel": its weights, "score": its inner score, "scores": every kernel's
        by label, "inner_folds": n}) — the record metrics.json keeps per seed.
    """
    masks = inner_folds(train, similar.kind, INNER_FOLDS, similar.seed, similar.compound_of)
    per_fold = {kernel: [] for kernel in similar.grid}
    for held in masks:
        inner_train, inner_test = train[~held], train[held]
        borrowing = Borrowing(inner_train, inner_test, prints, similar)
        fallback = _cell_line_mean(inner_train, inner_test)
        # HEADLINE, pearson_per_drug, with the pairs grouped by drug once for the whole grid
        truth, groups = inner_test.ln_ic50.to_numpy(), scored_drugs(inner_test.drug.to_numpy())
        for kernel in similar.grid:
            per_drug = pearson_of_each_drug(borrowing.predict(kernel, fallback), truth, groups)
            per_fold[kernel].append(finite_mean(per_drug.values()))
    scores = {kernel.label(): finite_mean(values) for kernel, values in per_fold.items()}
    label = choose_best(scores, higher_is_better=True)
    kernel = next(k for k in similar.grid if k.label() == label)
    return kernel, {"kernel": asdict(kernel), "score": scores[label], "scores": scores, "inner_folds": len(masks)}


def choose_baseline(
    train: pd.DataFrame,
    prints: dict[str, np.ndarray],
    kind: str,
    seed: int,
    compound_of: dict | None = None,
    profiles_for=None,
    folds: int = INNER_FOLDS,
    similar: SimilarDrugs | None = None,
) -> dict:
    """The best baseline on the training pairs alone: every baseline's HEADLINE score averaged over
    an inner cross-validation grouped as the outer split (see inner_folds); test pairs never enter.

    Args:
        kind: the outer split's kind. profiles_for: training cell lines -> their expression PCA
            (fitted on those lines), or None without profiles. similar: what similar_drugs knows
            of the drugs; its kernel is chosen afresh on each inner fold's training pairs (a
            kernel chosen on all of `train` has seen the inner held-out pairs).

    Returns:
        {"name": the best baseline, "score": its inner score, "scores": every baseline's, "inner_folds": n}.
    """
    per_fold = {name: [] for name in BASELINES}
    masks = inner_folds(train, kind, folds, seed, compound_of)
    similar = _unchosen(similar, kind, seed, compound_of)
    for held in masks:
        inner_train, inner_test = train[~held], train[held]
        profiles = profiles_for(inner_train.cell_line.unique()) if profiles_for else None
        predictions = baseline_predictions(inner_train, inner_test, prints, profiles=profiles, similar=similar)
        truth, drugs = inner_test.ln_ic50.to_numpy(), inner_test.drug.to_numpy()
        for name in BASELINES:
            per_fold[name].append(drug_response_metrics(predictions[name], truth, drugs)[HEADLINE])
    scores = {name: finite_mean(values) for name, values in per_fold.items()}
    name = choose_best(scores, higher_is_better=True)
    return {"name": name, "score": scores[name], "scores": scores, "inner_folds": len(masks)}


def _unchosen(similar: SimilarDrugs | None, kind: str, seed: int, compound_of: dict | None) -> SimilarDrugs:
    """`similar` for inner folds of a split of `kind`: its kernel left to be chosen on each fold's
    training pairs (None: fingerprints alone, with `compound_of`)."""
    similar = similar if similar is not None else SimilarDrugs(compound_of=compound_of or {})
    return replace(similar, kind=kind, seed=seed, kernel=None)


def choose_weight(
    config,
    train: pd.DataFrame,
    prints: dict,
    seed: int,
    out: Path,
    compound_of: dict | None = None,
    expression=None,
    similar: SimilarDrugs | None = None,
    inner_baselines: list | None = None,
) -> dict:
    """The anchored head's learning rate, training length and residual weight, by inner cross-
    validation over the training pairs (the folds choose_baseline uses): in each inner fold a
    baseline is chosen and one model per learning rate (drug.learning_rates; optim.lr when empty)
    trained on the inner training pairs alone (the outer choice saw the inner held-out pairs),
    its predictions taken after each of drug.step_fractions of trainer.max_steps. The setting is
    the one whose model alone scores best on HEADLINE over the inner held-out pairs (mean over
    folds); the weight, by `report.earned_weight` on the blends at that setting (the smallest
    unless a larger one gains beyond the interval over resampled inner held-out drugs). Ties, or
    no score at all, go to the first learning rate listed, the shorter length and the smaller
    weight (the baseline's side). Every process computes the same choice from the same models.

    Returns:
        {"learning_rate", "steps", "setting_scores": {"lr=..,steps=..": the model's inner score},
        "weight", "weight_scores": {str(weight): the blend's inner score at that setting},
        "gain_low": {str(weight): the lower bound of its gain over the smallest}}.
        `inner_baselines` (a list) receives each inner fold's chosen-baseline predictions of its
        held-out pairs, in fold order (the model's intervals are anchored on them).
    """
    section, kind = config.drug, config.drug.split_kind()
    profiles_for = None if expression is None else partial(expression.pca, components=section.pca_components)
    rates = learning_rates(section, config.optim)
    scores = InnerScores(rates, training_lengths(section, config.trainer.max_steps), section.anchor_weights, seed)
    similar = _unchosen(similar, kind, seed, compound_of)
    for j, held in enumerate(inner_folds(train, kind, INNER_FOLDS, seed, compound_of)):
        inner_train, inner_test = train[~held], train[held]
        chosen = choose_baseline(inner_train, prints, kind, seed, compound_of, profiles_for, similar=similar)["name"]
        profiles = profiles_for(inner_train.cell_line.unique()) if profiles_for else None
        baseline = baseline_predictions(inner_train, inner_test, prints, profiles=profiles, similar=similar)[chosen]
        if inner_baselines is not None:
            inner_baselines.append(baseline)
        truth, drugs = inner_test.ln_ic50.to_numpy(), inner_test.drug.to_numpy()
        for lr in rates:
            folder = run_folder(out / f"inner{j}", lr, rates)
            by_length, _ = _model_predictions(
                at_learning_rate(config, lr), inner_train, inner_test, prints, folder, seed, expression, scores.lengths
            )
            scores.add(lr, by_length, baseline, lambda predicted: _per_drug_score(predicted, truth, drugs))
    return scores.choose()


# ---------------------------------------------------------------- model


@dataclass
class DrugResponseOutput(ModelOutput):
    loss: torch.Tensor | None = None
    predicted: torch.Tensor | None = None


class DrugResponseModel(nn.Module):
    """ln(IC50) from a cell-line representation and a drug representation (fingerprint MLP plus
    a learned embedding), through an MLP, plus drug biases initialised at their training means.
    A cell line is a learned embedding with a bias at its training mean, or, given
    `cell_features`, its (frozen) feature row through an MLP, with no per-line parameters, so
    that seen and unseen lines are treated alike. Unseen drugs or cell lines use index 0, a
    learned 'unknown' row.

    Args:
        fingerprints: (drugs + 1, bits) fingerprint of each drug index (row 0: unknown, zeros).
        n_cell_lines: cell lines with an index (+1 for unknown).
        hidden: width of the embeddings and the MLP.
        cell_features: (n_cell_lines, features) each cell line's expression features (row 0:
            unknown), or None for learned cell-line embeddings.
    """

    def __init__(
        self,
        fingerprints: np.ndarray,
        n_cell_lines: int,
        hidden: int = 128,
        dropout: float = 0.1,
        drug_bias=None,
        cell_bias=None,
        cell_features: np.ndarray | None = None,
    ):
        super().__init__()
        self.register_buffer("fingerprints", torch.as_tensor(fingerprints, dtype=torch.float32))
        self.drugs = nn.Embedding(len(fingerprints), hidden)
        self.chemistry = nn.Sequential(
            nn.Linear(fingerprints.shape[1], hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.drug_bias = nn.Parameter(
            torch.as_tensor(drug_bias if drug_bias is not None else np.zeros(len(fingerprints)), dtype=torch.float32)
        )
        nn.init.normal_(self.drugs.weight, std=0.02)
        if cell_features is None:
            self.cell_features = None
            self.cell_lines = nn.Embedding(n_cell_lines, hidden)
            nn.init.normal_(self.cell_lines.weight, std=0.02)
            self.cell_bias = nn.Parameter(
                torch.as_tensor(cell_bias if cell_bias is not None else np.zeros(n_cell_lines), dtype=torch.float32)
            )
        else:
            self.register_buffer("cell_features", torch.as_tensor(cell_features, dtype=torch.float32))
            self.cell_lines = nn.Sequential(
                nn.Linear(cell_features.shape[1], hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
            )
            self.cell_bias = None

    def forward(self, drug, cell_line, target=None, **unused) -> DrugResponseOutput:
        drug_vector = self.chemistry(self.fingerprints[drug]) + self.drugs(drug)
        if self.cell_features is None:
            cell_vector, cell_bias = self.cell_lines(cell_line), self.cell_bias[cell_line]
        else:
            cell_vector, cell_bias = self.cell_lines(self.cell_features[cell_line]), 0.0
        joint = torch.cat([drug_vector, cell_vector], dim=-1)
        predicted = self.head(joint).squeeze(-1) + self.drug_bias[drug] + cell_bias
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


def _feature_matrix(features: dict[str, np.ndarray], train_lines) -> tuple[dict, np.ndarray]:
    """Cell-line index over every line with features (0: none) and the (lines + 1, features)
    matrix, each column standardised on the training lines: frozen embeddings of different
    lines differ by small amounts along many directions, which an MLP sees better at unit scale."""
    lines = sorted(features)
    matrix = np.stack([features[c] for c in lines]).astype(np.float64)
    trained = matrix[np.isin(lines, list(train_lines))]
    spread = trained.std(0)
    matrix = (matrix - trained.mean(0)) / np.maximum(spread, 1e-3 * spread.max() + 1e-12)
    return {c: i + 1 for i, c in enumerate(lines)}, np.concatenate([np.zeros((1, matrix.shape[1])), matrix]).astype(np.float32)


def _fit_model(config, train: pd.DataFrame, prints: dict, out: Path, seed: int, features: dict | None = None, on_indices=None):
    """Train the model on the training pairs; `features` (cell line -> expression features)
    replace the learned cell-line embeddings; `on_indices(drug index, cell index)` gives the
    extra Lightning callbacks once the indices are known. Returns ((model, drug index, cell
    index), whether this process is the first); every process gets the same model."""
    import lightning.pytorch as pl

    drugs = sorted(prints)
    drug_index, cell_index = _indices(train, drugs)
    overall = float(train.ln_ic50.mean())
    drug_mean, cell_mean = _means(train, "drug"), _means(train, "cell_line")
    matrix = np.zeros((len(drugs) + 1, len(next(iter(prints.values())))), dtype=np.float32)
    matrix[1:] = np.stack([prints[d] for d in drugs])
    drug_bias = np.array([overall] + [drug_mean.get(d, overall) for d in drugs])
    cell_bias = np.array([0.0] + [cell_mean[c] - overall for c in sorted(cell_index, key=cell_index.get)])
    cell_matrix = None
    if features is not None:
        cell_index, cell_matrix = _feature_matrix(features, cell_index)
    pl.seed_everything(config.trainer.seed + seed, workers=True, verbose=False)
    model = DrugResponseModel(
        matrix, len(cell_index) + 1, config.drug.hidden, drug_bias=drug_bias, cell_bias=cell_bias, cell_features=cell_matrix
    )
    dataset = Pairs(train.drug.map(drug_index).to_numpy(), train.cell_line.map(cell_index).to_numpy(), train.ln_ic50.to_numpy())
    callbacks = on_indices(drug_index, cell_index) if on_indices else None
    model, first = train_task_model(config, model, dataset, collate_pairs, out, seed, callbacks=callbacks)
    return (model, drug_index, cell_index), first


def _model_predictions(
    config, train, test, prints, out: Path, seed: int, expression=None, lengths: tuple[int, ...] = (), passes: int = 0
) -> tuple[dict[int, np.ndarray], bool]:
    """Train the model on `train` and predict `test` (cell-line features, when profiles are
    given, made from `train`'s lines): ({steps: predictions} after each of `lengths` (the full
    trainer.max_steps always), whether this process is the first). `passes` > 0: each value is
    (predictions, (passes, pairs) predictions with dropout on) instead (MC dropout)."""
    lines = train.cell_line.unique()
    features = expression.features(lines, config.drug.pca_components) if expression is not None else None
    full = config.trainer.max_steps
    shorter = sorted(steps for steps in set(lengths) if steps < full)
    snapshots = []

    def predict(fitted):
        return _predict_with_passes(fitted, test, passes, seed) if passes else _predict(fitted, test)

    def predict_at(drug_index, cell_index):
        snapshots.append(PredictAtSteps(shorter, lambda model: predict((model, drug_index, cell_index))))
        return snapshots

    fitted, first = _fit_model(config, train, prints, out, seed, features, on_indices=predict_at if shorter else None)
    by_length = dict(snapshots[0].predictions) if snapshots else {}
    missing = [steps for steps in shorter if steps not in by_length]
    if missing:
        raise InputError(
            f"{out}: no predictions after step(s) {missing}: the run resumed past them or stopped before; "
            "delete the folder's checkpoints and run again"
        )
    return {**by_length, full: predict(fitted)}, first


@torch.no_grad()
def _predict(fitted, test: pd.DataFrame, dropout: bool = False) -> np.ndarray:
    model, drug_index, cell_index = fitted
    model.train(dropout)
    device = model.fingerprints.device
    drug = torch.as_tensor(test.drug.map(drug_index).fillna(0).astype(int).to_numpy(), device=device)
    cell = torch.as_tensor(test.cell_line.map(cell_index).fillna(0).astype(int).to_numpy(), device=device)
    batches = zip(drug.split(4096), cell.split(4096))
    predicted = torch.cat([model(drug=d, cell_line=c).predicted.float() for d, c in batches]).cpu().numpy()
    model.eval()
    return predicted


def _predict_with_passes(fitted, test: pd.DataFrame, passes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The prediction (dropout off) and `passes` predictions with dropout on, seeded without
    touching the global random state (training continues after a snapshot)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampled = np.stack([_predict(fitted, test, dropout=True) for _ in range(passes)])
    return _predict(fitted, test), sampled


def _model_spread(config, train, test, prints, out: Path, seed: int, expression, steps: int, main=None):
    """The plain model's prediction on `test` after `steps` (trained as the reported model is:
    the full length, predictions taken on the way) and its relative spread (`relative_spread`),
    as drug.intervals says: mc_dropout (one model, drug.dropout_passes predictions with dropout
    on) or ensemble (drug.ensemble_members models from different seeds; `main`, the prediction
    of the model already trained with `seed` on test then train pairs, is the first member).
    Returns (prediction, relative spread, spread, first)."""
    section, scored = config.drug, pd.concat([test, train])
    if section.intervals == "mc_dropout":
        passes = section.dropout_passes
        by_length, first = _model_predictions(config, train, scored, prints, out, seed, expression, (steps,), passes)
        centre, sampled = by_length[steps]
        spread = sampled.std(0, ddof=1)
        return centre[: len(test)], relative_spread(spread, len(test)), spread[: len(test)], first
    members, first = [] if main is None else [main], True
    for k in range(len(members), section.ensemble_members):
        member_seed = seed + ENSEMBLE_SEED_STRIDE * k
        by_length, first = _model_predictions(
            config, train, scored, prints, out / f"member{k}", member_seed, expression, (steps,)
        )
        members.append(by_length[steps])
    stacked = np.stack(members)
    spread = stacked.std(0, ddof=1)
    return stacked[0, : len(test)], relative_spread(spread, len(test)), spread[: len(test)], first


def relative_spread(spread: np.ndarray, n_test: int) -> np.ndarray:
    """The first `n_test` spreads (held-out pairs) over the mean spread of the rest (the model's
    own training pairs). MC-dropout spreads differ in size from one trained model to the next
    (3x between an outer and an inner model on simulated pairs), so raw spreads calibrated on the
    inner models' would not transfer; in units of each model's spread on its training pairs they
    do, and a pair unlike the training ones keeps its larger relative spread."""
    unit = float(np.mean(spread[n_test:])) if len(spread) > n_test else float(np.mean(spread))
    return spread[:n_test] / max(unit, 1e-12)


def _read_inputs(config, model: str | None):
    """The IC50 pairs of drugs with fingerprints (and cell lines with profiles), the
    fingerprints, each drug's compound, the cell-line expression (or None) and what was left out."""
    section = config.drug
    for name in ("drug_list", "smiles"):
        if not getattr(section, name):
            raise ConfigError(
                f"drug.{name} is not set: pass --drug-list and --smiles (the GDSC drug list and a CID<TAB>SMILES file)"
            )
    pairs = read_ic50(config.data.path)
    smiles = read_smiles(section.drug_list, section.smiles)
    prints = fingerprints(smiles)
    compound_of = compounds({drug: smiles[drug] for drug in prints}, read_drug_names(section.drug_list))
    left_out = {"drugs_without_smiles": sorted(set(pairs.drug) - set(prints))}
    if left_out["drugs_without_smiles"]:
        log.warning(
            "%d of %d drugs have no parsable SMILES and are left out", len(left_out["drugs_without_smiles"]), pairs.drug.nunique()
        )
    pairs = pairs[pairs.drug.isin(prints)].reset_index(drop=True)
    expression = read_cell_line_expression(config, model) if section.expression else None
    if expression is not None:
        before = len(pairs)
        pairs, missing = keep_profiled(pairs, expression, section.cell_line_key)
        left_out["cell_lines_without_expression"] = {"count": len(missing), "pairs": before - len(pairs), "cell_lines": missing}
    return pairs, prints, compound_of, expression, left_out


def _twins(drugs, compound_of: dict[str, str]) -> dict[str, list[str]]:
    """Compounds listed under several of `drugs`' ids: {compound: its ids}."""
    ids: dict[str, list[str]] = {}
    for drug in sorted(drugs):
        ids.setdefault(compound_of[drug], []).append(drug)
    return {compound: members for compound, members in ids.items() if len(members) > 1}


def _method(expression: CellLineExpression | None) -> str:
    if expression is None:
        return "matrix_completion"
    return "expression_embedding" if expression.embeddings is not None else "expression_pca"


def run_drug_response(config, out, baselines_only: bool = False, model: str | None = None) -> dict | None:
    """The drug-response task end to end; `mode: expression` goes to
    celltron.finetune.drug.expression. ic50 mode: splits per seed, baselines, the model,
    metrics.json, predictions.csv, a printed table and a plot under `out`. With
    `drug.expression`, cell lines are their profiles (embedded by `model` when given). The
    anchored head (`drug.head`) adds choose_weight's inner models: INNER_FOLDS + 1 fits per seed."""
    model_intervals = _model_interval_kind(config.drug, baselines_only)  # refused before any work
    if config.drug.mode == "expression":
        return _run_expression_mode(config, model, out, baselines_only)
    section, out = config.drug, Path(out)
    if model and not section.expression:
        log.warning("--model %s is not used: in ic50 mode the model embeds cell-line profiles, given with --expression", model)
    prior_tables, prior_records = read_target_priors(section)  # before the heavy inputs: a bad path fails first
    pairs, prints, compound_of, expression, left_out = _read_inputs(config, None if baselines_only else model)
    similar = read_similar_drugs(section.drug_list, compound_of, section.split_kind(), prior_tables)
    model_runs, plain_runs, baseline_runs, splits, rows, first = {}, {}, {n: {} for n in BASELINES}, {}, [], True
    widths = {}  # seed -> the best baseline's interval half-width (split conformal on inner folds)
    scales = {}  # seed -> the model's interval calibration (drug.intervals)
    best = {}  # seed -> the baseline chosen on its training pairs
    # inner folds refit the expression PCA on their own training lines, as the outer split does
    profiles_for = None if expression is None else partial(expression.pca, components=section.pca_components)
    for seed in section.seeds:
        test_mask = split_pairs(pairs, section.split_kind(), section.test_fraction, seed, compound_of)
        train, test = pairs[~test_mask], pairs[test_mask]
        splits[str(seed)] = {
            "train_pairs": int(len(train)),
            "test_pairs": int(len(test)),
            "test_drugs": int(test.drug.nunique()),
            "test_compounds": int(test.drug.map(compound_of).nunique()),
            "test_cell_lines": int(test.cell_line.nunique()),
        }
        lines = train.cell_line.unique()
        profiles = expression.pca(lines, section.pca_components) if expression is not None else None
        # similar_drugs' kernel, chosen on the training pairs alone, is recorded beside the best baseline
        kernel, kernel_choice = choose_kernel(train, prints, replace(similar, seed=seed))
        chosen_similar = replace(similar, seed=seed, kernel=kernel)
        predictions = baseline_predictions(train, test, prints, profiles=profiles, similar=chosen_similar)
        best[seed] = choose_baseline(train, prints, section.split_kind(), seed, compound_of, profiles_for, similar=similar)
        best[seed]["similar_drugs"] = kernel_choice
        predictions["best_baseline"] = predictions[best[seed]["name"]]
        ood, bounds_of_model = pd.DataFrame(index=test.index), {}
        if section.interval_level > 0:
            widths[str(seed)] = _interval_width(
                train, prints, best[seed]["name"], seed, compound_of, profiles_for, similar, section
            )
            ood = _ood_columns(train, test, prints, compound_of, profiles_for, section.interval_level, seed)
        for name in BASELINES:
            baseline_runs[name][seed] = drug_response_metrics(predictions[name], test.ln_ic50.to_numpy(), test.drug.to_numpy())
        if not baselines_only:
            where = out / f"seed{seed}"
            # the plain head: the model's residual whole, trained the full length at optim.lr
            choice = {"learning_rate": config.optim.lr, "steps": config.trainer.max_steps, "weight": 1.0}
            inner_baselines = []  # the anchored head's inner folds' baselines, for its intervals
            if section.head == "anchored":
                choice = choose_weight(config, train, prints, seed, where, compound_of, expression, similar, inner_baselines)
                best[seed].update(choice)
            at_lr = at_learning_rate(config, choice["learning_rate"])
            passes = section.dropout_passes if model_intervals == "mc_dropout" else 0
            # with the model's intervals the training pairs are predicted too: its spread there is their unit
            scored, steps = (pd.concat([test, train]) if model_intervals != "none" else test), (choice["steps"],)
            by_length, first_process = _model_predictions(at_lr, train, scored, prints, where, seed, expression, steps, passes)
            if not first_process:
                first = False
                continue
            outcome, weight = by_length[choice["steps"]], choice["weight"]
            plain_all, sampled = outcome if passes else (outcome, None)
            plain = plain_all[: len(test)]
            truth, drugs = test.ln_ic50.to_numpy(), test.drug.to_numpy()
            predictions["model"] = anchor(predictions[best[seed]["name"]], plain, weight) if section.head == "anchored" else plain
            if model_intervals != "none":
                bounds_of_model, scales[str(seed)] = _model_bounds(
                    config,
                    train,
                    test,
                    prints,
                    where,
                    seed,
                    expression,
                    choice,
                    predictions,
                    (plain_all, sampled),
                    widths[str(seed)],
                    compound_of,
                    inner_baselines,
                )
            model_runs[seed] = drug_response_metrics(predictions["model"], truth, drugs)
            if section.head == "anchored":
                predictions[PLAIN] = plain
                plain_runs[seed] = drug_response_metrics(plain, truth, drugs)
        bounds = {}
        if section.interval_level > 0:
            bounds = {
                "best_baseline_low": predictions["best_baseline"] - widths[str(seed)],
                "best_baseline_high": predictions["best_baseline"] + widths[str(seed)],
                **bounds_of_model,
            }
        rows.append(
            pd.concat([test.assign(seed=seed, **{f"pred_{k}": v for k, v in predictions.items()}, **bounds), ood], axis=1)
        )
    if not first:
        return None
    table = pd.concat(rows)
    reported = "pred_model" if model_runs else "pred_best_baseline"
    metrics = {
        "task": "drug_response",
        "mode": section.mode,
        "data": str(config.data.path),
        "expression": str(expression.path) if expression is not None else None,
        "method": None if baselines_only else _method(expression),
        "head": None if baselines_only else section.head,
        "model": aggregate(model_runs, DRUG_METRICS, "per_drug") if model_runs else None,
        "model_plain": aggregate(plain_runs, DRUG_METRICS, "per_drug") if plain_runs else None,
        "baselines": {name: aggregate(baseline_runs[name], DRUG_METRICS, "per_drug") for name in BASELINES},
        "best_baseline": {
            "metric": HEADLINE,
            "chosen_on": chosen_on(section.split_kind()),
            "per_seed": {str(seed): choice for seed, choice in best.items()},
        },
        "paired": paired_over_drugs(model_runs, baseline_runs, best) if model_runs else None,
        "split": {
            "kind": section.split_kind(),
            "test_fraction": section.test_fraction,
            "per_seed": splits,
            # ids of one compound (same canonical SMILES or name) never straddle a drug split
            "compound_twins": _twins(pairs.drug.unique(), compound_of),
        },
        "seeds": list(section.seeds),
        "uncertainty": drug_intervals.summary(table, section.split_kind(), section.interval_level, widths, reported)
        if section.interval_level > 0
        else None,
        "model_uncertainty": drug_intervals.model_summary(table, section.interval_level, model_intervals, scales)
        if scales
        else None,
        **left_out,
    }
    if prior_records:
        reach = target_prior_coverage(similar.targets, similar.target_vectors, prior_tables)
        metrics["target_priors"] = {"priors": prior_records, **reach, "kernels": len(similar.grid)}
    if expression is not None:
        metrics["notes"] = {
            "ridge": f"features: fingerprint, cell-line indicator and the top {section.pca_components} principal "
            "components of the cell lines' log-normalised expression, fitted on each split's training lines"
        }
    return _write_results(out, metrics, table)


def _model_interval_kind(section, baselines_only: bool) -> str:
    """drug.intervals, checked: the model's intervals need a model and interval_level > 0."""
    if section.intervals == "none":
        return "none"
    if section.mode != "ic50":
        raise ConfigError(
            f"drug.intervals {section.intervals}: the model's intervals are built in ic50 mode only; set it to none"
        )
    if baselines_only:
        raise ConfigError(
            f"drug.intervals {section.intervals} gives the model's intervals, and --baselines-only trains none; drop one "
            "(the best baseline's intervals come with drug.interval_level alone)"
        )
    if section.interval_level <= 0:
        raise ConfigError(f"drug.intervals {section.intervals} needs drug.interval_level above 0 (e.g. 0.9)")
    return section.intervals


def _model_bounds(
    config,
    train,
    test,
    prints,
    where: Path,
    seed: int,
    expression,
    choice: dict,
    predictions: dict,
    outer: tuple,
    baseline_width: float,
    compound_of,
    inner_baselines: list,
) -> tuple[dict, dict]:
    """The reported model's interval on every held-out pair ({model_spread, model_low,
    model_high}) and its calibration record (drug.intervals; see DrugSection)."""
    section = config.drug
    weight = choice["weight"] if section.head == "anchored" else 1.0
    centre = predictions["model"]
    if weight == 0:  # the anchored model is the best baseline, bit for bit: its interval too
        spread = np.zeros(len(test))
        record = {"weight": 0.0, "scale": None, "width": baseline_width, "inner_pairs": 0}
        bounds = {"model_spread": spread, "model_spread_raw": spread, "model_low": centre - baseline_width}
        return {**bounds, "model_high": centre + baseline_width}, record
    at_lr = at_learning_rate(config, choice["learning_rate"])
    plain_all, sampled = outer  # the outer model's predictions of test then train pairs (and its dropout passes)
    if sampled is not None:
        raw = sampled.std(0, ddof=1)
        spread, raw = relative_spread(raw, len(test)), raw[: len(test)]
    else:
        members = where / "ensemble"
        _, spread, raw, _ = _model_spread(at_lr, train, test, prints, members, seed, expression, choice["steps"], plain_all)
    scale, reference, n = _model_calibration(
        at_lr, train, prints, where, seed, expression, choice, weight, compound_of, inner_baselines
    )
    low, high = interval(centre, weight * spread, scale, reference)
    record = {"weight": weight, "scale": scale, "reference_spread": reference, "inner_pairs": n}
    bounds = {"model_spread": weight * spread, "model_spread_raw": weight * raw, "model_low": low, "model_high": high}
    return bounds, record


def _model_calibration(
    config, train, prints, where: Path, seed: int, expression, choice: dict, weight: float, compound_of, inner_baselines: list
):
    """The model interval's conformal scale: on each inner fold over the training pairs (grouped
    as the split, the folds `choose_weight` used) the model at the chosen setting (`config` at
    its learning rate) is refitted on the inner training pairs and, anchored, blended with that
    fold's chosen baseline (`inner_baselines`, as `choose_weight` predicted it); |truth − centre|
    / spread of the inner held-out pairs gives the level-quantile. Returns (scale, the inner
    spreads' mean, inner pairs)."""
    section = config.drug
    truth, centre, spread = [], [], []
    for j, held in enumerate(inner_folds(train, section.split_kind(), INNER_FOLDS, seed, compound_of)):
        inner_train, inner_test = train[~held], train[held]
        plain, inner_spread, _, _ = _model_spread(
            config, inner_train, inner_test, prints, where / f"interval_inner{j}", seed, expression, choice["steps"]
        )
        truth.append(inner_test.ln_ic50.to_numpy())
        centre.append(anchor(inner_baselines[j], plain, weight) if section.head == "anchored" else plain)
        spread.append(weight * inner_spread)
    truth, centre, spread = (np.concatenate(a) for a in (truth, centre, spread))
    return conformal_scale(truth, centre, spread, section.interval_level), float(np.mean(spread)), int(len(truth))


def _interval_width(train, prints, name: str, seed: int, compound_of, profiles_for, similar, section) -> float:
    """The chosen baseline's interval half-width: the split-conformal quantile of its absolute
    errors on inner folds over the training pairs (grouped as the split), refitted per fold."""
    inner = []
    unchosen = _unchosen(similar, section.split_kind(), seed, compound_of)
    for held in inner_folds(train, section.split_kind(), INNER_FOLDS, seed, compound_of):
        inner_train, inner_test = train[~held], train[held]
        profiles = profiles_for(inner_train.cell_line.unique()) if profiles_for else None
        predicted = baseline_predictions(inner_train, inner_test, prints, profiles=profiles, similar=unchosen)[name]
        inner.append((inner_test.ln_ic50.to_numpy(), predicted))
    return drug_intervals.conformal_width(inner, section.interval_level) if inner else float("nan")


def _ood_columns(train, test, prints, compound_of, profiles_for, level: float, seed: int) -> pd.DataFrame:
    """Each held-out pair's drug and cell-line OOD distances and scores, and its flag."""
    ood = pd.concat(
        [
            drug_intervals.drug_ood(train, test, prints, compound_of, level),
            drug_intervals.cell_line_ood(train, test, profiles_for, seed),
        ],
        axis=1,
    )
    return ood.assign(ood_flagged=drug_intervals.flag(ood, level))


def _run_expression_mode(config, model: str | None, out, baselines_only: bool) -> dict | None:
    """Expression mode (celltron.finetune.drug.expression): its own baselines, best-baseline
    choice, anchored head and paired difference."""
    return run_drug_expression(config, model, out, baselines_only)


def chosen_on(kind: str, folds: int = INNER_FOLDS) -> str:
    """How the best baseline was chosen, in words, for metrics.json and the verdict line."""
    units = {"drug": "compounds", "cell_line": "cell lines", "random": "pairs"}[kind]
    return f"training {units}, {folds}-fold inner cross-validation"


def paired_over_drugs(model_runs: dict, baseline_runs: dict, best: dict) -> dict:
    """Model − best baseline in per-drug Pearson over held-out drugs, with its interval and verdict.
    Each seed pairs the model with that seed's chosen baseline on the same drugs; a drug held
    out under several seeds counts once, its model and baseline values averaged over those seeds."""
    baseline = {seed: baseline_runs[best[seed]["name"]][seed]["per_drug"] for seed in model_runs}
    names = " / ".join(sorted({best[seed]["name"] for seed in model_runs}))
    return paired_over_seeds({seed: run["per_drug"] for seed, run in model_runs.items()}, baseline, HEADLINE, "drugs", names)


def _write_results(out: Path, metrics: dict, table: pd.DataFrame) -> dict:
    """metrics.json, predictions.csv (held-out pairs with every predictor's value: pred_model is the
    head's, pred_model_plain the anchored head's model part), the plot and the table."""
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    write_file_atomically(out / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    split = metrics["split"]["kind"]
    # the anchored head's model part alone is shown beside the baselines, for comparison
    plain = {"model, plain head": metrics["model_plain"]} if metrics.get("model_plain") else {}
    shown = {**metrics, "baselines": {**plain, **metrics["baselines"]}}
    plot_bars(shown, "pearson_per_drug", out / "pearson_per_drug.png", f"Pearson per drug ({split} split)")
    print(results_table(shown, DRUG_METRICS, metrics.get("notes")))
    print_baseline_choice(metrics, HEADLINE)
    uncertainty = metrics.get("uncertainty")
    if uncertainty:
        _plot_ood(out / "ood_error.png", table, split, "pred_model" if "pred_model" in table else "pred_best_baseline")
        print(_uncertainty_line(uncertainty))
    if metrics.get("model_uncertainty"):
        print(_model_uncertainty_line(metrics["model_uncertainty"]))
    return metrics


def _model_uncertainty_line(summary: dict) -> str:
    covered, gaussian = summary["coverage"]["all"], summary["uncalibrated_gaussian"]
    line = (
        f"model, {summary['level']:g} intervals ({summary['method']}, split conformal on inner folds): coverage "
        f"{covered['coverage']:.3f} over {covered['n_pairs']} held-out pairs, mean width {covered['mean_width']:.2f}"
    )
    if gaussian:
        line += f"; uncalibrated Gaussian {gaussian['coverage']:.3f} (width {gaussian['mean_width']:.2f})"
    return line


def _uncertainty_line(summary: dict) -> str:
    covered, ood = summary["coverage"]["all"], summary["ood"]
    return (
        f"best baseline, {summary['level']:g} intervals (split conformal on training units): coverage "
        f"{covered['coverage']:.3f} over {covered['n_pairs']} held-out pairs, mean width {covered['mean_width']:.2f}; "
        f"OOD: {ood['n_flagged_pairs']} of {ood['n_pairs']} pairs flagged; per {ood['unit']}, AUROC of large error "
        f"{ood['auroc_large_error']:.2f}, Spearman {ood['spearman']:.2f} over {ood['n_units']}"
    )


def _plot_ood(png: Path, table: pd.DataFrame, kind: str, column: str) -> None:
    from celltron.finetune.uncertainty import plot_error_vs_score

    errors, distances, flagged = drug_intervals.unit_errors(table, kind, column)
    keep = np.isfinite(distances)
    if keep.any():
        unit = {"drug": "held-out compounds", "cell_line": "held-out cell lines", "random": "held-out pairs"}[kind]
        plot_error_vs_score(
            png,
            errors[keep],
            distances[keep],
            flagged[keep],
            f"{column.removeprefix('pred_')}: {unit}",
            "mean absolute error, ln(IC50)",
            "distance to the nearest training units (drug: 1 − Tanimoto)",
        )
