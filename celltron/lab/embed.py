"""`celltron embed`: cell embeddings (and optionally contextual gene embeddings) of a lab's cells
from a pretrained model, written into a copy of the input .h5ad (`obsm[key]`, `varm[key]`).

The input is read in blocks of cells, never whole, so a file larger than memory works: each
block is tokenised with the model's own tokenizer (on a thread, while the previous block runs
through the model), run in batches of cells of similar length (less padding), and its rows
written straight into the output file. With `devices > 1` the cells are split into contiguous
ranges, one process per device; the parent writes the parts back in the original order.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from celltron.corpus.readers import check_raw_counts
from celltron.errors import ConfigError, InputError
from celltron.inputs import open_h5
from celltron.lab.data import LabData, check_vocabulary_coverage, load_model_tokenizer, open_lab_source, tokenize_counts
from celltron.lab.inference import autocast, pad_cells, pick_device, to_device
from celltron.lab.options import ALL_GENES, EmbedOptions
from celltron.model_zoo.registry import base_of, family_of, load_pretrained, parts_of, resolve_model_folder
from celltron.model_zoo.spec import attribute

log = logging.getLogger(__name__)

SPECIAL_POSITIONS = 2  # <cls> and <eos>: the positions a cell may use beyond its max_len genes


class LayerOutput:
    """Keeps the hidden states the chosen Transformer layers return, averaged (forward hooks:
    they work for every family, and for the last layer give the model's last_hidden_state).

    Several layers are averaged rather than concatenated: the embedding keeps the model's hidden
    width, so it stays comparable with one layer's (same dimensions for kNN, UMAP and the obsm
    slot), and each layer counts equally instead of the layers with the largest norms dominating
    Euclidean distances over a concatenation several times as wide."""

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...]):
        blocks = attribute(base_of(model), parts_of(base_of(model)).layers)
        for layer in layers:
            if not -len(blocks) <= layer < len(blocks):
                flag = "--layer" if len(layers) == 1 else "--layers"
                raise ConfigError(f"{flag} {layer}: the model has {len(blocks)} layers; use -1 (the last) down to -{len(blocks)}")
        if len({layer % len(blocks) for layer in layers}) < len(layers):
            raise ConfigError(f"--layers {' '.join(map(str, layers))}: a layer is named twice")
        self.kept: list[torch.Tensor] = []
        self.handles = [blocks[layer].register_forward_hook(self._keep) for layer in layers]

    def _keep(self, module, args, output) -> None:
        self.kept.append((output[0] if isinstance(output, tuple) else output).float())

    @property
    def hidden(self) -> torch.Tensor:
        """The mean of the chosen layers' states from the last forward pass (fp32)."""
        return torch.stack(self.kept).mean(0)

    def clear(self) -> None:
        self.kept = []

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class GeneSums:
    """Per token: the sum of its contextual embeddings and the number of cells it appeared in;
    `file_tokens` is the token of each file gene (-1: none), to map them back."""

    def __init__(self, vocab_size: int, hidden_size: int, device: torch.device, file_tokens: np.ndarray):
        self.sums = torch.zeros(vocab_size, hidden_size, dtype=torch.float64, device=device)
        self.counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.file_tokens = file_tokens

    def add(self, hidden: torch.Tensor, genes: torch.Tensor, ids: torch.Tensor) -> None:
        self.sums.index_add_(0, ids[genes], hidden[genes].double())
        self.counts.index_add_(0, ids[genes], torch.ones(int(genes.sum()), dtype=torch.float64, device=ids.device))


def pool_hidden(hidden: torch.Tensor, genes: torch.Tensor, style: str) -> torch.Tensor:
    """One vector per row: the first token ('cls') or the mean over the `genes` mask ('mean')."""
    if style == "cls":
        return hidden[:, 0]
    weights = genes.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


@torch.no_grad()
def embed_tokens(
    model,
    tokens,
    special_ids: torch.Tensor,
    pad_id: int,
    capture: LayerOutput,
    options: EmbedOptions,
    style: str,
    gene_sums: GeneSums | None = None,
) -> np.ndarray:
    """(cells, hidden) float32 embeddings of ragged `tokens`; rows of cells with no gene token are NaN."""
    device = next(model.parameters()).device
    lengths = tokens.lengths
    out = np.full((len(tokens), model.config.hidden_size), np.nan, dtype=np.float32)
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: less padding
    order = order[lengths[order] > 0]
    for start in range(0, len(order), options.batch_size):
        rows = order[start : start + options.batch_size]
        batch = to_device(pad_cells(tokens, rows, pad_id), device)
        capture.clear()
        with autocast(device, options.precision):
            model(**batch, heads=False)
        hidden = capture.hidden
        genes = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special_ids)
        pooled = pool_hidden(hidden, genes, style).cpu().numpy()
        has_genes = genes.any(1).cpu().numpy()
        out[rows[has_genes]] = pooled[has_genes]
        if gene_sums is not None:
            gene_sums.add(hidden, genes, batch["input_ids"])
    return out


