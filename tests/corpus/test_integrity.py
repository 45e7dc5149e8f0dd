"""Corpus integrity (issue 15): checksums that do not depend on how a path was spelled, damaged
shards that stop every reader naming the shard and the cells, and partial directories of killed
runs cleaned up by the next run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import fsspec
import numpy as np
import pytest
import zarr

import celltron.corpus.store as store_module
from celltron.cli import main
from celltron.corpus import BuildOptions, Corpus, CorpusStream, build_corpus
from celltron.corpus.schema import CHECKSUM_VERSION, CorpusDamagedError, CorpusFormatError, checksum_files
from celltron.corpus.store import ShardReader, indptr_problem, values_problem
from celltron.errors import DataIntegrityError
from celltron.io import PARTIAL_OWNER, STALE_UNOWNED_SECONDS
from celltron.tokenizers.dataset import tokenize_to_dataset

OPTIONS = dict(shard_size_mb=0.5, chunk_nnz=4096, val_fraction=0.05, progress=False)
ADVICE = "run `celltron corpus validate"
LZ4 = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4)


@pytest.fixture(scope="module")
def cells(tmp_path_factory, pbmc3k) -> Path:
    path = tmp_path_factory.mktemp("cells") / "pbmc.h5ad"
    ad.read_h5ad(pbmc3k)[:300].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, cells) -> Path:
    """A small corpus (several shards, several inner chunks per shard), built once; tests damage copies."""
    out = tmp_path_factory.mktemp("pristine") / "c"
    build_corpus([cells], out, BuildOptions(**OPTIONS))
    return out


@pytest.fixture
def corpus_dir(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "c"))


def _flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    payload = bytearray(path.read_bytes())
    payload[offset] ^= mask
    path.write_bytes(bytes(payload))


def _first_train_shard(corpus_dir: Path) -> tuple[dict, Path]:
    record = Corpus(corpus_dir).shards("train")[0]
    return record, corpus_dir / record["path"]


def _damage(corpus_dir: Path, array: str) -> dict:
    """Flip one byte of the first train shard's X/<array>: inside inner chunk 0 of X/data and
    X/indices (zarr storage object c/0), in the middle of X/indptr's only chunk."""
    record, shard = _first_train_shard(corpus_dir)
    stored = shard / "X" / array / "c" / "0"
    _flip(stored, 10 if array != "indptr" else stored.stat().st_size // 2)
    return record


def _stream_all(location) -> int:
    return sum(1 for _ in CorpusStream(location, infinite=False, shuffle=False))


def _assert_names_the_damage(message: str, corpus_dir: Path, record: dict, array: str) -> None:
    assert f"{corpus_dir / record['path']}: " in message and ADVICE in message and "\n" not in message
    if array == "indptr":
        assert "X/indptr cannot be read (a chunk fails its crc32c checksum)" in message
    else:
        assert f"block of cells 0-{record['n_cells'] - 1}: X/{array}/c/0: inner chunk 0 fails its crc32c checksum" in message


# ---------------------------------------------------------------- damaged shards (item 3)


@pytest.mark.parametrize("array", ["data", "indices", "indptr"])
def test_a_flipped_byte_stops_the_stream_and_validate_names_the_block(corpus_dir, array):
    record = _damage(corpus_dir, array)
    with pytest.raises(DataIntegrityError) as caught:
        _stream_all(corpus_dir)
    _assert_names_the_damage(str(caught.value), corpus_dir, record, array)
    problems = Corpus(corpus_dir).validate()
    assert len(problems) == 1 and problems[0].startswith(f"{record['path']}: checksum mismatch; damaged: ")
    assert "crc32c" in problems[0]


@pytest.mark.parametrize("array", ["data", "indices", "indptr"])
def test_tokenize_refuses_a_damaged_corpus_in_one_line_and_writes_nothing(corpus_dir, tmp_path, capsys, array):
    record = _damage(corpus_dir, array)
    code = main(["tokenize", str(corpus_dir), "--scheme", "geneformer-v2", "--out", str(tmp_path / "tokens"), "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and error.startswith("celltron: error: ")
    _assert_names_the_damage(error, corpus_dir, record, array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no dataset, no partial directory


def test_reads_through_zarr_check_the_crc32c_too(corpus_dir, monkeypatch):
    # remote corpora (s3://, gs://) are read through zarr's codec pipeline, not the direct reader
    monkeypatch.setattr(store_module, "_direct_arrays", lambda store, verify: None)
    assert _stream_all(corpus_dir) == Corpus(corpus_dir).manifest["splits"]["train"]["n_cells"]
    record = _damage(corpus_dir, "data")
    with pytest.raises(
        DataIntegrityError, match=r"block of cells 0-\d+: X/data cannot be read \(a chunk fails its crc32c checksum\)"
    ):
        _stream_all(corpus_dir)
    assert Corpus(corpus_dir).validate()[0].startswith(f"{record['path']}: checksum mismatch; damaged: block of cells 0-")


def test_every_array_of_a_new_shard_carries_crc32c(pristine):
    _, shard = _first_train_shard(pristine)
    metas = [json.loads(p.read_text()) for p in shard.rglob("zarr.json")]
    arrays = [m for m in metas if m["node_type"] == "array"]
    for meta in arrays:
        codecs = meta["codecs"]
        inner = codecs[0]["configuration"]["codecs"] if codecs[0]["name"] == "sharding_indexed" else codecs
        assert inner[-1]["name"] == "crc32c", meta
    assert Corpus(pristine).manifest["checksum_version"] == CHECKSUM_VERSION


def test_damage_in_obs_is_refused_naming_the_column(corpus_dir):
    record, shard = _first_train_shard(corpus_dir)
    stored = shard / "obs" / "n_counts" / "c" / "0"
    _flip(stored, stored.stat().st_size // 2)
    with pytest.raises(DataIntegrityError, match=r"obs/n_counts cannot be read \(a chunk fails its crc32c checksum\)"):
        ShardReader(Corpus(corpus_dir), record)


def test_pretraining_batches_stop_at_a_damaged_shard(corpus_dir):
    from celltron.pretrain.config import DataSection
    from celltron.pretrain.data import PretrainDataModule, corpus_tokenizer

    record = _damage(corpus_dir, "data")
    corpus = Corpus(corpus_dir)
    section = DataSection(corpus=str(corpus_dir), batch_size=4, round_cells=32, block_size=32, buffer_size=64, num_workers=1)
    module = PretrainDataModule(corpus, "geneformer", corpus_tokenizer(corpus, "geneformer-v2", 64, 0), section, seed=0)
    batches = 0
    with pytest.raises(DataIntegrityError) as caught:
        for batches, _ in enumerate(module.train_dataloader()):  # noqa: B007  (an epoch reads every shard)
            assert batches < 1000, "the damaged block was never reported"
    assert str(corpus_dir / record["path"]) in str(caught.value) and "fails its crc32c checksum" in str(caught.value)


# ---------------------------------------------------------------- corpora built before inner checksums


def test_value_checks_name_the_first_bad_cell():
    indptr, n_counts = np.array([0, 2, 2, 5]), np.array([3, 0, 5])
    genes, counts = np.array([1, 4, 0, 3, 7], dtype=np.int32), np.array([1, 2, 3, 1, 1], dtype=np.int32)
    assert values_problem(indptr, genes, counts, n_counts, n_genes=10) is None  # cell 2 may start below cell 0's genes

    def problem(genes=genes, counts=counts):
        genes, counts = np.asarray(genes, dtype=np.int32), np.asarray(counts, dtype=np.int32)
        return values_problem(indptr, genes, counts, n_counts, n_genes=10, first_cell=100)

    assert problem(genes=[1, 4, 0, 3, 10]) == "cell 102 has gene index 10, the corpus has 10 genes"
    assert problem(genes=[1, 4, 0, -3, 7]) == "cell 102 has gene index -3, the corpus has 10 genes"
    assert problem(genes=[1, 1, 0, 3, 7]) == "cell 100 lists gene indices out of order or twice"
    assert problem(genes=[1, 4, 0, 7, 3]) == "cell 102 lists gene indices out of order or twice"
    assert problem(counts=[1, 2, -3, 1, 1]) == "cell 102 has a negative count -3"
    assert problem(counts=[1, 2, 3, 1, 2]) == "cell 102 holds 6 counts, more than its n_counts 5"


def test_indptr_checks():
    assert indptr_problem(np.array([0, 2, 2, 5]), n_cells=3, nnz=5) is None
    assert indptr_problem(np.array([0, 2, 1, 5]), 3, 5) == "X/indptr decreases after cell 1 (cells 1-2)"
    assert indptr_problem(np.array([1, 2, 2, 5]), 3, 5) == "X/indptr starts at 1, not 0 (cell 0)"
    assert indptr_problem(np.array([0, 2, 2, 5]), 3, 6) == "X/indptr ends at 5, X holds 6 non-zeros"
    assert indptr_problem(np.array([0, 2, 2, 5]), 4, 5) == "X/indptr has 4 entries for 4 cells"


def _as_built_before_checksums(corpus_dir: Path, compressors=LZ4, keys=None) -> None:
    """Make `corpus_dir` look like a corpus of an older celltron: X/data and X/indices without
    inner crc32c, no checksum_version in the manifest, and shard checksums computed by `keys`
    (a function of the shard's directory; default: the current, correct ones)."""
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    fs = fsspec.filesystem("file")
    for split in ("train", "val"):
        for record in manifest["splits"][split]["shards"]:
            x = zarr.open_group(str(corpus_dir / record["path"] / "X"), mode="r+")
            for name in ("data", "indices"):
                values, chunks, shards = x[name][:], x[name].chunks, x[name].shards
                x.create_array(
                    name,
                    shape=values.shape,
                    dtype=values.dtype,
                    chunks=chunks,
                    shards=shards,
                    compressors=compressors,
                    overwrite=True,
                )[:] = values
            shard = corpus_dir / record["path"]
            record["sha256"] = keys(shard) if keys else checksum_files(fs, str(shard))
    del manifest["checksum_version"]
    (corpus_dir / "manifest.json").write_text(json.dumps(manifest))


def _cells(location) -> list:
    return [(c["genes"].tolist(), c["counts"].tolist()) for c in CorpusStream(location, infinite=False, shuffle=False)]


def _checks_values(location) -> bool:
    corpus = Corpus(location)
    reader = ShardReader(corpus, corpus.shards("train")[0])
    reader.close()
    return reader.check_values


def test_old_corpora_without_inner_checksums_still_read_with_value_checks(corpus_dir, pristine, caplog):
    _as_built_before_checksums(corpus_dir)
    assert Corpus(corpus_dir).validate() == []
    assert _cells(corpus_dir) == _cells(pristine)
    said = [r.getMessage() for r in caplog.records if "built before chunks carried crc32c" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(str(corpus_dir)) and "--overwrite" in said[0]  # once, naming the corpus
    assert _checks_values(corpus_dir)  # no crc32c to rely on: every block's values are checked
    assert not _checks_values(pristine)  # the crc32c of every chunk covers them


@pytest.mark.parametrize(
    "array, byte, mask, message",
    [
        ("data", 1, 0xFF, r"cell \d+ holds \d+ counts, more than its n_counts \d+"),  # a count grows by 65280
        ("data", 3, 0x80, r"cell \d+ has a negative count"),
        ("indices", 3, 0x80, r"cell \d+ has gene index -\d+, the corpus has \d+ genes"),
        ("indices", 2, 0x01, r"cell \d+ has gene index \d+, the corpus has \d+ genes"),  # grows by 65536
    ],
)
def test_old_uncompressed_corpora_catch_a_flipped_byte_by_its_values(corpus_dir, array, byte, mask, message):
    _as_built_before_checksums(corpus_dir, compressors=None)
    record, shard = _first_train_shard(corpus_dir)
    # the 40th value of the shard (uncompressed: 4 bytes each from the start of storage object 0)
    _flip(shard / "X" / array / "c" / "0", 40 * 4 + byte, mask)
    with pytest.raises(DataIntegrityError, match=rf"block of cells \d+-\d+: {message}") as caught:
        _stream_all(corpus_dir)
    assert ADVICE in str(caught.value) and str(shard) in str(caught.value)
    problems = Corpus(corpus_dir).validate()
    assert len(problems) == 1 and problems[0].startswith(f"{record['path']}: checksum mismatch; damaged: block of cells")


def test_old_compressed_chunks_that_fail_to_decompress_name_the_shard(corpus_dir):
    _as_built_before_checksums(corpus_dir)
    _, shard = _first_train_shard(corpus_dir)
    _flip(shard / "X" / "data" / "c" / "0", 0)  # blosc's header: the chunk no longer decompresses
    with pytest.raises(
        DataIntegrityError, match=r"block of cells 0-\d+: X/data cannot be read \(RuntimeError: error during blosc"
    ):
        _stream_all(corpus_dir)


# ---------------------------------------------------------------- checksums and the spelling of --out (item 2)


def test_checksums_do_not_depend_on_how_the_path_is_spelled(tmp_path, cells, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_corpus([cells], Path("corpora") / "c", BuildOptions(**OPTIONS))
    for spelled in ("corpora/c", "./corpora/../corpora/c/", str(tmp_path / "corpora" / "c"), f"file://{tmp_path}/corpora/c"):
        assert Corpus(spelled).validate() == [], spelled
    fs, shard = fsspec.filesystem("file"), "corpora/c/train/shard-00000.zarr"
    assert checksum_files(fs, shard) == checksum_files(fs, f"{shard}/") == checksum_files(fs, str(tmp_path / shard))
    assert main(["corpus", "validate", "corpora/c"]) == 0


def _checksum_keyed_by_spelling(fs, root: str) -> str:
    """The checksum of celltron before checksum_version 2: paths from `fs.find` (absolute) cut at
    the length of `root` as spelled, so a relative root gave keys no later spelling reproduces."""
    digest = hashlib.sha256()
    root = root.rstrip("/")
    for path in sorted(fs.find(root)):
        relative = path[len(root) :].lstrip("/")
        data = fs.cat_file(path)
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def test_old_corpus_built_with_a_relative_out_is_rekeyed_on_request(tmp_path, pristine, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pristine, "c")
    fs = fsspec.filesystem("file")
    _as_built_before_checksums(Path("c"), keys=lambda shard: _checksum_keyed_by_spelling(fs, str(shard)))
    problems = Corpus("c").validate()
    assert len(problems) == len(Corpus("c").shards("train")) + len(Corpus("c").shards("val"))
    for problem in problems:
        assert "checksum mismatch, yet every block passes the structural checks" in problem
        assert "re-record the checksums with `celltron corpus validate c --rekey`" in problem
    assert main(["corpus", "validate", "c"]) == 1
    assert main(["corpus", "validate", "c", "--rekey"]) == 0
    assert f"c: valid; re-recorded the checksums of {len(problems)} shard(s)" in capsys.readouterr().out
    assert Corpus(str(tmp_path / "c")).validate() == []
    assert json.loads(Path("c/manifest.json").read_text())["checksum_version"] == CHECKSUM_VERSION
    assert sorted(os.listdir("c")) == ["manifest.json", "train", "val"]  # no temporary manifest left


def test_old_corpus_built_with_an_absolute_out_still_validates(corpus_dir):
    _as_built_before_checksums(corpus_dir)
    assert Corpus(corpus_dir).validate() == []


def test_one_damaged_shard_of_an_old_corpus_is_damage_not_spelling(corpus_dir, capsys):
    _as_built_before_checksums(corpus_dir, compressors=None)
    record, shard = _first_train_shard(corpus_dir)
    _flip(shard / "X" / "data" / "c" / "0", 40 * 4 + 1)
    problems = Corpus(corpus_dir).validate()
    assert len(problems) == 1 and "damaged: block of cells" in problems[0] and "--rekey" not in problems[0]
    with pytest.raises(CorpusDamagedError, match="not re-keyed, 1 shard"):
        Corpus(corpus_dir).rekey_checksums()
    assert main(["corpus", "validate", str(corpus_dir), "--rekey"]) != 0
    assert "not re-keyed" in capsys.readouterr().err


def test_rekey_is_refused_for_corpora_whose_checksums_are_already_independent(corpus_dir):
    with pytest.raises(CorpusFormatError, match="already independent of the --out spelling"):
        Corpus(corpus_dir).rekey_checksums()


# ---------------------------------------------------------------- partial directories of killed runs (item 6)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _partial(parent: Path, name: str, pid: int | None = None, host: str | None = None, idle_s: float = 0) -> Path:
    """A partial directory as a run leaves it: some files, an owner record when `pid` is given."""
    path = parent / name
    (path / "train").mkdir(parents=True)
    (path / "train" / "chunk").write_bytes(b"\0" * 1000)
    if pid is not None:
        (path / PARTIAL_OWNER).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    if idle_s:
        then = time.time() - idle_s
        for item in [*path.rglob("*"), path]:
            os.utime(item, (then, then))
    return path


def test_build_removes_stale_partials_of_its_target_and_nothing_else(tmp_path, cells):
    dead = _dead_pid()
    stale = [
        _partial(tmp_path, ".c.partial-0000dead", pid=dead),
        _partial(tmp_path, ".c.partial-00000001", idle_s=STALE_UNOWNED_SECONDS + 60),  # older celltron, long idle
    ]
    kept = [
        _partial(tmp_path, ".c.partial-0000a11e", pid=os.getpid()),  # a run still going
        _partial(tmp_path, ".c.partial-00000002"),  # no owner record but recently written
        _partial(tmp_path, ".c.partial-0000beef", pid=dead, host="another-machine"),  # cannot tell: kept
        _partial(tmp_path, ".d.partial-0000dead", pid=dead),  # another target
        _partial(tmp_path, ".c.partial-mine", pid=dead),  # not a name celltron writes
    ]
    build_corpus([cells], tmp_path / "c", BuildOptions(**OPTIONS))
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert not (tmp_path / "c" / PARTIAL_OWNER).exists()
    assert Corpus(tmp_path / "c").validate() == []


def test_a_build_records_its_owner_in_its_partial_directory(tmp_path, cells, monkeypatch):
    import celltron.corpus.build as build_module

    seen = {}

    def inspect_then_fail(paths, work, options):
        seen.update(json.loads((work / PARTIAL_OWNER).read_text()))
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_module, "_build_into", inspect_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_corpus([cells], tmp_path / "c", BuildOptions(**OPTIONS))
    assert seen == {"pid": os.getpid(), "host": socket.gethostname()}
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tokenize_removes_stale_partials_of_its_output(tmp_path, pristine):
    stale = _partial(tmp_path, ".tokens.partial-0000dead", pid=_dead_pid())
    live = _partial(tmp_path, ".tokens.partial-0000a11e", pid=os.getpid())
    tokenize_to_dataset(pristine, "geneformer-v2", tmp_path / "tokens", progress=False)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tokens.partial-0000a11e", "tokens"]


def test_the_zarrs_pipeline_gets_value_checks_as_it_skips_inner_checksums(tmp_path, cells):
    pytest.importorskip("zarrs")
    build_corpus([cells], tmp_path / "c", BuildOptions(compression="none", **OPTIONS))
    _, shard = _first_train_shard(tmp_path / "c")
    _flip(shard / "X" / "data" / "c" / "0", 40 * 4 + 1)  # the 40th count grows by 65280
    # in a child process: the zarrs pipeline is process-wide and must not leak into forked tests
    code = (
        "import sys\n"
        "from celltron.corpus import CorpusStream\n"
        "from celltron.errors import DataIntegrityError\n"
        "try:\n"
        "    sum(1 for _ in CorpusStream(sys.argv[1], infinite=False, shuffle=False, zarrs=True))\n"
        "except DataIntegrityError as error:\n"
        "    sys.exit(0 if 'more than its n_counts' in str(error) else 3)\n"
        "sys.exit(1)  # read to the end\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], timeout=120).returncode == 0
