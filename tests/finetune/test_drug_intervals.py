"""Drug response (ic50): the best baseline's conformal intervals and the OOD flags of held-out
pairs, on hand-made fingerprints with a known answer and on a slice of GDSC."""

import json

import numpy as np
import pandas as pd

from celltron.cli import main
from celltron.finetune.drug.intervals import cell_line_ood, drug_ood, flag
from tests.conftest import shared_file


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
