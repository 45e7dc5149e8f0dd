"""The perturbation head on a pretrained encoder, the training pairs it learns from and the
pseudobulk prediction it makes; the task that trains and reports it is run.py."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.utils import ModelOutput

from celltron.corpus.genes import map_genes
from celltron.errors import ConfigError
from celltron.finetune.adapt import InputFlags
from celltron.finetune.config import HEAD_TYPES
from celltron.model_zoo.registry import base_of, gene_token_table
from celltron.tokenizers.ragged import RaggedTokens

log = logging.getLogger(__name__)


@dataclass
class PerturbationOutput(ModelOutput):
    """loss: MSE on all genes plus the weighted MSE on DE genes (with targets).
    predicted: (batch, measured genes) predicted log-normalised expression."""

    loss: torch.Tensor | None = None
    predicted: torch.Tensor | None = None


class PerturbationHead(nn.Module):
    """What both perturbation models share: from the targets' view and the cell embedding, a
    query that mixes the training perturbations' shifts (retrieval) or scores each measured gene
    (bilinear), added to the control mean; the loss. Subclasses say where the views come from."""

    def _init_head(self, hidden: int, gene_tokens, control_mean, train_shifts, train_targets, head: str, de_weight: float):
        if head not in HEAD_TYPES:
            raise ConfigError(f"perturbation.head_type {head!r} is not one of {HEAD_TYPES}")
        self.head, self.de_weight = head, de_weight
        self.query = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.query[2].weight)  # uniform attention / no correction: the training mean
        nn.init.zeros_(self.query[2].bias)
        self.keys = nn.Linear(hidden, hidden, bias=False)
        self.gene_bias = nn.Parameter(torch.zeros(len(gene_tokens))) if head == "bilinear" else None
        width = max(len(t) for t in train_targets)
        padded = np.full((len(train_targets), width), -1, dtype=np.int64)
        for row, tokens in enumerate(train_targets):
            padded[row, : len(tokens)] = tokens
        self.register_buffer("gene_tokens", torch.as_tensor(np.asarray(gene_tokens), dtype=torch.long))
        self.register_buffer("train_targets", torch.as_tensor(padded))
        # every token whose gene vector the head reads (derived, so not saved with the weights)
        read = torch.unique(torch.cat([self.gene_tokens, self.train_targets.flatten()]))
        self.register_buffer("read_tokens", read[read >= 0], persistent=False)
        self.register_buffer("train_shifts", torch.as_tensor(np.asarray(train_shifts), dtype=torch.float32))
        self.register_buffer("control_mean", torch.as_tensor(np.asarray(control_mean), dtype=torch.float32))

    def _shift(self, query: torch.Tensor, perturbation: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
        """The predicted shift from control; `table`: the pretrained input embeddings of tokens."""
        scale = math.sqrt(query.shape[-1])
        if self.head == "bilinear":
            gene_keys = self.keys(embed_tokens(table, self.gene_tokens))
            return self.train_shifts.mean(0) + (query @ gene_keys.T).float() / scale + self.gene_bias
        scores = (query @ self.keys(embed_tokens(table, self.train_targets)).T).float() / scale
        if perturbation is not None and len(self.train_shifts) > 1:
            own = perturbation.unsqueeze(-1) == torch.arange(len(self.train_shifts), device=scores.device)
            scores = scores.masked_fill(own, float("-inf"))
        return torch.softmax(scores, dim=-1) @ self.train_shifts

    def _predict(self, targets, cell_embedding, table, perturbation=None, target=None, de_mask=None) -> PerturbationOutput:
        query = self.query(torch.cat([targets, cell_embedding], dim=-1))
        predicted = self.control_mean + self._shift(query, perturbation, table)
        loss = None
        if target is not None:
            error = (predicted - target.float()) ** 2
            loss = error.mean()
            if de_mask is not None and self.de_weight:
                mask = de_mask.float()
                loss = loss + self.de_weight * (error * mask).sum() / mask.sum().clamp(min=1)
        return PerturbationOutput(loss=loss, predicted=predicted)


def embed_tokens(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rows of `table` for `tokens` (-1: none, zero), averaged over the last axis when 2-D."""
    known = (tokens >= 0).unsqueeze(-1).to(table.dtype)
    rows = table[tokens.clamp(min=0)] * known
    return rows.sum(-2) / known.sum(-2).clamp(min=1) if tokens.dim() == 2 else rows


