"""One tokenizer interface: the `Tokenizer` protocol, the registry of schemes, and a tokenizer
folder's files.

A scheme is the name a user picks (`celltron tokenize --scheme`, a pretraining config's
`tokenizer.scheme`); the registry maps it to the tokenizer class that implements it. One class
may serve several schemes: Geneformer V1 and V2 are one `RankValueTokenizer`, which reads its
dictionary version from the scheme's name. Every class:

- builds itself for a scheme over a corpus's gene table (`for_corpus`);
- tokenises a `Block` of cells with `encode_block(block, rng)`, whatever per-cell inputs its
  scheme reads (totals, species, the source matrix's dtype, the generator);
- saves itself into a folder (`save_pretrained` -> `save_tokenizer`) and rebuilds itself from one
  (`from_saved`, called by `load_tokenizer`).

A tokenizer folder holds `vocab.json`, `tokenizer_config.json` (the class's `SCHEME` and its
settings) and, for schemes that divide by gene medians, `gene_medians.json`. All JSON: nothing
executable.

The built-in schemes are registered by class path and imported on first use, so that the scheme
names (`scheme_names()`, `SCHEMES`) load without numpy (the CLI's `--help`); the tokenizer
modules import this one, never the other way round at import time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from celltron.errors import ConfigError, InputError
from celltron.inputs import MODEL_FIX, MissingInputError, read_json
from celltron.io import write_json_atomically

if TYPE_CHECKING:
    import numpy as np

    from celltron.tokenizers.ragged import RaggedTokens
    from celltron.tokenizers.vocab import GeneVocab

CONFIG_FILE = "tokenizer_config.json"
MEDIANS_FILE = "gene_medians.json"


@dataclass
class Block:
    """Cells in CSR over `gene_ids`, with totals, species and obs labels per cell."""

    indptr: np.ndarray
    genes: np.ndarray
    counts: np.ndarray
    n_counts: np.ndarray
    species: list[str]
    obs: dict[str, list]
    # whether each cell's source matrix was float32 (one flag per cell, or one for the block):
    # Geneformer's normalisation then runs in float32 (rank_value)
    float32: np.ndarray | bool | None = None


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer class offers; see the module docstring."""

    SCHEME: ClassVar[str]  # written to tokenizer_config.json: which class rebuilds a saved folder
    TAKES_GENES_SUBSET: ClassVar[bool]  # whether `for_corpus` accepts a gene subset (scGPT's --hvg)
    vocab: GeneVocab

    def settings(self) -> dict:
        """The constructor keywords that `from_saved` takes back (JSON-serialisable)."""
        ...

    def encode_block(self, block: Block, rng: np.random.Generator) -> RaggedTokens:
        """Tokenise a block of cells; `rng` is the generator of schemes that draw (scGPT)."""
        ...

    def save_pretrained(self, directory) -> Path: ...

    @classmethod
    def for_corpus(cls, scheme: str, genes, max_len: int | None, seed: int, genes_subset=None) -> Tokenizer:
        """The tokenizer of `scheme` over `genes` (anything with `gene_ids`, `gene_species` and
        `medians`); `max_len` None: the scheme's own length."""
        ...

    @classmethod
    def from_saved(cls, vocab: GeneVocab, settings: dict, medians: dict | None, gene_ids) -> Tokenizer:
        """Rebuild a saved tokenizer bound to `gene_ids` (the data's genes)."""
        ...

    @classmethod
    def fixed_vocab(cls, scheme: str) -> GeneVocab | None:
        """The bundled vocabulary of `scheme`, or None where it is built from the data's genes."""
        ...


# scheme name -> tokenizer class, or "module:Class" imported on first use
_REGISTRY: dict[str, type | str] = {}


def register_scheme(name: str, tokenizer: type | str | None = None):
    """Register the tokenizer class (or its "module:Class" path) that implements scheme `name`.
    Without `tokenizer`, a class decorator: `@register_scheme("my-scheme")`."""
    if tokenizer is None:

        def decorate(cls: type) -> type:
            register_scheme(name, cls)
            return cls

        return decorate
    _REGISTRY[name] = tokenizer
    return tokenizer


