"""Cross-modal tasks on paired cells: RNA -> protein prediction, alignment, joint annotation.

Simulated paired cells with a known answer (a linear RNA -> protein map, two views of one
latent state), the metrics on cases computed by hand, the real TEA-seq and SNARE-seq test sets
through the command line, and the refusals of bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltron.errors import ConfigError, InputError
from celltron.finetune.config import FinetuneConfig
from celltron.finetune.crossmodal import baselines as bl
from celltron.finetune.crossmodal.evaluate import foscttm, label_transfer, per_protein_scores, recall_at_k
from celltron.finetune.crossmodal.features import clr
from celltron.finetune.crossmodal.run import run_crossmodal, split_cells

DATA = Path(__file__).resolve().parents[1] / "data" / "multiomics"
TEASEQ = (f"rna={DATA / 'teaseq_pbmc_300cells_rna.h5ad'}", f"adt={DATA / 'teaseq_pbmc_300cells_adt.h5ad'}")
SNARESEQ = (
    f"rna={DATA / 'snareseq_mouse_cortex_300cells_rna.h5ad'}",
    f"atac={DATA / 'snareseq_mouse_cortex_300cells_atac.h5ad'}",
)


def paired_latent(n_cells: int = 500, n_genes: int = 120, n_proteins: int = 12, seed: int = 0, linked: bool = True):
    """Raw counts of RNA and proteins driven by one latent state per cell (4 dimensions): the
    protein log-rates are a linear map of it, so CLR proteins are (nearly) linear in the RNA's
    principal components. `linked` False: the proteins follow another cells' state. The maps
    are the same for every seed (new cells of the same biology)."""
    maps = np.random.default_rng(100)
    to_rna, to_proteins = maps.normal(0, 0.6, (4, n_genes)), maps.normal(0, 0.5, (4, n_proteins))
    rng = np.random.default_rng(seed)
    state = rng.normal(size=(n_cells, 4))
    rna = rng.poisson(np.exp(1.0 + state @ to_rna))
    protein_state = state if linked else state[rng.permutation(n_cells)]
    proteins = rng.poisson(np.exp(4.0 + protein_state @ to_proteins))
    names = [f"cell{i}" for i in range(n_cells)]
    labels = np.where(state[:, 0] > 0, "high", "low")
    make = lambda counts, prefix: ad.AnnData(  # noqa: E731
        sp.csr_matrix(counts.astype(np.int32)),
        obs={"cell_type": labels, "batch": [f"b{i % 4}" for i in range(n_cells)]},
        var={"name": [f"{prefix}{j}" for j in range(counts.shape[1])]},
    )
    rna_data, protein_data = make(rna, "GENE"), make(proteins, "P")
    for data, prefix in ((rna_data, "GENE"), (protein_data, "P")):
        data.obs_names = names
        data.var_names = [f"{prefix}{j}" for j in range(data.n_vars)]
    return rna_data, protein_data


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paired")
    files = {}
    for linked in (True, False):
        rna, proteins = paired_latent(linked=linked)
        tag = "linked" if linked else "shuffled"
        rna.write_h5ad(folder / f"rna_{tag}.h5ad")
        proteins.write_h5ad(folder / f"adt_{tag}.h5ad")
        files[tag] = (f"rna={folder / f'rna_{tag}.h5ad'}", f"adt={folder / f'adt_{tag}.h5ad'}")
    return files


def config_for(task: str, modalities, **fields) -> FinetuneConfig:
    config = FinetuneConfig()
    defaults = {"seeds": (0, 1), "umap": False, "components": 20, "top_genes": 0}
    section = replace(config.crossmodal, task=task, modalities=tuple(modalities), **{**defaults, **fields})
    return replace(config, crossmodal=section).check()


# ---------------------------------------------------------------- metrics with known answers


def test_metrics_on_cases_computed_by_hand():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert foscttm(x, x).tolist() == [0.0, 0.0, 0.0]
    assert recall_at_k(x, x, (1,)) == {"recall_at_1": 1.0}
    # the partners of cells 0 and 1 swapped: each finds one cell of two nearer than its partner
    swapped = x[[1, 0, 2]]
    assert foscttm(x, swapped).tolist() == pytest.approx([0.5, 0.5, 0.0])
    truth = np.array([[1.0, 5.0], [2.0, 3.0], [3.0, 4.0]])
    scores = per_protein_scores(truth, np.array([[2.0, 5.0], [4.0, 5.0], [6.0, 5.0]]))
    assert scores["pearson"][0] == pytest.approx(1.0) and np.isnan(scores["pearson"][1])  # constant: undefined, not 0
    transfer = label_transfer(x, np.array(["a", "a", "b"]), x + 0.1, np.array(["a", "a", "b"]), neighbors=1)
    assert transfer == {"transfer_accuracy": 1.0, "transfer_macro_f1": 1.0}


def test_clr_centres_each_cell_over_its_panel():
    values = clr(sp.csr_matrix(np.array([[0, 3, 7], [1, 1, 1]])))
    assert np.allclose(values.sum(1), 0) and np.allclose(values[1], 0)
    assert values[0, 2] - values[0, 1] == pytest.approx(np.log(8) - np.log(4))


def test_cca_recovers_a_latent_shared_by_two_views_on_held_out_rows():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(400, 3))
    first = latent @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(400, 12))
    second = latent @ rng.normal(size=(3, 8)) + 0.1 * rng.normal(size=(400, 8))
    train, test = np.arange(300), np.arange(300, 400)
    a, b, correlations = bl.cca(first, second, train, components=3)
    assert correlations.min() > 0.95
    assert foscttm(a[test], b[test]).mean() < 0.02
    unrelated = rng.normal(size=(400, 8))
    a, b, _ = bl.cca(first, unrelated, train, components=3)
    assert foscttm(a[test], b[test]).mean() > 0.35  # nothing shared: near chance (0.5) on held-out rows


# ---------------------------------------------------------------- prediction


def test_a_linear_rna_to_protein_map_is_recovered_and_noise_is_not(simulated, tmp_path):
    linked = run_crossmodal(config_for("predict", simulated["linked"], label_key="cell_type"), tmp_path / "linked")
    ridge = linked["baselines"]["ridge_rna_pca"]
    assert ridge["pearson"] > 0.8 and ridge["cell_pearson"] > 0.8
    assert ridge["mse"] < 0.5 * linked["baselines"]["mean_profile"]["mse"]
    assert np.isnan(linked["baselines"]["mean_profile"]["pearson"])  # constant prediction: n/a, never 0
    written = json.loads((tmp_path / "linked" / "metrics.json").read_text())
    assert written["baselines"]["mean_profile"]["pearson"] is None
    assert set(linked["baselines"]["ridge_rna_pca"]["per_cell_type"]["0"]) == {"high", "low"}
    for seed, choice in linked["best_baseline"]["per_seed"].items():
        assert choice["name"] in ("knn_rna_pca", "ridge_rna_pca")
        assert choice["score"] == np.nanmax(list(choice["inner_scores"].values()))
    # the best baseline's 0.9 intervals, calibrated on training cells predicted out of fold
    uncertainty = linked["uncertainty"]
    assert 0.8 < uncertainty["coverage"] < 0.98 and uncertainty["ood"]["n_cells"] == 100 * len(linked["seeds"])
    assert uncertainty["ood"]["n_flagged"] < 0.2 * uncertainty["ood"]["n_cells"]  # held-out cells are like the training ones
    shuffled = run_crossmodal(config_for("predict", simulated["shuffled"]), tmp_path / "shuffled")
    assert abs(shuffled["baselines"]["ridge_rna_pca"]["pearson"]) < 0.15  # proteins of other cells: nothing to learn

    predictions = ad.read_h5ad(tmp_path / "linked" / "predictions.h5ad")
    assert predictions.shape == (500, 12) and "measured" in predictions.layers
    assert set(predictions.obs["celltron_split"]) == {"train", "test"}
    assert (predictions.obs["celltron_split"] == "test").sum() == 100


def test_query_cells_get_predictions_from_every_paired_cell(simulated, tmp_path):
    rna, proteins = paired_latent(n_cells=80, seed=1)  # the same generator's genes, new cells
    rna = rna[:, ::-1].copy()  # genes in another order: matched by name
    rna.write_h5ad(tmp_path / "query.h5ad")
    metrics = run_crossmodal(config_for("predict", simulated["linked"], query=str(tmp_path / "query.h5ad")), tmp_path / "out")
    assert metrics["query"]["n_cells"] == 80
    predicted = ad.read_h5ad(tmp_path / "out" / "query_predictions.h5ad")
    assert predicted.shape == (80, 12) and list(predicted.var_names) == [f"P{j}" for j in range(12)]


def test_a_query_with_a_different_protein_panel_is_refused(simulated, tmp_path):
    import mudata

    mudata.set_options(pull_on_update=False)
    rna, proteins = paired_latent(n_cells=60, seed=2)
    mudata.MuData({"rna": rna, "adt": proteins[:, 1:].copy()}).write_h5mu(tmp_path / "query.h5mu")
    with pytest.raises(InputError, match=r"protein panel differs.*missing: \['P0'\]"):
        run_crossmodal(config_for("predict", simulated["linked"], query=str(tmp_path / "query.h5mu")), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_query_with_the_same_panel_in_another_order_is_scored(simulated, tmp_path):
    import mudata

    mudata.set_options(pull_on_update=False)
    rna, proteins = paired_latent(n_cells=60, seed=3)
    mudata.MuData({"rna": rna, "adt": proteins[:, ::-1].copy()}).write_h5mu(tmp_path / "query.h5mu")
    metrics = run_crossmodal(config_for("predict", simulated["linked"], query=str(tmp_path / "query.h5mu")), tmp_path / "out")
    assert metrics["query"]["scores"]["pearson"] > 0.7  # measured proteins put back in the training panel's order


# ---------------------------------------------------------------- real sets, tiny settings, through the CLI


def test_predict_align_annotate_on_the_real_test_sets(tmp_path, capsys):
    from celltron.cli import main

    modality_flags = [flag for entry in TEASEQ for flag in ("--modality", entry)]
    assert (
        main(
            [
                "finetune",
                "cross-modal",
                "predict",
                *modality_flags,
                "--label-key",
                "cell_type",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    predict = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert predict["model"] is None and predict["n_proteins"] == 46
    assert predict["baselines"]["ridge_rna_pca"]["pearson"] > 0.3  # RNA does tell proteins apart on real cells

    snare = [flag for entry in SNARESEQ for flag in ("--modality", entry)]
    args = [
        "finetune",
        "cross-modal",
        "align",
        *snare,
        "--source",
        "rna",
        "--target",
        "atac",
        "--label-key",
        "cluster (remapped)",
    ]
    assert (
        main([*args, "--split", "batch", "--batch-key", "Batch", "--seeds", "0", "--no-umap", "--out", str(tmp_path / "a")]) == 0
    )
    align = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert 0 < align["baselines"]["cca"]["foscttm"] < 0.5  # better than chance, far from perfect on 300 sparse cells
    held_out = align["split"]["held_out_batches"]["0"]
    aligned = ad.read_h5ad(tmp_path / "a" / "predictions.h5ad")
    assert set(aligned.obs["modality"]) == {"rna", "atac"} and aligned.obsm["X_aligned"].shape[0] == 2 * len(
        aligned.obs["cell"].unique()
    )
    cells = ad.read_h5ad(DATA / "snareseq_mouse_cortex_300cells_rna.h5ad").obs
    assert set(cells.loc[aligned.obs["cell"].unique(), "Batch"]) == set(held_out)  # whole batches, nothing else

    annotate = ["finetune", "cross-modal", "annotate", *modality_flags, "--target", "adt", "--label-key", "cell_type"]
    assert main([*annotate, "--seeds", "0", "--out", str(tmp_path / "n")]) == 0
    result = json.loads((tmp_path / "n" / "metrics.json").read_text())
    assert set(result["baselines"]) == {"rna_pca_knn", "joint_knn"} and (tmp_path / "n" / "umap.png").exists()
    assert result["joint_against_rna"]["macro_f1"]["n_units"] == 5  # the same 5 folds for both
    assert "joint_knn − rna_pca_knn" in capsys.readouterr().out


def test_inner_choices_are_scored_on_cells_the_model_never_saw():
    from celltron.finetune.crossmodal.model import inner_folds

    train = np.arange(0, 100, 2)
    seen = np.zeros(100, dtype=bool)
    seen[:60] = True  # the cells a model was pretrained on
    folds = inner_folds(train, 3, seed=0, seen=seen)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held) == list(range(60, 100, 2))  # every unseen training cell once, no seen one
    for fit, held_out in folds:
        assert sorted(np.concatenate([fit, held_out])) == list(train)  # the seen cells stay in every fit
    with pytest.raises(InputError, match="too few for 3 inner folds"):
        inner_folds(train, 3, seed=0, seen=np.arange(100) < 96)


def test_batch_splits_never_put_a_batch_on_both_sides(simulated):
    from celltron.finetune.crossmodal.data import parse_modality_files, read_paired

    paired = read_paired(None, parse_modality_files(simulated["linked"]), ("rna", "adt"))
    section = replace(FinetuneConfig().crossmodal, split="batch", batch_key="batch", test_fraction=0.25)
    batches = paired.column("batch", "--batch-key")
    for seed in range(4):
        train, test = split_cells(paired, section, seed)
        assert not set(batches[train]) & set(batches[test]) and len(train) + len(test) == paired.n_cells
    pretrained_on = batches == "b0"  # a batch holding cells a model saw is never held out
    held = {batch for seed in range(8) for batch in batches[split_cells(paired, section, seed, pretrained_on)[1]]}
    assert held and "b0" not in held


# ---------------------------------------------------------------- refusals


def test_unpaired_cells_are_refused_naming_the_modality_and_count(tmp_path):
    rna, proteins = paired_latent(n_cells=50)
    rna.write_h5ad(tmp_path / "rna.h5ad")
    proteins[:45].copy().write_h5ad(tmp_path / "adt.h5ad")
    modalities = (f"rna={tmp_path / 'rna.h5ad'}", f"adt={tmp_path / 'adt.h5ad'}")
    with pytest.raises(InputError, match=r"adt.h5ad \(adt\): 5 of the 50 cells are not measured in adt.*paired cells"):
        run_crossmodal(config_for("predict", modalities), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_settings_and_inputs_are_refused_clearly(simulated, tmp_path):
    with pytest.raises(ConfigError, match="prediction is RNA -> proteins"):
        run_crossmodal(config_for("predict", SNARESEQ, target="atac"), tmp_path / "x")
    with pytest.raises(ConfigError, match="both rna"):
        run_crossmodal(config_for("align", simulated["linked"], target="gex"), tmp_path / "x")
    with pytest.raises(InputError, match="no atac modality"):
        run_crossmodal(config_for("align", simulated["linked"], target="atac"), tmp_path / "x")
    with pytest.raises(ConfigError, match="batch_key"):
        config_for("align", simulated["linked"], split="batch")
    with pytest.raises(ConfigError, match="label_key"):
        config_for("annotate", simulated["linked"])
    with pytest.raises(InputError, match="no obs column 'donor'"):
        run_crossmodal(config_for("align", simulated["linked"], label_key="donor"), tmp_path / "x")
    rna, proteins = paired_latent(n_cells=40)
    proteins.X = proteins.X.astype(np.float32) * 0.5  # normalised, not counts
    rna.write_h5ad(tmp_path / "rna.h5ad")
    proteins.write_h5ad(tmp_path / "adt.h5ad")
    with pytest.raises(InputError, match=r"adt.h5ad \(modality adt\).*non-integer"):
        run_crossmodal(config_for("predict", (f"rna={tmp_path / 'rna.h5ad'}", f"adt={tmp_path / 'adt.h5ad'}")), tmp_path / "x")


# ---------------------------------------------------------------- a pretrained model's head


@pytest.fixture(scope="module")
def teaseq_model(tmp_path_factory):
    """A randomly initialised debug Geneformer bound to the TEA-seq test cells' genes."""
    from celltron.finetune.crossmodal.data import parse_modality_files, read_paired
    from celltron.finetune.crossmodal.model import rna_lab_data
    from tests.finetune.conftest import build_model_folder

    paired = read_paired(None, parse_modality_files(TEASEQ), ("rna", "adt"))
    return build_model_folder("geneformer", rna_lab_data(paired), tmp_path_factory.mktemp("model") / "geneformer")


