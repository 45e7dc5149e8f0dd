"""Gene knowledge as matrices aligned to a vocabulary, built from tables alone (no corpus):

- `grn_prior`: a spectral embedding (Laplacian eigenmaps: the eigenvectors of the normalised
  Laplacian with the smallest non-zero eigenvalues, scikit-learn's `spectral_embedding`) of the
  undirected graph of a TF-target table in TRRUST format, on its largest connected component
  (other genes get no row: an embedding cannot place a component that no edge ties to the rest).
  Genes that share a token (orthologs) are one node.
- `table_prior`: any gene x d matrix a lab brings (a CSV/TSV, first column gene symbols or
  Ensembl IDs), mapped to Ensembl IDs as corpus genes are, then to tokens; rows of genes that
  share a token are averaged.

Each matrix is scaled to an overall std of 1; tokens without a prior get zeros. Used by
`celltron priors build` (celltron.pretrain.priors, which adds the corpus's co-expression) for a
model's vocabulary, and by the drug task's similar_drugs kernel over drug targets
(celltron.finetune.drug.target_priors) for a vocabulary of every human gene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.corpus.genes import map_input_genes
from celltron.corpus.schema import sha256_file
from celltron.errors import ConfigError, InputError
from celltron.inputs import read_truth
from celltron.tokenizers.ortholog import align_prior_knowledge

DEFAULT_DIMS = 64


@dataclass
class Prior:
    """matrix: (vocab size, d) float32, zero rows where `has` is False. method, sources: for
    the manifest."""

    name: str
    matrix: np.ndarray
    has: np.ndarray
    method: dict
    sources: list = field(default_factory=list)


def unit_std(matrix: np.ndarray, has: np.ndarray) -> np.ndarray:
    """The covered rows scaled to an overall std of 1 (zero rows stay zero)."""
    spread = matrix[has].std() if has.any() else 0.0
    return (matrix / spread if spread > 0 else matrix).astype(np.float32)


# ---------------------------------------------------------------- grn


def grn_prior(
    path, vocab, dims: int = DEFAULT_DIMS, species: str | None = None, name: str = "grn", option: str = "--grn"
) -> Prior:
    """The spectral embedding of a TF-target table's graph over the vocabulary's tokens (module
    docstring). `species`: of the table's gene names (inferred when None)."""
    path = Path(path)
    edges = read_truth(path, option)
    names = np.unique(np.concatenate([edges.tf.to_numpy(str), edges.target.to_numpy(str)]))
    mapping = map_input_genes(names, species, f"{option} {path}", min_fraction=0.0)  # unmapped names are dropped
    ids, species = mapping.ensembl_ids, mapping.species
    token_of_name = dict(zip(names, vocab.lookup_genes(np.where(ids == "", "-", ids))))
    tf = edges.tf.map(token_of_name).to_numpy(np.int64)
    target = edges.target.map(token_of_name).to_numpy(np.int64)
    usable = (tf >= 0) & (target >= 0) & (tf != target)
    if not usable.any():
        raise InputError(
            f"{option} {path}: none of its {len(edges)} pairs joins two genes with a token in the {vocab.name} vocabulary "
            f"({species} names); check the table's species and the corpus's genes"
        )
    nodes, local = np.unique(np.concatenate([tf[usable], target[usable]]), return_inverse=True)
    n_edges = int(usable.sum())
    adjacency = sp.coo_matrix((np.ones(2 * n_edges), (local, np.roll(local, n_edges))), shape=(len(nodes),) * 2).tocsr()
    adjacency.data[:] = 1.0  # repeated pairs and both directions count once
    component = _largest_component(adjacency)
    if len(component) <= dims + 1:
        fix = (
            f"lower --dims below {len(component) - 1}"
            if len(component) > 2
            else f"the table barely overlaps the corpus's genes ({len(nodes)} of its genes have tokens): check its "
            "species (--grn-species) and gene names"
        )
        raise ConfigError(
            f"{option} {path}: its largest connected component has {len(component)} genes with tokens, too few for "
            f"{dims} dimensions; {fix}"
        )
    embedding = _spectral_embedding(adjacency[component][:, component], dims)
    matrix = np.zeros((len(vocab), dims))
    has = np.zeros(len(vocab), dtype=bool)
    matrix[nodes[component]] = embedding
    has[nodes[component]] = True
    method = {
        "kind": "grn",
        "algorithm": "spectral embedding of the undirected TF-target graph (normalised Laplacian; scikit-learn)",
        "component": "largest connected",
        "species": species,
        "nodes": int(len(nodes)),
        "nodes_embedded": int(len(component)),
        "edges_used": int((adjacency[component][:, component].nnz) // 2),
        "pairs_in_table": int(len(edges)),
    }
    sources = [{"path": str(path.resolve()), "sha256": sha256_file(path)}]
    return Prior(name, unit_std(matrix, has), has, method, sources)


def _largest_component(adjacency: sp.csr_matrix) -> np.ndarray:
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(adjacency, directed=False)
    return np.flatnonzero(labels == np.bincount(labels).argmax())


def _spectral_embedding(adjacency: sp.csr_matrix, dims: int) -> np.ndarray:
    from sklearn.manifold import spectral_embedding

    # a fixed start vector: the same table gives the same matrix
    return spectral_embedding(adjacency, n_components=dims, norm_laplacian=True, drop_first=True, random_state=0)


# ---------------------------------------------------------------- a lab's own table


def table_prior(path, vocab, name: str, species: str | None = None, option: str | None = None) -> Prior:
    """A gene x d table (CSV, or TSV for other suffixes; a header row; first column gene symbols
    or Ensembl IDs, the rest numbers) aligned to the vocabulary (module docstring)."""
    path = Path(path)
    flag = f"{option} {path}" if option else f"--table {name}={path}"
    if not path.is_file():
        raise InputError(f"{flag}: no such file; give a CSV/TSV with gene names in the first column and numbers after")
    table = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t")
    if table.shape[1] < 2 or table.empty:
        raise InputError(f"{flag}: expected a header row, then rows of a gene name and at least one number; got {table.shape}")
    values = table.iloc[:, 1:].apply(pd.to_numeric, errors="coerce")
    bad = values.columns[~np.isfinite(values.to_numpy(np.float64)).all(axis=0)].tolist()
    if bad:
        raise InputError(
            f"{flag}: column(s) {', '.join(map(str, bad[:5]))} hold non-numbers, blanks or infinities; every column "
            "after the first must hold finite numbers"
        )
    mapping = map_input_genes(table.iloc[:, 0].astype(str).to_numpy(), species, flag, min_fraction=0.0)
    ids, species = mapping.ensembl_ids, mapping.species
    mapped = ids != ""
    matrix, has = align_prior_knowledge(values.to_numpy(np.float64)[mapped], ids[mapped], vocab)
    if not has.any():
        raise InputError(f"{flag}: none of its {len(table)} genes has a token in the {vocab.name} vocabulary")
    method = {"kind": "table", "species": species, "rows_in_table": int(len(table)), "rows_mapped": int(mapped.sum())}
    return Prior(name, unit_std(matrix, has), has, method, [{"path": str(path.resolve()), "sha256": sha256_file(path)}])