register_scheme("geneformer-v1", "celltron.tokenizers.rank_value:RankValueTokenizer")
register_scheme("geneformer-v2", "celltron.tokenizers.rank_value:RankValueTokenizer")
register_scheme("scgpt", "celltron.tokenizers.binned:BinnedTokenizer")
register_scheme("ortholog", "celltron.tokenizers.ortholog:OrthologTokenizer")


def scheme_names() -> tuple[str, ...]:
    """Every registered scheme, in registration order."""
    return tuple(_REGISTRY)


SCHEMES = scheme_names()  # the built-in schemes (`celltron tokenize --scheme`)


def scheme_class(scheme: str) -> type[Tokenizer]:
    """The tokenizer class of `scheme`; a ConfigError naming the schemes for an unknown one."""
    if scheme not in _REGISTRY:
        raise ConfigError(f"unknown scheme {scheme!r}; use one of {scheme_names()}")
    entry = _REGISTRY[scheme]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = _REGISTRY[scheme] = getattr(importlib.import_module(module), name)
    return entry


def _class_of_saved(saved_scheme: str) -> type[Tokenizer] | None:
    """The class whose `SCHEME` a saved folder names (rank_value, binned, ortholog), if any."""
    classes = {scheme_class(name) for name in scheme_names()}
    return next((cls for cls in classes if cls.SCHEME == saved_scheme), None)


def make_tokenizer(scheme: str, data, max_len: int | None, seed: int, genes_subset=None):
    """The tokenizer of `scheme` bound to the data's genes (anything with `gene_ids`,
    `gene_species` and `medians`: a tokenize input, or a corpus's gene table), and its vocabulary.
    `genes_subset` (Ensembl IDs, e.g. highly variable genes) is for the scgpt scheme only."""
    takes_subset = scheme in _REGISTRY and scheme_class(scheme).TAKES_GENES_SUBSET
    if genes_subset is not None and not takes_subset:
        raise ConfigError(f"a gene subset (highly variable genes, --hvg) is scGPT's step; scheme {scheme!r} takes none")
    tokenizer = scheme_class(scheme).for_corpus(scheme, data, max_len, seed, genes_subset)
    return tokenizer, tokenizer.vocab


def save_tokenizer(tokenizer: Tokenizer, directory) -> Path:
    """Write a tokenizer's vocabulary, settings and medians into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.vocab.save_pretrained(directory)
    write_json_atomically(directory / CONFIG_FILE, {"scheme": tokenizer.SCHEME, "settings": tokenizer.settings()})
    if getattr(tokenizer, "medians", None) is not None:
        write_json_atomically(directory / MEDIANS_FILE, tokenizer.medians)
    return directory


def load_tokenizer(directory, gene_ids) -> Tokenizer:
    """Rebuild the one-scheme tokenizer saved in `directory`, bound to `gene_ids` (the data's genes).

    A model folder may also hold protein / chromatin tokens (`multimodal.json`); load those with
    `celltron.tokenizers.saving.load_tokenizer`, which wraps this one. This module stays below the
    scheme modules and so imports none of them."""
    from celltron.tokenizers.vocab import GeneVocab  # here: the scheme names load without numpy

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise MissingInputError(f"{config_path}: no tokenizer config; save one with tokenizer.save_pretrained")
    config = read_json(config_path, "tokenizer config", MODEL_FIX)
    vocab = GeneVocab.from_pretrained(directory)
    settings = config["settings"]
    medians_path = directory / MEDIANS_FILE
    medians = read_json(medians_path, "gene medians", MODEL_FIX) if medians_path.exists() else None
    cls = _class_of_saved(config["scheme"])
    if cls is None:
        raise InputError(f"{config_path}: unknown tokenizer scheme {config['scheme']!r}")
    return cls.from_saved(vocab, settings, medians, gene_ids)
