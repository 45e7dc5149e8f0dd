"""`celltron finetune annotate` on the labelled PBMC 4k set: the head learns cell types, reports
them beside PCA + logistic regression on the same split, and writes its predictions."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

from celltron.cli import main
from tests.conftest import shared_file
from tests.finetune.weights import earned_by_rule

LABEL = "Annotation"


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    """500 cells of PBMC 4k (T_CD4, T_CD8, B, NK, MNP), kept out of pretraining."""
    adata = ad.read_h5ad(shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad"))
    rows = np.random.default_rng(0).choice(adata.n_obs, 500, replace=False)
    path = tmp_path_factory.mktemp("labelled") / "pbmc4k_500.h5ad"
    adata[np.sort(rows)].copy().write_h5ad(path)
    return path


def _annotate(model, data, out, *extra) -> int:
    return main(
        [
            "finetune",
            "annotate",
            "--model",
            str(model),
            "--data",
            str(data),
            "--label-key",
            LABEL,
            "--out",
            str(out),
            "--max-steps",
            "80",
            "--set",
            "optim.warmup_steps=5",
            *extra,
        ]
    )


def test_annotation_beats_the_majority_class_and_writes_metrics_predictions_and_plot(
    pretrained_geneformer, labelled_file, tmp_path
):
    assert _annotate(pretrained_geneformer, labelled_file, tmp_path) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    truth = ad.read_h5ad(labelled_file).obs[LABEL].astype(str)
    majority = truth.value_counts(normalize=True).iloc[0]
    model, baseline = metrics["model"], metrics["baselines"]["pca_logreg"]
    assert model["accuracy"] > majority + 0.1
    assert baseline["macro_f1"] > 0.7  # PBMC types separate well on PCA: the bar the model is held to
    assert set(metrics["classes"]) == set(truth)
    assert np.asarray(model["confusion_matrix"]).sum() == metrics["split"]["per_seed"]["0"]["test"]
    assert set(model["reports"]["0"]["per_class"]) == set(truth)
    predictions = ad.read_h5ad(tmp_path / "predictions.h5ad")
    assert list(predictions.obs_names) == list(ad.read_h5ad(labelled_file).obs_names)
    probabilities = predictions.obsm[f"{LABEL}_probabilities"]
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-4)
    assert (
        predictions.obs[f"{LABEL}_predicted"].astype(str).to_numpy()
        == np.asarray(predictions.uns[f"{LABEL}_classes"])[probabilities.argmax(1)]
    ).all()
    assert (predictions.obs["celltron_split"] == "test").sum() == metrics["split"]["per_seed"]["0"]["test"]
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    # the anchored head (the default): its weight chosen by inner CV, its model part kept beside it
    assert metrics["head"] == "anchored" and set(metrics["model_plain"]["per_seed"]["0"]) == {"accuracy", "macro_f1"}
    chosen = metrics["anchor_weights"]["0"]
    assert chosen["weight"] in (0.0, 0.25, 0.5, 0.75, 1.0) and set(chosen["weight_scores"]) == {
        "0.0",
        "0.25",
        "0.5",
        "0.75",
        "1.0",
    }
    assert chosen["weight"] == earned_by_rule(chosen)
    assert all((tmp_path / "seed0" / f"inner{j}" / "metrics.csv").exists() for j in (0, 1))
    # model − baseline per seed; one seed is one unit: no interval, and the verdict says so
    for metric in ("accuracy", "macro_f1"):
        paired = metrics["paired"][metric]
        difference = model["per_seed"]["0"][metric] - baseline["per_seed"]["0"][metric]
        assert paired["mean"] == pytest.approx(difference) and paired["units"] == [0] and paired["n_units"] == 1
        assert paired["low"] is None and paired["high"] is None  # NaN, written as null
        assert paired["baseline"] == "pca_logreg" and paired["verdict"] == "too few units to tell"


def test_lora_trains_adapters_and_head_and_leaves_pretrained_weights(pretrained_geneformer, labelled_file, tmp_path):
    from celltron.finetune.annotate import _Task
    from celltron.finetune.config import FinetuneConfig
    from celltron.lab.data import load_model_tokenizer, read_lab_data, tokenize_cells
    from celltron.model_zoo.registry import load_pretrained
    from celltron.pretrain.config import replace

    config = replace(
        FinetuneConfig(),
        model={"lora_rank": 4},
        trainer={"max_steps": 10, "val_every": 10**6},
        logging={"progress_bar": False, "wandb": False},
    ).check()
    lab = read_lab_data(labelled_file, [LABEL])
    tokenizer = load_model_tokenizer(pretrained_geneformer, lab)
    tokens = tokenize_cells(lab, tokenizer)
    labels = np.unique(lab.obs[LABEL].astype(str), return_inverse=True)[1]
    task = _Task(config, pretrained_geneformer, tokens, labels, labels.max() + 1, tokenizer.vocab.special_id("pad"), None, lab)
    trained, first = task.fine_tune(np.arange(200), 0, tmp_path, config.optim.lr)
    assert first
    original = load_pretrained(pretrained_geneformer).state_dict()
    merged_names = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in trained.encoder.state_dict().items()
        if "lora_" not in n
    }
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged_names[query], original[query])  # the base weight under the adapter did not move
    adapters = [p for n, p in trained.encoder.named_parameters() if "lora_B" in n]
    assert adapters and any(p.abs().sum() > 0 for p in adapters)  # lora_B starts at zero: it trained


def test_bad_labels_are_refused_naming_the_file_and_fix(pretrained_geneformer, labelled_file, tmp_path):
    from celltron.finetune.annotate import run_annotate
    from celltron.finetune.config import FinetuneConfig
    from celltron.pretrain.config import replace

    assert _annotate(pretrained_geneformer, labelled_file, tmp_path / "a", "--label-key", "cell_type") == 2
    lonely = ad.read_h5ad(labelled_file)
    lonely.obs[LABEL] = lonely.obs[LABEL].astype(str)
    lonely.obs.iloc[0, lonely.obs.columns.get_loc(LABEL)] = "Platelet"
    path = tmp_path / "lonely.h5ad"
    lonely.write_h5ad(path)
    config = replace(FinetuneConfig(), data={"path": str(path)}, annotate={"label_key": LABEL}).check()
    with pytest.raises(ValueError, match=r"lonely.h5ad.*Platelet.*fewer than 2 cells.*merge"):
        run_annotate(config, None, tmp_path / "b", baselines_only=True)


def test_an_anchored_head_with_weight_zero_is_the_baseline_and_the_plain_head_the_model(
    pretrained_geneformer, labelled_file, tmp_path
):
    out = tmp_path / "zero"
    assert _annotate(pretrained_geneformer, labelled_file, out, "--max-steps", "4", "--set", "annotate.anchor_weights=[0]") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    baseline = metrics["baselines"]["pca_logreg"]
    assert (
        metrics["model"]["per_seed"] == baseline["per_seed"]
        and metrics["model"]["confusion_matrix"] == baseline["confusion_matrix"]
    )
    assert metrics["paired"]["macro_f1"]["mean"] == 0
    plain = tmp_path / "plain"
    assert _annotate(pretrained_geneformer, labelled_file, plain, "--max-steps", "4", "--head", "plain") == 0
    metrics = json.loads((plain / "metrics.json").read_text())
    assert metrics["head"] == "plain" and metrics["model_plain"] is None and metrics["anchor_weights"] is None
    # no folds choose anything for a plain head; its prediction sets get inner folds of their own
    sets = metrics["uncertainty"]["model_plain_sets"]
    assert metrics["uncertainty"]["model_sets"] is None and "2 extra fits per seed" in sets["set"]
    assert sets["inner_cells_per_seed"] == {"0": metrics["split"]["per_seed"]["0"]["train"]} and 0.7 <= sets["coverage"] <= 1
    written = ad.read_h5ad(plain / "predictions.h5ad")
    probabilities, member = written.obsm[f"{LABEL}_probabilities"], written.obsm[f"{LABEL}_prediction_set"]
    np.testing.assert_array_equal(member, probabilities >= 1 - sets["threshold_per_seed"]["0"])
    none = tmp_path / "plain-no-sets"
    assert (
        _annotate(
            pretrained_geneformer,
            labelled_file,
            none,
            "--max-steps",
            "4",
            "--head",
            "plain",
            "--set",
            "annotate.interval_level=0",
        )
        == 0
    )
    assert not (none / "seed0" / "inner0").exists()  # nothing asked for sets: no extra fit


def test_a_frozen_encoder_probe_chooses_its_learning_rate_on_training_cells_only(
    pretrained_geneformer, labelled_file, tmp_path, monkeypatch
):
    """--encoder frozen embeds every cell once and trains the head alone; the learning rate and
    length come from inner folds of the training cells, never from the held-out ones."""
    import celltron.finetune.annotate as annotate

    trained_on = []
    fine_tune = annotate._Task.fine_tune

    def recording(self, train, *args, **kwargs):
        trained_on.append(np.asarray(train))
        return fine_tune(self, train, *args, **kwargs)

    monkeypatch.setattr(annotate._Task, "fine_tune", recording)
    encoder_calls = []
    embeddings = annotate.frozen_cell_embeddings
    monkeypatch.setattr(annotate, "frozen_cell_embeddings", lambda *a: encoder_calls.append(1) or embeddings(*a))
    settings = ["--set", "annotate.learning_rates=[1e-7,0.01]", "--set", "annotate.step_fractions=[0.5,1]"]
    assert _annotate(pretrained_geneformer, labelled_file, tmp_path, "--encoder", "frozen", "--max-steps", "60", *settings) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["encoder"] == "frozen" and len(encoder_calls) == 1  # every cell embedded once, for every run
    choice = metrics["anchor_weights"]["0"]
    assert set(choice["setting_scores"]) == {"lr=1e-07,steps=30", "lr=1e-07,steps=60", "lr=0.01,steps=30", "lr=0.01,steps=60"}
    # a learning rate of 1e-7 leaves the head where it started: the inner folds must see that
    assert choice["learning_rate"] == 0.01
    assert choice["setting_scores"]["lr=0.01,steps=60"] > choice["setting_scores"]["lr=1e-07,steps=60"]
    # 2 inner folds x 2 learning rates, then the outer run: none of them trained on a test cell
    truth = ad.read_h5ad(labelled_file).obs[LABEL].astype(str).to_numpy()
    train, test = annotate.stratified_split(np.unique(truth, return_inverse=True)[1], 0.2, 0, "test")
    assert len(trained_on) == 5 and all(not set(rows) & set(test) for rows in trained_on)
    assert set(trained_on[-1]) == set(train)
    assert (tmp_path / "seed0" / "inner1" / "lr0.01").is_dir()
    # the head's own 0.9 prediction sets, calibrated on those inner folds' held-out training cells (no extra fit)
    sets = metrics["uncertainty"]["model_sets"]
    assert sets["inner_cells_per_seed"] == {"0": len(train)} and 0.75 <= sets["coverage"] <= 1.0
    written = ad.read_h5ad(tmp_path / "predictions.h5ad")
    q = sets["threshold_per_seed"]["0"]
    member = written.obsm[f"{LABEL}_prediction_set"]
    np.testing.assert_array_equal(member, written.obsm[f"{LABEL}_probabilities"] >= 1 - q)
    held_labels = np.unique(truth, return_inverse=True)[1][test]
    assert member[test, held_labels].mean() == pytest.approx(sets["coverage"])
    # the model alone gets sets from the same inner predictions (weight 1 at the chosen setting)
    alone = metrics["uncertainty"]["model_plain_sets"]
    assert alone["inner_cells_per_seed"] == {"0": len(train)} and 0.75 <= alone["coverage"] <= 1.0
    # calibrated on the model alone (weight 1), not on the chosen blend: the thresholds differ
    # unless the chosen blend is the model alone
    assert (alone["threshold_per_seed"] == sets["threshold_per_seed"]) == (choice["weight"] == 1.0)


@pytest.mark.parametrize("intervals", ["mc_dropout", "ensemble"])
def test_mc_dropout_and_ensembles_average_their_draws_and_report_where_they_disagree(
    pretrained_geneformer, labelled_file, tmp_path, monkeypatch, intervals
):
    """annotate.intervals: the model's probabilities are the mean of its draws (dropout passes of
    one model, or members trained from different seeds on the same cells), and each cell's
    disagreement is their mutual information, written and scored against the model's errors."""
    import celltron.finetune.annotate as annotate
    from celltron.finetune.uncertainty import ENSEMBLE_SEED_STRIDE, mutual_information

    trained, predicted = [], []
    fine_tune, predict = annotate._Task.fine_tune, annotate._ProbeTask.predict

    def recording_fit(self, train, seed, *args, **kwargs):
        trained.append((np.asarray(train), seed))
        return fine_tune(self, train, seed, *args, **kwargs)

    def recording_predict(self, model, rows, seed=0):
        predicted.append(predict(self, model, rows, seed))
        return predicted[-1]

    monkeypatch.setattr(annotate._Task, "fine_tune", recording_fit)
    monkeypatch.setattr(annotate._ProbeTask, "predict", recording_predict)
    settings = [f"annotate.intervals={intervals}", "annotate.ensemble_members=2", "annotate.dropout_passes=6"]
    flags = ["--encoder", "frozen", "--head", "plain", "--max-steps", "40", "--set", "annotate.interval_level=0"]
    assert _annotate(pretrained_geneformer, labelled_file, tmp_path, *flags, *[a for s in settings for a in ("--set", s)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    written = ad.read_h5ad(tmp_path / "predictions.h5ad")
    if intervals == "mc_dropout":  # one model, 6 passes with its dropout on: they differ
        assert [seed for _, seed in trained] == [0] and len(predicted) == 1 and predicted[0].shape[0] == 6
        draws = predicted[0]
        assert not np.allclose(draws[0], draws[1])
    else:  # 2 models on the same training cells from different seeds, the second in its own folder
        assert [seed for _, seed in trained] == [0, ENSEMBLE_SEED_STRIDE]
        np.testing.assert_array_equal(trained[0][0], trained[1][0])
        assert (tmp_path / "seed0" / "member1").is_dir()
        draws = np.concatenate(predicted)
        assert draws.shape[0] == 2 and not np.allclose(draws[0], draws[1])
    np.testing.assert_allclose(written.obsm[f"{LABEL}_probabilities"], draws.mean(0), rtol=1e-6)
    disagreement = written.obs[f"{LABEL}_disagreement"].to_numpy()
    np.testing.assert_allclose(disagreement, mutual_information(draws), rtol=1e-5, atol=1e-9)
    assert (disagreement >= 0).all() and disagreement.std() > 0
    spread = metrics["model_spread"]
    assert spread["method"].startswith(intervals) and spread["n_units"] == int((written.obs["celltron_split"] == "test").sum())
    test = (written.obs["celltron_split"] == "test").to_numpy()
    truth = np.unique(written.obs[LABEL].astype(str), return_inverse=True)[1]
    wrong = draws.mean(0)[test].argmax(1) != truth[test]
    assert spread["misclassified"] == pytest.approx(wrong.mean())
    if wrong.any():
        assert spread["mean_wrong"] == pytest.approx(disagreement[test][wrong].mean(), rel=1e-5)
    # beside it, the averaged model's own doubt scored the same way (the yardstick a lab compares with)
    assert spread["top_probability"]["n_units"] == spread["n_units"]


def test_a_tuned_models_dropout_passes_differ_and_eval_mode_is_one_fixed_prediction(pretrained_geneformer, labelled_file):
    """MC dropout on a tuned model samples the encoder's dropout and the head's; without passes
    the prediction is the model in eval mode, and the model's mode is left as it was."""
    from celltron.finetune.adapt import load_encoder
    from celltron.finetune.annotate import AnnotationModel, predict_probabilities
    from celltron.finetune.config import AdaptSection
    from celltron.lab.data import load_model_tokenizer, read_lab_data, tokenize_cells

    lab = read_lab_data(labelled_file)
    tokenizer = load_model_tokenizer(pretrained_geneformer, lab)
    tokens = tokenize_cells(lab, tokenizer, cells=np.arange(12))
    torch.manual_seed(0)
    model = AnnotationModel(load_encoder(pretrained_geneformer, AdaptSection()), 5, dropout=0.3).train()
    pad = tokenizer.vocab.special_id("pad")
    fixed = predict_probabilities(model, tokens, pad, 5)
    passes = predict_probabilities(model, tokens, pad, 5, passes=3, seed=7)
    assert fixed.shape == (12, 5) and passes.shape == (3, 12, 5) and model.training
    np.testing.assert_allclose(passes.sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(passes[0], passes[1]) and not np.allclose(passes[0], fixed)
    np.testing.assert_array_equal(passes, predict_probabilities(model, tokens, pad, 5, passes=3, seed=7))
    np.testing.assert_allclose(predict_probabilities(model, tokens, pad, 5), fixed, rtol=1e-6)


def test_a_frozen_encoder_refuses_frozen_layers_or_lora(pretrained_geneformer, labelled_file, tmp_path, capsys):
    assert _annotate(pretrained_geneformer, labelled_file, tmp_path, "--encoder", "frozen", "--freeze", "1") == 2
    assert "--encoder frozen" in capsys.readouterr().err and not (tmp_path / "metrics.json").exists()


def test_baseline_sets_cover_the_level_and_an_unseen_cell_type_scores_out_of_distribution(labelled_file, tmp_path, capsys):
    from celltron.finetune.annotate import baseline_uncertainty, run_annotate
    from celltron.finetune.config import FinetuneConfig
    from celltron.lab.data import read_lab_data
    from celltron.pretrain.config import replace

    config = replace(FinetuneConfig(), data={"path": str(labelled_file)}, annotate={"label_key": LABEL, "seeds": (0, 1)}).check()
    metrics = run_annotate(config, None, tmp_path / "run", baselines_only=True)
    sets = metrics["uncertainty"]["sets"]
    # 2 x 100 held-out cells: coverage near the 0.9 level, mostly one label per set
    assert 0.8 <= sets["coverage"] <= 1.0 and sets["mean_size"] < 2
    assert metrics["uncertainty"]["ood"]["n_cells"] == 2 * metrics["split"]["per_seed"]["0"]["test"]
    assert "prediction sets (split conformal on training cells)" in capsys.readouterr().out
    # a cell type held out of training whole: its cells sit far from the training cells
    lab = read_lab_data(labelled_file, [LABEL])
    classes, labels = np.unique(lab.obs[LABEL].astype(str).to_numpy(), return_inverse=True)
    novel = int(np.flatnonzero(classes == "NK")[0])
    rng = np.random.default_rng(0)
    known = np.flatnonzero(labels != novel)
    held_known = rng.choice(known, 80, replace=False)
    train = np.setdiff1d(known, held_known)
    test = np.concatenate([held_known, np.flatnonzero(labels == novel)])
    member, distance, score = baseline_uncertainty(config, lab, labels, train, test, len(classes), seed=0)
    is_novel = labels[test] == novel
    assert score[is_novel].mean() > score[~is_novel].mean() + 0.2
    # calibrated on held-out training cells: cells like the training ones score like them
    assert 0.4 < score[~is_novel].mean() < 0.6 and np.mean(score[~is_novel] >= 0.9) < 0.2
    assert np.mean(score[is_novel] >= 0.9) > 2 * np.mean(score[~is_novel] >= 0.9)
    assert not member[is_novel, novel].any()  # a label never trained on is never in a set
