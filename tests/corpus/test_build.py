import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltron.corpus import BuildOptions, Corpus, build_corpus
from celltron.corpus.genes import GeneMappingError
from celltron.corpus.readers import InputError
from celltron.corpus.schema import CorpusFormatError
from celltron.corpus.stats import GeneStatistics

from .helpers import expected_counts, human_table, read_corpus, write_10x_h5, write_mtx_dir

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def pbmc_small(pbmc3k):
    """400 real PBMC cells, all genes, as an in-memory AnnData."""
    adata = ad.read_h5ad(pbmc3k)[:400].copy()
    adata.X = sp.csr_matrix(adata.X)
    return adata


def _ensembl_of(adata) -> list[str]:
    table = human_table()
    return [table.get(g.upper(), "") for g in adata.var["gene_symbol_original"]]


def _assert_round_trip(corpus_dir, adata, ensembl_of_gene):
    corpus = read_corpus(corpus_dir)
    expected = expected_counts(adata, ensembl_of_gene)
    got = pd.DataFrame(corpus.X.toarray(), index=corpus.obs_names, columns=corpus.var_names)
    assert sorted(got.index) == sorted(expected.index)
    got = got.loc[expected.index]
    assert set(expected.columns) <= set(got.columns)
    assert (got.loc[:, expected.columns].to_numpy() == expected.to_numpy()).all()
    assert got.drop(columns=expected.columns).to_numpy().sum() == 0


def test_round_trip_every_count_of_every_cell(tmp_path, pbmc_small):
    path = tmp_path / "pbmc.h5ad"
    # map on the original symbols, as users with made-unique names would pass --gene-column
    pbmc_small.write_h5ad(path)
    build_corpus([path], tmp_path / "c", BuildOptions(gene_column="gene_symbol_original", shard_size_mb=0.5, **QUIET))
    _assert_round_trip(tmp_path / "c", pbmc_small, _ensembl_of(pbmc_small))


def test_duplicate_symbols_are_summed(tmp_path, pbmc_small):
    adata = pbmc_small[:, :2000].copy()
    symbols = adata.var["gene_symbol_original"].to_numpy().copy()
    symbols[1] = symbols[0]  # two columns now name the same gene
    adata.var["gene_symbol_original"] = symbols
    adata.write_h5ad(tmp_path / "dup.h5ad")
    build_corpus(
        [tmp_path / "dup.h5ad"], tmp_path / "c", BuildOptions(gene_column="gene_symbol_original", val_fraction=0, **QUIET)
    )
    _assert_round_trip(tmp_path / "c", adata, _ensembl_of(adata))


def test_10x_h5_mtx_and_h5ad_give_the_same_corpus(tmp_path, pbmc_small):
    ids = np.array(_ensembl_of(pbmc_small), dtype=object)
    keep = ids != ""
    adata = pbmc_small[:, keep].copy()
    ids = ids[keep].astype(str)
    write_10x_h5(adata, tmp_path / "filtered_feature_bc_matrix.h5", ids)
    write_mtx_dir(adata, tmp_path / "mtx", ids)
    by_id = ad.AnnData(X=adata.X, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=ids))
    by_id.write_h5ad(tmp_path / "by_id.h5ad")
    sources = {"h5": "filtered_feature_bc_matrix.h5", "mtx": "mtx", "h5ad": "by_id.h5ad"}
    for name, source in sources.items():
        build_corpus([tmp_path / source], tmp_path / f"corpus-{name}", BuildOptions(val_fraction=0, **QUIET))
        _assert_round_trip_ids(read_corpus(tmp_path / f"corpus-{name}"), adata, ids)


def _assert_round_trip_ids(corpus, adata, ids):
    expected = expected_counts(adata, list(ids))
    got = pd.DataFrame(corpus.X.toarray(), index=corpus.obs_names, columns=corpus.var_names).loc[expected.index]
    assert (got.loc[:, expected.columns].to_numpy() == expected.to_numpy()).all()


