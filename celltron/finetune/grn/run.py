"""`celltron grn`: a ranked TF -> target edge list from a pretrained model, and, with a
ground truth, its scores beside the co-expression baselines.

Methods so far:
- embedding: cosine similarity of the model's contextual gene embeddings (each gene's final
  hidden state averaged over the cells that express it), scGPT's gene-program approach.
- attention: how much a target's token attends to a TF's token, averaged over heads, layers
  and the cells where both appear (the scGPT and Geneformer attention analyses).
- in-silico: delete a TF's token from a cell and measure how far each target's contextual
  embedding moves (1 - cosine), averaged over cells (Geneformer's in-silico deletion); every
  TF of a cell is deleted in one batch of variants.
"""

from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from celltron.corpus.genes import MIN_MAPPED_FRACTION
from celltron.errors import ConfigError, InputError
from celltron.finetune.adapt import load_encoder
from celltron.finetune.config import AdaptSection
from celltron.finetune.grn.evaluate import (
    ANCHOR_WEIGHTS,
    CHOICE_METRIC,
    EDGE_COLUMNS,
    INTERVAL_METRICS,
    anchored_scores,
    block_folds,
    candidate_edges,
    check_anchor_weights,
    choose_anchor_weight,
    coexpression_scores,
    degree_prior_scores,
    evaluate_edges,
    evaluate_on_folds,
    is_true_edge,
    tree_scores,
)
from celltron.finetune.report import choose_best, verdict_line, write_metrics
from celltron.inputs import MissingInputError, read_truth
from celltron.io import write_file_atomically
from celltron.lab.data import check_vocabulary_coverage, load_model_tokenizer, read_lab_data, tokenize_cells
from celltron.lab.inference import autocast, pad_cells, pick_device, to_device
from celltron.model_zoo.common import recording_attention
from celltron.model_zoo.registry import resolve_model_folder
from celltron.preprocessing import log_normalise
from celltron.tokenizers.ragged import RaggedTokens

log = logging.getLogger(__name__)
METHODS = ("embedding", "attention", "in-silico")
BASELINES = ("coexpression_pearson", "coexpression_spearman", "genie3_extra_trees")
HEADS = ("anchored", "plain")
TOKEN_CHOICES = ("candidates", "tokenizer")


