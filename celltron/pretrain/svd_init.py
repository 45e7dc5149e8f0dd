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
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from celltron.corpus.store import Corpus, log_normalised_cells
from celltron.preprocessing import FrequentDirections

log = logging.getLogger(__name__)


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
    for block in log_normalised_cells(corpus, "train", max_cells, block_cells=sketch.rows):
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
