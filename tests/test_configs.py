"""Every file in configs/ loads into its typed config."""

from pathlib import Path

import pytest

from celltron.corpus import BuildOptions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOADERS = {"corpus": BuildOptions.from_yaml}


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