def bundled_tfs(species: str) -> list[str]:
    """The TF list shipped for `species` (TRRUST v2's TFs; see celltron/data/grn/PROVENANCE.md)."""
    text = resources.files("celltron.data.grn").joinpath(f"tfs_{species}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_tfs(path) -> list[str]:
    """A TF list: one symbol per line (a first tab-separated column; '#' lines are comments)."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"--tfs {path}: no such file (one TF symbol per line)")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"--tfs {path}: not a text file; expected one TF symbol per line") from None
    tfs = [line.split("\t")[0].strip() for line in lines if line.strip() and not line.startswith("#")]
    if not tfs:
        raise InputError(f"--tfs {path}: holds no TF symbols; expected one TF symbol per line")
    return tfs


def _check_truth_is_scorable(truth: pd.DataFrame, tfs, targets, truth_path, data) -> None:
    """A truth none of whose edges is among the scored pairs would give NaN scores: refuse it
    before any model work (another species, or another gene naming, than the data)."""
    tf_set, target_set = set(tfs), set(targets)
    if not any(tf in tf_set and target in target_set for tf, target in zip(truth.tf, truth.target)):
        raise InputError(
            f"--truth {truth_path}: none of its {len(truth)} edges links a TF found in {data} ({len(tfs)}) to one of "
            f"the {len(targets)} target genes scored; check that it is for the data's species and uses gene "
            "symbols, or raise --top-genes"
        )


@torch.no_grad()
def contextual_gene_embeddings(
    model, tokens, vocab_size: int, pad_id: int, batch_size: int = 32, precision: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Each token's final hidden state summed over the cells it appears in; returns the mean per
    token (vocab, hidden) and how many cells each token appeared in. Runs where `model` is."""
    model.eval()
    device = next(model.parameters()).device
    hidden_size = model.config.hidden_size
    sums = torch.zeros(vocab_size, hidden_size, dtype=torch.float64)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for start in range(0, len(tokens), batch_size):
        batch = pad_cells(tokens, np.arange(start, min(start + batch_size, len(tokens))), pad_id)
        with autocast(device, precision):
            hidden = model(**to_device(batch, device), heads=False).last_hidden_state.float().cpu()
        real = batch["attention_mask"].bool()
        ids = batch["input_ids"][real]
        sums.index_add_(0, ids, hidden[real].double())
        counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    return means.numpy(), counts.numpy()


def embedding_scores(means: np.ndarray, counts: np.ndarray, token_of: dict[str, int], tfs, targets) -> pd.DataFrame:
    """Cosine similarity of TF and target embeddings; genes the model never saw rank last."""
    edges = candidate_edges(tfs, targets)
    unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    tf_tokens = np.array([token_of.get(g, -1) for g in edges.tf])
    target_tokens = np.array([token_of.get(g, -1) for g in edges.target])
    seen = (tf_tokens >= 0) & (target_tokens >= 0)
    seen[seen] &= (counts[tf_tokens[seen]] > 0) & (counts[target_tokens[seen]] > 0)
    score = np.full(len(edges), -2.0)  # below any cosine
    score[seen] = np.einsum("ij,ij->i", unit[tf_tokens[seen]], unit[target_tokens[seen]])
    edges["score"] = score
    edges["method"] = "embedding"
    return edges


@torch.no_grad()
def attention_scores(
    model, tokens, pad_id: int, token_of: dict[str, int], tfs, targets, batch_size: int = 32, precision: str = "auto"
) -> dict[str, pd.DataFrame]:
    """Attention of each target (query) on each TF (key), averaged over the cells holding both;
    pairs never seen together rank last. Returns one edge list per view of the attention:
    "mean" (over every layer and head, first, so it wins ties), "layer{l}" (over that layer's
    heads) and "layer{l}_head{h}" (one head), layers and heads counted from 1. Heads specialise,
    so averaging them all can wash out the one that tracks regulation; which view to trust is
    a choice made on training edges (`evaluate.evaluate_on_folds`)."""
    model.eval()
    device = next(model.parameters()).device
    tf_row = {token_of[g]: i for i, g in enumerate(tfs) if g in token_of}
    target_column = {token_of[g]: j for j, g in enumerate(targets) if g in token_of}
    sums, counts = None, np.zeros((len(tfs), len(targets)))
    for start in range(0, len(tokens), batch_size):
        rows = np.arange(start, min(start + batch_size, len(tokens)))
        batch = pad_cells(tokens, rows, pad_id)
        with recording_attention([], per_head=True) as records, autocast(device, precision):
            model(**to_device(batch, device), heads=False)
        attention = torch.stack(records, 1).float().cpu().numpy()  # (cells, layers, heads, queries, keys)
        if sums is None:
            sums = np.zeros((*attention.shape[1:3], len(tfs), len(targets)))
        for i, row in enumerate(rows):
            tf_pos, tf_idx = _positions(tokens[row], tf_row)
            target_pos, target_idx = _positions(tokens[row], target_column)
            if not len(tf_pos) or not len(target_pos):
                continue
            # (layers, heads, targets, TFs) -> (layers, heads, TFs, targets)
            block = attention[i][:, :, target_pos[:, None], tf_pos[None, :]].swapaxes(-1, -2)
            sums[:, :, tf_idx[:, None], target_idx[None, :]] += block
            counts[np.ix_(tf_idx, target_idx)] += 1
    if sums is None:  # no cells
        sums = np.zeros((1, 1, len(tfs), len(targets)))
    return _attention_views(sums, counts, tfs, targets)


def _positions(ids, index_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Positions in a cell's `ids` of the tokens `index_of` knows, and their indices there."""
    pairs = [(p, index_of[t]) for p, t in enumerate(np.asarray(ids).tolist()) if t in index_of]
    return (np.array([p for p, _ in pairs], dtype=np.int64), np.array([i for _, i in pairs], dtype=np.int64))


def _attention_views(sums: np.ndarray, counts: np.ndarray, tfs, targets) -> dict[str, pd.DataFrame]:
    """Edge lists from (layers, heads, TFs, targets) attention sums over `counts` cells."""
    layers, heads = sums.shape[:2]
    views = {"mean": sums.mean((0, 1))}
    views |= {f"layer{layer + 1}": sums[layer].mean(0) for layer in range(layers)}
    views |= {f"layer{layer + 1}_head{head + 1}": sums[layer, head] for layer in range(layers) for head in range(heads)}
    edges = candidate_edges(tfs, targets)
    rows, columns = pd.Index(tfs).get_indexer(edges.tf), pd.Index(targets).get_indexer(edges.target)
    seen = counts[rows, columns] > 0
    out = {}
    for name, total in views.items():
        score = np.where(seen, total[rows, columns] / np.maximum(counts[rows, columns], 1), -1.0)
        out[name] = pd.DataFrame({"tf": edges.tf, "target": edges.target, "score": score, "method": "attention"}, copy=False)
    return out


def _cell_batch(ids: np.ndarray, values, deleted: list[int], pad_id: int) -> dict:
    """The cell itself (row 0) and one row per deleted position, padded."""
    rows = [np.arange(len(ids))] + [np.delete(np.arange(len(ids)), p) for p in deleted]
    batch = {
        "input_ids": torch.full((len(rows), len(ids)), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), len(ids)), dtype=torch.long),
    }
    if values is not None:
        batch["values"] = torch.zeros((len(rows), len(ids)), dtype=torch.float32)
    for i, keep in enumerate(rows):
        batch["input_ids"][i, : len(keep)] = torch.as_tensor(ids[keep], dtype=torch.long)
        batch["attention_mask"][i, : len(keep)] = 1
        if values is not None:
            batch["values"][i, : len(keep)] = torch.as_tensor(values[keep], dtype=torch.float32)
    return batch


