"""Shared fixtures: where the shared real data lives, and corpora built once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    """Tests marked `jax` run last: JAX starts threads, and a process that forks after that (the
    DataLoader workers of later tests) risks a deadlock. Tests marked `gpu` need CUDA: skipped,
    saying so, where there is none."""
    import torch

    items.sort(key=lambda item: "jax" in item.keywords)  # stable: the order is otherwise kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TEST_DATA = Path(__file__).resolve().parent / "data"  # trimmed real data, in the repository (see its PROVENANCE.md)
# The project's full shared data, for the few tests that need more than tests/data holds:
# $CELLTRON_SHARED_DATA, else the folder shared/data beside the repository (where CI has it).
SHARED_DATA = Path(os.environ.get("CELLTRON_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def shared_file(relative: str) -> Path:
    """A real-data file by its path in the shared data layout ("scrna/human/x.h5ad"): the copy in
    tests/data when there is one, else the full shared data; skip, saying what to fetch, if neither."""
    for root in (TEST_DATA, SHARED_DATA):
        if (root / relative).exists():
            return root / relative
    folder = relative.rsplit("/", 1)[0]
    pytest.skip(
        f"needs {relative}: fetch the folder {folder}/ of the project's shared data and point "
        f"CELLTRON_SHARED_DATA at the data folder holding it (looked in {TEST_DATA} and {SHARED_DATA})"
    )


@pytest.fixture(scope="session")
def pbmc3k() -> Path:
    """10x PBMC 3k raw counts: the package bundles them (byte for byte the shared file)."""
    from celltron.corpus.demo import demo_h5ad

    return demo_h5ad()


@pytest.fixture(scope="session")
def pbmc4k() -> Path:
    return shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")


@pytest.fixture(scope="session")
def mouse_pancreas() -> Path:
    return shared_file("scrna/mouse/pancreas_50obs.h5ad")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, pbmc3k, pbmc4k, mouse_pancreas) -> Path:
    """Two human PBMC sets and a mouse set, several small shards, labels kept."""
    from celltron.corpus import BuildOptions, build_corpus

    out = tmp_path_factory.mktemp("corpus") / "pbmc_mouse"
    options = BuildOptions(seed=3, val_fraction=0.02, obs_keys=("Annotation",), shard_size_mb=1.5, chunk_nnz=4096, progress=False)
    build_corpus([pbmc3k, pbmc4k, mouse_pancreas], out, options)
    return out


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The bundled PBMC 3k demo corpus, built once."""
    from celltron.corpus.demo import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", progress=False)


@pytest.fixture(scope="session")
def pretrained_geneformer(tmp_path_factory, demo_corpus) -> Path:
    """The one shared pretrained model: the debug Geneformer, a few dozen steps on the demo
    corpus, exported as a Hugging Face folder with its tokenizer."""
    from celltron.pretrain.config import load_config, replace
    from celltron.pretrain.run import pretrain

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "geneformer_debug.yaml")
    config = replace(
        config,
        data={"corpus": demo_corpus.location},
        trainer={"max_steps": 40, "val_every": 1000, "checkpoint_every": 1000},
        logging={"progress_bar": False, "wandb": False},
    )
    return pretrain(config, tmp_path_factory.mktemp("pretrained") / "run").export
