"""No silent guesses in gene mapping (issue 15, item 4): every verb that reads a user's matrix
refuses, in one line naming the file, the shares mapped and the fix, when too little of its counts
map to Ensembl IDs or reach the tokenizer's vocabulary, and when --species contradicts the names."""

from __future__ import annotations

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltron.cli import main
from celltron.corpus.genes import GeneMappingError, check_species, map_input_genes
from celltron.corpus.readers import gene_count_sample, open_source
from celltron.errors import ConfigError

VERBS = ("build", "tokenize", "embed", "grn", "finetune")


def _write(adata: ad.AnnData, path) -> str:
    adata.obs["cell_type"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")  # a label column for `finetune annotate`
    adata.write_h5ad(path)
    return str(path)


@pytest.fixture(scope="module")
def pbmc(pbmc4k) -> ad.AnnData:
    """40 real PBMCs, every gene (var names are human symbols; 99% of counts map)."""
    adata = ad.read_h5ad(pbmc4k)[:40].copy()
    adata.X = sp.csr_matrix(adata.X)
    return adata


@pytest.fixture(scope="module")
def files(tmp_path_factory, pbmc, mouse_pancreas) -> dict[str, str]:
    """The inputs the verbs are given, built once: good human cells, cells whose gene names are
    probe IDs but one, cells whose best-covered genes are unnamed, and mouse cells."""
    root = tmp_path_factory.mktemp("gene_guard")
    junk = pbmc[:, :3000].copy()
    names = [f"PROBE{i:05d}" for i in range(3000)]
    names[2500] = junk.var_names[2500]  # one real gene left, holding a sliver of the counts
    junk.var_names = names
    partial = pbmc.copy()
    sums = np.asarray(partial.X.sum(0)).ravel()
    top = np.argsort(-sums)
    renamed = top[: np.searchsorted(np.cumsum(sums[top]) / sums.sum(), 0.7) + 1]  # genes holding ~70% of counts
    partial.var_names = [f"PROBE{i:05d}" if i in set(renamed) else n for i, n in enumerate(partial.var_names)]
    mouse = ad.read_h5ad(mouse_pancreas)[:20].copy()
    return {
        "pbmc": _write(pbmc.copy(), root / "pbmc.h5ad"),
        "junk": _write(junk, root / "junk.h5ad"),
        "partial": _write(partial, root / "partial.h5ad"),
        "mouse": _write(mouse, root / "mouse.h5ad"),
    }


@pytest.fixture(scope="module")
def human_model(tmp_path_factory, files):
    """A randomly initialised debug Geneformer with its (human-only) geneformer-v2 tokenizer."""
    from celltron.lab.data import read_lab_data
    from tests.finetune.conftest import build_model_folder

    return build_model_folder("geneformer", read_lab_data(files["pbmc"]), tmp_path_factory.mktemp("model") / "geneformer")


def _verb(verb: str, data: str, out, model) -> list[str]:
    return {
        "build": ["corpus", "build", data, "--out", str(out), "--no-progress"],
        "tokenize": ["tokenize", data, "--scheme", "geneformer-v2", "--out", str(out), "--no-progress"],
        "embed": ["embed", "--model", str(model), "--data", data, "--out", str(out), "--no-progress"],
        "grn": ["grn", "--model", str(model), "--data", data, "--out", str(out)],
        "finetune": [
            "finetune",
            "annotate",
            "--model",
            str(model),
            "--data",
            data,
            "--label-key",
            "cell_type",
            "--out",
            str(out),
        ],
    }[verb]


def _refused(argv: list[str], capsys) -> str:
    """The one-line message of a refused command (exit status 2)."""
    capsys.readouterr()
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("celltron: error: ") and "\n" not in message
    return message


# ---------------------------------------------------------------- the rule


def test_mouse_names_given_as_human_are_refused_naming_the_evidence(mouse_pancreas):
    names = ad.read_h5ad(mouse_pancreas, backed="r").var_names.to_numpy()
    with pytest.raises(
        GeneMappingError,
        match=r"pancreas.h5ad: --species human contradicts the gene names: 92% of symbols "
        r"are mouse-style \(Xkr4, Gm37381, Rp1, \.\.\.\); pass --species mouse",
    ):
        map_input_genes(names, "human", "pancreas.h5ad")
    with pytest.raises(GeneMappingError, match=r"mouse Ensembl IDs \(ENSMUSG00000059552"):
        check_species(["ENSMUSG00000059552", "ENSMUSG00000029580", "ENSG00000141510"], "human", "ids.h5ad")
    with pytest.raises(GeneMappingError, match=r"--species mouse contradicts.*human-style \(TP53, ACTB"):
        check_species(["TP53", "ACTB", "CD3E", "Cd4"], "mouse", "lab.h5ad")


def test_a_few_names_of_the_other_style_are_no_contradiction(pbmc, mouse_pancreas):
    human = list(pbmc.var_names)  # holds C1orf112-style names
    human[:500] = [n.lower() for n in human[:500]]  # and a handful of lower-case ones
    assert map_input_genes(human, "human", "pbmc.h5ad").species == "human"
    mouse = list(ad.read_h5ad(mouse_pancreas, backed="r").var_names)
    mouse[:2000] = [n.upper() for n in mouse[:2000]]
    assert map_input_genes(mouse, "mouse", "mouse.h5ad").species == "mouse"


def test_the_share_of_counts_decides_and_without_counts_the_share_of_genes():
    names = ["CD3E", "ACTB", "B2M", "MALAT1", "TPT1"] + [f"PROBE{i}" for i in range(45)]
    heavy = np.r_[np.full(5, 90.0), np.full(45, 1.0)]  # 10% of the genes hold 91% of the counts
    mapping = map_input_genes(names, "human", "lab.h5ad", heavy)
    assert mapping.mapped.sum() == 5 and (mapping.gene_counts == heavy).all()
    light = np.r_[np.full(5, 1.0), np.full(45, 9.0)]
    message = r"lab.h5ad: only 5 of 50 genes \(10%\) holding 1.22% of counts map to human Ensembl IDs \(PROBE0, PROBE1, PROBE2"
    with pytest.raises(GeneMappingError, match=message + r".*at least 50% of counts must.*--gene-column.*--min-mapped-fraction"):
        map_input_genes(names, "human", "lab.h5ad", light)
    with pytest.raises(GeneMappingError, match=r"only 5 of 50 genes \(10%\) map .*at least 50% of genes must"):
        map_input_genes(names, "human", "lab.h5ad")
    assert map_input_genes(names, "human", "lab.h5ad", light, min_fraction=0.01).mapped.sum() == 5
    with pytest.raises(ConfigError, match="--min-mapped-fraction 50: give a share between 0 and 1"):
        map_input_genes(names, "human", "lab.h5ad", heavy, min_fraction=50)


def test_counts_per_gene_come_from_every_cell_of_a_small_file_and_a_seeded_sample_of_a_large_one(tmp_path):
    ones = np.ones(3000, dtype=np.float32)  # gene A: one count per cell, so its sum counts the cells read
    x = sp.csr_matrix(np.c_[ones, np.arange(3000, dtype=np.float32) % 7, np.zeros(3000, dtype=np.float32)])
    ad.AnnData(X=x, var=pd.DataFrame(index=["A", "B", "C"])).write_h5ad(tmp_path / "cells.h5ad")
    source = open_source(tmp_path / "cells.h5ad")
    assert (gene_count_sample(source, max_cells=5000) == np.asarray(x.sum(0)).ravel()).all()
    sample = gene_count_sample(source, max_cells=1000, seed=1)
    assert sample[0] == 1000 and sample[2] == 0
    assert (gene_count_sample(source, max_cells=1000, seed=1) == sample).all()
    source.close()


# ---------------------------------------------------------------- every verb


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_refuses_a_file_whose_genes_do_not_map(verb, files, human_model, tmp_path, capsys):
    message = _refused(_verb(verb, files["junk"], tmp_path / "out", human_model), capsys)
    assert "junk.h5ad: only 1 of 3,000 genes (0.0333%) holding" in message and "map to human Ensembl IDs" in message
    assert "--gene-column" in message and "--min-mapped-fraction (now 0.5)" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_refuses_mouse_genes_given_as_human(verb, files, human_model, tmp_path, capsys):
    message = _refused(_verb(verb, files["mouse"], tmp_path / "out", human_model) + ["--species", "human"], capsys)
    assert "mouse.h5ad: --species human contradicts the gene names" in message and "mouse-style (Xkr4," in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_takes_the_share_to_require(verb, files, human_model, tmp_path, capsys):
    # 99.3% of these counts map: asking for 99.9% must reach the check
    message = _refused(_verb(verb, files["pbmc"], tmp_path / "out", human_model) + ["--min-mapped-fraction", "0.999"], capsys)
    assert "pbmc.h5ad: only" in message and "at least 99.9% of counts must" in message and "(now 0.999)" in message


def test_a_lower_share_lets_a_partly_named_file_through(files, tmp_path, capsys):
    build = ["corpus", "build", files["partial"], "--out", str(tmp_path / "corpus"), "--no-progress"]
    assert "partial.h5ad: only" in _refused(build, capsys)
    assert main(build + ["--min-mapped-fraction", "0.2"]) == 0
    tokenize = ["tokenize", files["partial"], "--scheme", "geneformer-v2", "--out", str(tmp_path / "tokens"), "--no-progress"]
    assert "partial.h5ad: only" in _refused(tokenize, capsys)
    assert main(tokenize + ["--min-mapped-fraction", "0.2"]) == 0
    assert datasets.load_from_disk(str(tmp_path / "tokens")).num_rows == 40


def test_tokenize_refuses_mouse_cells_for_a_human_vocabulary_and_ortholog_takes_them(files, tmp_path, capsys):
    for scheme in ("geneformer-v2", "scgpt"):
        argv = ["tokenize", files["mouse"], "--scheme", scheme, "--out", str(tmp_path / scheme), "--no-progress"]
        message = _refused(argv, capsys)
        assert f"mouse.h5ad: only 0 of 27,998 genes (0%) holding 0% of counts have a token in the {scheme} vocabulary" in message
        assert "these are mouse: use --scheme ortholog" in message and not (tmp_path / scheme).exists()
    assert main(["tokenize", files["mouse"], "--scheme", "ortholog", "--out", str(tmp_path / "ortholog"), "--no-progress"]) == 0
    assert min(datasets.load_from_disk(str(tmp_path / "ortholog"))["length"]) > 100  # real gene tokens, not just specials


@pytest.mark.parametrize("verb", ("embed", "grn", "finetune"))
def test_model_verbs_refuse_mouse_cells_for_a_human_model(verb, files, human_model, tmp_path, capsys):
    message = _refused(_verb(verb, files["mouse"], tmp_path / "out.h5ad", human_model), capsys)
    assert "mouse.h5ad: only 0 of 27,998 genes (0%) holding 0% of counts have a token in the geneformer-v2 vocabulary" in message
    assert "the model's vocabulary has no mouse genes" in message