def test_weight_zero_is_the_best_baseline_exactly(teaseq_model, tmp_path):
    config = config_for("predict", TEASEQ, anchor_weights=(0.0,), components=10)
    metrics = run_crossmodal(config, tmp_path / "out", model=str(teaseq_model))
    for seed, choice in metrics["best_baseline"]["per_seed"].items():
        assert choice["weight"] == 0.0
        best = metrics["baselines"][choice["name"]]["per_protein"][seed]
        assert metrics["model"]["per_protein"][seed] == best  # bit for bit
    assert metrics["paired"]["mean"] == 0.0 and metrics["model_plain"] is not None
    # and so are its intervals: the head refitted on each inner fold is the baseline refitted there
    uncertainty = metrics["uncertainty"]
    assert uncertainty["model_intervals"]["coverage"] == uncertainty["coverage"]
    assert uncertainty["model_intervals"]["mean_width"] == pytest.approx(uncertainty["mean_width"])
    # the model alone (the ridge) has its own, from its inner refits, whatever the weight
    alone = uncertainty["model_plain_intervals"]
    assert 0.75 <= alone["coverage"] <= 1.0 and alone["mean_width"] != pytest.approx(uncertainty["mean_width"])


def test_the_anchored_head_earns_a_weight_only_by_inner_cv_and_reports_the_plain_model(teaseq_model, tmp_path, capsys):
    train_only = tmp_path / "pretrained_on.txt"
    cells = ad.read_h5ad(DATA / "teaseq_pbmc_300cells_rna.h5ad").obs_names
    train_only.write_text("\n".join(cells[:150]) + "\n")
    config = config_for("predict", TEASEQ, components=10, train_only=str(train_only), test_fraction=0.4)
    metrics = run_crossmodal(config, tmp_path / "out", model=str(teaseq_model))
    for seed, choice in metrics["best_baseline"]["per_seed"].items():
        assert choice["weight"] in (0.0, 0.25, 0.5, 0.75, 1.0) and set(choice["gain_low"]) == {"0.25", "0.5", "0.75", "1.0"}
        earned = [w for w, low in choice["gain_low"].items() if low is not None and low > 0]
        assert (choice["weight"] == 0.0) == (not earned)  # a weight above 0 only where its gain's interval is above 0
    assert metrics["paired"]["unit"] == "proteins" and metrics["paired"]["n_units"] == 46
    assert metrics["split"]["per_seed"]["0"]["test"] == 60  # 40% of the 150 cells not pretrained on
    predictions = ad.read_h5ad(tmp_path / "out" / "predictions.h5ad")
    held_out = predictions.obs_names[predictions.obs["celltron_split"] == "test"]
    assert not set(held_out) & set(cells[:150])
    out = capsys.readouterr().out
    assert "model, plain head" in out and "model − " in out and "over 46 proteins" in out
    # the head's 0.9 intervals, calibrated on inner held-out cells it was never pretrained on
    assert 0.75 <= metrics["uncertainty"]["model_intervals"]["coverage"] <= 1.0
    assert "model head, 0.9 intervals per protein" in out and "model alone, 0.9 intervals per protein" in out