@pytest.mark.parametrize("where", ["layer", "raw"])
def test_counts_from_a_layer_or_raw(tmp_path, pbmc_small, where):
    adata = pbmc_small[:, :3000].copy()
    counts = adata.X.copy()
    normalised = sp.csr_matrix(np.log1p(counts.multiply(1e4 / counts.sum(axis=1)).tocsr()))
    if where == "layer":
        adata.layers["counts"] = counts
        adata.X = normalised
        layer = "counts"
    else:
        adata.raw = adata
        adata.X = normalised
        layer = "raw"
    adata.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(InputError, match=f"--layer X holds non-integer.*{layer}"):
        build_corpus([tmp_path / "in.h5ad"], tmp_path / "bad", BuildOptions(gene_column="gene_symbol_original", **QUIET))
    build_corpus(
        [tmp_path / "in.h5ad"],
        tmp_path / "c",
        BuildOptions(layer=layer, gene_column="gene_symbol_original", val_fraction=0, **QUIET),
    )
    reference = pbmc_small[:, :3000].copy()
    _assert_round_trip(tmp_path / "c", reference, _ensembl_of(reference))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda x: x.multiply(0.5).tocsr(), "non-integer"),
        (lambda x: sp.csr_matrix(np.log1p(x.toarray())), "non-integer"),
        (lambda x: -x, "negative"),
        (lambda x: _with_value(x, np.nan), "NaN"),
    ],
)
def test_non_count_input_is_refused_naming_file_and_layer(tmp_path, pbmc_small, corrupt, message):
    adata = pbmc_small[:50, :2000].copy()
    adata.X = corrupt(sp.csr_matrix(adata.X, dtype=np.float32))
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(InputError, match=message) as error:
        build_corpus([tmp_path / "bad.h5ad"], tmp_path / "c", BuildOptions(**QUIET))
    assert "bad.h5ad" in str(error.value) and "--layer" in str(error.value)
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".c.partial-*"))


def _with_value(x, value):
    x = x.copy()
    x.data[3] = value
    return x


def test_unknown_layer_lists_available_ones(tmp_path, pbmc_small):
    pbmc_small[:20].write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match="no matrix for --layer counts.*available: X"):
        build_corpus([tmp_path / "a.h5ad"], tmp_path / "c", BuildOptions(layer="counts", **QUIET))


