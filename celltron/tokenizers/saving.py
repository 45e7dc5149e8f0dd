"""Saving a tokenizer next to a model, and loading it back bound to a dataset's genes.

A tokenizer folder holds `vocab.json`, `tokenizer_config.json` (scheme and settings) and, for
schemes that divide by gene medians, `gene_medians.json`. All JSON: nothing executable.
"""

from __future__ import annotations

from pathlib import Path

from celltron.errors import InputError
from celltron.inputs import MODEL_FIX, MissingInputError, read_json
from celltron.tokenizers.binned import BinnedTokenizer
from celltron.tokenizers.files import CONFIG_FILE, MEDIANS_FILE, save_tokenizer, write_json_atomically, write_text_atomically
from celltron.tokenizers.ortholog import OrthologTokenizer
from celltron.tokenizers.rank_value import RankValueTokenizer
from celltron.tokenizers.vocab import GeneVocab

# save_tokenizer and the file names were long imported from here; they live in files.py so that the
# tokenizers, which save themselves, need not import this module (which needs them all)
__all__ = ["CONFIG_FILE", "MEDIANS_FILE", "load_tokenizer", "save_tokenizer", "write_json_atomically", "write_text_atomically"]


def load_tokenizer(directory, gene_ids):
    """Rebuild the tokenizer saved in `directory`, bound to `gene_ids` (the data's genes)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise MissingInputError(f"{config_path}: no tokenizer config; save one with tokenizer.save_pretrained")
    config = read_json(config_path, "tokenizer config", MODEL_FIX)
    vocab = GeneVocab.from_pretrained(directory)
    settings = config["settings"]
    medians_path = directory / MEDIANS_FILE
    medians = read_json(medians_path, "gene medians", MODEL_FIX) if medians_path.exists() else None
    if config["scheme"] == RankValueTokenizer.SCHEME:
        return RankValueTokenizer(vocab, medians, gene_ids, **settings)
    if config["scheme"] == OrthologTokenizer.SCHEME:
        return OrthologTokenizer(vocab, gene_ids, medians, **settings)
    if config["scheme"] == BinnedTokenizer.SCHEME:
        return BinnedTokenizer(vocab, gene_ids, **settings)
    raise InputError(f"{config_path}: unknown tokenizer scheme {config['scheme']!r}")