def test_mc_dropout_intervals_of_the_model_alone_are_calibrated_on_training_cells(teaseq_model, tmp_path, capsys):
    """crossmodal.intervals mc_dropout: the ridge, fitted on the dropout-off embedding, reads
    each pass's embedding; its dropout-off prediction is the plain head's, and the passes'
    spread, scaled per protein on inner folds, gives intervals that hold their level."""
    from celltron.finetune.crossmodal.data import parse_modality_files, read_paired
    from celltron.finetune.crossmodal.model import ModelViews, dropout_predictions, model_predictor

    config = config_for("predict", TEASEQ, components=10, seeds=(0,), head="plain", intervals="mc_dropout", dropout_passes=5)
    metrics = run_crossmodal(config, tmp_path / "out", model=str(teaseq_model))
    dropout = metrics["uncertainty"]["model_dropout_intervals"]
    assert dropout["passes"] == 5 and 0.75 <= dropout["coverage"] <= 1.0 and dropout["mean_width"] > 0
    assert 0 <= dropout["gaussian_coverage"] < dropout["coverage"]  # the raw spread is narrower than its calibration
    assert dropout["spread_vs_error"]["n_units"] == metrics["split"]["per_seed"]["0"]["test"]
    assert "model alone, MC dropout, 0.9 intervals per protein" in capsys.readouterr().out
    # the dropout-off centre is the plain head's ridge exactly; the passes differ from it and each other
    paired = read_paired(None, parse_modality_files(TEASEQ), ("rna", "adt"))
    views = ModelViews(teaseq_model, paired, "adt", 32, 0)
    targets, train = clr(paired.counts["adt"]), np.arange(0, 300, 2)
    embedding, passes = views.rna(), views.rna_dropout_passes(3)
    assert passes.shape == (3, *embedding.shape) and not np.allclose(passes[0], passes[1])
    np.testing.assert_array_equal(passes, views.rna_dropout_passes(3))  # seeded
    centre, draws = dropout_predictions(embedding, passes, targets, train, config.crossmodal, 0)
    plain, _ = model_predictor(embedding, targets, train, config.crossmodal, 0)
    np.testing.assert_allclose(centre, plain(train), rtol=1e-6, atol=1e-8)
    assert draws.shape == (3, 300, targets.shape[1]) and not np.allclose(draws[0], centre)
    with pytest.raises(ConfigError, match="crossmodal.intervals mc_dropout"):
        config_for("align", TEASEQ, intervals="mc_dropout")


