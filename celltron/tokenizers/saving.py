"""Saving a tokenizer next to a model, and loading it back bound to a dataset's genes.

A tokenizer folder holds `vocab.json`, `tokenizer_config.json` (scheme and settings) and, for
schemes that divide by gene medians, `gene_medians.json`. All JSON: nothing executable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from celltron.inputs import MODEL_FIX, read_json
from celltron.tokenizers.vocab import GeneVocab

CONFIG_FILE = "tokenizer_config.json"
MEDIANS_FILE = "gene_medians.json"


def write_text_atomically(path: Path, text: str) -> None:
    """Write under a temporary name unique to this process, then rename: readers (and other
    processes writing the same file) never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json_atomically(path: Path, payload) -> None:
    write_text_atomically(path, json.dumps(payload))


def save_tokenizer(tokenizer, directory) -> Path:
    """Write a tokenizer's vocabulary, settings and medians into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.vocab.save_pretrained(directory)
    write_json_atomically(directory / CONFIG_FILE, {"scheme": tokenizer.SCHEME, "settings": tokenizer.settings()})
    if getattr(tokenizer, "medians", None) is not None:
        write_json_atomically(directory / MEDIANS_FILE, tokenizer.medians)
    return directory


def load_tokenizer(directory, gene_ids):
    """Rebuild the tokenizer saved in `directory`, bound to `gene_ids` (the data's genes)."""
    from celltron.tokenizers.binned import BinnedTokenizer
    from celltron.tokenizers.ortholog import OrthologTokenizer
    from celltron.tokenizers.rank_value import RankValueTokenizer

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: no tokenizer config; save one with tokenizer.save_pretrained")
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
    raise ValueError(f"{config_path}: unknown tokenizer scheme {config['scheme']!r}")
