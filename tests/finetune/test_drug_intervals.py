"""Drug response (ic50): the best baseline's conformal intervals and the OOD flags of held-out
pairs, on hand-made fingerprints with a known answer and on a slice of GDSC."""

import json

import numpy as np
import pandas as pd
import pytest

from celltron.cli import main
from celltron.finetune.drug.intervals import cell_line_ood, drug_ood, flag
from tests.conftest import shared_file
from tests.finetune.test_drug_response import _profiled_table


def _pairs(drugs, lines):
    return pd.DataFrame([(d, c, 0.0) for d in drugs for c in lines], columns=["drug", "cell_line", "ln_ic50"])


def test_a_novel_compound_is_flagged_and_a_twin_of_a_training_one_is_not():
    rng = np.random.default_rng(0)
    family = rng.random(64) < 0.3
    prints = {f"D{i}": (family ^ (rng.random(64) < 0.05)).astype(np.float32) for i in range(8)}  # one chemical family
    prints["TWIN"] = prints["D0"].copy()
    prints["NOVEL"] = (~family).astype(np.float32)  # the family's complement: shares almost no bits
    compound_of = {"TWIN": "D0"}
    train, test = _pairs([f"D{i}" for i in range(8)], ["A", "B"]), _pairs(["TWIN", "NOVEL", "D1"], ["A", "C"])
    ood = pd.concat([drug_ood(train, test, prints, compound_of, 0.9), cell_line_ood(train, test, None)], axis=1)
    by_drug = ood.assign(drug=test.drug).groupby("drug").first()
    assert by_drug.loc["TWIN", "drug_ood_distance"] == 0 and by_drug.loc["D1", "drug_ood_score"] == 0
    assert by_drug.loc["NOVEL", "drug_ood_distance"] > 0.9 and by_drug.loc["NOVEL", "drug_ood_score"] == 1.0
    flagged = flag(ood, 0.9)
    # NOVEL is flagged everywhere; the unseen line C (no profile to measure it by) is flagged too
    assert flagged[(test.drug == "NOVEL").to_numpy()].all()
    assert flagged[(test.cell_line == "C").to_numpy()].all()
    assert not flagged[((test.drug != "NOVEL") & (test.cell_line == "A")).to_numpy()].any()


def test_cell_lines_are_scored_in_their_expression_space_calibrated_on_held_out_training_lines():
    rng = np.random.default_rng(0)
    names = [f"L{i}" for i in range(200)] + ["NEW", "FAR"]
    points = dict(zip(names, rng.normal(size=(202, 3))))
    points["FAR"] = np.full(3, 9.0)
    fitted_on = []

    def profiles_for(lines):  # a fixed space; records which lines it was fitted on
        fitted_on.append(set(lines))
        return points

    train, test = _pairs(["D"], names[:200]), _pairs(["D"], ["L0", "NEW", "FAR"])
    ood = cell_line_ood(train, test, profiles_for).assign(cell_line=test.cell_line).set_index("cell_line")
    assert ood.loc["L0", "cell_ood_distance"] == 0 and ood.loc["FAR", "cell_ood_score"] == 1.0
    assert 0 < ood.loc["NEW", "cell_ood_score"] < 1  # like the training lines: somewhere in their range
    assert len(fitted_on[0]) == 100 and fitted_on[0] < set(names[:200])  # fitted on half the training lines