def test_align_refuses_a_model_that_reads_rna_only(teaseq_model, tmp_path):
    with pytest.raises(ConfigError, match="reads RNA only.*multimodal.joint"):
        run_crossmodal(config_for("align", TEASEQ), tmp_path / "x", model=str(teaseq_model))
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def teaseq_corpus(tmp_path_factory):
    from celltron.corpus.build_multimodal import build_multimodal_corpus
    from celltron.corpus.options import BuildOptions

    out = tmp_path_factory.mktemp("teaseq") / "corpus"
    files = {"rna": DATA / "teaseq_pbmc_300cells_rna.h5ad", "adt": DATA / "teaseq_pbmc_300cells_adt.h5ad"}
    build_multimodal_corpus(None, out, BuildOptions(progress=False, val_fraction=0.0), modalities=files)
    return out


def pretrained(config_name: str, corpus, out) -> Path:
    """configs/pretrain/CONFIG_NAME pretrained 4 steps on `corpus`; its export folder."""
    from celltron.pretrain.run import pretrain
    from tests.pretrain.conftest import config_for as pretrain_config

    trainer = {"max_steps": 4, "val_every": 100, "checkpoint_every": 4, "log_every": 2}
    return pretrain(pretrain_config(config_name, corpus, trainer=trainer), out).export


