"""Multi-modal tokens on real paired corpora (TEA-seq RNA + proteins, SNARE-seq RNA + ATAC, 300
cells): protein CLR values and bins, ATAC bins chosen by TF-IDF or sampled to a budget, one
sequence per cell with modality ids, saved and loaded unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from celltron.corpus.build_multimodal import build_multimodal_corpus
from celltron.corpus.options import BuildOptions
from celltron.corpus.store import Corpus
from celltron.corpus.stream import CorpusStream, collate_cells
from celltron.model_zoo.spec import positions_for
from celltron.pretrain.data import corpus_tokenizer
from celltron.tokenizers.multimodal import (
    MODALITY_IDS,
    ModalityCells,
    MultiModalSettings,
    MultiModalTokenizer,
    atac_tokens,
    inverse_document_frequency,
    protein_clr,
    protein_tokens,
)
from celltron.tokenizers.saving import load_tokenizer
from celltron.tokenizers.schemes import Block
from tests.conftest import shared_file
from tests.corpus.test_modalities import SNARE_ATAC, SNARE_RNA, TEASEQ_ADT, TEASEQ_RNA


def build(tmp_path_factory, name: str, files: dict, **options) -> Corpus:
    out = tmp_path_factory.mktemp("mmtok") / name
    build_multimodal_corpus(None, out, BuildOptions(progress=False, val_fraction=0.0, **options), modalities=files)
    return Corpus(out)


@pytest.fixture(scope="module")
def teaseq(tmp_path_factory) -> Corpus:
    return build(tmp_path_factory, "tea", {"rna": shared_file(TEASEQ_RNA), "adt": shared_file(TEASEQ_ADT)})


@pytest.fixture(scope="module")
def snareseq(tmp_path_factory) -> Corpus:
    return build(tmp_path_factory, "snare", {"rna": shared_file(SNARE_RNA), "atac": shared_file(SNARE_ATAC)}, genome="mm10")


def batch_of(corpus: Corpus, n: int = 64) -> dict:
    return collate_cells(list(CorpusStream(corpus, infinite=False, shuffle=False))[:n])


def rna_block(corpus: Corpus, batch: dict) -> Block:
    species = corpus.manifest["obs_categories"]["species"]
    return Block(batch["offsets"], batch["genes"], batch["counts"], batch["n_counts"], [species[c] for c in batch["species"]], {})


def test_protein_values_are_per_cell_clr_and_bins_follow_their_order(teaseq):
    cells = ModalityCells.from_batch(batch_of(teaseq), "adt")
    n = teaseq.n_features("adt")
    clr = protein_clr(cells, n)
    dense = np.zeros_like(clr)
    for i in range(len(clr)):
        lo, hi = cells.indptr[i], cells.indptr[i + 1]
        dense[i, cells.features[lo:hi]] = cells.counts[lo:hi]
    expected = np.log1p(dense) - np.log1p(dense).mean(axis=1, keepdims=True)
    assert np.allclose(clr, expected) and np.allclose(clr.sum(axis=1), 0)
    features, values, lengths = protein_tokens(cells, n, None, np.random.default_rng(0))
    assert (lengths == n).all() and np.allclose(values.reshape(-1, n), clr)
    features, bins, _ = protein_tokens(cells, n, 51, np.random.default_rng(0))
    bins = bins.reshape(-1, n)
    assert bins.min() >= 1 and bins.max() <= 50
    for row_clr, row_bins in zip(clr, bins):  # a higher CLR never gets a lower bin
        order = np.argsort(row_clr, kind="stable")
        assert (np.diff(row_bins[order]) >= 0).all() or np.allclose(np.diff(row_clr[order])[np.diff(row_bins[order]) < 0], 0)


def test_atac_keeps_the_rarest_open_bins_within_budget(snareseq):
    batch = batch_of(snareseq, 300)
    cells = ModalityCells.from_batch(batch, "atac")
    stats = snareseq.manifest["modalities"]["atac"]["features"]
    idf = inverse_document_frequency(snareseq.manifest["n_cells"], stats["cells_expressing"])
    budget = 40
    features, lengths = atac_tokens(cells, budget, idf, "tfidf", np.random.default_rng(0))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    assert lengths.max() == budget and (lengths <= budget).all()
    for i in range(len(lengths)):
        kept = features[starts[i] : starts[i + 1]]
        open_bins = cells.features[cells.indptr[i] : cells.indptr[i + 1]]
        assert set(kept) <= set(open_bins) and (np.diff(kept) > 0).all()  # genomic (corpus) order
        if len(open_bins) > budget:  # nothing left out is rarer than what was kept
            left_out = np.setdiff1d(open_bins, kept)
            assert idf[left_out].max() <= idf[kept].min()
        else:
            assert len(kept) == len(open_bins)
    sampled, sampled_lengths = atac_tokens(cells, budget, idf, "sample", np.random.default_rng(0))
    assert np.array_equal(sampled_lengths, lengths) and not np.array_equal(sampled, features)
    cells.measured[:5] = False
    _, unmeasured_lengths = atac_tokens(cells, budget, idf, "tfidf", np.random.default_rng(0))
    assert (unmeasured_lengths[:5] == 0).all()


def test_one_sequence_per_cell_rna_then_proteins_with_modality_ids(teaseq, tmp_path):
    rna = corpus_tokenizer(teaseq, "geneformer-v2", 64, 0)
    tokenizer = MultiModalTokenizer.for_corpus(teaseq, rna, MultiModalSettings(adt_budget=32))
    batch = batch_of(teaseq, 16)
    tokens = tokenizer.encode(rna_block(teaseq, batch), {"adt": ModalityCells.from_batch(batch, "adt")}, np.random.default_rng(3))
    alone = rna.encode_block(rna_block(teaseq, batch), np.random.default_rng(3))
    first = tokenizer.first_id["adt"]
    assert tokenizer.vocab_size == len(rna.vocab) + 46 and tokenizer.token_names()[0].startswith("adt:")
    for i in range(16):
        ids, kinds = tokens[i], tokens.modality_ids[tokens.offsets[i] : tokens.offsets[i + 1]]
        n_rna = len(alone[i])
        assert np.array_equal(ids[:n_rna], alone[i]) and (kinds[:n_rna] == MODALITY_IDS["rna"]).all()
        assert np.array_equal(ids[n_rna:], first + np.arange(32)) and (kinds[n_rna:] == MODALITY_IDS["adt"]).all()
    tokenizer.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok", teaseq.gene_ids)
    repeat = again.encode(rna_block(teaseq, batch), {"adt": ModalityCells.from_batch(batch, "adt")}, np.random.default_rng(3))
    assert np.array_equal(repeat.input_ids, tokens.input_ids) and np.array_equal(repeat.values, tokens.values)
    assert np.array_equal(repeat.modality_ids, tokens.modality_ids)
    # what pretraining asks of a tokenizer: one vocabulary over every token, RNA-only cells as RNA gives them
    assert len(again.vocab) == tokenizer.vocab_size and again.vocab.tokens[first] == tokenizer.token_names()[0]
    assert again.vocab.special_id("pad") == rna.vocab.special_id("pad")
    assert again.max_len == rna.max_len and again.sequence_max_len == rna.max_len + 32 and again.n_modalities == 2
    assert positions_for(again, {"max_position_embeddings": 16}) == {"max_position_embeddings": rna.max_len + 32 + 2}
    rna_only = again.encode_block(rna_block(teaseq, batch), np.random.default_rng(3))
    assert np.array_equal(rna_only.input_ids, alone.input_ids)


def test_ranked_proteins_come_highest_clr_first_with_their_bins(teaseq):
    cells = ModalityCells.from_batch(batch_of(teaseq, 12), "adt")
    n = teaseq.n_features("adt")
    panel = protein_tokens(cells, n, 51, np.random.default_rng(5))
    ranked = protein_tokens(cells, n, 51, np.random.default_rng(5), order="rank")
    clr = protein_clr(cells, n)
    assert np.array_equal(panel[2], ranked[2])
    for i in range(12):
        features, values = ranked[0][i * n : (i + 1) * n], ranked[1][i * n : (i + 1) * n]
        assert np.all(np.diff(clr[i, features]) <= 0)  # highest CLR first
        assert sorted(features) == list(range(n))  # every protein once
        assert np.array_equal(values, panel[1][i * n : (i + 1) * n][features])  # each keeps its bin
        ties = np.flatnonzero(np.diff(clr[i, features]) == 0)
        assert np.all(features[ties] < features[ties + 1])  # ties in panel order


def test_chromatin_tokens_follow_rna_within_their_budget(snareseq):
    rna = corpus_tokenizer(snareseq, "scgpt", 32, 0)
    tokenizer = MultiModalTokenizer.for_corpus(snareseq, rna, MultiModalSettings(atac_budget=24))
    batch = batch_of(snareseq, 32)
    tokens = tokenizer.encode(
        rna_block(snareseq, batch), {"atac": ModalityCells.from_batch(batch, "atac")}, np.random.default_rng(0)
    )
    atac = tokens.modality_ids == MODALITY_IDS["atac"]
    assert atac.any() and (tokens.values[atac] == 1).all()
    per_cell = np.add.reduceat(atac.astype(int), tokens.offsets[:-1])
    assert per_cell.max() <= 24
    assert (tokens.input_ids[atac] >= tokenizer.first_id["atac"]).all() and (tokens.input_ids[atac] < tokenizer.vocab_size).all()


def test_bad_settings_are_refused():
    from celltron.errors import ConfigError

    with pytest.raises(ConfigError, match="adt_bins must be at least 3"):
        MultiModalSettings(adt_bins=2)
    with pytest.raises(ConfigError, match="atac_select 'random'"):
        MultiModalSettings(atac_select="random")
    with pytest.raises(ConfigError, match="adt_order 'value'"):
        MultiModalSettings(adt_order="value")
