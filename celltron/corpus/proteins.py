"""Protein (antibody-derived tag) identity: one canonical antigen name per measured protein, so
that corpora from different panels, vendors and studies share a vocabulary.

Panels name the same antigen many ways: `CD8` and `CD8a`, `HLA-DR` and `HLA.DR` (R's
make.names), `CD3_UCHT1_TotalSeqB` (antigen, clone, product), `ADT_CD4`. A name is matched by
a key that ignores case, punctuation and the common prefixes and product suffixes, against the
canonical names and aliases of the bundled table (celltron/data/proteins/antigens.tsv, with its
PROVENANCE); when the whole name does not match, a clone suffix is dropped (the longest leading
part that matches wins). Isotype controls get one canonical form (`Isotype-IgG1-kappa`).
Anything else is kept verbatim and reported as unknown: a lab's own antibody is still a feature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from celltron.errors import InputError

TABLE = "antigens.tsv"
# Leading words that say "this is a protein / an antibody" rather than which one.
_PREFIX = re.compile(r"^(?:(?:adt|prot|protein|antibody|ab)[_\-.: ]+)?(?:anti[_\-. ]?)?(?:(?:human|hu|mouse|mu)[_\-. ]+)?", re.I)
# Product names: TotalSeq-A/B/C (BioLegend), with or without a catalogue number, anywhere.
_PRODUCT = re.compile(r"[_\-. ]*totalseq[_\-. ]?[abcd]?\d*(?![a-z])", re.I)
_ISOTYPE = re.compile(r"isotype|(?<![a-z])ctrl(?![a-z])|control", re.I)
_SUBCLASS = re.compile(r"(?<![a-z0-9])(ig[gmade]\d?[abc]?)(?![a-z0-9])", re.I)
_SPECIES = ("armenian hamster", "hamster", "mouse", "rat", "rabbit", "goat")


@dataclass(frozen=True)
class Antigen:
    name: str  # canonical
    genes: tuple[str, ...]  # HGNC symbols of the protein (several for complexes and shared epitopes)


@dataclass(frozen=True)
class ProteinNames:
    """Per input name: its canonical antigen name (the input name itself when unknown) and the
    genes that encode it (empty when unknown); `unknown` lists the names kept verbatim."""

    names: np.ndarray
    canonical: np.ndarray
    genes: tuple[tuple[str, ...], ...]
    unknown: tuple[str, ...]

    def renamed(self) -> dict[str, str]:
        """{input name: canonical name} for the names that changed."""
        return {str(a): str(b) for a, b in zip(self.names, self.canonical) if a != b}


def key(name: str) -> str:
    """The matching key of a name: upper case, letters and digits only."""
    return re.sub(r"[^0-9A-Z]", "", name.upper())


@cache
def antigen_table() -> dict[str, Antigen]:
    """{key of every canonical name and alias: its Antigen}, from the bundled table. Two
    entries sharing a key would make matching ambiguous: refused when the table loads."""
    text = resources.files("celltron.data.proteins").joinpath(TABLE).read_text()
    lines = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    table: dict[str, Antigen] = {}
    for fields in lines:
        name, genes, aliases = (fields + ["", ""])[:3]
        antigen = Antigen(name, tuple(g for g in genes.split(";") if g))
        for alias in [name, *(a for a in aliases.split(";") if a)]:
            previous = table.setdefault(key(alias), antigen)
            if previous != antigen:
                raise ValueError(f"{TABLE}: {alias!r} names both {previous.name} and {name}")
    return table


def _stripped(name: str) -> str:
    return _PRODUCT.sub("", _PREFIX.sub("", name.strip())).strip("_-. ")


def _isotype(name: str) -> str | None:
    """`Isotype-[Species-]IgG1[-kappa|-lambda]` for an isotype control's name, else None."""
    if not _ISOTYPE.search(name):
        return None
    subclass = _SUBCLASS.search(name)
    if subclass is None:
        return None
    lower = name.lower()
    species = next((s for s in _SPECIES if s in lower), None)
    tokens = set(re.split(r"[^a-zκλ]+", lower))
    light = "kappa" if tokens & {"k", "kappa", "κ"} else "lambda" if tokens & {"l", "lambda", "λ"} else None
    text = subclass.group(1)
    parts = ["Isotype", species.title().replace(" ", "") if species else None, "Ig" + text[2].upper() + text[3:], light]
    return "-".join(p for p in parts if p)


def _lookup(name: str) -> Antigen | None:
    """The table's antigen for `name`: the whole name, else its longest leading part before a
    clone suffix (split at `_ |()` first, then also at `-` and `.`)."""
    table = antigen_table()
    if key(name) in table:
        return table[key(name)]
    for separators in (r"[_|() ]+", r"[_|() .\-]+"):
        parts = [p for p in re.split(separators, name) if p]
        for n in range(len(parts) - 1, 0, -1):
            found = table.get(key("".join(parts[:n])))
            if found is not None:
                return found
    return None


def canonical_antigen(name: str) -> tuple[str, tuple[str, ...], bool]:
    """(canonical name, genes, known) of one protein name."""
    isotype = _isotype(_PRODUCT.sub("", str(name)))  # before the prefixes go: "Mouse IgG1" names a species
    if isotype is not None:
        return isotype, (), True
    stripped = _stripped(str(name))
    found = _lookup(stripped)
    if found is None:
        return str(name), (), False
    return found.name, found.genes, True


def canonical_proteins(names, where: str = "") -> ProteinNames:
    """Canonical antigen names for a panel (the feature names of a protein modality). Two names
    of one panel that are the same antigen are refused, naming both: counts of one protein
    would otherwise be split over two features or silently summed."""
    names = np.asarray([str(n) for n in names], dtype=object)
    results = [canonical_antigen(n) for n in names]
    canonical = np.asarray([r[0] for r in results], dtype=object)
    seen: dict[str, str] = {}
    for original, name in zip(names, canonical):
        if name in seen:
            raise InputError(
                f"{where or 'protein panel'}: {seen[name]!r} and {original!r} are both the antigen {name}; "
                "rename or drop one of the two features (a panel measures each antigen once)"
            )
        seen[name] = original
    unknown = tuple(str(n) for n, r in zip(names, results) if not r[2])
    return ProteinNames(names, canonical, tuple(r[1] for r in results), unknown)
