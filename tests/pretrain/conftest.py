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
