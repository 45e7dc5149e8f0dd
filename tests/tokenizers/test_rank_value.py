"""Geneformer rank-value tokens on real PBMC cells, against a straightforward per-cell
implementation written from Geneformer's algorithm (its package cannot be installed here)."""

import gzip
import json
from importlib import resources

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltron.corpus import BuildOptions, Corpus, CorpusStream, build_corpus
from celltron.tokenizers import _kernels
from celltron.tokenizers.ragged import rank_cells
from celltron.tokenizers.rank_value import RankValueTokenizer
from celltron.tokenizers.vocab import GeneVocab


def _bundled(package, name):
    return json.loads(gzip.decompress(resources.files(package).joinpath(name).read_bytes()))


def reference_geneformer(adata, version):
    """Cell by cell: map symbols (upper-cased) through Geneformer's mapping dictionary, keep genes
    with a token, sum duplicates, normalise by n_counts x 10,000 / median, rank descending
    (ties by gene order, here sorted Ensembl IDs as in a corpus), truncate, add specials (V2)."""
    dictionaries = _bundled("celltron.data.vocab", f"geneformer_{version}.json.gz")
    tokens, medians = dictionaries["tokens"], dictionaries["medians"]
    mapping = _bundled("celltron.data.genes", "human_symbol_to_ensembl.json.gz")
    ensembl = [mapping.get(s.upper(), "") for s in adata.var["gene_symbol_original"]]
    genes = sorted({g for g in ensembl if g in tokens and g in medians})
    column = {g: i for i, g in enumerate(genes)}
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    merge = sp.csr_matrix(
        ([1.0] * sum(g in column for g in ensembl), ([i for i, g in enumerate(ensembl) if g in column], [column[g] for g in ensembl if g in column])),
        shape=(len(ensembl), len(genes)),
    )
    summed = (x @ merge).toarray()
    n_counts = np.asarray(x.sum(axis=1)).ravel()
    out = {}
    for row, name in enumerate(adata.obs_names):
        expressed = np.flatnonzero(summed[row])
        values = summed[row, expressed] / n_counts[row] * 10_000 / np.array([medians[genes[j]] for j in expressed])
        ranked = [tokens[genes[expressed[j]]] for j in np.argsort(-values, kind="stable")]
        if version == "v1":
            out[name] = ranked[:2048]
        else:
            out[name] = [tokens["<cls>"]] + ranked[:4094] + [tokens["<eos>"]]
    return out


@pytest.fixture(scope="module")
def pbmc_corpus(tmp_path_factory, pbmc3k):
    adata = ad.read_h5ad(pbmc3k)[:600].copy()
    path = tmp_path_factory.mktemp("pbmc") / "pbmc600.h5ad"
    adata.write_h5ad(path)
    out = path.parent / "corpus"
    build_corpus([path], out, BuildOptions(gene_column="gene_symbol_original", val_fraction=0, progress=False))
    return adata, out


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_same_tokens_as_the_reference_on_real_pbmc(pbmc_corpus, version, ranking):
    adata, corpus_dir = pbmc_corpus
    expected = reference_geneformer(adata, version)
    corpus = Corpus(corpus_dir)
    tokenizer = RankValueTokenizer.geneformer(version, corpus.gene_ids)
    shard = ad.read_zarr(corpus_dir / corpus.shards("train")[0]["path"])
    x = shard.X.tocsr()
    ragged = tokenizer.encode_block(x.indptr, x.indices, x.data, shard.obs["n_counts"].to_numpy())
    assert len(ragged) == len(expected)
    for i, name in enumerate(shard.obs_names):
        assert ragged[i].tolist() == expected[name], name


def test_truncation_and_specials(ranking):
    vocab = GeneVocab.from_geneformer("v2")
    genes = [t for t in vocab.tokens if t.startswith("ENSG")][:5000]
    medians = {g: 1.0 for g in genes}
    short = RankValueTokenizer(vocab, medians, genes, max_len=6, add_specials=True)
    counts = np.arange(5000, 0, -1).astype(np.int32)  # strictly decreasing: rank = gene order
    ids = short.encode_block(np.array([0, 5000]), np.arange(5000), counts).input_ids
    assert ids.tolist() == [vocab["<cls>"]] + [vocab[g] for g in genes[:4]] + [vocab["<eos>"]]
    v1 = RankValueTokenizer.geneformer("v1", [t for t in GeneVocab.from_geneformer("v1").tokens if t.startswith("ENSG")][:5000])
    assert v1.encode_block(np.array([0, 5000]), np.arange(5000), counts).lengths.tolist() == [2048]