def test_unclear_species_and_unknown_format_are_refused(tmp_path, pbmc_small):
    adata = pbmc_small[:20, :200].copy()
    adata.var_names = [n.capitalize() if i % 2 else n for i, n in enumerate(adata.var_names)]
    adata.write_h5ad(tmp_path / "mixed.h5ad")
    with pytest.raises(GeneMappingError, match="mixed.h5ad.*--species"):
        build_corpus([tmp_path / "mixed.h5ad"], tmp_path / "c", BuildOptions(**QUIET))
    (tmp_path / "cells.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="cells.csv: unknown input format"):
        build_corpus([tmp_path / "cells.csv"], tmp_path / "c", BuildOptions(**QUIET))


def test_empty_cells_are_dropped_and_counted_and_qc_is_recorded(tmp_path, pbmc_small):
    adata = pbmc_small[:100].copy()
    x = adata.X.tolil()
    x[:5, :] = 0
    adata.X = x.tocsr()
    adata.write_h5ad(tmp_path / "a.h5ad")
    options = BuildOptions(min_genes=500, max_mito_fraction=0.05, weights={"a.h5ad": 2.0}, val_fraction=0, **QUIET)
    manifest = build_corpus([tmp_path / "a.h5ad"], tmp_path / "c", options)
    source = manifest["sources"][0]
    genes_per_cell = np.diff(adata.X.indptr)
    assert source["n_empty_dropped"] == 5
    kept = read_corpus(tmp_path / "c")
    assert source["n_cells_kept"] == kept.n_obs == 100 - 5 - source["n_qc_dropped"]
    assert source["n_qc_dropped"] >= int(((genes_per_cell > 0) & (genes_per_cell < 500)).sum())
    assert (np.diff(kept.X.indptr) >= 1).all()
    mito = kept.var["gene_symbol"].str.upper().str.startswith("MT-").to_numpy()
    assert (np.asarray(kept.X[:, mito].sum(axis=1)).ravel() <= 0.05 * kept.obs["n_counts"].to_numpy()).all()
    assert manifest["build"]["min_genes"] == 500 and manifest["build"]["max_mito_fraction"] == 0.05
    assert source["weight"] == 2.0


def test_shards_open_with_anndata_and_cells_mix_across_inputs(small_corpus):
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert len(manifest["splits"]["train"]["shards"]) > 3
    for record in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        shard = ad.read_zarr(small_corpus / record["path"])
        assert shard.n_obs == record["n_cells"] and shard.X.nnz == record["nnz"]
        assert shard.var_names.str.match(r"^ENS(MUS)?G\d{11}$").all()
        assert {"dataset", "species", "n_counts", "Annotation"} <= set(shard.obs.columns)
    first = ad.read_zarr(small_corpus / manifest["splits"]["train"]["shards"][0]["path"])
    assert first.obs["dataset"].nunique() >= 2  # neighbouring cells come from different inputs
    assert set(manifest["obs_categories"]["species"]) == {"human", "mouse"}


def test_validation_split_and_cell_names_are_unique(small_corpus):
    train, val = read_corpus(small_corpus, "train"), read_corpus(small_corpus, "val")
    total = train.n_obs + val.n_obs
    assert val.n_obs == round(total * 0.02)
    names = list(train.obs_names) + list(val.obs_names)
    assert len(set(names)) == len(names)


def test_clashing_cell_names_get_the_source_name(tmp_path, pbmc_small):
    pbmc_small[:30].write_h5ad(tmp_path / "a.h5ad")
    pbmc_small[:30].write_h5ad(tmp_path / "b.h5ad")
    build_corpus([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c", BuildOptions(val_fraction=0, **QUIET))
    names = read_corpus(tmp_path / "c").obs_names
    first = pbmc_small.obs_names[0]
    assert {f"{first}-a", f"{first}-b"} <= set(names) and len(set(names)) == 60


def test_shuffle_is_seeded(tmp_path, pbmc_small):
    pbmc_small[:200].write_h5ad(tmp_path / "a.h5ad")
    orders = []
    for name, seed in (("s1", 1), ("s1b", 1), ("s2", 2)):
        build_corpus([tmp_path / "a.h5ad"], tmp_path / name, BuildOptions(seed=seed, val_fraction=0, **QUIET))
        orders.append(list(read_corpus(tmp_path / name).obs_names))
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_gene_statistics_match_a_direct_computation(small_corpus):
    corpus = read_corpus(small_corpus)
    genes = Corpus(small_corpus).manifest["genes"]
    x = corpus.X.tocsc().astype(np.float64)
    n_counts = corpus.obs["n_counts"].to_numpy().astype(np.float64)
    for column in np.random.default_rng(0).choice(corpus.n_vars, 300, replace=False):
        gene = corpus.var_names[column]
        index = genes["ensembl_id"].index(gene)
        values = x[:, column]
        rows = values.indices
        assert genes["cells_expressing"][index] == len(rows)
        assert genes["count_sum"][index] == values.data.sum()
        normalised = values.data / n_counts[rows] * 10_000
        if len(rows) == 0:
            assert genes["nonzero_median"][index] is None
        else:
            assert genes["nonzero_median"][index] == pytest.approx(np.median(normalised), rel=1e-12)


def test_sketch_medians_are_within_the_stated_bound(pbmc3k):
    adata = ad.read_h5ad(pbmc3k)
    x = sp.csr_matrix(adata.X).astype(np.int64)
    n_counts = np.asarray(x.sum(axis=1)).ravel()
    exact, sketched = GeneStatistics(x.shape[1]), GeneStatistics(x.shape[1], exact_limit=100_000)
    for start in range(0, x.shape[0], 500):
        block = x[start : start + 500]
        exact.add(block, n_counts[start : start + 500])
        sketched.add(block, n_counts[start : start + 500])
    assert exact.exact and not sketched.exact
    a, b = exact.nonzero_medians(), sketched.nonzero_medians()
    seen = ~np.isnan(a)
    assert np.array_equal(seen, ~np.isnan(b))
    assert np.max(np.abs(b[seen] - a[seen]) / a[seen]) <= 0.005 + 1e-9


@pytest.mark.parametrize("numba", ["1", "0"], ids=["compiled", "numpy"])
@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_a_second_pass_makes_sketched_medians_exact_to_the_bit(pbmc3k, numba, dtype, monkeypatch):
    monkeypatch.setenv("CELLTRON_NUMBA", numba)  # the sketch keeps the backend it was made with
    adata = ad.read_h5ad(pbmc3k)
    x = sp.csr_matrix(adata.X).astype(dtype)
    n_counts = np.asarray(x.sum(axis=1)).ravel()
    blocks = [(x[start : start + 500], n_counts[start : start + 500]) for start in range(0, x.shape[0], 500)]
    exact, two_pass = GeneStatistics(x.shape[1], exact_limit=10**9), GeneStatistics(x.shape[1], exact_limit=100_000)
    for block in blocks:
        exact.add(*block)
        two_pass.add(*block)
    assert not two_pass.exact  # past the limit: the values went into the sketch
    np.testing.assert_array_equal(two_pass.nonzero_medians(lambda: iter(blocks)), exact.nonzero_medians())
    assert two_pass.describe_median() == {"method": "exact_two_pass"} and exact.describe_median() == {"method": "exact"}


def test_both_sketch_backends_bucket_a_zero_or_missing_total_alike(monkeypatch):
    """An n_counts of 0 (values inf) goes to the top bucket, a NaN one to the lowest, compiled
    or not: `celltron tokenize` takes n_counts from the file's obs, which may hold either."""
    from celltron.corpus.stats import LogBucketSketch

    block = sp.csr_matrix(np.array([[3, 0, 1], [2, 5, 0], [0, 1, 4]], dtype=np.int64))
    tables = {}
    for backend in ("1", "0"):
        monkeypatch.setenv("CELLTRON_NUMBA", backend)
        sketch = LogBucketSketch(3)
        with np.errstate(divide="ignore"):  # numpy's own warning for count / 0
            sketch.add_block(block, np.array([0.0, np.nan, 5.0]))
        tables[backend] = sketch.counts
    np.testing.assert_array_equal(tables["1"], tables["0"])
    top, bottom = tables["1"].shape[1] - 1, 0
    assert tables["1"][0, top] == 1 and tables["1"][2, top] == 1  # the first cell's two genes
    assert tables["1"][0, bottom] == 1 and tables["1"][1, bottom] == 1  # the second cell's


def test_the_compiled_middle_ranks_equal_numpys_median(monkeypatch):
    from celltron.corpus.stats import middle_of_ranks

    rng = np.random.default_rng(3)
    genes = np.concatenate([rng.integers(0, 50, 5_000), np.full(3_001, 7)])  # gene 7: a long group
    values = rng.integers(1, 20, len(genes)) / 7  # many ties
    totals = np.bincount(genes, minlength=60)  # genes 50-59 have no values
    want = np.array([np.median(values[genes == g]) if totals[g] else np.nan for g in range(60)])
    for backend in ("1", "0"):
        monkeypatch.setenv("CELLTRON_NUMBA", backend)
        np.testing.assert_array_equal(middle_of_ranks(genes, values, totals, np.zeros(60, dtype=np.int64)), want)
        # only each gene's values from rank 10 on, as a second pass keeps them
        keep = np.ones(len(values), dtype=bool)
        for g in range(50):
            mine = np.flatnonzero(genes == g)
            keep[mine[np.argsort(values[mine], kind="stable")[:10]]] = False
        below = np.where(totals > 0, 10, 0)
        np.testing.assert_array_equal(middle_of_ranks(genes[keep], values[keep], totals, below), want)


def test_both_backends_find_the_same_middle_buckets(monkeypatch):
    from celltron.corpus.stats import LogBucketSketch

    rng = np.random.default_rng(5)
    found = []
    for backend in ("1", "0"):
        monkeypatch.setenv("CELLTRON_NUMBA", backend)
        sketch = LogBucketSketch(300)
        sketch.counts[:] = (rng.random(sketch.counts.shape) < 0.01) * rng.integers(1, 9, sketch.counts.shape)
        rng = np.random.default_rng(5)  # the same table for both
        sketch.counts[0] = 0  # no values
        sketch.counts[1] = 0
        sketch.counts[1, 0] = 1  # one value, in the lowest bucket
        sketch.counts[2] = 0
        sketch.counts[2, [3, 9]] = 1  # two values: the middle ranks straddle two buckets
        found.append(sketch.middle_buckets())
    for compiled, numpy in zip(*found):
        np.testing.assert_array_equal(compiled, numpy)
    lower, upper, below = found[0]
    assert (lower[0], upper[0]) == (-1, -1)
    assert (lower[1], upper[1], below[1]) == (0, 0, 0)
    assert (lower[2], upper[2], below[2]) == (3, 9, 0)


@pytest.mark.parametrize("numba", ["1", "0"])
def test_rows_placed_from_a_piece_land_in_their_shard_rows(numba, monkeypatch):
    from celltron.corpus._gather import place_rows

    monkeypatch.setenv("CELLTRON_NUMBA", numba)
    whole = sp.random(40, 30, density=0.2, format="csr", random_state=2, dtype=np.float64)
    whole.data = np.ceil(whole.data * 9).astype(np.int32)
    whole.indices = whole.indices.astype(np.int32)
    order = np.random.default_rng(2).permutation(40)
    indptr = whole.indptr.astype(np.int64)
    indices, data = np.zeros(whole.nnz, np.int32), np.zeros(whole.nnz, np.int32)
    for part in np.array_split(order, 3):  # pieces hold shard rows in any order
        piece = whole[part]
        place_rows(indptr, part, piece.indptr.astype(np.int64), piece.indices, piece.data, indices, data)
    np.testing.assert_array_equal(indices, whole.indices)
    np.testing.assert_array_equal(data, whole.data)


def test_a_shard_with_a_repeated_or_missing_row_in_its_staging_files_is_refused(tmp_path):
    from celltron.corpus.build import _gather_bucket, spill_csr

    piece = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0]], dtype=np.int32))
    spill_csr(tmp_path / "a.csr", piece, rows=np.array([2, 0, 1]))
    shard = _gather_bucket([(tmp_path / "a.csr", 3)], 3, 3, discard=lambda path: None)
    np.testing.assert_array_equal(shard.toarray(), piece.toarray()[[1, 2, 0]])  # row k of the file is shard row rows[k]
    spill_csr(tmp_path / "b.csr", piece, rows=np.array([0, 0, 1]))  # row 0 twice, row 2 never
    with pytest.raises(RuntimeError, match="hold 3 rows \\(2 distinct\\), not its 3 once each"):
        _gather_bucket([(tmp_path / "b.csr", 3)], 3, 3, discard=lambda path: None)
    (tmp_path / "c.csr").write_bytes((tmp_path / "a.csr").read_bytes()[:-4])  # cut short
    with pytest.raises(RuntimeError, match="does not match its header"):
        _gather_bucket([(tmp_path / "c.csr", 3)], 3, 3, discard=lambda path: None)