class PerturbationModel(PerturbationHead):
    """A pretrained encoder with perturbation flags and a per-gene expression head.

    Heads (both start at the training-mean prediction):
    - retrieval: the predicted shift is an attention-weighted mix of the training
      perturbations' shifts; the query comes from the encoder's view of the flagged genes in
      the cell, the keys from the pretrained embeddings of each training perturbation's
      targets. A training example never attends to its own perturbation (leave-one-out), so
      the head learns what carries over to unseen perturbations instead of memorising.
    - bilinear: the training-mean shift plus q([h_targets, h_cell]) . K e_gene + b_gene per
      measured gene, from its pretrained gene embedding (free to memorise each training
      perturbation).

    Args:
        encoder: the pretrained model (any family, possibly wrapped by peft).
        gene_tokens: (measured genes,) token of each measured gene, -1 where it has none.
        control_mean: (measured genes,) mean log-normalised expression of control cells.
        train_shifts: (training perturbations, measured genes) mean shift of each from control.
        train_targets: token ids of each training perturbation's target genes.
        head: retrieval or bilinear.
        de_weight: loss weight of the DE genes' MSE beside the all-gene MSE.
    """

    def __init__(
        self,
        encoder: nn.Module,
        gene_tokens,
        control_mean,
        train_shifts,
        train_targets,
        head: str = "retrieval",
        de_weight: float = 1.0,
    ):
        super().__init__()
        self.encoder = encoder
        hidden = self.config.hidden_size
        self.flag_embedding = nn.Embedding(2, hidden)
        nn.init.normal_(self.flag_embedding.weight, std=0.02)
        self._init_head(hidden, gene_tokens, control_mean, train_shifts, train_targets, head, de_weight)
        self.flags = InputFlags(encoder, self.flag_embedding)

    @property
    def config(self):
        return base_of(self.encoder).config

    def forward(
        self, input_ids, attention_mask, flags, values=None, perturbation=None, target=None, de_mask=None, **unused
    ) -> PerturbationOutput:
        """`perturbation`: index of each example's perturbation among the training ones (-1:
        not a training perturbation), so the retrieval head leaves it out."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "heads": False}
        if values is not None:
            inputs["values"] = values
        self.flags.flags = flags
        try:
            out = self.encoder(**inputs)
        finally:
            self.flags.flags = None
        targets = flagged_mean(out.last_hidden_state, flags)
        # the rows the head reads, as the encoder sees those genes (GeneCompass: priors included)
        table = gene_token_table(self.encoder, self.read_tokens)
        return self._predict(targets, out.cell_embedding, table, perturbation, target, de_mask)


def flagged_mean(hidden: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """(batch, hidden): the mean of each sequence's hidden states at its flagged (target) positions."""
    flagged = flags.unsqueeze(-1).to(hidden.dtype)
    return (hidden * flagged).sum(1) / flagged.sum(1).clamp(min=1)


class PerturbationProbe(PerturbationHead):
    """The same head on a frozen encoder (perturbation.encoder: frozen): the encoder's view of
    each (control cell, perturbation) pair, computed once in eval mode with the targets' tokens
    in the cell (`frozen_views`), is the input; no flag is learned (the encoder does not train),
    so the head alone trains, in seconds instead of hours on a CPU.

    Args:
        table: the rows of the pretrained input-embedding table the head reads: every token of
            `gene_tokens` and `train_targets` (a copy; the encoder is not kept).
        Others as PerturbationModel's.
    """

    def __init__(self, table, gene_tokens, control_mean, train_shifts, train_targets, head="retrieval", de_weight=1.0):
        super().__init__()
        self._init_head(table.shape[1], gene_tokens, control_mean, train_shifts, train_targets, head, de_weight)
        used = self.read_tokens
        # only the rows the head reads, so checkpoints stay small (a vocabulary is ~60k rows)
        compact = torch.zeros(int(used.max()) + 1 if len(used) else 1, table.shape[1])
        compact[used] = torch.as_tensor(table, dtype=torch.float32)[used]
        self.register_buffer("table", compact)

    def forward(self, targets, cell_embedding, perturbation=None, target=None, de_mask=None, **unused) -> PerturbationOutput:
        return self._predict(targets, cell_embedding, self.table, perturbation, target, de_mask)


