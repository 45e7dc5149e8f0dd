"""docs/architecture.md stays true to the package: every package and module it should name is
there, and the README links it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


def test_the_layout_names_every_package_and_top_level_module():
    package = ROOT / "celltron"
    packages = [p.name + "/" for p in package.iterdir() if (p / "__init__.py").exists()]
    modules = [p.name for p in package.glob("*.py") if not p.name.startswith("_")]
    missing = [name for name in packages + modules if name not in ARCHITECTURE]
    assert missing == [], f"docs/architecture.md does not mention {missing}"


def test_the_layout_names_every_module_of_the_main_packages():
    package = ROOT / "celltron"
    missing = [
        f"{folder}/{p.name}"
        for folder in ("training", "hub", "lab", "pretrain", "tokenizers", "model_zoo", "launch")
        for p in (package / folder).glob("*.py")
        if p.name != "__init__.py" and p.stem not in ARCHITECTURE
    ]
    assert missing == [], f"docs/architecture.md does not mention {missing}"


def test_the_readme_links_the_architecture():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