@pytest.fixture(scope="module")
def joint_model(teaseq_corpus, tmp_path_factory):
    """A debug joint scGPT (RNA + protein tokens) pretrained a few steps on the TEA-seq test cells."""
    return pretrained("scgpt_citeseq_debug.yaml", teaseq_corpus, tmp_path_factory.mktemp("joint") / "run")


def test_a_paired_export_aligns_through_its_two_towers(teaseq_corpus, tmp_path):
    from celltron.model_zoo.contrastive import PAIR_TOKENS_FILE, PAIRED_DIR

    export = pretrained("geneformer_citeseq_debug.yaml", teaseq_corpus, tmp_path / "run")  # Geneformer RNA + scGPT protein tower
    assert json.loads((export / PAIRED_DIR / PAIR_TOKENS_FILE).read_text())["features"][:2] == ["CD10", "CD11b"]
    config = config_for("align", TEASEQ, label_key="cell_type", components=10, seeds=(0,))
    align = run_crossmodal(config, tmp_path / "a", model=str(export))
    assert set(align["model_variants"]) == {"model_zero_shot", "model_cca"}
    zero_shot = align["model_variants"]["model_zero_shot"]["foscttm"]
    assert 0 <= zero_shot <= 1 and align["paired"]["n_units"] == 60
    (export / PAIRED_DIR / PAIR_TOKENS_FILE).unlink()  # an export from before the file existed
    with pytest.raises(InputError, match="export the run again"):
        run_crossmodal(config, tmp_path / "b", model=str(export))


