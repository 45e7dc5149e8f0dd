"""Zero-shot embedding evaluation: on real PBMCs a stored PCA scores exactly as the PCA baseline
and noise scores at chance; on a simulated two-batch set a batch-shifted embedding mixes batches
worse than a corrected one; missing inputs are named with the file and the fix."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltron.cli import main
from celltron.finetune.embedding_eval import BATCH_METRICS, evaluate_embedding
from celltron.preprocessing import pca_baseline


@pytest.fixture(scope="module")
def pbmc_embeddings(pbmc4k, tmp_path_factory):
    """600 labelled PBMC 4k cells with two embeddings in obsm: the PCA baseline itself, and noise."""
    adata = ad.read_h5ad(pbmc4k)
    labelled = np.flatnonzero(adata.obs["Annotation"] != "?")  # '?' marks cells the authors left unassigned
    adata = adata[np.sort(np.random.default_rng(0).choice(labelled, 600, replace=False))].copy()
    adata.obsm["X_pca_copy"] = pca_baseline(adata.X, seed=0)
    adata.obsm["X_noise"] = np.random.default_rng(1).normal(size=(adata.n_obs, 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("embedding") / "pbmc4k_600.h5ad"
    adata.write_h5ad(path)
    return path


def test_a_stored_pca_matches_the_baseline_and_noise_scores_at_chance(pbmc_embeddings, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate-embedding",
                "--data",
                str(pbmc_embeddings),
                "--key",
                "X_pca_copy",
                "--label-key",
                "Annotation",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    model, pca = metrics["model"], metrics["baselines"]["pca_knn"]
    for metric in ("accuracy", "macro_f1"):
        assert model[metric] == pytest.approx(pca[metric])
    chance = metrics["split"]["majority_label_fraction"]
    assert metrics["split"]["n_cells"] == 600 and metrics["split"]["folds"] == 5 and chance < 0.35
    assert model["accuracy"] > 0.8 and model["macro_f1"] > 0.6
    assert (out / "umap.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "pca_knn" in printed and "macro_f1" in printed
    # the same folds for both: a copy of the baseline differs from it by exactly 0 in every fold
    for metric in ("accuracy", "macro_f1"):
        paired = metrics["paired"][metric]
        assert paired["n_units"] == 5 and paired["units"] == [0, 1, 2, 3, 4] and paired["baseline"] == "pca_knn"
        assert paired["mean"] == paired["low"] == paired["high"] == 0
        assert paired["verdict"].startswith("no detectable difference")
        assert f"model − pca_knn (the only baseline) on {metric}: +0.000" in printed

    noise = evaluate_embedding(pbmc_embeddings, "X_noise", "Annotation", folds=5, seed=0)
    assert abs(noise["model"]["accuracy"] - chance) < 0.08
    assert noise["model"]["macro_f1"] < 0.3
    assert noise["baselines"]["pca_knn"]["accuracy"] == pytest.approx(pca["accuracy"])
    for metric in ("accuracy", "macro_f1"):  # noise is worse than the baseline, and the interval says so
        paired = noise["paired"][metric]
        assert paired["low"] <= paired["mean"] <= paired["high"] < 0 and paired["interval"] == "t"
        assert paired["verdict"] == "the model is worse than the baseline"


def _two_batches(path, n_per_group: int = 60, seed: int = 0):
    """Three cell types in two batches: counts with type-specific genes and a batch-specific gene
    scaling; embeddings with type centres, either shifted per batch or not."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["A", "B", "C"], 2 * n_per_group)
    batches = np.tile(np.repeat(["b1", "b2"], n_per_group), 3)
    type_means = rng.gamma(2.0, 1.0, size=(3, 200))
    type_means[np.arange(3).repeat(20), np.arange(60)] *= 8  # 20 marker genes per type
    batch_scaling = rng.lognormal(0, 0.5, size=(2, 200))
    means = type_means[pd.factorize(labels)[0]] * batch_scaling[pd.factorize(batches)[0]]
    counts = sp.csr_matrix(rng.poisson(means).astype(np.float32))
    centres = rng.normal(0, 4, size=(3, 10))
    corrected = centres[pd.factorize(labels)[0]] + rng.normal(size=(len(labels), 10))
    shift = np.where(batches == "b2", 6.0, 0.0)[:, None] * np.eye(10)[0]
    adata = ad.AnnData(
        counts, obs=pd.DataFrame({"cell_type": labels, "batch": batches}, index=[f"c{i}" for i in range(len(labels))])
    )
    adata.obsm["X_corrected"] = corrected.astype(np.float32)
    adata.obsm["X_shifted"] = (corrected + shift).astype(np.float32)
    adata.write_h5ad(path)
    return path


FAST_BATCH_METRICS = tuple(m for m in BATCH_METRICS if m != "kbet")  # kBET compiles pynndescent first (~30 s)


