"""Several measurements of the same cells: RNA, surface proteins (ADT) and open chromatin (ATAC).

Three ways in, one result (`MultiModalInput`): per modality a `Source` (readers.py) over its own
cells, and the joint cell order with, per modality, each joint cell's row in that source (-1
where the cell was not measured there: mosaic data).

- a MuData `.h5mu` file: each modality is an AnnData under `/mod/<name>` (the scverse on-disk
  format). It is read through anndata's element readers in blocks, as `.h5ad` inputs are, so a
  file larger than memory can still be converted; `mudata.read_h5mu` opens the same file whole.
- paired files, one per modality (`--modality rna=A.h5ad --modality adt=B.h5ad`), joined on obs
  names;
- a 10x `.h5` whose features carry several `feature_type`s (Gene Expression, Antibody Capture,
  Peaks), as Cell Ranger's feature barcoding and Cell Ranger ARC write them.

Cells must be measured in every modality unless mosaic input is allowed (`mosaic=True`): a
mismatch is refused with the count of unmatched cells per modality, since it usually means the
files are not from the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from celltron.corpus.readers import Source, _open_10x_h5, anndata_group_source, open_source, tenx_feature_types
from celltron.errors import InputError
from celltron.inputs import open_h5

MODALITIES = ("rna", "adt", "atac")
# Every spelling of a modality that a file or a flag may use (lower case) -> its name here.
MODALITY_NAMES = {
    **dict.fromkeys(("rna", "gex", "gene expression", "mrna", "scrna"), "rna"),
    **dict.fromkeys(("adt", "prot", "protein", "proteins", "antibody capture", "cite"), "adt"),
    **dict.fromkeys(("atac", "peaks", "chromatin", "chromatin accessibility"), "atac"),
}


def modality_name(name: str, where: str = "") -> str:
    """rna, adt or atac for any accepted spelling; anything else is refused."""
    found = MODALITY_NAMES.get(str(name).strip().lower())
    if found is None:
        raise InputError(
            f"{where or 'modality'}: unknown modality {name!r}; use rna (gene expression), adt (proteins, antibody "
            "capture) or atac (peaks)"
        )
    return found


@dataclass
class MultiModalInput:
    """Sources of one multi-modal dataset and how their cells line up.

    Attributes:
        path: the input (the .h5mu / .h5 file, or the first of the paired files).
        name: dataset name stored with the cells.
        sources: {modality: Source}, in MODALITIES order.
        cell_names: the joint cells (the first modality's order, then cells the others add).
        rows: {modality: per joint cell, its row in that modality's source, -1 if not measured}.
        genome: the genome build the input states for its peaks (None when it does not say).
    """

    path: Path
    name: str
    sources: dict[str, Source]
    cell_names: np.ndarray
    rows: dict[str, np.ndarray]
    genome: str | None = None

    @property
    def n_cells(self) -> int:
        return len(self.cell_names)

    @property
    def modalities(self) -> list[str]:
        return list(self.sources)

    def mask(self) -> np.ndarray:
        """(cells x modalities) bool: which modalities measured each cell."""
        return np.stack([self.rows[m] >= 0 for m in self.sources], axis=1)

    def read_cells(self, modality: str, start: int, stop: int) -> sp.csr_matrix:
        """Counts of joint cells [start, stop) in `modality`: rows of unmeasured cells are empty."""
        source, rows = self.sources[modality], self.rows[modality][start:stop]
        measured = rows >= 0
        block = read_source_rows(source, rows[measured])
        empty = sp.csr_matrix((1, len(source.gene_names)), dtype=block.dtype)
        padded = sp.vstack([block, empty], format="csr")
        pick = np.full(len(rows), block.shape[0], dtype=np.int64)  # the empty row
        pick[measured] = np.arange(int(measured.sum()))
        return padded[pick]

    def close(self) -> None:
        closed = set()
        for source in self.sources.values():
            if id(source.close) not in closed:
                source.close()
                closed.add(id(source.close))


GAP = 256  # rows: needed rows closer than this are read as one range


def read_source_rows(source: Source, rows: np.ndarray) -> sp.csr_matrix:
    """Rows of a source in the given order, read as few ranges as possible (paired files need not
    list their cells in the same order, so one block of joint cells may be scattered)."""
    if len(rows) == 0:
        return sp.csr_matrix((0, len(source.gene_names)), dtype=np.int32)
    order = np.argsort(rows, kind="stable")
    ascending = rows[order]
    breaks = np.flatnonzero(np.diff(ascending) > GAP) + 1
    pieces = [source.read_rows(int(run[0]), int(run[-1]) + 1)[run - run[0]] for run in np.split(ascending, breaks)]
    stacked = sp.vstack(pieces, format="csr")
    back = np.empty(len(rows), dtype=np.int64)
    back[order] = np.arange(len(rows))
    return stacked[back]


def open_multimodal(
    path: str | Path | None = None,
    modalities: dict[str, str | Path] | None = None,
    mosaic: bool = False,
    layer: str = "X",
    gene_column: str | None = None,
) -> MultiModalInput:
    """A multi-modal input: one `.h5mu` or multi-feature-type 10x `.h5` file (`path`), or paired
    files ({modality: file}). `layer` and `gene_column` apply to the RNA modality."""
    if (path is None) == (not modalities):
        raise InputError("give either one multi-modal file (.h5mu, 10x .h5) or one file per modality (--modality NAME=FILE)")
    if modalities:
        return _open_paired(modalities, mosaic, layer, gene_column)
    path = Path(path)
    if path.suffix == ".h5mu":
        return _open_h5mu(path, mosaic, layer, gene_column)
    if path.suffix == ".h5":
        return _open_10x_multi(path)
    raise InputError(
        f"{path}: not a multi-modal file; pass a MuData .h5mu, a 10x .h5 with several feature types, or --modality files"
    )


def _open_paired(files: dict[str, str | Path], mosaic: bool, layer: str, gene_column: str | None) -> MultiModalInput:
    sources: dict[str, Source] = {}
    try:
        for given, file in files.items():
            modality = modality_name(given, f"--modality {given}={file}")
            if modality in sources:
                raise InputError(f"--modality {given}={file}: modality {modality} given twice")
            rna = modality == "rna"
            sources[modality] = open_source(file, layer if rna else "X", gene_column if rna else None)
            sources[modality].modality = modality
        ordered = {m: sources[m] for m in MODALITIES if m in sources}
        cells, rows = join_cells({m: s.cell_names for m, s in ordered.items()}, {m: s.path for m, s in ordered.items()}, mosaic)
    except Exception:
        for source in sources.values():
            source.close()
        raise
    first = next(iter(ordered.values()))
    return MultiModalInput(first.path, first.name, ordered, cells, rows)


def _open_h5mu(path: Path, mosaic: bool, layer: str, gene_column: str | None) -> MultiModalInput:
    handle = open_h5(path, require=("mod",))
    try:
        sources = {}
        for stored in handle["mod"].keys():
            modality = modality_name(stored, f"{path}: /mod/{stored}")
            if modality in sources:
                raise InputError(f"{path}: two modalities are {modality} (/mod/{stored} and another); keep one")
            rna = modality == "rna"
            sources[modality] = anndata_group_source(
                handle, path, f"mod/{stored}/", layer if rna else "X", gene_column if rna else None, path.stem, close=False
            )
            sources[modality].modality = modality
        ordered = {m: sources[m] for m in MODALITIES if m in sources}
        if not ordered:
            raise InputError(f"{path}: no modality under /mod")
        cells, rows = join_cells({m: s.cell_names for m, s in ordered.items()}, {m: path for m in ordered}, mosaic)
        genome = _uns_genome(handle, "mod/" + _stored_name(handle, "atac") + "/") if "atac" in ordered else None
    except Exception:
        handle.close()
        raise
    for source in ordered.values():
        source.close = handle.close
    return MultiModalInput(path, path.stem, ordered, cells, rows, genome)


def _stored_name(handle, modality: str) -> str:
    return next(name for name in handle["mod"].keys() if modality_name(name) == modality)


def _uns_genome(handle, group: str) -> str | None:
    """A genome build stated in uns['genome'] (or uns['genome_build']) of an AnnData group."""
    for key in ("uns/genome", "uns/genome_build"):
        if group + key in handle:
            value = handle[group + key][()]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _open_10x_multi(path: Path) -> MultiModalInput:
    types = tenx_feature_types(path)
    sources: dict[str, Source] = {}
    for feature_type in types:
        modality = modality_name(feature_type, f"{path}: feature_type")
        sources[modality] = _open_10x_h5(path, feature_type)
        sources[modality].modality = modality
    ordered = {m: sources[m] for m in MODALITIES if m in sources}
    first = next(iter(ordered.values()))
    rows = {m: np.arange(first.n_cells) for m in ordered}  # one matrix: every cell in every modality
    genome = None
    if "atac" in ordered:
        with open_h5(path) as handle:
            if "matrix/features/genome" in handle:
                kinds = np.asarray(handle["matrix/features/feature_type"][:]).astype(str)
                genomes = set(np.asarray(handle["matrix/features/genome"][:]).astype(str)[kinds == "Peaks"])
                genome = genomes.pop() if len(genomes) == 1 else None
    return MultiModalInput(path, first.name, ordered, first.cell_names, rows, genome)


def join_cells(names: dict[str, np.ndarray], where: dict[str, Path], mosaic: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The joint cells of several modalities ({modality: obs names}) and each one's row per
    modality (-1: not measured). Duplicate names within a modality are refused; cells missing from
    some modality are refused unless `mosaic`."""
    for modality, cells in names.items():
        unique, counts = np.unique(cells, return_counts=True)
        if (counts > 1).any():
            raise InputError(
                f"{where[modality]} ({modality}): {int((counts > 1).sum())} obs names occur more than once, "
                f"e.g. {unique[counts > 1][0]!r}; cells are joined across modalities by name, so make them unique"
            )
    order: list[str] = []
    seen: set[str] = set()
    for cells in names.values():
        for cell in cells:
            if cell not in seen:
                seen.add(cell)
                order.append(cell)
    joint = np.asarray(order, dtype=object)
    rows = {}
    for modality, cells in names.items():
        position = {c: i for i, c in enumerate(cells)}
        rows[modality] = np.asarray([position.get(c, -1) for c in joint], dtype=np.int64)
    missing = {m: int((r < 0).sum()) for m, r in rows.items()}
    if not mosaic and any(missing.values()):
        listed = "; ".join(f"{where[m]} ({m}) lacks {n} of the {len(joint)} cells" for m, n in missing.items() if n)
        raise InputError(
            f"the modalities do not hold the same cells: {listed} (joined on obs names). Subset the files to the "
            "same cells, fix the names, or pass --mosaic to keep cells measured in only some modalities"
        )
    return joint.astype(str), rows
