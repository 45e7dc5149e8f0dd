"""Drug response (ic50 mode): predictive intervals for the best baseline's predictions and OOD
flags for every held-out pair (celltron.finetune.uncertainty does the arithmetic).

Intervals. The best baseline's prediction ± q, q the split-conformal quantile (at the level) of
its absolute errors on the inner folds over the training pairs, grouped as the split groups
them (whole compounds, cell lines or pairs), so held-out pairs never shape q. A constant width:
baselines have no spread. The model's own intervals (drug.intervals: MC dropout or a deep
ensemble) are its prediction ± scale x its spread, the scale calibrated the same way on models
refitted on each inner fold (ic50.py `_model_bounds`); `model_summary` reports them.

OOD. A pair has two scores: its drug's distance to the nearest training compounds (1 − Tanimoto
similarity of Morgan fingerprints; a compound seen in training is at distance 0), and its cell
line's distance to the nearest training lines in the expression PCA (with --expression; without
profiles an unseen line has nothing to measure and is flagged, a seen one is at 0). Each is a
percentile of training units' distances (drugs: leave-one-out among the training compounds;
lines: half the training lines held out of the PCA and the reference); a pair is flagged when
either reaches the level.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from celltron.finetune.uncertainty import (
    NearestNeighbourOOD,
    conformal_scale,
    error_vs_score,
    gaussian_scale,
    interval_report,
)

OOD_NEIGHBOURS = 3


def conformal_width(inner: list[tuple[np.ndarray, np.ndarray]], level: float) -> float:
    """q from [(truth, prediction)] of the inner folds' held-out training pairs."""
    truth = np.concatenate([t for t, _ in inner])
    predicted = np.concatenate([p for _, p in inner])
    return conformal_scale(truth, predicted, np.ones_like(truth), level)


def drug_ood(train: pd.DataFrame, test: pd.DataFrame, prints: dict, compound_of: dict, level: float) -> pd.DataFrame:
    """Per test pair: drug_ood_distance / drug_ood_score against the training compounds (one
    fingerprint per compound, so twin ids do not hide each other)."""
    compounds = train.drug.map(lambda d: compound_of.get(d, d))
    first_id = dict(zip(compounds, train.drug))  # a compound's fingerprint: any of its ids'
    trained = sorted(first_id)
    if len(trained) < 2:  # one training compound: no distances to calibrate on
        nothing = np.full(len(test), np.nan)
        return pd.DataFrame({"drug_ood_distance": nothing, "drug_ood_score": nothing}, index=test.index)
    scorer = NearestNeighbourOOD(np.stack([prints[first_id[c]] for c in trained]), OOD_NEIGHBOURS, metric="tanimoto")
    drugs = sorted(test.drug.unique())
    vectors = np.stack([prints[d] for d in drugs])
    seen = {d for d in drugs if compound_of.get(d, d) in first_id}
    distance = dict(zip(drugs, scorer.distance(vectors)))
    score = dict(zip(drugs, scorer.score(vectors)))
    return pd.DataFrame(
        {
            "drug_ood_distance": [0.0 if d in seen else distance[d] for d in test.drug],
            "drug_ood_score": [0.0 if d in seen else score[d] for d in test.drug],
        },
        index=test.index,
    )