def _deletion_shifts(hidden: torch.Tensor, tf_at: list[int], target_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TFs, targets) shifts 1 - cosine of each target's embedding between the cell (row 0 of
    `hidden`) and the variant without the k-th TF (row k + 1), and which pairs are real (a TF
    is not its own target). Computed where `hidden` is, in fp32."""
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    targets = torch.as_tensor(target_at, device=hidden.device)
    deleted = torch.as_tensor(tf_at, device=hidden.device)
    # positions after the deleted token shift left by one in its variant
    moved = targets[None, :] - (targets[None, :] > deleted[:, None]).long()
    after = unit[1:].gather(1, moved[..., None].expand(-1, -1, unit.shape[-1]))
    shift = 1 - (after * unit[0, targets][None]).sum(-1)
    real = targets[None, :] != deleted[:, None]
    return shift.cpu().double().numpy(), real.cpu().numpy()


@torch.no_grad()
def in_silico_scores(
    model, tokens, pad_id: int, token_of: dict[str, int], tfs, targets, precision: str = "auto"
) -> tuple[pd.DataFrame, float]:
    """Shift (1 - cosine) of each target's embedding when a TF is deleted from the cell, averaged
    over the cells holding both. Returns the edges and the (cell, TF) deletions per second."""
    import time

    model.eval()
    device = next(model.parameters()).device
    tf_row = {token_of[g]: i for i, g in enumerate(tfs) if g in token_of}
    target_column = {token_of[g]: j for j, g in enumerate(targets) if g in token_of}
    sums, counts = np.zeros((len(tfs), len(targets))), np.zeros((len(tfs), len(targets)))
    deletions, start = 0, time.perf_counter()
    for row in range(len(tokens)):
        ids = np.asarray(tokens[row])
        tf_at = [p for p, t in enumerate(ids) if t in tf_row]
        target_at = np.array([p for p, t in enumerate(ids) if t in target_column])
        if not tf_at or not len(target_at):
            continue
        values = tokens.cell_values(row) if tokens.values is not None else None
        with autocast(device, precision):
            hidden = model(**to_device(_cell_batch(ids, values, tf_at, pad_id), device), heads=False).last_hidden_state
        shift, real = _deletion_shifts(hidden, tf_at, target_at)
        block = np.ix_([tf_row[ids[p]] for p in tf_at], [target_column[t] for t in ids[target_at]])
        sums[block] += np.where(real, shift, 0.0)
        counts[block] += real
        deletions += len(tf_at)
    rate = deletions / max(time.perf_counter() - start, 1e-9)
    score = np.where(counts > 0, sums / np.maximum(counts, 1), -1.0)
    edges = candidate_edges(tfs, targets)
    edges["score"] = score[pd.Index(tfs).get_indexer(edges.tf), pd.Index(targets).get_indexer(edges.target)]
    edges["method"] = "in-silico"
    return edges, rate


def _expression_view(lab, max_cells: int, top_genes: int, seed: int):
    """Log-normalised expression of a seeded sample of cells, and the highly variable genes."""
    rng = np.random.default_rng(seed)
    n_cells = lab.n_cells if max_cells == 0 else min(max_cells, lab.n_cells)
    cells = np.sort(rng.choice(lab.n_cells, n_cells, replace=False))
    expression = log_normalise(lab.counts[cells]).toarray()
    names = lab.gene_names.astype(str)
    unique = ~pd.Index(names).duplicated()
    variable = np.argsort(-np.where(unique, expression.var(0), -1), kind="stable")[:top_genes]
    return cells, expression[:, unique], names[unique], sorted(set(names[variable]))


def full_length_tokens(lab, tokenizer, cells, seed: int) -> RaggedTokens:
    """Every gene each cell detects (and has a token for), in the tokenizer's order: the
    tokenizer with its length cut lifted (its own object is left as it is)."""
    uncut = copy.copy(tokenizer)
    uncut.max_len = lab.counts.shape[1] + 8  # every gene, with room for any special tokens
    return tokenize_cells(lab, uncut, cells, seed)


def candidates_first(tokens: RaggedTokens, level_of_token: np.ndarray, capacity: int, specials) -> RaggedTokens:
    """Each cell's tokens cut to `capacity`, keeping its special tokens, then its genes by
    `level_of_token` (0 first: candidate TFs; 1: candidate targets; 2: the rest), ties in the
    cell's own order; the kept tokens stay in that order, with their values."""
    specials = np.fromiter(specials, dtype=np.int64)
    kept_ids, kept_values, offsets = [], [], [0]
    for cell in range(len(tokens)):
        ids = np.asarray(tokens[cell])
        keep = _kept_positions(ids, level_of_token, capacity, np.isin(ids, specials))
        kept_ids.append(ids[keep])
        if tokens.values is not None:
            kept_values.append(tokens.cell_values(cell)[keep])
        offsets.append(offsets[-1] + len(keep))
    values = np.concatenate(kept_values) if tokens.values is not None and kept_values else tokens.values
    return RaggedTokens(
        np.concatenate(kept_ids) if kept_ids else tokens.input_ids[:0], np.asarray(offsets, dtype=np.int64), values
    )