def test_a_joint_model_aligns_and_annotates_beside_the_baselines(joint_model, tmp_path, capsys):
    align = run_crossmodal(
        config_for("align", TEASEQ, label_key="cell_type", components=10), tmp_path / "a", model=str(joint_model)
    )
    assert set(align["model_variants"]) == {"model_zero_shot", "model_cca"}
    for seed, choice in align["head_choice"].items():
        assert choice["name"] in ("cca", "model_zero_shot", "model_cca")
        gains = [low for low in choice["gain_low"].values() if low is not None and low > 0]
        assert (choice["name"] == "cca") == (not gains)  # a model alignment only when it earned it on training cells
    assert align["paired"]["unit"] == "cells" and align["paired"]["n_units"] == 60 * 2 - len(
        set(align["baselines"]["cca"]["per_cell"]["0"]) & set(align["baselines"]["cca"]["per_cell"]["1"])
    )
    assert "FOSCTTM (lower is better)" in capsys.readouterr().out

    pretrained_on = tmp_path / "pretrained_on.txt"
    pretrained_on.write_text("\n".join(ad.read_h5ad(DATA / "teaseq_pbmc_300cells_rna.h5ad").obs_names[:100]) + "\n")
    fields = {"label_key": "cell_type", "components": 10, "seeds": (0,), "folds": 3, "train_only": str(pretrained_on)}
    annotate = run_crossmodal(
        config_for("annotate", TEASEQ, target="adt", **fields),
        tmp_path / "n",
        model=str(joint_model),
    )
    assert set(annotate["model_variants"]) == {"model_rna_knn", "model_joint_knn"}
    obs = ad.read_h5ad(DATA / "teaseq_pbmc_300cells_rna.h5ad").obs
    common = obs["cell_type"].map(obs["cell_type"].value_counts()) >= 3  # labels a 3-fold split can stratify
    assert annotate["paired"]["macro_f1"]["n_units"] == 3
    assert annotate["split"]["held_out_cells"] == int(common.iloc[100:].sum())  # never a pretrained-on cell
    predicted = ad.read_h5ad(tmp_path / "n" / "predictions.h5ad")
    assert predicted.obs["cell_type_predicted"].notna().all()
    for unit, choice in annotate["head_choice"].items():
        assert choice["best_baseline"] in ("rna_pca_knn", "joint_knn")
        expected = (
            annotate["baselines"][choice["best_baseline"]]["per_fold"][unit]
            if choice["name"] == choice["best_baseline"]
            else None
        )
        if expected is not None:  # the head is the baseline itself, bit for bit
            assert annotate["model"]["per_fold"][unit] == expected