def test_h5ad_rows_read_directly_equal_anndatas_at_the_edges(tmp_path, pbmc_small):
    import h5py
    from anndata.io import sparse_dataset

    from celltron.corpus.readers import _csr_rows

    pbmc_small.X = sp.csr_matrix(pbmc_small.X)
    pbmc_small.write_h5ad(tmp_path / "a.h5ad")
    n = pbmc_small.n_obs
    with h5py.File(tmp_path / "a.h5ad") as handle:
        read_rows, theirs = _csr_rows(handle["X"]), sparse_dataset(handle["X"])
        for start, stop in ((0, 1), (3, 3), (n - 2, n + 50), (0, n)):
            mine, want = read_rows(start, stop), theirs[start:stop]
            assert mine.shape == want.shape and (mine != want).nnz == 0 and mine.dtype == want.dtype


def test_the_manifest_writer_gives_the_same_json_as_the_standard_encoder():
    from celltron.corpus.schema import dump_manifest

    manifest = {
        "empty": {},
        "none": [],
        "genes": {"median": [1.5, float("nan"), None], "name": ["a", "b\u00e9"]},
        "sources": [{"path": "x", "n": 1}, {"path": "y", "nested": {"k": [1, 2]}}],
        "count": 3,
    }
    written = dump_manifest(manifest).decode()
    reread = json.loads(written)
    assert json.dumps(reread, allow_nan=True) == json.dumps(manifest, allow_nan=True)
    assert written.count("\n") < 30  # lists of values on one line each


