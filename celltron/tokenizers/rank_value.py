"""Geneformer's rank-value encoding, vectorised over blocks of cells.

For each cell: value = count / n_counts * 10,000 / (gene's non-zero median); genes with a zero
count or without a token are dropped; the rest are ranked by value, highest first, and the
token ids of the first `max_len` genes form the cell's sequence. V1 (gc30M): 2,048 tokens, no
special tokens. V2 (gc104M): `<cls>`, the first 4,094 genes, `<eos>` (4,096 tokens).

Precision: Geneformer normalises with scipy on its input's matrix, so a float32 `.h5ad` takes
the first steps in float32 (`_kernels.geneformer_values`); near-tied genes can then rank the
other way round than in float64. Cells whose source matrix was float32 (the corpus records each
source's dtype; `celltron tokenize` reads it from the `.h5ad`) take the same float32 steps.
Corpora built before the dtype was recorded are treated as float64 (integer) sources.

Ties: genes with exactly equal values are ordered by their position in the input (corpus gene
order, or the file's var order). Geneformer sorts with numpy's default (unstable) quicksort,
so on exact ties it may order genes differently; every other position is the same.
"""

from __future__ import annotations

import numpy as np

from celltron.tokenizers.ragged import RaggedTokens, bind_genes, rank_cells
from celltron.tokenizers.schemes import Block, save_tokenizer
from celltron.tokenizers.vocab import GeneVocab, bundled_vocab_json

GENEFORMER_SETTINGS = {"v1": {"max_len": 2048, "specials": False}, "v2": {"max_len": 4096, "specials": True}}


def is_float32(dtype) -> bool:
    """Whether a source matrix of this dtype gets Geneformer's float32 steps."""
    return dtype is not None and np.dtype(dtype) == np.float32


def float32_datasets(manifest: dict) -> np.ndarray:
    """Per `dataset` code of a corpus: whether that source's matrix was float32 (its manifest
    source record's `dtype`; records without one, from older corpora, count as not). One more
    entry, False, at the end, so that code -1 (no dataset) reads False."""
    dtype_of = {source.get("dataset"): source.get("dtype") for source in manifest.get("sources", [])}
    names = manifest.get("obs_categories", {}).get("dataset", [])
    return np.array([is_float32(dtype_of.get(name)) for name in names] + [False], dtype=bool)


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
    TAKES_GENES_SUBSET = False

    def __init__(self, vocab: GeneVocab, medians: dict[str, float], gene_ids, max_len: int, add_specials: bool):
        self.vocab, self.max_len, self.add_specials = vocab, max_len, add_specials
        self.medians = dict(medians)
        self.token_of_gene, self.median = bind_genes(vocab, gene_ids, medians)
        if add_specials:
            self.cls_id, self.eos_id = vocab.special_id("cls"), vocab.special_id("eos")

    @classmethod
    def geneformer(cls, version: str, gene_ids, medians: dict[str, float] | None = None) -> RankValueTokenizer:
        """Geneformer V1 or V2 with its bundled dictionaries (or a corpus's own medians)."""
        settings = GENEFORMER_SETTINGS[version]
        medians = medians if medians is not None else bundled_vocab_json(f"geneformer_{version}")["medians"]
        return cls(GeneVocab.from_geneformer(version), medians, gene_ids, settings["max_len"], settings["specials"])

    @staticmethod
    def _version(scheme: str) -> str:
        """The Geneformer dictionary version a scheme names: geneformer-v1 -> v1."""
        return scheme.rsplit("-", 1)[-1]

    @classmethod
    def for_corpus(cls, scheme: str, genes, max_len: int | None, seed: int, genes_subset=None) -> RankValueTokenizer:
        """Geneformer of `scheme`'s version over `genes.gene_ids`, with its bundled medians;
        `max_len` replaces the version's length when given. Draws nothing: `seed` is unused."""
        tokenizer = cls.geneformer(cls._version(scheme), genes.gene_ids)
        if max_len:
            tokenizer.max_len = max_len
        return tokenizer

    @classmethod
    def from_saved(cls, vocab: GeneVocab, settings: dict, medians, gene_ids) -> RankValueTokenizer:
        return cls(vocab, medians, gene_ids, **settings)

    @classmethod
    def fixed_vocab(cls, scheme: str) -> GeneVocab:
        return GeneVocab.from_geneformer(cls._version(scheme))

    def encode_block(self, block: Block, rng: np.random.Generator) -> RaggedTokens:
        """Tokenise a Block: its totals, and its cells' float32 flags; draws nothing from `rng`."""
        return self.encode_csr(block.indptr, block.genes, block.counts, block.n_counts, block.float32)

    def encode_csr(
        self, indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray, n_counts=None, float32_cells=None
    ) -> RaggedTokens:
        """Tokenise a CSR block of cells (gene indices into `gene_ids`, raw counts).

        Args:
            indptr, genes, counts: CSR arrays of the block.
            n_counts: per-cell total counts; default the row sums.
            float32_cells: whether each cell's source matrix was float32 (one flag per cell, or
                one for the block); those cells take Geneformer's float32 steps. Default none.
        """
        first, last = (1, 1) if self.add_specials else (0, 0)
        limit = self.max_len - first - last
        if float32_cells is not None:
            float32_cells = np.broadcast_to(np.asarray(float32_cells, dtype=bool), (len(indptr) - 1,))
        offsets, out, _ = rank_cells(
            indptr,
            genes,
            counts,
            n_counts,
            self.token_of_gene,
            self.median,
            limit,
            first,
            last,
            values_kind="none",
            float32_cells=float32_cells,
        )
        if self.add_specials:
            out[offsets[:-1]] = self.cls_id
            out[offsets[1:] - 1] = self.eos_id
        return RaggedTokens(out, offsets)

    def settings(self) -> dict:
        return {"max_len": self.max_len, "add_specials": self.add_specials}

    def save_pretrained(self, directory):
        return save_tokenizer(self, directory)

    def __call__(self, cell: dict, float32_of_dataset: np.ndarray | None = None) -> dict:
        """Tokenise one cell dict from CorpusStream (the `transform` hook); `float32_of_dataset`
        (`float32_datasets` of the corpus) says which of its sources were float32."""
        indptr = np.array([0, len(cell["genes"])])
        n_counts = [cell["n_counts"]] if "n_counts" in cell else None
        float32 = None if float32_of_dataset is None or "dataset" not in cell else float32_of_dataset[int(cell["dataset"])]
        ids = self.encode_csr(indptr, cell["genes"], cell["counts"], n_counts, float32).input_ids
        return {"input_ids": ids, "length": len(ids)}