@dataclass
class _Model:
    """A loaded model with what embedding needs beside it."""

    model: torch.nn.Module
    tokenizer: object
    special_ids: torch.Tensor
    pad_id: int
    style: str
    capture: LayerOutput


def token_limit(config, tokenizer) -> int:
    """The most tokens per cell the model takes (`tokenizer` as saved): its position table less
    <cls> and <eos> (the inverse of `spec.positions_for`, which sizes the table as max_len + 2),
    but never below the saved length, which fits by construction (official Geneformer V1 and V2
    fill their whole table); for families without positions (scGPT: cells are sets of genes), the
    vocabulary's size, which no cell can exceed (each gene is one token at most): such runs are
    bounded only by memory."""
    if family_of(config).has_position_limit:
        return max(int(config.max_position_embeddings) - SPECIAL_POSITIONS, int(tokenizer.max_len))
    return len(tokenizer.vocab)


def set_max_len(tokenizer, config, max_len: int | None) -> None:
    """Give the tokenizer this run's length: None keeps the saved one, ALL_GENES takes the model's
    limit (every detected gene, as far as positions allow); a length above the limit is refused."""
    if max_len is None:
        return
    limit = token_limit(config, tokenizer)
    if max_len > limit:
        raise ConfigError(
            f"--max-len {max_len}: this model takes at most {limit} tokens per cell "
            f"({_limit_reason(config, tokenizer)}); pass --max-len all for every detected gene up to that"
        )
    length = limit if max_len == ALL_GENES else max_len
    if length > tokenizer.max_len and family_of(config).has_position_limit:
        # the saved length is the one the model was trained with: positions past it carry weights no cell trained
        log.warning(
            "--max-len %s: %d tokens per cell, past the %d the model was trained with; positions beyond %d "
            "were never trained (measure against the saved length: benchmarks/embedding.py --variants)",
            "all" if max_len == ALL_GENES else max_len,
            length,
            tokenizer.max_len,
            tokenizer.max_len,
        )
    tokenizer.max_len = length


def _limit_reason(config, tokenizer) -> str:
    if not family_of(config).has_position_limit:
        return "one token per vocabulary gene"
    if tokenizer.max_len > config.max_position_embeddings - SPECIAL_POSITIONS:
        return f"the length it was saved with; max_position_embeddings {config.max_position_embeddings}"
    return f"max_position_embeddings {config.max_position_embeddings} less <cls> and <eos>"


def _load(folder: Path, lab, options: EmbedOptions, device: torch.device) -> _Model:
    tokenizer = load_model_tokenizer(folder, lab)
    check_vocabulary_coverage(lab, tokenizer.vocab)
    model = load_pretrained(folder).to(device).eval()
    set_max_len(tokenizer, model.config, options.max_len)
    style = options.pool or getattr(model.config, "cell_embedding", "mean")
    if style not in ("cls", "mean"):
        raise ConfigError(f"--pool {style!r}: use 'cls' or 'mean'")
    special = torch.as_tensor(tokenizer.vocab.special_ids(), device=device)
    capture = LayerOutput(model, options.chosen_layers)
    return _Model(model, tokenizer, special, tokenizer.vocab.special_id("pad"), style, capture)


def _check_cls(tokens, special_ids: torch.Tensor, path) -> None:
    starts = tokens.input_ids[tokens.offsets[:-1][tokens.lengths > 0]]
    if not np.isin(starts, special_ids.cpu().numpy()).all():
        raise ConfigError(
            f"{path}: --pool cls needs cells that start with a <cls> (or species) token, and this model's "
            "tokenizer starts them with a gene (Geneformer V1); use --pool mean"
        )


def _lab_view(path, options: EmbedOptions):
    """The lab file opened for block reads, as the fine-tuning data helpers expect it."""
    source, mapping = open_lab_source(
        path, (), options.input_layer, options.gene_column, options.species, options.min_mapped_fraction
    )
    lab = LabData(
        Path(path),
        source.obs,
        np.asarray(source.gene_names),
        None,
        mapping.ensembl_ids,
        mapping.species,
        gene_counts=mapping.gene_counts,
        min_mapped_fraction=options.min_mapped_fraction,
    )
    return source, lab


