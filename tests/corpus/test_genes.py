import pytest

from celltron.corpus.genes import GeneMappingError, infer_species, is_mitochondrial, map_genes


def test_species_from_ensembl_prefix():
    assert infer_species(["ENSG00000141510", "ENSG00000075624"], "x") == "human"
    assert infer_species(["ENSMUSG00000059552", "ENSMUSG00000029580"], "x") == "mouse"


def test_species_from_symbol_case():
    assert infer_species(["TP53", "ACTB", "CD3E", "RP11-34P13.7"], "x") == "human"
    assert infer_species(["Trp53", "Actb", "Cd3e", "Gm37381"], "x") == "mouse"


def test_species_refuses_to_guess_when_unclear():
    with pytest.raises(GeneMappingError, match="--species"):
        infer_species(["TP53", "ACTB", "Trp53", "Actb"], "mixed.h5ad")


def test_human_symbols_map_through_geneformer_table_and_ids_lose_versions():
    mapping = map_genes(["TP53", "tp53", "ENSG00000075624.17", "NOT_A_GENE"], "human", "x")
    assert mapping.ensembl_ids.tolist() == ["ENSG00000141510", "ENSG00000141510", "ENSG00000075624", ""]
    assert mapping.n_unmapped == 1


def test_mouse_symbols_never_go_through_the_human_table():
    mapping = map_genes(["Trp53", "Actb", "TP53"], "mouse", "x")
    assert mapping.ensembl_ids[0] == "ENSMUSG00000059552"
    assert mapping.ensembl_ids[1] == "ENSMUSG00000029580"
    # an upper-case human symbol is not a mouse gene name; it must stay unmapped
    assert mapping.ensembl_ids[2] == ""


def test_other_species_ids_stay_unmapped():
    mapping = map_genes(["ENSMUSG00000059552", "ENSG00000141510"], "human", "x")
    assert mapping.ensembl_ids.tolist() == ["", "ENSG00000141510"]


def test_nothing_maps_is_an_error_that_names_the_fix():
    with pytest.raises(GeneMappingError, match="--gene-column"):
        map_genes(["foo", "bar"], "human", "lab.h5ad")


def test_mitochondrial_genes():
    flags = is_mitochondrial(["ENSG00000198712", "ENSG00000141510"], "human")
    assert flags.tolist() == [True, False]
    assert is_mitochondrial(["ENSMUSG00000064354"], "mouse").all()  # mt-Co2


def _through_coo(block, column_map, n_genes):
    """The re-keying as a COO matrix does it (duplicates summed, rows sorted): the reference."""
    import numpy as np
    import scipy.sparse as sp

    columns = column_map[block.indices]
    keep = columns >= 0
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    out = sp.coo_matrix(
        (np.rint(block.data[keep]).astype(np.int64), (rows[keep], columns[keep])), shape=(block.shape[0], n_genes)
    )
    out = out.tocsr()
    out.sum_duplicates()
    out.eliminate_zeros()
    return out


@pytest.mark.parametrize("numba", ["1", "0"], ids=["compiled", "numpy"])
@pytest.mark.parametrize("case", ["one_to_one", "reordered", "duplicates_and_unmapped", "unsorted_input", "float32_counts"])
def test_re_keying_a_block_onto_corpus_genes_matches_the_coo_reference(case, numba, monkeypatch):
    import numpy as np
    import scipy.sparse as sp

    from celltron.corpus.readers import to_corpus_genes

    monkeypatch.setenv("CELLTRON_NUMBA", numba)
    rng = np.random.default_rng(0)
    block = sp.random(200, 300, density=0.05, format="csr", random_state=1, data_rvs=lambda n: rng.integers(0, 9, n))
    if case == "float32_counts":  # counts stored as floats, as many .h5ad files hold them
        block = block.astype(np.float32)
    n_genes, column_map = 300, np.arange(300)
    if case == "reordered":
        column_map = rng.permutation(300)
    if case == "duplicates_and_unmapped":  # two symbols of one gene, genes with no Ensembl ID
        n_genes, column_map = 250, rng.integers(-1, 250, 300)
    if case == "unsorted_input":
        order = np.concatenate([rng.permutation(np.arange(a, b)) for a, b in zip(block.indptr[:-1], block.indptr[1:])])
        block = sp.csr_matrix((block.data[order], block.indices[order], block.indptr), shape=block.shape)
    got, want = to_corpus_genes(block, column_map, n_genes), _through_coo(block, column_map, n_genes)
    assert got.has_canonical_format and got.shape == want.shape
    for part in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(got, part), getattr(want, part))
    assert (got.data > 0).all()  # explicit zeros (count 0) dropped