def cell_line_ood(train: pd.DataFrame, test: pd.DataFrame, profiles_for=None, seed: int = 0) -> pd.DataFrame:
    """Per test pair: cell_ood_distance / cell_ood_score against training lines in an expression
    PCA. `profiles_for(lines)` gives every line's coordinates in a PCA fitted on `lines`: it is
    fitted on a seeded half of the training lines, which are the reference; the other half,
    scored the same way, calibrates (split conformal: a PCA fitted on a line flatters it).
    Without profiles (or under 4 training lines), 0 for a seen line and NaN (nothing to measure)
    for an unseen one."""
    trained = np.array(sorted(train.cell_line.unique()))
    seen = test.cell_line.isin(trained).to_numpy()
    if profiles_for is None or len(trained) < 4:
        unknown = np.where(seen, 0.0, np.nan)
        return pd.DataFrame({"cell_ood_distance": unknown, "cell_ood_score": unknown}, index=test.index)
    order = np.random.default_rng(seed).permutation(len(trained))
    fit, held = trained[np.sort(order[: len(order) // 2])], trained[np.sort(order[len(order) // 2 :])]
    profiles = profiles_for(fit)
    scorer = NearestNeighbourOOD.calibrated_on(
        np.stack([profiles[c] for c in fit]), np.stack([profiles[c] for c in held]), OOD_NEIGHBOURS
    )
    lines = sorted(test.cell_line.unique())
    vectors = np.stack([profiles[c] for c in lines])
    distance, score = dict(zip(lines, scorer.distance(vectors))), dict(zip(lines, scorer.score(vectors)))
    return pd.DataFrame(
        {
            "cell_ood_distance": np.where(seen, 0.0, test.cell_line.map(distance).to_numpy(dtype=float)),
            "cell_ood_score": np.where(seen, 0.0, test.cell_line.map(score).to_numpy(dtype=float)),
        },
        index=test.index,
    )


def flag(ood: pd.DataFrame, level: float) -> np.ndarray:
    """A pair is out of distribution when its drug or its cell line reaches the level, or its
    cell line is unseen with nothing to measure it by."""
    return ((ood.drug_ood_score >= level) | (ood.cell_ood_score >= level) | ood.cell_ood_score.isna()).to_numpy()


def unit_errors(table: pd.DataFrame, kind: str, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per held-out unit of the split (compound, cell line, or pair) and seed: the absolute error
    of `column` (its mean over the unit's pairs), the unit's OOD distance (the drug's or the
    line's: what the split holds out) and whether it is flagged."""
    distance = {"drug": "drug_ood_distance", "cell_line": "cell_ood_distance"}.get(kind)
    error = (table[column] - table.ln_ic50).abs()
    frame = table.assign(error=error)
    if kind == "random":
        score = frame[["drug_ood_distance", "cell_ood_distance"]].max(axis=1)
        return frame.error.to_numpy(), score.to_numpy(dtype=float), frame.ood_flagged.to_numpy()
    unit = "drug" if kind == "drug" else "cell_line"
    grouped = frame.groupby(["seed", unit])
    return grouped.error.mean().to_numpy(), grouped[distance].first().to_numpy(dtype=float), grouped.ood_flagged.any().to_numpy()


def coverage_by_flag(table: pd.DataFrame, predictor: str) -> dict:
    """Coverage and width of the `{predictor}_low/high` intervals over all held-out pairs, the
    OOD-flagged ones and the rest (each with its pair count; a group with no pair is left out)."""
    covered = {}
    for name, rows in (("all", np.ones(len(table), bool)), ("flagged", table.ood_flagged), ("unflagged", ~table.ood_flagged)):
        rows = np.asarray(rows, dtype=bool)
        if rows.any():
            part = table[rows]
            report = interval_report(part.ln_ic50, part[f"{predictor}_low"], part[f"{predictor}_high"])
            covered[name] = {**report, "n_pairs": int(rows.sum())}
    return covered


def summary(table: pd.DataFrame, kind: str, level: float, widths: dict, column: str) -> dict:
    """Coverage of the best baseline's intervals (all held-out pairs, flagged and not) and
    whether its error rises with the OOD distance over held-out units."""
    covered = coverage_by_flag(table, "best_baseline")
    errors, distances, flagged = unit_errors(table, kind, column)
    return {
        "predictor": "best baseline (chosen per seed on training units)",
        "level": level,
        "interval": "prediction ± q, q the split-conformal quantile of the chosen baseline's absolute errors on inner folds over training units",
        "width_per_seed": widths,
        "coverage": covered,
        "ood": {
            "flag": f"drug or cell line at or beyond {level:g} of the training units' leave-one-out distances "
            "(Tanimoto for drugs, expression PCA for cell lines), or an unseen line without a profile",
            "n_flagged_pairs": int(table.ood_flagged.sum()),
            "n_pairs": int(len(table)),
            "unit": {"drug": "held-out compound", "cell_line": "held-out cell line", "random": "pair"}[kind],
            "error": f"mean absolute error of {column} over the unit's pairs",
            "error_flagged": float(np.mean(errors[flagged])) if flagged.any() else float("nan"),
            "error_unflagged": float(np.mean(errors[~flagged])) if (~flagged).any() else float("nan"),
            **error_vs_score(errors, distances),
        },
    }


def model_summary(table: pd.DataFrame, level: float, method: str, calibration: dict) -> dict:
    """Coverage and width of the reported model's intervals (drug.intervals) on every held-out
    pair, flagged and not; beside them the uncalibrated Gaussian interval (prediction ± the
    normal quantile x the spread) where the model has a spread (anchor weight above 0)."""
    covered = coverage_by_flag(table, "model")
    spread = table.model_spread_raw.to_numpy(dtype=float)
    with_spread = spread > 0
    gaussian = None
    if with_spread.any():
        part, half = table[with_spread], gaussian_scale(level) * spread[with_spread]
        gaussian = {
            **interval_report(part.ln_ic50, part.pred_model - half, part.pred_model + half),
            "n_pairs": int(with_spread.sum()),
        }
    return {
        "predictor": "the reported model (anchored: best baseline + weight x the model's residual)",
        "method": method,
        "level": level,
        "interval": "prediction ± scale x weight x relative spread (the mc_dropout passes' or ensemble members' standard "
        "deviation over its mean on the model's training pairs), the scale the split-conformal quantile on models refitted "
        "on inner folds over training units; weight 0: the best baseline's interval",
        "calibration_per_seed": calibration,
        "coverage": covered,
        "uncalibrated_gaussian": gaussian,
    }
