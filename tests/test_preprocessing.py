"""The one copy of the preprocessing every baseline shares. Its log-normalisation is checked
against scanpy to the last bit in tests/tokenizers/test_hvg.py."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from celltron.preprocessing import log_normalise, pca_baseline, variable_genes


def test_log_normalise_scales_each_cell_to_ten_thousand_and_keeps_empty_cells_zero():
    counts = sp.csr_matrix(np.array([[1, 3, 0], [0, 0, 0], [2, 2, 4]], dtype=np.float32))
    normalised = log_normalise(counts)
    assert sp.issparse(normalised) and normalised.dtype == np.float64
    np.testing.assert_allclose(np.expm1(normalised.toarray()).sum(1), [1e4, 0, 1e4])
    np.testing.assert_array_equal(log_normalise(counts.toarray()).toarray(), normalised.toarray())  # dense in, same out


def test_variable_genes_come_in_column_order_and_never_pick_a_constant_gene():
    x = np.array([[0.0, 5, 1, 2], [0, 1, 1, 0], [0, 9, 1, 4]])
    assert variable_genes(x, 2).tolist() == [1, 3]  # highest variances, in column order
    assert variable_genes(sp.csr_matrix(x), 10).tolist() == [1, 3]  # constant columns 0 and 2 never chosen
    assert variable_genes(x, 0).tolist() == [0, 1, 2, 3]  # 0: every gene


def test_pca_baseline_gives_one_row_per_cell():
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(1.0, size=(40, 30)).astype(np.float32))
    embedding = pca_baseline(counts, n_components=5, top_genes=20)
    assert embedding.shape == (40, 5) and embedding.dtype == np.float32
