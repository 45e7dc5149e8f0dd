"""The expression preprocessing every baseline and evaluation shares, one copy each:
log-normalisation (scanpy's normalize_total to 10,000 counts per cell, then log1p), the most
variable genes, and the PCA baseline built on them.

numpy, scipy and (for PCA) scikit-learn only, so that the tokenizers may use it too.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4
PCA_COMPONENTS, PCA_TOP_GENES = 50, 2000


def log_normalise(counts, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """log1p(counts scaled to `target_sum` per cell), sparse, float64. Each value is divided by
    the cell's total / target_sum, the order of operations scanpy uses, so that selections built
    on it (highly variable genes) match scanpy's to the last bit; cells without counts stay zero.

    Args:
        counts: (cells, genes) raw counts, sparse or dense.
    """
    x = counts.tocsr() if sp.issparse(counts) else sp.csr_matrix(np.asarray(counts))
    totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    scale = np.where(totals > 0, totals / target_sum, 1.0)
    values = np.log1p(x.data / np.repeat(scale, np.diff(x.indptr)))
    return sp.csr_matrix((values, x.indices, x.indptr), shape=x.shape)


def variable_genes(normalised, n: int) -> np.ndarray:
    """Columns of the `n` genes of highest variance, in column order; genes that never vary are
    never chosen (so fewer than `n` may come back). n = 0: every column.

    Args:
        normalised: (cells, genes) log-normalised expression, sparse or dense.
    """
    if n == 0:
        return np.arange(normalised.shape[1])
    x = sp.csr_matrix(normalised) if not sp.issparse(normalised) else normalised
    mean = np.asarray(x.mean(axis=0)).ravel()
    variance = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    varying = int((variance > 0).sum())
    return np.sort(np.argsort(-variance, kind="stable")[: min(n, varying)])


def fit_pca(normalised, n_components: int, seed: int):
    """PCA by ARPACK, which takes the sparse matrix (centred implicitly) and computes only the
    leading components; it needs fewer components than genes and cells."""
    from sklearn.decomposition import PCA

    components = min(n_components, normalised.shape[1] - 1, normalised.shape[0] - 1)
    return PCA(components, svd_solver="arpack", random_state=seed).fit(normalised)


def pca_baseline(counts, n_components: int = PCA_COMPONENTS, top_genes: int = PCA_TOP_GENES, seed: int = 0) -> np.ndarray:
    """The cells' PCA embedding: log-normalised expression over the most variable genes, reduced
    by PCA — the simple baseline every cell embedding is compared with.

    Args:
        counts: (cells, genes) raw counts.
    Returns:
        (cells, components) float32.
    """
    normalised = log_normalise(counts)
    chosen = normalised[:, variable_genes(normalised, top_genes)]
    return fit_pca(chosen, n_components, seed).transform(chosen).astype(np.float32)
