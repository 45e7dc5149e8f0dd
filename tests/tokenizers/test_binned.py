"""scGPT binned tokens on real PBMC and mouse cells, against scGPT's own functions."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from celltron.corpus.genes import map_genes
from celltron.tokenizers.binned import BinnedTokenizer
from celltron.tokenizers.vocab import GeneVocab
from tests.scgpt_reference import reference_binning, reference_tokenize_and_pad


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
    ours = tokenizer.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(7))
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
    ours = BinnedTokenizer(vocab, ids, value_style="log1p", max_len=100_000).encode_csr(
        x.indptr, x.indices, x.data, np.random.default_rng(0)
    )
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
    a = tokenizer.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(1))
    b = tokenizer.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(1))
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
    block = tokenizer.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(0))
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
    a = full.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(0))
    b = part.encode_csr(x.indptr, x.indices, x.data, np.random.default_rng(0))
    for i in range(len(a)):
        kept = {t: v for t, v in zip(a[i].tolist(), a.cell_values(i).tolist())}
        for token, value in zip(b[i].tolist()[1:], b.cell_values(i).tolist()[1:]):
            assert value == pytest.approx(kept[token])  # same normalisation as without the subset


def test_compiled_binning_equals_the_numpy_path(pbmc):
    pytest.importorskip("numba")
    from celltron.tokenizers import _kernels
    from celltron.tokenizers.binned import _quantile_levels, bin_values

    x = sp.csr_matrix(np.log1p(sp.diags(1e4 / np.asarray(pbmc.X.sum(axis=1)).ravel()) @ sp.csr_matrix(pbmc.X, dtype=np.float64)))
    uniform = np.random.default_rng(3).random(x.nnz)
    compiled = _kernels.bin_cells_compiled(x.indptr, x.data, _quantile_levels(51), uniform)
    for lo, hi in zip(x.indptr[:-1], x.indptr[1:]):
        assert np.array_equal(compiled[lo:hi], bin_values(x.data[lo:hi], 51, uniform[lo:hi]))


def test_length_sampling_is_uniform_and_the_same_with_and_without_numba(monkeypatch):
    from celltron.tokenizers.binned import sample_positions

    pytest.importorskip("numba")
    uniform = np.random.default_rng(0).random(6)
    compiled = sample_positions([7, 5], 1, 4, uniform[:6])
    monkeypatch.setenv("CELLTRON_NUMBA", "0")
    assert np.array_equal(compiled, sample_positions([7, 5], 1, 4, uniform[:6]))
    assert compiled[0] == 0 and compiled[4] == 0  # <cls> first in each cell
    # every non-<cls> position is picked equally often (3 of 6 each): a uniform subset
    picks = sample_positions([7] * 4000, 1, 4, np.random.default_rng(1).random(4000 * 3)).reshape(4000, 4)
    assert (picks[:, 0] == 0).all() and all(len(set(row)) == 4 for row in picks[:50])
    frequency = np.bincount(picks[:, 1:].ravel(), minlength=7)[1:] / 4000
    assert np.allclose(frequency, 0.5, atol=0.03)


@pytest.mark.parametrize("include_zero_gene", [False, True])
def test_compiled_and_numpy_tokenizers_give_the_same_block(pbmc, monkeypatch, include_zero_gene):
    pytest.importorskip("numba")
    vocab = GeneVocab.from_scgpt()
    adata, ids, _ = _in_vocab(pbmc[:60], vocab)
    tokenizer = BinnedTokenizer(vocab, ids, max_len=300, include_zero_gene=include_zero_gene)
    x = adata.X.tocsr()
    blocks = {}
    for backend in ("0", "1"):
        monkeypatch.setenv("CELLTRON_NUMBA", backend)
        blocks[backend] = tokenizer.encode_csr(x.indptr, x.indices, x.data.astype(np.int32), np.random.default_rng(5))
    assert (blocks["1"].lengths == 300).any()  # some cells were sampled down to max_len
    for name in ("offsets", "input_ids", "values"):
        assert np.array_equal(getattr(blocks["0"], name), getattr(blocks["1"], name)), name