def _kept_positions(ids: np.ndarray, level_of_token: np.ndarray, capacity: int, special: np.ndarray) -> np.ndarray:
    genes = np.flatnonzero(~special)
    budget = max(capacity - int(special.sum()), 0)
    if len(genes) <= budget:
        return np.arange(len(ids))
    chosen = genes[np.argsort(level_of_token[ids[genes]], kind="stable")[:budget]]
    return np.sort(np.concatenate([np.flatnonzero(special), chosen]))


def scoreable_pairs(tokens: RaggedTokens, token_of: dict[str, int], tfs, targets, together: bool = True) -> np.ndarray:
    """(TFs, targets): which pairs a model reading `tokens` can score. `together`: a cell holds
    both (attention, in-silico deletion); otherwise each appears in some cell (embeddings)."""
    tf_row = {token_of[g]: i for i, g in enumerate(tfs) if g in token_of}
    target_column = {token_of[g]: j for j, g in enumerate(targets) if g in token_of}
    held = np.zeros((len(tfs), len(targets)), dtype=bool)
    seen_tfs, seen_targets = np.zeros(len(tfs), dtype=bool), np.zeros(len(targets), dtype=bool)
    for cell in range(len(tokens)):
        _, tf_idx = _positions(tokens[cell], tf_row)
        _, target_idx = _positions(tokens[cell], target_column)
        seen_tfs[tf_idx], seen_targets[target_idx] = True, True
        if together:
            held[np.ix_(tf_idx, target_idx)] = True
    return held if together else np.outer(seen_tfs, seen_targets)


