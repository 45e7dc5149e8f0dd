"""Geneformer's rank-value encoding, vectorised over blocks of cells.

For each cell: value = count / n_counts * 10,000 / (gene's non-zero median); genes with a zero
count or without a token are dropped; the rest are ranked by value, highest first, and the
token ids of the first `max_len` genes form the cell's sequence. V1 (gc30M): 2,048 tokens, no
special tokens. V2 (gc104M): `<cls>`, the first 4,094 genes, `<eos>` (4,096 tokens).

Ties: genes with exactly equal values are ordered by their position in the input (corpus gene
order, or the file's var order). Geneformer sorts with numpy's default (unstable) quicksort,
so on exact ties it may order genes differently; every other position is the same.
"""

from __future__ import annotations

import numpy as np

from celltron.tokenizers.ragged import RaggedTokens, bind_genes, rank_cells
from celltron.tokenizers.saving import save_tokenizer
from celltron.tokenizers.vocab import GeneVocab, bundled_vocab_json

GENEFORMER_SETTINGS = {"v1": {"max_len": 2048, "specials": False}, "v2": {"max_len": 4096, "specials": True}}


class RankValueTokenizer:
    """Rank-value tokenizer over a given gene table (corpus genes or a file's genes).

    Args:
        vocab: the gene vocabulary (Geneformer's, usually).
        medians: Ensembl ID -> non-zero median of normalised expression.
        gene_ids: Ensembl IDs of the input's genes, in input order (gene index i = gene_ids[i]).
        max_len: tokens per cell, special tokens included.
        add_specials: wrap each cell in `<cls>` ... `<eos>`.
    """

    SCHEME = "rank_value"

    def __init__(self, vocab: GeneVocab, medians: dict[str, float], gene_ids, max_len: int, add_specials: bool):
        self.vocab, self.max_len, self.add_specials = vocab, max_len, add_specials
        self.medians = dict(medians)
        self.token_of_gene, self.median = bind_genes(vocab, gene_ids, medians)
        if add_specials:
            self.cls_id, self.eos_id = vocab.special_id("cls"), vocab.special_id("eos")

    @classmethod
    def geneformer(cls, version: str, gene_ids, medians: dict[str, float] | None = None) -> "RankValueTokenizer":
        """Geneformer V1 or V2 with its bundled dictionaries (or a corpus's own medians)."""
        settings = GENEFORMER_SETTINGS[version]
        medians = medians if medians is not None else bundled_vocab_json(f"geneformer_{version}")["medians"]
        return cls(GeneVocab.from_geneformer(version), medians, gene_ids, settings["max_len"], settings["specials"])

    def encode_block(self, indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray, n_counts=None) -> RaggedTokens:
        """Tokenise a CSR block of cells (gene indices into `gene_ids`, raw counts).

        Args:
            indptr, genes, counts: CSR arrays of the block.
            n_counts: per-cell total counts; default the row sums.
        """
        first, last = (1, 1) if self.add_specials else (0, 0)
        limit = self.max_len - first - last
        offsets, out, _ = rank_cells(indptr, genes, counts, n_counts, self.token_of_gene, self.median, limit, first, last, values_kind="none")
        if self.add_specials:
            out[offsets[:-1]] = self.cls_id
            out[offsets[1:] - 1] = self.eos_id
        return RaggedTokens(out, offsets)

    def settings(self) -> dict:
        return {"max_len": self.max_len, "add_specials": self.add_specials}

    def save_pretrained(self, directory):
        return save_tokenizer(self, directory)

    def __call__(self, cell: dict) -> dict:
        """Tokenise one cell dict from CorpusStream (the `transform` hook)."""
        indptr = np.array([0, len(cell["genes"])])
        n_counts = [cell["n_counts"]] if "n_counts" in cell else None
        ids = self.encode_block(indptr, cell["genes"], cell["counts"], n_counts).input_ids
        return {"input_ids": ids, "length": len(ids)}