def target_tokens(perturbations: list[str], vocab, species: str, source: str) -> dict[str, np.ndarray]:
    """Tokens of each perturbation's target genes; perturbations with a target the vocabulary
    has no token for are left out (and named in a warning)."""
    out, missing = {}, []
    for perturbation in perturbations:
        genes = perturbation.split("+")
        ids = map_genes(genes, species, source).ensembl_ids if genes else []
        tokens = vocab.lookup_genes(ids)
        if (tokens < 0).any() or any(i == "" for i in ids):
            missing.append(perturbation)
        else:
            out[perturbation] = tokens
    if missing:
        log.warning(
            "%s: %d perturbation(s) target genes without a token in the model's vocabulary and are left out: %s",
            source,
            len(missing),
            ", ".join(missing[:10]),
        )
    return out


def flag_targets(
    ids: np.ndarray, values: np.ndarray | None, targets: np.ndarray, specials: set, max_tokens: int | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A cell's tokens with the perturbed genes flagged; a target the cell does not express is
    added (value 0) after its last gene token, dropping its lowest-ranked genes to stay within
    `max_tokens`."""
    ids = np.asarray(ids)
    absent = [t for t in targets if t not in set(ids.tolist())]
    end = len(ids)
    while end > 0 and int(ids[end - 1]) in specials:
        end -= 1  # keep trailing special tokens (eos) last
    if max_tokens is not None and len(ids) + len(absent) > max_tokens:
        drop = len(ids) + len(absent) - max_tokens
        keep = np.r_[np.arange(end - drop), np.arange(end, len(ids))]
        ids, values, end = ids[keep], (values[keep] if values is not None else None), end - drop
    added = np.asarray(absent, dtype=ids.dtype)
    ids = np.concatenate([ids[:end], added, ids[end:]])
    if values is not None:
        values = np.concatenate([values[:end], np.zeros(len(added), dtype=values.dtype), values[end:]])
    flags = np.isin(ids, targets).astype(np.int64)
    return ids, values, flags


class PerturbationPairs(Dataset):
    """(control cell, perturbation) examples: the control cell's tokens with the perturbation's
    targets flagged, and the perturbation's pseudobulk mean and DE genes as the target."""

    def __init__(
        self,
        control_tokens: RaggedTokens,
        pairs: np.ndarray,
        targets: list[np.ndarray],
        means: np.ndarray | None,
        de_masks: np.ndarray | None,
        specials: set,
        max_tokens: int | None,
    ):
        self.tokens, self.pairs, self.targets = control_tokens, pairs, targets
        self.means, self.de_masks, self.specials, self.max_tokens = means, de_masks, specials, max_tokens

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        cell, perturbation = (int(x) for x in self.pairs[i])
        values = self.tokens.cell_values(cell) if self.tokens.values is not None else None
        ids, values, flags = flag_targets(self.tokens[cell], values, self.targets[perturbation], self.specials, self.max_tokens)
        # training examples name their perturbation (the retrieval head leaves it out)
        example = {"input_ids": ids, "flags": flags, "perturbation": perturbation if self.means is not None else -1}
        if values is not None:
            example["values"] = values
        if self.means is not None:
            example["target"] = self.means[perturbation]
            example["de_mask"] = self.de_masks[perturbation]
        return example


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Pad to the longest example; counts for throughput logging."""
    longest = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), longest), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), longest), dtype=torch.long),
        "flags": torch.zeros((len(examples), longest), dtype=torch.long),
    }
    if "values" in examples[0]:
        batch["values"] = torch.zeros((len(examples), longest), dtype=torch.float32)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        batch["attention_mask"][row, :n] = 1
        batch["flags"][row, :n] = torch.as_tensor(example["flags"])
        if "values" in batch:
            batch["values"][row, :n] = torch.as_tensor(example["values"], dtype=torch.float32)
    batch["perturbation"] = torch.as_tensor([e["perturbation"] for e in examples], dtype=torch.long)
    if "target" in examples[0]:
        batch["target"] = torch.as_tensor(np.stack([e["target"] for e in examples]), dtype=torch.float32)
        batch["de_mask"] = torch.as_tensor(np.stack([e["de_mask"] for e in examples]))
    batch["n_cells"] = torch.tensor(len(examples))
    batch["n_tokens"] = batch["attention_mask"].sum()
    return batch


def training_pairs(labels: np.ndarray, perturbations: list[str], n_controls: int, seed: int) -> np.ndarray:
    """One example per perturbed training cell, each with a random control cell (GEARS's pairing)."""
    rng = np.random.default_rng(seed)
    counts = [int((labels == p).sum()) for p in perturbations]
    which = np.repeat(np.arange(len(perturbations)), counts)
    return np.stack([rng.integers(0, n_controls, len(which)), which], axis=1)


@torch.no_grad()
def predict_means(
    model: PerturbationModel,
    control_tokens: RaggedTokens,
    cells: np.ndarray,
    targets: list[np.ndarray],
    specials: set,
    max_tokens: int | None,
    pad_id: int,
    batch_size: int,
) -> np.ndarray:
    """(perturbations, genes): each perturbation's prediction averaged over `cells` (control rows)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for index in range(len(targets)):
        total = 0
        for _, batch in pair_batches(control_tokens, cells, targets, index, specials, max_tokens, pad_id, batch_size):
            batch = {k: v.to(device) for k, v in batch.items() if k not in ("n_cells", "n_tokens")}
            total = total + model(**batch).predicted.double().sum(0)
        out.append((total / len(cells)).cpu().numpy())
    return np.stack(out)


def pair_batches(control_tokens, cells, targets, index: int, specials, max_tokens, pad_id: int, batch_size: int):
    """Padded batches of each of `cells` (control rows) with perturbation `index`'s targets:
    yields (positions in `cells`, batch)."""
    pairs = np.stack([cells, np.full(len(cells), index)], axis=1)
    dataset = PerturbationPairs(control_tokens, pairs, targets, None, None, specials, max_tokens)
    for start in range(0, len(cells), batch_size):
        rows = range(start, min(start + batch_size, len(cells)))
        yield rows, collate_pairs([dataset[i] for i in rows], pad_id)


@torch.no_grad()
def frozen_views(
    encoder: nn.Module,
    control_tokens: RaggedTokens,
    cells: np.ndarray,
    targets: list[np.ndarray],
    specials: set,
    max_tokens: int | None,
    pad_id: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The frozen encoder's view of every (control cell, perturbation) pair, as PerturbationModel
    reads it but without flags: the mean final hidden state at the perturbation's target tokens
    (added to the cell when it does not express them) and the cell embedding. Returns two
    (perturbations, cells, hidden) arrays; eval mode, on the encoder's device."""
    from celltron.lab.inference import autocast, to_device

    encoder.eval()
    device = next(encoder.parameters()).device
    hidden = base_of(encoder).config.hidden_size
    at_targets = np.zeros((len(targets), len(cells), hidden), dtype=np.float32)
    cell_embeddings = np.zeros_like(at_targets)
    for index in range(len(targets)):
        for rows, batch in pair_batches(control_tokens, cells, targets, index, specials, max_tokens, pad_id, batch_size):
            batch = to_device(batch, device)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "values") if k in batch}
            with autocast(device):
                out = encoder(**inputs, heads=False)
            at_targets[index, rows] = flagged_mean(out.last_hidden_state, batch["flags"]).float().cpu().numpy()
            cell_embeddings[index, rows] = out.cell_embedding.float().cpu().numpy()
    return at_targets, cell_embeddings