@pytest.mark.jax
def test_a_batch_shifted_embedding_mixes_batches_worse_than_a_corrected_one(tmp_path):
    path = _two_batches(tmp_path / "two_batches.h5ad")
    shifted = evaluate_embedding(path, "X_shifted", "cell_type", batch_key="batch", batch_metrics=FAST_BATCH_METRICS)
    corrected = evaluate_embedding(path, "X_corrected", "cell_type", batch_key="batch", batch_metrics=FAST_BATCH_METRICS)
    for result in (shifted["model"], corrected["model"], corrected["baselines"]["pca_knn"]):
        assert set(FAST_BATCH_METRICS) <= set(result) and "kbet" not in result
        assert all(0 <= result[m] <= 1 for m in FAST_BATCH_METRICS)
    for metric in ("ilisi", "silhouette_batch"):
        assert shifted["model"][metric] < corrected["model"][metric] - 0.1, metric
    # the cell types stay apart in both: classification is near perfect either way
    assert shifted["model"]["accuracy"] > 0.95 and corrected["model"]["accuracy"] > 0.95
    assert shifted["baselines"] == corrected["baselines"]  # the baseline comes from the file's expression alone


@pytest.mark.slow
@pytest.mark.jax
def test_kbet_through_the_command_line_rejects_the_batch_shift(tmp_path, capsys):
    path = _two_batches(tmp_path / "two_batches.h5ad", n_per_group=40)
    kbet = {}
    for key in ("X_shifted", "X_corrected"):
        out = tmp_path / key
        assert (
            main(
                [
                    "evaluate-embedding",
                    "--data",
                    str(path),
                    "--key",
                    key,
                    "--label-key",
                    "cell_type",
                    "--batch-key",
                    "batch",
                    "--out",
                    str(out),
                    "--no-umap",
                    "--batch-metrics",
                    "kbet",
                    "ilisi",
                ]
            )
            == 0
        )
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics["model"]) >= {"kbet", "ilisi"} and "silhouette_batch" not in metrics["model"]
        assert "kbet" in metrics["baselines"]["pca_knn"] and metrics["split"]["batch_key"] == "batch"
        assert not (out / "umap.png").exists()
        kbet[key] = metrics["model"]["kbet"]
    assert kbet["X_shifted"] < kbet["X_corrected"] - 0.1
    assert "batch integration over 'batch'" in capsys.readouterr().out
    assert (
        main(
            [
                "evaluate-embedding",
                "--data",
                str(path),
                "--key",
                "X_shifted",
                "--label-key",
                "cell_type",
                "--batch-key",
                "batch",
                "--batch-metrics",
                "lisi",
            ]
        )
        == 2
    )
    assert "unknown ['lisi']" in capsys.readouterr().err


