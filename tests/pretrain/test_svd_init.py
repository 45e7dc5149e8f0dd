"""Gene-token embeddings from a truncated SVD of the corpus (model.init_gene_embeddings: svd):
the streaming sketch against numpy's exact SVD, planted gene modules recovered from a simulated
corpus, what is written into each family's embedding, a pretraining run per family, resume, and
the config field."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as la
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from celltron.corpus.store import log_normalised_cells
from celltron.errors import ConfigError
from celltron.preprocessing import FrequentDirections
from celltron.pretrain import run
from celltron.pretrain.config import load_config, replace
from celltron.pretrain.data import corpus_tokenizer
from celltron.pretrain.run import build_model_for, pretrain
from celltron.pretrain.svd_init import corpus_gene_vectors, initialise_gene_embeddings, token_columns
from tests.pretrain.conftest import CONFIGS, gene_symbols_of

FAMILY_CONFIGS = ["geneformer_debug.yaml", "scgpt_debug.yaml", "genecompass_debug.yaml"]


def _low_rank_plus_noise(seed: int, cells=1500, genes=200, rank=5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(cells, rank)) * np.linspace(4.0, 2.0, rank)
    loadings = np.linalg.qr(rng.normal(size=(genes, rank)))[0].T * np.sqrt(genes)
    offset = 3.0 * rng.random(genes)  # a mean per gene: centring must remove it
    return scores @ loadings + rng.normal(size=(cells, genes)) + offset


def _exact_svd(matrix: np.ndarray):
    """numpy's SVD on one BLAS thread: threaded LAPACK on busy cores takes seconds, not
    milliseconds (see preprocessing._small_eigh)."""
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.svd(matrix, full_matrices=False)


def _sketch(x: np.ndarray, rows: int, block: int) -> FrequentDirections:
    sketch = FrequentDirections(x.shape[1], rows)
    for start in range(0, x.shape[0], block):
        sketch.update(x[start : start + block])
    return sketch


@pytest.mark.parametrize("centre", [True, False])
def test_sketch_top_subspace_matches_the_exact_svd(centre):
    x, rank = _low_rank_plus_noise(seed=1), 5
    sketch = _sketch(x, rows=2 * rank + 10, block=37)  # blocks that do not divide the rows
    values, vectors = sketch.components(rank, centre=centre)
    exact = x - x.mean(axis=0) if centre else x
    _, exact_values, exact_vectors = _exact_svd(exact)
    angles = np.degrees(la.subspace_angles(vectors.T, exact_vectors[:rank].T))
    assert angles.max() < 2.0
    np.testing.assert_allclose(values, exact_values[:rank], rtol=0.02)
    # a random subspace of the same size is far off: the check can fail
    random = np.linalg.qr(np.random.default_rng(0).normal(size=(x.shape[1], rank)))[0]
    assert np.degrees(la.subspace_angles(random, exact_vectors[:rank].T)).max() > 45


def test_sketch_keeps_the_frequent_directions_guarantee():
    """0 <= XᵀX - BᵀB <= (sum of shrinks) I, with sparse blocks as with dense ones."""
    x = _low_rank_plus_noise(seed=2, cells=400, genes=60)
    x[x < 1.0] = 0.0  # sparse-looking, as log-normalised counts are
    sketch = _sketch(sp.csr_matrix(x), rows=12, block=25)
    b = sketch.weights[:, None] * sketch.directions
    gap = np.linalg.eigvalsh(x.T @ x - b.T @ b)
    scale = np.linalg.eigvalsh(x.T @ x).max()
    assert gap.min() > -1e-9 * scale
    assert gap.max() <= sketch.shrinkage * (1 + 1e-9)
    assert sketch.shrinkage < 0.2 * scale  # and the bound is informative
    dense = _sketch(x, rows=12, block=25)
    np.testing.assert_allclose(np.abs(sketch.directions @ dense.directions.T), np.eye(12), atol=1e-6)
    np.testing.assert_array_equal(sketch.column_counts, (x != 0).sum(axis=0))


def test_same_module_genes_get_similar_vectors(module_corpus):
    corpus, genes, module_of = module_corpus
    vocab = corpus_tokenizer(corpus, "geneformer-v2", None, 0).vocab
    found = corpus_gene_vectors(corpus, vocab, dim=16, max_cells=10_000)
    assert found.cells == corpus.manifest["splits"]["train"]["n_cells"]
    by_token = dict(zip(found.token_ids.tolist(), found.vectors))
    tokens = vocab.lookup_genes(corpus.gene_ids)
    module = dict(zip(tokens.tolist(), module_of[[genes.index(g) for g in gene_symbols_of(corpus)]]))
    assert set(by_token) == set(tokens[tokens >= 0].tolist())  # every expressed gene with a token
    ids = [t for t in by_token if module[t] >= 0]
    unit = np.stack([by_token[t] / np.linalg.norm(by_token[t]) for t in ids])
    cosine = unit @ unit.T
    same = np.equal.outer([module[t] for t in ids], [module[t] for t in ids])
    off_diagonal = ~np.eye(len(ids), dtype=bool)
    within, between = cosine[same & off_diagonal].mean(), cosine[~same].mean()
    # between modules slightly negative: normalising to a fixed total makes the modules compete
    assert within > 0.8 and between < 0.2, (within, between)


def test_corpus_vectors_are_the_centred_svd_of_the_log_normalised_cells(module_corpus):
    """Against numpy's SVD of the same cells, read whole: the three planted components, their
    singular values and the gene vectors built on them."""
    corpus = module_corpus[0]
    vocab = corpus_tokenizer(corpus, "geneformer-v2", None, 0).vocab
    found = corpus_gene_vectors(corpus, vocab, dim=8, max_cells=10_000)
    mapping, column_tokens = token_columns(corpus, vocab)
    dense = (sp.vstack(list(log_normalised_cells(corpus, "train", 10_000, block_cells=100))) @ mapping).toarray()
    _, values, right = _exact_svd(dense - dense.mean(axis=0))
    assert np.array_equal(found.token_ids, column_tokens)  # every simulated gene is expressed
    np.testing.assert_allclose(found.singular_values[:3], values[:3], rtol=0.05)
    # beyond the modules the spectrum is flat noise: its directions are arbitrary, its level is not
    np.testing.assert_allclose(found.singular_values[3:], values[3:8], rtol=0.5)
    exact = right[:3].T * np.sqrt(values[:3])
    assert np.degrees(la.subspace_angles(found.vectors[:, :3], exact)).max() < 2.0


def _config(name: str, corpus, **sections):
    base = {"data": {"corpus": str(corpus.location)}, "logging": {"progress_bar": False, "wandb": False}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return replace(load_config(CONFIGS / "pretrain" / name), **base)


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_svd_init_writes_gene_rows_only_at_the_random_init_scale(name, demo_corpus):
    config = _config(name, demo_corpus)
    tokenizer = corpus_tokenizer(demo_corpus, config.tokenizer.scheme, config.tokenizer.max_len, 0)
    torch.manual_seed(0)
    model = build_model_for(config, tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    found = initialise_gene_embeddings(model, demo_corpus, tokenizer.vocab, max_cells=1000)
    after = model.get_input_embeddings().weight.detach()
    assert found.cells == 1000 and len(found.token_ids) > 1000

    written = torch.zeros(len(after), dtype=torch.bool)
    written[torch.as_tensor(found.token_ids)] = True
    changed = (after != before).any(dim=1)
    assert torch.equal(changed, written)  # specials, absent and unexpressed genes keep their random init
    assert not written[torch.as_tensor(tokenizer.vocab.special_ids())].any()
    # the scale of the random init the rows replace: N(0, initializer_range) for Geneformer and
    # GeneCompass; scGPT's gene encoder has its own rule (and starts at nn.Embedding's N(0, 1)
    # under transformers 5, whose guarded init functions skip its U(-0.1, 0.1) re-initialisation)
    assert float(after[written].std()) == pytest.approx(float(before[written].std()), rel=1e-4)
    if config.model.family != "scgpt":
        assert float(after[written].std()) == pytest.approx(model.config.initializer_range, rel=0.03)
    output = model.get_output_embeddings()
    if output is not None:  # tied to the input embedding: the decoder starts from the same rows
        assert torch.equal(output.weight, after)


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_tiny_pretraining_with_svd_init(name, demo_corpus, tmp_path):
    config = _config(
        name,
        demo_corpus,
        model={"init_gene_embeddings": "svd", "svd_cells": 500},
        trainer={"max_steps": 3, "log_every": 1, "val_every": 1000, "checkpoint_every": 1000},
        data={"val_batches": 0},
    )
    result = pretrain(config, tmp_path)
    assert result.steps == 3 and result.export is not None


def test_resume_and_init_from_do_not_recompute_the_init(demo_corpus, tmp_path, monkeypatch):
    calls = []
    real = run.initialise_gene_embeddings
    monkeypatch.setattr(run, "initialise_gene_embeddings", lambda *args: calls.append(1) or real(*args))
    config = _config(
        "geneformer_debug.yaml",
        demo_corpus,
        model={"init_gene_embeddings": "svd", "svd_cells": 300},
        trainer={"max_steps": 4, "stop_at_step": 2, "log_every": 1, "val_every": 1000, "checkpoint_every": 1000},
        data={"val_batches": 0},
    )
    first = pretrain(config, tmp_path)
    assert first.stopped_by == "stop_at_step" and calls == [1]
    resumed = pretrain(replace(config, trainer={"stop_at_step": None}), tmp_path, resume="auto")
    assert resumed.steps == 4 and calls == [1]
    # continuing from a pretrained model keeps its trained gene embeddings too
    again = replace(config, trainer={"stop_at_step": None, "max_steps": 1})
    pretrain(again, tmp_path / "continued", init_from=str(resumed.export))
    assert calls == [1]


def test_config_field_loads_from_yaml_and_refuses_other_values(tmp_path):
    good = tmp_path / "svd.yaml"
    good.write_text("model: {family: geneformer, init_gene_embeddings: svd, svd_cells: 2000}\n")
    config = load_config(good)
    assert config.model.init_gene_embeddings == "svd" and config.model.svd_cells == 2000
    assert load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml").model.init_gene_embeddings == "random"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {init_gene_embeddings: pca}\n")
    with pytest.raises(ConfigError, match=r"init_gene_embeddings: 'pca' is not one of random, svd"):
        load_config(bad)
    bad.write_text("model: {svd_cells: 0}\n")
    with pytest.raises(ConfigError, match=r"svd_cells.*allowed: >= 1"):
        load_config(bad)
