"""Drug response, expression mode (chemCPA style), on a simulated sciplex-format screen with
known Hill-curve dose responses: the loader, splits by drug x dose or by drug (never by cell),
R² metrics and the two baselines, and `celltron finetune drug-response --mode expression`
beating the control mean on held-out combinations, also with a pretrained model's basal state."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from celltron.cli import main
from celltron.finetune.config import DrugSection
from celltron.finetune.drug.expression import (
    baseline_predictions,
    cell_labels,
    choose_baseline,
    evaluate,
    inner_folds,
    pseudobulk,
    r2,
    split_conditions,
)
from celltron.lab.data import read_lab_data
from tests.finetune.test_drug_response import SMILES, demo_gene_symbols
from tests.simulate import simulate_drug_screen

pytestmark = pytest.mark.usefixtures("one_thread")

DRUGS = ["aspirin", "ibuprofen", "paracetamol", "caffeine", "imatinib", "gefitinib", "erlotinib", "dopamine"]


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """3 cell types x 8 drugs x 4 doses x 20 cells, 80 controls per cell type, over 200 genes the
    demo-pretrained model knows; written as .h5ad with a DRUG<TAB>SMILES file beside it."""
    folder = tmp_path_factory.mktemp("drug_screen")
    simulated = simulate_drug_screen({d: SMILES[d] for d in DRUGS}, genes=demo_gene_symbols()[:200], seed=0)
    simulated.adata.write_h5ad(folder / "screen.h5ad")
    (folder / "smiles.tsv").write_text("".join(f"{d}\t{SMILES[d]}\n" for d in DRUGS))
    return folder, simulated


def _pseudobulk(folder):
    lab = read_lab_data(folder / "screen.h5ad", ["drug", "dose", "cell_type"])
    return pseudobulk(lab, cell_labels(lab, DrugSection()), n_genes=0)


def test_pseudobulk_finds_each_conditions_programme(screen):
    folder, simulated = screen
    bulk = _pseudobulk(folder)
    assert len(bulk.conditions) == 8 * 4 * 3 and sorted(bulk.control) == ["type0", "type1", "type2"]
    assert (bulk.conditions.n_cells == 20).all() and bulk.means.shape == (96, 200)
    # at the top dose, the top DE genes are genes the drug's simulated programme moves (30% of all genes)
    for index in bulk.conditions.index[bulk.conditions.dose == 10000]:
        row = bulk.conditions.loc[index]
        shift = simulated.shifts[f"{row.drug}|10000|{row.cell_type}"]
        assert np.mean(shift[bulk.de[index]] != 0) >= 0.8
    assert r2(np.ones(3), np.ones(3) * 2) != r2(np.arange(3.0), np.arange(3.0)) == 1.0


def test_splits_hold_out_combinations_or_drugs_never_cells(screen):
    bulk = _pseudobulk(screen[0])
    conditions = bulk.conditions
    test = split_conditions(conditions, "heldout_combination", 0.25, seed=0)
    held = conditions[test]
    assert len(held[["drug", "dose"]].drop_duplicates()) == 8 and len(held) == 24  # every cell type of a combination
    assert set(held.drug) <= set(conditions[~test].drug)  # each drug keeps a training dose
    drugs = split_conditions(conditions, "heldout_drug", 0.25, seed=0)
    assert conditions[drugs].drug.nunique() == 2 and not set(conditions[drugs].drug) & set(conditions[~drugs].drug)
    assert (split_conditions(conditions, "heldout_drug", 0.25, seed=1) != drugs).any()
    with pytest.raises(ValueError, match="--split"):
        split_conditions(conditions, "random", 0.25, 0)


def test_other_dose_baseline_beats_the_control_mean_on_heldout_combinations(screen):
    bulk = _pseudobulk(screen[0])
    test = split_conditions(bulk.conditions, "heldout_combination", 0.25, seed=0)
    predicted, fell_back = baseline_predictions(bulk, test)
    control, other = evaluate(predicted["control_mean"], bulk, test), evaluate(predicted["other_dose"], bulk, test)
    assert fell_back == 0 and other["r2_de20"] > control["r2_de20"] + 0.1 and other["r2"] > control["r2"]
    # for held-out drugs it falls back to the training drugs' mean at that dose
    drugs = split_conditions(bulk.conditions, "heldout_drug", 0.25, seed=0)
    assert baseline_predictions(bulk, drugs)[1] == drugs.sum()


def test_inner_folds_partition_training_conditions_as_the_outer_split_holds_out(screen):
    conditions = _pseudobulk(screen[0]).conditions
    for kind in ("heldout_drug", "heldout_combination"):
        test = split_conditions(conditions, kind, 0.25, seed=0)
        folds = inner_folds(conditions, ~test, kind, 3, seed=0)
        assert len(folds) == 3 and not any((fold & test).any() for fold in folds)  # never an outer test condition
        assert (np.sum(folds, axis=0) <= 1).all()  # disjoint
        for fold in folds:
            inner_train = ~test & ~fold
            if kind == "heldout_drug":
                assert not set(conditions.drug[fold]) & set(conditions.drug[inner_train])
            else:  # each held-out drug keeps a training dose; a combination's cell types move together
                assert set(conditions.drug[fold]) <= set(conditions.drug[inner_train])
                combos = conditions[fold][["drug", "dose"]].drop_duplicates()
                assert len(conditions[fold]) == 3 * len(combos)
    with pytest.raises(ValueError, match="inner fold"):
        inner_folds(conditions, conditions.drug.eq("aspirin").to_numpy(), "heldout_drug", 3, seed=0)


def test_the_best_baseline_is_chosen_on_training_conditions_only(screen):
    bulk = _pseudobulk(screen[0])
    test = split_conditions(bulk.conditions, "heldout_combination", 0.25, seed=0)
    folds = inner_folds(bulk.conditions, ~test, "heldout_combination", 3, seed=0)
    choice = choose_baseline(bulk, folds, ~test)
    assert choice["name"] == "other_dose" and choice["score"] > choice["inner_scores"]["control_mean"]
    bulk.means[test] = np.random.default_rng(0).normal(size=bulk.means[test].shape)  # held-out truth scrambled
    assert choose_baseline(bulk, folds, ~test) == choice


def test_control_label_and_dose_column_errors_name_the_fix(screen):
    lab = read_lab_data(screen[0] / "screen.h5ad", ["drug", "dose", "cell_type"])
    lab.obs["dose"] = lab.obs["dose"].where(lab.obs["dose"] > 0, 1.0)  # controls known by their label alone
    assert cell_labels(lab, DrugSection(control="control")).control.sum() == 3 * 80
    with pytest.raises(ValueError, match=r"screen.h5ad: no control cells.*'vehicle'.*--control"):
        cell_labels(lab, DrugSection(control="vehicle"))
    lab.obs["dose"] = lab.obs["dose"].astype(str).replace("1.0", "n/a")
    with pytest.raises(ValueError, match=r"obs\['dose'\] has non-numeric doses.*--dose-key"):
        cell_labels(lab, DrugSection())


def _run(screen, out, *extra):
    folder, _ = screen
    return main(
        [
            "finetune",
            "drug-response",
            "--mode",
            "expression",
            "--data",
            str(folder / "screen.h5ad"),
            "--smiles",
            str(folder / "smiles.tsv"),
            "--drug-key",
            "drug",
            "--dose-key",
            "dose",
            "--cell-type-key",
            "cell_type",
            "--control",
            "control",
            "--test-fraction",
            "0.25",
            "--out",
            str(out),
            "--set",
            "data.batch_size=32",
            "--set",
            "drug.hidden=64",
            "--set",
            "optim.lr=0.003",
            "--set",
            "optim.warmup_steps=10",
            *extra,
        ]
    )


def test_expression_mode_beats_the_control_mean_on_heldout_combinations(screen, tmp_path):
    code = _run(
        screen,
        tmp_path / "run",
        "--split",
        "heldout_combination",
        "--seeds",
        "0",
        "1",
        "--max-steps",
        "200",
        "--set",
        "drug.head=plain",
    )
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["head"] == "plain" and metrics["model_plain"] is None
    assert {c["name"] for c in metrics["best_baseline"]["per_seed"].values()} == {"other_dose"}
    assert (
        metrics["mode"] == "expression"
        and metrics["split"]["kind"] == "heldout_combination"
        and metrics["basal"] == "control_mean"
    )
    model, baselines = metrics["model"], metrics["baselines"]
    print({name: (round(r["r2"], 3), round(r["r2_de20"], 3)) for name, r in [("model", model), *baselines.items()]})
    assert set(baselines) == {"control_mean", "other_dose"} and set(model["per_seed"]) == {"0", "1"}
    assert model["r2_de20"] > baselines["control_mean"]["r2_de20"] + 0.15 and model["r2"] > baselines["control_mean"]["r2"]
    assert baselines["other_dose"]["r2_de20"] > baselines["control_mean"]["r2_de20"]
    predictions = ad.read_h5ad(tmp_path / "run" / "predictions.h5ad")
    assert predictions.shape == (2 * 24, 200) and {"truth", "control_mean", "other_dose"} <= set(predictions.layers)
    assert {"drug", "dose", "cell_type", "seed"} <= set(predictions.obs.columns)
    assert (tmp_path / "run" / "r2_de20.png").stat().st_size > 0


def test_expression_mode_with_a_pretrained_basal_state_on_heldout_drugs(screen, pretrained_geneformer, tmp_path):
    assert (
        _run(
            screen,
            tmp_path / "run",
            "--model",
            str(pretrained_geneformer),
            "--split",
            "heldout_drug",
            "--seeds",
            "0",
            "--max-steps",
            "40",
            "--set",
            "drug.control_cells=32",
        )
        == 0
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["basal"] == "pretrained_embedding" and metrics["model_folder"] == str(pretrained_geneformer)
    split = metrics["split"]["per_seed"]["0"]
    assert len(split["test_drugs"]) == 2 and split["other_dose_fell_back"] == split["test_conditions"] == 24
    assert "training drugs at that dose" in metrics["notes"]["other_dose"]
    assert all(np.isfinite(metrics["model"][m]) for m in ("r2", "r2_de20"))


def test_the_anchored_head_at_weight_zero_is_the_chosen_baseline_exactly(screen, tmp_path, capsys):
    out = tmp_path / "run"
    code = _run(screen, out, "--split", "heldout_drug", "--seeds", "0", "--max-steps", "20", "--set", "drug.anchor_weights=[0]")
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (choice,) = metrics["best_baseline"]["per_seed"].values()
    assert metrics["head"] == "anchored" and choice["weight"] == 0 and list(choice["weight_scores"]) == ["0.0"]
    assert metrics["model"]["per_condition"] == metrics["baselines"][choice["name"]]["per_condition"]
    paired = metrics["paired"]
    assert paired["unit"] == "drugs" and paired["n_units"] == 2 and paired["mean"] == 0
    predictions = ad.read_h5ad(out / "predictions.h5ad")
    assert np.array_equal(predictions.X, predictions.layers[choice["name"]]) and "model_plain" in predictions.layers
    assert (
        len(list(out.glob("seed0/inner*"))) == metrics["split"]["per_seed"]["0"]["inner_folds"] == 3  # a model per inner fold
    )
    printed = capsys.readouterr().out
    assert "anchored head: best baseline + w x" in printed and "model − " in printed and "model, plain head" in printed


def test_the_anchored_head_chooses_learning_rate_and_length_on_training_conditions(screen, tmp_path):
    out = tmp_path / "run"
    settings = ("--set", "drug.learning_rates=[1e-7,0.003]", "--set", "drug.step_fractions=[0.5,1]")
    assert _run(screen, out, "--split", "heldout_combination", "--seeds", "0", "--max-steps", "200", *settings) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (choice,) = metrics["best_baseline"]["per_seed"].values()
    scores = choice["setting_scores"]
    assert set(scores) == {"lr=1e-07,steps=100", "lr=1e-07,steps=200", "lr=0.003,steps=100", "lr=0.003,steps=200"}
    # at 1e-7 the model stays where it started (the control mean); on held-out doses of seen drugs
    # a trained model does better, and the inner folds (training conditions only) must see it
    assert choice["learning_rate"] == 0.003 and scores[f"lr=0.003,steps={choice['steps']}"] > scores["lr=1e-07,steps=200"]
    assert {p.name for p in (out / "seed0" / "inner0").iterdir()} >= {"lr1e-07", "lr0.003"}
    assert np.isfinite(metrics["paired"]["mean"])
