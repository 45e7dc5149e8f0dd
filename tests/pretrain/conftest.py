"""Pretraining tests share the root conftest's demo corpus, and the paired-data tests a TEA-seq
corpus and two helpers."""

import csv
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def citeseq_corpus(tmp_path_factory):
    """The 300-cell TEA-seq test data (RNA + 46 proteins) as a corpus, 10% validation."""
    from celltron.corpus.build_multimodal import build_multimodal_corpus
    from celltron.corpus.options import BuildOptions
    from tests.conftest import shared_file
    from tests.corpus.test_modalities import TEASEQ_ADT, TEASEQ_RNA

    out = tmp_path_factory.mktemp("paired") / "teaseq"
    files = {"rna": shared_file(TEASEQ_RNA), "adt": shared_file(TEASEQ_ADT)}
    build_multimodal_corpus(None, out, BuildOptions(progress=False, val_fraction=0.1), modalities=files)
    return out


def config_for(name: str, corpus, **sections):
    """configs/pretrain/NAME on `corpus`, quiet, with `sections` ({section: {field: value}}) changed."""
    from celltron.pretrain.config import load_config, replace

    config = load_config(CONFIGS / "pretrain" / name)
    base = {"data": {"corpus": str(corpus)}, "logging": {"progress_bar": False, "wandb": False}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return replace(config, **base)


def metric_rows(run_dir, field: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.csv row of a run that has `field`."""
    return [(int(r["step"]), float(r[field])) for r in csv.DictReader((run_dir / "metrics.csv").open()) if r[field]]


@pytest.fixture(scope="session")
def module_corpus(tmp_path_factory):
    """A corpus of 600 simulated cells over 60 human genes in three planted modules of 15 (their
    genes rise and fall together per cell) and 15 independent genes (the svd init's and the
    co-expression prior's tests)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from celltron.corpus import BuildOptions, build_corpus
    from celltron.corpus.store import Corpus
    from tests.simulate import human_gene_symbols

    rng = np.random.default_rng(7)
    genes = human_gene_symbols(60)
    module_of = np.repeat([0, 1, 2, -1], 15)
    activity = rng.normal(size=(600, 3))
    log_means = rng.normal(0.0, 0.5, 60) + np.where(module_of >= 0, 1.2 * activity[:, module_of.clip(0)], 0.0)
    log_means += 0.8 * rng.normal(size=log_means.shape) * (module_of < 0)  # the loners vary alone
    means = np.exp(log_means)
    counts = rng.poisson(means / means.sum(axis=1, keepdims=True) * 3000)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=[f"cell_{i}" for i in range(600)]),
        var=pd.DataFrame(index=genes),
    )
    folder = tmp_path_factory.mktemp("modules")
    adata.write_h5ad(folder / "modules.h5ad")
    build_corpus([folder / "modules.h5ad"], folder / "corpus", BuildOptions(seed=0, val_fraction=0.05, progress=False))
    return Corpus(folder / "corpus"), genes, module_of


def gene_symbols_of(corpus) -> list[str]:
    """The corpus's genes as the symbols the simulation named them by."""
    from celltron.corpus.genes import ensembl_to_symbol

    table = ensembl_to_symbol("human")
    return [table[g] for g in corpus.gene_ids]