def test_ties_follow_input_gene_order_and_unknown_genes_and_zeros_drop(ranking):
    vocab = GeneVocab.from_geneformer("v1")
    genes = [t for t in vocab.tokens if t.startswith("ENSG")][:4] + ["ENSG99999999999"]
    tokenizer = RankValueTokenizer(vocab, {g: 1.0 for g in genes}, genes, max_len=2048, add_specials=False)
    block = tokenizer.encode_block(np.array([0, 5, 5]), np.array([3, 1, 2, 0, 4]), np.array([2, 2, 0, 1, 9]))
    assert block[0].tolist() == [vocab[genes[1]], vocab[genes[3]], vocab[genes[0]]]  # tie: gene 1 before gene 3
    assert block[1].tolist() == []  # an empty cell gives an empty sequence


def test_corpus_medians_and_the_stream_transform(pbmc_corpus):
    _, corpus_dir = pbmc_corpus
    corpus = Corpus(corpus_dir)
    own = corpus.gene_medians()
    tokenizer = RankValueTokenizer.geneformer("v2", corpus.gene_ids, medians=own)
    stream = CorpusStream(corpus, infinite=False, transform=tokenizer)
    first = next(iter(stream))
    assert first["input_ids"][0] == tokenizer.vocab["<cls>"] and first["input_ids"][-1] == tokenizer.vocab["<eos>"]
    assert first["length"] == len(first["input_ids"]) > 2


def test_vocab_round_trip(tmp_path):
    for vocab in (GeneVocab.from_geneformer("v1"), GeneVocab.from_geneformer("v2"), GeneVocab.from_scgpt()):
        vocab.save_pretrained(tmp_path / vocab.name)
        again = GeneVocab.from_pretrained(tmp_path / vocab.name)
        assert again.tokens == vocab.tokens and again.ensembl_ids == vocab.ensembl_ids and again.specials == vocab.specials
    scgpt = GeneVocab.from_scgpt()
    assert len(scgpt) == 60697 and scgpt["<pad>"] == 60694 and scgpt.special_id("eos") == 60696
    assert scgpt.lookup_genes(["ENSG00000141510"])[0] == scgpt["TP53"]


def test_compiled_ranking_equals_the_numpy_loop_with_many_ties(pbmc_corpus, monkeypatch):
    """Coarse medians make exact and near ties common: every token and value must agree."""
    pytest.importorskip("numba")
    _, corpus_dir = pbmc_corpus
    corpus = Corpus(corpus_dir)
    x = ad.read_zarr(corpus_dir / corpus.shards("train")[0]["path"]).X.tocsr()
    rng = np.random.default_rng(0)
    for medians in ({g: float(rng.choice([0.5, 1.0, 2.0, 3.0])) for g in corpus.gene_ids}, corpus.gene_medians()):
        for max_len, specials in ((4096, True), (37, False)):
            tokenizer = RankValueTokenizer(GeneVocab.from_geneformer("v2"), medians, corpus.gene_ids, max_len, specials)
            args = (x.indptr, x.indices, x.data, None, tokenizer.token_of_gene, tokenizer.median, max_len - 2, 1, 1)
            monkeypatch.setenv("CELLTRON_NUMBA", "0")
            numpy_loop = rank_cells(*args)
            compiled = _kernels.rank_cells_compiled(*args)
            assert compiled is not None  # corpus genes are in order: the kernel ran
            for ours, theirs in zip(numpy_loop, compiled):  # offsets, token ids, values
                assert np.array_equal(ours, theirs)
    shuffled = x.indices.copy()
    shuffled[x.indptr[5] : x.indptr[6]] = shuffled[x.indptr[5] : x.indptr[6]][::-1]
    assert _kernels.rank_cells_compiled(x.indptr, shuffled, x.data, None, tokenizer.token_of_gene, tokenizer.median, 10, 1, 1) is None
