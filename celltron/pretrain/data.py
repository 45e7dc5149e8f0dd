"""From a corpus to training batches: CorpusStream -> tokenizer -> masking collator, padded
(grouped by length) or packed, exactly resumable.

Cells are handled in rounds of `round_cells`: a round is tokenised as one block, masked with a
generator seeded by where the round starts in the stream, and cut into batches. Every batch
carries its round's start and its index in the round; the data module records those of the
batches the model actually trained on, so a resumed run restarts each worker's stream at its
round and skips the batches already used: the same batches, masks included, in the same order,
whatever the packing, the length grouping or the number of workers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from celltron.corpus.genes import check_token_coverage
from celltron.corpus.store import Corpus
from celltron.corpus.stream import CorpusStream
from celltron.model_zoo.registry import family as family_spec
from celltron.model_zoo.spec import VocabIds
from celltron.pretrain.config import DataSection
from celltron.tokenizers.collate import PackingCollator, length_grouped, pack_stream, pad_sequences
from celltron.tokenizers.multimodal import ModalityCells, MultiModalTokenizer
from celltron.tokenizers.rank_value import float32_datasets
from celltron.tokenizers.schemes import Block, make_tokenizer
from celltron.training.module import POSITION_KEY


@dataclass
class CorpusGenes:
    """A corpus's gene table in the shape `make_tokenizer` takes."""

    gene_ids: np.ndarray
    gene_species: np.ndarray
    medians: dict


def corpus_tokenizer(corpus: Corpus, scheme: str, max_len: int | None, seed: int):
    genes = CorpusGenes(np.asarray(corpus.gene_ids), np.asarray(corpus.manifest["genes"]["species"]), corpus.gene_medians())
    tokenizer, _ = make_tokenizer(scheme, genes, max_len, seed)
    return tokenizer


def check_gene_coverage(corpus: Corpus, tokenizer, scheme: str) -> float:
    """The share of the corpus's counts on genes that have a token in the tokenizer's vocabulary;
    below MIN_MAPPED_FRACTION (the rule `celltron tokenize` and the lab verbs apply) the run is
    refused: a mouse corpus read with a human-only vocabulary gives every cell no gene tokens,
    and the model would train on special tokens alone."""
    genes = corpus.manifest["genes"]
    species = ", ".join(sorted(set(np.asarray(genes["species"]).tolist())))
    fix = (
        f"the corpus's species is {species}; use a scheme whose vocabulary covers its genes: for mouse or mixed-species "
        f"corpora tokenizer.scheme: ortholog with model.family: genecompass (mouse genes take their human orthologs' "
        f"tokens), not {scheme}"
    )
    return check_token_coverage(
        corpus.gene_ids, genes["symbol"], genes["count_sum"], tokenizer.vocab, str(corpus.location), fix, option=None
    )


class Masker:
    """The family's padded masking collator (its record's `masking`), built per round around
    that round's generator."""

    def __init__(self, family: str, vocab, section: DataSection):
        self.family, self.section = family, section
        self.ids = VocabIds.of(vocab)
        self.pad_id = self.ids.pad_id
        self.masking = family_spec(family).masking  # the function itself: workers need no registry

    def __call__(self, generator: torch.Generator):
        return self.masking(self.ids, self.section, generator)


