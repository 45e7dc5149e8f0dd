"""Highly variable genes against scanpy's `pp.highly_variable_genes` (what scGPT's Preprocessor
runs) on real PBMC and mouse counts; streaming over blocks; `celltron tokenize --hvg`."""

import json
import sys

import anndata as ad
import datasets
import numpy as np
import pytest
import scipy.sparse as sp

from celltron.cli import main
from celltron.corpus import Corpus
from celltron.preprocessing import log_normalise as log_normalize
from celltron.tokenizers.dataset import _h5ad_input
from celltron.tokenizers.hvg import highly_variable_genes
from celltron.tokenizers.vocab import GeneVocab
from tests.conftest import shared_file

sc = pytest.importorskip("scanpy", reason="scanpy is the reference (installed with celltron's eval extra)")
pytest.importorskip("skmisc", reason="seurat_v3 needs scikit-misc: pip install 'celltron[hvg]'")

V3_COLUMNS = ["means", "variances", "variances_norm", "highly_variable_rank"]
DISPERSION_COLUMNS = ["means", "dispersions", "dispersions_norm"]


@pytest.fixture(scope="module")
def pbmc(pbmc3k):
    return ad.read_h5ad(pbmc3k)


@pytest.fixture(scope="module")
def two_pbmc(pbmc3k, pbmc4k):
    """Two PBMC sets on their shared genes, the file as batch."""
    parts = {name: ad.read_h5ad(path) for name, path in (("3k", pbmc3k), ("4k", pbmc4k))}
    for part in parts.values():
        part.var_names_make_unique()
    both = ad.concat(parts, label="file", join="inner", index_unique="-")
    return both


def _log_normalised(adata):
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def assert_same_as_scanpy(ours, reference, columns):
    """The same genes selected, and the same statistics (NaN where scanpy has NaN)."""
    np.testing.assert_array_equal(ours.highly_variable, reference["highly_variable"].to_numpy())
    for column in columns:
        np.testing.assert_allclose(
            ours.statistics[column], reference[column].to_numpy(dtype=float), rtol=1e-10, atol=1e-12, err_msg=column
        )


def test_seurat_v3_equals_scanpy_on_pbmc_counts(pbmc):
    reference = sc.pp.highly_variable_genes(pbmc, n_top_genes=2000, flavor="seurat_v3", inplace=False)
    ours = highly_variable_genes(pbmc.X, 2000)
    assert ours.highly_variable.sum() == 2000
    assert_same_as_scanpy(ours, reference, V3_COLUMNS)


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat_v3_paper"])
def test_seurat_v3_with_batches_equals_scanpy(two_pbmc, flavor):
    reference = sc.pp.highly_variable_genes(two_pbmc, n_top_genes=1000, flavor=flavor, batch_key="file", inplace=False)
    ours = highly_variable_genes(two_pbmc.X, 1000, flavor=flavor, batch=two_pbmc.obs["file"].to_numpy())
    assert_same_as_scanpy(ours, reference, V3_COLUMNS + ["highly_variable_nbatches"])
    assert set(np.unique(ours.statistics["highly_variable_nbatches"])) == {0, 1, 2}


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_dispersion_flavors_equal_scanpy_on_log1p_data(pbmc, flavor):
    logged = _log_normalised(pbmc)
    # the CLI's own log1p(counts per 10,000) is scanpy's normalize_total + log1p
    ours, theirs = log_normalize(pbmc.X[:300]), logged.X[:300]
    np.testing.assert_array_equal(ours.indptr, theirs.indptr)
    np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-6)
    sc.pp.filter_genes(logged, min_cells=1)  # cell_ranger's quantile bins need distinct means
    reference = sc.pp.highly_variable_genes(logged, n_top_genes=1000, flavor=flavor, inplace=False)
    ours = highly_variable_genes(logged.X, 1000, flavor=flavor)
    assert_same_as_scanpy(ours, reference, DISPERSION_COLUMNS)


@pytest.mark.parametrize("flavor", ["seurat", "cell_ranger"])
def test_dispersion_flavors_with_batches_equal_scanpy(two_pbmc, flavor):
    logged = _log_normalised(two_pbmc)
    reference = sc.pp.highly_variable_genes(logged, n_top_genes=1000, flavor=flavor, batch_key="file", inplace=False)
    ours = highly_variable_genes(logged.X, 1000, flavor=flavor, batch=logged.obs["file"].to_numpy(), gene_names=logged.var_names)
    assert_same_as_scanpy(ours, reference, DISPERSION_COLUMNS + ["highly_variable_nbatches"])


def test_expressed_only_equals_scanpy_on_expressed_genes(pbmc):
    logged = _log_normalised(pbmc)
    with pytest.raises(ValueError, match="not distinct.*expressed_only=True"):  # scanpy raises here too
        highly_variable_genes(logged.X, 1000, flavor="cell_ranger")
    ours = highly_variable_genes(logged.X, 1000, flavor="cell_ranger", expressed_only=True)
    expressed = logged[:, np.asarray((logged.X > 0).sum(axis=0)).ravel() > 0].copy()
    reference = sc.pp.highly_variable_genes(expressed, n_top_genes=1000, flavor="cell_ranger", inplace=False)
    assert list(logged.var_names[ours.highly_variable]) == list(expressed.var_names[reference["highly_variable"]])


