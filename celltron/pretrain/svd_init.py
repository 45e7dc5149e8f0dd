"""Gene-token embeddings initialised from the pretraining corpus (`model.init_gene_embeddings: svd`).

One pass over the first `model.svd_cells` cells of the corpus's training split, log-normalised
(`celltron.preprocessing.log_normalise`), feeds a Frequent Directions sketch (Liberty 2013) over
the genes that have a token. The sketch holds `rows = 2 x hidden` directions, so memory is
bounded by the sketch, never by the cells or by a genes x genes covariance: three rows x genes
float64 arrays during an update (29 MB each for hidden 128 over 14k genes), one sparse block of
`rows` cells and a (2 rows)² Gram matrix. Time is rows x genes x cells multiply-adds. Its
guarantee: 0 <= XᵀX - BᵀB <= ||X - X_k||²_F / (rows - k) in spectral norm, for every k < rows;
with k = hidden that is the energy outside the top `hidden` components, over hidden.

A gene's vector is its row of the top `hidden` right singular vectors of the gene-centred
matrix, times sqrt(singular value), rescaled so that the vectors' overall std is the std of the
random initialisation they replace (the family's own rule), so the optimiser sees the scale it
would have seen. Tokens without a gene expressed in those cells (specials, genes outside the
corpus or never counted) keep their random initialisation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits  # scikit-learn's dependency, so always installed

from celltron.corpus.store import Corpus
from celltron.preprocessing import log_normalise

log = logging.getLogger(__name__)
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


def gene_vectors(singular_values: np.ndarray, right_vectors: np.ndarray, dim: int) -> np.ndarray:
    """(n_columns, dim): each column's coordinates, right singular vectors x sqrt(singular value),
    zero-padded to `dim` when fewer components exist. The square root splits the spectrum between
    cells and genes evenly (X ≈ (U√S)(V√S)ᵀ), so that the leading programmes dominate the
    vectors without the tail being wiped out as it would be by V x S."""
    vectors = np.zeros((right_vectors.shape[1], dim))
    k = min(dim, len(singular_values))
    vectors[:, :k] = right_vectors[:k].T * np.sqrt(singular_values[:k])
    return vectors


def token_columns(corpus: Corpus, vocab) -> tuple[sp.csr_matrix, np.ndarray]:
    """The corpus genes -> sketch columns map, as a sparse 0/1 (corpus genes, columns) matrix, and
    the token id of each column. One column per token that has a corpus gene counted somewhere
    in the corpus (the manifest has a median for it); genes that share a token (cross-species
    orthologs) add up in its column: a cell is of one species, so it holds only one of them."""
    tokens = vocab.lookup_genes(corpus.gene_ids)
    counted = np.array([m is not None for m in corpus.manifest["genes"]["nonzero_median"]], dtype=bool)
    genes = np.flatnonzero((tokens >= 0) & counted)
    column_tokens, columns = np.unique(tokens[genes], return_inverse=True)
    mapping = sp.csr_matrix((np.ones(len(genes)), (genes, columns)), shape=(corpus.n_genes, len(column_tokens)))
    return mapping, column_tokens


def training_blocks(corpus: Corpus, max_cells: int, block_cells: int) -> Iterator[sp.csr_matrix]:
    """The first `max_cells` cells of the training split in shard order, log-normalised, as CSR
    blocks (cells, corpus genes). Cells were shuffled across inputs when the corpus was built,
    so the first cells are a random sample of the split, and every rank reads the same ones."""
    left = max_cells
    for index, record in enumerate(corpus.shards("train")):
        reader = corpus.open_shard("train", index)
        try:
            end = min(record["n_cells"], left)
            for start in range(0, end, block_cells):
                stop = min(start + block_cells, end)
                block = reader.read(start, stop)
                counts = sp.csr_matrix((block.counts, block.genes, block.indptr), shape=(len(block), corpus.n_genes))
                yield log_normalise(counts)
        finally:
            reader.close()
        left -= end
        if left == 0:
            return


@dataclass
class CorpusGeneVectors:
    """token_ids: the tokens that get a vector (genes expressed in the cells read).
    vectors: (tokens, dim), unscaled. singular_values: of the centred matrix, largest first.
    cells: cells read. seconds: the pass's wall time. relative_error: FD's bound on the error
    of the sketched covariance (||XᵀX - BᵀB||₂), over its top centred eigenvalue."""

    token_ids: np.ndarray
    vectors: np.ndarray
    singular_values: np.ndarray
    cells: int
    seconds: float
    relative_error: float


def corpus_gene_vectors(corpus: Corpus, vocab, dim: int, max_cells: int, sketch_rows: int | None = None) -> CorpusGeneVectors:
    """Gene vectors of width `dim` from one streaming pass over the corpus's training cells.

    Args:
        vocab: the run's tokenizer vocabulary (GeneVocab).
        dim: the model's hidden size.
        max_cells: at most this many training cells are read.
        sketch_rows: Frequent Directions' sketch size (default 2 x dim).
    """
    started = time.perf_counter()
    mapping, column_tokens = token_columns(corpus, vocab)
    if len(column_tokens) == 0:  # no corpus gene has a token: every row keeps its random init
        return CorpusGeneVectors(np.zeros(0, np.int64), np.zeros((0, dim)), np.zeros(0), 0, 0.0, 0.0)
    sketch = FrequentDirections(len(column_tokens), sketch_rows or 2 * dim)
    # blocks as tall as the sketch: the one dense product per update is then paid once per
    # sketch-size cells, and the Gram matrix stays (2 x rows)²
    for block in training_blocks(corpus, max_cells, block_cells=sketch.rows):
        sketch.update(block @ mapping)
    # centred: a gene's vector then says how it co-varies with the others; uncentred, the first
    # component is mean expression, shared by every well-expressed gene, and it would make all of
    # them look alike
    values, right = sketch.components(dim, centre=True)
    expressed = sketch.column_counts > 0
    top = values[0] ** 2 if len(values) else 0.0
    return CorpusGeneVectors(
        token_ids=column_tokens[expressed],
        vectors=gene_vectors(values, right, dim)[expressed],
        singular_values=values,
        cells=sketch.n_rows,
        seconds=time.perf_counter() - started,
        relative_error=sketch.shrinkage / top if top else 0.0,
    )


def write_gene_vectors(embedding: torch.nn.Embedding, token_ids: np.ndarray, vectors: np.ndarray) -> float:
    """Overwrite the rows `token_ids` of `embedding` with `vectors` scaled to the std of the rows'
    current (random) values; returns that std. The target is read from the weights rather than
    from a config field because each family initialises its gene embedding its own way (normal
    with initializer_range for Geneformer and GeneCompass, U(-0.1, 0.1) for scGPT). Writes in
    place, so an output layer tied to the embedding gets the same rows."""
    if len(token_ids) == 0:
        return float("nan")
    weight = embedding.weight
    index = torch.as_tensor(token_ids, dtype=torch.long, device=weight.device)
    with torch.no_grad():
        target = float(weight[index].float().std())
        spread = float(vectors.std())
        scaled = vectors * (target / spread) if spread > 0 else vectors
        weight[index] = torch.as_tensor(scaled, dtype=weight.dtype, device=weight.device)
    return target


def initialise_gene_embeddings(model, corpus: Corpus, vocab, max_cells: int) -> CorpusGeneVectors:
    """Set the gene-token rows of `model`'s input embedding from the corpus (see the module
    docstring). Every rank computes the same vectors from the same cells, so no collective is
    needed before the trainer starts (and DDP's start-up broadcast would agree anyway)."""
    embedding = model.get_input_embeddings()
    found = corpus_gene_vectors(corpus, vocab, embedding.weight.shape[1], max_cells)
    target = write_gene_vectors(embedding, found.token_ids, found.vectors)
    log.info(
        "gene embeddings: truncated SVD of %d training cells, %d gene tokens, std %.4g, %.1f s (FD error bound %.2g)",
        found.cells,
        len(found.token_ids),
        target,
        found.seconds,
        found.relative_error,
    )
    return found
