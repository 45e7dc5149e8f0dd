"""`celltron embed` on real PBMCs: the embeddings equal the model run cell by cell, whatever the
block size or the number of processes, and land in a copy of the input in the original order."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

from celltron.cli import main
from celltron.lab.embed import embed
from tests.conftest import shared_file

GENES = "gene_symbol_original"


@pytest.fixture(scope="module")
def lab_file(tmp_path_factory):
    """240 cells of the labelled PBMC 4k set (kept out of pretraining), raw counts."""
    adata = ad.read_h5ad(shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad"))
    path = tmp_path_factory.mktemp("lab") / "pbmc.h5ad"
    adata[::9].copy().write_h5ad(path)
    return path


def _reference(model_dir, path, layer_offset: int = 0) -> np.ndarray:
    """Each cell alone through the model: the mean of its gene tokens' final hidden states."""
    from celltron.lab.data import load_model_tokenizer, read_lab_data, tokenize_cells
    from celltron.model_zoo.registry import load_pretrained

    lab = read_lab_data(path, gene_column=GENES)
    tokenizer = load_model_tokenizer(model_dir, lab)
    tokens = tokenize_cells(lab, tokenizer)
    model = load_pretrained(model_dir).eval()
    special = tokenizer.vocab.special_ids()
    rows = []
    with torch.no_grad():
        for i in range(len(tokens)):
            ids = torch.as_tensor(tokens[i])[None]
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), heads=False).last_hidden_state[0]
            rows.append(hidden[~np.isin(tokens[i], special)].mean(0).numpy())
    return np.stack(rows)


def test_embed_writes_the_per_cell_model_output_into_a_copy(pretrained_geneformer, lab_file, tmp_path):
    out = tmp_path / "embedded.h5ad"
    code = main(
        [
            "embed",
            "--model",
            str(pretrained_geneformer),
            "--data",
            str(lab_file),
            "--out",
            str(out),
            "--gene-column",
            GENES,
            "--block-cells",
            "70",
            "--batch-size",
            "16",
            "--no-progress",
            "--gene-embeddings",
        ]
    )
    assert code == 0
    original, embedded = ad.read_h5ad(lab_file), ad.read_h5ad(out)
    assert list(embedded.obs_names) == list(original.obs_names)
    assert (embedded.X != original.X).nnz == 0  # the input's data is carried over untouched
    hidden = json.loads((pretrained_geneformer / "config.json").read_text())["hidden_size"]
    cells = embedded.obsm["X_celltron"]
    assert cells.shape == (original.n_obs, hidden) and cells.dtype == np.float32
    np.testing.assert_allclose(cells, _reference(pretrained_geneformer, lab_file), atol=2e-5)
    genes = embedded.varm["X_celltron"]
    assert genes.shape == (original.n_vars, hidden)
    expressed = np.asarray((original.X > 0).sum(0)).ravel() > 0
    # NaN unless a gene (or another symbol of the same Ensembl gene) was a token in some cell
    assert np.isnan(genes[~expressed]).all(1).mean() > 0.99 and np.isfinite(genes[expressed]).all(1).mean() > 0.5
    assert not list(tmp_path.glob(".*partial*"))


def test_the_python_api_matches_and_blocks_and_processes_do_not_change_results(pretrained_geneformer, lab_file, tmp_path):
    whole = embed(pretrained_geneformer, lab_file, gene_column=GENES, block_cells=1000)
    blocked = embed(pretrained_geneformer, lab_file, gene_column=GENES, block_cells=50, batch_size=7)
    np.testing.assert_allclose(blocked, whole, atol=1e-5)
    out = tmp_path / "two.h5ad"
    assert (
        main(
            [
                "embed",
                "--model",
                str(pretrained_geneformer),
                "--data",
                str(lab_file),
                "--out",
                str(out),
                "--gene-column",
                GENES,
                "--devices",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_celltron"], whole, atol=1e-5)


def test_pooling_and_layer_choices(pretrained_geneformer, lab_file):
    mean_last = embed(pretrained_geneformer, lab_file, gene_column=GENES, pool="mean")
    cls_last = embed(pretrained_geneformer, lab_file, gene_column=GENES, pool="cls")
    mean_first = embed(pretrained_geneformer, lab_file, gene_column=GENES, pool="mean", layer=0)
    assert cls_last.shape == mean_last.shape and not np.allclose(cls_last, mean_last)
    assert not np.allclose(mean_first, mean_last)
    with pytest.raises(ValueError, match="--layer 9"):
        embed(pretrained_geneformer, lab_file, gene_column=GENES, layer=9)


def test_bad_input_is_refused_and_nothing_is_left_behind(pretrained_geneformer, lab_file, tmp_path):
    out = tmp_path / "out.h5ad"
    assert (
        main(
            [
                "embed",
                "--model",
                str(pretrained_geneformer),
                "--data",
                str(lab_file),
                "--out",
                str(out),
                "--gene-column",
                "no_such_column",
                "--no-progress",
            ]
        )
        == 2
    )
    assert not out.exists() and not list(tmp_path.iterdir())
    normalised = ad.read_h5ad(lab_file)
    normalised.X = normalised.X.astype(np.float32) / 3.0
    bad = tmp_path / "normalised.h5ad"
    normalised.write_h5ad(bad)
    assert (
        main(
            [
                "embed",
                "--model",
                str(pretrained_geneformer),
                "--data",
                str(bad),
                "--out",
                str(out),
                "--gene-column",
                GENES,
                "--no-progress",
            ]
        )
        == 2
    )
    assert not out.exists()


def test_embedding_in_place_replaces_the_file_only_when_done(pretrained_geneformer, lab_file, tmp_path):
    target = tmp_path / "in_place.h5ad"
    target.write_bytes(lab_file.read_bytes())
    assert (
        main(
            [
                "embed",
                "--model",
                str(pretrained_geneformer),
                "--data",
                str(target),
                "--out",
                str(target),
                "--gene-column",
                GENES,
                "--key",
                "X_gf",
                "--no-progress",
            ]
        )
        == 0
    )
    assert ad.read_h5ad(target).obsm["X_gf"].shape[0] == ad.read_h5ad(lab_file).n_obs


@pytest.mark.gpu
def test_bf16_embeddings_on_cuda_agree_with_fp32_on_cpu(pretrained_geneformer, tmp_path):
    from celltron.corpus.demo import demo_h5ad

    subset = tmp_path / "demo.h5ad"
    ad.read_h5ad(demo_h5ad())[:300].copy().write_h5ad(subset)
    cpu = embed(pretrained_geneformer, subset, device="cpu", precision="32")
    cuda = embed(pretrained_geneformer, subset, device="cuda", batch_size=64)  # bf16 autocast
    cosine = (cpu * cuda).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(cuda, axis=1))
    assert cosine.min() > 0.99
