"""Drug response (ic50 mode): splits that hold out whole cell lines or drugs, metrics, baselines
that recover what they should on simulated tables, the model learning interactions the
baselines cannot, and `celltron finetune drug-response` on the real GDSC table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from celltron.cli import main
from celltron.finetune.drug_response import (
    DrugResponseModel, baseline_predictions, drug_response_metrics, fingerprints, read_ic50, split_pairs, tanimoto,
)
from tests.conftest import shared_file


def _table(interaction: float, seed: int = 0, drugs: int = 12, lines: int = 60) -> tuple[pd.DataFrame, dict]:
    """Simulated ln(IC50): drug effect + cell-line effect (+ a drug x cell-line interaction)."""
    rng = np.random.default_rng(seed)
    prints = {f"D{i}": (rng.random(64) < 0.2).astype(np.float32) for i in range(drugs)}
    d, c = rng.normal(0, 2, drugs), rng.normal(0, 1, lines)
    u, v = rng.normal(size=(drugs, 2)), rng.normal(size=(lines, 2))
    rows = [(f"D{i}", f"C{j}", d[i] + c[j] + interaction * u[i] @ v[j] + rng.normal(0, 0.05)) for i in range(drugs) for j in range(lines)]
    return pd.DataFrame(rows, columns=["drug", "cell_line", "ln_ic50"]), prints


def test_splits_hold_out_whole_cell_lines_or_drugs():
    pairs, _ = _table(0.0)
    for kind, column in (("cell_line", "cell_line"), ("drug", "drug")):
        test = split_pairs(pairs, kind, 0.25, seed=1)
        assert not set(pairs[test][column]) & set(pairs[~test][column])
        assert np.isclose(pairs[test][column].nunique() / pairs[column].nunique(), 0.25, atol=0.05)
    random = split_pairs(pairs, "random", 0.2, seed=1)
    assert 0.15 < random.mean() < 0.25
    with pytest.raises(ValueError, match="--split"):
        split_pairs(pairs, "tissue", 0.2, 0)


def test_additive_baseline_recovers_an_additive_table_and_per_drug_pearson_is_honest():
    pairs, prints = _table(0.0, drugs=60, lines=80)
    test = split_pairs(pairs, "random", 0.2, seed=0)
    train, held = pairs[~test], pairs[test]
    predictions = baseline_predictions(train, held, prints)
    truth, drugs = held.ln_ic50.to_numpy(), held.drug.to_numpy()
    additive = drug_response_metrics(predictions["additive"], truth, drugs)
    drug_mean = drug_response_metrics(predictions["drug_mean"], truth, drugs)
    assert additive["rmse"] < 0.35 * drug_mean["rmse"] and additive["pearson_per_drug"] > 0.9
    # the drug mean scores high overall, but says nothing within a drug
    assert drug_mean["pearson"] > 0.8 and np.isnan(drug_mean["pearson_per_drug"])


def test_nearest_drug_baseline_uses_the_most_similar_training_drug():
    pairs, prints = _table(0.0, drugs=4, lines=15)
    prints["D3"] = prints["D1"].copy()  # D3 is chemically D1
    train, test = pairs[pairs.drug != "D3"], pairs[pairs.drug == "D3"]
    predicted = baseline_predictions(train, test, prints)["nearest_drug"]
    np.testing.assert_allclose(predicted, train[train.drug == "D1"].set_index("cell_line").ln_ic50[test.cell_line].to_numpy())
    a = np.array([[1, 1, 0, 0]], dtype=np.float32)
    assert tanimoto(a, np.array([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=np.float32)).tolist() == [[0.5, 1.0]]


def test_model_learns_interactions_the_additive_baseline_cannot():
    pairs, prints = _table(1.5, seed=3)
    test = split_pairs(pairs, "random", 0.2, seed=0)
    train, held = pairs[~test], pairs[test]
    drugs = sorted(prints)
    drug_index = {d: i + 1 for i, d in enumerate(drugs)}
    cell_index = {c: i + 1 for i, c in enumerate(sorted(train.cell_line.unique()))}
    matrix = np.concatenate([np.zeros((1, 64), np.float32), np.stack([prints[d] for d in drugs])])
    torch.manual_seed(0)
    model = DrugResponseModel(matrix, len(cell_index) + 1, hidden=32, dropout=0.0)
    batch = {"drug": torch.as_tensor(train.drug.map(drug_index).to_numpy()), "cell_line": torch.as_tensor(train.cell_line.map(cell_index).to_numpy()),
             "target": torch.as_tensor(train.ln_ic50.to_numpy(), dtype=torch.float32)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(400):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = model(drug=torch.as_tensor(held.drug.map(drug_index).to_numpy()),
                          cell_line=torch.as_tensor(held.cell_line.map(cell_index).to_numpy())).predicted.numpy()
    truth, names = held.ln_ic50.to_numpy(), held.drug.to_numpy()
    additive = baseline_predictions(train, held, prints)["additive"]
    assert drug_response_metrics(predicted, truth, names)["rmse"] < 0.7 * drug_response_metrics(additive, truth, names)["rmse"]


def test_gdsc_drug_response_cli_writes_metrics_beside_the_baselines(tmp_path):
    table = shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv")
    drug_list, smiles = shared_file("drug/GDSC_drug_list_2019-06-24.csv"), shared_file("drug/DeepCDR_223drugs_pubchem_smiles.txt")
    small = tmp_path / "gdsc_small.csv"
    pd.read_csv(table, index_col=0).iloc[:40, :200].to_csv(small)  # 40 drugs x 200 cell lines
    code = main(["finetune", "drug-response", "--mode", "ic50", "--data", str(small), "--drug-list", str(drug_list), "--smiles", str(smiles),
                 "--split", "drug", "--seeds", "0", "1", "--max-steps", "30", "--out", str(tmp_path / "run"),
                 "--set", "data.batch_size=64"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "matrix_completion" and metrics["split"]["kind"] == "drug"
    assert set(metrics["baselines"]) == {"drug_mean", "cell_line_mean", "additive", "ridge", "nearest_drug"}
    for result in [metrics["model"], *metrics["baselines"].values()]:
        assert {"pearson", "spearman", "rmse", "pearson_per_drug"} <= set(result)
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert {"drug", "cell_line", "ln_ic50", "seed", "pred_model", "pred_additive"} <= set(predictions.columns)
    held = predictions[predictions.seed == 0]
    assert held.drug.nunique() == metrics["split"]["per_seed"]["0"]["test_drugs"]


def test_gdsc_table_reads_long_and_smiles_become_fingerprints():
    pairs = read_ic50(shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv"))
    assert len(pairs) == 208_734 and pairs.drug.str.startswith("GDSC:").all()
    prints = fingerprints({"aspirin": "CC(=O)Oc1ccccc1C(=O)O", "bad": "not a smiles"})
    assert set(prints) == {"aspirin"} and prints["aspirin"].shape == (1024,) and prints["aspirin"].sum() > 5
