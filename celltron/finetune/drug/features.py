"""Drug features shared by the drug-response tasks (ic50 in ic50.py, expression in
expression.py): Morgan fingerprints from SMILES, and compound identity (which drug ids are one
compound). A module of its own so that neither task module imports the other's."""

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
