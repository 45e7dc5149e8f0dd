"""Saving a tokenizer next to a model, and loading it back bound to a dataset's genes.

The functions live in `celltron.tokenizers.schemes`, with the registry they go through; this
module keeps the import path that model cards and the README show
(`from celltron.tokenizers.saving import load_tokenizer`). It imports nothing else.
"""

from __future__ import annotations

from celltron.tokenizers.schemes import CONFIG_FILE, MEDIANS_FILE, load_tokenizer, save_tokenizer

__all__ = ["CONFIG_FILE", "MEDIANS_FILE", "load_tokenizer", "save_tokenizer"]
