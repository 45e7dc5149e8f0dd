"""Multi-modal inputs on real paired data (TEA-seq PBMC RNA + 46 proteins, SNARE-seq mouse cortex
RNA + ATAC peaks, trimmed to 300 cells): protein names, peak bins, genome builds, and the three
ways in (paired files, MuData .h5mu, a 10x .h5 with several feature types)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltron.corpus.modalities import join_cells, modality_name, open_multimodal, read_source_rows
from celltron.corpus.peaks import bin_counts, common_build, genome_build, parse_peaks, peak_bins
from celltron.corpus.proteins import antigen_table, canonical_antigen, canonical_proteins
from celltron.corpus.readers import check_raw_counts
from celltron.errors import InputError
from tests.conftest import shared_file
from tests.corpus.helpers import write_10x_h5

TEASEQ_RNA = "multiomics/teaseq_pbmc_300cells_rna.h5ad"
TEASEQ_ADT = "multiomics/teaseq_pbmc_300cells_adt.h5ad"
SNARE_RNA = "multiomics/snareseq_mouse_cortex_300cells_rna.h5ad"
SNARE_ATAC = "multiomics/snareseq_mouse_cortex_300cells_atac.h5ad"


@pytest.fixture(scope="module")
def teaseq():
    return ad.read_h5ad(shared_file(TEASEQ_RNA)), ad.read_h5ad(shared_file(TEASEQ_ADT))


@pytest.fixture(scope="module")
def snareseq():
    return ad.read_h5ad(shared_file(SNARE_RNA)), ad.read_h5ad(shared_file(SNARE_ATAC))


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


# ---------------------------------------------------------------- protein names


def test_the_teaseq_panel_maps_every_antigen_to_a_canonical_name(teaseq):
    names = canonical_proteins(teaseq[1].var_names, "teaseq adt")
    assert names.unknown == ()
    assert names.renamed() == {
        "FceRI": "FceRIa",
        "HLA.DR": "HLA-DR",
        "IgG1.K.Isotype.Control": "Isotype-IgG1-kappa",
        "TCR.Va24.Ja18": "TCR-Va24-Ja18",
        "TCR.Va7.2": "TCR-Va7.2",
        "TCR.a.b": "TCRab",
        "TCR.g.d": "TCRgd",
    }
    assert names.genes[list(names.names).index("CD8a")] == ("CD8A",)


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("CD8", "CD8a"),  # the antigen most "CD8" antibodies (SK1, RPA-T8) bind
        ("cd8A", "CD8a"),
        ("CD3_UCHT1_TotalSeqB", "CD3"),  # clone and product dropped
        ("TotalSeq-C0049 CD3", "CD3"),
        ("CD4-RPA-T4", "CD4"),
        ("HLA-DR-L243", "HLA-DR"),
        ("ADT_CD45RA", "CD45RA"),  # not CD45: an isoform is its own antigen
        ("anti-human CD16", "CD16"),
        ("PD-1", "CD279"),
        ("CD279 (PD-1)", "CD279"),
        ("Mouse IgG2a, κ isotype Ctrl", "Isotype-Mouse-IgG2a-kappa"),
        ("rat IgG2b Isotype Control", "Isotype-Rat-IgG2b"),
    ],
)
def test_spellings_of_one_antigen_meet(name, canonical):
    assert canonical_antigen(name)[0] == canonical


def test_unknown_proteins_are_kept_verbatim_and_reported():
    names = canonical_proteins(["CD4", "MyLabAntibody-7"])
    assert list(names.canonical) == ["CD4", "MyLabAntibody-7"] and names.unknown == ("MyLabAntibody-7",)


def test_one_antigen_twice_in_a_panel_is_refused_naming_both():
    with pytest.raises(InputError, match=r"'CD8' and 'CD8a_RPA-T8' are both the antigen CD8a"):
        canonical_proteins(["CD8", "CD4", "CD8a_RPA-T8"], "panel.h5ad")


def test_the_bundled_table_has_no_ambiguous_alias():
    table = antigen_table()  # loading checks that no two antigens share a key
    assert len({a.name for a in table.values()}) > 140 and table["CD45RA"].genes == ("PTPRC",)


# ---------------------------------------------------------------- peaks and genome builds


def test_snareseq_peaks_sum_into_fixed_bins_without_losing_a_count(snareseq):
    atac = snareseq[1]
    bins = peak_bins(atac.var_names, 5000, "snareseq atac")
    binned = bin_counts(sp.csr_matrix(atac.X), bins)
    assert binned.shape == (atac.n_obs, len(bins.bins)) and len(bins.bins) < atac.n_vars
    assert np.array_equal(np.asarray(binned.sum(1)).ravel(), np.asarray(atac.X.sum(1)).ravel())
    assert np.issubdtype(binned.dtype, np.integer)
    chrom, start, end = parse_peaks(atac.var_names[:1])
    middle = (start[0] + end[0]) // 2
    assert bins.bins[bins.peak_bin[0]] == f"{chrom[0]}:{middle // 5000 * 5000}-{middle // 5000 * 5000 + 5000}"
    # genomic order: chromosomes by number, then X; positions ascending within one
    names = list(bins.bins)
    assert names[0].startswith("chr1:") and names[-1].startswith("chrX:")
    # the same peaks in another order give the same bins (a shared vocabulary)
    again = peak_bins(atac.var_names[::-1], 5000)
    assert list(again.bins) == names


def test_peak_spellings_and_refusals():
    chrom, start, end = parse_peaks(["chr1:100-200", "2_5_10", "MT-1-2", "chrUn_GL000220v1_100_200"])
    assert list(chrom) == ["chr1", "chr2", "chrM", "chrUn_GL000220v1"] and list(start) == [100, 5, 1, 100]
    with pytest.raises(InputError, match=r"2 peak names are not genomic intervals.*'CD4'"):
        parse_peaks(["chr1:1-2", "CD4", "chr1:9-3"], "adt.h5ad")
    with pytest.raises(InputError, match="bin size"):
        peak_bins(["chr1:1-2"], 0)


def test_genome_builds_are_named_one_way_and_never_mixed():
    assert genome_build("GRCm38") == "mm10" and genome_build("hg38") == "hg38"
    assert common_build({"a.h5": "GRCh38", "b.h5ad": None}) == "hg38"
    assert common_build({"b.h5ad": None}, given="mm10") == "mm10"
    with pytest.raises(InputError, match="different genome builds"):
        common_build({"a.h5": "GRCh38", "b.h5": "hg19"})
    with pytest.raises(InputError, match="pass --genome"):
        common_build({"b.h5ad": None})
    with pytest.raises(InputError, match="--genome mm10 disagrees"):
        common_build({"a.h5": "GRCh38"}, given="mm10")
    with pytest.raises(InputError, match="unknown genome build 'hg37'"):
        genome_build("hg37")


# ---------------------------------------------------------------- the three ways in


def test_paired_files_join_on_cell_names_whatever_their_order(teaseq, tmp_path):
    rna, adt = teaseq
    shuffled = adt[np.random.default_rng(1).permutation(adt.n_obs)].copy()
    shuffled.write_h5ad(tmp_path / "adt.h5ad")
    joined = open_multimodal(modalities={"ADT": tmp_path / "adt.h5ad", "rna": shared_file(TEASEQ_RNA)})
    try:
        assert joined.modalities == ["rna", "adt"] and list(joined.cell_names) == list(rna.obs_names)
        assert joined.mask().all()
        for start, stop in ((0, 100), (100, 300)):
            assert np.array_equal(dense(joined.read_cells("adt", start, stop)), dense(adt.X[start:stop]))
            assert np.array_equal(dense(joined.read_cells("rna", start, stop)), dense(rna.X[start:stop]))
    finally:
        joined.close()


def test_unmatched_cells_are_refused_with_counts_unless_mosaic(teaseq, tmp_path):
    rna, adt = teaseq
    adt[10:].copy().write_h5ad(tmp_path / "adt.h5ad")  # 10 cells have no proteins
    rna[:-5].copy().write_h5ad(tmp_path / "rna.h5ad")  # 5 cells have no RNA
    files = {"rna": tmp_path / "rna.h5ad", "adt": tmp_path / "adt.h5ad"}
    with pytest.raises(InputError, match=r"rna.h5ad \(rna\) lacks 5 of the 300 cells; .*adt.h5ad \(adt\) lacks 10 of the 300"):
        open_multimodal(modalities=files)
    mosaic = open_multimodal(modalities=files, mosaic=True)
    try:
        mask = mosaic.mask()
        assert mosaic.n_cells == 300 and mask[:10, 1].sum() == 0 and mask[10:, 1].all()
        assert mask[:, 0].sum() == 295
        block = dense(mosaic.read_cells("adt", 0, 20))
        assert (block[:10] == 0).all() and np.array_equal(block[10:], dense(adt.X[10:20]))
    finally:
        mosaic.close()


def test_a_mudata_file_reads_as_mudata_sees_it(snareseq, tmp_path):
    import mudata

    mudata.set_options(pull_on_update=False)  # the coming default; no FutureWarning
    rna, atac = snareseq
    atac = atac.copy()
    atac.uns["genome"] = "mm10"
    path = tmp_path / "snare.h5mu"
    mudata.MuData({"rna": rna, "atac": atac}).write_h5mu(path)
    whole = mudata.read_h5mu(path)
    opened = open_multimodal(path)
    try:
        assert opened.modalities == ["rna", "atac"] and opened.genome == "mm10" and opened.mask().all()
        for modality in ("rna", "atac"):
            expected = whole.mod[modality]
            assert list(opened.sources[modality].gene_names) == list(expected.var_names)
            assert np.array_equal(dense(opened.read_cells(modality, 0, 300)), dense(expected.X))
    finally:
        opened.close()


def test_a_10x_h5_with_several_feature_types_splits_into_modalities(teaseq, tmp_path):
    rna, adt = teaseq
    both = ad.concat([rna, adt], axis=1)
    kinds = ["Gene Expression"] * rna.n_vars + ["Antibody Capture"] * adt.n_vars
    write_10x_h5(both, tmp_path / "feature_barcoding.h5", np.asarray(both.var_names), kinds)
    opened = open_multimodal(tmp_path / "feature_barcoding.h5")
    try:
        assert opened.modalities == ["rna", "adt"] and opened.sources["adt"].modality == "adt"
        assert list(opened.sources["adt"].gene_names) == list(adt.var_names)
        assert np.array_equal(dense(opened.read_cells("adt", 50, 120)), dense(adt.X[50:120]))
    finally:
        opened.close()


def test_normalised_protein_counts_are_refused_naming_file_and_modality(teaseq, tmp_path):
    rna, adt = teaseq
    clr = adt.copy()
    clr.X = np.log1p(dense(adt.X).astype(np.float32))
    clr.write_h5ad(tmp_path / "adt_clr.h5ad")
    opened = open_multimodal(modalities={"rna": shared_file(TEASEQ_RNA), "protein": tmp_path / "adt_clr.h5ad"})
    try:
        with pytest.raises(InputError, match=r"adt_clr.h5ad \(modality adt\): .*non-integer values.*feature 'CD11c'"):
            source = opened.sources["adt"]
            check_raw_counts(sp.csr_matrix(source.read_rows(0, 50)), source, 0)
    finally:
        opened.close()


def test_a_count_the_corpus_cannot_hold_is_refused_not_wrapped():
    from pathlib import Path

    import pandas as pd

    from celltron.corpus.readers import Source

    block = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 3e9]]))
    names, cells = np.array(["A", "B"]), np.array(["c0", "c1"])
    source = Source(Path("big.mtx"), "big", "X", names, cells, pd.DataFrame(), lambda start, stop: block)
    with pytest.raises(InputError, match=r"big.mtx: --layer X holds counts above 2,147,483,647.*cell 'c1', gene 'B'"):
        check_raw_counts(block, source, 0)
    check_raw_counts(sp.csr_matrix(np.array([[2.0**31 - 1]])), source, 0)  # the largest int32 is kept


def test_bad_modality_input_is_refused_clearly(tmp_path, teaseq):
    with pytest.raises(InputError, match="unknown modality 'spatial'"):
        modality_name("spatial", "--modality spatial=x.h5ad")
    with pytest.raises(InputError, match="occur more than once"):
        join_cells({"rna": np.array(["a", "a"]), "adt": np.array(["a"])}, {"rna": tmp_path / "r", "adt": tmp_path / "a"}, False)
    with pytest.raises(InputError, match="either one multi-modal file"):
        open_multimodal()
    with pytest.raises(InputError, match="not a multi-modal file"):
        open_multimodal(shared_file(TEASEQ_RNA))


def test_scattered_rows_are_read_in_the_order_asked(teaseq, tmp_path):
    from celltron.corpus.readers import open_source

    source = open_source(shared_file(TEASEQ_ADT))
    try:
        rows = np.array([299, 0, 5, 298, 7, 150])
        assert np.array_equal(dense(read_source_rows(source, rows)), dense(teaseq[1].X[rows]))
    finally:
        source.close()