def test_a_joint_model_predicts_proteins_zero_shot_without_reading_them(joint_model, tmp_path, capsys):
    from celltron.finetune.crossmodal.data import parse_modality_files, read_paired
    from celltron.finetune.crossmodal.model import ModelViews, calibrated, masked_value_predictions

    predict = run_crossmodal(config_for("predict", TEASEQ, components=10, seeds=(0,)), tmp_path / "p", model=str(joint_model))
    masked = predict["model_masked_values"]
    assert np.isfinite(masked["pearson"]) and predict["paired_masked_values"]["n_units"] == 46
    assert "masked values (zero-shot, calibrated): model − best baseline" in capsys.readouterr().out
    layer = ad.read_h5ad(tmp_path / "p" / "predictions.h5ad").layers["model_masked_values"]
    held_out = ad.read_h5ad(tmp_path / "p" / "predictions.h5ad").obs["celltron_split"].to_numpy() == "test"
    assert np.isfinite(layer[held_out]).all() and np.isnan(layer[~held_out]).all()

    paired = read_paired(None, parse_modality_files(TEASEQ), ("rna", "adt"))
    views = ModelViews(joint_model, paired, "adt", 32, 0)
    values = masked_value_predictions(views)
    assert values.shape == (300, 46) and np.isfinite(values).all()
    # the measured proteins never enter: other proteins (cells shuffled), the same predictions
    shuffled = np.random.default_rng(0).permutation(300)
    paired.counts["adt"] = paired.counts["adt"][shuffled]
    assert np.array_equal(masked_value_predictions(ModelViews(joint_model, paired, "adt", 32, 0)), values)
    # the data's panel in another order: the predictions' columns follow it
    order = np.random.default_rng(1).permutation(46)
    paired.counts["adt"], paired.features["adt"] = paired.counts["adt"][:, order], paired.features["adt"][order]
    assert np.array_equal(masked_value_predictions(ModelViews(joint_model, paired, "adt", 32, 0)), values[:, order])
    # the calibration is fitted on training cells only: held-out targets change nothing
    targets = clr(paired.counts["adt"])
    train = np.arange(200)
    moved = targets.copy()
    moved[200:] += 5.0
    assert np.allclose(calibrated(values, targets, train), calibrated(values, moved, train))


def test_a_model_panel_that_differs_from_the_data_is_refused(joint_model, tmp_path):
    proteins = ad.read_h5ad(DATA / "teaseq_pbmc_300cells_adt.h5ad")
    proteins[:, 1:].copy().write_h5ad(tmp_path / "adt.h5ad")
    modalities = (TEASEQ[0], f"adt={tmp_path / 'adt.h5ad'}")
    with pytest.raises(InputError, match="protein panel .canonical antigen names. differs"):
        run_crossmodal(config_for("align", modalities), tmp_path / "x", model=str(joint_model))


# ---------------------------------------------------------------- scvi-tools peers


