"""Direct reads of the 1-D sharded arrays a corpus shard keeps its CSR non-zeros in.

`X/data` and `X/indices` are zarr v3 arrays with the sharding codec: each storage object
(`c/<k>`) holds a run of inner chunks, each `bytes` (+ `blosc` or `zstd`) (+ `crc32c`) encoded,
followed by an index of (offset, length) pairs and its crc32c (the layout of the zarr v3
sharding specification). A block of cells is a contiguous range of such an array, so reading
it is: look up the inner chunks that cover the range, check each chunk's crc32c, decompress
them straight into the output. zarr-python does the same through its asyncio codec pipeline,
with per-chunk overhead that dominates at the sizes we read; here a block read is a loop over
mapped memory, and the decoders release the GIL, so the stream's reader threads decode in
parallel.

Only the layout celltron writes is read this way (local files, one dimension, sharding with
`bytes` [+ `blosc` | `zstd`] [+ `crc32c`] inside and `bytes` + `crc32c` index at the end);
anything else is read through zarr (`open_direct` returns None). Corpora written before inner
chunks carried a crc32c are still read; `ShardedArray.checksummed` tells which is which.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import Blosc, Zstd

from celltron.corpus.schema import damaged

_EMPTY = np.uint64(2**64 - 1)  # the sharding index's marker for an inner chunk never written


def _decoder(codec: dict):
    """numcodecs decoder of an inner chunk's last codec (None for plain bytes). Each holds no
    state between calls and releases the GIL while it decodes."""
    return {"bytes": None, "zstd": Zstd(), "blosc": Blosc()}[codec["name"]]


def _supported_codecs(meta: dict) -> dict | None:
    """The sharding configuration when `meta` is a layout this module reads, else None."""
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or len(meta.get("shape", ())) != 1:
        return None
    config = codecs[0]["configuration"]
    inner = [c.get("name") for c in config.get("codecs", [])]
    if inner[-1:] == ["crc32c"]:
        inner = inner[:-1]
    index = [c.get("name") for c in config.get("index_codecs", [])]
    if inner not in (["bytes"], ["bytes", "zstd"], ["bytes", "blosc"]) or index != ["bytes", "crc32c"]:
        return None
    if config.get("index_location", "end") != "end":
        return None
    little = all(
        c.get("configuration", {}).get("endian", "little") == "little" for c in config["codecs"] + config["index_codecs"]
    )
    return config if little else None


class ShardedArray:
    """A 1-D sharded zarr v3 array in a local directory, read by element range.

    Args:
        path: the array's directory (holding `zarr.json` and `c/`).
        meta: its parsed `zarr.json`; `open_direct` checks it is a supported layout.
        config: the sharding codec's configuration from `meta`.
        verify: check each inner chunk's crc32c before decoding it (when the array has them).
    """

    def __init__(self, path: Path, meta: dict, config: dict, verify: bool = True):
        self.path = Path(path)
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.size = int(meta["shape"][0])
        self.fill_value = meta.get("fill_value", 0)
        self.object_len = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.chunk_len = int(config["chunk_shape"][0])
        self.chunks_per_object = self.object_len // self.chunk_len
        self.checksummed = config["codecs"][-1]["name"] == "crc32c"
        self.codec = _decoder(config["codecs"][-2 if self.checksummed else -1])
        self.verify = verify
        # storage object k -> (its mapping, the same bytes as a uint8 array, its (offset, length) index)
        self._objects: dict[int, tuple[mmap.mmap, np.ndarray, np.ndarray]] = {}

    @property
    def shape(self) -> tuple[int]:
        return (self.size,)

    def close(self) -> None:
        while self._objects:
            _, (mapped, view, _) = self._objects.popitem()
            del view  # the uint8 view exports the mapping's buffer; it must go before close
            try:
                mapped.close()
            except BufferError:  # a slice still alive (e.g. in a traceback): unmapped when it goes
                pass

    def _object(self, k: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Storage object k's bytes (mapped), with its checked (offset, length) index; (None,
        None) when zarr never wrote it (every chunk in it is the fill value)."""
        if k not in self._objects:
            path = self.path / "c" / str(k)
            if not path.is_file():
                return None, None
            index_bytes = self.chunks_per_object * 16
            if path.stat().st_size < index_bytes + 4:
                raise self._damaged(k, "too short for its shard index")
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            # copied out of the mapping: a live view would keep it from closing
            index = mapped[len(mapped) - index_bytes - 4 :]
            if google_crc32c.value(index[:index_bytes]) != int.from_bytes(index[index_bytes:], "little"):
                mapped.close()
                raise self._damaged(k, "shard index checksum mismatch")
            table = np.frombuffer(index[:index_bytes], dtype="<u8").reshape(-1, 2)
            self._objects[k] = (mapped, np.frombuffer(mapped, dtype=np.uint8), table)
        _, view, table = self._objects[k]
        return view, table

    def _chunk_bytes(self, chunk: int) -> np.ndarray | None:
        """Inner chunk `chunk` as stored, crc32c checked and removed; None when never written."""
        k, position = divmod(chunk, self.chunks_per_object)
        view, table = self._object(k)
        entry = None if table is None else table[position]
        if entry is None or entry[0] == _EMPTY:
            return None
        start, stop = int(entry[0]), int(entry[0] + entry[1])
        if stop > len(view) or stop - start < 4 * self.checksummed:
            raise self._damaged(k, f"inner chunk {position} lies outside the file")
        raw = view[start:stop]
        if not self.checksummed:
            return raw
        # crc32c of the stored (compressed) bytes: a few % of decoding them, see BENCHMARKS.md
        if self.verify and google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:].tobytes(), "little"):
            raise self._damaged(k, f"inner chunk {position} fails its crc32c checksum")
        return raw[:-4]

    def _damaged(self, k: int, what: str):
        """The error for storage object k; its `detail` names the array and object, for readers
        that add the cells it concerns."""
        error = damaged(f"{self.path}/c/{k}", what)
        error.detail = f"{self.path.parent.name}/{self.path.name}/c/{k}: {what}"  # X/data/c/0: ...
        return error

    def _decode_into(self, chunk: int, out: np.ndarray, first: int) -> None:
        """Decode elements [first, first + len(out)) of inner chunk `chunk` into `out`."""
        raw = self._chunk_bytes(chunk)
        if raw is None:
            out[:] = self.fill_value
            return
        whole = first == 0 and len(out) == self.chunk_len
        if self.codec is None:
            out[:] = raw[first * self.dtype.itemsize : (first + len(out)) * self.dtype.itemsize].view(self.dtype)
        elif whole:
            self.codec.decode(raw, out=out)  # decompressed straight into the result
        else:
            decoded = np.frombuffer(self.codec.decode(raw), dtype=self.dtype)
            out[:] = decoded[first : first + len(out)]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedArray reads contiguous ranges: use array[lo:hi]")
        lo, hi, _ = key.indices(self.size)
        out = np.empty(max(hi - lo, 0), dtype=self.dtype)
        position = lo
        while position < hi:
            chunk, first = divmod(position, self.chunk_len)
            stop = min(hi, (chunk + 1) * self.chunk_len)
            self._decode_into(chunk, out[position - lo : stop - lo], first)
            position = stop
        return out


def open_direct(path, verify: bool = True) -> ShardedArray | None:
    """A `ShardedArray` for the local array directory `path`, or None when its layout is not
    the one celltron writes (read it through zarr then). `verify`: check inner chunks' crc32c."""
    path = Path(path)
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    config = _supported_codecs(meta)
    if config is None or meta["chunk_grid"]["configuration"]["chunk_shape"][0] % config["chunk_shape"][0]:
        return None
    return ShardedArray(path, meta, config, verify)