class TokenBatches(IterableDataset):
    """Batches of one corpus split, in rounds (see the module docstring).

    Args:
        stream: the split's CorpusStream (its rank/world are fixed when iteration starts).
        tokenizer: bound to the corpus's genes; a MultiModalTokenizer (multimodal.joint) lays
            out each cell's RNA, protein and chromatin tokens in one sequence, and batches
            then hold `modality_ids` (padded with 0).
        masker: a Masker.
        section: batch size, packing, round size.
        seed: seeds every round's generator together with the round's position.
        resume: {stream worker: (epoch, offset, batches used)} and the worker rotation.
        pair: the pair tower's tokens (tokenizers.multimodal.PairTokens) of paired pretraining;
            each batch then also holds `pair_input_ids`, `pair_values`, `pair_attention_mask`
            (padded with `pair_pad_value`) and `pair_measured`, for the same cells in order.
    """

    def __init__(
        self,
        stream: CorpusStream,
        tokenizer,
        masker: Masker,
        section: DataSection,
        seed: int,
        resume: dict | None = None,
        rotation: int = 0,
        pair=None,
        pair_pad_value: float = 0.0,
    ):
        super().__init__()
        self.stream, self.tokenizer, self.masker, self.section, self.seed = stream, tokenizer, masker, section, seed
        self.pair, self.pair_pad_value = pair, pair_pad_value
        self.resume, self.rotation = dict(resume or {}), rotation
        categories = stream.corpus.manifest["obs_categories"]
        self.species_names = list(categories.get("species", []))
        self.float32_of_dataset = float32_datasets(stream.corpus.manifest)

    def __iter__(self):
        worker, num_workers = (0, 1) if get_worker_info() is None else (get_worker_info().id, get_worker_info().num_workers)
        stream_worker = (worker + self.rotation) % num_workers
        rank = self.stream._placement()[0]
        start = tuple(self.resume[stream_worker][:2]) if stream_worker in self.resume else (self.stream.epoch, 0)
        skip = self.resume[stream_worker][2] if stream_worker in self.resume else 0
        # the stream resumes at the round's start; its own rotation matches ours
        self.stream._positions = {stream_worker: start}
        self.stream._rotation, self.stream._resume_workers = self.rotation, None
        # a round is one batch of the stream: the same cells as round_cells single cells, no dict per cell
        self.stream.batch_size = self.section.round_cells
        for flat in self.stream:
            generator = torch.Generator().manual_seed(_round_seed(self.seed, rank, stream_worker, start))
            for index, batch in enumerate(self._round_batches(flat, generator)):
                if index < skip:
                    continue
                batch[POSITION_KEY] = torch.tensor([stream_worker, start[0], start[1], index + 1])
                yield batch
            skip = 0
            start = tuple(self.stream._positions[stream_worker])

    def _round_batches(self, flat: dict, generator: torch.Generator):
        n_cells = len(flat["offsets"]) - 1
        species = [self.species_names[c] if c >= 0 else None for c in flat.get("species", np.full(n_cells, -1))]
        float32 = self.float32_of_dataset[flat["dataset"]] if "dataset" in flat else None
        block = Block(flat["offsets"], flat["genes"], flat["counts"], flat["n_counts"], species, {}, float32)
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        tokens = self._encode(block, flat, rng)
        cells = [
            {"input_ids": tokens[i]} if tokens.values is None else {"input_ids": tokens[i], "values": tokens.cell_values(i)}
            for i in range(len(tokens))
        ]
        if tokens.modality_ids is not None:
            for i, cell in enumerate(cells):
                cell["modality_ids"] = tokens.modality_ids[tokens.offsets[i] : tokens.offsets[i + 1]]
        pair = self.pair(flat, rng) if self.pair is not None else None
        if pair is not None:
            for i, cell in enumerate(cells):
                cell["pair_row"] = i
        masker = self.masker(generator)
        if self.section.packing:
            packer = PackingCollator(self.section.max_tokens, self.masker.pad_id, masker)
            packs = list(pack_stream(iter(cells), self.section.max_tokens))
            for lo in range(0, len(packs), self.section.batch_size):
                group = packs[lo : lo + self.section.batch_size]
                yield _counted(packer(group), sum(len(p) for p in group))
        else:
            groups = length_grouped(cells, self.section.batch_size, math.ceil(len(cells) / self.section.batch_size), generator)
            for group in groups:
                batch = masker(group)
                if "modality_ids" in group[0]:  # the masking collators carry ids and values only
                    batch["modality_ids"] = pad_sequences(group, "modality_ids", 0, torch.long)
                if pair is not None:
                    batch |= pair_batch(pair, [cell["pair_row"] for cell in group], self.pair_pad_value)
                yield _counted(batch, len(group))

    def _encode(self, block: Block, flat: dict, rng: np.random.Generator):
        if not isinstance(self.tokenizer, MultiModalTokenizer):
            return self.tokenizer.encode_block(block, rng)
        modalities = {m: ModalityCells.from_batch(flat, m) for m in self.tokenizer.features}
        return self.tokenizer.encode(block, modalities, rng)


def pair_batch(tokens, rows: list[int], pad_value: float) -> dict[str, torch.Tensor]:
    """The pair tower's padded tokens of cells `rows` (in that order); a cell not measured in the
    pair modality gets one padding token and `pair_measured` False."""
    lengths = [int(tokens.offsets[r + 1] - tokens.offsets[r]) for r in rows]
    width = max(max(lengths), 1)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    values = torch.full((len(rows), width), pad_value, dtype=torch.float32)
    for k, (row, n) in enumerate(zip(rows, lengths)):
        ids[k, :n] = torch.as_tensor(tokens[row])
        values[k, :n] = torch.as_tensor(tokens.cell_values(row))
    mask = ids != 0
    mask[:, 0] = True  # an unmeasured cell attends to its padding token (no empty rows); it is left out of the loss
    return {
        "pair_input_ids": ids,
        "pair_values": values,
        "pair_attention_mask": mask.long(),
        "pair_measured": torch.tensor(lengths) > 0,
    }


