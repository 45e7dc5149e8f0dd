"""Opening a built corpus, locally or on an object store, and reading blocks of cells."""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import fsspec
import numpy as np
import scipy.sparse as sp
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

from celltron.corpus.schema import (
    CHECKSUM_VERSION,
    MANIFEST,
    SPLITS,
    CorpusDamagedError,
    CorpusFormatError,
    check_manifest,
    checksum_files,
    damaged,
    dump_manifest,
)
from celltron.corpus.sharded import ShardedArray, open_direct
from celltron.errors import ConfigError
from celltron.inputs import parse_json
from celltron.io import write_bytes_atomically
from celltron.preprocessing import log_normalise

log = logging.getLogger(__name__)
# Set to 1 only to measure what the checks on every read cost (benchmarks/corpus_stream.py).
NO_READ_CHECKS_ENV = "CELLTRON_BENCHMARK_NO_READ_CHECKS"
# What validate says of a shard whose stored sha256 may have been keyed by a relative --out.
SPELLING_KEYED = "its stored sha256 may depend on how a relative --out was spelled"


def read_checks_enabled() -> bool:
    """Whether reads check checksums and structure: always, unless a benchmark turns them off."""
    return os.environ.get(NO_READ_CHECKS_ENV) != "1"


class MappedLocalStore(zarr.storage.LocalStore):
    """Read-only local store that serves reads from memory-mapped files.

    zarr's LocalStore opens, seeks and closes the shard file for every inner chunk, from a
    worker thread; a corpus shard is immutable, so we map each file once and slice it (about
    1.4x faster block reads from page cache).
    """

    def __init__(self, root, *, read_only: bool = True):
        super().__init__(root, read_only=True)
        self._maps: dict[str, mmap.mmap | bytes] = {}

    def _mapped(self, key: str):
        if key not in self._maps:
            path = self.root / key
            if not path.is_file():
                return None
            with open(path, "rb") as handle:
                empty = handle.seek(0, 2) == 0
                self._maps[key] = b"" if empty else mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[key]

    def close(self) -> None:
        """Unmap every file (each mapping holds a file descriptor)."""
        for mapped in self._maps.values():
            if isinstance(mapped, mmap.mmap):
                mapped.close()
        self._maps.clear()
        super().close()

    async def get(self, key, prototype, byte_range=None):
        if not self._is_open:
            await self._open()
        mapped = self._mapped(key)
        if mapped is None:
            return None
        size = len(mapped)
        if byte_range is None:
            start, stop = 0, size
        elif isinstance(byte_range, RangeByteRequest):
            start, stop = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start, stop = byte_range.offset, size
        elif isinstance(byte_range, SuffixByteRequest):
            start, stop = max(0, size - byte_range.suffix), size
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return prototype.buffer.from_bytes(mapped[start:stop])


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class Corpus:
    """A corpus directory or object-store prefix (`s3://`, `gs://`, `file://`, or a path).

    Args:
        location: where the corpus is.
        storage_options: passed to fsspec for remote stores (endpoint_url, key, secret, ...).
    """

    def __init__(self, location, storage_options: dict | None = None):
        self.location = str(location)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.location, **self.storage_options)
        self.root = self.root.rstrip("/")
        manifest_path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(manifest_path):
            raise CorpusFormatError(
                f"{self.location}: no {MANIFEST}; not a celltron corpus (build one with `celltron corpus build`)"
            )
        self.manifest = parse_json(
            self.fs.cat_file(manifest_path),
            f"{self.location}/{MANIFEST}",
            "corpus manifest",
            "copy the corpus again, or rebuild it with `celltron corpus build --overwrite`",
        )
        check_manifest(self.manifest, self.location)

    @property
    def n_genes(self) -> int:
        return len(self.manifest["genes"]["ensembl_id"])

    @property
    def modalities(self) -> list[str]:
        """["rna"] for an RNA corpus; every modality of a multi-modal one (RNA first)."""
        return list(self.manifest.get("modalities", {"rna": None}))

    @property
    def multimodal(self) -> bool:
        return "modalities" in self.manifest

    def n_features(self, modality: str = "rna") -> int:
        """Genes for RNA; antigens, genomic bins for the other modalities."""
        if modality == "rna":
            return self.n_genes
        if modality not in self.modalities:
            raise ConfigError(f"{self.location}: no modality {modality!r}; this corpus holds {', '.join(self.modalities)}")
        return self.manifest["modalities"][modality]["n_features"]

    def feature_names(self, modality: str = "rna") -> np.ndarray:
        if modality == "rna":
            return self.gene_ids
        self.n_features(modality)  # refuses an unknown modality
        return np.asarray(self.manifest["modalities"][modality]["features"]["name"], dtype=str)

    @cached_property
    def gene_ids(self) -> np.ndarray:
        return np.asarray(self.manifest["genes"]["ensembl_id"], dtype=str)

    def gene_medians(self) -> dict[str, float]:
        """Ensembl ID -> non-zero median of normalised expression, for genes seen in the corpus."""
        genes = self.manifest["genes"]
        return {g: m for g, m in zip(genes["ensembl_id"], genes["nonzero_median"]) if m is not None}

    def shards(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {SPLITS}")
        return self.manifest["splits"][split]["shards"]

    def open_shard(self, split: str, index: int) -> ShardReader:
        return ShardReader(self, self.shards(split)[index])

    def shard_url(self, record: dict, modality: str | None = None) -> str:
        """A shard's store; with `modality`, in a multi-modal corpus, that modality's AnnData-Zarr store."""
        return f"{self.root}/{record['path']}" + (f"/mod/{modality}" if modality and self.multimodal else "")

    def zarr_store(self, record: dict, modality: str = "rna"):
        path = self.shard_url(record, modality)
        if _is_local(self.fs):
            # zarrs reads local files itself, but only through zarr's own LocalStore
            zarrs = zarr.config.get("codec_pipeline.path", "").startswith("zarrs")
            return zarr.storage.LocalStore(path, read_only=True) if zarrs else MappedLocalStore(path)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return zarr.storage.FsspecStore.from_url(f"{protocol}://{path}", storage_options=self.storage_options, read_only=True)

    def validate(self) -> list[str]:
        """Re-check every shard's checksum and schema; returns the problems found (empty = valid).
        A shard whose checksum does not match is read block by block with every check, to name
        the damaged cells."""
        problems, mismatched, present = [], [], 0
        for split in SPLITS:
            for record in self.shards(split):
                url = self.shard_url(record)
                if not self.fs.exists(url):
                    problems.append(f"{record['path']}: missing")
                    continue
                present += 1
                if checksum_files(self.fs, url) != record["sha256"]:
                    mismatched.append(record)
                    continue
                problems.extend(_schema_problems(self, record))
        return problems + self._mismatch_problems(mismatched, every_shard=len(mismatched) == present)

    def _spelling_keyed_checksums(self) -> bool:
        """Whether the manifest predates checksums keyed independently of the --out spelling."""
        return self.manifest.get("checksum_version", 1) < CHECKSUM_VERSION

    def _mismatch_problems(self, mismatched: list[dict], every_shard: bool) -> list[str]:
        # Builds before checksum_version 2 keyed a relative --out's checksums by its spelling, which
        # is lost (it named a temporary directory): then every shard mismatches, while every block
        # still passes the checks. One damaged shard among intact ones is damage, not spelling.
        spelling = self._spelling_keyed_checksums() and every_shard
        problems = []
        for record in mismatched:
            found = scan_shard(self, record)
            if found:
                problems.append(f"{record['path']}: checksum mismatch; damaged: {'; '.join(found)}")
            elif spelling:
                problems.append(
                    f"{record['path']}: checksum mismatch, yet every block passes the structural checks: {SPELLING_KEYED} "
                    f"(corpora built before checksum_version {CHECKSUM_VERSION}); if it was built with a relative --out, "
                    f"re-record the checksums with `celltron corpus validate {self.location} --rekey`, otherwise rebuild it"
                )
            else:
                problems.append(f"{record['path']}: checksum mismatch (corrupted or modified)")
        return problems

    def rekey_checksums(self) -> int:
        """Re-record the shard checksums of a corpus built before checksum_version 2 (whose
        checksums depended on how a relative --out was spelled), once every shard passes every
        other check; returns how many shards got a new checksum. Refused for newer corpora,
        where a mismatch can only mean the shard changed."""
        if not self._spelling_keyed_checksums():
            raise CorpusFormatError(
                f"{self.location}: checksums are already independent of the --out spelling (checksum_version "
                f"{self.manifest['checksum_version']}), so a mismatch means a shard changed: rebuild the corpus"
            )
        problems = self.validate()
        damage = [p for p in problems if SPELLING_KEYED not in p]
        if damage:
            raise CorpusDamagedError(
                f"{self.location}: not re-keyed, {len(damage)} shard(s) fail other checks, e.g. {damage[0]}; rebuild the corpus"
            )
        changed = 0
        for split in SPLITS:
            for record in self.shards(split):
                digest = checksum_files(self.fs, self.shard_url(record))
                changed += digest != record["sha256"]
                record["sha256"] = digest
        self.manifest["checksum_version"] = CHECKSUM_VERSION
        self._write_manifest()
        return changed

    def _write_manifest(self) -> None:
        """Replace manifest.json whole: a renamed temporary file locally, one PUT on object stores."""
        path, data = f"{self.root}/{MANIFEST}", dump_manifest(self.manifest)
        if not _is_local(self.fs):
            self.fs.pipe_file(path, data)
            return
        write_bytes_atomically(path, data)

    def summary(self) -> dict:
        """A short description of the corpus (what `celltron corpus info` prints)."""
        m = self.manifest
        genes = m["genes"]
        species = {s: genes["species"].count(s) for s in sorted(set(genes["species"]))}
        summary = {
            "location": self.location,
            "schema_version": m["schema_version"],
            "created": m["created"],
            "n_cells": m["n_cells"],
            "splits": {s: {"n_cells": m["splits"][s]["n_cells"], "n_shards": len(m["splits"][s]["shards"])} for s in SPLITS},
            "n_genes": len(genes["ensembl_id"]),
            "genes_per_species": species,
            "gene_median": m["gene_median"],
            "obs_columns": {k: len(v) for k, v in m["obs_categories"].items()},
            "sources": [
                {
                    k: src[k]
                    for k in (
                        "path",
                        "species",
                        "n_cells_in",
                        "n_cells_kept",
                        "n_empty_dropped",
                        "n_qc_dropped",
                        "n_genes_unmapped",
                        "unmapped_counts",
                        "weight",
                    )
                }
                for src in m["sources"]
            ],
        }
        if self.multimodal:
            summary["modalities"] = {
                name: {k: v for k, v in record.items() if k != "features"} for name, record in m["modalities"].items()
            }
        return summary


def _schema_problems(corpus: Corpus, record: dict) -> list[str]:
    """What is wrong with the layout of a shard's X (each modality's in a multi-modal corpus)."""
    return [p for modality in corpus.modalities for p in _matrix_problems(corpus, record, modality)]


def _matrix_problems(corpus: Corpus, record: dict, modality: str) -> list[str]:
    where = record["path"] + (f" ({modality})" if corpus.multimodal else "")
    n_features = corpus.n_features(modality)
    nnz = record.get("nnz_by_modality", {}).get(modality, record["nnz"])
    try:
        group = zarr.open_group(corpus.zarr_store(record, modality), mode="r")
        x = group["X"]
        shape = tuple(x.attrs["shape"])
        indptr = x["indptr"][:]
    except Exception as error:  # any unreadable piece makes the shard invalid
        return [f"{where}: unreadable ({error})"]
    problems = []
    if x.attrs.get("encoding-type") != "csr_matrix":
        problems.append(f"{where}: X is not a csr_matrix")
    if shape != (record["n_cells"], n_features) or len(indptr) != record["n_cells"] + 1:
        problems.append(f"{where}: X has shape {shape}, manifest says ({record['n_cells']}, {n_features})")
    if int(indptr[-1]) != nnz or x["data"].shape[0] != nnz:
        problems.append(f"{where}: X holds {int(indptr[-1])} non-zeros, manifest says {nnz}")
    return problems


def scan_shard(corpus: Corpus, record: dict, block_cells: int = 4096, limit: int = 5) -> list[str]:
    """Read every block of a shard with every check (`ShardReader(full_checks=True)`); what is
    damaged (at most `limit` blocks), or [] when every block passes."""
    try:
        reader = ShardReader(corpus, record, full_checks=True)
    except CorpusDamagedError as error:
        return [error.detail]
    except Exception as error:  # any unreadable piece makes the shard invalid
        return [f"unreadable ({type(error).__name__}: {error})"]
    found = []
    try:
        for start in range(0, record["n_cells"], block_cells):
            try:
                reader.read(start, min(start + block_cells, record["n_cells"]))
            except CorpusDamagedError as error:
                found.append(error.detail)
                if len(found) == limit:
                    break
    finally:
        reader.close()
    return found


def _direct_arrays(store, verify: bool) -> tuple[ShardedArray, ShardedArray] | None:
    """`X/data` and `X/indices` read directly from mapped local files (see `sharded.py`);
    None for remote stores and for the zarrs pipeline (which then does the decoding)."""
    if not isinstance(store, MappedLocalStore):
        return None
    data, indices = open_direct(store.root / "X" / "data", verify), open_direct(store.root / "X" / "indices", verify)
    return (data, indices) if data is not None and indices is not None else None


_NOTED: set[str] = set()


def _note_no_inner_checksums(location: str) -> None:
    """Say once per corpus and process that its chunks carry no crc32c (built by an older celltron)."""
    if location not in _NOTED:
        _NOTED.add(location)
        log.warning(
            "%s: built before chunks carried crc32c checksums; every block's values are checked instead "
            "(slower, and a damaged count within the checked bounds can pass): rebuild the corpus with "
            "`celltron corpus build --overwrite` for full checks",
            location,
        )


def _why(error: Exception) -> str:
    """A reader's error in a few words (zarr's crc32c codec says 'Stored and computed checksum ...')."""
    if "computed checksum" in str(error):
        return "a chunk fails its crc32c checksum"
    return f"{type(error).__name__}: {error}"


def _zarrs_decodes(array) -> bool:
    """Whether zarrs decodes this X array: it reads inner chunks with partial decoders that skip
    their crc32c, so its blocks get the value checks instead."""
    return not isinstance(array, ShardedArray) and zarr.config.get("codec_pipeline.path", "").startswith("zarrs")


def _inner_checksummed(array) -> bool:
    """Whether the inner chunks of a (sharded) X array end in a crc32c (corpora built since)."""
    if isinstance(array, ShardedArray):
        return array.checksummed
    codecs = array.metadata.to_dict().get("codecs", ())
    if codecs and codecs[0]["name"] == "sharding_indexed":
        codecs = codecs[0]["configuration"]["codecs"]
    return any(codec["name"] == "crc32c" for codec in codecs)


def indptr_problem(indptr: np.ndarray, n_cells: int, nnz: int) -> str | None:
    """What is wrong with a shard's CSR row pointers, or None: one entry per cell plus one,
    starting at 0, never decreasing, ending at the number of stored non-zeros."""
    if len(indptr) != n_cells + 1:
        return f"X/indptr has {len(indptr)} entries for {n_cells} cells"
    if indptr[0] != 0:
        return f"X/indptr starts at {indptr[0]}, not 0 (cell 0)"
    down = np.flatnonzero(np.diff(indptr) < 0)
    if len(down):
        return f"X/indptr decreases after cell {down[0]} (cells {down[0]}-{down[0] + 1})"
    if indptr[-1] != nnz:
        return f"X/indptr ends at {indptr[-1]}, X holds {nnz} non-zeros"
    return None


def values_problem(
    indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray, n_counts: np.ndarray, n_genes: int, first_cell: int = 0
) -> str | None:
    """What is wrong with a block's non-zeros, or None; cells are numbered from `first_cell`.

    Gene indices in [0, n_genes) and strictly increasing within each cell (the builder writes
    them sorted, without duplicates); counts non-negative, and per cell no more than its obs
    n_counts (the total over every input gene, mapped or not), which catches most flipped
    bytes in counts of corpora without inner checksums. Each check is one cheap reduction;
    positions are looked up only once one fails."""
    if len(genes) == 0:
        return None
    row = lambda position: first_cell + int(np.searchsorted(indptr, position, side="right") - 1)  # noqa: E731
    if genes.min() < 0 or genes.max() >= n_genes:
        at = int(np.flatnonzero((genes < 0) | (genes >= n_genes))[0])
        return f"cell {row(at)} has gene index {genes[at]}, the corpus has {n_genes} genes"
    steps = np.diff(genes)  # in range, so no overflow
    starts = indptr[1:-1]
    steps[starts[(starts > 0) & (starts < len(genes))] - 1] = 1  # a new cell may start lower
    if len(steps) and steps.min() <= 0:
        return f"cell {row(int(np.flatnonzero(steps <= 0)[0]) + 1)} lists gene indices out of order or twice"
    if counts.min() < 0:
        at = int(np.flatnonzero(counts < 0)[0])
        return f"cell {row(at)} has a negative count {counts[at]}"
    nonempty = indptr[:-1] < indptr[1:]
    sums = np.zeros(len(indptr) - 1, dtype=np.int64)
    sums[nonempty] = np.add.reduceat(counts, indptr[:-1][nonempty], dtype=np.int64)  # int64: a damaged count cannot wrap
    over = np.flatnonzero(sums > n_counts)
    if len(over):
        return f"cell {first_cell + over[0]} holds {sums[over[0]]} counts, more than its n_counts {n_counts[over[0]]}"
    return None


@dataclass
class CellBlock:
    """Contiguous cells of one shard: CSR arrays plus per-cell obs codes. In a multi-modal corpus
    this is RNA, and `modalities` holds the same cells' other modalities (`genes` there are
    feature indices: antigens, genomic bins; obs: n_counts and `measured`)."""

    indptr: np.ndarray
    genes: np.ndarray
    counts: np.ndarray
    obs: dict[str, np.ndarray]
    first_index: int  # corpus-wide index of the first cell (split order)
    modalities: dict[str, CellBlock] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indptr) - 1


