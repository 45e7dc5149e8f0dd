"""Tokens for several measurements of one cell: RNA through any scheme, then surface proteins and
open chromatin, one sequence per cell with a token budget per modality and a modality-type id per
token (scGPT's multi-omic design: the model adds a modality embedding to every token).

- **Proteins (adt)**: every protein of the panel is a token (a panel is small and dense: 10-200
  antibodies). Its value is the cell's centred log-ratio, CLR = log1p(x) - mean over the panel of
  log1p, either binned per cell as scGPT bins RNA (quantile edges of the cell's own values,
  `n_bins`; bins are per-cell ranks, so they are the same for CLR and log1p) or continuous.
- **Chromatin (atac)**: each open genomic bin of the cell is a token (binary, value 1), in genomic
  order. A cell with more open bins than its budget keeps those of highest TF-IDF (binary counts
  make TF constant within a cell, so: the rarest bins in the corpus, IDF = log(1 + cells / (1 +
  cells open)), ties broken by a seeded draw) or a uniform sample (`atac_select: sample`).
- A cell not measured in a modality gets no tokens of it.
- Proteins in a sequence read by a family that takes no values (Geneformer) come in rank order
  (`adt_order: rank`: highest CLR first, ties in panel order, as Geneformer ranks genes), so that
  their order carries the levels; otherwise in panel order.

Sequence per cell: the RNA tokenizer's sequence (its own specials and `max_len`), then up to
`adt_budget` protein tokens, then up to `atac_budget` bin tokens. Token ids: RNA's vocabulary,
then `adt:<antigen>` and `atac:<bin>` tokens after it (`vocab`); `modality_ids`: 0 RNA (and
specials), 1 adt, 2 atac. Saved as the RNA tokenizer's folder plus `multimodal.json`;
`celltron.tokenizers.saving.load_tokenizer` of such a folder returns the multi-modal tokenizer, whose `encode_block` of RNA
alone gives RNA's tokens (a model pretrained on paired cells embeds RNA-only data).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celltron.errors import ConfigError
from celltron.inputs import MODEL_FIX, read_json
from celltron.io import write_json_atomically
from celltron.tokenizers.binned import bin_values
from celltron.tokenizers.ragged import RaggedTokens

MODALITY_IDS = {"rna": 0, "adt": 1, "atac": 2}
CONFIG = "multimodal.json"
ATAC_SELECTIONS = ("tfidf", "sample")
ADT_ORDERS = ("panel", "rank")


@dataclass
class ModalityCells:
    """One modality of a block of cells: CSR over the corpus's features of that modality, and
    whether each cell was measured in it."""

    indptr: np.ndarray
    features: np.ndarray
    counts: np.ndarray
    measured: np.ndarray

    @classmethod
    def from_batch(cls, batch: dict, modality: str) -> ModalityCells:
        """From `collate_cells` output (`adt_offsets`, `adt_features`, `adt_counts`, `adt_measured`)."""
        return cls(
            batch[f"{modality}_offsets"],
            batch[f"{modality}_features"],
            batch[f"{modality}_counts"],
            batch[f"{modality}_measured"],
        )


def protein_clr(cells: ModalityCells, n_features: int) -> np.ndarray:
    """(cells x panel) CLR values: log1p(counts) minus the cell's mean log1p over the panel."""
    dense = np.zeros((len(cells.indptr) - 1, n_features), dtype=np.float64)
    rows = np.repeat(np.arange(len(cells.indptr) - 1), np.diff(cells.indptr))
    dense[rows, cells.features] = np.log1p(cells.counts)
    return dense - dense.mean(axis=1, keepdims=True)


