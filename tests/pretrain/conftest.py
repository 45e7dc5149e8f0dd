"""Pretraining tests share the root conftest's demo corpus."""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