def _embed_range(
    folder: Path, source, lab, start: int, stop: int, options: EmbedOptions, device: torch.device, sink, progress
) -> GeneSums | None:
    """Embed cells [start, stop) of the opened `source`; `sink(first_row, block)` receives each block's rows."""
    loaded = _load(folder, lab, options, device)
    _, column_map = lab.mapped_genes()
    n_mapped = int(column_map.max()) + 1 if len(column_map) else 0
    sums = None
    if options.gene_embeddings:
        sums = GeneSums(
            len(loaded.tokenizer.vocab),
            loaded.model.config.hidden_size,
            device,
            loaded.tokenizer.vocab.lookup_genes(lab.gene_ids),
        )

    def tokenised(first: int):
        rows = source.read_rows(first, min(first + options.block_cells, stop)).tocsr()
        check_raw_counts(rows, source, first)
        rng = np.random.default_rng([options.seed, first])  # the same tokens however the cells are split
        return first, tokenize_counts(rows, column_map, n_mapped, lab.species, loaded.tokenizer, rng)

    firsts = list(range(start, stop, options.block_cells))
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(tokenised, firsts[0]) if firsts else None
        for i in range(len(firsts)):
            first, tokens = pending.result()
            pending = reader.submit(tokenised, firsts[i + 1]) if i + 1 < len(firsts) else None
            if loaded.style == "cls":
                _check_cls(tokens, loaded.special_ids, lab.path)
            sink(
                first,
                embed_tokens(
                    loaded.model, tokens, loaded.special_ids, loaded.pad_id, loaded.capture, options, loaded.style, sums
                ),
            )
            progress(len(tokens))
    loaded.capture.close()
    return sums


def _gene_means(sums: GeneSums) -> np.ndarray:
    """(file genes, hidden) mean contextual embedding per file gene; NaN where never a token."""
    token = sums.file_tokens
    counts = sums.counts.cpu().numpy()
    means = (sums.sums.cpu() / sums.counts.cpu().clamp(min=1)[:, None]).numpy().astype(np.float32)
    seen = (token >= 0) & (counts[np.maximum(token, 0)] > 0)
    out = np.full((len(token), means.shape[1]), np.nan, dtype=np.float32)
    out[seen] = means[token[seen]]
    return out


def _ranges(n_cells: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n_cells, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _device_for(rank: int, options: EmbedOptions) -> torch.device:
    device = pick_device(options.device)
    if device.type == "cuda" and options.devices > 1:
        return torch.device("cuda", rank)
    return device


def _worker(rank: int, folder: Path, path, ranges, options: EmbedOptions, work: Path) -> None:
    """One process of a multi-device run: its range's embeddings into work/part-RANK.npy."""
    device = _device_for(rank, options)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.devices))
    start, stop = ranges[rank]
    part = None

    def sink(first: int, block: np.ndarray) -> None:
        nonlocal part
        if part is None:
            part = np.lib.format.open_memmap(work / f"part-{rank}.npy", "w+", np.float32, (stop - start, block.shape[1]))
        part[first - start : first - start + len(block)] = block

    bar = _progress(stop - start, options.progress and rank == 0, f"embedding (rank 0 of {options.devices})")
    source, lab = _lab_view(path, options)
    try:
        sums = _embed_range(folder, source, lab, start, stop, options, device, sink, bar.update)
    finally:
        source.close()
    bar.close()
    if part is not None:
        part.flush()
    if sums is not None:
        torch.save(
            {"sums": sums.sums.cpu(), "counts": sums.counts.cpu(), "file_tokens": sums.file_tokens}, work / f"genes-{rank}.pt"
        )


def _progress(total: int, enabled: bool, description: str = "embedding"):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="cells", desc=description)


def _run(folder: Path, path, options: EmbedOptions, sink) -> np.ndarray | None:
    """Embed every cell of `path`, handing blocks to `sink(first_row, block)` in any order;
    returns the gene means when asked for."""
    source, lab = _lab_view(path, options)
    n_cells = source.n_cells
    if options.devices > 1:
        source.close()  # each process opens its own
        return _run_parallel(folder, path, n_cells, options, sink)
    bar = _progress(n_cells, options.progress)
    try:
        sums = _embed_range(folder, source, lab, 0, n_cells, options, pick_device(options.device), sink, bar.update)
    finally:
        source.close()
    bar.close()
    return _gene_means(sums) if sums is not None else None


