"""Paired cells for the cross-modal tasks: every modality's raw counts of the same cells, in one
order, read whole (a lab's paired set fits in memory: TEA-seq's 1,262 cells, SNARE-seq's 10,309).

The input is a MuData `.h5mu`, a multi-feature 10x `.h5`, or one file per modality
(`crossmodal.modalities: [rna=A.h5ad, adt=B.h5ad]`), read by the corpus's multi-modal readers
(`corpus.modalities`), so the spellings of modality names and the raw-count check are the ones
`corpus build` uses. Unlike a corpus, a cross-modal task needs every cell in both of its
modalities: unpaired cells are refused, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.corpus.modalities import MultiModalInput, modality_name, open_multimodal
from celltron.corpus.readers import check_raw_counts
from celltron.errors import ConfigError, InputError

PAIRED_FIX = "subset every modality to the same cells (joined on obs names) before the cross-modal task"


@dataclass
class PairedCells:
    """Raw counts of the same cells in several modalities.

    Attributes:
        path: where they came from (the .h5mu, or the first of the paired files).
        counts: {modality: (cells, features) CSR of raw counts, rows in `cell_names` order}.
        features: {modality: feature names}.
        cell_names: the cells.
        obs: cell annotations, from every modality's obs (the first modality's columns win).
        files: {modality: the file it was read from}.
    """

    path: Path
    counts: dict[str, sp.csr_matrix]
    features: dict[str, np.ndarray]
    cell_names: np.ndarray
    obs: pd.DataFrame
    files: dict[str, Path]

    @property
    def n_cells(self) -> int:
        return len(self.cell_names)

    def column(self, key: str, flag: str) -> np.ndarray:
        """An obs column as strings, refused when absent or when a cell lacks a value."""
        if key not in self.obs.columns:
            raise InputError(f"{self.path}: no obs column {key!r} ({flag}); columns are {list(self.obs.columns)[:20]}")
        values = self.obs[key]
        if values.isna().any():
            raise InputError(
                f"{self.path}: obs[{key!r}] ({flag}) is empty for {int(values.isna().sum())} cells; "
                "drop those cells or fill the column first"
            )
        return values.astype(str).to_numpy()


def parse_modality_files(entries) -> dict[str, str]:
    """['rna=A.h5ad', 'adt=B.h5ad'] -> {'rna': 'A.h5ad', 'adt': 'B.h5ad'}."""
    files = {}
    for entry in entries:
        name, sep, file = str(entry).partition("=")
        if not sep or not name or not file:
            raise ConfigError(f"--modality {entry!r}: write NAME=FILE, e.g. --modality rna=cells_rna.h5ad")
        files[name.strip()] = file.strip()
    return files


def read_paired(path: str | None, modality_files: dict[str, str], wanted: tuple[str, ...], layer: str = "X") -> PairedCells:
    """The `wanted` modalities (e.g. ('rna', 'adt')) of a paired input: one multi-modal file
    (`path`) or one file per modality. Every wanted modality must be present and measure every
    cell; counts must be raw integers."""
    wanted = tuple(modality_name(m, "cross-modal task") for m in wanted)
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"--source and --target are both {wanted[0]}; a cross-modal task needs two different modalities")
    if not path and not modality_files:
        raise ConfigError("no paired data: pass --data PAIRED.h5mu, or --modality rna=A.h5ad --modality adt=B.h5ad")
    data = open_multimodal(path or None, modality_files or None, mosaic=True, layer=layer)
    try:
        missing = [m for m in wanted if m not in data.sources]
        if missing:
            raise InputError(
                f"{data.path}: no {', '.join(missing)} modality (it holds {', '.join(data.modalities)}); "
                "pass data measured in both --source and --target"
            )
        _check_paired(data, wanted)
        counts = {m: _counts_in_joint_order(data, m) for m in wanted}
        features = {m: np.asarray(data.sources[m].gene_names).astype(str) for m in wanted}
        obs = _joint_obs(data, wanted)
        files = {m: Path(data.sources[m].path) for m in wanted}
    finally:
        data.close()
    paired = PairedCells(Path(data.path), counts, features, np.asarray(data.cell_names).astype(str), obs, files)
    for modality in wanted:
        _check_measured(paired, modality)
    return paired


def _check_paired(data: MultiModalInput, wanted: tuple[str, ...]) -> None:
    """Every cell measured in every wanted modality (the corpus readers allow mosaic data)."""
    for modality in wanted:
        unmatched = int((data.rows[modality] < 0).sum())
        if unmatched:
            example = data.cell_names[np.flatnonzero(data.rows[modality] < 0)[0]]
            raise InputError(
                f"{data.sources[modality].path} ({modality}): {unmatched} of the {data.n_cells} cells are not measured "
                f"in {modality}, e.g. {example!r}; cross-modal tasks need paired cells: {PAIRED_FIX}"
            )


def _counts_in_joint_order(data: MultiModalInput, modality: str) -> sp.csr_matrix:
    source = data.sources[modality]
    counts = source.read_rows(0, source.n_cells).tocsr()
    check_raw_counts(counts, source, 0)
    return counts[data.rows[modality]]


def _joint_obs(data: MultiModalInput, wanted: tuple[str, ...]) -> pd.DataFrame:
    """Each modality's obs columns, rows in the joint cell order; a column already taken by an
    earlier modality keeps the earlier one's values."""
    obs = pd.DataFrame(index=pd.Index(np.asarray(data.cell_names).astype(str)))
    for modality in wanted:
        source = data.sources[modality]
        if source.obs is None or source.obs.empty:
            continue
        rows = source.obs.iloc[data.rows[modality]]
        for column in rows.columns:
            if column not in obs.columns:
                obs[column] = rows[column].to_numpy()
    return obs


def _check_measured(paired: PairedCells, modality: str) -> None:
    """No cell without any count in a modality: it has no profile to predict from or to match."""
    totals = np.asarray(paired.counts[modality].sum(axis=1)).ravel()
    empty = np.flatnonzero(totals == 0)
    if len(empty):
        raise InputError(
            f"{paired.files[modality]} ({modality}): {len(empty)} cells have no counts, e.g. {paired.cell_names[empty[0]]!r}; "
            "drop them (they were not measured in this modality) before the cross-modal task"
        )


def align_panel(names: np.ndarray, reference: np.ndarray, where: str, what: str = "protein panel") -> np.ndarray:
    """Columns of `names` in `reference`'s order: the same set of features, in any order;
    refused, naming the features that differ, otherwise."""
    names, reference = np.asarray(names).astype(str), np.asarray(reference).astype(str)
    extra = sorted(str(n) for n in set(names) - set(reference))
    missing = sorted(str(n) for n in set(reference) - set(names))
    if extra or missing or len(names) != len(reference):
        raise InputError(
            f"{where}: its {what} differs from the training cells' ({len(names)} vs {len(reference)} features; "
            f"not in training: {extra[:5]}, missing: {missing[:5]}); predictions and scores need the same panel, so "
            "subset both to the shared features"
        )
    position = {name: i for i, name in enumerate(names)}
    return np.asarray([position[name] for name in reference], dtype=np.int64)
