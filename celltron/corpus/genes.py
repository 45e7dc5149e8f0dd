"""Gene identity: every corpus is keyed by Ensembl gene ID.

Input files name genes by Ensembl ID or by symbol. Symbols are mapped through bundled tables:
human symbols through Geneformer V2's `ensembl_mapping_dict` (upper-cased keys), mouse symbols
through the Ensembl BioMart mouse gene table. A mouse symbol is never looked up in the human
table: `Actb` and `ACTB` are different genes in different genomes.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

SPECIES = ("human", "mouse")
_ENSEMBL_PREFIX = {"human": "ENSG", "mouse": "ENSMUSG"}
_ENSEMBL_ID = re.compile(r"^(ENSG|ENSMUSG)\d{11}(\.\d+)?$")


class GeneMappingError(ValueError):
    """Genes of an input cannot be given Ensembl IDs (unknown species, nothing maps)."""


@lru_cache(maxsize=None)
def _bundled_json(name: str) -> dict[str, str]:
    with resources.files("celltron.data.genes").joinpath(name).open("rb") as raw:
        return json.loads(gzip.decompress(raw.read()))


def ensembl_to_symbol(species: str) -> dict[str, str]:
    """Ensembl gene ID -> gene symbol for `species` (from the bundled BioMart tables)."""
    return _bundled_json(f"{species}_ensembl_to_symbol.json.gz")


@lru_cache(maxsize=None)
def symbol_to_ensembl(species: str) -> dict[str, str]:
    """Symbol -> Ensembl ID. Human keys are upper-case (Geneformer's convention); mouse keys
    are the symbols as Ensembl spells them. A mouse symbol shared by several IDs maps to the
    smallest ID, so the choice is stable across builds."""
    if species == "human":
        return _bundled_json("human_symbol_to_ensembl.json.gz")
    table: dict[str, str] = {}
    for gene_id, symbol in sorted(ensembl_to_symbol(species).items()):
        if symbol:
            table.setdefault(symbol, gene_id)
    return table


def _is_ensembl(names: np.ndarray) -> np.ndarray:
    return np.array([bool(_ENSEMBL_ID.match(str(n))) for n in names], dtype=bool)


def infer_species(names: np.ndarray, source: str) -> str:
    """Guess the species from gene names, or raise when the names do not say clearly.

    Ensembl IDs say it by prefix (ENSG human, ENSMUSG mouse). Symbols say it by case: human
    symbols are upper-case (CD3E), mouse symbols capitalised (Cd3e). At least 80% of the
    names must agree, otherwise we refuse to guess.
    """
    names = np.asarray(names, dtype=str)
    ensembl = _is_ensembl(names)
    if ensembl.mean() > 0.5:
        human = np.char.startswith(names[ensembl], "ENSG").mean()
        votes = {"human": human, "mouse": 1.0 - human}
    else:
        lettered = [n for n in names[~ensembl] if any(c.isalpha() for c in n)]
        upper = sum(n == n.upper() for n in lettered)
        capitalised = sum(n[:1].isupper() and n[1:] != n[1:].upper() for n in lettered)
        total = max(len(lettered), 1)
        votes = {"human": upper / total, "mouse": capitalised / total}
    species, share = max(votes.items(), key=lambda item: item[1])
    if share < 0.8:
        raise GeneMappingError(
            f"{source}: cannot tell the species from the gene names ({votes['human']:.0%} look "
            f"human, {votes['mouse']:.0%} look mouse); pass --species human or --species mouse"
        )
    return species


@dataclass
class GeneMapping:
    """How the genes of one input map onto Ensembl IDs.

    Attributes:
        species: 'human' or 'mouse'.
        ensembl_ids: per input gene, its Ensembl ID, or '' when it does not map.
    """

    species: str
    ensembl_ids: np.ndarray

    @property
    def mapped(self) -> np.ndarray:
        return self.ensembl_ids != ""

    @property
    def n_unmapped(self) -> int:
        return int((~self.mapped).sum())


def map_genes(names, species: str, source: str) -> GeneMapping:
    """Map gene names (Ensembl IDs or symbols) of one input to Ensembl IDs of `species`.

    Versioned IDs (ENSG...12.3) lose their version. IDs of the other species and symbols
    absent from the species' table stay unmapped ('').
    """
    if species not in SPECIES:
        raise GeneMappingError(f"{source}: unknown species {species!r}; use one of {SPECIES}")
    names = np.asarray(names, dtype=str)
    prefix = _ENSEMBL_PREFIX[species]
    table = symbol_to_ensembl(species)
    ids = []
    for name in names:
        if _ENSEMBL_ID.match(name):
            stem = name.split(".")[0]
            if species == "human":
                stem = table.get(stem, stem)
            ids.append(stem if stem.startswith(prefix) and stem[len(prefix)].isdigit() else "")
        else:
            key = name.upper() if species == "human" else name
            ids.append(table.get(key, ""))
    mapping = GeneMapping(species=species, ensembl_ids=np.asarray(ids, dtype=object).astype(str))
    if not mapping.mapped.any():
        raise GeneMappingError(
            f"{source}: none of the {len(names)} gene names maps to a {species} Ensembl ID "
            f"(first names: {', '.join(names[:5])}); check --species, or pass --gene-column with "
            "the var column that holds gene symbols or Ensembl IDs"
        )
    return mapping


def is_mitochondrial(ensembl_ids, species: str) -> np.ndarray:
    """True for genes of the mitochondrial genome (symbols MT-* in human, mt-* in mouse)."""
    symbols = ensembl_to_symbol(species)
    return np.array([symbols.get(g, "").upper().startswith("MT-") for g in ensembl_ids], dtype=bool)
