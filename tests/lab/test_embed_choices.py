"""The embedding choices of `celltron embed` (issue 17): several layers averaged before pooling
equal the mean of what the model truncated after each of those layers returns, in every family;
`max_len` 'all' tokenises every detected gene (up to the position table) and a length above the
model's limit is refused with the option and the limit named."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pytest
import torch

from celltron.cli import main
from celltron.corpus.readers import to_corpus_genes
from celltron.errors import ConfigError
from celltron.lab.data import load_model_tokenizer, read_lab_data, tokenize_cells
from celltron.lab.embed import embed, set_max_len, token_limit
from celltron.lab.inference import pad_cells
from celltron.lab.options import ALL_GENES
from celltron.model_zoo.registry import base_of, load_pretrained, parts_of
from celltron.model_zoo.spec import attribute
from tests.conftest import shared_file
from tests.finetune.conftest import FAMILY_CONFIGS, build_model_folder
from tests.simulate import simulate_screen

GENES = "gene_symbol_original"


@pytest.fixture(scope="module")
def pbmc_file(tmp_path_factory):
    """60 cells of the labelled PBMC 4k set: hundreds of detected genes each, more than the
    debug Geneformer's 256 tokens."""
    adata = ad.read_h5ad(shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad"))
    path = tmp_path_factory.mktemp("pbmc") / "pbmc60.h5ad"
    adata[::36].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """A 40-cell simulated screen and a randomly initialised debug model of every family bound to it."""
    root = tmp_path_factory.mktemp("families")
    path = root / "cells.h5ad"
    simulate_screen(n_genes=60, n_targets=4, n_combos=2, cells_per_perturbation=5, n_control=10, seed=0).adata.write_h5ad(path)
    lab = read_lab_data(path)
    return path, {family: build_model_folder(family, lab, root / family) for family in FAMILY_CONFIGS}


def _truncated(model, last: int):
    """A copy of `model` keeping its layers up to `last` (index): its last_hidden_state is that
    layer's output (no family has a norm after its layers)."""
    model = copy.deepcopy(model)
    path = parts_of(base_of(model)).layers
    parent, _, name = path.rpartition(".")
    holder = attribute(base_of(model), parent) if parent else base_of(model)
    setattr(holder, name, torch.nn.ModuleList(list(getattr(holder, name))[: last + 1]))
    return model


def _reference(folder, path, layers: tuple[int, ...]) -> np.ndarray:
    """Per cell, alone: the mean over `layers` of the truncated models' states, mean-pooled over genes."""
    lab = read_lab_data(path)
    tokenizer = load_model_tokenizer(folder, lab)
    tokens = tokenize_cells(lab, tokenizer)
    model = load_pretrained(folder).eval()
    n_layers = len(attribute(base_of(model), parts_of(base_of(model)).layers))
    truncated = [_truncated(model, layer % n_layers) for layer in layers]
    special = tokenizer.vocab.special_ids()
    rows = []
    with torch.no_grad():
        for i in range(len(tokens)):
            batch = pad_cells(tokens, np.array([i]), tokenizer.vocab.special_id("pad"))
            states = torch.stack([m(**batch, heads=False).last_hidden_state[0] for m in truncated]).mean(0)
            rows.append(states[~np.isin(tokens[i], special)].mean(0).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_averaged_layers_equal_the_mean_of_each_layers_output(family_models, family):
    path, folders = family_models
    layers = (0, -1)
    averaged = embed(folders[family], path, layers=layers, pool="mean", batch_size=8)
    np.testing.assert_allclose(averaged, _reference(folders[family], path, layers), atol=2e-5)
    first, last = (embed(folders[family], path, layer=layer, pool="mean") for layer in layers)
    np.testing.assert_allclose(averaged, (first + last) / 2, atol=2e-5)
    assert not np.allclose(averaged, last, atol=1e-3)  # the first layer does count
    single = embed(folders[family], path, layers=(-1,), pool="mean")
    np.testing.assert_allclose(single, last, atol=1e-6)  # one layer in `layers` is `layer`


def test_layer_choices_are_checked(family_models):
    path, folders = family_models
    with pytest.raises(ConfigError, match="--layers 7: the model has"):
        embed(folders["geneformer"], path, layers=(0, 7))
    with pytest.raises(ConfigError, match="named twice"):
        embed(folders["geneformer"], path, layers=(-1, 1))  # the debug model has 2 layers: -1 is 1


def test_max_len_all_tokenises_every_detected_gene(pretrained_geneformer, pbmc_file):
    lab = read_lab_data(pbmc_file, gene_column=GENES)
    config = load_pretrained(pretrained_geneformer).config
    saved = load_model_tokenizer(pretrained_geneformer, lab)
    every = load_model_tokenizer(pretrained_geneformer, lab)
    set_max_len(every, config, ALL_GENES)
    assert every.max_len == config.max_position_embeddings - 2 == token_limit(config, every)
    unique, column_map = lab.mapped_genes()
    mapped = to_corpus_genes(lab.counts, column_map, len(unique)).tocsr()
    special = every.vocab.special_ids()
    short, full = tokenize_cells(lab, saved), tokenize_cells(lab, every)
    for i in range(lab.n_cells):
        detected = every.token_of_gene[mapped.indices[mapped.indptr[i] : mapped.indptr[i + 1]]]
        expected = set(detected[detected >= 0].tolist())
        genes = full[i][~np.isin(full[i], special)]
        assert len(genes) == len(expected) and set(genes.tolist()) == expected
        assert len(short[i]) <= saved.max_len
    # most of these cells have more detected genes than the saved length keeps
    assert np.mean([len(full[i]) > saved.max_len for i in range(lab.n_cells)]) > 0.5


def test_max_len_above_the_limit_is_refused_and_all_is_accepted(pretrained_geneformer, pbmc_file, tmp_path, capsys):
    config = load_pretrained(pretrained_geneformer).config
    limit = config.max_position_embeddings - 2
    with pytest.raises(ConfigError, match=rf"--max-len {limit + 1}: this model takes at most {limit} tokens per cell"):
        embed(pretrained_geneformer, pbmc_file, gene_column=GENES, max_len=limit + 1)
    short = embed(pretrained_geneformer, pbmc_file, gene_column=GENES, max_len=limit)
    every = embed(pretrained_geneformer, pbmc_file, gene_column=GENES, max_len="all")
    saved = embed(pretrained_geneformer, pbmc_file, gene_column=GENES)
    np.testing.assert_allclose(every, short, atol=1e-5)  # 'all' is the limit
    assert not np.allclose(every, saved, atol=1e-3)
    out = tmp_path / "all.h5ad"
    command = ["embed", "--model", str(pretrained_geneformer), "--data", str(pbmc_file), "--out", str(out)]
    assert main([*command, "--gene-column", GENES, "--max-len", "all", "--layers", "-1", "-2", "--no-progress"]) == 0
    assert ad.read_h5ad(out).obsm["X_celltron"].shape == every.shape
    with pytest.raises(SystemExit):  # argparse refuses it before any work
        main([*command, "--gene-column", GENES, "--max-len", "many", "--no-progress"])
    assert "--max-len" in capsys.readouterr().err


def test_a_family_without_positions_is_bounded_by_its_vocabulary(family_models):
    path, folders = family_models
    lab = read_lab_data(path)
    tokenizer = load_model_tokenizer(folders["scgpt"], lab)
    config = load_pretrained(folders["scgpt"]).config
    set_max_len(tokenizer, config, ALL_GENES)
    assert tokenizer.max_len == len(tokenizer.vocab)
    with pytest.raises(ConfigError, match="one token per vocabulary gene"):
        set_max_len(tokenizer, config, len(tokenizer.vocab) + 1)


def test_a_saved_length_that_fills_the_position_table_stays_allowed(family_models):
    """Official Geneformer V1 saves 2,048 tokens for a 2,048-position table (no <cls>/<eos>)."""
    path, folders = family_models
    lab = read_lab_data(path)
    tokenizer = load_model_tokenizer(folders["geneformer"], lab)
    config = load_pretrained(folders["geneformer"]).config
    assert token_limit(config, tokenizer) == config.max_position_embeddings - 2
    tokenizer.max_len = config.max_position_embeddings
    set_max_len(tokenizer, config, config.max_position_embeddings)
    set_max_len(tokenizer, config, ALL_GENES)
    assert tokenizer.max_len == config.max_position_embeddings
    with pytest.raises(ConfigError, match="the length it was saved with"):
        set_max_len(tokenizer, config, config.max_position_embeddings + 1)
