"""Drug features shared by the drug-response tasks (ic50 in ic50.py, expression in
expression.py): Morgan fingerprints from SMILES, compound identity (which drug ids are one
compound), and the GDSC drug list's mechanism annotations (targets, target pathway). A module of
its own so that neither task module imports the other's."""

from __future__ import annotations

import re

import numpy as np


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as error:
        raise ImportError("drug features need RDKit: pip install 'celltron[chem]'") from error
    RDLogger.DisableLog("rdApp.*")
    return Chem


def fingerprints(smiles: dict[str, str], bits: int = 1024, radius: int = 2) -> dict[str, np.ndarray]:
    """Morgan (ECFP-like) bit vectors; drugs whose SMILES RDKit cannot parse are left out."""
    Chem = _rdkit()
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    out = {}
    for drug, text in smiles.items():
        molecule = Chem.MolFromSmiles(text)
        if molecule is not None:
            out[drug] = generator.GetFingerprintAsNumPy(molecule).astype(np.float32)
    return out


def folded_name(name: str) -> str:
    """A drug name compared case- and punctuation-blind ('5-Fluorouracil' ~ '5 fluorouracil')."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def canonical_smiles(smiles: str) -> str:
    """RDKit's canonical SMILES (the text itself when RDKit cannot parse it)."""
    Chem = _rdkit()
    molecule = Chem.MolFromSmiles(smiles)
    return Chem.MolToSmiles(molecule) if molecule is not None else smiles.strip()


def compounds(smiles: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    """Drug id -> the id standing for its compound. Ids that share a canonical SMILES or a
    folded name are one compound, transitively: GDSC1 and GDSC2 list many drugs twice under two
    ids (e.g. Afatinib, Olaparib), and a split by drug must keep such twins on one side.

    Args:
        smiles: drug id -> SMILES. names: drug id -> name (ids without one are matched by SMILES alone).
    """
    parent = {drug: drug for drug in smiles}

    def root(drug: str) -> str:
        while parent[drug] != drug:
            parent[drug] = parent[parent[drug]]
            drug = parent[drug]
        return drug

    first_of: dict[tuple[str, str], str] = {}
    for drug in sorted(smiles):
        keys = [("smiles", canonical_smiles(smiles[drug]))]
        if names.get(drug):
            keys.append(("name", folded_name(names[drug])))
        for key in keys:
            other = first_of.setdefault(key, drug)
            a, b = root(drug), root(other)
            parent[max(a, b)] = min(a, b)
    return {drug: root(drug) for drug in smiles}


# Target entries of the GDSC drug list that name no target: a drug listing only these has no
# known targets, and two drugs sharing one of them share nothing ("others" trails lists of
# kinases, e.g. Midostaurin's "PKC, PPK, FLT1, c-FGR, others").
UNKNOWN_TARGETS = frozenset({"", "-", "unknown", "not defined", "others", "other", "na", "n/a", "none"})
# Target pathways of the GDSC drug list (2019-06-24) that are catch-alls, not mechanisms: "Other"
# (47 drugs, from 5-fluorouracil to farnesyl-transferase inhibitors), "Other, kinases" (31 kinase
# inhibitors of unrelated pathways) and "Unclassified" (2). Two drugs in one of these share no
# pathway; every other value (e.g. "EGFR signaling", "Mitosis") is one.
UNINFORMATIVE_PATHWAYS = frozenset({"", "-", "unknown", "other", "other, kinases", "unclassified", "not defined"})


def parse_targets(text) -> frozenset[str]:
    """A drug list's Targets cell ("EGFR, ERBB2") as a set of lower-case names, split on commas or
    semicolons; placeholders (UNKNOWN_TARGETS) and missing cells give no targets."""
    if not isinstance(text, str):
        return frozenset()
    names = (name.strip().lower() for name in re.split(r"[,;]", text))
    return frozenset(name for name in names if name not in UNKNOWN_TARGETS)


def informative_pathway(text) -> str:
    """A drug list's "Target pathway" cell, lower case and whitespace-folded; "" where it names no
    mechanism (UNINFORMATIVE_PATHWAYS) or is missing."""
    if not isinstance(text, str):
        return ""
    pathway = " ".join(text.lower().split())
    return "" if pathway in UNINFORMATIVE_PATHWAYS else pathway


def target_vectors(targets: dict[str, frozenset[str]], genes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Drug id -> one vector from its targets' knowledge-prior rows, for the similar_drugs
    kernel's `prior` part (the dot product of two drugs' vectors).

    Per prior in `genes` (each: upper-case gene symbol -> its row), a drug's block is the mean
    row of its targets that have one, scaled to unit length; the blocks are concatenated, each
    times 1/sqrt(number of priors). Two drugs' dot product is therefore the mean over the priors
    of the cosine of their mean target rows, counting 0 for a prior where either has no target
    with a row. Drugs with no row in any prior get no vector.
    """
    if not genes:
        return {}
    widths = [len(next(iter(table.values()))) if table else 0 for table in genes]
    scale = 1.0 / np.sqrt(len(genes))
    out = {}
    for drug, names in targets.items():
        blocks, found = [], False
        for table, width in zip(genes, widths):
            rows = [table[name.upper()] for name in sorted(names) if name.upper() in table]
            block = np.mean(rows, axis=0) if rows else np.zeros(width)
            norm = float(np.linalg.norm(block))
            found |= norm > 0
            blocks.append(block / norm * scale if norm > 0 else block)
        if found:
            out[drug] = np.concatenate(blocks).astype(np.float64)
    return out