class ShardReader:
    """Reads contiguous row ranges of one shard; `indptr` and obs codes are cached on open.

    Every read is checked, so damaged data stops a run instead of feeding it: each inner chunk's
    crc32c (corpora built since chunks carry one; the direct reader and zarr both check it),
    `indptr` on open (`indptr_problem`), and the values of every block (`values_problem`) for
    corpora whose chunks carry no crc32c, under the zarrs pipeline (which skips them), or with
    `full_checks` (`celltron corpus validate`).
    Damage raises CorpusDamagedError naming the shard, the cells and `celltron corpus validate`.
    """

    def __init__(self, corpus: Corpus, record: dict, full_checks: bool = False, modality: str = "rna"):
        self.where, self.location = corpus.shard_url(record, modality), corpus.location
        self.n_genes = corpus.n_features(modality)
        verify = full_checks or read_checks_enabled()
        self.store = corpus.zarr_store(record, modality)
        self.others: dict[str, ShardReader] = {}  # the other modalities, read beside RNA
        try:
            group = self._read(None, "")
            self.data, self.indices = _direct_arrays(self.store, verify) or (group["X/data"], group["X/indices"])
            self.indptr = self._read(group, "X/indptr")
            self.obs = {"n_counts": self._read(group, "obs/n_counts")}
            if modality != "rna":  # per-modality fields only: the labels are RNA's
                self.obs["measured"] = self._read(group, "obs/measured").astype(bool)
            else:
                for column in corpus.manifest["obs_categories"]:
                    self.obs[column] = self._read(group, f"obs/{column}/codes").astype(np.int32)
            if modality == "rna":
                for other in corpus.modalities[1:]:
                    self.others[other] = ShardReader(corpus, record, full_checks, other)
        except BaseException:
            self.close()
            raise
        checksummed = _inner_checksummed(self.data)
        self.check_values = verify and (full_checks or not checksummed or _zarrs_decodes(self.data))
        if not checksummed:
            _note_no_inner_checksums(corpus.location)
        problem = indptr_problem(self.indptr, record["n_cells"], self.data.shape[0]) if verify else None
        if problem is None and verify and len(self.obs["n_counts"]) != record["n_cells"]:
            problem = f"obs holds {len(self.obs['n_counts'])} cells, the manifest says {record['n_cells']}"
        if problem:
            self.close()
            raise damaged(self.where, problem, self.location)

    def _read(self, group, key: str):
        """The whole array `key` of `group` (the shard's group itself when `group` is None), with
        zarr's checksum and decoder errors turned into one naming the shard and the array."""
        try:
            return zarr.open_group(self.store, mode="r") if group is None else group[key][:]
        except (ValueError, RuntimeError) as error:  # a failed crc32c, bytes no decoder accepts, broken metadata
            raise damaged(self.where, f"{key or 'zarr.json'} cannot be read ({_why(error)})", self.location) from error

    def close(self) -> None:
        """Release the store's open files (mapped shards)."""
        for other in self.others.values():
            other.close()
        for array in (getattr(self, "data", None), getattr(self, "indices", None)):
            # duck-typed: a direct reader (ShardedArray) has files to release, a zarr array none;
            # and at interpreter exit this module's globals may already be gone
            close = getattr(array, "close", None)
            if close is not None:
                close()
        self.store.close()

    def _nonzeros(self, array, name: str, lo: int, hi: int, cells: tuple[int, int]) -> np.ndarray:
        """array[lo:hi], with a failed crc32c or bytes no decoder accepts reported as damage of `cells`."""
        try:
            return array[lo:hi]
        except (ValueError, RuntimeError) as error:
            detail = getattr(error, "detail", "") or f"{name} cannot be read ({_why(error)})"
            raise damaged(self.where, f"block of cells {cells[0]}-{cells[1] - 1}: {detail}", self.location) from error

    def read(self, start: int, stop: int, first_index: int = 0) -> CellBlock:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        genes = self._nonzeros(self.indices, "X/indices", lo, hi, (start, stop))
        counts = self._nonzeros(self.data, "X/data", lo, hi, (start, stop))
        indptr = self.indptr[start : stop + 1] - lo
        if self.check_values:
            problem = values_problem(indptr, genes, counts, self.obs["n_counts"][start:stop], self.n_genes, start)
            if problem:
                raise damaged(self.where, f"block of cells {start}-{stop - 1}: {problem}", self.location)
        return CellBlock(
            indptr=indptr,
            genes=genes,
            counts=counts,
            obs={key: values[start:stop] for key, values in self.obs.items()},
            first_index=first_index,
            modalities={m: other.read(start, stop, first_index) for m, other in self.others.items()},
        )


def log_normalised_cells(corpus: Corpus, split: str, max_cells: int, block_cells: int) -> Iterator[sp.csr_matrix]:
    """The first `max_cells` cells of `split` in shard order, log-normalised, as CSR blocks
    (cells, corpus genes). Cells were shuffled across inputs when the corpus was built,
    so the first cells are a random sample of the split, and every rank reads the same ones."""
    left = max_cells
    for index, record in enumerate(corpus.shards(split)):
        reader = corpus.open_shard(split, index)
        try:
            end = min(record["n_cells"], left)
            for start in range(0, end, block_cells):
                stop = min(start + block_cells, end)
                block = reader.read(start, stop)
                counts = sp.csr_matrix((block.counts, block.genes, block.indptr), shape=(len(block), corpus.n_genes))
                yield log_normalise(counts)
        finally:
            reader.close()
        left -= end
        if left == 0:
            return
