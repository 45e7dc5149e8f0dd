"""Cross-species ortholog tokens on real human PBMC and mouse pancreas cells."""

import csv

import anndata as ad
import numpy as np
import pytest

from celltron.corpus import Corpus
from celltron.tokenizers.ortholog import OrthologTokenizer, coverage, group_by_species, ortholog_vocab
from celltron.tokenizers.vocab import GeneVocab

from ..conftest import shared_file

TP53, TRP53 = "ENSG00000141510", "ENSMUSG00000059552"


@pytest.fixture(scope="module")
def corpus_and_vocab(small_corpus):
    corpus = Corpus(small_corpus)
    genes = corpus.manifest["genes"]
    return corpus, ortholog_vocab(group_by_species(genes["ensembl_id"], genes["species"]))


def _shared_one2one():
    path = shared_file("reference/orthologs/human_mouse_one2one_orthologs.tsv")
    with open(path) as handle:
        return {row["mouse_ensembl_gene_id"]: row["human_ensembl_gene_id"] for row in csv.DictReader(handle, delimiter="\t")}


def test_orthologs_share_a_token_and_others_keep_their_own(corpus_and_vocab):
    corpus, vocab = corpus_and_vocab
    one2one = _shared_one2one()
    mouse = [g for g, s in zip(corpus.gene_ids, corpus.manifest["genes"]["species"]) if s == "mouse"]
    ids = vocab.lookup_genes(mouse)
    assert (ids >= 0).all()
    for gene, token in zip(mouse, ids):
        if gene in one2one:
            assert vocab.tokens[token] == one2one[gene]
        else:
            assert vocab.tokens[token] == gene
    assert vocab.lookup_genes([TRP53])[0] == vocab.lookup_genes([TP53])[0] == vocab[TP53]
    assert {"<human>", "<mouse>"} <= set(vocab.tokens)


def reference(shard, medians, vocab, species_names, max_len=2048):
    """Cell by cell: species token, then genes by log2(1 + count / n_counts x 1e4 / median)."""
    x = shard.X.tocsr()
    out = []
    for row in range(shard.n_obs):
        cols, counts = x.indices[x.indptr[row] : x.indptr[row + 1]], x.data[x.indptr[row] : x.indptr[row + 1]]
        n = shard.obs["n_counts"].iloc[row]
        entries = []
        for position, (col, count) in enumerate(zip(cols, counts)):
            gene = shard.var_names[col]
            token = vocab.lookup_genes([gene])[0]
            if token < 0 or medians.get(gene) is None:
                continue
            entries.append((-(count / n * 1e4 / medians[gene]), position, token))
        entries.sort()  # by normalised value (log2(1 + x) is monotone in it), then gene order
        species = species_names[shard.obs["species"].cat.codes.iloc[row]]
        ids = [vocab[f"<{species}>"]] + [t for _, _, t in entries[:max_len]]
        values = [0.0] + [np.log2(1 - v) for v, _, _ in entries[:max_len]]
        out.append((ids, values))
    return out


def test_tokens_and_values_match_the_reference(corpus_and_vocab, small_corpus, ranking):
    corpus, vocab = corpus_and_vocab
    medians = corpus.gene_medians()
    tokenizer = OrthologTokenizer(vocab, corpus.gene_ids, medians, max_len=2048)
    species_names = corpus.manifest["obs_categories"]["species"]
    for record in corpus.shards("train")[:2]:
        shard = ad.read_zarr(small_corpus / record["path"])
        x = shard.X.tocsr()
        names = [species_names[c] for c in shard.obs["species"].cat.codes]
        block = tokenizer.encode_csr(x.indptr, x.indices, x.data, names, shard.obs["n_counts"].to_numpy())
        expected = reference(shard, medians, vocab, species_names)
        assert "mouse" in names and "human" in names
        for i, (ids, values) in enumerate(expected):
            assert block[i].tolist() == ids
            np.testing.assert_allclose(block.cell_values(i), values, rtol=1e-6)


def test_truncation_to_max_len(corpus_and_vocab, small_corpus, ranking):
    corpus, vocab = corpus_and_vocab
    medians = corpus.gene_medians()
    shard = ad.read_zarr(small_corpus / corpus.shards("train")[0]["path"])
    x = shard.X.tocsr()
    block = OrthologTokenizer(vocab, corpus.gene_ids, medians, max_len=100).encode_csr(x.indptr, x.indices, x.data, "human")
    assert block.lengths.max() == 101 and (block.input_ids[block.offsets[:-1]] == vocab["<human>"]).all()


def test_coverage_report(corpus_and_vocab):
    corpus, vocab = corpus_and_vocab
    genes = corpus.manifest["genes"]
    report = coverage(genes["ensembl_id"], genes["species"], genes["count_sum"], vocab)
    one2one = _shared_one2one()
    mouse = [g for g, s in zip(genes["ensembl_id"], genes["species"]) if s == "mouse"]
    assert report["mouse"]["genes_shared"] == pytest.approx(np.mean([g in one2one for g in mouse]))
    assert report["mouse"]["genes_with_token"] == 1.0
    assert 0 < report["human"]["counts_shared"] <= 1 and 0 < report["mouse"]["counts_shared"] <= 1


def test_vocab_with_aliases_round_trips(corpus_and_vocab, tmp_path):
    _, vocab = corpus_and_vocab
    vocab.save_pretrained(tmp_path)
    again = GeneVocab.from_pretrained(tmp_path)
    assert again.aliases == vocab.aliases and again.lookup_genes([TRP53])[0] == vocab[TP53]


def test_prior_knowledge_aligns_to_tokens_and_round_trips(corpus_and_vocab, tmp_path):
    from celltron.tokenizers.ortholog import align_prior_knowledge, load_prior_knowledge, save_prior_knowledge

    _, vocab = corpus_and_vocab
    genes = [TP53, TRP53, "ENSG00000075624", "ENSG99999999999"]
    matrix = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [9.0, 9.0]])
    aligned, has = align_prior_knowledge(matrix, genes, vocab)
    assert aligned.shape == (len(vocab), 2)
    assert aligned[vocab[TP53]].tolist() == [2.0, 1.0]  # human and mouse rows share the token: averaged
    assert aligned[vocab["ENSG00000075624"]].tolist() == [5.0, 5.0]
    assert has.sum() == 2 and not aligned[vocab["<pad>"]].any()
    save_prior_knowledge(tmp_path / "priors.safetensors", {"promoter": aligned})
    assert np.array_equal(load_prior_knowledge(tmp_path / "priors.safetensors")["promoter"], aligned)