def test_blocks_streamed_twice_equal_the_matrix_in_memory(pbmc):
    x = pbmc.X.tocsr()
    batch = np.where(np.arange(x.shape[0]) % 3 == 0, "a", "b")
    in_memory = highly_variable_genes(x, 500, batch=batch)
    calls = []

    def blocks():
        calls.append(1)
        for start in range(0, x.shape[0], 97):
            yield x[start : start + 97], batch[start : start + 97]

    streamed = highly_variable_genes(blocks, 500)
    assert len(calls) == 2  # moments, then clipped sums
    np.testing.assert_array_equal(streamed.highly_variable, in_memory.highly_variable)
    for column, values in in_memory.statistics.items():
        np.testing.assert_array_equal(streamed.statistics[column], values, err_msg=column)  # to the last bit


def test_mouse_counts_with_ties_at_the_cut_select_as_scanpy():
    mouse = ad.read_h5ad(shared_file("scrna/mouse/dentategyrus_100obs.h5ad"))
    # 100 cells: the default span 0.3 leaves scikit-misc's loess near-singular (in scanpy too)
    reference = sc.pp.highly_variable_genes(mouse, n_top_genes=1000, flavor="seurat_v3", span=0.5, inplace=False)
    ours = highly_variable_genes(mouse.X, 1000, span=0.5)
    assert_same_as_scanpy(ours, reference, V3_COLUMNS)
    scores = ours.statistics["variances_norm"]
    cut = np.sort(scores)[::-1][999]
    assert np.sum(scores == cut) > 1 + np.sum(ours.highly_variable & (scores == cut))  # a tie split by the cut


def test_refusals(pbmc, monkeypatch):
    x = pbmc.X[:200].tocsr()
    with pytest.raises(ValueError, match="expects raw counts.*counts layer"):
        highly_variable_genes(_log_normalised(pbmc[:200]).X, 100)
    with pytest.raises(ValueError, match="non-negative"):
        highly_variable_genes(-x, 100, flavor="seurat")
    with pytest.raises(ValueError, match="n_top_genes=40000 is more than the 32738 genes"):
        highly_variable_genes(x, 40_000)
    with pytest.raises(ValueError, match="flavor must be one of"):
        highly_variable_genes(x, 100, flavor="pearson_residuals")
    with pytest.raises(ValueError, match="2 batch labels for 200 cells"):
        highly_variable_genes(x, 100, batch=["a", "b"])
    with pytest.raises(ValueError, match="larger span than 0.3"):
        highly_variable_genes(ad.read_h5ad(shared_file("scrna/mouse/pancreas_50obs.h5ad")).X, 500)
    monkeypatch.setitem(sys.modules, "skmisc.loess", None)  # as if scikit-misc were not installed
    with pytest.raises(ImportError, match=r"pip install 'celltron\[hvg\]'"):
        highly_variable_genes(x, 100)


def test_tokenize_cli_keeps_only_the_highly_variable_genes(tmp_path, pbmc4k, capsys):
    lab = tmp_path / "lab.h5ad"
    ad.read_h5ad(pbmc4k)[:500].copy().write_h5ad(lab)
    out = tmp_path / "tokens"
    assert (
        main(
            [
                "tokenize",
                str(lab),
                "--scheme",
                "scgpt",
                "--hvg",
                "200",
                "--gene-column",
                "gene_symbol_original",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    chosen = json.loads((out / "tokenizer_config.json").read_text())["settings"]["genes_subset"]
    # scanpy on the same cells: the file's genes as celltron maps them, those scGPT's vocab covers
    data = _h5ad_input(lab, (), 10_000, "X", "gene_symbol_original", None)
    block = next(data.blocks)
    vocab = GeneVocab.from_scgpt()
    covered = vocab.lookup_genes(data.gene_ids) >= 0
    x = sp.csr_matrix((block.counts, block.genes, block.indptr), shape=(500, len(data.gene_ids)))[:, covered]
    adata = ad.AnnData(x, var={"ensembl": data.gene_ids[covered]})
    sc.pp.filter_genes(adata, min_cells=1)
    reference = sc.pp.highly_variable_genes(adata, n_top_genes=200, flavor="seurat_v3", inplace=False)
    assert sorted(chosen) == sorted(adata.var["ensembl"][reference["highly_variable"].to_numpy()])
    tokens = {token for row in datasets.load_from_disk(str(out))["input_ids"] for token in row}
    allowed = set(vocab.lookup_genes(chosen).tolist()) | {vocab.special_id("cls")}
    assert tokens <= allowed and len(tokens) > 150
    assert json.loads((out / "tokenize_summary.json").read_text())["hvg"]["n_top_genes"] == 200
    assert main(["tokenize", str(lab), "--scheme", "geneformer-v2", "--hvg", "200", "--out", str(tmp_path / "gf")]) == 2
    assert "--hvg selects highly variable genes as scGPT's Preprocessor does" in capsys.readouterr().err


def test_corpus_hvg_is_chosen_on_the_training_split(tmp_path, small_corpus):
    subsets = {}
    for split in ("train", "val"):
        out = tmp_path / split
        assert (
            main(
                [
                    "tokenize",
                    str(small_corpus),
                    "--scheme",
                    "scgpt",
                    "--split",
                    split,
                    "--hvg",
                    "100",
                    "--hvg-flavor",
                    "seurat",
                    "--hvg-batch-key",
                    "species",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        subsets[split] = json.loads((out / "tokenizer_config.json").read_text())["settings"]["genes_subset"]
        assert datasets.load_from_disk(str(out)).num_rows == Corpus(small_corpus).manifest["splits"][split]["n_cells"]
    assert len(subsets["train"]) >= 100 and subsets["train"] == subsets["val"]