def test_gdsc_drug_split_reports_intervals_and_ood_flags(tmp_path, capsys):
    small = tmp_path / "gdsc_small.csv"
    pd.read_csv(shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv"), index_col=0).iloc[:60, :200].to_csv(small)
    drug_list, smiles = shared_file("drug/GDSC_drug_list_2019-06-24.csv"), shared_file("drug/DeepCDR_223drugs_pubchem_smiles.txt")
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(small), "--drug-list", str(drug_list)]
    arguments += [
        "--smiles",
        str(smiles),
        "--split",
        "drug",
        "--seeds",
        "0",
        "1",
        "--baselines-only",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(arguments) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    uncertainty = metrics["uncertainty"]
    assert set(uncertainty["width_per_seed"]) == {"0", "1"} and all(w > 0 for w in uncertainty["width_per_seed"].values())
    inside = (predictions.ln_ic50 >= predictions.best_baseline_low) & (predictions.ln_ic50 <= predictions.best_baseline_high)
    assert uncertainty["coverage"]["all"]["coverage"] == inside.mean() and uncertainty["coverage"]["all"]["n_pairs"] == len(
        predictions
    )
    # every held-out drug is an unseen compound: none at distance 0, and the flags are counted
    assert (predictions.drug_ood_distance > 0).all() and (predictions.cell_ood_distance == 0).all()
    assert uncertainty["ood"]["n_flagged_pairs"] == int(predictions.ood_flagged.sum())
    assert (
        uncertainty["ood"]["unit"] == "held-out compound"
        and uncertainty["ood"]["n_units"] == predictions.groupby(["seed", "drug"]).ngroups
    )
    assert (tmp_path / "run" / "ood_error.png").stat().st_size > 0
    assert "0.9 intervals (split conformal on training units)" in capsys.readouterr().out


def test_interval_level_zero_switches_the_uncertainty_off(tmp_path):
    small = tmp_path / "gdsc_small.csv"
    pd.read_csv(shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv"), index_col=0).iloc[:30, :120].to_csv(small)
    drug_list, smiles = shared_file("drug/GDSC_drug_list_2019-06-24.csv"), shared_file("drug/DeepCDR_223drugs_pubchem_smiles.txt")
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(small), "--drug-list", str(drug_list)]
    arguments += ["--smiles", str(smiles), "--split", "drug", "--baselines-only", "--out", str(tmp_path / "run")]
    assert main([*arguments, "--set", "drug.interval_level=0"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["uncertainty"] is None
    columns = set(pd.read_csv(tmp_path / "run" / "predictions.csv").columns)
    assert not {"best_baseline_low", "ood_flagged"} & columns and "pred_best_baseline" in columns


def _simulated_run(tmp_path, out: str, *options: str) -> tuple[dict, pd.DataFrame]:
    """The model on simulated pairs with drug x cell-line interactions (random split, one seed)."""
    files = ["--drug-list", str(tmp_path / "drugs.csv"), "--smiles", str(tmp_path / "smiles.txt")]
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(tmp_path / "ic50.csv"), *files]
    arguments += ["--split", "random", "--seeds", "0", "--out", str(tmp_path / out), *options]
    for setting in ("data.batch_size=64", "drug.hidden=32", "optim.lr=0.005", "optim.warmup_steps=10"):
        arguments += ["--set", setting]
    assert main(arguments) == 0
    return json.loads((tmp_path / out / "metrics.json").read_text()), pd.read_csv(tmp_path / out / "predictions.csv")


def test_the_models_mc_dropout_intervals_are_calibrated_on_inner_folds_to_the_level(tmp_path, capsys):
    _profiled_table(tmp_path, lines=96)
    metrics, held = _simulated_run(tmp_path, "mc", "--head", "plain", "--intervals", "mc_dropout", "--max-steps", "200")
    summary = metrics["model_uncertainty"]
    record = summary["calibration_per_seed"]["0"]
    # the scale comes from models refitted on the inner folds' training pairs: every training pair scored once
    assert summary["method"] == "mc_dropout" and record["weight"] == 1.0 and record["inner_pairs"] + len(held) == 960
    assert record["scale"] > 0 and all((tmp_path / "mc" / "seed0" / f"interval_inner{j}").is_dir() for j in range(3))
    assert (held.model_spread > 0).all() and ((held.model_low < held.pred_model) & (held.pred_model < held.model_high)).all()
    inside = (held.ln_ic50 >= held.model_low) & (held.ln_ic50 <= held.model_high)
    assert summary["coverage"]["all"]["coverage"] == pytest.approx(inside.mean())
    assert 0.8 <= inside.mean() <= 0.98  # the level is 0.9, over ~190 held-out pairs
    # raw dropout spreads are far too narrow: the uncalibrated Gaussian interval misses most pairs
    assert summary["uncalibrated_gaussian"]["coverage"] < inside.mean() - 0.2
    assert "model, 0.9 intervals (mc_dropout, split conformal on inner folds)" in capsys.readouterr().out


def test_an_ensembles_members_train_on_other_seeds_and_a_weight_zero_model_takes_the_baselines_interval(tmp_path):
    _profiled_table(tmp_path, lines=48)
    settings = ["--head", "plain", "--intervals", "ensemble", "--max-steps", "40", "--set", "drug.ensemble_members=2"]
    metrics, held = _simulated_run(tmp_path, "ensemble", *settings)
    assert (tmp_path / "ensemble" / "seed0" / "ensemble" / "member1").is_dir()
    assert (held.model_spread > 0).all() and metrics["model_uncertainty"]["calibration_per_seed"]["0"]["scale"] > 0
    # anchored at weight 0 the model is the best baseline, and so is its interval (no extra fits)
    anchored = ["--intervals", "mc_dropout", "--max-steps", "20", "--set", "drug.anchor_weights=[0]"]
    metrics, held = _simulated_run(tmp_path, "weight0", *anchored)
    assert metrics["model_uncertainty"]["calibration_per_seed"]["0"] == {
        "weight": 0.0,
        "scale": None,
        "width": metrics["uncertainty"]["width_per_seed"]["0"],
        "inner_pairs": 0,
    }
    np.testing.assert_allclose(held.model_low, held.best_baseline_low)
    assert not (tmp_path / "weight0" / "seed0" / "interval_inner0").exists()


def test_model_intervals_without_a_model_are_refused(tmp_path, capsys):
    _profiled_table(tmp_path, lines=12, drugs=4)
    files = ["--drug-list", str(tmp_path / "drugs.csv"), "--smiles", str(tmp_path / "smiles.txt")]
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(tmp_path / "ic50.csv"), *files]
    arguments += ["--baselines-only", "--intervals", "mc_dropout", "--out", str(tmp_path / "run")]
    assert main(arguments) != 0
    assert "--baselines-only trains none" in capsys.readouterr().err and not (tmp_path / "run").exists()
    expression_mode = ["expression" if a == "ic50" else a for a in arguments if a != "--baselines-only"]
    assert main(expression_mode) != 0
    assert "ic50 mode only" in capsys.readouterr().err and not (tmp_path / "run").exists()