class ViewPairs(Dataset):
    """(cached view, perturbation) examples for PerturbationProbe: `pairs` rows are (cell, training
    perturbation), `columns[k]` the training perturbation's index in the views."""

    def __init__(self, views: tuple[np.ndarray, np.ndarray], pairs: np.ndarray, columns: np.ndarray, means, de_masks):
        self.views, self.pairs, self.columns, self.means, self.de_masks = views, pairs, columns, means, de_masks

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        cell, perturbation = (int(x) for x in self.pairs[i])
        column = self.columns[perturbation]
        return {
            "targets": self.views[0][column, cell],
            "cell_embedding": self.views[1][column, cell],
            "perturbation": perturbation,
            "target": self.means[perturbation],
            "de_mask": self.de_masks[perturbation],
        }


def collate_views(examples: list[dict]) -> dict:
    batch = {key: torch.as_tensor(np.stack([e[key] for e in examples])) for key in examples[0]}
    batch["n_cells"] = torch.tensor(len(examples))
    return batch


@torch.no_grad()
def probe_means(model: PerturbationProbe, views: tuple[np.ndarray, np.ndarray], columns: list[int]) -> np.ndarray:
    """(perturbations, genes): each perturbation's prediction averaged over every cell of the views."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for column in columns:
        targets, cells = (torch.as_tensor(view[column], device=device) for view in views)
        out.append(model(targets, cells).predicted.double().mean(0).cpu().numpy())
    return np.stack(out)