def protein_tokens(cells: ModalityCells, n_features: int, n_bins: int | None, rng: np.random.Generator, order: str = "panel"):
    """Per measured cell, every panel feature with its value: the CLR bin (1..n_bins-1) or, with
    `n_bins` None, the CLR value; in panel order, or with `order` rank by CLR, highest first
    (ties in panel order). Returns (features, values, lengths) flat over cells."""
    if order not in ADT_ORDERS:
        raise ConfigError(f"adt_order {order!r}: use one of {ADT_ORDERS}")
    clr = protein_clr(cells, n_features)
    measured = np.asarray(cells.measured, dtype=bool)
    lengths = np.where(measured, n_features, 0)
    panel = np.tile(np.arange(n_features), (int(measured.sum()), 1))
    if n_bins is None:
        values = clr[measured].astype(np.float32)
    else:
        binned = [np.maximum(bin_values(row, n_bins, rng.random(n_features)), 1) for row in clr[measured]]  # bin 0: "absent"
        values = np.asarray(binned, dtype=np.float32).reshape(panel.shape)
    if order == "rank":  # a stable sort of -CLR: highest first, ties in panel order
        ranked = np.argsort(-clr[measured], axis=1, kind="stable")
        panel, values = np.take_along_axis(panel, ranked, 1), np.take_along_axis(values, ranked, 1)
    return panel.ravel(), values.ravel(), lengths


PROTEIN_SPECIALS = ("<pad>", "<cls>")  # a pair tower's vocabulary: these, then its modality's features


def protein_sequences(
    cells: ModalityCells, n_features: int, n_bins: int | None, rng: np.random.Generator, order: str = "panel"
) -> RaggedTokens:
    """Tokens of a protein-only encoder (the dual encoder's second tower): per measured cell
    `<cls>` (value 0) then every panel protein with its CLR bin (or value), in panel or rank
    order; ids index PROTEIN_SPECIALS followed by the panel's antigens."""
    features, values, lengths = protein_tokens(cells, n_features, n_bins, rng, order)
    return _with_cls(features, values, lengths)


def atac_tokens(cells: ModalityCells, budget: int, idf: np.ndarray, select: str, rng: np.random.Generator):
    """Per measured cell, its open bins (at most `budget`, chosen by `select`) in genomic order.
    Returns (features, lengths) flat over cells."""
    if select not in ATAC_SELECTIONS:
        raise ConfigError(f"atac_select {select!r}: use one of {ATAC_SELECTIONS}")
    kept, lengths = [], []
    for i in range(len(cells.indptr) - 1):
        open_bins = cells.features[cells.indptr[i] : cells.indptr[i + 1]][cells.counts[cells.indptr[i] : cells.indptr[i + 1]] > 0]
        if not cells.measured[i]:
            open_bins = open_bins[:0]
        if len(open_bins) > budget:
            tie_break = rng.random(len(open_bins))
            if select == "tfidf":  # highest IDF first; lexsort sorts by its last key first
                order = np.lexsort((tie_break, -idf[open_bins]))
            else:
                order = np.argsort(tie_break)
            open_bins = np.sort(open_bins[order[:budget]])
        kept.append(open_bins)
        lengths.append(len(open_bins))
    features = np.concatenate(kept) if kept else np.empty(0, np.int64)
    return features.astype(np.int64), np.asarray(lengths, dtype=np.int64)


def atac_sequences(cells: ModalityCells, budget: int, idf: np.ndarray, select: str, rng: np.random.Generator) -> RaggedTokens:
    """Tokens of a chromatin-only encoder: per measured cell `<cls>` then its kept open bins
    (value 1); ids index PROTEIN_SPECIALS followed by the corpus's bins."""
    features, lengths = atac_tokens(cells, budget, idf, select, rng)
    return _with_cls(features, np.ones(len(features), np.float32), lengths)