class _Scoring:
    """The model's side of `run_grn`: its encoder, the cells' tokens (the tokenizer's own, and
    candidate-first), the edge scores and how many pairs each choice of tokens can score."""

    def __init__(self, folder, tokenizer, lab, cells, tfs, targets, seed, tokens, device, precision, batch_size):
        self.tfs, self.targets, self.mode = tfs, targets, tokens
        self.precision, self.batch_size = precision, batch_size
        self.encoder = load_encoder(folder, AdaptSection()).to(pick_device(device))
        self.vocab_size, self.pad = len(tokenizer.vocab), tokenizer.vocab.special_id("pad")
        token_ids = tokenizer.vocab.lookup_genes(lab.gene_ids)
        self.token_of = {n: int(t) for n, t in zip(lab.gene_names.astype(str), token_ids) if t >= 0}
        level = np.full(len(tokenizer.vocab), 2, dtype=np.int64)
        level[[self.token_of[g] for g in targets if g in self.token_of]] = 1
        level[[self.token_of[g] for g in tfs if g in self.token_of]] = 0
        self.by_choice = {"tokenizer": tokenize_cells(lab, tokenizer, cells, seed)}
        full = full_length_tokens(lab, tokenizer, cells, seed)
        specials = tokenizer.vocab.special_ids().tolist()
        self.by_choice["candidates"] = candidates_first(full, level, tokenizer.max_len, specials)

    def views(self, method: str) -> tuple[dict[str, pd.DataFrame], dict]:
        """The model's edge scores ({view: edges}; one view but for attention) and, for in-silico
        deletion, its speed."""
        tokens, args = self.by_choice[self.mode], (self.pad, self.token_of, self.tfs, self.targets)
        if method == "attention":
            return attention_scores(self.encoder, tokens, *args, self.batch_size, self.precision), {}
        if method == "in-silico":
            edges, rate = in_silico_scores(self.encoder, tokens, *args, self.precision)
            log.warning("in-silico deletion: %.1f cells x TFs per second", rate)
            return {"model": edges}, {"cells_x_tfs_per_second": round(rate, 1), "device": _device_name(self.encoder)}
        means, counts = contextual_gene_embeddings(
            self.encoder, tokens, self.vocab_size, self.pad, self.batch_size, self.precision
        )
        return {"model": embedding_scores(means, counts, self.token_of, self.tfs, self.targets)}, {}

    def coverage(self, method: str, truth: pd.DataFrame | None) -> dict:
        """Candidate pairs (and truth edges among them) the model can score with each choice of
        tokens: the tokenizer's own, and candidate-first."""
        edges = candidate_edges(self.tfs, self.targets)
        rows, columns = pd.Index(self.tfs).get_indexer(edges.tf), pd.Index(self.targets).get_indexer(edges.target)
        true = is_true_edge(edges, truth) if truth is not None else None
        result = {"tokens": self.mode, "scoreable_when": "a cell holds both" if method != "embedding" else "each in some cell"}
        result["candidate_pairs"], result["truth_edges"] = len(edges), int(true.sum()) if true is not None else None
        for choice, tokens in self.by_choice.items():
            held = scoreable_pairs(tokens, self.token_of, self.tfs, self.targets, together=method != "embedding")[rows, columns]
            result[choice] = {
                "candidate_pairs": int(held.sum()),
                "truth_edges": int((held & true).sum()) if true is not None else None,
                "mean_tokens_per_cell": round(float(tokens.lengths.mean()), 1) if len(tokens) else 0.0,
            }
        return result