def _counted(batch: dict, n_cells: int) -> dict:
    batch["n_cells"] = torch.tensor(n_cells)
    batch["n_tokens"] = batch["attention_mask"].sum()
    return batch


def _round_seed(seed: int, rank: int, worker: int, start: tuple[int, int]) -> int:
    return int(np.random.SeedSequence([seed, rank, worker, int(start[0]), int(start[1])]).generate_state(1, np.uint64)[0] >> 1)


class PretrainDataModule(pl.LightningDataModule):
    """Training and validation batches of a corpus for one model family; its state (saved in
    every checkpoint) is where each rank's workers stand, from the batches actually trained on."""

    def __init__(
        self, corpus: Corpus, family: str, tokenizer, section: DataSection, seed: int, pair=None, pair_pad_value: float = 0.0
    ):
        super().__init__()
        self.corpus, self.family, self.tokenizer, self.section, self.seed = corpus, family, tokenizer, section, seed
        self.pair, self.pair_pad_value = pair, pair_pad_value  # paired pretraining: the pair tower's tokens
        self.masker = Masker(family, tokenizer.vocab, section)
        self._resume: dict = {}
        self._rotation = 0
        self._used: dict[int, tuple[int, int, int]] = {}
        self._batches_used = 0

    def _stream(self, split: str, infinite: bool) -> CorpusStream:
        return CorpusStream(
            self.corpus,
            split=split,
            seed=self.seed,
            block_size=self.section.block_size,
            buffer_size=self.section.buffer_size,
            infinite=infinite,
            shuffle=infinite,
        )

    def _loader(self, dataset: IterableDataset, workers: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            multiprocessing_context="fork" if workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = TokenBatches(
            self._stream("train", True),
            self.tokenizer,
            self.masker,
            self.section,
            self.seed,
            self._resume,
            self._rotation,
            self.pair,
            self.pair_pad_value,
        )
        return self._loader(dataset, self.section.num_workers)

    def val_dataloader(self) -> DataLoader:
        if not self.corpus.shards("val"):
            return []
        dataset = TokenBatches(
            self._stream("val", False),
            self.tokenizer,
            self.masker,
            self.section,
            self.seed + 1,
            None,
            0,
            self.pair,
            self.pair_pad_value,
        )
        return self._loader(dataset, 0)

    # ------------------------------------------------------------ resume

    def record(self, position: torch.Tensor) -> None:
        """Note a batch the model trained on (called once per training batch)."""
        worker, epoch, offset, used = (int(v) for v in position.tolist())
        self._used[worker] = (epoch, offset, used)
        self._batches_used += 1

    def _my_state(self) -> dict:
        workers = max(self.section.num_workers, 1)
        resume = {**self._resume, **self._used}
        return {
            "workers": {int(w): list(p) for w, p in resume.items()},
            "rotation": (self._rotation + self._batches_used) % workers,
            "num_workers": workers,
        }

    def state_dict(self) -> dict:
        mine = self._my_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
            return {"ranks": every}
        return {"ranks": [mine]}

    def load_state_dict(self, state: dict) -> None:
        """Resume each worker at its round. A checkpoint of another job shape (ranks or
        workers) cannot place this rank's workers exactly: the data then continues at the start
        of the epoch after the furthest any worker had reached (a warning says so)."""
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        world = (
            torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        )
        ranks = state["ranks"]
        workers = max(self.section.num_workers, 1)
        self._used, self._batches_used = {}, 0
        if len(ranks) == world and ranks[rank]["num_workers"] == workers:
            mine = ranks[rank]
            self._resume = {int(w): tuple(p) for w, p in mine["workers"].items()}
            self._rotation = mine["rotation"]
            return
        furthest = max((p[0] for saved in ranks for p in saved["workers"].values()), default=-1)
        warnings.warn(
            f"checkpoint holds the data positions of {len(ranks)} ranks x {ranks[0]['num_workers']} workers, this job "
            f"has {world} x {workers}: data continues at the start of epoch {furthest + 1} (exact batch-for-batch "
            "resume needs the same shape)",
            stacklevel=2,
        )
        self._resume = {w: (furthest + 1, 0, 0) for w in range(workers)}
        self._rotation = 0
