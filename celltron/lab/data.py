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

from celltron.corpus.genes import MIN_MAPPED_FRACTION, GeneMapping, check_token_coverage
from celltron.corpus.readers import Source, mapped_genes, open_mapped_source, to_corpus_genes
from celltron.model_zoo.registry import check_vocabulary
from celltron.tokenizers.ragged import RaggedTokens
from celltron.tokenizers.rank_value import is_float32
from celltron.tokenizers.saving import load_tokenizer
from celltron.tokenizers.schemes import Block

OBS_FIX = "Name the right column with the task's --*-key option"

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
        gene_counts: counts per file gene (all cells, or the sample the mapping was judged on).
        min_mapped_fraction: the share of counts that must map, and reach the model's tokens.
    """

    path: Path
    obs: pd.DataFrame
    gene_names: np.ndarray
    counts: sp.csr_matrix
    gene_ids: np.ndarray
    species: str
    cell_names: np.ndarray | None = None
    gene_counts: np.ndarray | None = None
    min_mapped_fraction: float = MIN_MAPPED_FRACTION

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    def mapped_genes(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique mapped Ensembl IDs (first-seen order) and, per file column, its index among them (-1: unmapped)."""
        return mapped_genes(self.gene_ids)


def open_lab_source(
    path,
    obs_keys=(),
    layer: str = "X",
    gene_column: str | None = None,
    species: str | None = None,
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
) -> tuple[Source, GeneMapping]:
    """A lab file opened for block reads, its obs checked for `obs_keys`; returns the source and
    its gene mapping (species, each file gene's Ensembl ID or '', counts over a sample of cells),
    refused unless `min_mapped_fraction` of the counts map (`readers.open_mapped_source`)."""
    opened = open_mapped_source(path, layer, gene_column, species, min_mapped_fraction, obs_keys, OBS_FIX)
    return opened.source, opened.mapping


def read_configured_lab_data(data, obs_keys=(), path=None) -> LabData:
    """`read_lab_data` with the reading options of a fine-tuning config's `data` section
    (layer, gene column, species, mapped share); `path` defaults to `data.path`."""
    return read_lab_data(path or data.path, obs_keys, data.layer, data.gene_column, data.species, data.min_mapped_fraction)


def read_lab_data(
    path,
    obs_keys=(),
    layer: str = "X",
    gene_column: str | None = None,
    species: str | None = None,
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
) -> LabData:
    """Read an .h5ad (or 10x h5 / mtx folder) of raw counts with the obs columns a task needs."""
    opened = open_mapped_source(path, layer, gene_column, species, min_mapped_fraction, obs_keys, OBS_FIX)
    source, mapping = opened.source, opened.mapping
    try:
        counts = opened.read_counts(0, source.n_cells)
    finally:
        opened.close()
    gene_counts = np.asarray(counts.sum(axis=0, dtype=np.float64)).ravel()  # every cell is at hand: no sample needed
    return LabData(
        Path(path),
        source.obs.reset_index(drop=True),
        np.asarray(source.gene_names),
        counts,
        mapping.ensembl_ids,
        mapping.species,
        np.asarray(source.cell_names),
        gene_counts,
        min_mapped_fraction,
    )


def check_vocabulary_coverage(data: LabData, vocab, minimum: float | None = None) -> float:
    """Share of the file's counts (of its genes, without counts) on genes the model has tokens
    for; refuses data below `minimum` (default: the data's min_mapped_fraction)."""
    minimum = data.min_mapped_fraction if minimum is None else minimum
    fix = "pass --gene-column with the var column of gene symbols or Ensembl IDs, or --species if the genes are not human"
    genes = [*vocab.ensembl_ids, *getattr(vocab, "aliases", {})]
    if data.species == "mouse" and not any(str(g).startswith("ENSMUSG") for g in genes):
        fix = (
            "the model's vocabulary has no mouse genes: use a model pretrained on mouse data or with the ortholog "
            "scheme (GeneCompass)"
        )
    share = check_token_coverage(data.gene_ids, data.gene_names, data.gene_counts, vocab, str(data.path), fix, minimum)
    in_vocab = vocab.lookup_genes(data.gene_ids) >= 0
    if not in_vocab.all():
        log.warning(
            "%s: %d of %d genes have no token in the model's vocabulary and are left out of its inputs",
            data.path,
            (~in_vocab).sum(),
            len(in_vocab),
        )
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
    block = Block(mapped.indptr, mapped.indices, mapped.data, totals, [species] * mapped.shape[0], {}, is_float32(rows.dtype))
    return tokenizer.encode_block(block, rng)


def load_model_tokenizer(model_dir, data: LabData):
    """The tokenizer saved in the model's folder, bound to the lab data's mapped genes."""
    check_vocabulary(model_dir)
    unique, _ = data.mapped_genes()
    return load_tokenizer(model_dir, unique)