def paired_chromatin(n_cells: int = 400, n_peaks: int = 300, seed: int = 0):
    """`paired_latent`'s RNA with binary peak counts opened by the same latent state."""
    rna, _ = paired_latent(n_cells=n_cells, seed=seed)
    rng = np.random.default_rng(seed)
    state = np.log1p(rna.X.toarray()) @ np.random.default_rng(101).normal(0, 0.15, (rna.n_vars, n_peaks))
    open_chance = 1 / (1 + np.exp(-(state - state.mean(0)) / state.std(0) * 1.5 + 1.5))
    peaks = ad.AnnData(sp.csr_matrix((rng.random((n_cells, n_peaks)) < open_chance).astype(np.int32)), obs=rna.obs.copy())
    peaks.var_names = [f"chr1:{1000 * j}-{1000 * j + 500}" for j in range(n_peaks)]
    return rna, peaks


def test_totalvi_runs_as_a_peer_on_the_same_splits_and_learns_the_map(simulated, tmp_path, capsys):
    pytest.importorskip("scvi")
    fields = {"seeds": (0,), "peers": ("totalvi",), "peer_epochs": 40, "peer_genes": 120}
    linked = run_crossmodal(config_for("predict", simulated["linked"], **fields), tmp_path / "linked")
    totalvi = linked["peers"]["totalvi"]
    assert totalvi["pearson"] > 0.5  # the linear map, learned from counts alone
    assert set(linked["baselines"]) == {"mean_profile", "knn_rna_pca", "ridge_rna_pca"}  # a peer is never the baseline
    against = linked["peers_against_best"]["totalvi"]
    assert against["n_units"] == 12 and against["baseline"] in ("knn_rna_pca", "ridge_rna_pca")
    assert linked["peer_runs"]["totalvi"]["0"]["epochs_run"] <= 40
    assert "totalvi (peer) − the best baseline" in capsys.readouterr().out
    written = ad.read_h5ad(tmp_path / "linked" / "predictions.h5ad")
    assert np.isfinite(written.layers["totalvi"][written.obs["celltron_split"].to_numpy() == "test"]).all()
    shuffled = run_crossmodal(config_for("predict", simulated["shuffled"], **fields), tmp_path / "shuffled")
    assert abs(shuffled["peers"]["totalvi"]["pearson"]) < 0.2  # other cells' proteins: nothing to learn


def test_multivi_runs_as_a_peer_of_the_alignment(tmp_path):
    pytest.importorskip("scvi")
    rna, peaks = paired_chromatin()
    rna.write_h5ad(tmp_path / "rna.h5ad")
    peaks.write_h5ad(tmp_path / "atac.h5ad")
    files = (f"rna={tmp_path / 'rna.h5ad'}", f"atac={tmp_path / 'atac.h5ad'}")
    # MultiVI learns slowly (here FOSCTTM 0.36 at 100 epochs, 0.16 at 300; CCA 0.08): a short run
    # is only asked to beat chance (0.5) on the 80 held-out cells
    fields = {"seeds": (0,), "target": "atac", "label_key": "cell_type", "peers": ("multivi",), "peer_epochs": 60}
    result = run_crossmodal(config_for("align", files, **fields), tmp_path / "out")
    multivi = result["peers"]["multivi"]
    assert multivi["foscttm"] < 0.45 and "transfer_accuracy" in multivi
    assert result["peers_against_cca"]["multivi"]["n_units"] == 80  # the same held-out cells as CCA
    assert result["peer_runs"]["multivi"]["0"]["peaks"] <= 300


def test_peers_are_refused_for_another_task_or_without_scvi_tools(simulated, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="totalvi runs with the predict task on --source rna --target adt, not align"):
        config_for("align", simulated["linked"], peers=("totalvi",))
    with pytest.raises(
        ConfigError, match="multivi runs with the align task on --source rna --target atac, not align on --source adt"
    ):
        config_for("align", simulated["linked"], source="adt", target="atac", peers=("multivi",))
    config_for("align", simulated["linked"], source="atac", target="rna", peers=("multivi",))  # either order aligns
    with pytest.raises(ConfigError, match="unknown peer 'scvi'"):
        config_for("predict", simulated["linked"], peers=("scvi",))
    monkeypatch.setitem(__import__("sys").modules, "scvi", None)  # as if scvi-tools were not installed
    with pytest.raises(ConfigError, match=r"pip install 'celltron\[scvi\]'"):
        run_crossmodal(config_for("predict", simulated["linked"], peers=("totalvi",)), tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything was written