def _with_cls(features: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> RaggedTokens:
    """Per cell with tokens, `<cls>` (value 0) then its features shifted past the specials."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    kept = np.where(lengths > 0, lengths + 1, 0)
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    ids = np.zeros(offsets[-1], np.int64)
    vals = np.zeros(offsets[-1], np.float32)
    for i in np.flatnonzero(lengths > 0):
        ids[offsets[i]] = 1  # <cls>
        ids[offsets[i] + 1 : offsets[i + 1]] = features[starts[i] : starts[i + 1]] + len(PROTEIN_SPECIALS)
        vals[offsets[i] + 1 : offsets[i + 1]] = values[starts[i] : starts[i + 1]]
    return RaggedTokens(ids, offsets, vals)


class PairTokens:
    """The pair tower's tokens (proteins or chromatin) of a batch of cells from `collate_cells`:
    `<cls>` then the modality's tokens, none for a cell not measured in it."""

    def __init__(
        self,
        modality: str,
        n_features: int,
        adt_bins: int = 51,
        atac_budget: int = 256,
        atac_select="tfidf",
        idf=None,
        adt_order: str = "panel",
        features=None,
    ):
        if modality not in ("adt", "atac"):
            raise ConfigError(f"a pair tower encodes adt or atac, not {modality!r}")
        if modality == "atac" and idf is None:
            raise ConfigError("chromatin tokens need the corpus's IDF per bin")
        self.modality, self.n_features = modality, n_features
        self.adt_bins, self.atac_budget, self.atac_select, self.idf = adt_bins, atac_budget, atac_select, idf
        self.adt_order = adt_order  # rank: highest CLR first, for a tower that reads no values
        self.vocab_size = len(PROTEIN_SPECIALS) + n_features
        self.features = list(features) if features is not None else None  # the corpus's names, in token order

    @classmethod
    def for_corpus(
        cls, corpus, modality: str, adt_bins: int = 51, atac_budget: int = 256, atac_select: str = "tfidf", adt_order="panel"
    ):
        if modality not in corpus.modalities:
            raise ConfigError(
                f"{corpus.location}: no {modality} modality (it holds {', '.join(corpus.modalities)}); "
                "build the corpus from paired data (celltron corpus build --modality ...)"
            )
        idf = None
        if modality == "atac":
            stats = corpus.manifest["modalities"]["atac"]["features"]
            idf = inverse_document_frequency(corpus.manifest["n_cells"], stats["cells_expressing"])
        features = list(corpus.feature_names(modality))
        return cls(modality, corpus.n_features(modality), adt_bins, atac_budget, atac_select, idf, adt_order, features)

    def __call__(self, flat: dict, rng: np.random.Generator) -> RaggedTokens:
        return self.encode(ModalityCells.from_batch(flat, self.modality), rng)

    def encode(self, cells: ModalityCells, rng: np.random.Generator) -> RaggedTokens:
        """The tower's tokens of cells whose counts are over this tower's features."""
        if self.modality == "adt":
            return protein_sequences(cells, self.n_features, self.adt_bins, rng, self.adt_order)
        return atac_sequences(cells, self.atac_budget, self.idf, self.atac_select, rng)

    def save(self, path) -> Path:
        """The settings and feature names, so a paired export tokenises new cells as pretraining did."""
        settings = {
            "modality": self.modality,
            "n_features": self.n_features,
            "adt_bins": self.adt_bins,
            "atac_budget": self.atac_budget,
            "atac_select": self.atac_select,
            "idf": None if self.idf is None else np.asarray(self.idf).tolist(),
            "adt_order": self.adt_order,
            "features": self.features,
        }
        return write_json_atomically(path, settings)

    @classmethod
    def load(cls, path) -> PairTokens:
        settings = read_json(path, "pair tower tokens", MODEL_FIX)
        idf = settings.pop("idf")
        return cls(**settings, idf=None if idf is None else np.asarray(idf))


def inverse_document_frequency(n_cells: int, cells_open: np.ndarray) -> np.ndarray:
    """IDF of each bin over the corpus: log(1 + n_cells / (1 + cells open))."""
    return np.log1p(n_cells / (1.0 + np.asarray(cells_open, dtype=np.float64)))


@dataclass
class MultiModalSettings:
    """adt_budget / atac_budget: tokens per cell of each modality (0: the modality is left out);
    adt_bins: bins of protein values (None: continuous CLR); atac_select: tfidf or sample;
    adt_order: panel, or rank (highest CLR first, for a family that reads no values)."""

    adt_budget: int = 64
    adt_bins: int | None = 51
    atac_budget: int = 256
    atac_select: str = "tfidf"
    adt_order: str = "panel"

    def __post_init__(self):
        if self.adt_budget < 0 or self.atac_budget < 0:
            raise ConfigError(f"token budgets must be >= 0, got adt {self.adt_budget}, atac {self.atac_budget}")
        if self.adt_bins is not None and self.adt_bins < 3:
            raise ConfigError(f"adt_bins must be at least 3 (or null for continuous values), got {self.adt_bins}")
        if self.atac_select not in ATAC_SELECTIONS:
            raise ConfigError(f"atac_select {self.atac_select!r}: use one of {ATAC_SELECTIONS}")
        if self.adt_order not in ADT_ORDERS:
            raise ConfigError(f"adt_order {self.adt_order!r}: use one of {ADT_ORDERS}")


class MultiModalTokenizer:
    """An RNA tokenizer (any scheme) extended with protein and chromatin tokens (module docstring).

    Args:
        rna: the RNA tokenizer (`make_tokenizer` / `load_tokenizer`).
        features: {modality: the corpus's feature names} for adt and/or atac.
        idf: per ATAC bin, its inverse document frequency (`inverse_document_frequency`).
        settings: budgets and value styles.
    """

    def __init__(self, rna, features: dict[str, list[str]], idf: np.ndarray | None = None, settings=None):
        self.rna = rna
        self.settings = settings or MultiModalSettings()
        self.features = {m: list(features[m]) for m in ("adt", "atac") if m in features}
        if "atac" in self.features and (idf is None or len(idf) != len(self.features["atac"])):
            raise ConfigError("ATAC tokens need one IDF per corpus bin (inverse_document_frequency of the manifest's statistics)")
        self.idf = None if idf is None else np.asarray(idf, dtype=np.float64)
        self.first_id = {}
        next_id = len(rna.vocab)
        for modality, names in self.features.items():
            self.first_id[modality] = next_id
            next_id += len(names)
        self.vocab_size = next_id
        self._vocab = None

    @classmethod
    def for_corpus(cls, corpus, rna, settings: MultiModalSettings | None = None, modalities=None) -> MultiModalTokenizer:
        """Over a multi-modal corpus's feature tables (its manifest's `modalities`): all of its
        modalities besides RNA, or those named in `modalities`."""
        if not corpus.multimodal:
            raise ConfigError(f"{corpus.location}: an RNA corpus; multi-modal tokens need a corpus built from paired data")
        wanted = [m for m in corpus.modalities if m != "rna"] if modalities is None else list(modalities)
        missing = [m for m in wanted if m not in corpus.modalities]
        if missing:
            raise ConfigError(
                f"{corpus.location}: no {', '.join(missing)} modality (it holds {', '.join(corpus.modalities)}); "
                "build the corpus with every modality the tokens need (celltron corpus build --modality ...)"
            )
        features = {m: list(corpus.feature_names(m)) for m in wanted}
        idf = None
        if "atac" in features:
            stats = corpus.manifest["modalities"]["atac"]
            idf = inverse_document_frequency(corpus.manifest["n_cells"], stats["features"]["cells_expressing"])
        return cls(rna, features, idf, settings)

    # ------------------------------------------------------------ what pretraining asks of a tokenizer

    @property
    def vocab(self):
        """RNA's vocabulary followed by the protein and chromatin tokens (same specials)."""
        if self._vocab is None:
            from celltron.tokenizers.vocab import GeneVocab

            rna = self.rna.vocab
            names = self.token_names()
            name = "+".join([rna.name, *self.features])
            self._vocab = GeneVocab(rna.tokens + names, rna.ensembl_ids + [""] * len(names), rna.specials, name, rna.aliases)
        return self._vocab

    @property
    def max_len(self) -> int:
        """RNA tokens per cell (the RNA tokenizer's; setting it sets theirs): what RNA-only data gets."""
        return self.rna.max_len

    @max_len.setter
    def max_len(self, length: int) -> None:
        self.rna.max_len = length

    @property
    def sequence_max_len(self) -> int:
        """Longest joint sequence of a cell: RNA's length, then every modality's budget (at most
        its features); a model's position table must cover it."""
        budgets = {"adt": self.settings.adt_budget, "atac": self.settings.atac_budget}
        return self.rna.max_len + sum(min(budgets[m], len(names)) for m, names in self.features.items())

    @property
    def n_modalities(self) -> int:
        """Modality types a model reading these tokens needs (ids 0 .. n-1)."""
        return 1 + max((MODALITY_IDS[m] for m in self.features), default=0)

    def encode_block(self, block, rng: np.random.Generator) -> RaggedTokens:
        """RNA alone (cells measured in RNA only): the RNA tokenizer's tokens, all of modality 0."""
        return self.rna.encode_block(block, rng)

    def token_names(self) -> list[str]:
        """Names of the tokens after RNA's vocabulary, in id order."""
        return [f"{m}:{name}" for m, names in self.features.items() for name in names]

    def encode(self, rna_block, modalities: dict[str, ModalityCells], rng: np.random.Generator) -> RaggedTokens:
        """One sequence per cell: RNA's tokens, then each modality's (see the module docstring)."""
        rna_tokens = self.rna.encode_block(rna_block, rng)
        n_cells = len(rna_tokens)
        parts = [(rna_tokens.input_ids, _values(rna_tokens), rna_tokens.lengths, MODALITY_IDS["rna"])]
        if "adt" in self.features and self.settings.adt_budget and "adt" in modalities:
            features, values, lengths = protein_tokens(
                modalities["adt"], len(self.features["adt"]), self.settings.adt_bins, rng, self.settings.adt_order
            )
            features, values, lengths = _capped(features, values, lengths, self.settings.adt_budget)
            parts.append((features + self.first_id["adt"], values, lengths, MODALITY_IDS["adt"]))
        if "atac" in self.features and self.settings.atac_budget and "atac" in modalities:
            features, lengths = atac_tokens(
                modalities["atac"], self.settings.atac_budget, self.idf, self.settings.atac_select, rng
            )
            parts.append((features + self.first_id["atac"], np.ones(len(features), np.float32), lengths, MODALITY_IDS["atac"]))
        for _, _, lengths, _ in parts:
            if len(lengths) != n_cells:
                raise ConfigError(f"modalities hold {len(lengths)} cells, RNA {n_cells}: pass the same cells of every modality")
        return _interleave(parts, n_cells)

    # ------------------------------------------------------------ saving

    def save_pretrained(self, directory) -> Path:
        directory = Path(directory)
        self.rna.save_pretrained(directory)
        config = {
            "features": self.features,
            "idf": None if self.idf is None else self.idf.tolist(),
            "settings": dataclasses.asdict(self.settings),
        }
        write_json_atomically(directory / CONFIG, config)
        return directory

    @classmethod
    def from_saved(cls, directory, rna) -> MultiModalTokenizer:
        """The tokenizer saved in `directory` around `rna`, the RNA tokenizer saved there
        (`saving.load_tokenizer` of a folder holding `multimodal.json` calls this)."""
        config = read_json(Path(directory) / CONFIG, "multi-modal tokenizer config", MODEL_FIX)
        return cls(rna, config["features"], config["idf"], MultiModalSettings(**config["settings"]))


def saved_token_count(directory) -> int:
    """Tokens a saved multi-modal tokenizer adds to its RNA vocabulary (0 when it is RNA-only)."""
    path = Path(directory) / CONFIG
    if not path.exists():
        return 0
    return sum(len(names) for names in read_json(path, "multi-modal tokenizer config", MODEL_FIX)["features"].values())


def _values(tokens: RaggedTokens) -> np.ndarray:
    return np.zeros(len(tokens.input_ids), np.float32) if tokens.values is None else tokens.values.astype(np.float32)


def _capped(features, values, lengths, budget: int):
    """The first `budget` tokens of each cell (panel order)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept_lengths = np.minimum(lengths, budget)
    keep = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, kept_lengths)]) if len(lengths) else np.empty(0, int)
    keep = keep.astype(np.int64)
    return features[keep], values[keep], kept_lengths


def _interleave(parts, n_cells: int) -> RaggedTokens:
    """Cell by cell, each part's tokens in turn: ids, values and modality ids as RaggedTokens."""
    ids, values, modality, lengths_total = [], [], [], np.zeros(n_cells, np.int64)
    starts = [np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64) for _, _, lengths, _ in parts]
    for cell in range(n_cells):
        for (part_ids, part_values, lengths, modality_id), start in zip(parts, starts):
            lo, hi = start[cell], start[cell + 1]
            ids.append(part_ids[lo:hi])
            values.append(part_values[lo:hi])
            modality.append(np.full(hi - lo, modality_id, np.int8))
            lengths_total[cell] += hi - lo
    offsets = np.concatenate([[0], np.cumsum(lengths_total)]).astype(np.int64)
    return RaggedTokens(
        np.concatenate(ids).astype(np.int64),
        offsets,
        np.concatenate(values).astype(np.float32),
        np.concatenate(modality).astype(np.int8),
    )
