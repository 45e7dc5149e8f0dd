"""scGPT binned tokens on real PBMC and mouse cells, against scGPT's own functions."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from celltron.corpus.genes import map_genes
from celltron.tokenizers.binned import BinnedTokenizer
from celltron.tokenizers.vocab import GeneVocab

from celltron.testing.scgpt_reference import reference_binning, reference_tokenize_and_pad


@pytest.fixture(scope="module")
def pbmc(pbmc4k):
    adata = ad.read_h5ad(pbmc4k)[:300].copy()
    adata.X = sp.csr_matrix(adata.X)
    return adata


def _in_vocab(adata, vocab):
    """scGPT subsets the data to genes in its vocabulary before preprocessing."""
    ids = map_genes(adata.var["gene_symbol_original"], "human", "pbmc").ensembl_ids
    tokens = vocab.lookup_genes(ids)
    keep = np.flatnonzero(tokens >= 0)
    # one column per token (scGPT's vocabulary has one id per symbol)
    _, first = np.unique(tokens[keep], return_index=True)
    keep = np.sort(keep[first])
    return adata[:, keep].copy(), ids[keep], tokens[keep]


def _normalised_log1p(x):
    x = sp.csr_matrix(x, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    return np.log1p(sp.diags(1e4 / totals) @ x).toarray()


def test_binning_equals_scgpt_with_the_same_draws(pbmc, ranking):
    vocab = GeneVocab.from_scgpt()
    adata, ids, _ = _in_vocab(pbmc, vocab)
    tokenizer = BinnedTokenizer(vocab, ids, max_len=100_000)
    x = adata.X.tocsr()
    ours = tokenizer.encode_block(x.indptr, x.indices, x.data, np.random.default_rng(7))
    dense = _normalised_log1p(x)
    draws = np.random.default_rng(7)
    binning = reference_binning()
    original_rand = np.random.rand
    np.random.rand = lambda n: draws.random(n)  # scGPT draws from the global RNG: hand it ours
    try:
        expected = [binning(row, 51) for row in dense]
    finally:
        np.random.rand = original_rand
    for i, row in enumerate(expected):
        expressed = np.flatnonzero(row)
        values = ours.cell_values(i)
        assert values[0] == 0  # <cls>
        assert values[1:].tolist() == row[expressed].astype(np.int64).tolist()
        assert values.max() <= 50


def test_tokens_and_padding_equal_scgpt_when_nothing_is_sampled(pbmc, ranking):
    vocab = GeneVocab.from_scgpt()
    adata, ids, tokens = _in_vocab(pbmc, vocab)
    x = adata.X.tocsr()
    ours = BinnedTokenizer(vocab, ids, value_style="log1p", max_len=100_000).encode_block(x.indptr, x.indices, x.data, np.random.default_rng(0))
    dense = _normalised_log1p(x)
    stoi = {t: i for i, t in enumerate(vocab.tokens)}
    expected = reference_tokenize_and_pad()(dense, tokens, max_len=100_000, vocab=stoi, pad_token="<pad>", pad_value=-2)
    for i in range(len(ours)):
        ids_i, values_i = ours[i], ours.cell_values(i)
        n = len(ids_i)
        assert expected["genes"][i, :n].tolist() == ids_i.tolist()
        assert torch.allclose(expected["values"][i, :n], torch.from_numpy(values_i), rtol=1e-6)
        assert (expected["genes"][i, n:] == stoi["<pad>"]).all()


def test_long_cells_keep_cls_and_sample_without_replacement(pbmc):
    vocab = GeneVocab.from_scgpt()
    adata, ids, _ = _in_vocab(pbmc, vocab)
    x = adata.X.tocsr()[:20]
    tokenizer = BinnedTokenizer(vocab, ids, max_len=64)
    a = tokenizer.encode_block(x.indptr, x.indices, x.data, np.random.default_rng(1))
    b = tokenizer.encode_block(x.indptr, x.indices, x.data, np.random.default_rng(1))
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.values, b.values)
    for i in range(len(a)):
        cell_ids = a[i]
        assert len(cell_ids) == min(64, np.diff(x.indptr)[i] + 1)
        assert cell_ids[0] == vocab["<cls>"] and len(set(cell_ids.tolist())) == len(cell_ids)


def test_include_zero_gene_and_mouse_cells(mouse_pancreas, ranking):
    vocab = GeneVocab.from_genes(["ENSMUSG00000059552", "ENSMUSG00000029580", "ENSMUSG00000051951"], species=["mouse"])
    adata = ad.read_h5ad(mouse_pancreas)
    ids = map_genes(adata.var_names, "mouse", "pancreas").ensembl_ids
    x = sp.csr_matrix(adata.X)
    tokenizer = BinnedTokenizer(vocab, ids, include_zero_gene=True, max_len=10)
    block = tokenizer.encode_block(x.indptr, x.indices, x.data, np.random.default_rng(0))
    assert (block.lengths == 4).all()  # <cls> + the 3 vocabulary genes, expressed or not
    present = vocab.lookup_genes(ids)
    assert block[0][1:].tolist() == present[present >= 0].tolist()  # input gene order


def test_transform_is_deterministic_per_cell():
    vocab = GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(100)])
    tokenizer = BinnedTokenizer(vocab, [f"ENSG{i:011d}" for i in range(100)], max_len=10, seed=3)
    cell = {"genes": np.arange(0, 100, 2), "counts": np.arange(1, 51), "cell_index": 12}
    assert np.array_equal(tokenizer(cell)["input_ids"], tokenizer(cell)["input_ids"])


def test_quantile_edges_equal_numpy_bit_for_bit(pbmc):
    from celltron.tokenizers.binned import quantile_edges

    dense = _normalised_log1p(pbmc.X[:200])
    for row in dense:
        values = row[row > 0]
        assert np.array_equal(quantile_edges(values, 51), np.quantile(values, np.linspace(0, 1, 50)))
    for values in (np.array([3.0]), np.array([1.0, 1.0, 2.0]), np.arange(1, 8, dtype=float)):
        assert np.array_equal(quantile_edges(values, 51), np.quantile(values, np.linspace(0, 1, 50)))


def test_gene_subset_normalises_over_all_vocabulary_genes(pbmc):
    vocab = GeneVocab.from_scgpt()
    adata, ids, _ = _in_vocab(pbmc, vocab)
    x = adata.X.tocsr()[:30]
    subset = ids[:2000]
    full = BinnedTokenizer(vocab, ids, value_style="normalized", log1p=False, max_len=100_000)
    part = BinnedTokenizer(vocab, ids, value_style="normalized", log1p=False, max_len=100_000, genes_subset=subset)
    a = full.encode_block(x.indptr, x.indices, x.data, np.random.default_rng(0))
    b = part.encode_block(x.indptr, x.indices, x.data, np.random.default_rng(0))
    for i in range(len(a)):
        kept = {t: v for t, v in zip(a[i].tolist(), a.cell_values(i).tolist())}
        for token, value in zip(b[i].tolist()[1:], b.cell_values(i).tolist()[1:]):
            assert value == pytest.approx(kept[token])  # same normalisation as without the subset
