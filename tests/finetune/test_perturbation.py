"""The perturbation head and the `celltron finetune perturbation` run: inputs with flagged
targets, a head that starts at the training-mean baseline and learns, every family, LoRA and
frozen layers, the frozen-encoder probe, the output layout, simulated double perturbations, and clear errors on bad lab
data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from celltron.cli import main
from celltron.finetune.adapt import load_encoder
from celltron.finetune.config import AdaptSection
from celltron.finetune.perturbation.baselines import BASELINES, additive_baseline, train_mean_baseline
from celltron.finetune.perturbation.evaluate import METRICS, evaluate, pseudobulk, simulation_split
from celltron.finetune.perturbation.model import PerturbationModel, PerturbationPairs, collate_pairs, flag_targets, target_tokens
from celltron.finetune.perturbation.run import specials_of
from celltron.lab.data import load_model_tokenizer, read_lab_data, tokenize_cells
from tests.conftest import shared_file
from tests.simulate import simulate_screen

EOS, CLS = 9, 8


def test_flag_targets_flags_present_genes_and_adds_absent_ones_before_eos():
    ids, values, flags = flag_targets(
        np.array([CLS, 5, 6, 7, EOS]), np.array([0, 3.0, 2.0, 1.0, 0]), np.array([6, 42]), {CLS, EOS}, None
    )
    assert ids.tolist() == [CLS, 5, 6, 7, 42, EOS]
    assert flags.tolist() == [0, 0, 1, 0, 1, 0]
    assert values.tolist() == [0, 3.0, 2.0, 1.0, 0.0, 0]


def test_flag_targets_drops_lowest_ranked_genes_to_fit():
    ids, _, flags = flag_targets(np.array([CLS, 5, 6, 7, EOS]), None, np.array([41, 42]), {CLS, EOS}, max_tokens=5)
    assert ids.tolist() == [CLS, 5, 41, 42, EOS]
    assert flags.sum() == 2


def _batch(folder, screen_file, perturbations, n_cells=6):
    lab = read_lab_data(screen_file, ["perturbation"])
    tokenizer = load_model_tokenizer(folder, lab)
    control = np.flatnonzero(lab.obs["perturbation"].astype(str).to_numpy() == "control")[:n_cells]
    tokens = tokenize_cells(lab, tokenizer, control)
    targets = target_tokens(perturbations, tokenizer.vocab, lab.species, "screen")
    screen = pseudobulk(ad.AnnData(X=lab.counts, obs=lab.obs), "perturbation", "control")
    means = np.stack([screen.means[p] for p in perturbations]).astype(np.float32)
    de = np.zeros(means.shape, dtype=bool)
    for row, p in enumerate(perturbations):
        de[row, screen.de_genes[p]] = True
    pairs = np.stack([np.arange(n_cells), np.arange(n_cells) % len(perturbations)], axis=1)
    dataset = PerturbationPairs(tokens, pairs, [targets[p] for p in perturbations], means, de, specials_of(tokenizer.vocab), None)
    batch = collate_pairs([dataset[i] for i in range(n_cells)], tokenizer.vocab.special_id("pad"))
    batch.pop("n_cells"), batch.pop("n_tokens")
    return lab, tokenizer, screen, batch


@pytest.mark.parametrize("family", ["geneformer", "scgpt", "genecompass"])
def test_heads_start_at_the_training_mean_and_learn_for_every_family(family, family_folders, screen_file):
    perturbations = ["TSPAN6", "TNMD+DPM1", "SCYL3", "FIRRM"]
    lab, tokenizer, screen, batch = _batch(family_folders[family], screen_file, perturbations, n_cells=8)
    assert batch["flags"].sum(1).tolist() == [1, 2, 1, 1] * 2  # every target flagged, added if absent
    assert batch["perturbation"].tolist() == [0, 1, 2, 3] * 2
    gene_tokens = tokenizer.vocab.lookup_genes(lab.gene_ids)
    # two pairs of perturbations with the same effect: leave-one-out retrieval can learn to
    # find the partner, the bilinear head to score genes
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, lab.counts.shape[1]), rng.normal(0, 1, lab.counts.shape[1])
    shifts = np.stack([a, a, b, b])
    batch["target"] = torch.as_tensor(screen.control_mean + shifts[batch["perturbation"].numpy()], dtype=torch.float32)
    targets = list(target_tokens(perturbations, tokenizer.vocab, lab.species, "screen").values())
    for head in ("retrieval", "bilinear"):
        torch.manual_seed(0)
        model = PerturbationModel(
            load_encoder(family_folders[family], AdaptSection()), gene_tokens, screen.control_mean, shifts, targets, head=head
        )
        with torch.no_grad():  # an unseen perturbation, before training: the training mean
            unseen = model(**{**batch, "perturbation": torch.full((8,), -1)})
            start = model(**batch)
        np.testing.assert_allclose(unseen.predicted.numpy(), np.tile(screen.control_mean + shifts.mean(0), (8, 1)), atol=1e-5)
        if head == "retrieval":  # a training example sees the mean of the other training perturbations
            np.testing.assert_allclose(start.predicted[0].numpy(), screen.control_mean + shifts[1:].mean(0), atol=1e-5)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(40):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
        assert loss.item() < 0.5 * start.loss.item(), head


def test_lora_trains_adapters_and_the_head_only_and_freeze_fixes_the_first_layers(family_folders):
    folder = family_folders["geneformer"]
    lora = load_encoder(folder, AdaptSection(lora_rank=4))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("query" in n for n in trainable) and any("intermediate" in n for n in trainable)
    frozen = load_encoder(folder, AdaptSection(freeze_layers=1))
    grads = {n: p.requires_grad for n, p in frozen.named_parameters()}
    assert not grads["bert.embeddings.word_embeddings.weight"]
    assert not any(v for n, v in grads.items() if n.startswith("bert.encoder.layer.0."))
    assert all(v for n, v in grads.items() if n.startswith("bert.encoder.layer.1."))
    assert not any(v for n, v in grads.items() if n.startswith("cls."))  # pretraining head unused


def test_lora_on_scgpt_adapts_its_linear_layers(family_folders):
    lora = load_encoder(family_folders["scgpt"], AdaptSection(lora_rank=2))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in lora.named_parameters() if p.requires_grad}
    assert adapted == {"out_proj", "linear1", "linear2"}


def _finetune(*args) -> int:
    return main(["finetune", "perturbation", *args, "--set", "logging.progress_bar=false"])


def test_finetune_writes_the_metrics_predictions_and_plots(pretrained_geneformer, screen_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = _finetune(
        "--model",
        str(pretrained_geneformer),
        "--data",
        str(screen_file),
        "--out",
        str(out),
        "--max-steps",
        "12",
        "--seeds",
        "0",
        "1",
        "--split",
        "simulation",
        "--lora",
        "4",
        "--set",
        "perturbation.inner_folds=2",
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # with a model, the linear baseline also embeds targets by the model's gene tokens
    assert set(metrics["baselines"]) == {*BASELINES, "linear_model"}
    assert metrics["seeds"] == [0, 1] and set(metrics["split"]["per_seed"]) == {"0", "1"}
    for result in [metrics["model"], metrics["best_baseline"], *metrics["baselines"].values()]:
        assert set(METRICS) <= set(result) and set(result["per_perturbation"]) == {"0", "1"}
    test = metrics["split"]["per_seed"]["0"]["test"]
    assert set(metrics["model"]["per_perturbation"]["0"]) == set(test)
    assert {"unseen_single", "combo_seen2"} <= set(metrics["groups"])
    # the model against the baseline chosen on training perturbations, per held-out perturbation
    chosen = metrics["best_baseline"]["chosen_per_seed"]["0"][0]
    assert chosen["baseline"] in BASELINES and chosen["test"] == test
    # the anchored head: its weight chosen per fold by inner cross-validation, its plain model kept beside it
    assert metrics["head"] == "anchored" and set(METRICS) <= set(metrics["model_plain"])
    assert chosen["weight"] in (0.0, 0.25, 0.5, 0.75, 1.0) and set(chosen["weight_scores"]) == {
        "0.0",
        "0.25",
        "0.5",
        "0.75",
        "1.0",
    }
    assert list((out / "seed0" / "inner0" / "checkpoints").glob("step=12.ckpt"))
    headline = metrics["best_baseline"]["metric"]
    paired = metrics["paired"]["all"]
    assert paired["n_units"] == len(set(test) | set(metrics["split"]["per_seed"]["1"]["test"]))
    assert paired["low"] <= paired["mean"] <= paired["high"] and paired["verdict"]
    differences = []
    for unit in paired["units"]:
        held = [s for s in ("0", "1") if unit in metrics["model"]["per_perturbation"][s]]
        model_value = np.mean([metrics["model"]["per_perturbation"][s][unit][headline] for s in held])
        baseline_value = np.mean([metrics["best_baseline"]["per_perturbation"][s][unit][headline] for s in held])
        differences.append(model_value - baseline_value)
    assert paired["mean"] == pytest.approx(np.mean(differences))
    assert metrics["responsive"]["min_de_genes"] == 10 and "n_significant" in metrics["responsive"]
    predictions = ad.read_h5ad(out / "predictions.h5ad")
    assert predictions.n_obs == len(test) + len(metrics["split"]["per_seed"]["1"]["test"])
    assert {"truth", "control_mean", "best_baseline", *BASELINES} <= set(predictions.layers)
    assert (out / f"{headline}.png").stat().st_size > 0 and (out / "delta_scatter.png").stat().st_size > 0
    assert (out / "seed0" / "metrics.csv").exists() and list((out / "seed0" / "checkpoints").glob("step=12.ckpt"))
    table = capsys.readouterr().out
    assert "model" in table and "linear" in table and "pearson_delta_de20_notarget" in table and "plain head" in table
    assert "anchored head's residual weight (inner CV)" in table
    assert f"model − best baseline (best baseline, chosen on training units) on {headline}" in table


def test_baselines_only_needs_no_model_and_recovers_additive_double_perturbations(tmp_path):
    path = tmp_path / "additive.h5ad"
    screen = simulate_screen(
        n_genes=80, n_targets=10, n_combos=15, cells_per_perturbation=200, n_control=400, interaction=0.0, seed=1
    )
    screen.adata.write_h5ad(path)
    assert (
        _finetune(
            "--baselines-only",
            "--data",
            str(path),
            "--out",
            str(tmp_path / "b"),
            "--split",
            "simulation",
            "--seeds",
            "0",
            "1",
            "2",
        )
        == 0
    )
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["model"] is None
    seen2 = metrics["groups"]["combo_seen2"]
    # exactly additive in log space: the sum of single shifts is right, the training mean is not
    assert seen2["additive"]["pearson_delta_de20"] > 0.98 > seen2["train_mean"]["pearson_delta_de20"]
    assert seen2["additive"]["mse_de20"] < 0.1 * seen2["train_mean"]["mse_de20"]


def test_the_best_baseline_has_intervals_calibrated_on_training_perturbations(tmp_path, capsys):
    """Without a model or a graph head, every held-out gene still gets an interval: the best
    baseline ± q x the gene's spread over training perturbations, q from inner folds over the
    training perturbations alone. Effects drawn at random per perturbation are exchangeable, so
    held-out coverage sits near the level; there is no space to score OOD in, so nothing is
    flagged."""
    path = tmp_path / "random_effects.h5ad"
    simulate_screen(n_genes=60, n_targets=24, n_combos=0, cells_per_perturbation=80, n_control=300, seed=3).adata.write_h5ad(path)
    out = tmp_path / "b"
    assert _finetune("--baselines-only", "--data", str(path), "--out", str(out), "--seeds", "0", "1", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    u = metrics["baseline_uncertainty"]
    assert u["level"] == 0.9 and u["n_with_interval"] == u["n_units"] == 3 * round(24 * 0.25)
    assert 0.8 <= u["coverage"] <= 0.98 and u["ood"]["space"] is None and u["ood"]["n_flagged"] == 0
    predictions = ad.read_h5ad(out / "predictions.h5ad")
    low, high = predictions.layers["best_baseline_interval_low"], predictions.layers["best_baseline_interval_high"]
    best = predictions.layers["best_baseline"]
    assert (low <= best).all() and (best <= high).all() and "ood_flagged" not in predictions.obs
    inside = (predictions.layers["truth"] >= low) & (predictions.layers["truth"] <= high)
    assert inside.mean() == pytest.approx(u["coverage"])
    assert "best baseline, 0.9 intervals (split conformal" in capsys.readouterr().out
    assert all(len(scales) == 1 and scales[0] > 0 for scales in u["scale_per_seed"].values())  # one per fold
    # a second scale for the genes each prediction moves most: the same splits, two scales per fold
    strata = tmp_path / "s"
    flags = ["--seeds", "0", "1", "2", "--set", "perturbation.interval_strata=predicted_change"]
    assert _finetune("--baselines-only", "--data", str(path), "--out", str(strata), *flags) == 0
    two = json.loads((strata / "metrics.json").read_text())["baseline_uncertainty"]
    assert two["strata"] == "predicted_change" and 0.8 <= two["coverage"] <= 0.98
    assert all(len(scales) == 1 and len(scales[0]) == 2 for scales in two["scale_per_seed"].values())
    assert 0 <= two["coverage_predicted_change"] <= 1 and "a scale of their own" in capsys.readouterr().out
    # --intervals none: no intervals at all
    assert _finetune("--baselines-only", "--data", str(path), "--out", str(tmp_path / "n"), "--intervals", "none") == 0
    assert json.loads((tmp_path / "n" / "metrics.json").read_text())["baseline_uncertainty"] is None


def test_simulated_interactions_break_the_additive_baseline():
    scores = {}
    for interaction in (0.0, 2.0):
        screen = simulate_screen(
            n_genes=80, n_targets=10, n_combos=15, cells_per_perturbation=200, n_control=400, interaction=interaction, seed=2
        )
        data = pseudobulk(screen.adata, "perturbation", "control")
        split = simulation_split(data.perturbations, 0.2, seed=0)
        combos = split["combo_seen2"]
        truth = {p: data.control_mean + screen.shifts[p] for p in combos}
        assert np.corrcoef(data.means[combos[0]] - data.control_mean, truth[combos[0]] - data.control_mean)[0, 1] > 0.8
        scores[interaction] = evaluate(additive_baseline(data, split["train"], combos), data, combos)["mse"]
        assert evaluate(train_mean_baseline(data, split["train"], combos), data, combos)["mse"] > scores[interaction]
    assert scores[2.0] > 3 * scores[0.0]


def test_lab_data_errors_name_the_file_field_and_fix(tmp_path, screen_file, pretrained_geneformer, capsys):
    args = ["--model", str(pretrained_geneformer), "--out", str(tmp_path / "x")]
    assert _finetune(*args, "--data", str(screen_file), "--perturbation-key", "guide") == 2
    assert "obs has no column(s) ['guide']" in capsys.readouterr().err
    assert _finetune(*args, "--data", str(screen_file), "--control", "NT") == 2
    assert "no control cells labelled 'NT'" in capsys.readouterr().err
    adata = ad.read_h5ad(screen_file)
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    assert _finetune(*args, "--data", str(tmp_path / "normalised.h5ad")) == 2
    assert "raw integer" in capsys.readouterr().err
    adata = ad.read_h5ad(screen_file)
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    adata.write_h5ad(tmp_path / "unknown_genes.h5ad")
    assert _finetune(*args, "--data", str(tmp_path / "unknown_genes.h5ad"), "--species", "human") == 2
    assert "--gene-column" in capsys.readouterr().err
    assert _finetune("--data", str(screen_file), "--out", str(tmp_path / "y")) == 2
    assert "--baselines-only" in capsys.readouterr().err


def test_papalexi_baselines_fall_back_where_targets_are_not_measured(tmp_path):
    path = shared_file("perturbation/papalexi2021_thp1_lowmoi_sceptredata.h5ad")
    assert _finetune("--baselines-only", "--data", str(path), "--out", str(tmp_path), "--seeds", "0") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    measured = set(ad.read_h5ad(path, backed="r").var_names)
    test = metrics["split"]["per_seed"]["0"]["test"]
    assert set(metrics["baselines"]["linear"]["fell_back_to_train_mean"]["0"]) == {p for p in test if p not in measured}
    assert len(test) == round(25 * 0.25)


@pytest.mark.slow
def test_two_process_ddp_fine_tuning_writes_one_result(family_folders, screen_file, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "celltron.cli",
        "finetune",
        "perturbation",
        "--model",
        str(family_folders["geneformer"]),
        "--data",
        str(screen_file),
        "--out",
        str(tmp_path),
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--max-steps",
        "6",
        "--seeds",
        "0",
        "1",
        "--set",
        "trainer.accelerator=cpu",
        "--set",
        "logging.progress_bar=false",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("wrote ") == 1  # only the first process evaluates and writes
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["model"]["per_seed"]) == {"0", "1"}
    assert (tmp_path / "seed1" / "checkpoints" / "step=6.ckpt").exists()


def test_a_stopped_fine_tuning_resumes_to_the_same_weights(family_folders, screen_file, tmp_path, capsys):
    args = [
        "--model",
        str(family_folders["geneformer"]),
        "--data",
        str(screen_file),
        "--max-steps",
        "8",
        "--seeds",
        "0",
        "--set",
        "trainer.checkpoint_every=100",
        "--set",
        "model.lora_dropout=0.0",
    ]
    assert _finetune(*args, "--out", str(tmp_path / "whole")) == 0
    assert _finetune(*args, "--out", str(tmp_path / "split"), "--set", "trainer.stop_at_step=4") == 0
    assert "continue with --resume auto" in capsys.readouterr().out
    assert not (tmp_path / "split" / "metrics.json").exists()
    assert _finetune(*args, "--out", str(tmp_path / "split"), "--resume", "auto") == 0
    whole = torch.load(tmp_path / "whole" / "seed0" / "checkpoints" / "step=8.ckpt", weights_only=False)["state_dict"]
    split = torch.load(tmp_path / "split" / "seed0" / "checkpoints" / "step=8.ckpt", weights_only=False)["state_dict"]
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], msg=name)


def test_leave_one_out_on_the_papalexi_screen_declares_responsive_perturbations_first(tmp_path, capsys):
    path = shared_file("perturbation/papalexi2021_thp1_lowmoi_sceptredata.h5ad")
    args = ("--baselines-only", "--data", str(path), "--out", str(tmp_path), "--split", "leave_one_out", "--seeds", "0")
    assert _finetune(*args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    folds = metrics["split"]["per_seed"]["0"]["folds"]
    assert len(folds) == 25 and sorted(p for f in folds for p in f["test"]) == sorted(metrics["split"]["per_seed"]["0"]["test"])
    responsive = metrics["responsive"]["perturbations"]
    # the receptor and its signalling chain move many genes; most guides move none besides their target
    assert {"IFNGR1", "IFNGR2", "JAK2", "STAT1"} <= set(responsive) and len(responsive) < 25
    assert set(metrics["groups"]["responsive"]["train_mean"]["per_perturbation"]["0"]) == set(responsive)
    chosen = metrics["best_baseline"]["chosen_per_seed"]["0"]
    assert len(chosen) == 25 and all(c["baseline"] in BASELINES for c in chosen)
    # no learning, one number: the target's average change wins only while the target is scored
    prior, mean = metrics["baselines"]["knockdown_prior"], metrics["baselines"]["train_mean"]
    assert prior["pearson_delta_de20"] > mean["pearson_delta_de20"]
    assert prior["pearson_delta_de20_notarget"] == pytest.approx(mean["pearson_delta_de20_notarget"])
    assert "paired" not in metrics and "best baseline on pearson_delta_de20_notarget" in capsys.readouterr().out


def test_leave_one_out_fine_tunes_one_model_per_fold(pretrained_geneformer, tmp_path):
    path = tmp_path / "small.h5ad"
    simulate_screen(n_genes=80, n_targets=4, n_combos=0, cells_per_perturbation=30, n_control=100, seed=3).adata.write_h5ad(path)
    out = tmp_path / "run"
    args = ("--model", str(pretrained_geneformer), "--data", str(path), "--out", str(out), "--split", "leave_one_out")
    assert _finetune(*args, "--max-steps", "3") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    folds = metrics["split"]["per_seed"]["0"]["folds"]
    assert len(folds) == 4 and all(list((out / "seed0" / f"fold{k}" / "checkpoints").glob("step=3.ckpt")) for k in range(4))
    assert set(metrics["model"]["per_perturbation"]["0"]) == {p for f in folds for p in f["test"]}
    assert metrics["paired"]["all"]["n_units"] == 4 and metrics["paired"]["all"]["interval"] == "t"
    assert _finetune(*args, "--resume", "x.ckpt") == 2  # one checkpoint cannot resume many folds


def test_an_anchored_head_with_weight_zero_is_the_best_baseline_exactly(pretrained_geneformer, screen_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--model", str(pretrained_geneformer), "--data", str(screen_file), "--out", str(out), "--max-steps", "2")
    assert _finetune(*args, "--set", "perturbation.anchor_weights=[0]", "--set", "perturbation.inner_folds=2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, best = metrics["model"]["per_perturbation"]["0"], metrics["best_baseline"]["per_perturbation"]["0"]
    assert model == best and metrics["paired"]["all"]["mean"] == 0
    assert "no detectable difference" in metrics["paired"]["all"]["verdict"]
    predictions = ad.read_h5ad(out / "predictions.h5ad")
    assert np.array_equal(predictions.X, predictions.layers["best_baseline"])
    # so are its intervals: calibrated on the inner folds that chose w = 0, where the blend is the
    # baseline each inner fold chose
    head, baseline = metrics["model_uncertainty"], metrics["baseline_uncertainty"]
    assert head["coverage"] == baseline["coverage"] and head["mean_width"] == pytest.approx(baseline["mean_width"])
    for side in ("low", "high"):
        np.testing.assert_allclose(
            predictions.layers[f"model_interval_{side}"], predictions.layers[f"best_baseline_interval_{side}"]
        )
    # at weight 1 the head is the model alone: its intervals centre on its prediction and are
    # calibrated on the inner models' residuals, not the baselines'
    assert _finetune(*args, "--out", str(tmp_path / "w1"), "--set", "perturbation.anchor_weights=[1]") == 0
    whole = json.loads((tmp_path / "w1" / "metrics.json").read_text())
    assert whole["model_uncertainty"]["scale_per_seed"] != whole["baseline_uncertainty"]["scale_per_seed"]
    written = ad.read_h5ad(tmp_path / "w1" / "predictions.h5ad")
    centre = (written.layers["model_interval_low"] + written.layers["model_interval_high"]) / 2
    np.testing.assert_allclose(centre, written.X, atol=1e-4)
    # the plain head is the model alone, with no baseline mixed in
    assert _finetune(*args, "--out", str(tmp_path / "plain"), "--head", "plain") == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert (
        plain["head"] == "plain"
        and plain["model_plain"] is None
        and "weight" not in plain["best_baseline"]["chosen_per_seed"]["0"][0]
    )
    # no folds chose its setting: its intervals are calibrated on inner models fitted for that alone
    assert (tmp_path / "plain" / "seed0" / "inner1").is_dir() and "plain" in plain["model_uncertainty"]["centred_on"]
    assert plain["model_uncertainty"]["scale_per_seed"] != plain["baseline_uncertainty"]["scale_per_seed"]
    written = ad.read_h5ad(tmp_path / "plain" / "predictions.h5ad")
    centre = (written.layers["model_interval_low"] + written.layers["model_interval_high"]) / 2
    np.testing.assert_allclose(centre, written.X, atol=1e-4)
    # --intervals none asks for none: no extra fit
    assert _finetune(*args, "--out", str(tmp_path / "plain-none"), "--head", "plain", "--intervals", "none") == 0
    assert not (tmp_path / "plain-none" / "seed0" / "inner0").exists()


def test_norman_doubles_are_additive_and_coexpression_embeds_unmeasured_targets(tmp_path):
    path = shared_file("perturbation/norman2019_k562_crispra_3375cells.h5ad")
    reference = shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")
    args = ("--baselines-only", "--data", str(path), "--out", str(tmp_path), "--split", "simulation", "--seeds", "0", "1")
    assert _finetune(*args, "--test-fraction", "0.3", "--coexpression-reference", str(reference)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    seen2 = metrics["groups"]["combo_seen2"]
    # CRISPRa doubles of Norman 2019 are close to the sum of their singles
    assert seen2["additive"]["pearson_delta_de20_notarget"] > seen2["train_mean"]["pearson_delta_de20_notarget"] + 0.3
    # only one of the 31 target genes is measured: the PCA-embedded linear model falls back almost always,
    # co-expression in an unrelated PBMC reference embeds most targets
    fell_back = {name: metrics["baselines"][name]["fell_back_to_train_mean"]["0"] for name in ("linear", "linear_coexpression")}
    assert len(fell_back["linear_coexpression"]) < len(fell_back["linear"]) / 2


def test_a_corpus_reference_gives_the_pca_loadings_of_its_cells_from_one_streamed_pass(demo_corpus):
    import scipy.sparse as sp

    from celltron.corpus.store import Corpus, log_normalised_cells
    from celltron.finetune.perturbation.run import coexpression_embedding, corpus_coexpression_embedding

    embedding = corpus_coexpression_embedding(demo_corpus.location, "human", components=5, max_cells=400)
    corpus = Corpus(demo_corpus.location)
    cells = sp.vstack(list(log_normalised_cells(corpus, "train", 400, block_cells=128))).toarray()
    assert len(cells) == 400
    centred = cells - cells.mean(0)
    _, values, right = np.linalg.svd(centred, full_matrices=False)
    exact = right[:5].T * (values[:5] / np.sqrt(len(cells) - 1))  # PCA's loadings
    variable = np.argsort(-centred.var(0))[:300]
    sketched = np.stack([embedding[str(gene)] for gene in corpus.gene_ids[variable]])
    # compared free of the components' signs and rotation: the genes' inner products
    gram_sketched, gram_exact = sketched @ sketched.T, exact[variable] @ exact[variable].T
    assert np.corrcoef(gram_sketched.ravel(), gram_exact.ravel())[0, 1] > 0.95
    assert np.isclose(np.trace(gram_sketched), np.trace(gram_exact), rtol=0.2)  # on PCA's scale
    assert "CD3E" in embedding and set(coexpression_embedding(demo_corpus.location, "human")) >= {"CD3E", "LYZ"}


def test_the_anchored_head_chooses_learning_rate_and_length_on_training_perturbations_only(
    pretrained_geneformer, screen_file, tmp_path, monkeypatch, capsys
):
    import celltron.finetune.perturbation.run as run

    calls = []
    fine_tune = run._fine_tune

    def recording(config, prepared, screen, split, *args, **kwargs):
        calls.append((config.optim.lr, set(split["train"])))
        return fine_tune(config, prepared, screen, split, *args, **kwargs)

    monkeypatch.setattr(run, "_fine_tune", recording)
    out = tmp_path / "run"
    settings = ("perturbation.learning_rates=[1e-6,0.001]", "perturbation.step_fractions=[0.5,1]", "perturbation.inner_folds=2")
    args = ["--model", str(pretrained_geneformer), "--data", str(screen_file), "--out", str(out), "--max-steps", "6"]
    assert _finetune(*args, *[item for s in settings for item in ("--set", s)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    chosen = metrics["best_baseline"]["chosen_per_seed"]["0"][0]
    assert set(chosen["setting_scores"]) == {"lr=1e-06,steps=3", "lr=1e-06,steps=6", "lr=0.001,steps=3", "lr=0.001,steps=6"}
    assert chosen["learning_rate"] in (1e-6, 0.001) and chosen["steps"] in (3, 6)
    # 2 inner folds x 2 learning rates, then the outer run at the chosen rate; none saw a held-out perturbation
    assert len(calls) == 5 and [lr for lr, _ in calls[:4]] == [1e-6, 0.001, 1e-6, 0.001]
    assert all(not trained & set(chosen["test"]) for _, trained in calls)
    assert calls[-1][0] == chosen["learning_rate"]
    assert (out / "seed0" / "inner1" / "lr0.001" / "metrics.csv").exists()
    assert "learning rate and length (inner CV)" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["geneformer", "scgpt"])
def test_the_frozen_probe_is_the_model_with_a_fixed_encoder_and_no_flag(family, family_folders, screen_file):
    """On the views computed once, the probe predicts what the full model predicts when its
    encoder is the pretrained one and its learned flag is zero (the probe has no flag to learn)."""
    from celltron.finetune.perturbation.model import PerturbationProbe, frozen_views
    from celltron.model_zoo.registry import base_of

    perturbations = ["TSPAN6", "TNMD+DPM1", "SCYL3"]
    lab, tokenizer, screen, batch = _batch(family_folders[family], screen_file, perturbations, n_cells=6)
    targets = list(target_tokens(perturbations, tokenizer.vocab, lab.species, "screen").values())
    gene_tokens = tokenizer.vocab.lookup_genes(lab.gene_ids)
    shifts = np.random.default_rng(0).normal(0, 1, (3, lab.counts.shape[1]))
    torch.manual_seed(0)
    model = PerturbationModel(
        load_encoder(family_folders[family], AdaptSection()), gene_tokens, screen.control_mean, shifts, targets
    ).eval()
    with torch.no_grad():
        model.flag_embedding.weight.zero_()
        torch.nn.init.normal_(model.query[2].weight, std=0.5)  # a trained-looking head, not the training mean
    control = np.flatnonzero(lab.obs["perturbation"].astype(str).to_numpy() == "control")[:6]
    tokens = tokenize_cells(lab, tokenizer, control)
    cells = np.arange(6)
    views = frozen_views(model.encoder, tokens, cells, targets, specials_of(tokenizer.vocab), None, 0, batch_size=4)
    assert views[0].shape == views[1].shape == (3, 6, model.config.hidden_size)
    table = base_of(model.encoder).get_input_embeddings().weight.detach()
    probe = PerturbationProbe(table, gene_tokens, screen.control_mean, shifts, targets).eval()
    probe.load_state_dict(
        {**probe.state_dict(), **{k: v for k, v in model.state_dict().items() if k.startswith(("query", "keys"))}}
    )
    columns = batch["perturbation"].numpy()
    with torch.no_grad():
        full = model(**batch).predicted
        probed = probe(
            torch.as_tensor(views[0][columns, cells]), torch.as_tensor(views[1][columns, cells]), batch["perturbation"]
        ).predicted
    np.testing.assert_allclose(probed.numpy(), full.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(full.numpy(), full.numpy()[:1])  # the prediction depends on the pair


def test_a_frozen_encoder_embeds_once_and_trains_the_head_alone(pretrained_geneformer, screen_file, tmp_path, monkeypatch):
    import celltron.finetune.perturbation.run as run

    calls = []
    views = run.frozen_views

    def counting(*args, **kwargs):
        calls.append(1)
        return views(*args, **kwargs)

    monkeypatch.setattr(run, "frozen_views", counting)
    out = tmp_path / "run"
    args = ["--model", str(pretrained_geneformer), "--data", str(screen_file), "--out", str(out), "--max-steps", "30"]
    settings = ("perturbation.inner_folds=2", "perturbation.eval_cells=40", "perturbation.seeds=[0,1]")
    assert _finetune(*args, "--encoder", "frozen", *[item for s in settings for item in ("--set", s)]) == 0
    assert len(calls) == 1  # 2 seeds x (2 inner folds + the outer run), one pass of the encoder
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["encoder"] == "frozen"
    assert set(METRICS) <= set(metrics["model"]) and set(METRICS) <= set(metrics["model_plain"])
    # the checkpoint holds the head alone: no encoder weights trained or saved
    state = torch.load(next((out / "seed0" / "checkpoints").glob("*.ckpt")), weights_only=False)["state_dict"]
    assert state and not any("encoder" in key or "flag" in key for key in state)
    plain = {p: v["pearson_delta_de20"] for p, v in metrics["model_plain"]["per_perturbation"]["0"].items()}
    assert len(set(np.round(list(plain.values()), 6))) > 1  # per-perturbation predictions, not one vector
    # a frozen encoder with frozen layers or LoRA is a contradiction, refused before anything runs
    assert _finetune(*args[:-4], "--out", str(tmp_path / "bad"), "--encoder", "frozen", "--freeze", "1") != 0
    assert not (tmp_path / "bad").exists()
