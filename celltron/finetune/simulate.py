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


@dataclass
class SimulatedScreen:
    """The AnnData and its ground truth: log-mean shift of every perturbation (genes,)."""

    adata: ad.AnnData
    shifts: dict[str, np.ndarray]


def human_gene_symbols(n: int) -> list[str]:
    """`n` human gene symbols that map to Ensembl IDs with Geneformer tokens (so any celltron
    model can tokenise the simulated cells)."""
    from celltron.corpus.genes import ensembl_to_symbol
    from celltron.tokenizers.vocab import GeneVocab

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
    raise ValueError(f"only {len(chosen)} usable human gene symbols, asked for {n}")


def simulate_screen(n_genes: int = 120, n_targets: int = 12, n_combos: int = 16, cells_per_perturbation: int = 60,
                    n_control: int = 300, interaction: float = 0.5, depth: float = 2000.0, seed: int = 0) -> SimulatedScreen:
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
    pairs = [(a, b) for j, a in enumerate(targets) for b in targets[j + 1:]]
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
