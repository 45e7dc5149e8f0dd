"""Fine-tuning fixtures: simulated screens written as .h5ad, and a model folder per family."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from tests.simulate import simulate_screen

FAMILY_CONFIGS = {
    "geneformer": ("geneformer-v2", "geneformer_debug"),
    "scgpt": ("scgpt", "scgpt_debug"),
    "genecompass": ("ortholog", "genecompass_debug"),
}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def one_thread():
    """For tiny models one thread is fastest, and immune to other work on the machine's cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def screen_file(tmp_path_factory) -> Path:
    """A simulated screen: 10 single knockouts and 12 double ones, raw counts."""
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    simulate_screen(n_genes=80, n_targets=10, n_combos=12, cells_per_perturbation=30, n_control=150, seed=0).adata.write_h5ad(
        path
    )
    return path


def build_model_folder(family: str, lab, out: Path) -> Path:
    """A randomly initialised debug model of `family` with its tokenizer, bound to the lab
    data's genes (GeneCompass builds its vocabulary from the data's genes)."""
    from celltron.pretrain.config import load_config
    from celltron.pretrain.run import build_model_for
    from celltron.tokenizers.dataset import make_tokenizer

    scheme, config_name = FAMILY_CONFIGS[family]
    genes, _ = lab.mapped_genes()
    data = types.SimpleNamespace(gene_ids=genes, gene_species=np.full(len(genes), lab.species), medians={g: 1.0 for g in genes})
    tokenizer, _ = make_tokenizer(scheme, data, 128, 0)
    model = build_model_for(load_config(CONFIGS / "pretrain" / f"{config_name}.yaml"), tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory, screen_file) -> dict[str, Path]:
    from celltron.lab.data import read_lab_data

    lab = read_lab_data(screen_file, ["perturbation"])
    root = tmp_path_factory.mktemp("families")
    return {family: build_model_folder(family, lab, root / family) for family in FAMILY_CONFIGS}