def test_missing_inputs_are_named_with_the_file_and_the_fix(tmp_path, capsys):
    path = _two_batches(tmp_path / "two_batches.h5ad", n_per_group=10)
    with pytest.raises(ValueError, match=r"two_batches.h5ad: obsm has no 'X_celltron'.*X_corrected.*--key"):
        evaluate_embedding(path, "X_celltron", "cell_type")
    with pytest.raises(ValueError, match=r"two_batches.h5ad: obs has no column 'celltype'.*'cell_type'.*--label-key"):
        evaluate_embedding(path, "X_corrected", "celltype")
    with pytest.raises(ValueError, match=r"obs has no column 'sample'.*--batch-key"):
        evaluate_embedding(path, "X_corrected", "cell_type", batch_key="sample")
    with pytest.raises(ValueError, match=r"no layer 'counts'.*--layer"):
        evaluate_embedding(path, "X_corrected", "cell_type", layer="counts")

    adata = ad.read_h5ad(path)
    adata.X = adata.X.log1p()  # what a normalised file looks like
    adata.write_h5ad(tmp_path / "logged.h5ad")
    assert (
        main(
            [
                "evaluate-embedding",
                "--data",
                str(tmp_path / "logged.h5ad"),
                "--key",
                "X_corrected",
                "--label-key",
                "cell_type",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "logged.h5ad: --layer X is not raw counts" in error and "non-integer" in error and "--layer" in error
    assert main(["evaluate-embedding", "--data", str(tmp_path / "absent.h5ad"), "--key", "X", "--label-key", "y"]) == 2
    assert "absent.h5ad: no such file" in capsys.readouterr().err


def test_cells_without_an_embedding_or_label_are_left_out_and_counted(tmp_path):
    adata = ad.read_h5ad(_two_batches(tmp_path / "two_batches.h5ad", n_per_group=20))
    adata.obsm["X_corrected"][:3] = np.nan  # what `celltron embed` writes for cells with no known gene
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[3:5, adata.obs.columns.get_loc("cell_type")] = None
    adata.obs.iloc[100, adata.obs.columns.get_loc("cell_type")] = "rare"  # fewer cells than folds
    adata.write_h5ad(tmp_path / "gaps.h5ad")
    metrics = evaluate_embedding(tmp_path / "gaps.h5ad", "X_corrected", "cell_type")
    assert metrics["split"]["n_cells_in_file"] == 120 and metrics["split"]["n_cells"] == 120 - 6
    assert metrics["split"]["n_labels"] == 3 and metrics["model"]["accuracy"] > 0.95
    sampled = evaluate_embedding(tmp_path / "gaps.h5ad", "X_corrected", "cell_type", max_cells=60, folds=3)
    assert sampled["split"]["n_cells"] <= 60 and sampled["split"]["folds"] == 3


def _variants_file(path, seed: int = 0):
    """The two-batch cells with embedding variants: the corrected one, pure noise, and two
    equally blurred copies (a close call between them)."""
    adata = ad.read_h5ad(_two_batches(path, seed=seed))
    rng = np.random.default_rng(seed + 1)
    corrected = adata.obsm["X_corrected"]
    adata.obsm["X_noise"] = rng.normal(size=corrected.shape).astype(np.float32)
    for name in ("X_blur_a", "X_blur_b"):
        adata.obsm[name] = (corrected + rng.normal(0, 4, size=corrected.shape)).astype(np.float32)
    adata.write_h5ad(path)
    return path


def test_several_variants_choose_the_better_one_per_fold_and_record_it(tmp_path, capsys):
    path = _variants_file(tmp_path / "variants.h5ad")
    out = tmp_path / "eval"
    command = ["evaluate-embedding", "--data", str(path), "--label-key", "cell_type", "--out", str(out), "--no-umap"]
    assert main([*command, "--key", "X_noise", "X_corrected", "--inner-folds", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    selection = metrics["selection"]
    assert selection["candidates"] == ["X_noise", "X_corrected"] and selection["inner_folds"] == 2
    assert selection["chosen_per_fold"] == ["X_corrected"] * 5 and selection["most_chosen"] == "X_corrected"
    for inner in selection["inner_scores_per_fold"]:
        assert inner["X_corrected"] > 0.9 > 0.6 > inner["X_noise"]
    assert [fold["variant"] for fold in metrics["model"]["per_fold"]] == ["X_corrected"] * 5
    alone = metrics["variants"]["X_corrected"]
    assert metrics["model"]["accuracy"] == alone["accuracy"] and metrics["split"]["embedding_key"] == "X_corrected"
    assert metrics["variants"]["X_noise"]["paired"]["accuracy"]["verdict"] == "the model is worse than the baseline"
    printed = capsys.readouterr().out
    assert "chosen {'X_noise': 0, 'X_corrected': 5}" in printed and "X_noise " in printed
    # one key: today's evaluation, with nothing about a choice
    single, listed = evaluate_embedding(path, "X_corrected", "cell_type"), evaluate_embedding(path, ["X_corrected"], "cell_type")
    assert single == listed and "selection" not in single and "variants" not in single
    assert single["model"]["per_fold"] == [{k: f[k] for k in ("accuracy", "macro_f1")} for f in alone["per_fold"]]


def test_the_variant_choice_never_reads_held_out_cells(tmp_path, monkeypatch):
    from celltron.finetune import embedding_eval

    data = embedding_eval.read_embedding_data(_variants_file(tmp_path / "variants.h5ad"), ["X_blur_a", "X_blur_b"], "cell_type")
    labels, variants = data.labels, data.variants
    rng = np.random.default_rng(7)
    changed_by_training_labels = 0
    for train, test in embedding_eval.outer_folds(labels, 5, 0):
        chosen = embedding_eval.choose_for_fold(variants, labels, train, 3, 0, 15, "accuracy")
        tampered_labels = labels.copy()
        tampered_labels[test] = rng.permutation(np.array(["A", "B", "C"], dtype=object)[rng.integers(0, 3, len(test))])
        tampered = {name: e.copy() for name, e in variants.items()}
        for embedding in tampered.values():
            embedding[test] = rng.normal(size=(len(test), embedding.shape[1]))
        assert embedding_eval.choose_for_fold(tampered, tampered_labels, train, 3, 0, 15, "accuracy") == chosen
        shuffled = labels.copy()
        shuffled[train] = rng.permutation(labels[train])  # the control: training labels do matter
        changed_by_training_labels += embedding_eval.choose_for_fold(variants, shuffled, train, 3, 0, 15, "accuracy") != chosen
    assert changed_by_training_labels == 5

    seen = []  # and the whole evaluation hands the choice only each outer fold's training rows

    def spy(training, training_labels, *args):
        seen.append(next(iter(training.values()))[:, 0].astype(int))
        return next(iter(training)), {name: 0.0 for name in training}

    marked = {name: np.column_stack([np.arange(len(labels)), e]) for name, e in variants.items()}
    monkeypatch.setattr(embedding_eval, "choose_variant", spy)
    embedding_eval.chosen_variant_scores(marked, labels, folds=5, seed=0)
    for rows, (train, test) in zip(seen, embedding_eval.outer_folds(labels, 5, 0), strict=True):
        assert sorted(rows) == sorted(train) and not set(rows) & set(test)
