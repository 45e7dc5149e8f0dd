"""The expression preprocessing every baseline and evaluation shares, one copy each:
log-normalisation (scanpy's normalize_total to 10,000 counts per cell, then log1p), the most
variable genes, the PCA baseline built on them, and a streamed truncated SVD (Frequent
Directions) for matrices too large to hold: a corpus's cells.

numpy, scipy and (for PCA) scikit-learn only, so that the tokenizers may use it too.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits  # scikit-learn's dependency, so always installed

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


# ---------------------------------------------------------------- streamed truncated SVD

# eigenvalues below this share of the largest are numerical zeros of the sketch's Gram matrix
_RELATIVE_ZERO = 1e-12


def _small_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.linalg.eigh on one BLAS thread. The matrix is small (twice the sketch rows) and the
    symmetric eigen-solver gains little from threads, while on a node whose cores are busy
    (DataLoader workers, other ranks) threaded OpenBLAS waits on them: 512 x 512 took 6 s on two
    busy cores against 0.1 s on one thread."""
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.eigh(matrix)


class FrequentDirections:
    """A Frequent Directions sketch of a stream of rows over `n_columns` columns, with the column
    sums and the row count kept beside it so that its components can be those of the centred
    matrix.

    The sketch is stored as `rows` orthonormal directions with their weights (the sketch matrix
    is diag(weights) @ directions). Each update stacks the sketch over a block of new rows,
    eigen-decomposes their small Gram matrix, and keeps the top `rows` directions with their
    squared weights reduced by the next eigenvalue (the shrink that bounds the error). New rows
    may be sparse: they enter only through products with them, so a block of cells costs
    nnz x rows, and the one dense product per update is rows² x n_columns.
    """

    def __init__(self, n_columns: int, rows: int):
        if rows < 1 or n_columns < 1:
            raise ValueError(f"a sketch needs at least one row and one column, got {rows} x {n_columns}")
        self.rows, self.n_columns = rows, n_columns
        self.weights = np.zeros(0)
        self.directions = np.zeros((0, n_columns))
        self.column_sums = np.zeros(n_columns)
        self.column_counts = np.zeros(n_columns, dtype=np.int64)  # rows with a non-zero in the column
        self.n_rows = 0
        self.shrinkage = 0.0  # sum of the eigenvalues shrunk away: ||XᵀX - BᵀB||₂ is at most this

    def update(self, block) -> None:
        """Add the rows of `block` (dense or sparse, (rows, n_columns))."""
        block = sp.csr_matrix(block, dtype=np.float64)
        if block.shape[1] != self.n_columns:
            raise ValueError(f"block has {block.shape[1]} columns, the sketch {self.n_columns}")
        if block.shape[0] == 0:
            return
        self.n_rows += block.shape[0]
        self.column_sums += np.asarray(block.sum(axis=0)).ravel()
        self.column_counts += np.bincount(block.indices[block.data != 0], minlength=self.n_columns)
        eigenvalues, vectors = self._stacked_gram_eigen(block)
        self._shrink_to(eigenvalues, vectors, block)

    def _stacked_gram_eigen(self, block: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """Eigen-decomposition (largest first) of the Gram matrix of [sketch; block]. The sketch's
        own part is diag(weights²) since its directions are orthonormal; the rest involves the
        sparse block only."""
        cross = np.asarray((block @ self.directions.T).T) * self.weights[:, None]  # (sketch, block)
        gram = np.block(
            [[np.diag(self.weights**2), cross], [cross.T, (block @ block.T).toarray()]],
        )
        eigenvalues, vectors = _small_eigh(gram)
        return eigenvalues[::-1], vectors[:, ::-1]

    def _shrink_to(self, eigenvalues: np.ndarray, vectors: np.ndarray, block: sp.csr_matrix) -> None:
        keep = min(self.rows, len(eigenvalues))
        shrink = max(eigenvalues[keep], 0.0) if len(eigenvalues) > keep else 0.0
        top = eigenvalues[:keep]
        # directions of (numerically) zero energy are dropped: normalising them would amplify noise
        alive = (top > shrink) & (top > _RELATIVE_ZERO * max(eigenvalues[0], 0.0))
        top, mixing = top[alive], vectors[:, :keep][:, alive]
        n_sketch = len(self.weights)
        # unit directions of the stacked rows: mixingᵀ [diag(w) D; block] / sqrt(eigenvalue)
        from_sketch = (mixing[:n_sketch].T * self.weights) @ self.directions
        from_block = np.asarray((block.T @ mixing[n_sketch:]).T)
        self.directions = (from_sketch + from_block) / np.sqrt(top)[:, None]
        self.weights = np.sqrt(top - shrink)
        self.shrinkage += shrink

    def components(self, k: int, centre: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The top `k` singular values and right singular vectors (k, n_columns) of the sketched
        matrix, of the matrix with each column's mean subtracted when `centre` (fewer than `k`
        when the sketch holds fewer directions).

        Centring needs no second pass: (X - 1μᵀ)ᵀ(X - 1μᵀ) = XᵀX - nμμᵀ, and both terms live in
        the span of the sketch's directions and μ, so one small eigen-problem in that span gives
        the centred components; FD's error bound on XᵀX carries over unchanged.

        XᵀX is estimated as BᵀB + (shrinkage / 2) I, the Robust Frequent Directions correction
        (Luo et al. 2019): plain BᵀB underestimates every eigenvalue by up to the total shrink,
        which crushes the components near the sketch size (on planted modules with 16 rows,
        noise-level singular values of 30 came out as 8-10; with the correction, 30). The shift
        changes no direction, only the singular values that weight the gene vectors.
        """
        basis, energies = self.directions, self.weights**2
        if centre and self.n_rows:
            mean = self.column_sums / self.n_rows
            residual = mean - basis.T @ (basis @ mean)
            if np.linalg.norm(residual) > 1e-12 * max(np.linalg.norm(mean), 1e-300):
                basis = np.vstack([basis, residual / np.linalg.norm(residual)])
                energies = np.append(energies, 0.0)
        gram = np.diag(energies + self.shrinkage / 2)
        if centre and self.n_rows:
            coordinates = basis @ mean
            gram = gram - self.n_rows * np.outer(coordinates, coordinates)
        if len(basis) == 0:  # nothing but zeros was sketched
            return np.zeros(0), np.zeros((0, self.n_columns))
        eigenvalues, vectors = _small_eigh(gram)
        order = np.argsort(eigenvalues)[::-1][:k]
        values = np.sqrt(np.maximum(eigenvalues[order], 0.0))
        return values, vectors[:, order].T @ basis