def _coverage_line(coverage: dict) -> str:
    """How many pairs (and truth edges) the model can score, by the tokenizer's tokens and candidate-first."""

    def part(choice: str) -> str:
        counts = coverage[choice]
        truth = f", truth edges {counts['truth_edges']}/{coverage['truth_edges']}" if coverage["truth_edges"] is not None else ""
        return f"{choice} tokens: pairs {counts['candidate_pairs']}/{coverage['candidate_pairs']}{truth}"

    return f"scoreable ({coverage['scoreable_when']}; scored with {coverage['tokens']} tokens): " + "; ".join(
        part(choice) for choice in ("tokenizer", "candidates")
    )


def _best_view_over_all_pairs(views: dict[str, pd.DataFrame], truth: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """The model's view with the best AUPRC ratio over the whole candidate set (in-sample, like
    every "all_pairs" figure), its metrics (naming the view when there are several) and edges."""
    scores = {name: evaluate_edges(edges, truth) for name, edges in views.items()}
    name = choose_best({view: metrics[CHOICE_METRIC] for view, metrics in scores.items()})
    return scores[name] | ({"model_view": name} if len(views) > 1 else {}), views[name]


def run_grn(
    model: str | None,
    data,
    out,
    method: str = "embedding",
    tfs_path=None,
    truth_path=None,
    layer: str = "X",
    gene_column: str | None = None,
    species: str | None = None,
    max_cells: int = 1000,
    top_genes: int = 2000,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    min_mapped_fraction: float = MIN_MAPPED_FRACTION,
    n_folds: int = 3,
    head: str = "anchored",
    anchor_weights=ANCHOR_WEIGHTS,
    tokens: str = "candidates",
) -> dict:
    """Infer edges with `method` (and the baselines), write edges.tsv and, with a truth,
    metrics.json under `out`; returns the metrics (or the edge counts without a truth). The model
    runs on `device` (`auto`: CUDA when present) in `precision` (`auto`: bf16 on CUDA, else fp32).
    Refuses data of which less than `min_mapped_fraction` of the counts map to Ensembl IDs (or,
    with a model, have tokens in its vocabulary).

    With a truth, every method is scored on `n_folds` held-out TF x target blocks
    (`evaluate.block_folds`, seeded by `seed`), beside the `degree_prior` baseline, with 95%
    intervals over held-out TFs; the model is compared with the baseline chosen on each fold's
    training edges. Each method's score over the whole candidate set stays under "all_pairs".

    `head` "anchored" (the default) scores as "model" the chosen baseline's ranks blended with
    the model's, the model's weight (of `anchor_weights`) chosen per fold by inner TF x target
    blocks of the training block and recorded beside the chosen baseline ("best_baseline":
    "weight", "weight_scores"); the model's own scores are then "model_plain". "plain" scores the model's own scores as "model".
    edges.tsv always holds the model's own scores: the anchored ranking depends on the truth
    (through the baseline choice and the degree prior), so it is an evaluation, not an inference.

    `tokens` "candidates" (the default) builds each cell's tokens from every gene it detects,
    its candidate TFs first, then its candidate targets, then its other genes, in the
    tokenizer's order, up to the tokenizer's length: a TF a cell expresses is scored even where
    the tokenizer's own cut (the top-ranked genes, or scGPT's sample) would drop it.
    "tokenizer" uses the tokenizer's tokens as they are. "coverage" in the result counts the
    candidate pairs (and truth edges) the model can score either way. The attention method
    keeps each layer and head apart; each fold scores the view best on its training block.
    `max_cells` 0 scores every cell."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: available methods are {METHODS}")
    if head not in HEADS:
        raise ConfigError(f"--head {head!r}: available heads are {HEADS}")
    anchor_weights = check_anchor_weights(anchor_weights)
    out = Path(out)
    # every input is read and checked before any baseline or model work, and before `out` is written
    truth = read_truth(truth_path) if truth_path is not None else None
    given_tfs = read_tfs(tfs_path) if tfs_path else None
    folder = resolve_model_folder(model) if model is not None else None
    lab = read_lab_data(data, (), layer, gene_column, species, min_mapped_fraction)
    if tokens not in TOKEN_CHOICES:
        raise ConfigError(f"--tokens {tokens!r}: choose one of {TOKEN_CHOICES}")
    cells, expression, names, targets = _expression_view(lab, max_cells, top_genes, seed)
    tf_list = given_tfs or bundled_tfs(lab.species)
    tfs = sorted(set(tf_list) & set(names))
    if not tfs:
        raise InputError(f"{data}: none of the {len(tf_list)} TFs is among the data's genes; check --tfs and --gene-column")
    if truth is not None:
        _check_truth_is_scorable(truth, tfs, targets, truth_path, data)
        folds = block_folds(tfs, targets, n_folds, seed)
    if folder is not None:
        tokenizer = load_model_tokenizer(folder, lab)
        check_vocabulary_coverage(lab, tokenizer.vocab)
    runs = {name: coexpression_scores(expression, names, tfs, targets, name.split("_")[1]) for name in BASELINES[:2]}
    # GENIE3 over the TFs the sampled cells express (an unexpressed TF explains nothing)
    expressed = [t for t in tfs if expression[:, list(names).index(t)].any()]
    trees = tree_scores(expression, names, expressed, targets, seed=seed)
    runs["genie3_extra_trees"] = _complete(trees, tfs, targets)
    views, speed, coverage = {}, {}, None
    if folder is not None:
        scoring = _Scoring(folder, tokenizer, lab, cells, tfs, targets, seed, tokens, device, precision, batch_size)
        views, speed = scoring.views(method)
        coverage = scoring.coverage(method, truth)
    out.mkdir(parents=True, exist_ok=True)
    # the model's own ranking: with several views (attention), their mean; which view scores
    # best is a choice made on truth edges, so it belongs to the evaluation, not to edges.tsv
    primary = next(iter(views.values())) if views else runs[BASELINES[0]]
    _write_edges(out / "edges.tsv", primary.assign(group="all"))
    result = {
        "method": method if model is not None else None,
        "n_tfs": len(tfs),
        "n_targets": len(targets),
        "n_cells": len(cells),
        **speed,
        "head": head if folder is not None else None,
        "coverage": coverage,
    }
    if coverage is not None:
        print(_coverage_line(coverage))
    if truth is None:
        return result
    anchored = head == "anchored" and bool(views)
    weights = anchor_weights if anchored else None
    baselines = {name: runs[name] for name in BASELINES}
    held_out = evaluate_on_folds(views or None, baselines, truth, tfs, targets, folds, seed, anchor_weights=weights)
    all_pairs = {name: evaluate_edges(edges, truth) for name, edges in runs.items()}
    if views:
        all_pairs["model"], model_edges = _best_view_over_all_pairs(views, truth)
    # over all pairs, each pair is scored by the other TFs' edges to its target
    prior = degree_prior_scores(truth, tfs, tfs, targets)
    all_pairs["degree_prior"] = evaluate_edges(prior, truth)
    if anchored:
        all_pairs["model_plain"] = all_pairs["model"]
        all_pairs["model"] = _anchored_over_all_pairs(model_edges, baselines | {"degree_prior": prior}, all_pairs, truth, weights)
    methods = {name: {**scores, "all_pairs": all_pairs[name]} for name, scores in held_out["methods"].items()}
    result["model"] = methods.pop("model", None)
    result["model_plain"] = methods.pop("model_plain", None)
    result["anchor_weights"] = list(weights) if anchored else None
    result["baselines"] = methods
    result["split"] = _split_summary(folds, seed, len(cells), top_genes, len(tfs))
    result["best_baseline"] = held_out["best_baseline"]
    result["paired"] = held_out["paired"]
    result["uncertainty"] = held_out["uncertainty"]
    write_metrics(out / "metrics.json", result)
    print(interval_table(result, len(folds)))
    print(_calibration_line(result["uncertainty"]))
    if result["paired"] is not None:
        if anchored:
            print(_weights_line(result["best_baseline"]))
        print(_paired_line(result["paired"], anchored))
    return result


def _calibration_line(summary: dict) -> str:
    top = summary["top_k"]
    return (
        f"{summary['predictor']}, edge probabilities (isotonic on each training block): Brier {summary['brier']:.4f} "
        f"vs {summary['brier_training_density']:.4f} for the training density, calibration error "
        f"{summary['expected_calibration_error']:.4f}; top {top['per_fold'][0]['k']} held-out pairs: observed true edges "
        f"inside the {top['level']:g} interval of the expected in {top['inside']} of {top['folds']} folds"
    )


def _anchored_over_all_pairs(model, baselines: dict, all_pairs: dict, truth, weights) -> dict:
    """The anchored score over the whole candidate set, its baseline and weight chosen on those
    same pairs: in-sample, like every "all_pairs" figure; the held-out blocks are the test."""
    name = choose_best({b: all_pairs[b][CHOICE_METRIC] for b in baselines})
    choice = choose_anchor_weight(baselines[name], model, truth, weights)
    return {**evaluate_edges(anchored_scores(baselines[name], model, choice["weight"]), truth), "baseline": name, **choice}


def _split_summary(folds: list[dict], seed: int, n_cells: int, top_genes: int, n_tfs: int) -> dict:
    """metrics.json's account of the held-out TF x target blocks the metrics come from."""
    return {
        "kind": "tf_target_block",
        "n_folds": len(folds),
        "seed": seed,
        "folds": [
            {
                "n_test_tfs": len(fold["test_tfs"]),
                "n_test_targets": len(fold["test_targets"]),
                "n_train_tfs": len(fold["train_tfs"]),
                "n_train_targets": len(fold["train_targets"]),
            }
            for fold in folds
        ],
        "scored": "each fold's held-out TFs x held-out targets; metrics averaged over folds; all_pairs: every candidate pair",
        "cells": n_cells,
        "targets": f"top {top_genes} variable genes",
        "tfs": n_tfs,
    }


def interval_table(metrics: dict, n_folds: int) -> str:
    """Rows: the model (when run) and each baseline; cells: mean over the held-out blocks with
    its 95% interval over resampled held-out TFs."""
    models = [(name, metrics[name]) for name in ("model", "model_plain") if metrics.get(name)]
    rows = models + list(metrics["baselines"].items())
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"held out: {n_folds} TF x target blocks; mean over blocks [95% interval over held-out TFs]"]
    lines.append("".ljust(width) + "".join(metric.rjust(26) for metric in INTERVAL_METRICS))
    for name, result in rows:
        cells = [_with_interval(result.get(metric), *result["interval"][metric]).rjust(26) for metric in INTERVAL_METRICS]
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def _with_interval(mean, low, high) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _paired_line(paired: dict, anchored: bool = False) -> str:
    """The model (anchored: the head built on the baseline) against the baseline chosen on each
    fold's training edges, in one line."""
    chosen = "/".join(dict.fromkeys(paired["baselines"]))
    line = verdict_line(CHOICE_METRIC, chosen, paired, "held-out TFs", chosen_on="each fold's training edges")
    return f"anchored head: {line}" if anchored else line


def _weights_line(picks: list[dict]) -> str:
    """The model's weight in the anchored head per fold, with the baseline it anchors on."""
    folds = ", ".join(f"fold {i + 1}: {pick['weight']:g} on {pick['name']}" for i, pick in enumerate(picks))
    return f"anchor weight per fold (the model's share, chosen by inner blocks of the fold's training edges; 0 = baseline alone): {folds}"


def _device_name(model) -> str:
    device = next(model.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _complete(edges: pd.DataFrame, tfs, targets) -> pd.DataFrame:
    """`edges` over the full TF x target candidate set, the unscored pairs at score 0."""
    full = candidate_edges(tfs, targets).merge(edges, on=["tf", "target"], how="left")
    return full.assign(score=full.score.fillna(0.0), method=edges.method.iloc[0] if len(edges) else "")


def _write_edges(path: Path, edges: pd.DataFrame) -> None:
    ranked = edges.sort_values("score", ascending=False, kind="stable")[list(EDGE_COLUMNS)]
    write_file_atomically(path, lambda tmp: ranked.to_csv(tmp, sep="\t", index=False, float_format="%.6g"))