def _run_parallel(folder: Path, path, n_cells: int, options: EmbedOptions, sink) -> np.ndarray | None:
    device = pick_device(options.device)
    if device.type == "cuda" and options.devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {options.devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    ranges = _ranges(n_cells, options.devices)
    with tempfile.TemporaryDirectory(prefix="celltron-embed-") as work:
        work = Path(work)
        torch.multiprocessing.spawn(_worker, (folder, str(path), ranges, options, work), nprocs=options.devices)
        for rank, (start, _) in enumerate(ranges):
            if (work / f"part-{rank}.npy").exists():
                part = np.load(work / f"part-{rank}.npy", mmap_mode="r")
                for offset in range(0, len(part), options.block_cells):
                    sink(start + offset, np.asarray(part[offset : offset + options.block_cells]))
        if not options.gene_embeddings:
            return None
        parts = [
            torch.load(work / f"genes-{rank}.pt", weights_only=False)
            for rank in range(options.devices)
            if (work / f"genes-{rank}.pt").exists()
        ]
        sums = GeneSums(0, 0, torch.device("cpu"), parts[0]["file_tokens"])
        sums.sums, sums.counts = sum(p["sums"] for p in parts), sum(p["counts"] for p in parts)
        return _gene_means(sums)


def embed(model, data, **options) -> np.ndarray:
    """Cell embeddings of every cell in `data` (.h5ad, 10x .h5 or mtx folder of raw counts) as a
    (cells, hidden) float32 array, from the model folder or Hub id `model`. Keyword options are
    the fields of `EmbedOptions`."""
    settings = EmbedOptions(**{"progress": False, **options})
    folder = resolve_model_folder(str(model))
    blocks: dict[int, np.ndarray] = {}
    _run(folder, data, replace(settings, gene_embeddings=False), lambda first, block: blocks.__setitem__(first, block))
    if not blocks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate([blocks[k] for k in sorted(blocks)])


def embed_file(model, data, out, options: EmbedOptions = EmbedOptions()) -> dict:
    """Write a copy of the .h5ad `data` to `out` with the cell embeddings in `obsm[options.key]`
    (and gene embeddings in `varm[options.key]`). The copy is written under a temporary name and
    renamed when complete, so `out` is never half written (it may be `data` itself)."""
    data, out = Path(data), Path(out)
    if data.suffix != ".h5ad":
        raise InputError(
            f"--data {data}: `celltron embed` writes a copy of an .h5ad with the embeddings added; convert "
            "10x .h5 / mtx inputs first (anndata / scanpy: read_10x_h5(...).write_h5ad(...)), or use "
            "celltron.lab.embed.embed() for an array"
        )
    folder = resolve_model_folder(str(model))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.copyfile(data, partial)
    try:
        summary = _write_embeddings(folder, data, partial, options)
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return summary


def _write_embeddings(folder: Path, data: Path, target: Path, options: EmbedOptions) -> dict:
    with open_h5(target, "r+", shown_as=data, require=("obs",)) as handle:
        n_cells = _n_obs(handle, data)
        written = {"rows": 0, "dataset": None}

        def sink(first: int, block: np.ndarray) -> None:
            if written["dataset"] is None:
                written["dataset"] = _array(handle, "obsm", options.key, (n_cells, block.shape[1]))
            written["dataset"][first : first + len(block)] = block
            written["rows"] += len(block)

        genes = _run(folder, data, options, sink)
        if genes is not None:
            _array(handle, "varm", options.key, genes.shape)[...] = genes
        empty = int(np.isnan(written["dataset"][:, 0]).sum()) if written["dataset"] is not None else 0
    if empty:
        log.warning("%s: %d cells have no gene the model knows; their embeddings are NaN", data, empty)
    return {"cells": written["rows"], "empty_cells": empty, "key": options.key, "gene_embeddings": genes is not None}


def _n_obs(handle: h5py.File, path: Path) -> int:
    from anndata.io import read_elem

    return len(read_elem(handle["obs"]).index)


def _array(handle: h5py.File, group: str, key: str, shape: tuple[int, int]) -> h5py.Dataset:
    """A float32 dataset `group/key` in AnnData's on-disk encoding (replacing one of that name)."""
    if group not in handle:
        handle.create_group(group).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    if key in handle[group]:
        del handle[group][key]
    dataset = handle[group].create_dataset(key, shape=shape, dtype="float32", chunks=(min(max(shape[0], 1), 1024), shape[1]))
    dataset.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return dataset