def test_a_build_past_the_in_memory_limit_writes_the_same_medians(tmp_path, pbmc_small):
    pbmc_small.write_h5ad(tmp_path / "a.h5ad")
    build_corpus([tmp_path / "a.h5ad"], tmp_path / "held", BuildOptions(**QUIET))
    options = BuildOptions(exact_median_limit=0, read_block_cells=64, **QUIET)  # the sketch from the first block on
    build_corpus([tmp_path / "a.h5ad"], tmp_path / "two_pass", options)
    held, two_pass = (Corpus(tmp_path / name).manifest for name in ("held", "two_pass"))
    assert held["gene_median"] == {"method": "exact"} and two_pass["gene_median"] == {"method": "exact_two_pass"}
    assert two_pass["genes"]["nonzero_median"] == held["genes"]["nonzero_median"]
    assert two_pass["genes"]["cells_expressing"] == held["genes"]["cells_expressing"]
    assert not list((tmp_path / "two_pass").rglob("*.csr"))  # the staged blocks are gone


@pytest.mark.parametrize("failing", ["write_shard", "statistics"])  # both run on worker threads
def test_failed_build_leaves_nothing_and_existing_corpus_is_kept(tmp_path, pbmc_small, monkeypatch, failing):
    pbmc_small[:100].write_h5ad(tmp_path / "a.h5ad")
    build_corpus([tmp_path / "a.h5ad"], tmp_path / "c", BuildOptions(**QUIET))
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_corpus([tmp_path / "a.h5ad"], tmp_path / "c", BuildOptions(**QUIET))

    import celltron.corpus.build as build_module

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    if failing == "write_shard":
        monkeypatch.setattr(build_module, "write_shard", explode)
    else:
        monkeypatch.setattr(GeneStatistics, "add", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        build_corpus([tmp_path / "a.h5ad"], tmp_path / "c", BuildOptions(seed=9, **QUIET), overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        build_corpus([tmp_path / "a.h5ad"], tmp_path / "new", BuildOptions(**QUIET))
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "c"]


def test_overwrite_only_replaces_a_corpus(tmp_path, pbmc_small):
    data = tmp_path / "data"
    data.mkdir()
    pbmc_small[:50].write_h5ad(data / "a.h5ad")
    with pytest.raises(FileExistsError, match="not a celltron corpus"):
        build_corpus([data / "a.h5ad"], data, BuildOptions(**QUIET), overwrite=True)
    assert (data / "a.h5ad").exists()
    build_corpus([data / "a.h5ad"], tmp_path / "c", BuildOptions(**QUIET))
    (tmp_path / "c" / "lab.h5ad").write_bytes((data / "a.h5ad").read_bytes())
    with pytest.raises(ValueError, match="inside --out"):
        build_corpus([tmp_path / "c" / "lab.h5ad"], tmp_path / "c", BuildOptions(**QUIET), overwrite=True)
    assert (tmp_path / "c" / "lab.h5ad").exists()


def test_validate_names_a_corrupted_shard(tmp_path, pbmc_small):
    pbmc_small[:300].write_h5ad(tmp_path / "a.h5ad")
    build_corpus([tmp_path / "a.h5ad"], tmp_path / "c", BuildOptions(shard_size_mb=0.5, **QUIET))
    corpus = Corpus(tmp_path / "c")
    assert corpus.validate() == []
    victim = corpus.shards("train")[1]["path"]
    chunk = sorted((tmp_path / "c" / victim / "X" / "data").rglob("c/*"))[0]
    payload = bytearray(chunk.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    chunk.write_bytes(bytes(payload))
    problems = corpus.validate()
    assert len(problems) == 1 and victim in problems[0] and "checksum" in problems[0]


def test_not_a_corpus(tmp_path):
    with pytest.raises(CorpusFormatError, match="no manifest.json"):
        Corpus(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "celltron-corpus", "schema_version": 99}))
    with pytest.raises(CorpusFormatError, match="schema version 99"):
        Corpus(tmp_path)


def test_cell_ranger_outputs_of_several_samples_get_distinct_dataset_names(tmp_path, pbmc_small):
    ids = np.array(_ensembl_of(pbmc_small), dtype=object)
    keep = ids != ""
    adata = pbmc_small[:40, keep].copy()
    for sample in ("sampleA", "sampleB"):
        (tmp_path / sample).mkdir()
        write_10x_h5(adata, tmp_path / sample / "filtered_feature_bc_matrix.h5", ids[keep].astype(str))
    inputs = [tmp_path / s / "filtered_feature_bc_matrix.h5" for s in ("sampleA", "sampleB")]
    manifest = build_corpus(inputs, tmp_path / "c", BuildOptions(val_fraction=0, **QUIET))
    assert manifest["obs_categories"]["dataset"] == ["sampleA_filtered_feature_bc_matrix", "sampleB_filtered_feature_bc_matrix"]
    assert read_corpus(tmp_path / "c").obs["dataset"].value_counts().tolist() == [40, 40]
