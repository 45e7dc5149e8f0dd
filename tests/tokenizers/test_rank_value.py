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
from celltron.tokenizers.rank_value import RankValueTokenizer, float32_datasets
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
        (
            [1.0] * sum(g in column for g in ensembl),
            ([i for i, g in enumerate(ensembl) if g in column], [column[g] for g in ensembl if g in column]),
        ),
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


def geneformer_scipy_tokens(adata, version, chunk_size=512):
    """Geneformer's `TranscriptomeTokenizer.tokenize_anndata`, step for step on the file's own
    scipy matrix: genes mapped to Ensembl IDs and duplicates summed (its collapse of gene IDs,
    which also sorts them), then per chunk of 512 cells `X / n_counts * target_sum /
    norm_factor_vector` with the obs column n_counts, `sp.csr_matrix`, `np.argsort(-values)` of
    each row, truncation and V2's <cls>/<eos>. scipy divides by multiplying with the reciprocal in
    the operands' dtype: float32 for a float32 X and n_counts, float64 once the medians come in."""
    dictionaries = _bundled("celltron.data.vocab", f"geneformer_{version}.json.gz")
    tokens, medians = dictionaries["tokens"], dictionaries["medians"]
    mapping = _bundled("celltron.data.genes", "human_symbol_to_ensembl.json.gz")
    ensembl = [mapping.get(s.upper(), "") for s in adata.var["gene_symbol_original"]]
    genes = sorted({g for g in ensembl if g in tokens and g in medians})
    column = {g: i for i, g in enumerate(genes)}
    rows = [i for i, g in enumerate(ensembl) if g in column]
    merge = sp.csr_matrix(
        (np.ones(len(rows), adata.X.dtype), (rows, [column[ensembl[i]] for i in rows])), shape=(len(ensembl), len(genes))
    )
    x = sp.csr_matrix(adata.X @ merge)  # integer counts: the sums are exact in float32
    n_counts = adata.obs["n_counts"].to_numpy()[:, None]
    norm_factor_vector = np.array([medians[g] for g in genes])
    gene_tokens = np.array([tokens[g] for g in genes])
    out = {}
    for start in range(0, x.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        x_norm = sp.csr_matrix(x[chunk] / n_counts[chunk] * 10_000 / norm_factor_vector)
        for name, row in zip(adata.obs_names[chunk], x_norm):
            ranked = gene_tokens[row.indices][np.argsort(-row.data)].tolist()
            out[name] = ranked[:2048] if version == "v1" else [tokens["<cls>"]] + ranked[:4094] + [tokens["<eos>"]]
    return out


@pytest.fixture(scope="module")
def pbmc_corpus(tmp_path_factory, pbmc3k):
    """600 PBMC cells as a float32 .h5ad (raw integer counts; n_counts, as Geneformer users
    compute it, the float32 row sums) and the corpus built from it."""
    adata = ad.read_h5ad(pbmc3k)[:600].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    assert adata.obs["n_counts"].dtype == np.float32
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
    ragged = tokenizer.encode_csr(x.indptr, x.indices, x.data, shard.obs["n_counts"].to_numpy())
    assert len(ragged) == len(expected)
    for i, name in enumerate(shard.obs_names):
        assert ragged[i].tolist() == expected[name], name


def test_truncation_and_specials(ranking):
    vocab = GeneVocab.from_geneformer("v2")
    genes = [t for t in vocab.tokens if t.startswith("ENSG")][:5000]
    medians = {g: 1.0 for g in genes}
    short = RankValueTokenizer(vocab, medians, genes, max_len=6, add_specials=True)
    counts = np.arange(5000, 0, -1).astype(np.int32)  # strictly decreasing: rank = gene order
    ids = short.encode_csr(np.array([0, 5000]), np.arange(5000), counts).input_ids
    assert ids.tolist() == [vocab["<cls>"]] + [vocab[g] for g in genes[:4]] + [vocab["<eos>"]]
    v1 = RankValueTokenizer.geneformer("v1", [t for t in GeneVocab.from_geneformer("v1").tokens if t.startswith("ENSG")][:5000])
    assert v1.encode_csr(np.array([0, 5000]), np.arange(5000), counts).lengths.tolist() == [2048]


def test_ties_follow_input_gene_order_and_unknown_genes_and_zeros_drop(ranking):
    vocab = GeneVocab.from_geneformer("v1")
    genes = [t for t in vocab.tokens if t.startswith("ENSG")][:4] + ["ENSG99999999999"]
    tokenizer = RankValueTokenizer(vocab, {g: 1.0 for g in genes}, genes, max_len=2048, add_specials=False)
    block = tokenizer.encode_csr(np.array([0, 5, 5]), np.array([3, 1, 2, 0, 4]), np.array([2, 2, 0, 1, 9]))
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
    float32_cells = rng.random(x.shape[0]) < 0.5  # cells of float32 sources take float32 steps
    for medians in ({g: float(rng.choice([0.5, 1.0, 2.0, 3.0])) for g in corpus.gene_ids}, corpus.gene_medians()):
        for max_len, specials in ((4096, True), (37, False)):
            tokenizer = RankValueTokenizer(GeneVocab.from_geneformer("v2"), medians, corpus.gene_ids, max_len, specials)
            args = (x.indptr, x.indices, x.data, None, tokenizer.token_of_gene, tokenizer.median, max_len - 2, 1, 1)
            monkeypatch.setenv("CELLTRON_NUMBA", "0")
            for single in (None, float32_cells):
                numpy_loop = rank_cells(*args, float32_cells=single)
                compiled = _kernels.rank_cells_compiled(*args, float32_cells=single)
                assert compiled is not None  # corpus genes are in order: the kernel ran
                for ours, theirs in zip(numpy_loop, compiled):  # offsets, token ids, values
                    assert np.array_equal(ours, theirs)
    shuffled = x.indices.copy()
    shuffled[x.indptr[5] : x.indptr[6]] = shuffled[x.indptr[5] : x.indptr[6]][::-1]
    assert (
        _kernels.rank_cells_compiled(x.indptr, shuffled, x.data, None, tokenizer.token_of_gene, tokenizer.median, 10, 1, 1)
        is None
    )


def _corpus_tokens(corpus_dir, version, float32_cells):
    corpus = Corpus(corpus_dir)
    shard = ad.read_zarr(corpus_dir / corpus.shards("train")[0]["path"])
    x = shard.X.tocsr()
    if float32_cells == "manifest":
        float32_cells = float32_datasets(corpus.manifest)[shard.obs["dataset"].cat.codes.to_numpy()]
    tokenizer = RankValueTokenizer.geneformer(version, corpus.gene_ids)
    ragged = tokenizer.encode_csr(x.indptr, x.indices, x.data, shard.obs["n_counts"].to_numpy(), float32_cells)
    return {name: ragged[i].tolist() for i, name in enumerate(shard.obs_names)}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_float32_source_ranks_as_geneformer_on_its_scipy_matrix(pbmc_corpus, version, ranking):
    """On a float32 .h5ad, Geneformer's float32 steps order some near-tied genes the other way
    round than float64 arithmetic; the corpus records the source's dtype and celltron takes the
    same steps, so every cell's tokens are Geneformer's."""
    adata, corpus_dir = pbmc_corpus
    assert Corpus(corpus_dir).manifest["sources"][0]["dtype"] == "float32"
    expected = geneformer_scipy_tokens(adata, version)
    in_float64 = _corpus_tokens(corpus_dir, version, None)
    assert sum(in_float64[name] != expected[name] for name in expected) > 0  # the data has such near-ties
    ours = _corpus_tokens(corpus_dir, version, "manifest")
    assert len(ours) == len(expected)
    assert [name for name in expected if ours[name] != expected[name]] == []


def test_celltron_tokenize_reads_the_dtype_of_h5ad_and_corpus_sources(pbmc_corpus, tmp_path):
    import datasets

    from celltron.tokenizers.dataset import tokenize_to_dataset

    adata, corpus_dir = pbmc_corpus
    expected = geneformer_scipy_tokens(adata, "v2")
    tokenize_to_dataset(
        corpus_dir.parent / "pbmc600.h5ad", "geneformer-v2", tmp_path / "file", gene_column="gene_symbol_original", progress=False
    )
    from_file = datasets.load_from_disk(str(tmp_path / "file"))["input_ids"]
    assert from_file == [expected[name] for name in adata.obs_names]  # file order
    tokenize_to_dataset(corpus_dir, "geneformer-v2", tmp_path / "corpus", progress=False)
    shard = ad.read_zarr(corpus_dir / Corpus(corpus_dir).shards("train")[0]["path"])
    from_corpus = datasets.load_from_disk(str(tmp_path / "corpus"))["input_ids"]
    assert from_corpus == [expected[name] for name in shard.obs_names]  # corpus order


def test_the_stream_transform_takes_the_source_dtype(pbmc_corpus):
    adata, corpus_dir = pbmc_corpus
    corpus = Corpus(corpus_dir)
    expected = geneformer_scipy_tokens(adata, "v2")
    tokenizer = RankValueTokenizer.geneformer("v2", corpus.gene_ids)
    float32_of_dataset = float32_datasets(corpus.manifest)
    names = ad.read_zarr(corpus_dir / corpus.shards("train")[0]["path"]).obs_names
    cells = CorpusStream(corpus, infinite=False, shuffle=False, transform=lambda cell: tokenizer(cell, float32_of_dataset))
    assert [cell["input_ids"].tolist() for cell in cells] == [expected[name] for name in names]


def test_sources_without_a_float32_dtype_keep_float64_arithmetic():
    """Integer and float64 sources, and corpora built before sources recorded their dtype."""
    manifest = {
        "obs_categories": {"dataset": ["old", "ints", "doubles", "singles"]},
        "sources": [
            {"dataset": "old"},
            {"dataset": "ints", "dtype": "int32"},
            {"dataset": "doubles", "dtype": "float64"},
            {"dataset": "singles", "dtype": "float32"},
        ],
    }
    lookup = float32_datasets(manifest)
    assert lookup.tolist() == [False, False, False, True, False]
    assert lookup[np.array([3, -1, 0])].tolist() == [True, False, False]  # code -1: no dataset
    assert float32_datasets({"obs_categories": {}, "sources": []}).tolist() == [False]


def test_float32_steps_round_in_float32(ranking):
    """A cell of 3 counts (median 1): each count times float32(1 / 3), rounded to float32, times
    10,000 rounded again; float64 sources keep count / 3 * 10,000."""
    vocab = GeneVocab.from_geneformer("v1")
    genes = [t for t in vocab.tokens if t.startswith("ENSG")][:2]
    tokenizer = RankValueTokenizer(vocab, {g: 1.0 for g in genes}, genes, max_len=2048, add_specials=False)
    args = (
        np.array([0, 2]),
        np.array([0, 1]),
        np.array([2, 1]),
        np.array([3.0]),
        tokenizer.token_of_gene,
        tokenizer.median,
        10,
        0,
        0,
    )
    reciprocal = np.float32(1) / np.float32(3)
    in_float32 = [float(np.float32(np.float32(count) * reciprocal) * np.float32(10_000)) for count in (2, 1)]
    assert rank_cells(*args, float32_cells=np.array([True]))[2].tolist() == in_float32
    assert rank_cells(*args)[2].tolist() == [2 / 3 * 10_000, 1 / 3 * 10_000]
    assert in_float32 != [2 / 3 * 10_000, 1 / 3 * 10_000]


def test_pretraining_batches_take_the_source_dtype(pbmc_corpus):
    """The pretraining data path (rounds of stream cells, tokenised as blocks) ranks as Geneformer
    on a float32 source: each batch row, unmasked through its labels, is one of the cells."""
    import torch

    from celltron.pretrain.config import DataSection
    from celltron.pretrain.data import Masker, TokenBatches

    adata, corpus_dir = pbmc_corpus
    corpus = Corpus(corpus_dir)
    expected = sorted(geneformer_scipy_tokens(adata, "v2").values())
    tokenizer = RankValueTokenizer.geneformer("v2", corpus.gene_ids)
    section = DataSection(batch_size=100, round_cells=1000)
    stream = CorpusStream(corpus, infinite=False, shuffle=False)
    rows = []
    for batch in TokenBatches(stream, tokenizer, Masker("geneformer", tokenizer.vocab, section), section, seed=0):
        original = torch.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])
        rows += [row[mask.bool()].tolist() for row, mask in zip(original, batch["attention_mask"])]
    assert sorted(rows) == expected


def test_fine_tuning_tokens_of_a_float32_file(pbmc_corpus):
    """Lab files tokenised for fine-tuning and embedding (their own rows) rank as Geneformer."""
    from celltron.lab.data import tokenize_counts

    adata, _ = pbmc_corpus
    mapping = _bundled("celltron.data.genes", "human_symbol_to_ensembl.json.gz")
    ensembl = np.array([mapping.get(s.upper(), "") for s in adata.var["gene_symbol_original"]])
    genes = np.unique(ensembl[ensembl != ""])
    column_map = np.where(ensembl != "", np.searchsorted(genes, ensembl), -1)
    tokenizer = RankValueTokenizer.geneformer("v2", genes)
    tokens = tokenize_counts(adata.X, column_map, len(genes), "human", tokenizer, np.random.default_rng(0))
    expected = geneformer_scipy_tokens(adata, "v2")
    assert [tokens[i].tolist() for i in range(len(tokens))] == [expected[name] for name in adata.obs_names]
