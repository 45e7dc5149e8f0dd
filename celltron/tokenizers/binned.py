"""scGPT's expression-binned tokens, over blocks of cells.

Per cell, as scGPT's Preprocessor and tokenizer do: counts of genes in the vocabulary are
normalised to a fixed total (`normalize_total`, 1e4) and log1p-transformed; the non-zero values
are binned into `n_bins` (51) by quantile edges of that cell's own non-zero values (bin 0 is
kept for zero); a value that sits exactly on several equal edges is spread uniformly over them
with a random draw, here from an explicit seeded generator. The sequence is `<cls>` (value 0)
followed by the expressed genes in gene order (or all genes with `include_zero_gene`), and a
cell longer than `max_len` keeps `<cls>` plus `max_len - 1` genes drawn without replacement.
"""

from __future__ import annotations

import functools

import numpy as np

from celltron.errors import ConfigError
from celltron.tokenizers import _kernels
from celltron.tokenizers.ragged import RaggedTokens
from celltron.tokenizers.schemes import Block, save_tokenizer
from celltron.tokenizers.vocab import GeneVocab

VALUE_STYLES = ("binned", "log1p", "normalized", "counts")


def sample_positions(lengths, first: int, max_len: int, uniform: np.ndarray) -> np.ndarray:
    """Positions kept of cells longer than `max_len`, cell after cell: the first `first`
    (`<cls>`), then a uniformly random subset of the others in random order, by a partial
    Fisher-Yates shuffle taking one of `uniform` per pick (compiled when numba is there)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if _kernels.available():
        return _kernels.sample_positions(lengths, first, max_len, uniform)
    if len(lengths) == 0:
        return np.empty(0, np.int64)
    # the same shuffle, step by step over all cells at once
    picks = max_len - first
    others = lengths - first
    pool = np.tile(np.arange(first, first + others.max()), (len(lengths), 1))
    draws = np.asarray(uniform).reshape(len(lengths), picks)
    rows = np.arange(len(lengths))
    for k in range(picks):
        swap = k + (draws[:, k] * (others - k)).astype(np.int64)
        chosen = pool[rows, swap]
        pool[rows, swap] = pool[rows, k]
        pool[rows, k] = chosen
    specials = np.tile(np.arange(first), (len(lengths), 1))
    return np.concatenate([specials, pool[:, :picks]], axis=1).ravel().astype(np.int64)


@functools.lru_cache(maxsize=8)
def _quantile_levels(n_bins: int) -> np.ndarray:
    """np.linspace(0, 1, n_bins - 1), made once per bin count (it costs as much as a cell's sort)."""
    levels = np.linspace(0, 1, n_bins - 1)
    levels.flags.writeable = False
    return levels


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """np.quantile(values, np.linspace(0, 1, n_bins - 1)) with numpy's 'linear' method, step by
    step (same operations, same rounding) without its per-call overhead."""
    ordered = np.sort(values)
    n = len(ordered)
    virtual = (n - 1) * _quantile_levels(n_bins)
    previous = np.floor(virtual)
    gamma = virtual - previous
    previous = previous.astype(np.intp)
    following = np.minimum(previous + 1, n - 1)
    a, b = ordered[previous], ordered[following]
    difference = b - a
    # numpy's _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) from t = 0.5 on
    return np.where(gamma >= 0.5, b - difference * (1 - gamma), a + difference * gamma)


def bin_values(values: np.ndarray, n_bins: int, uniform: np.ndarray) -> np.ndarray:
    """scGPT's per-cell binning of positive values: quantile edges at linspace(0, 1, n_bins - 1),
    digitised from both sides; `uniform` (one draw per value in [0, 1)) breaks ties on
    repeated edges."""
    edges = quantile_edges(values, n_bins)
    left = np.searchsorted(edges, values, side="right")  # np.digitize(values, edges)
    right = np.searchsorted(edges, values, side="left")  # np.digitize(values, edges, right=True)
    return np.ceil(uniform * (right - left) + left).astype(np.int64)


class BinnedTokenizer:
    """scGPT tokens and values for cells whose genes index `gene_ids`.

    Args:
        vocab: scGPT's vocabulary (ids kept exactly), or any GeneVocab with `<cls>` and `<pad>`.
        gene_ids: Ensembl IDs of the input's genes (gene index i = gene_ids[i]).
        n_bins: number of bins including the zero bin.
        value_style: 'binned' (default), 'log1p', 'normalized' or 'counts' (continuous values).
        normalize_total: target total per cell before log1p; None skips normalisation.
        log1p: apply log1p after normalising.
        max_len: tokens per cell including `<cls>`.
        include_zero_gene: keep every gene of the vocabulary-covered table, zeros included.
        append_cls: start every cell with `<cls>` (value 0).
        genes_subset: optional Ensembl IDs to keep (e.g. highly variable genes).
        seed: seeds the per-cell generator of the `transform` hook (`__call__`).
    """

    SCHEME = "binned"
    TAKES_GENES_SUBSET = True

    def __init__(
        self,
        vocab: GeneVocab,
        gene_ids,
        n_bins: int = 51,
        value_style: str = "binned",
        normalize_total: float | None = 1e4,
        log1p: bool = True,
        max_len: int = 1200,
        include_zero_gene: bool = False,
        append_cls: bool = True,
        genes_subset=None,
        seed: int = 0,
    ):
        if value_style not in VALUE_STYLES:
            raise ConfigError(f"value_style must be one of {VALUE_STYLES}, got {value_style!r}")
        self.genes_subset = None if genes_subset is None else sorted(genes_subset)
        self.vocab, self.n_bins, self.value_style = vocab, n_bins, value_style
        self.normalize_total, self.log1p, self.max_len = normalize_total, log1p, max_len
        self.include_zero_gene, self.append_cls = include_zero_gene, append_cls
        gene_ids = np.asarray(gene_ids, dtype=str)
        token = vocab.lookup_genes(gene_ids)
        # totals are taken over every gene the vocabulary covers, before any subset (scGPT
        # normalises and log-transforms first, then selects highly variable genes)
        self.in_vocab = token >= 0
        if genes_subset is not None:
            token = np.where(np.isin(gene_ids, list(genes_subset)), token, -1)
        self.token_of_gene = token
        self.covered_genes = np.flatnonzero(token >= 0)
        self.cls_id = vocab.special_id("cls")
        self.seed = seed

    @classmethod
    def for_corpus(cls, scheme: str, genes, max_len: int | None, seed: int, genes_subset=None) -> BinnedTokenizer:
        """scGPT's vocabulary over `genes.gene_ids` (1,200 tokens unless `max_len`), keeping
        `genes_subset` (highly variable genes) when given."""
        return cls(GeneVocab.from_scgpt(), genes.gene_ids, max_len=max_len or 1200, genes_subset=genes_subset, seed=seed)

    @classmethod
    def from_saved(cls, vocab: GeneVocab, settings: dict, medians, gene_ids) -> BinnedTokenizer:
        return cls(vocab, gene_ids, **settings)

    @classmethod
    def fixed_vocab(cls, scheme: str) -> GeneVocab:
        return GeneVocab.from_scgpt()

    def settings(self) -> dict:
        return {
            "n_bins": self.n_bins,
            "value_style": self.value_style,
            "normalize_total": self.normalize_total,
            "log1p": self.log1p,
            "max_len": self.max_len,
            "include_zero_gene": self.include_zero_gene,
            "append_cls": self.append_cls,
            "genes_subset": self.genes_subset,
            "seed": self.seed,
        }

    def save_pretrained(self, directory):
        return save_tokenizer(self, directory)

    def values_of_block(self, indptr, genes, counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keep covered genes, then normalise and log1p as the Preprocessor does (vectorised)."""
        counts = np.asarray(counts)
        if _kernels.available() and np.issubdtype(counts.dtype, np.integer):
            normalise = self.value_style != "counts" and self.normalize_total is not None
            kept_indptr, genes, values = _kernels.expressed_values(
                np.ascontiguousarray(indptr, dtype=np.int64),
                genes,
                counts,
                self.in_vocab,
                self.token_of_gene,
                float(self.normalize_total) if normalise else 0.0,
            )
            if self.value_style != "counts" and self.log1p:
                values = np.log1p(values)  # numpy's log1p, as the Preprocessor's
            return kept_indptr, genes, values
        n_cells = len(indptr) - 1
        cell = np.repeat(np.arange(n_cells), np.diff(indptr))
        totals = np.bincount(cell, weights=np.where(self.in_vocab[genes], counts, 0), minlength=n_cells)
        keep = (self.token_of_gene[genes] >= 0) & (counts > 0)
        cell, genes = cell[keep], genes[keep]
        values = counts[keep].astype(np.float64)
        if self.value_style != "counts":
            if self.normalize_total is not None:
                values = values / totals[cell] * self.normalize_total
            if self.log1p:
                values = np.log1p(values)
        kept_indptr = np.concatenate([[0], np.cumsum(np.bincount(cell, minlength=n_cells))])
        return kept_indptr, genes, values

    def encode_block(self, block: Block, rng: np.random.Generator) -> RaggedTokens:
        """Tokenise a Block's counts; `rng` drives tie-spreading and length sampling (`encode_csr`)."""
        return self.encode_csr(block.indptr, block.genes, block.counts, rng)

    def encode_csr(self, indptr, genes, counts, rng: np.random.Generator) -> RaggedTokens:
        """Tokenise a CSR block of raw counts; `rng` drives tie-spreading and length sampling.

        Draws, in order: one uniform per expressed gene of the block, cell after cell (the
        binning's tie spread, as scGPT's `binning` draws per cell), then the length sampling
        of each cell longer than `max_len`."""
        kept_indptr, genes, values = self.values_of_block(np.asarray(indptr), np.asarray(genes), np.asarray(counts))
        if self.value_style == "binned":
            values = self._bin_block(kept_indptr, values, rng.random(len(values)))
        value_dtype = np.int64 if self.value_style == "binned" else np.float32
        if not self.include_zero_gene:
            return self._sequences(kept_indptr, genes, values, rng, value_dtype)
        ids_out, values_out, lengths = [], [], []
        for i in range(len(kept_indptr) - 1):
            lo, hi = kept_indptr[i], kept_indptr[i + 1]
            ids, vals = self._sequence(genes[lo:hi], values[lo:hi], rng)
            ids_out.append(ids)
            values_out.append(vals)
            lengths.append(len(ids))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return RaggedTokens(
            np.concatenate(ids_out).astype(np.int64) if ids_out else np.empty(0, np.int64),
            offsets,
            np.concatenate(values_out).astype(value_dtype) if values_out else np.empty(0, value_dtype),
        )

    def _bin_block(self, kept_indptr, values, uniform) -> np.ndarray:
        """Each cell's values binned with its run of `uniform`."""
        if _kernels.available() and len(values) and values.min() > 0:
            return _kernels.bin_cells_compiled(kept_indptr, values, _quantile_levels(self.n_bins), uniform)
        bins = np.zeros(len(values), np.int64)
        for lo, hi in zip(kept_indptr[:-1].tolist(), kept_indptr[1:].tolist()):
            if hi > lo:
                bins[lo:hi] = bin_values(values[lo:hi], self.n_bins, uniform[lo:hi])
        return bins

    def _sequences(self, kept_indptr, genes, values, rng, value_dtype) -> RaggedTokens:
        """Every cell's `<cls>` + expressed genes, laid out at once; cells longer than
        `max_len` keep `<cls>` and a random subset (`sample_positions`)."""
        first = 1 if self.append_cls else 0
        lengths = np.diff(kept_indptr) + first
        long_cells = lengths > self.max_len
        uniform = rng.random(int(long_cells.sum()) * (self.max_len - first))
        positions = sample_positions(lengths[long_cells], first, self.max_len, uniform)
        if _kernels.available():
            offsets, ids, out_values = _kernels.lay_out(
                np.ascontiguousarray(kept_indptr, dtype=np.int64),
                self.token_of_gene[genes],
                np.asarray(values, dtype=np.float64),
                first,
                self.cls_id,
                self.max_len,
                positions,
            )
            return RaggedTokens(ids, offsets, out_values.astype(value_dtype))
        full_offsets = kept_indptr + first * np.arange(len(kept_indptr))
        full_ids = np.empty(full_offsets[-1], np.int64)
        full_values = np.zeros(full_offsets[-1], np.float64)
        gene_positions = np.ones(full_offsets[-1], bool)
        gene_positions[full_offsets[:-1][lengths > 0] if first else []] = False
        if first:
            full_ids[~gene_positions] = self.cls_id
        full_ids[gene_positions] = self.token_of_gene[genes]
        full_values[gene_positions] = values
        out_lengths = np.minimum(lengths, self.max_len)
        offsets = np.concatenate([[0], np.cumsum(out_lengths)]).astype(np.int64)
        ids, out_values = np.empty(offsets[-1], np.int64), np.empty(offsets[-1], np.float64)
        ids[np.repeat(~long_cells, out_lengths)] = full_ids[np.repeat(~long_cells, lengths)]
        out_values[np.repeat(~long_cells, out_lengths)] = full_values[np.repeat(~long_cells, lengths)]
        # a long cell keeps `<cls>` and a random subset, as scGPT samples without replacement
        keep = np.repeat(full_offsets[:-1][long_cells], self.max_len) + positions
        ids[np.repeat(long_cells, out_lengths)] = full_ids[keep]
        out_values[np.repeat(long_cells, out_lengths)] = full_values[keep]
        return RaggedTokens(ids, offsets, out_values.astype(value_dtype))

    def _sequence(self, genes, values, rng) -> tuple[np.ndarray, np.ndarray]:
        if self.include_zero_gene:
            dense = np.zeros(len(self.token_of_gene), dtype=np.float64)
            dense[genes] = values
            genes, values = self.covered_genes, dense[self.covered_genes]
        ids = self.token_of_gene[genes]
        if self.append_cls:
            ids, values = np.concatenate([[self.cls_id], ids]), np.concatenate([[0.0], values])
        if len(ids) > self.max_len:
            start = 1 if self.append_cls else 0
            keep = sample_positions([len(ids)], start, self.max_len, rng.random(self.max_len - start))
            ids, values = ids[keep], values[keep]
        return ids, values

    def __call__(self, cell: dict) -> dict:
        """Tokenise one CorpusStream cell (the `transform` hook). Its random draws come from a
        generator seeded by (seed, cell_index), so a resumed stream tokenises identically."""
        rng = np.random.default_rng([self.seed, int(cell.get("cell_index", 0))])
        block = self.encode_csr(np.array([0, len(cell["genes"])]), cell["genes"], cell["counts"], rng)
        return {"input_ids": block.input_ids, "values": block.values, "length": len(block.input_ids)}
