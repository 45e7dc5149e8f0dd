"""A lab's AnnData for fine-tuning: raw counts checked, genes mapped to Ensembl IDs, cells
tokenised with the pretrained model's own tokenizer (the files saved beside its weights).

Every problem is named with the file, the field and the fix: a missing obs column, a matrix
that is not raw counts, gene names that do not map to the model's vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltron.corpus.build import to_corpus_genes
from celltron.corpus.genes import infer_species, map_genes
from celltron.corpus.readers import check_raw_counts, open_source
from celltron.tokenizers.dataset import Block, encode
from celltron.tokenizers.ragged import RaggedTokens

log = logging.getLogger(__name__)


@dataclass
class LabData:
    """Raw counts of a lab's cells over the genes that map to Ensembl IDs.

    Attributes:
        path: the file read.
        obs: the file's cell annotations.
        gene_names: the file's gene names, in its column order (what metrics report).
        counts: (cells, file genes) raw counts, CSR, in the file's column order.
        gene_ids: Ensembl ID of each file gene ('' where it does not map).
        species: the cells' species.
        cell_names: the file's cell names (obs names), in its row order.
    """

    path: Path
    obs: pd.DataFrame
    gene_names: np.ndarray
    counts: sp.csr_matrix
    gene_ids: np.ndarray
    species: str
    cell_names: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    def mapped_genes(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique mapped Ensembl IDs (first-seen order) and, per file column, its index among them (-1: unmapped)."""
        return mapped_genes(self.gene_ids)


def mapped_genes(gene_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique mapped Ensembl IDs (first-seen order) and, per file column, its index among them (-1: unmapped)."""
    mapped = gene_ids[gene_ids != ""]
    _, first = np.unique(mapped, return_index=True)
    unique = mapped[np.sort(first)]
    position = {g: i for i, g in enumerate(unique)}
    return unique, np.array([position.get(g, -1) for g in gene_ids], dtype=np.int64)


def open_lab_source(path, obs_keys=(), layer: str = "X", gene_column: str | None = None, species: str | None = None):
    """A lab file opened for block reads, its obs checked for `obs_keys`; returns the source,
    each file gene's Ensembl ID ('' where it does not map) and the species."""
    source = open_source(Path(path), layer=layer, gene_column=gene_column)
    missing = [k for k in obs_keys if k not in source.obs.columns]
    if missing:
        source.close()
        raise ValueError(f"{path}: obs has no column(s) {missing}; it has {list(source.obs.columns)}. "
                         "Name the right column with the task's --*-key option")
    species = species or infer_species(source.gene_names, str(path))
    gene_ids = map_genes(source.gene_names, species, str(path)).ensembl_ids
    return source, gene_ids, species


def read_lab_data(path, obs_keys=(), layer: str = "X", gene_column: str | None = None, species: str | None = None) -> LabData:
    """Read an .h5ad (or 10x h5 / mtx folder) of raw counts with the obs columns a task needs."""
    source, gene_ids, species = open_lab_source(path, obs_keys, layer, gene_column, species)
    try:
        counts = source.read_rows(0, source.n_cells).tocsr()
        check_raw_counts(counts, source, 0)
    finally:
        source.close()
    return LabData(Path(path), source.obs.reset_index(drop=True), np.asarray(source.gene_names), counts, gene_ids, species,
                   np.asarray(source.cell_names))


def check_vocabulary_coverage(data: LabData, vocab, minimum: float = 0.5) -> float:
    """Share of the file's genes the model has tokens for; refuses data that mostly falls outside."""
    in_vocab = vocab.lookup_genes(data.gene_ids) >= 0
    share = float(in_vocab.mean()) if len(in_vocab) else 0.0
    if share < minimum:
        examples = ", ".join(data.gene_names[~in_vocab][:5])
        raise ValueError(
            f"{data.path}: only {in_vocab.sum()} of {len(in_vocab)} genes ({share:.0%}) have a token in the model's "
            f"vocabulary (e.g. {examples} do not). Pass --gene-column with the var column of gene symbols or "
            "Ensembl IDs, or --species if the genes are not human"
        )
    if share < 1:
        log.warning("%s: %d of %d genes have no token in the model's vocabulary and are left out of its inputs",
                    data.path, (~in_vocab).sum(), len(in_vocab))
    return share


def tokenize_cells(data: LabData, tokenizer, cells: np.ndarray | None = None, seed: int = 0) -> RaggedTokens:
    """Tokenise `cells` (default: all) with the model's tokenizer, bound to the data's genes."""
    unique, column_map = data.mapped_genes()
    rows = data.counts if cells is None else data.counts[cells]
    return tokenize_counts(rows, column_map, len(unique), data.species, tokenizer, np.random.default_rng(seed))


def tokenize_counts(rows: sp.csr_matrix, column_map: np.ndarray, n_mapped: int, species: str, tokenizer, rng) -> RaggedTokens:
    """Tokenise a CSR block of a file's raw counts; `column_map` sends each file column to its
    mapped gene (see `mapped_genes`). Totals count every gene, mapped or not, as Geneformer does."""
    mapped = to_corpus_genes(rows, column_map, n_mapped)
    totals = np.asarray(rows.sum(axis=1)).ravel()
    block = Block(mapped.indptr, mapped.indices, mapped.data, totals, [species] * mapped.shape[0], {})
    return encode(tokenizer, block, rng)


def load_model_tokenizer(model_dir, data: LabData):
    """The tokenizer saved in the model's folder, bound to the lab data's mapped genes."""
    from celltron.tokenizers.saving import load_tokenizer

    unique, _ = data.mapped_genes()
    return load_tokenizer(model_dir, unique)

