"""Drug features shared by the drug-response tasks (ic50 in ic50.py, expression in
expression.py): Morgan fingerprints from SMILES. A module of its own so that neither task
module imports the other's."""

from __future__ import annotations

import numpy as np


def fingerprints(smiles: dict[str, str], bits: int = 1024, radius: int = 2) -> dict[str, np.ndarray]:
    """Morgan (ECFP-like) bit vectors; drugs whose SMILES RDKit cannot parse are left out."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError as error:
        raise ImportError("drug fingerprints need RDKit: pip install 'celltron[chem]'") from error
    RDLogger.DisableLog("rdApp.*")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    out = {}
    for drug, text in smiles.items():
        molecule = Chem.MolFromSmiles(text)
        if molecule is not None:
            out[drug] = generator.GetFingerprintAsNumPy(molecule).astype(np.float32)
    return out
