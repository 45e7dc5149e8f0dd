"""Gene identity: every corpus is keyed by Ensembl gene ID.

Input files name genes by Ensembl ID or by symbol. Symbols are mapped through bundled tables:
human symbols through Geneformer V2's `ensembl_mapping_dict` (upper-cased keys), mouse symbols
through the Ensembl BioMart mouse gene table. A mouse symbol is never looked up in the human
table: `Actb` and `ACTB` are different genes in different genomes.

Every verb that reads a user's matrix maps its genes through `map_input_genes`, one rule for all:
the species given must not contradict the gene names, and at least `min_fraction` of the counts
(of the genes, where no counts are at hand) must map; `check_token_coverage` applies the same
rule to the genes a tokenizer's vocabulary covers. Nothing is guessed silently.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from celltron.corpus.constants import MIN_MAPPED_FRACTION
from celltron.errors import ConfigError, UserError

SPECIES = ("human", "mouse")
_ENSEMBL_PREFIX = {"human": "ENSG", "mouse": "ENSMUSG"}
_ENSEMBL_ID = re.compile(r"^(ENSG|ENSMUSG)\d{11}(\.\d+)?$")

MIN_FRACTION_OPTION = "--min-mapped-fraction"  # the CLI setting that lowers the threshold


class GeneMappingError(UserError):
    """Genes of an input cannot be given Ensembl IDs (unknown species, nothing maps)."""


@cache
def _bundled_json(name: str) -> dict[str, str]:
    with resources.files("celltron.data.genes").joinpath(name).open("rb") as raw:
        return json.loads(gzip.decompress(raw.read()))


def ensembl_to_symbol(species: str) -> dict[str, str]:
    """Ensembl gene ID -> gene symbol for `species` (from the bundled BioMart tables)."""
    return _bundled_json(f"{species}_ensembl_to_symbol.json.gz")


@cache
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


@dataclass
class _SpeciesEvidence:
    """What gene names say about the species: per species, the share of names (Ensembl IDs or
    symbols, whichever most names are) that look like it, with a few examples."""

    kind: str
    share: dict[str, float]
    examples: dict[str, list[str]]


def _species_evidence(names: np.ndarray) -> _SpeciesEvidence:
    ensembl = _is_ensembl(names)
    if len(names) and ensembl.mean() > 0.5:
        kind, pool = "Ensembl IDs", names[ensembl]
        looks = {"human": np.char.startswith(pool, "ENSG"), "mouse": np.char.startswith(pool, "ENSMUSG")}
    else:
        # human symbols are upper-case (CD3E), mouse symbols capitalised (Cd3e)
        kind = "symbols"
        pool = np.array([n for n in names[~ensembl] if any(c.isalpha() for c in n)], dtype=str)
        looks = {
            "human": np.array([n == n.upper() for n in pool], dtype=bool),
            "mouse": np.array([n[:1].isupper() and n[1:] != n[1:].upper() for n in pool], dtype=bool),
        }
    total = max(len(pool), 1)
    return _SpeciesEvidence(
        kind, {s: float(v.sum() / total) for s, v in looks.items()}, {s: pool[v][:3].tolist() for s, v in looks.items()}
    )


def infer_species(names: np.ndarray, source: str) -> str:
    """Guess the species from gene names, or raise when the names do not say clearly.

    Ensembl IDs say it by prefix (ENSG human, ENSMUSG mouse). Symbols say it by case: human
    symbols are upper-case (CD3E), mouse symbols capitalised (Cd3e). At least 80% of the
    names must agree, otherwise we refuse to guess.
    """
    votes = _species_evidence(np.asarray(names, dtype=str)).share
    species, share = max(votes.items(), key=lambda item: item[1])
    if share < 0.8:
        raise GeneMappingError(
            f"{source}: cannot tell the species from the gene names ({votes['human']:.0%} look "
            f"human, {votes['mouse']:.0%} look mouse); pass --species human or --species mouse"
        )
    return species


def check_species(names, species: str, source: str) -> None:
    """Refuse a --species that most gene names contradict: mapping mouse symbols as human would
    upper-case them onto human genes (Actb -> ACTB), and human symbols as mouse maps almost none.
    A few names of the other style (human C1orf112, upper-case mouse genes) do not count: only a
    majority that looks like the other species does."""
    if species not in SPECIES:
        raise GeneMappingError(f"{source}: unknown species {species!r}; use one of {SPECIES}")
    evidence = _species_evidence(np.asarray(names, dtype=str))
    other = next(s for s in SPECIES if s != species)
    if evidence.share[other] > 0.5 and evidence.share[other] > evidence.share[species]:
        raise GeneMappingError(_contradiction(source, species, other, evidence))


def _contradiction(source: str, species: str, other: str, evidence: _SpeciesEvidence) -> str:
    symbols = evidence.kind == "symbols"
    style = f"{other}-style" if symbols else f"{other} Ensembl IDs"
    retyped = ""
    if symbols and species == "human":  # the one legitimate case: human genes written Mouse-style by some tool
        retyped = "; if they are human genes written Mouse-style, upper-case the var names first"
    return (
        f"{source}: --species {species} contradicts the gene names: {evidence.share[other]:.0%} of {evidence.kind} are "
        f"{style} ({', '.join(evidence.examples[other])}, ...); pass --species {other}, or leave --species out to infer it "
        f"from the names{retyped}"
    )


@dataclass
class GeneMapping:
    """How the genes of one input map onto Ensembl IDs.

    Attributes:
        species: 'human' or 'mouse'.
        ensembl_ids: per input gene, its Ensembl ID, or '' when it does not map.
        names: per input gene, its name as found in the input.
        gene_counts: per input gene, its counts (over a sample of cells), when known.
    """

    species: str
    ensembl_ids: np.ndarray
    names: np.ndarray | None = None
    gene_counts: np.ndarray | None = None

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
    mapping = GeneMapping(species=species, ensembl_ids=np.asarray(ids, dtype=object).astype(str), names=names)
    if not mapping.mapped.any():
        raise GeneMappingError(
            f"{source}: none of the {len(names)} gene names maps to a {species} Ensembl ID "
            f"(first names: {', '.join(names[:5])}); check --species, or pass --gene-column with "
            "the var column that holds gene symbols or Ensembl IDs"
        )
    return mapping


def map_input_genes(
    names, species: str | None, source: str, gene_counts=None, min_fraction: float = MIN_MAPPED_FRACTION
) -> GeneMapping:
    """Map one input's genes the way every verb does: the species inferred from the names, or the
    one given checked against them; then refuse unless `min_fraction` of the counts map
    (`gene_counts`: per input gene; without them, of the genes)."""
    names = np.asarray(names, dtype=str)
    if species is None:
        species = infer_species(names, source)
    else:
        check_species(names, species, source)
    mapping = map_genes(names, species, source)
    mapping.gene_counts = None if gene_counts is None else np.asarray(gene_counts, dtype=np.float64)
    check_mapping(mapping, source, min_fraction)
    return mapping


def check_mapping(mapping: GeneMapping, source: str, min_fraction: float = MIN_MAPPED_FRACTION) -> float:
    """Refuse an input whose mapped share of counts (of genes, without counts) is below
    `min_fraction`; returns that share."""
    return require_share(
        mapping.mapped,
        mapping.names,
        mapping.gene_counts,
        min_fraction,
        source,
        f"map to {mapping.species} Ensembl IDs",
        "pass --gene-column naming the var column that holds gene symbols or Ensembl IDs, or check --species",
    )


def check_token_coverage(
    ensembl_ids,
    names,
    gene_counts,
    vocab,
    source: str,
    fix: str,
    min_fraction: float = MIN_MAPPED_FRACTION,
    option: str | None = MIN_FRACTION_OPTION,
) -> float:
    """Refuse an input whose share of counts (of genes, without counts) on genes with a token in
    `vocab` (anything with `lookup_genes` and `name`) is below `min_fraction`: its cells would be
    tokenised to (nearly) nothing. Returns that share. `option`: see `require_share`."""
    in_vocab = vocab.lookup_genes(np.asarray(ensembl_ids, dtype=str)) >= 0
    what = f"have a token in the {vocab.name} vocabulary"
    return require_share(in_vocab, names, gene_counts, min_fraction, source, what, fix, option)


def require_share(
    kept, names, gene_counts, min_fraction: float, source: str, what: str, fix: str, option: str | None = MIN_FRACTION_OPTION
) -> float:
    """The one rule behind every gene check: the share of counts on `kept` genes (of the genes
    when there are no counts, or none in the sample) must reach `min_fraction`. `option`: the
    setting that lowers the threshold where the caller has one (the error offers it), else None."""
    if not 0 <= min_fraction <= 1:
        raise ConfigError(f"{option or 'min_fraction'} {min_fraction:g}: give a share between 0 and 1 (0.5: half of the counts)")
    kept = np.asarray(kept, dtype=bool)
    gene_share = float(kept.mean()) if len(kept) else 0.0
    counts = None if gene_counts is None else np.nan_to_num(np.abs(np.asarray(gene_counts, dtype=np.float64)))
    count_share = float(counts[kept].sum() / counts.sum()) if counts is not None and counts.sum() > 0 else None
    share = gene_share if count_share is None else count_share
    if share >= min_fraction:
        return share
    names = np.asarray(names if names is not None else np.arange(len(kept)), dtype=str)
    holding = "" if count_share is None else f" holding {_percent(count_share)} of counts"
    measure = "genes" if count_share is None else "counts"
    raise GeneMappingError(
        f"{source}: only {int(kept.sum()):,} of {len(kept):,} genes ({_percent(gene_share)}){holding} {what} "
        f"({', '.join(names[~kept][:3])}, ... do not); at least {_percent(min_fraction)} of {measure} must. To fix: {fix}"
        + (f", or lower {option} (now {min_fraction:g}) if so few are expected" if option else "")
    )


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


def is_mitochondrial(ensembl_ids, species: str) -> np.ndarray:
    """True for genes of the mitochondrial genome (symbols MT-* in human, mt-* in mouse)."""
    symbols = ensembl_to_symbol(species)
    return np.array([symbols.get(g, "").upper().startswith("MT-") for g in ensembl_ids], dtype=bool)
