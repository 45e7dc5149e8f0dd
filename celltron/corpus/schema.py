"""The on-disk corpus: manifest.json plus AnnData-Zarr (format 3) shard stores.

Layout of a corpus directory (or object-store prefix):

    manifest.json                 schema version, sources, shards, gene table, gene statistics
    train/shard-00000.zarr        AnnData-Zarr store: X (CSR of raw counts), obs, var
    val/shard-00000.zarr          the validation split, same format

`X/data` and `X/indices` use zarr's sharding codec: inner chunks of `chunk_nnz` non-zeros
(tens of cells) packed into a few storage objects, so block reads touch few objects.

Integrity: every chunk of every array (X, obs, var) ends in its crc32c (zarr's `crc32c` codec),
checked on every read, so one flipped byte stops a run instead of changing a count. The
manifest keeps a sha256 per shard (`checksum_files`) that `celltron corpus validate` re-checks.
"""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from celltron.corpus.constants import COMPRESSIONS
from celltron.errors import ConfigError, DataIntegrityError, UserError

SCHEMA_VERSION = 1
# anndata settings while a shard is written: obs and var unsharded, and said so, so anndata does
# not warn that autosharding will become its default. Settings are process-wide: callers that
# write shards on several threads hold the same override around all of them (`build`), so no
# thread's exit restores a different value under another.
SHARD_WRITE_SETTINGS = {"zarr_write_format": 3, "auto_shard_zarr_v3": False}
FORMAT_NAME = "celltron-corpus"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# Inner chunks per zarr storage object (zarr shard) of X/data and X/indices.
CHUNKS_PER_ZARR_SHARD = 64
# manifest["checksum_version"]: 2 = shard sha256 keyed by paths relative to the shard. Manifests
# without it were written when the keys depended on how --out was spelled (see `checksum_files`).
CHECKSUM_VERSION = 2


class CorpusFormatError(UserError):
    """A corpus directory is missing, incomplete or corrupted."""


class CorpusDamagedError(CorpusFormatError, DataIntegrityError):
    """Stored corpus data fails a checksum or a structural check. `detail` says what, without
    the file or the advice (readers add the cells it concerns)."""

    detail: str = ""


def damaged(where: str, detail: str, location: str | None = None) -> CorpusDamagedError:
    """The one-line error for damaged data at `where`: what is wrong and what to do."""
    target = f" {location}" if location else ""
    error = CorpusDamagedError(
        f"{where}: {detail}; the corpus is damaged: run `celltron corpus validate{target}` to list the damaged "
        "shards, then rebuild the corpus from its inputs (`celltron corpus build ... --overwrite`)"
    )
    error.detail = detail
    return error


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.zarr"


def _compressors(compression: str) -> list:
    """X's inner-chunk codecs after `bytes`: the compressor, then crc32c of the compressed chunk."""
    if compression == "none":
        return [zarr.codecs.Crc32cCodec()]
    if compression == "zstd":
        return [zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()]
    if compression == "lz4":
        # Byte shuffle groups the zero high bytes of int32 gene indices and counts, so LZ4
        # then packs count data about 10% smaller than zstd alone and decodes 4-5x faster.
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4), zarr.codecs.Crc32cCodec()]
    raise ConfigError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")


def _checked_default_compressors() -> list:
    # zarr's default for v3 arrays (zstd level 0), plus the crc32c that zarr checks on every read
    return [zarr.codecs.ZstdCodec(level=0), zarr.codecs.Crc32cCodec()]


def write_shard(path, counts: sp.csr_matrix, obs: pd.DataFrame, var: pd.DataFrame, chunk_nnz: int, compression: str) -> None:
    """Write one AnnData-Zarr (format 3) store with X as sharded CSR of int32 counts."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    checked = {"compressors": _checked_default_compressors()}
    with ad.settings.override(**SHARD_WRITE_SETTINGS):
        ad.io.write_elem(root, "obs", obs, dataset_kwargs=checked)
        ad.io.write_elem(root, "var", var, dataset_kwargs=checked)
    x = root.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(counts.shape)})
    nnz = max(counts.nnz, 1)
    chunk = min(chunk_nnz, nnz)
    storage_object = min(chunk * CHUNKS_PER_ZARR_SHARD, -(-nnz // chunk) * chunk)
    for name, values in (
        ("data", counts.data.astype(np.int32, copy=False)),
        ("indices", counts.indices.astype(np.int32, copy=False)),
    ):
        array = x.create_array(
            name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=(chunk,),
            shards=(storage_object,),
            compressors=_compressors(compression),
        )
        array[:] = values
    x.create_array("indptr", data=counts.indptr.astype(np.int64, copy=False), **checked)
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def checksum_files(fs, root: str) -> str:
    """sha256 over every file below `root` (path relative to `root`, size and bytes), in sorted
    order. The same however `root` is spelled: `fs.find` answers with normalised paths (absolute
    ones for local files), so they are cut at `root` as the filesystem normalises it."""
    digest = hashlib.sha256()
    base = fs._strip_protocol(root).rstrip("/") + "/"
    for path in sorted(fs.find(root)):
        if not path.startswith(base):
            raise RuntimeError(f"{root}: the filesystem listed {path}, outside {base}; cannot key its checksum")
        relative = path[len(base) :]
        data = fs.cat_file(path)
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dump_manifest(manifest: dict) -> bytes:
    """The manifest as JSON: objects one key a line, each list of plain values on one line. The gene table's
    lists hold a value per gene; one element a line (`json.dumps(indent=...)`) takes the pure-
    Python encoder through every element, 8x slower than the C encoder writing a list at once."""
    return _dump_nested(manifest, 0).encode()


def _json_key(key) -> str:
    """A key as `json.dumps` writes it (a non-string key too: None -> "null", 1 -> "1")."""
    return json.dumps({key: 0})[1:-4]


def _dump_nested(value, depth: int) -> str:
    inner, outer = " " * (depth + 1), " " * depth
    if isinstance(value, dict) and value:
        items = (f"{inner}{_json_key(key)}: {_dump_nested(item, depth + 1)}" for key, item in value.items())
        return "{\n" + ",\n".join(items) + "\n" + outer + "}"
    if isinstance(value, list) and value and isinstance(value[0], dict):  # e.g. the sources
        return "[\n" + ",\n".join(inner + _dump_nested(item, depth + 1) for item in value) + "\n" + outer + "]"
    return json.dumps(value, allow_nan=True)


def check_manifest(manifest: dict, where: str) -> None:
    """Raise CorpusFormatError unless `manifest` is a celltron corpus manifest we can read."""
    if manifest.get("format") != FORMAT_NAME:
        raise CorpusFormatError(f"{where}: not a celltron corpus manifest (format={manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CorpusFormatError(
            f"{where}: corpus schema version {version}, this celltron reads version {SCHEMA_VERSION}; "
            "rebuild the corpus with `celltron corpus build`"
        )
    for key in ("sources", "genes", "splits", "obs_categories"):
        if key not in manifest:
            raise CorpusFormatError(f"{where}: manifest has no '{key}' field")
