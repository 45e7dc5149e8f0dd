"""GeneVocab: token ids for genes (keyed by Ensembl ID) and special tokens.

Built from the bundled Geneformer V1 / V2 token dictionaries, the scGPT whole-human vocabulary
(keyed by symbol upstream: its ids are kept exactly, its symbols mapped to Ensembl IDs through
the corpus's gene mapping), or a corpus's gene table. Saved next to a model as `vocab.json`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from celltron.corpus.genes import symbol_to_ensembl
from celltron.errors import InputError
from celltron.inputs import MODEL_FIX, MissingInputError, read_json
from celltron.io import write_json_atomically

VOCAB_FILE = "vocab.json"
PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"


def species_token(species: str) -> str:
    return f"<{species}>"


@cache
def bundled_vocab_json(name: str) -> dict:
    """A bundled vocabulary file (see celltron/data/vocab/PROVENANCE.md)."""
    raw = resources.files("celltron.data.vocab").joinpath(f"{name}.json.gz").read_bytes()
    return json.loads(gzip.decompress(raw))


@dataclass
class GeneVocab:
    """Token strings by id, with the Ensembl gene ID behind each gene token.

    Attributes:
        tokens: token string per id (upstream spelling: Ensembl IDs, or scGPT's symbols).
        ensembl_ids: per id, the Ensembl gene ID it stands for ('' for special tokens and for
            upstream symbols that do not map).
        specials: role -> token string ('pad', 'mask', 'cls', 'eos', 'human', 'mouse', ...).
        name: where the vocabulary came from.
        aliases: further Ensembl IDs that share another gene's token (cross-species
            orthologs): gene ID -> token string.
    """

    tokens: list[str]
    ensembl_ids: list[str]
    specials: dict[str, str] = field(default_factory=dict)
    name: str = "custom"
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._index = {token: i for i, token in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise InputError(f"vocabulary {self.name!r} has duplicate tokens")
        self._gene_index: dict[str, int] = {}
        for i, gene in enumerate(self.ensembl_ids):
            if gene:
                self._gene_index.setdefault(gene, i)  # several upstream symbols for one gene: first id wins
        for gene, token in self.aliases.items():
            self._gene_index.setdefault(gene, self._index[token])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, token: str) -> int:
        return self._index[token]

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def special_id(self, role: str) -> int:
        """Id of a special token by role ('pad', 'cls', ...); KeyError names what exists."""
        if role not in self.specials:
            raise KeyError(f"vocabulary {self.name!r} has no {role!r} token (it has: {', '.join(self.specials)})")
        return self._index[self.specials[role]]

    def special_ids(self) -> np.ndarray:
        return np.array(sorted(self._index[t] for t in self.specials.values()), dtype=np.int64)

    def lookup_genes(self, ensembl_ids) -> np.ndarray:
        """Token id per Ensembl gene ID, -1 where the vocabulary has no token for it."""
        return np.array([self._gene_index.get(g, -1) for g in ensembl_ids], dtype=np.int64)

    # ------------------------------------------------------------ builders

    @classmethod
    def from_geneformer(cls, version: str = "v2") -> GeneVocab:
        """Geneformer's token dictionary: V1 (gc30M, <pad> <mask>) or V2 (gc104M, + <cls> <eos>)."""
        tokens = _by_id(bundled_vocab_json(f"geneformer_{version}")["tokens"])
        specials = {role: t for role, t in (("pad", PAD), ("mask", MASK), ("cls", CLS), ("eos", EOS)) if t in tokens}
        ensembl = [t if t.startswith("ENS") else "" for t in tokens]
        return cls(tokens, ensembl, specials, name=f"geneformer-{version}")

    @classmethod
    def from_scgpt(cls, vocab: dict[str, int] | str | Path | None = None) -> GeneVocab:
        """scGPT's vocabulary (default: the bundled whole-human vocab), ids kept exactly.

        Symbols are mapped to Ensembl IDs through the corpus's human gene mapping so that
        Ensembl-keyed corpora line up; `<eoc>` plays the role of end-of-sequence.
        """
        if vocab is None:
            vocab = bundled_vocab_json("scgpt_human")
        elif not isinstance(vocab, dict):
            vocab = read_json(vocab, "scGPT vocabulary")
        tokens = _by_id(vocab)
        table = symbol_to_ensembl("human")
        ensembl = ["" if t.startswith("<") else table.get(t.upper(), "") for t in tokens]
        specials = {role: t for role, t in (("pad", PAD), ("cls", CLS), ("eos", "<eoc>"), ("mask", MASK)) if t in vocab}
        return cls(tokens, ensembl, specials, name="scgpt")

    @classmethod
    def from_genes(cls, ensembl_ids, species=(), name: str = "corpus") -> GeneVocab:
        """Specials (<pad> <mask> <cls> <eos>, one token per species), then one token per gene."""
        specials = {"pad": PAD, "mask": MASK, "cls": CLS, "eos": EOS}
        specials.update({s: species_token(s) for s in species})
        head = list(specials.values())
        genes = list(ensembl_ids)
        return cls(head + genes, [""] * len(head) + genes, specials, name=name)

    # ------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / VOCAB_FILE
        payload = {
            "name": self.name,
            "specials": self.specials,
            "tokens": self.tokens,
            "ensembl_ids": self.ensembl_ids,
            "aliases": self.aliases,
        }
        write_json_atomically(path, payload)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GeneVocab:
        path = Path(directory) / VOCAB_FILE
        if not path.exists():
            raise MissingInputError(f"{path}: no {VOCAB_FILE}; save one with GeneVocab.save_pretrained")
        payload = read_json(path, "tokenizer vocabulary", MODEL_FIX)
        return cls(
            payload["tokens"],
            payload["ensembl_ids"],
            payload["specials"],
            payload.get("name", "custom"),
            payload.get("aliases", {}),
        )


def _by_id(mapping: dict[str, int]) -> list[str]:
    """Token strings ordered by id; ids must be exactly 0..n-1."""
    tokens = [""] * len(mapping)
    for token, index in mapping.items():
        if not 0 <= index < len(tokens) or tokens[index]:
            raise InputError(f"token ids are not contiguous 0..{len(tokens) - 1} (at {token!r} -> {index})")
        tokens[index] = token
    return tokens
