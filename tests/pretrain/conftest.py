"""The bundled demo corpus, built once for the pretraining tests."""

from pathlib import Path

import pytest

from celltron.corpus.demo import build_demo_corpus

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", progress=False)
