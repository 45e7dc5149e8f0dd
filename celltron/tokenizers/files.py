"""The files of a tokenizer folder and how they are written. Kept apart from `saving.load_tokenizer`,
which needs every tokenizer class, so that the tokenizers can save themselves without an import cycle."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
