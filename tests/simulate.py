"""A simulated CRISPR screen with single and double perturbations whose ground truth is known:
each gene knocked out shifts log expression by its own sparse effect vector; a double
perturbation adds both shifts plus an interaction term. Counts are Poisson around the shifted
means, so the data looks like a real screen (raw integer counts, a GEARS-style obs column).

Used to test the combination metrics and baselines (the additive baseline is exact at zero
interaction and degrades as it grows) and the model's double-perturbation path.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.corpus.genes import ensembl_to_symbol
from celltron.errors import ConfigError
from celltron.finetune.drug.features import fingerprints
from celltron.tokenizers.vocab import GeneVocab


@dataclass
class SimulatedScreen:
    """The AnnData and its ground truth: log-mean shift of every perturbation (genes,)."""

    adata: ad.AnnData
    shifts: dict[str, np.ndarray]


def human_gene_symbols(n: int) -> list[str]:
    """`n` human gene symbols that map to Ensembl IDs with Geneformer tokens (so any celltron
    model can tokenise the simulated cells)."""
    symbols = ensembl_to_symbol("human")
    vocab = GeneVocab.from_geneformer("v1")
    chosen, seen = [], set()
    for gene_id in sorted(symbols):
        symbol = symbols[gene_id]
        if gene_id in vocab and symbol and symbol not in seen and symbol.isalnum():
            chosen.append(symbol)
            seen.add(symbol)
        if len(chosen) == n:
            return chosen
    raise ConfigError(f"only {len(chosen)} usable human gene symbols, asked for {n}")


def simulate_screen(
    n_genes: int = 120,
    n_targets: int = 12,
    n_combos: int = 16,
    cells_per_perturbation: int = 60,
    n_control: int = 300,
    interaction: float = 0.5,
    depth: float = 2000.0,
    seed: int = 0,
) -> SimulatedScreen:
    """A screen over `n_genes` measured genes whose first `n_targets` are the knocked-out genes.

    Args:
        interaction: scale of each double perturbation's non-additive term, relative to the
            single effects (0: exactly additive in log space).
        depth: mean counts per cell.
    """
    rng = np.random.default_rng(seed)
    genes = human_gene_symbols(n_genes)
    targets = genes[:n_targets]
    base = rng.normal(0.0, 1.0, n_genes)
    base = np.log(np.exp(base) / np.exp(base).sum() * depth)
    shifts = {}
    for i, gene in enumerate(targets):
        effect = np.where(rng.random(n_genes) < 0.15, rng.normal(0, 0.8, n_genes), 0.0)
        effect[i] = -2.0  # the knocked-out gene itself goes down
        shifts[gene] = effect
    pairs = [(a, b) for j, a in enumerate(targets) for b in targets[j + 1 :]]
    for index in rng.choice(len(pairs), min(n_combos, len(pairs)), replace=False):
        a, b = pairs[index]
        extra = np.where(rng.random(n_genes) < 0.15, rng.normal(0, 0.8, n_genes), 0.0) * interaction
        shifts[f"{a}+{b}"] = shifts[a] + shifts[b] + extra
    labels = ["control"] * n_control + [p for p in shifts for _ in range(cells_per_perturbation)]
    log_means = np.stack([base + (shifts[p] if p != "control" else 0.0) for p in labels])
    size = rng.lognormal(0.0, 0.3, (len(labels), 1))
    counts = rng.poisson(np.exp(log_means) * size)
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"cell_{i}" for i in range(len(labels))])
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    return SimulatedScreen(adata, shifts)


def simulate_drug_screen(
    smiles: dict[str, str],
    genes: list[str] | None = None,
    n_genes: int = 200,
    n_cell_types: int = 3,
    doses: tuple = (10.0, 100.0, 1000.0, 10000.0),
    cells_per_condition: int = 20,
    n_control: int = 80,
    responsive: float = 0.3,
    depth: float = 2000.0,
    seed: int = 0,
) -> SimulatedScreen:
    """A sciplex-style drug screen (obs `drug`, `dose`, `cell_type`; controls are `control` at
    dose 0) whose truth is known: drug d at dose x shifts the log means of cell type c by
    sensitivity_c x hill_d(x) x program_d, where hill_d(x) = x^h / (x^h + EC50_d^h) and program_d
    is a fixed random projection of d's Morgan fingerprint onto the responsive genes, so that
    chemically similar drugs have similar programs.

    Args:
        smiles: drug name -> SMILES (RDKit must parse each).
        genes: the gene symbols (default: the first `n_genes` usable human symbols).
        responsive: share of genes that respond to drugs.
        depth: mean counts per cell.

    Returns the AnnData and the shifts, keyed `drug|dose|cell_type`.
    """
    rng = np.random.default_rng(seed)
    genes = list(genes) if genes is not None else human_gene_symbols(n_genes)
    prints = fingerprints(smiles)
    drugs = sorted(prints)
    bits = np.stack([prints[d] for d in drugs])
    projection = rng.normal(0.0, 1.0, (bits.shape[1], len(genes))) * (rng.random(len(genes)) < responsive)
    programs = (bits - bits.mean(0)) @ projection
    programs /= np.sqrt(np.mean(programs[:, programs.any(0)] ** 2, axis=1, keepdims=True))
    programs = 1.5 * np.tanh(programs / 2.0)  # about 0.6 log units (RMS), none beyond 1.5: screens' sizes
    ec50 = 10 ** rng.uniform(np.log10(doses[0]) + 0.5, np.log10(doses[-1]) - 0.5, len(drugs))
    types = [f"type{k}" for k in range(n_cell_types)]
    sensitivity = np.linspace(0.6, 1.4, n_cell_types)
    base = rng.normal(0.0, 1.0, len(genes))
    bases = {t: base + rng.normal(0.0, 0.4, len(genes)) for t in types}
    shifts, rows = {}, []
    for k, cell_type in enumerate(types):
        rows += [("control", 0.0, cell_type, np.zeros(len(genes)))] * n_control
        for i, drug in enumerate(drugs):
            for dose in doses:
                shift = sensitivity[k] * dose**1.5 / (dose**1.5 + ec50[i] ** 1.5) * programs[i]
                shifts[f"{drug}|{dose:g}|{cell_type}"] = shift
                rows += [(drug, dose, cell_type, shift)] * cells_per_condition
    log_means = np.stack([bases[t] + s for _, _, t, s in rows])
    log_means += np.log(depth) - np.log(np.exp(log_means).sum(1, keepdims=True))
    counts = rng.poisson(np.exp(log_means) * rng.lognormal(0.0, 0.2, (len(rows), 1)))
    obs = pd.DataFrame(
        {
            "drug": pd.Categorical([r[0] for r in rows]),
            "dose": [r[1] for r in rows],
            "cell_type": pd.Categorical([r[2] for r in rows]),
        },
        index=[f"cell_{i}" for i in range(len(rows))],
    )
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    return SimulatedScreen(adata, shifts)
