"""Every file in configs/ loads into its typed config."""

from pathlib import Path

import pytest

from celltron.corpus import BuildOptions
from celltron.finetune.config import load_finetune_config
from celltron.launch import load_cluster
from celltron.pretrain.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REPO = CONFIGS.parent


def _pretrain(path):
    config = load_config(path)
    if config.trainer.deepspeed_config:  # paths in configs are relative to the repository root
        assert (REPO / config.trainer.deepspeed_config).exists(), config.trainer.deepspeed_config
        assert config.trainer.strategy.startswith("deepspeed")
    return config


LOADERS = {"corpus": BuildOptions.from_yaml, "pretrain": _pretrain, "launch": load_cluster, "finetune": load_finetune_config}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path):
    section = path.relative_to(CONFIGS).parts[0]
    assert section in LOADERS, f"no loader for configs/{section}/"
    LOADERS[section](path)


def test_default_config_is_the_defaults():
    assert BuildOptions.from_yaml(CONFIGS / "corpus" / "default.yaml") == BuildOptions()


def test_unknown_option_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("seed: 1\nshard_size: 3\n")
    with pytest.raises(ValueError, match="bad.yaml.*shard_size"):
        BuildOptions.from_yaml(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_config_matches_its_name(path):
    import json

    zero = json.loads(path.read_text())["zero_optimization"]
    assert path.stem.startswith(f"zero{zero['stage']}")
    assert ("offload_optimizer" in zero) == path.stem.endswith("offload")


def test_every_family_has_a_debug_and_a_published_size_config():
    families = {}
    for path in (CONFIGS / "pretrain").glob("*.yaml"):
        config = load_config(path)
        families.setdefault(config.model.family, set()).add(config.model.size)
    for family, sizes in families.items():
        assert "debug" in sizes and len(sizes) >= 2, (family, sizes)
    assert set(families) == {"geneformer", "scgpt", "genecompass"}
