"""Each modality's standard low-dimensional view, fitted on training cells only and applied to
every cell: RNA as PCA of log-normalised expression over the most variable genes (Seurat's and
scanpy's default), proteins as CLR values (per cell: log1p minus the cell's mean over the panel,
as CITE-seq analyses and TotalVI's evaluations use) or their PCA, chromatin as LSI (TF-IDF,
then a truncated SVD with its first component dropped, since it follows sequencing depth:
Signac's and ArchR's recipe).

The CLR is a function of each cell alone, so it leaks nothing between cells; everything fitted
across cells (genes, PCA, IDF, SVD) sees the training cells alone.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from celltron.preprocessing import PCA_TOP_GENES, fit_pca, log_normalise, variable_genes


def clr(counts) -> np.ndarray:
    """(cells, proteins) CLR: log1p(counts) minus the cell's mean log1p over the panel."""
    dense = np.log1p(counts.toarray() if sp.issparse(counts) else np.asarray(counts, dtype=np.float64))
    return dense - dense.mean(axis=1, keepdims=True)


class RnaPca:
    """PCA of log-normalised expression over the most variable genes, both chosen on the cells
    it is fitted on; `transform` applies it to any cells over the same genes (log-normalising is
    per cell, so new cells need nothing else)."""

    def __init__(self, counts: sp.csr_matrix, components: int, seed: int, top_genes: int = PCA_TOP_GENES):
        normalised = log_normalise(counts)
        self.genes = variable_genes(normalised, top_genes)
        self.pca = fit_pca(normalised[:, self.genes], components, seed)

    def transform(self, counts: sp.csr_matrix) -> np.ndarray:
        return self.pca.transform(log_normalise(counts)[:, self.genes])


def rna_pca(counts: sp.csr_matrix, train: np.ndarray, components: int, seed: int, top_genes: int = PCA_TOP_GENES) -> np.ndarray:
    """Every cell's PCA coordinates (float64), genes and components chosen on the `train` cells."""
    return RnaPca(counts[train], components, seed, top_genes).transform(counts)


def protein_pca(counts, train: np.ndarray, components: int, seed: int) -> np.ndarray:
    """PCA of CLR values (fitted on the `train` cells); at most panel − 1 components."""
    values = clr(counts)
    pca = fit_pca(values[train], min(components, values.shape[1] - 1), seed)
    return pca.transform(values)


def atac_lsi(counts: sp.csr_matrix, train: np.ndarray, components: int, seed: int) -> np.ndarray:
    """LSI: binarised peaks, term frequency x log(1 + cells / cells open) over the `train` cells'
    peaks (peaks never open in training are dropped), log1p of 10^4 x that, a truncated SVD fitted
    on the training cells with its first component dropped; rows scaled to unit length."""
    from sklearn.decomposition import TruncatedSVD

    binary = counts.tocsr().copy()
    binary.data = np.ones_like(binary.data, dtype=np.float64)
    open_in_training = np.asarray(binary[train].sum(axis=0)).ravel()
    peaks = np.flatnonzero(open_in_training > 0)
    binary = binary[:, peaks]
    idf = np.log1p(len(train) / open_in_training[peaks])
    per_cell = np.maximum(np.asarray(binary.sum(axis=1)).ravel(), 1)
    tfidf = sp.diags(1.0 / per_cell) @ binary @ sp.diags(idf)
    tfidf.data = np.log1p(tfidf.data * 1e4)
    n = min(components + 1, len(peaks) - 1, len(train) - 1)
    svd = TruncatedSVD(n, algorithm="arpack", random_state=seed).fit(tfidf[train])
    lsi = svd.transform(tfidf)[:, 1:]
    return lsi / np.maximum(np.linalg.norm(lsi, axis=1, keepdims=True), 1e-12)


def modality_view(
    modality: str, counts, train: np.ndarray, components: int, seed: int, top_genes: int = PCA_TOP_GENES
) -> np.ndarray:
    """The modality's view used by the alignment and joint-embedding baselines."""
    if modality == "rna":
        return rna_pca(counts, train, components, seed, top_genes)
    if modality == "adt":
        return protein_pca(counts, train, components, seed)
    return atac_lsi(counts, train, components, seed)


def standardised(view: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Columns centred on the training cells and the block scaled so its training cells have total
    variance 1: blocks of different modalities then weigh alike when concatenated."""
    centred = view - view[train].mean(0)
    scale = np.sqrt(max(float((centred[train] ** 2).sum(1).mean()), 1e-24))
    return centred / scale
