"""Batching token sequences for training: masking, dynamic padding, length grouping, packing.

Every random choice takes an explicit `torch.Generator`, so a batch is a pure function of its
cells and the generator's state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from celltron.errors import ConfigError

IGNORE_INDEX = -100


def _as_tensor(values, dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def pad_sequences(cells: list[dict], key: str, pad_value, dtype) -> torch.Tensor:
    """Stack `cell[key]` arrays into a (batch, longest) tensor, right-padded with `pad_value`."""
    longest = max(len(cell[key]) for cell in cells)
    out = torch.full((len(cells), longest), pad_value, dtype=dtype)
    for row, cell in enumerate(cells):
        out[row, : len(cell[key])] = _as_tensor(cell[key], dtype)
    return out


class MLMCollator:
    """Masked-gene modelling: pick `probability` of the non-special tokens; of those, 80% become
    `<mask>`, 10% a random gene token, 10% stay; labels are the original ids there, -100 elsewhere.

    Args:
        pad_id, mask_id: the vocabulary's `<pad>` and `<mask>` ids.
        special_ids: ids that are never masked nor drawn as random replacements.
        vocab_size: number of token ids.
        probability: share of tokens to predict.
        generator: source of randomness.
        values_key: also carry this per-token value array (e.g. GeneCompass's 'values'), if the
            cells have it: the true values come back as `target_values`, and the input values
            of every chosen token are hidden (set to `mask_value`), so that neither the gene
            nor its value leaks into the prediction of the other.
        mask_value: the hidden value.
    """

    def __init__(
        self,
        pad_id: int,
        mask_id: int,
        special_ids,
        vocab_size: int,
        probability: float = 0.15,
        generator: torch.Generator | None = None,
        values_key: str | None = None,
        mask_value: float = 0.0,
    ):
        self.pad_id, self.mask_id, self.vocab_size, self.probability = pad_id, mask_id, vocab_size, probability
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[torch.as_tensor(list(special_ids), dtype=torch.long)] = True
        self.gene_ids = torch.nonzero(~self.special).flatten()
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.values_key, self.mask_value = values_key, mask_value

    def __call__(self, cells: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequences(cells, "input_ids", self.pad_id, torch.long)
        attention_mask = input_ids != self.pad_id
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        candidates = attention_mask & ~self.special[input_ids]
        chosen = candidates & (torch.rand(input_ids.shape, generator=self.generator) < self.probability)
        labels[chosen] = input_ids[chosen]
        roll = torch.rand(input_ids.shape, generator=self.generator)
        masked = chosen & (roll < 0.8)
        randomised = chosen & (roll >= 0.8) & (roll < 0.9)
        input_ids = input_ids.clone()
        input_ids[masked] = self.mask_id
        picks = torch.randint(len(self.gene_ids), (int(randomised.sum()),), generator=self.generator)
        input_ids[randomised] = self.gene_ids[picks]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels}
        if self.values_key and self.values_key in cells[0]:
            target = pad_sequences(cells, self.values_key, 0.0, torch.float32)
            batch["target_values"] = target
            batch[self.values_key] = target.masked_fill(chosen, self.mask_value)
        return batch


class ValueMaskingCollator:
    """scGPT's masked expression objective: hide `mask_ratio` of each cell's gene values (never
    the leading `<cls>` nor padding) by setting them to `mask_value`; padding gets `pad_id` and
    `pad_value`. The original values are returned as `target_values`.
    """

    def __init__(
        self,
        pad_id: int,
        mask_ratio: float = 0.4,
        mask_value: float = -1.0,
        pad_value: float = -2.0,
        keep_first: int = 1,
        generator: torch.Generator | None = None,
    ):
        self.pad_id, self.mask_ratio, self.mask_value, self.pad_value = pad_id, mask_ratio, mask_value, pad_value
        self.keep_first = keep_first
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __call__(self, cells: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequences(cells, "input_ids", self.pad_id, torch.long)
        target = pad_sequences(cells, "values", self.pad_value, torch.float32)
        values = target.clone()
        for row, cell in enumerate(cells):
            maskable = len(cell["input_ids"]) - self.keep_first
            n_mask = int(round(maskable * self.mask_ratio))
            if n_mask > 0:
                picked = torch.randperm(maskable, generator=self.generator)[:n_mask] + self.keep_first
                values[row, picked] = self.mask_value
        return {
            "input_ids": input_ids,
            "values": values,
            "target_values": target,
            "attention_mask": (input_ids != self.pad_id).long(),
        }


def length_grouped(
    cells: Iterable[dict], batch_size: int, buffer_batches: int = 50, generator: torch.Generator | None = None
) -> Iterator[list[dict]]:
    """Group a stream of cells into batches of similar length (less padding): fill a buffer of
    `buffer_batches` batches, sort it by length, cut it into batches and yield them in random
    order. A final partial buffer is yielded too."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    buffer: list[dict] = []
    for cell in cells:
        buffer.append(cell)
        if len(buffer) == batch_size * buffer_batches:
            yield from _sorted_batches(buffer, batch_size, generator)
            buffer = []
    if buffer:
        yield from _sorted_batches(buffer, batch_size, generator)


def _sorted_batches(buffer: list[dict], batch_size: int, generator: torch.Generator) -> Iterator[list[dict]]:
    order = sorted(range(len(buffer)), key=lambda i: len(buffer[i]["input_ids"]))
    batches = [[buffer[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
    for k in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[k]


def pack_stream(cells: Iterable[dict], max_tokens: int) -> Iterator[list[dict]]:
    """Greedily fill packs of at most `max_tokens` tokens, in arrival order. A cell longer than
    the budget is an error (tokenise with a smaller max_len)."""
    pack: list[dict] = []
    used = 0
    for cell in cells:
        length = len(cell["input_ids"])
        if length > max_tokens:
            raise ConfigError(f"a cell of {length} tokens does not fit a pack of {max_tokens}; lower the tokenizer's max_len")
        if used + length > max_tokens:
            yield pack
            pack, used = [], 0
        pack.append(cell)
        used += length
    if pack:
        yield pack


class PackingCollator:
    """Concatenate a pack of cells into one row of exactly `max_tokens` tokens for varlen
    attention: `cu_seqlens` (int32, cumulative sequence starts, the padding tail counted as
    one more sequence so that every token belongs to one), `position_ids` restarting per cell,
    `max_seqlen`.

    Args:
        max_tokens: row length.
        pad_id: token id of the padding tail.
        masker: a padded collator (MLMCollator, ValueMaskingCollator) applied to the pack's
            cells; every per-token tensor it returns is packed the same way. Without one the
            cells' `input_ids` (and `values`, if present) are packed and labels are all -100.
        fill: value of the padding tail per key (defaults: `pad_id` for input_ids, -100 for
            labels, the masker's `pad_value` or 0 for values).
    """

    def __init__(self, max_tokens: int, pad_id: int, mlm=None, fill: dict | None = None):
        self.max_tokens, self.pad_id, self.masker = max_tokens, pad_id, mlm
        pad_value = getattr(mlm, "pad_value", 0.0)
        self.fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "values": pad_value, "target_values": pad_value, **(fill or {})}

    def __call__(self, packs: list[list[dict]]) -> dict[str, torch.Tensor]:
        rows = [self._pack(pack) for pack in packs]
        out = {key: torch.stack([row[key] for row in rows]) for key in rows[0] if key not in ("cu_seqlens", "max_seqlen")}
        out["cu_seqlens"] = [row["cu_seqlens"] for row in rows]
        out["max_seqlen"] = max(int(row["max_seqlen"]) for row in rows)
        return out

    def _padded(self, pack: list[dict], lengths: list[int]) -> dict[str, torch.Tensor]:
        if self.masker is not None:
            return self.masker(pack)
        batch = {"input_ids": pad_sequences(pack, "input_ids", self.pad_id, torch.long)}
        batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        if "values" in pack[0]:
            batch["values"] = pad_sequences(pack, "values", self.fill["values"], torch.float32)
        return batch

    def _pack(self, pack: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(cell["input_ids"]) for cell in pack]
        if sum(lengths) > self.max_tokens:
            raise ValueError(f"pack of {sum(lengths)} tokens exceeds max_tokens={self.max_tokens}")
        batch = self._padded(pack, lengths)
        tail = self.max_tokens - sum(lengths)
        row = {}
        for key, padded in batch.items():
            if key == "attention_mask" or padded.dim() != 2:
                continue
            tail_part = torch.full((tail,), self.fill.get(key, 0), dtype=padded.dtype)
            row[key] = torch.cat([padded[i, :n] for i, n in enumerate(lengths)] + [tail_part])
        # padding positions stay 0: a long tail must not index past the position table
        row["position_ids"] = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(tail, dtype=torch.long)])
        seq_lengths = lengths + ([tail] if tail else [])
        row["cu_seqlens"] = torch.tensor([0] + np.cumsum(seq_lengths).tolist(), dtype=torch.int32)
        row["attention_mask"] = torch.cat([torch.ones(sum(lengths), dtype=torch.long), torch.zeros(tail, dtype=torch.long)])
        row["max_seqlen"] = torch.tensor(max(seq_lengths))
        return row
