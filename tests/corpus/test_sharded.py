"""Direct reads of the sharded X arrays (`celltron.corpus.sharded`) against zarr's own reads."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from celltron.corpus import BuildOptions, Corpus, build_corpus
from celltron.corpus.schema import CorpusFormatError
from celltron.corpus.sharded import ShardedArray, open_direct
from celltron.corpus.store import ShardReader


def _ranges(n: int, rng) -> list[tuple[int, int]]:
    """Edges, single elements, ranges crossing inner chunks and storage objects, random ones."""
    fixed = [(0, n), (0, 1), (n - 1, n), (n, n), (4095, 4097), (4096 * 64 - 3, 4096 * 64 + 5)]
    random = [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(40)]
    return [(lo, hi) for lo, hi in fixed + random if 0 <= lo <= hi <= n]


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_block_reads_equal_zarr_for_every_codec(tmp_path, pbmc3k, compression):
    source = ad.read_h5ad(pbmc3k)[:1200].copy()
    source.write_h5ad(tmp_path / "cells.h5ad")
    options = BuildOptions(compression=compression, chunk_nnz=4096, shard_size_mb=1, val_fraction=0, progress=False)
    build_corpus([tmp_path / "cells.h5ad"], tmp_path / "c", options)
    corpus = Corpus(tmp_path / "c")
    rng = np.random.default_rng(0)
    for record in corpus.shards("train"):
        reader = ShardReader(corpus, record)
        assert isinstance(reader.data, ShardedArray) and isinstance(reader.indices, ShardedArray)
        group = zarr.open_group(str(tmp_path / "c" / record["path"]), mode="r")
        for name in ("data", "indices"):
            whole = group[f"X/{name}"][:]
            for lo, hi in _ranges(len(whole), rng):
                got = getattr(reader, name)[lo:hi]
                assert got.dtype == whole.dtype and np.array_equal(got, whole[lo:hi]), (name, lo, hi)
        reader.close()


def test_unwritten_chunks_read_as_the_fill_value(tmp_path):
    # zarr skips inner chunks (and whole storage objects) that hold only the fill value
    values = np.arange(1, 600_001, dtype=np.int32)
    values[70_000:140_000] = 0  # inner chunk 1 entirely
    values[262_144:524_288] = 0  # the whole second storage object
    array = zarr.create_array(
        str(tmp_path / "a"),
        shape=values.shape,
        dtype="int32",
        chunks=(65_536,),
        shards=(262_144,),
        compressors=zarr.codecs.BloscCodec(cname="lz4", shuffle="shuffle", typesize=4),
        fill_value=0,
    )
    array[:] = values
    direct = open_direct(tmp_path / "a")
    assert direct is not None
    assert np.array_equal(direct[:], values)
    assert np.array_equal(direct[65_000:300_000], values[65_000:300_000])


def test_other_layouts_are_left_to_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "plain"), shape=(100,), dtype="int32", chunks=(10,))
    zarr.create_array(
        str(tmp_path / "gzip"), shape=(100,), dtype="int32", chunks=(10,), shards=(50,), compressors=zarr.codecs.GzipCodec()
    )
    assert open_direct(tmp_path / "plain") is None
    assert open_direct(tmp_path / "gzip") is None
    assert open_direct(tmp_path / "missing") is None


def test_a_corrupt_shard_index_is_refused_naming_the_file(tmp_path):
    array = zarr.create_array(str(tmp_path / "a"), shape=(1000,), dtype="int32", chunks=(100,), shards=(500,))
    array[:] = np.arange(1000, dtype=np.int32)
    stored = tmp_path / "a" / "c" / "1"
    payload = bytearray(stored.read_bytes())
    payload[-10] ^= 0xFF  # inside the (offset, length) index
    stored.write_bytes(bytes(payload))
    direct = open_direct(tmp_path / "a")
    assert np.array_equal(direct[:500], np.arange(500))
    with pytest.raises(CorpusFormatError, match=r"c/1: shard index checksum mismatch.*corpus validate"):
        direct[400:600]


def test_float32_inputs_with_large_totals_report_no_unmapped_counts(tmp_path, pbmc3k):
    # block totals above 2**24 counts used to round in float32 and report phantom unmapped counts
    source = ad.read_h5ad(pbmc3k)[:800].copy()
    source.X = sp.csr_matrix(source.X, dtype=np.float32) * 97  # odd, so sums above 2**24 round
    source.write_h5ad(tmp_path / "big.h5ad")
    assert source.X.sum(dtype=np.float64) > 2**24
    build_corpus(
        [tmp_path / "big.h5ad"], tmp_path / "c", BuildOptions(gene_column="gene_symbol_original", val_fraction=0, progress=False)
    )
    report = Corpus(tmp_path / "c").manifest["sources"][0]
    assert report["n_genes_unmapped"] > 0  # PBMC 3k has symbols without an Ensembl ID ...
    mapped = ad.read_zarr(tmp_path / "c" / Corpus(tmp_path / "c").shards("train")[0]["path"]).X.sum(dtype=np.int64)
    # ... and exactly the counts not carried into the corpus are reported
    assert report["unmapped_counts"] == int(source.X.sum(dtype=np.float64)) - int(mapped)
