"""Saving a tokenizer next to a model, and loading it back bound to a dataset's genes.

`load_tokenizer` here is the loader for model folders: it rebuilds the RNA tokenizer of the saved
scheme (`celltron.tokenizers.schemes.load_tokenizer`) and, when the folder also holds protein /
chromatin tokens (`multimodal.json`), wraps it in the multi-modal tokenizer. It sits above both
modules, so that neither the scheme registry nor the scheme modules import the multi-modal one
(they would form an import cycle through `binned`). Model cards and the README show this path.
"""

from __future__ import annotations

from pathlib import Path

from celltron.tokenizers import multimodal, schemes
from celltron.tokenizers.schemes import CONFIG_FILE, MEDIANS_FILE, save_tokenizer

__all__ = ["CONFIG_FILE", "MEDIANS_FILE", "load_tokenizer", "save_tokenizer"]


def load_tokenizer(directory, gene_ids):
    """Rebuild the tokenizer saved in `directory`, bound to `gene_ids` (the data's genes): the
    RNA tokenizer, or the multi-modal one when the folder holds `multimodal.json`."""
    rna = schemes.load_tokenizer(directory, gene_ids)
    if (Path(directory) / multimodal.CONFIG).exists():  # protein / chromatin tokens after RNA's vocabulary
        return multimodal.MultiModalTokenizer.from_saved(directory, rna)
    return rna
