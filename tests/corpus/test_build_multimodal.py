"""Multi-modal corpora from real paired data (TEA-seq RNA + proteins, SNARE-seq RNA + ATAC, 300
cells each): every modality round-trips exactly, shards open with mudata, mosaic cells keep a
mask, bad input leaves nothing behind, and the stream yields every modality of a cell."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltron.cli import main as celltron
from celltron.corpus.build_multimodal import build_multimodal_corpus
from celltron.corpus.options import BuildOptions
from celltron.corpus.peaks import bin_counts, peak_bins
from celltron.corpus.proteins import canonical_proteins
from celltron.corpus.readers import open_mapped_source
from celltron.corpus.store import Corpus
from celltron.corpus.stream import CorpusStream, collate_cells
from celltron.errors import InputError
from tests.conftest import shared_file
from tests.corpus.test_modalities import SNARE_ATAC, SNARE_RNA, TEASEQ_ADT, TEASEQ_RNA

QUIET = dict(progress=False, val_fraction=0.1)


def corpus_cells(corpus: Corpus, modality: str) -> dict[str, dict[str, int]]:
    """{cell name: {feature name: count}} of one modality over every shard of both splits."""
    import zarr

    names = corpus.feature_names(modality)
    cells = {}
    for split in ("train", "val"):
        for index, record in enumerate(corpus.shards(split)):
            reader = corpus.open_shard(split, index)
            block = reader.read(0, record["n_cells"])
            reader.close()
            part = block if modality == "rna" else block.modalities[modality]
            group = zarr.open_group(corpus.zarr_store(record, "rna"), mode="r")
            cell_names = ad.io.read_elem(group["obs"]).index
            for row, cell in enumerate(cell_names):
                lo, hi = part.indptr[row], part.indptr[row + 1]
                cells[cell] = dict(zip(names[part.genes[lo:hi]], part.counts[lo:hi].tolist()))
    return cells


def input_cells(adata: ad.AnnData, feature_names) -> dict[str, dict[str, int]]:
    x = sp.csr_matrix(adata.X)
    out = {}
    for row, cell in enumerate(adata.obs_names):
        lo, hi = x.indptr[row], x.indptr[row + 1]
        totals: dict[str, int] = {}
        for feature, count in zip(np.asarray(feature_names)[x.indices[lo:hi]], x.data[lo:hi]):
            totals[feature] = totals.get(feature, 0) + int(count)
        out[cell] = {k: v for k, v in totals.items() if v}
    return out


@pytest.fixture(scope="module")
def teaseq_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "teaseq"
    files = {"rna": shared_file(TEASEQ_RNA), "adt": shared_file(TEASEQ_ADT)}
    manifest = build_multimodal_corpus(None, out, BuildOptions(**QUIET, obs_keys=("cell_type",)), modalities=files)
    return out, manifest


def test_proteins_and_rna_round_trip_exactly(teaseq_corpus):
    out, manifest = teaseq_corpus
    corpus = Corpus(out)
    assert corpus.modalities == ["rna", "adt"] and manifest["n_cells"] == 300
    adt = ad.read_h5ad(shared_file(TEASEQ_ADT))
    assert corpus_cells(corpus, "adt") == input_cells(adt, canonical_proteins(adt.var_names).canonical)
    mapped = open_mapped_source(shared_file(TEASEQ_RNA))  # symbols -> Ensembl IDs, as every verb maps them
    ensembl = mapped.mapping.ensembl_ids
    mapped.source.close()
    rna_in = ad.read_h5ad(shared_file(TEASEQ_RNA))
    expected = input_cells(rna_in[:, ensembl != ""], ensembl[ensembl != ""])
    assert corpus_cells(corpus, "rna") == expected
    assert (
        manifest["modalities"]["adt"]["features"]["genes"][manifest["modalities"]["adt"]["features"]["name"].index("CD8a")]
        == "CD8A"
    )
    assert corpus.validate() == []


def test_a_shard_opens_with_mudata(teaseq_corpus):
    import mudata

    mudata.set_options(pull_on_update=False)
    out, manifest = teaseq_corpus
    shard = mudata.read_zarr(str(out / manifest["splits"]["train"]["shards"][0]["path"]))
    assert list(shard.mod) == ["rna", "adt"] and shard.mod["adt"].n_vars == 46
    assert shard.obsm["adt"].all() and set(shard.obs["cell_type"].dropna()) <= set(manifest["obs_categories"]["cell_type"])


def test_the_stream_yields_every_modality_and_resumes_exactly(teaseq_corpus):
    out, _ = teaseq_corpus
    make = lambda: CorpusStream(str(out), infinite=False, block_size=32, buffer_size=64, rank=0, world_size=1)  # noqa: E731
    cells = list(make())
    assert len(cells) == 270 and all(c["adt_measured"] for c in cells)
    assert all(c["adt_counts"].sum() == c["adt_n_counts"] for c in cells)
    batch = collate_cells(cells[:8])
    assert batch["adt_offsets"][-1] == len(batch["adt_features"]) == sum(len(c["adt_features"]) for c in cells[:8])
    training = lambda: CorpusStream(str(out), block_size=32, buffer_size=64, rank=0, world_size=1)  # noqa: E731
    first = list(itertools.islice(training(), 200))
    resumed = training()
    resumed.load_state_dict(training().state_after_batches(10, 8, 0))  # 80 cells handed out
    rest = list(itertools.islice(resumed, 120))
    assert [c["cell_index"] for c in rest] == [c["cell_index"] for c in first[80:]]
    assert all(np.array_equal(a["adt_counts"], b["adt_counts"]) for a, b in zip(rest, first[80:]))
    # batches straight from the blocks: the same arrays collate_cells makes of the same cells
    batches = list(
        itertools.islice(CorpusStream(str(out), block_size=32, buffer_size=64, rank=0, world_size=1, batch_size=25), 8)
    )
    for i, batch in enumerate(batches):
        expected = collate_cells(first[25 * i : 25 * (i + 1)])
        assert set(batch) == set(expected) and all(np.array_equal(batch[k], expected[k]) for k in batch)


def test_a_mudata_file_with_atac_bins_on_its_genome(tmp_path):
    import mudata

    mudata.set_options(pull_on_update=False)
    rna, atac = ad.read_h5ad(shared_file(SNARE_RNA)), ad.read_h5ad(shared_file(SNARE_ATAC))
    atac.uns["genome"] = "GRCm38"
    mudata.MuData({"rna": rna, "atac": atac}).write_h5mu(tmp_path / "snare.h5mu")
    assert celltron(["corpus", "build", str(tmp_path / "snare.h5mu"), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    corpus = Corpus(tmp_path / "c")
    record = corpus.manifest["modalities"]["atac"]
    bins = peak_bins(atac.var_names)
    assert record["genome"] == "mm10" and list(corpus.feature_names("atac")) == list(bins.bins)
    expected = input_cells(ad.AnnData(bin_counts(sp.csr_matrix(atac.X), bins), obs=atac.obs), bins.bins)
    stored = corpus_cells(corpus, "atac")
    assert {c: stored[c] for c in expected if expected[c]} == {c: v for c, v in expected.items() if v}
    with pytest.raises(InputError, match="--genome hg38 disagrees"):
        build_multimodal_corpus([tmp_path / "snare.h5mu"], tmp_path / "c2", BuildOptions(progress=False, genome="hg38"))
    assert not (tmp_path / "c2").exists()


def test_mosaic_cells_are_refused_unless_asked_for_then_kept_with_a_mask(tmp_path):
    rna, adt = ad.read_h5ad(shared_file(TEASEQ_RNA)), ad.read_h5ad(shared_file(TEASEQ_ADT))
    adt[20:].copy().write_h5ad(tmp_path / "adt.h5ad")
    files = {"rna": shared_file(TEASEQ_RNA), "adt": tmp_path / "adt.h5ad"}
    with pytest.raises(InputError, match=r"adt.h5ad \(adt\) lacks 20 of the 300 cells.*--mosaic"):
        build_multimodal_corpus(None, tmp_path / "c", BuildOptions(**QUIET), modalities=files)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.partial*"))
    build_multimodal_corpus(None, tmp_path / "c", BuildOptions(**QUIET, mosaic=True), modalities=files)
    corpus = Corpus(tmp_path / "c")
    assert corpus.manifest["modalities"]["adt"]["n_cells_measured"] == 280
    cells = [c for split in ("train", "val") for c in CorpusStream(corpus, split, infinite=False, shuffle=False)]
    assert len(cells) == 300 and sum(not c["adt_measured"] for c in cells) == 20
    assert all(len(c["adt_counts"]) == 0 for c in cells if not c["adt_measured"])
    stored = corpus_cells(corpus, "adt")
    assert all(stored[str(n)] == {} for n in rna.obs_names[:20])
    proteins = canonical_proteins(adt.var_names).canonical
    assert stored == {**{str(n): {} for n in rna.obs_names[:20]}, **input_cells(adt[20:], proteins)}


def test_normalised_proteins_are_refused_and_nothing_is_written(tmp_path):
    adt = ad.read_h5ad(shared_file(TEASEQ_ADT))
    adt.X = np.log1p(adt.X.toarray().astype(np.float32))
    adt.write_h5ad(tmp_path / "adt_log.h5ad")
    with pytest.raises(InputError, match=r"adt_log.h5ad \(modality adt\).*non-integer"):
        build_multimodal_corpus(
            None,
            tmp_path / "c",
            BuildOptions(**QUIET),
            modalities={"rna": shared_file(TEASEQ_RNA), "adt": tmp_path / "adt_log.h5ad"},
        )
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.partial*"))


def test_the_cli_builds_paired_files_and_info_lists_each_modality(tmp_path, capsys):
    command = [
        "corpus",
        "build",
        "--modality",
        f"rna={shared_file(TEASEQ_RNA)}",
        "--modality",
        f"protein={shared_file(TEASEQ_ADT)}",
    ]
    assert celltron([*command, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "adt 46 antigens (300 cells)" in capsys.readouterr().out
    assert celltron(["corpus", "info", str(tmp_path / "c")]) == 0
    assert "modality adt: 46 features, measured in 300 cells" in capsys.readouterr().out
    assert celltron(["corpus", "validate", str(tmp_path / "c")]) == 0
