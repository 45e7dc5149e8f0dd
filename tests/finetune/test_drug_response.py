"""Drug response (ic50 mode): splits that hold out whole cell lines or drugs, metrics, baselines
that recover what they should on simulated tables, the model learning interactions the
baselines cannot, cell lines seen through a pretrained model's embedding of their (simulated)
expression, unseen drugs borrowing from training drugs of shared targets, pathway or structure
(similar_drugs), and `celltron finetune drug-response` on the real GDSC table."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from celltron.cli import main
from celltron.errors import ConfigError, InputError
from celltron.finetune.config import DrugSection, load_finetune_config
from celltron.finetune.drug.features import informative_pathway, parse_targets, target_vectors
from celltron.finetune.drug.ic50 import (
    KERNEL_GRID,
    PRIOR_GRID,
    Borrowing,
    CellLineExpression,
    DrugResponseModel,
    Kernel,
    SimilarDrugs,
    _fit_model,
    _model_predictions,
    baseline_predictions,
    choose_kernel,
    drug_response_metrics,
    fingerprints,
    keep_profiled,
    read_ic50,
    read_similar_drugs,
    split_pairs,
    tanimoto,
)
from celltron.finetune.report import choose_best
from celltron.training.examples import PredictAtSteps
from tests.conftest import shared_file
from tests.finetune.weights import earned_by_rule

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "drug_response.yaml"

# well-known drugs; the quinazolines (gefitinib, erlotinib) and the two NSAIDs are chemically close
SMILES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "imatinib": "Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1",
    "gefitinib": "COc1cc2ncnc(Nc3ccc(F)c(Cl)c3)c2cc1OCCCN1CCOCC1",
    "erlotinib": "COCCOc1cc2ncnc(Nc3cccc(C#C)c3)c2cc1OCCOC",
    "dopamine": "NCCc1ccc(O)c(O)c1",
    "nicotine": "CN1CCCC1c1cccnc1",
    "metformin": "CN(C)C(=N)NC(=N)N",
}


@functools.lru_cache(maxsize=1)
def demo_gene_symbols(n: int = 300) -> list[str]:
    """`n` gene symbols expressed in the bundled PBMC 3k data (so the demo-pretrained model has
    their medians and tokens) that map to Ensembl IDs."""
    from celltron.corpus.demo import demo_h5ad
    from celltron.corpus.genes import map_genes

    demo = ad.read_h5ad(demo_h5ad())
    names = demo.var_names.to_numpy()
    usable = (np.asarray((demo.X > 0).mean(0)).ravel() > 0.05) & (map_genes(names, "human", "demo").ensembl_ids != "")
    return [g for g in names[usable] if g.isalnum()][:n]


def _table(interaction: float, seed: int = 0, drugs: int = 12, lines: int = 60) -> tuple[pd.DataFrame, dict]:
    """Simulated ln(IC50): drug effect + cell-line effect (+ a drug x cell-line interaction)."""
    rng = np.random.default_rng(seed)
    prints = {f"D{i}": (rng.random(64) < 0.2).astype(np.float32) for i in range(drugs)}
    d, c = rng.normal(0, 2, drugs), rng.normal(0, 1, lines)
    u, v = rng.normal(size=(drugs, 2)), rng.normal(size=(lines, 2))
    rows = [
        (f"D{i}", f"C{j}", d[i] + c[j] + interaction * u[i] @ v[j] + rng.normal(0, 0.05))
        for i in range(drugs)
        for j in range(lines)
    ]
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
    batch = {
        "drug": torch.as_tensor(train.drug.map(drug_index).to_numpy()),
        "cell_line": torch.as_tensor(train.cell_line.map(cell_index).to_numpy()),
        "target": torch.as_tensor(train.ln_ic50.to_numpy(), dtype=torch.float32),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(400):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = model(
            drug=torch.as_tensor(held.drug.map(drug_index).to_numpy()),
            cell_line=torch.as_tensor(held.cell_line.map(cell_index).to_numpy()),
        ).predicted.numpy()
    truth, names = held.ln_ic50.to_numpy(), held.drug.to_numpy()
    additive = baseline_predictions(train, held, prints)["additive"]
    assert drug_response_metrics(predicted, truth, names)["rmse"] < 0.7 * drug_response_metrics(additive, truth, names)["rmse"]


def _gdsc_run(tmp_path, out: str, *options: str, seeds=("0",)) -> dict:
    """`celltron finetune drug-response` (ic50, split by drug, 30 steps) on 40 drugs x 200 cell
    lines of the GDSC table, with `options`; its metrics.json."""
    small = tmp_path / "gdsc_small.csv"
    if not small.exists():
        table = shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv")
        pd.read_csv(table, index_col=0).iloc[:40, :200].to_csv(small)  # 40 drugs x 200 cell lines
    drug_list, smiles = shared_file("drug/GDSC_drug_list_2019-06-24.csv"), shared_file("drug/DeepCDR_223drugs_pubchem_smiles.txt")
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(small), "--drug-list", str(drug_list)]
    arguments += ["--smiles", str(smiles), "--split", "drug", "--seeds", *seeds, "--max-steps", "30"]
    arguments += ["--out", str(tmp_path / out), "--set", "data.batch_size=64", *options]
    assert main(arguments) == 0
    return json.loads((tmp_path / out / "metrics.json").read_text())


def test_gdsc_drug_response_cli_writes_metrics_beside_the_baselines(tmp_path, capsys):
    metrics = _gdsc_run(tmp_path, "run", seeds=("0", "1"))
    assert metrics["method"] == "matrix_completion" and metrics["split"]["kind"] == "drug"
    assert set(metrics["baselines"]) == {"drug_mean", "cell_line_mean", "additive", "ridge", "nearest_drug", "similar_drugs"}
    for result in [metrics["model"], *metrics["baselines"].values()]:
        assert {"pearson", "spearman", "rmse", "pearson_per_drug"} <= set(result)
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert {"drug", "cell_line", "ln_ic50", "seed", "pred_model", "pred_additive"} <= set(predictions.columns)
    held = predictions[predictions.seed == 0]
    assert held.drug.nunique() == metrics["split"]["per_seed"]["0"]["test_drugs"]
    # model − the best baseline (chosen per seed on training compounds), paired over held-out drugs
    chosen = {c["name"] for c in metrics["best_baseline"]["per_seed"].values()}
    paired = metrics["paired"]
    assert set(metrics["best_baseline"]["per_seed"]) == {"0", "1"} and chosen <= set(metrics["baselines"])
    assert paired["baseline"] == " / ".join(sorted(chosen)) and paired["metric"] == "pearson_per_drug"
    assert paired["n_units"] == len(paired["units"]) >= 2 and set(paired["units"]) <= set(predictions.drug)
    assert paired["low"] <= paired["mean"] <= paired["high"] and paired["verdict"]
    # the default anchored head: a weight per seed, chosen by inner CV among drug.anchor_weights
    weights = (0.0, 0.25, 0.5, 0.75, 1.0)
    assert metrics["head"] == "anchored" and metrics["model_plain"]["per_seed"].keys() == {"0", "1"}
    for seed, choice in metrics["best_baseline"]["per_seed"].items():
        assert choice["weight"] in weights and choice["weight_scores"].keys() == {str(w) for w in weights}
        assert choice["weight"] == earned_by_rule(choice)
        # and a training length: a quarter, half or all of the 30 steps, by the model's inner score
        lr = choice["learning_rate"]
        assert choice["setting_scores"].keys() == {f"lr={lr:g},steps={n}" for n in (8, 15, 30)} and choice["steps"] in (8, 15, 30)
        finite = {k: v for k, v in choice["setting_scores"].items() if v is not None}
        assert not finite or choice["setting_scores"][f"lr={lr:g},steps={choice['steps']}"] == max(finite.values())
    printed = capsys.readouterr().out
    assert "anchored head" in printed and "seed 1: " in printed and "model − " in printed


def test_predictions_are_taken_from_the_model_as_it_was_after_each_training_length(tmp_path):
    pairs, prints = _table(1.5, seed=3)
    config = load_finetune_config(
        CONFIG, ["trainer.max_steps=12", "data.batch_size=32", "drug.hidden=16", "optim.warmup_steps=2"]
    )

    def weights(model):
        return [p.detach().clone() for p in model.parameters()]

    seen = []

    def snapshots(drug_index, cell_index):
        seen.append(PredictAtSteps([4, 12], lambda model: (weights(model), model.training)))
        return seen

    (model, *_), first = _fit_model(config, pairs, prints, tmp_path / "fit", seed=0, on_indices=snapshots)
    assert first
    taken = seen[0].predictions
    assert sorted(taken) == [4, 12]
    assert all(not training for _, training in taken.values())  # predicted in eval mode (no dropout)
    final = weights(model)
    assert all(torch.equal(a, b) for a, b in zip(taken[12][0], final))  # the last step is the trained model
    assert not all(torch.equal(a, b) for a, b in zip(taken[4][0], final))  # step 4 is the model then
    lengths, _ = _model_predictions(config, pairs, pairs.iloc[:50], prints, tmp_path / "lengths", 0, lengths=(4, 12))
    assert sorted(lengths) == [4, 12] and not np.allclose(lengths[4], lengths[12])


def test_anchor_weight_zero_is_the_best_baseline_exactly(tmp_path):
    metrics = _gdsc_run(tmp_path, "run", "--set", "drug.anchor_weights=[0]")
    choice = metrics["best_baseline"]["per_seed"]["0"]
    assert choice["weight"] == 0 and list(choice["weight_scores"]) == ["0.0"]
    baseline = metrics["baselines"][choice["name"]]
    assert metrics["model"]["per_drug"]["0"] == baseline["per_drug"]["0"]
    assert metrics["model"]["per_seed"]["0"] == baseline["per_seed"]["0"]
    assert metrics["paired"]["mean"] == 0 and metrics["paired"]["n_units"] >= 2
    assert metrics["model_plain"]["per_drug"]["0"] != baseline["per_drug"]["0"]  # the model itself differs


def test_a_blend_equal_to_the_baseline_up_to_rounding_keeps_weight_zero():
    # cell-line split without profiles: every blend's per-drug Pearson is the baseline's, computed
    # in another order (seen in the GDSC run: weight 0.5 taken for a gain of 3e-18)
    baseline = np.array([1.0, 2.5, 0.3, 4.0, 2.2]) / 3
    model = baseline * (1 + 1e-15)
    scores = {}
    for w in (0.0, 0.25, 0.5, 0.75):
        blend = baseline + w * (model - baseline)
        scores[str(w)] = float(np.corrcoef(blend, [0.1, 1.0, 0.0, 2.0, 1.5])[0, 1])
    assert choose_best(scores) == "0.0"
    assert choose_best({"0.0": 0.5, "0.5": 0.5 + 1e-6}) == "0.5"  # a real gain still wins
    assert choose_best({"a": 2.0, "b": 1.0}, higher_is_better=False) == "b"
    assert choose_best({"a": float("nan"), "b": None}) == "a"  # nothing finite: the first named


def test_a_model_that_learns_interactions_gets_a_residual_weight(tmp_path):
    # random pairs of a table with drug x cell-line interactions, which the additive baselines miss;
    # 150 cell lines, so each drug's Pearson (the unit the weight rule resamples) is measured well
    _profiled_table(tmp_path, lines=96)
    files = ["--drug-list", str(tmp_path / "drugs.csv"), "--smiles", str(tmp_path / "smiles.txt")]
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(tmp_path / "ic50.csv"), *files]
    arguments += ["--split", "random", "--seeds", "0", "--max-steps", "300", "--out", str(tmp_path / "run")]
    for setting in ("data.batch_size=64", "drug.hidden=64", "optim.lr=0.005", "optim.warmup_steps=10"):
        arguments += ["--set", setting]
    assert main(arguments) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    choice = metrics["best_baseline"]["per_seed"]["0"]
    scores = choice["weight_scores"]
    print(
        choice["name"], choice["weight"], scores, metrics["model"]["pearson_per_drug"], metrics["model_plain"]["pearson_per_drug"]
    )
    assert choice["weight"] > 0 and scores[str(choice["weight"])] > scores["0.0"]
    # the head's prediction is the best baseline plus the weighted residual of the model's own
    held = pd.read_csv(tmp_path / "run" / "predictions.csv")
    baseline = held[f"pred_{choice['name']}"]
    blend = baseline + choice["weight"] * (held.pred_model_plain - baseline)
    np.testing.assert_allclose(held.pred_model, blend, rtol=1e-6, atol=1e-6)


def test_the_plain_head_is_the_model_alone(tmp_path):
    metrics = _gdsc_run(tmp_path, "run", "--head", "plain")
    assert metrics["head"] == "plain" and metrics["model_plain"] is None
    assert "weight" not in metrics["best_baseline"]["per_seed"]["0"]
    assert "pred_model_plain" not in pd.read_csv(tmp_path / "run" / "predictions.csv").columns


def _baselines_only(tmp_path, data, out: str) -> dict:
    """`celltron finetune drug-response --baselines-only` on the simulated files, split by drug, one seed."""
    files = {"--drug-list": tmp_path / "drugs.csv", "--smiles": tmp_path / "smiles.txt"}
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(data), "--split", "drug", "--seeds", "0"]
    arguments += ["--test-fraction", "0.3", "--baselines-only", "--out", str(tmp_path / out)]
    assert main(arguments + [str(v) for pair in files.items() for v in pair]) == 0
    return json.loads((tmp_path / out / "metrics.json").read_text())


def test_the_best_baseline_is_chosen_on_training_drugs_alone(tmp_path, capsys):
    _profiled_table(tmp_path)
    metrics = _baselines_only(tmp_path, tmp_path / "ic50.csv", "run")
    best = metrics["best_baseline"]
    choice = best["per_seed"]["0"]
    assert best["metric"] == "pearson_per_drug" and best["chosen_on"].startswith("training compounds")
    assert choice["name"] in metrics["baselines"] and choice["inner_folds"] == 3
    assert choice["score"] == max(v for v in choice["scores"].values() if v is not None)
    assert metrics["paired"] is None  # no model: nothing to pair
    assert f"seed 0: {choice['name']}" in capsys.readouterr().out
    # the held-out drugs favour another baseline than the training drugs do: the choice ignores them
    on_test = {name: result["per_seed"]["0"]["pearson_per_drug"] for name, result in metrics["baselines"].items()}
    assert max(on_test, key=lambda name: on_test[name] or -np.inf) != choice["name"]

    # scramble the held-out ratings: every test score moves, the choice does not
    held = pd.read_csv(tmp_path / "run" / "predictions.csv")
    wide = pd.read_csv(tmp_path / "ic50.csv", index_col=0)
    for (drug, line), value in zip(zip(held.drug, held.cell_line), np.random.default_rng(0).permutation(held.ln_ic50)):
        wide.loc[drug, line] = value
    wide.to_csv(tmp_path / "scrambled.csv")
    scrambled = _baselines_only(tmp_path, tmp_path / "scrambled.csv", "scrambled")
    rescored = scrambled["best_baseline"]["per_seed"]["0"]  # the same up to the CSV round trip's last digit
    assert rescored["name"] == choice["name"] and rescored["scores"] == pytest.approx(choice["scores"], rel=1e-12)
    assert scrambled["baselines"]["ridge"]["pearson_per_drug"] != metrics["baselines"]["ridge"]["pearson_per_drug"]


def test_gdsc_table_reads_long_and_smiles_become_fingerprints():
    pairs = read_ic50(shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv"))
    assert len(pairs) == 208_734 and pairs.drug.str.startswith("GDSC:").all()
    prints = fingerprints({"aspirin": "CC(=O)Oc1ccccc1C(=O)O", "bad": "not a smiles"})
    assert set(prints) == {"aspirin"} and prints["aspirin"].shape == (1024,) and prints["aspirin"].sum() > 5


def _profiled_table(tmp_path, lines: int = 48, drugs: int = 10, seed: int = 0):
    """Simulated cell lines whose ln(IC50) depends on their expression: two gene programs, each
    line's activity of them (scores s), and ln(IC50) = drug effect + 0.7 s1 (a cell-line main
    effect) + the drug's own weights on s (a drug x expression interaction). Writes the IC50 CSV,
    the GDSC-style drug list and CID<TAB>SMILES files, and the profiles (ids in obs['line_id'])."""
    rng = np.random.default_rng(seed)
    genes = demo_gene_symbols()
    programs = np.zeros((2, len(genes)))
    programs[0, 100:160], programs[1, 160:220] = 1, 1
    scores = rng.normal(0, 1, (lines, 2))
    base = rng.normal(0, 1, len(genes))
    log_means = np.log(np.exp(base) / np.exp(base).sum() * 3000) + 2.0 * scores @ programs
    names = [f"ACH-{i:06d}" for i in range(lines)]
    profiles = ad.AnnData(
        sp.csr_matrix(rng.poisson(np.exp(log_means)).astype(np.float32)),
        obs=pd.DataFrame({"line_id": names}, index=[f"row{i}" for i in range(lines)]),
        var=pd.DataFrame(index=genes),
    )
    profiles[3:].copy().write_h5ad(tmp_path / "profiles.h5ad")  # three cell lines have no profile
    effect, weights = rng.normal(0, 1, drugs), rng.normal(0, 1, (drugs, 2))
    ic50 = effect[:, None] + 0.7 * scores[:, 0] + weights @ scores.T + rng.normal(0, 0.1, (drugs, lines))
    pd.DataFrame(ic50, index=[f"GDSC:{i}" for i in range(drugs)], columns=names).to_csv(tmp_path / "ic50.csv")
    pd.DataFrame({"drug_id": [str(i) for i in range(drugs)], "PubCHEM": [str(100 + i) for i in range(drugs)]}).to_csv(
        tmp_path / "drugs.csv", index=False
    )
    (tmp_path / "smiles.txt").write_text("".join(f"{100 + i}\t{s}\n" for i, s in enumerate(list(SMILES.values())[:drugs])))


def test_cell_lines_without_a_profile_are_dropped_and_a_wrong_key_is_named(tmp_path, caplog):
    pairs = pd.DataFrame({"drug": ["a"] * 4, "cell_line": ["L1", "L2", "L3", "L4"], "ln_ic50": [1.0, 2, 3, 4]})
    expression = CellLineExpression(tmp_path / "lines.h5ad", np.array(["L1", "L2", "L3"]), np.zeros((3, 5), np.float32))
    with caplog.at_level(logging.WARNING):
        kept, missing = keep_profiled(pairs, expression, "")
    assert missing == ["L4"] and list(kept.cell_line) == ["L1", "L2", "L3"] and "1 of 4 cell lines" in caplog.text
    # a profile the model cannot embed (no gene it knows) counts as missing
    expression.embeddings = np.array([[0.0, 1], [np.nan, np.nan], [1, 0]], dtype=np.float32)
    assert keep_profiled(pairs, expression, "")[1] == ["L2", "L4"]
    other = CellLineExpression(tmp_path / "lines.h5ad", np.array(["COSMIC:1", "COSMIC:2"]), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"lines.h5ad: none of the IC50 table's 4 cell lines.*--cell-line-key"):
        keep_profiled(pairs, other, "")


def test_profiles_embedded_by_the_model_predict_unseen_cell_lines(pretrained_geneformer, tmp_path):
    _profiled_table(tmp_path)
    code = main(
        [
            "finetune",
            "drug-response",
            "--mode",
            "ic50",
            "--data",
            str(tmp_path / "ic50.csv"),
            "--drug-list",
            str(tmp_path / "drugs.csv"),
            "--smiles",
            str(tmp_path / "smiles.txt"),
            "--expression",
            str(tmp_path / "profiles.h5ad"),
            "--cell-line-key",
            "line_id",
            "--model",
            str(pretrained_geneformer),
            "--split",
            "cell_line",
            "--test-fraction",
            "0.25",
            "--seeds",
            "0",
            "--max-steps",
            "120",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "data.batch_size=64",
            "--set",
            "drug.hidden=64",
            "--set",
            "optim.lr=0.005",
            "--set",
            "optim.warmup_steps=10",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "expression_embedding" and metrics["split"]["kind"] == "cell_line"
    assert metrics["cell_lines_without_expression"]["count"] == 3 and metrics["cell_lines_without_expression"]["pairs"] == 30
    model, baselines = metrics["model"], metrics["baselines"]
    print(
        {name: round(result["pearson"], 3) for name, result in [("model", model), *baselines.items()]},
        round(model["pearson_per_drug"], 3),
    )
    # an unseen cell line has no learned embedding nor mean: that path predicts the drug mean, whose
    # within-drug correlation is undefined; the profile lets the model rank cell lines within a drug
    assert np.isnan(baselines["cell_line_mean"]["pearson_per_drug"] or np.nan)
    assert (
        model["pearson"] > baselines["cell_line_mean"]["pearson"] + 0.05 and model["rmse"] < baselines["cell_line_mean"]["rmse"]
    )
    assert model["pearson_per_drug"] > 0.2
    # the ridge baseline's expression PCA recovers the cell-line main effect the means cannot
    assert baselines["ridge"]["pearson"] > baselines["cell_line_mean"]["pearson"] + 0.02


def test_one_compound_under_two_ids_is_one_compound():
    from celltron.finetune.drug.features import compounds

    smiles = {"GDSC:1": "CCO", "GDSC:2": "OCC", "GDSC:3": "c1ccccc1", "GDSC:4": "CCN"}  # 1 and 2: ethanol, two spellings
    names = {"GDSC:3": "Benzene", "GDSC:4": "5-Benzene", "GDSC:5": "BENZENE"}
    found = compounds({**smiles, "GDSC:5": "C1=CC=CC=C1"}, names)
    assert found["GDSC:1"] == found["GDSC:2"] == "GDSC:1"
    assert found["GDSC:3"] == found["GDSC:5"] == "GDSC:3"  # same name (case-blind) and same canonical SMILES
    assert found["GDSC:4"] == "GDSC:4"  # '5benzene' is another name


def test_a_drug_split_never_puts_a_gdsc_twin_on_both_sides():
    from celltron.finetune.drug.features import canonical_smiles, compounds, folded_name
    from celltron.finetune.drug.ic50 import read_drug_names, read_smiles

    drug_list = shared_file("drug/GDSC_drug_list_2019-06-24.csv")
    smiles = read_smiles(drug_list, shared_file("drug/DeepCDR_223drugs_pubchem_smiles.txt"))
    names = read_drug_names(drug_list)
    pairs = read_ic50(shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv"))
    pairs = pairs[pairs.drug.isin(smiles)]
    compound_of = compounds({drug: smiles[drug] for drug in pairs.drug.unique()}, names)
    twins = {c for c in set(compound_of.values()) if sum(v == c for v in compound_of.values()) > 1}
    assert len(twins) >= 15 and compound_of["GDSC:1032"] == compound_of["GDSC:1377"]  # Afatinib, GDSC1 and GDSC2
    for seed in range(5):
        test = split_pairs(pairs, "drug", 0.2, seed, compound_of)
        held_ids, kept_ids = set(pairs.drug[test]), set(pairs.drug[~test])  # identities per drug, not per pair
        for identity in (compound_of.get, lambda d: folded_name(names[d]), lambda d: canonical_smiles(smiles[d])):
            assert not {identity(d) for d in held_ids} & {identity(d) for d in kept_ids}
    by_id = [split_pairs(pairs, "drug", 0.2, seed) for seed in range(5)]  # ids alone: twins straddle
    assert any({compound_of[d] for d in set(pairs.drug[t])} & {compound_of[d] for d in set(pairs.drug[~t])} for t in by_id)


# ---------------------------------------------------------------- similar drugs (unseen drugs)


def _pathway_screen(seed: int, shuffle: bool = False, pathways: int = 4, per_pathway: int = 6, lines: int = 60):
    """Simulated ln(IC50) of drugs in `pathways` pathways: a drug's response over cell lines is its
    pathway's pattern plus noise (sd 1, as large as the pattern), on top of its own level and a
    cell-line main effect. Fingerprints are the pathway's prototype with a fifth of the bits
    flipped (structure says something, noisily); targets are drawn regardless of pathway (they say
    nothing). `shuffle`: the pathway labels are permuted across drugs, so that they say nothing."""
    rng = np.random.default_rng(seed)
    drugs = [f"GDSC:{i}" for i in range(pathways * per_pathway)]
    pathway = np.repeat(np.arange(pathways), per_pathway)
    patterns = rng.normal(0, 1, (pathways, lines))
    noise = rng.normal(0, 1, (len(drugs), lines))
    ic50 = rng.normal(0, 2, (len(drugs), 1)) + 0.5 * rng.normal(0, 1, lines) + patterns[pathway] + noise
    prints = (rng.random((pathways, 256)) < 0.15)[pathway] ^ (rng.random((len(drugs), 256)) < 0.2)
    labels = rng.permutation(pathway) if shuffle else pathway
    similar = SimilarDrugs(
        targets={d: frozenset({f"t{rng.integers(6)}"}) for d in drugs}, pathways={d: f"p{p}" for d, p in zip(drugs, labels)}
    )
    wide = pd.DataFrame(ic50, index=drugs, columns=[f"C{j}" for j in range(lines)])
    pairs = wide.stack().rename("ln_ic50").rename_axis(["drug", "cell_line"]).reset_index()
    return pairs, dict(zip(drugs, prints.astype(np.float32))), similar


@pytest.mark.parametrize("seed", [0, 1])
def test_unseen_drugs_borrow_from_drugs_of_their_pathway_when_the_pathway_says_something(seed):
    pairs, prints, similar = _pathway_screen(seed)
    test = split_pairs(pairs, "drug", 0.25, seed)
    train, held = pairs[~test], pairs[test]
    kernel, choice = choose_kernel(train, prints, replace(similar, seed=seed))
    assert kernel.pathway > 0 and choice["score"] == max(choice["scores"].values()) and choice["inner_folds"] == 3
    assert choice["kernel"] == {
        "target": kernel.target,
        "pathway": kernel.pathway,
        "structure": kernel.structure,
        "sharpness": kernel.sharpness,
        "prior": 0.0,  # no target priors given: the grid has no prior part
    }
    predictions = baseline_predictions(train, held, prints, similar=replace(similar, kernel=kernel))
    truth, drugs = held.ln_ic50.to_numpy(), held.drug.to_numpy()
    scores = {name: drug_response_metrics(value, truth, drugs)["pearson_per_drug"] for name, value in predictions.items()}
    others = {name: score for name, score in scores.items() if name != "similar_drugs"}
    assert scores["similar_drugs"] > max(others.values()) + 0.05, scores

    # the same screen with meaningless pathway labels: the pathway alone is never the choice
    pairs, prints, shuffled = _pathway_screen(seed, shuffle=True)
    kernel, _ = choose_kernel(pairs[~test], prints, replace(shuffled, seed=seed))
    assert (kernel.target, kernel.structure) != (0, 0), kernel


def test_target_vectors_are_the_mean_target_row_and_their_dot_product_the_mean_cosine_over_priors():
    first = {"A": np.array([3.0, 4.0]), "B": np.array([0.0, 2.0]), "C": np.array([1.0, 0.0])}
    second = {"A": np.array([1.0, 0.0, 0.0]), "D": np.array([0.0, 1.0, 0.0])}
    targets = {"x": frozenset({"a", "b"}), "y": frozenset({"c"}), "z": frozenset({"d"}), "none": frozenset({"e"})}
    vectors = target_vectors(targets, [first, second])
    assert set(vectors) == {"x", "y", "z"}  # "none": no target with a row in either prior
    mean_ab = np.array([1.5, 3.0]) / np.linalg.norm([1.5, 3.0])
    np.testing.assert_allclose(vectors["x"], np.concatenate([mean_ab, [1.0, 0.0, 0.0]]) / np.sqrt(2))
    np.testing.assert_allclose(vectors["z"], np.array([0, 0, 0, 1.0, 0]) / np.sqrt(2))
    # x and y: cosine mean_ab . (1, 0) in the first prior, 0 in the second (y has no row there)
    assert vectors["x"] @ vectors["y"] == pytest.approx(mean_ab[0] / 2)
    assert vectors["x"] @ vectors["x"] == pytest.approx(1.0) and target_vectors(targets, []) == {}


def _prior_screen(seed: int, informative: bool, groups: int = 4, per_group: int = 6, lines: int = 60):
    """_pathway_screen's responses (drugs in groups sharing a response pattern), but nothing the
    drug list says tells the groups apart: each drug has a target of its own, pathway labels are
    permuted and fingerprints random. Each target gene's prior row is its drug's group prototype
    plus noise (`informative`), or random."""
    pairs, _, similar = _pathway_screen(seed, shuffle=True, pathways=groups, per_pathway=per_group, lines=lines)
    rng = np.random.default_rng(seed + 100)
    drugs = [f"GDSC:{i}" for i in range(groups * per_group)]
    prints = {d: (rng.random(256) < 0.15).astype(np.float32) for d in drugs}
    prototypes = rng.normal(0, 1, (groups, 8))
    rows = {
        f"G{i}": prototypes[i // per_group] + 0.3 * rng.normal(0, 1, 8) if informative else rng.normal(0, 1, 8)
        for i in range(len(drugs))
    }
    targets = {d: frozenset({f"g{i}"}) for i, d in enumerate(drugs)}
    with_prior = replace(similar, targets=targets, target_vectors=target_vectors(targets, [rows]), grid=KERNEL_GRID + PRIOR_GRID)
    return pairs, prints, with_prior


@pytest.mark.parametrize("seed", [0, 1])
def test_unseen_drugs_borrow_from_drugs_whose_targets_are_near_in_a_knowledge_prior(seed):
    pairs, prints, similar = _prior_screen(seed, informative=True)
    held = split_pairs(pairs, "drug", 0.25, seed)
    train, test = pairs[~held], pairs[held]
    kernel, choice = choose_kernel(train, prints, replace(similar, seed=seed))
    assert kernel.prior == 1 and choice["kernel"]["prior"] == 1 and len(choice["scores"]) == len(KERNEL_GRID + PRIOR_GRID)
    predictions = baseline_predictions(train, test, prints, similar=replace(similar, kernel=kernel))
    truth, drugs = test.ln_ic50.to_numpy(), test.drug.to_numpy()
    scores = {name: drug_response_metrics(value, truth, drugs)["pearson_per_drug"] for name, value in predictions.items()}
    assert scores["similar_drugs"] > max(v for k, v in scores.items() if k != "similar_drugs") + 0.05, scores
    # the prior's part is what carried it: without it the best kernel borrows from noise
    plain, _ = choose_kernel(train, prints, replace(similar, seed=seed, grid=KERNEL_GRID))
    without = baseline_predictions(train, test, prints, similar=replace(similar, kernel=plain))["similar_drugs"]
    assert scores["similar_drugs"] > drug_response_metrics(without, truth, drugs)["pearson_per_drug"] + 0.05


def test_a_prior_with_no_signal_or_no_rows_leaves_the_kernel_without_it():
    pairs, prints, similar = _prior_screen(0, informative=False)
    train = pairs[~split_pairs(pairs, "drug", 0.25, 0)]
    assert choose_kernel(train, prints, similar)[0].prior == 0  # random target rows: not chosen
    # no drug has a row: every prior kernel scores as its mix without the prior (the prior alone
    # as the cell-line mean), and each tie goes to the kernel without it
    kernel, choice = choose_kernel(train, prints, replace(similar, target_vectors={}))
    assert kernel.prior == 0
    for with_prior in (k for k in PRIOR_GRID if k.target or k.pathway or k.structure):
        assert choice["scores"][with_prior.label()] == choice["scores"][replace(with_prior, prior=0.0).label()]


# a TRRUST-format table of real human genes, one connected graph of 18 (GDSC targets among them),
# so the target-prior tests need none of the project's shared data
SMALL_GRN = (
    "TP53 MDM2, TP53 CDKN1A, TP53 BAX, TP53 BCL2, MYC TERT, MYC CDK4, MYC TP53, STAT3 MYC, STAT3 BCL2, "
    "STAT3 JAK2, STAT3 EGFR, EGFR ERBB2, BRAF MAP2K1, MAP2K1 MYC, AKT1 MTOR, MTOR PIK3CA, PIK3CA AKT1, "
    "AKT1 MDM2, HDAC1 CDKN1A"
)


def _small_grn(path: Path) -> Path:
    path.write_text("".join(f"{pair.replace(' ', chr(9))}\n" for pair in SMALL_GRN.split(", ")))
    return path


def test_read_target_priors_gives_gene_rows_and_names_the_option_on_bad_input(tmp_path):
    from celltron.finetune.drug.target_priors import coverage, read_target_priors

    assert read_target_priors(DrugSection()) == ([], [])
    grn = _small_grn(tmp_path / "grn.tsv")
    table = tmp_path / "genes.tsv"
    pd.DataFrame({"gene": ["EGFR", "ERBB2", "NOT_A_GENE"], "a": [1.0, 0.9, 0.0], "b": [0.0, 0.1, 1.0]}).to_csv(
        table, sep="\t", index=False
    )
    tables, records = read_target_priors(DrugSection(target_grn=str(grn), target_table=str(table), target_prior_dims=8))
    assert [r["name"] for r in records] == ["grn", "table"] and records[1]["genes_with_row"] == 2
    assert len(tables[0]["TP53"]) == 8 and set(tables[1]) >= {"EGFR", "ERBB2"} and "NOT_A_GENE" not in tables[1]
    targets = {"afatinib": frozenset({"egfr", "erbb2"}), "other": frozenset({"microtubule stabiliser"})}
    vectors = target_vectors(targets, tables)
    assert set(vectors) == {"afatinib"}
    assert coverage(targets, vectors, tables) == {
        "drugs_with_targets": 2,
        "drugs_with_vector": 1,
        "target_names": 3,
        "target_names_with_row": 2,
    }
    with pytest.raises(InputError, match=r"drug.target_grn \(--target-grn\) .*missing.tsv: no such file"):
        read_target_priors(DrugSection(target_grn=str(tmp_path / "missing.tsv")))
    with pytest.raises(InputError, match=r"drug.target_table \(--target-table\) .*missing.csv: no such file"):
        read_target_priors(DrugSection(target_table=str(tmp_path / "missing.csv")))
    pd.DataFrame({"gene": ["NOT_A_GENE"], "a": [1.0]}).to_csv(table, sep="\t", index=False)
    with pytest.raises(InputError, match=r"drug.target_table \(--target-table\) .*genes.tsv: none of its gene names is a human"):
        read_target_priors(DrugSection(target_table=str(table)))
    (tmp_path / "tiny.tsv").write_text("TP53\tMDM2\nTP53\tCDKN1A\nMYC\tTERT\n")
    with pytest.raises(ConfigError, match=r"tiny.tsv: its largest .* lower drug.target_prior_dims \(now 8"):
        read_target_priors(DrugSection(target_grn=str(tmp_path / "tiny.tsv"), target_prior_dims=8))


def test_a_drug_never_borrows_from_itself_or_its_twin():
    # A and A2 are one compound (a GDSC1/GDSC2 twin), same pathway, same fingerprint; B is another
    lines = [f"C{j}" for j in range(12)]
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.normal(0, 1, (3, 12)), index=["A", "A2", "B"], columns=lines)
    pairs = wide.stack().rename("ln_ic50").rename_axis(["drug", "cell_line"]).reset_index()
    held = (pairs.drug == "A") & pairs.cell_line.isin(lines[6:])  # A's other six lines stay in training
    train, test = pairs[~held], pairs[held]
    prints = {"A": np.array([1, 1, 0, 0], np.float32), "A2": np.array([1, 1, 0, 0], np.float32)}
    prints["B"] = np.array([1, 0, 1, 0], np.float32)
    similar = SimilarDrugs(pathways={"A": "p", "A2": "p", "B": "q"}, compound_of={"A": "A", "A2": "A", "B": "B"})
    pathway_only, structure_only = Kernel(0, 1, 0, 1), Kernel(0, 0, 1, 16)
    fallback = baseline_predictions(train, test, prints, similar=replace(similar, kernel=pathway_only))

    borrowing = Borrowing(train, test, prints, similar)
    assert borrowing.weights(structure_only).tolist() == [[0.0, 0.0, pytest.approx((1 / 3) ** 16)]]  # columns A, A2, B
    # only the twin shares A's pathway: nothing to borrow, so the cell-line mean
    np.testing.assert_allclose(fallback["similar_drugs"], fallback["cell_line_mean"])
    # by structure, A itself and its twin are the nearest, yet B's responses are what A gets
    np.testing.assert_allclose(borrowing.predict(structure_only, fallback["cell_line_mean"]), wide.loc["B", lines[6:]])
    # told apart as two compounds, A2 is borrowed from (so the checks above can fail)
    apart = Borrowing(train, test, prints, replace(similar, compound_of={}))
    np.testing.assert_allclose(apart.predict(pathway_only, fallback["cell_line_mean"]), wide.loc["A2", lines[6:]])


def test_drug_list_targets_and_pathways_are_parsed_and_missing_columns_fall_back(tmp_path, caplog):
    assert parse_targets(" EGFR;erbb2 , others,") == {"egfr", "erbb2"} and parse_targets("not defined") == frozenset()
    assert parse_targets(np.nan) == frozenset() and parse_targets("-") == frozenset()
    assert informative_pathway("EGFR  signaling") == "egfr signaling"
    assert {informative_pathway(p) for p in ("Other", "Other, kinases", "Unclassified", np.nan)} == {""}

    real = read_similar_drugs(shared_file("drug/GDSC_drug_list_2019-06-24.csv"), {}, "drug")
    assert real.grid == KERNEL_GRID and real.targets["GDSC:1032"] >= {"egfr", "erbb2"}  # Afatinib
    assert real.pathways["GDSC:1032"] == "egfr signaling" and real.pathways["GDSC:179"] == ""  # 5-FU: "Other"
    listed = pd.DataFrame({"drug_id": ["1", "2"], "Targets": ["EGFR", "EGFR"], "PubCHEM": ["1", "2"]})
    listed.to_csv(tmp_path / "no_pathway.csv", index=False)
    listed[["drug_id", "PubCHEM"]].to_csv(tmp_path / "bare.csv", index=False)
    with caplog.at_level(logging.WARNING):
        no_pathway = read_similar_drugs(tmp_path / "no_pathway.csv", {}, "drug")
    assert "no_pathway.csv: no column 'Target pathway'" in caplog.text and no_pathway.targets["GDSC:1"] == {"egfr"}
    assert no_pathway.grid and all(k.pathway == 0 for k in no_pathway.grid) and any(k.target for k in no_pathway.grid)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        bare = read_similar_drugs(tmp_path / "bare.csv", {}, "drug")
    assert "bare.csv: no column 'Target pathway' nor 'Targets'" in caplog.text and "fingerprints alone" in caplog.text
    assert bare.grid and all(k.target == k.pathway == 0 for k in bare.grid)


def _write_pathway_screen(tmp_path) -> None:
    """_pathway_screen's table as the files `celltron finetune drug-response` reads: the IC50 CSV,
    a GDSC-style drug list (with Targets and Target pathway) and CID<TAB>SMILES (small distinct
    molecules: the run's fingerprints come from these)."""
    pairs, _, similar = _pathway_screen(0)
    pairs.pivot(index="drug", columns="cell_line", values="ln_ic50").to_csv(tmp_path / "ic50.csv")
    drugs = sorted(similar.pathways, key=lambda d: int(d.split(":")[1]))
    ids = [d.split(":")[1] for d in drugs]
    listed = {"drug_id": ids, "Name": [f"drug {i}" for i in ids], "PubCHEM": [str(100 + int(i)) for i in ids]}
    listed["Targets"] = [", ".join(sorted(similar.targets[d])).upper() for d in drugs]
    listed["Target pathway"] = [similar.pathways[d] for d in drugs]
    pd.DataFrame(listed).to_csv(tmp_path / "drugs.csv", index=False)
    molecules = [f"{'C' * k}{end}" for end in ("O", "N", "Cl", "F") for k in range(1, 7)]
    (tmp_path / "smiles.txt").write_text("".join(f"{100 + int(i)}\t{m}\n" for i, m in zip(ids, molecules)))


def test_similar_drugs_kernel_is_chosen_without_the_held_out_drugs(tmp_path):
    _write_pathway_screen(tmp_path)
    metrics = _baselines_only(tmp_path, tmp_path / "ic50.csv", "run")
    choice = metrics["best_baseline"]["per_seed"]["0"]["similar_drugs"]
    assert choice["inner_folds"] == 3 and len(choice["scores"]) == len(KERNEL_GRID)
    assert choice["score"] == max(choice["scores"].values()) and choice["kernel"]["pathway"] > 0
    # new responses for the held-out drugs: their scores move, the kernel and its inner scores do not
    held = pd.read_csv(tmp_path / "run" / "predictions.csv")
    wide = pd.read_csv(tmp_path / "ic50.csv", index_col=0)
    wide.loc[held.drug.unique()] = np.random.default_rng(1).normal(0, 1, (held.drug.nunique(), wide.shape[1]))
    wide.to_csv(tmp_path / "changed.csv")
    changed = _baselines_only(tmp_path, tmp_path / "changed.csv", "changed")
    rechosen = changed["best_baseline"]["per_seed"]["0"]["similar_drugs"]
    assert rechosen["kernel"] == choice["kernel"] and rechosen["scores"] == pytest.approx(choice["scores"], rel=1e-12)
    before, after = (m["baselines"]["similar_drugs"]["pearson_per_drug"] for m in (metrics, changed))
    assert abs(after - before) > 0.1


def test_gdsc_drug_split_reports_similar_drugs_and_its_kernel(tmp_path):
    small = tmp_path / "gdsc_small.csv"
    pd.read_csv(shared_file("drug/GDSC_IC50_deepcdr_scfoundation.csv"), index_col=0).iloc[:40, :200].to_csv(small)
    drug_list, smiles = shared_file("drug/GDSC_drug_list_2019-06-24.csv"), shared_file("drug/DeepCDR_223drugs_pubchem_smiles.txt")
    arguments = ["finetune", "drug-response", "--mode", "ic50", "--data", str(small), "--drug-list", str(drug_list)]
    arguments += ["--smiles", str(smiles), "--split", "drug", "--seeds", "0", "--baselines-only", "--out", str(tmp_path / "run")]
    arguments += ["--target-grn", str(_small_grn(tmp_path / "grn.tsv")), "--set", "drug.target_prior_dims=4"]
    assert main(arguments) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["baselines"]["similar_drugs"]["pearson_per_drug"])
    seed = metrics["best_baseline"]["per_seed"]["0"]
    assert "similar_drugs" in seed["scores"] and set(seed["similar_drugs"]["kernel"]) == {
        "target",
        "pathway",
        "structure",
        "sharpness",
        "prior",
    }
    assert seed["similar_drugs"]["scores"].keys() == {k.label() for k in KERNEL_GRID + PRIOR_GRID}
    assert "pred_similar_drugs" in pd.read_csv(tmp_path / "run" / "predictions.csv").columns
    # the graph reaches some GDSC targets (EGFR, BRAF, MTOR, ...), not families like "PI3K (class 1)"
    reach = metrics["target_priors"]
    assert reach["priors"][0]["name"] == "grn" and reach["priors"][0]["sources"][0]["sha256"]
    assert (
        0 < reach["target_names_with_row"] < reach["target_names"]
        and 0 < reach["drugs_with_vector"] < reach["drugs_with_targets"]
    )
    assert reach["kernels"] == len(KERNEL_GRID) + len(PRIOR_GRID)


def test_target_priors_are_refused_in_expression_mode():
    with pytest.raises(ConfigError, match=r"drug.target_grn / drug.target_table .* ic50 mode.*unset them"):
        load_finetune_config(CONFIG, ["drug.mode=expression", "drug.target_grn=trrust.tsv"])
    assert load_finetune_config(CONFIG, ["drug.target_table=genes.tsv"]).drug.target_table == "genes.tsv"
