"""Tokenizer throughput: celltron's block tokenizers vs the per-cell loops of the reference projects.

Builds (or reuses) a corpus of the five 10x PBMC sets in scrna/human/ of the shared data, reads every
training cell into memory once, then times each scheme twice on the same cells:
  celltron   encode_blocks (what `celltron tokenize` runs) over blocks of 2,048 cells, given as
             the corpus reader gives them (CSR arrays of the block), on 1 thread and on every
             available core
  reference  the straightforward per-cell loop the reference projects use:
             Geneformer  normalise a chunk, then per cell argsort the row (tokenize_anndata / rank_genes)
             scGPT       dense rows: scgpt.preprocess.binning per row, then tokenize_and_pad_batch
             GeneCompass per cell: normalise, divide by medians, log2(1 + x), argsort, top 2,048

    python -m benchmarks.tokenize [--workdir /tmp/celltron-bench] [--cells N] [--shared-data DIR]

(run as a module: as a script its name would shadow the standard library's `tokenize`)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from benchmarks._data import add_shared_data_option, shared_paths
from celltron.corpus import BuildOptions, Corpus, build_corpus
from celltron.corpus.store import ShardReader
from celltron.tokenizers.dataset import _Input, make_tokenizer
from celltron.tokenizers.schemes import Block
from celltron.tokenizers.threads import available_cores, encode_blocks
from tests.scgpt_reference import reference_binning, reference_tokenize_and_pad

PBMC = "scrna/human/"  # in the shared data


def load_cells(shared_data: Path, workdir: Path, limit: int):
    """All training cells of the PBMC corpus as one CSR matrix, with n_counts and species."""
    corpus_dir = workdir / "pbmc5.tokenize.corpus"
    if not (corpus_dir / "manifest.json").exists():
        (pbmc,) = shared_paths(shared_data, PBMC)
        build_corpus(sorted(pbmc.glob("*.h5ad")), corpus_dir, BuildOptions(progress=False))
    corpus = Corpus(corpus_dir)
    parts, totals, species = [], [], []
    names = corpus.manifest["obs_categories"]["species"]
    for record in corpus.shards("train"):
        block = ShardReader(corpus, record).read(0, record["n_cells"])
        parts.append(sp.csr_matrix((block.counts, block.genes, block.indptr), shape=(len(block), corpus.n_genes)))
        totals.append(block.obs["n_counts"])
        species += [names[c] for c in block.obs["species"]]
    x = sp.vstack(parts, format="csr")[:limit]
    return corpus, x, np.concatenate(totals)[:limit].astype(np.float64), species[:limit]


def celltron_rate(tokenizer, x, totals, species, threads: int = 1, block_cells: int = 2048) -> float:
    """Cells/s of `encode_blocks` (what `celltron tokenize` runs) over blocks as the corpus reader
    hands them over (CSR arrays of their cells), on `threads` threads."""

    def block(lo: int, hi: int) -> Block:
        first, last = x.indptr[lo], x.indptr[min(hi, x.shape[0])]
        indptr, genes, counts = x.indptr[lo : hi + 1] - first, x.indices[first:last], x.data[first:last]
        return Block(indptr, genes, counts, totals[lo:hi], species[lo:hi], {})

    tokenizer.encode_block(block(0, 8), np.random.default_rng(0))  # start-up: numba compiles on first use
    start = time.perf_counter()
    blocks = (block(lo, lo + block_cells) for lo in range(0, x.shape[0], block_cells))
    for _ in encode_blocks(tokenizer, blocks, seed=0, threads=threads):
        pass
    return x.shape[0] / (time.perf_counter() - start)


def geneformer_loop(tokenizer, x, totals) -> float:
    """Geneformer's tokenize_anndata: normalise 512-cell chunks, then rank each row."""
    medians = tokenizer.median
    tokens = tokenizer.token_of_gene
    covered = np.flatnonzero(tokens >= 0)
    start = time.perf_counter()
    for lo in range(0, x.shape[0], 512):
        chunk = x[lo : lo + 512][:, covered]
        normed = sp.csr_matrix(chunk / totals[lo : lo + 512, None] * 10_000 / medians[covered])
        gene_tokens = tokens[covered]
        for i in range(normed.shape[0]):
            # as Geneformer's rank_genes(X_norm[i].data, tokens[X_norm[i].indices]) does
            ranked = gene_tokens[normed[i].indices][np.argsort(-normed[i].data)]
            ranked = np.concatenate([[2], ranked[:4094], [3]])
    return x.shape[0] / (time.perf_counter() - start)


def scgpt_loop(tokenizer, x, limit: int = 400) -> float:
    """scGPT: dense in-vocabulary rows, normalise + log1p, binning per row, tokenize_and_pad_batch."""
    binning, tokenize_and_pad = reference_binning(), reference_tokenize_and_pad()
    covered = tokenizer.covered_genes
    ids = tokenizer.token_of_gene[covered]
    stoi = {t: i for i, t in enumerate(tokenizer.vocab.tokens)}
    cells = x[:limit][:, covered]
    start = time.perf_counter()
    dense = cells.toarray().astype(np.float64)
    dense = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    binned = np.stack([binning(row, 51) for row in dense])
    tokenize_and_pad(binned, ids, max_len=1200, vocab=stoi, pad_token="<pad>", pad_value=-2)
    return cells.shape[0] / (time.perf_counter() - start)


def genecompass_loop(tokenizer, x, totals, species) -> float:
    """Per cell with Python lookups: normalise, divide by medians, log2(1 + x), argsort, top 2,048."""
    start = time.perf_counter()
    for i in range(x.shape[0]):
        row = x[i]
        keep = tokenizer.token_of_gene[row.indices] >= 0
        genes, counts = row.indices[keep], row.data[keep]
        values = np.log2(1 + counts / totals[i] * 10_000 / tokenizer.median[genes])
        order = np.argsort(-values, kind="stable")[:2048]
        # built as the reference builds them, then dropped: the work is what is timed
        _ids = [tokenizer.vocab.special_id(species[i])] + tokenizer.token_of_gene[genes[order]].tolist()
        _vals = [0.0] + values[order].tolist()
    return x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/celltron-bench"))
    parser.add_argument("--cells", type=int, default=100_000, help="at most this many cells")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is reported (default 3)")
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus, x, totals, species = load_cells(args.shared_data, args.workdir, args.cells)
    genes = corpus.manifest["genes"]
    data = _Input(corpus.gene_ids, np.asarray(genes["species"]), corpus.gene_medians(), x.shape[0], iter(()))
    print(
        f"# tokenizer throughput, {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(
        f"# {x.shape[0]} PBMC cells, {x.nnz / x.shape[0]:.0f} non-zeros per cell, one process (celltron: a thread pool), "
        f"best of {args.repeats} runs per side (first runs in brackets)\n"
    )
    cores = available_cores()
    print(
        f"| scheme | celltron, 1 thread | celltron, {cores} threads | reference loop, 1 process | ratio, 1 core | "
        f"ratio at {cores} cores (reference given perfect scaling: {cores} x its 1-process rate) |"
    )
    print("|---|---|---|---|---|---|")
    for scheme in ("geneformer-v2", "scgpt", "ortholog"):
        tokenizer, _ = make_tokenizer(scheme, data, None, seed=0)
        ours = [celltron_rate(tokenizer, x, totals, species) for _ in range(args.repeats)]
        threaded = [celltron_rate(tokenizer, x, totals, species, threads=cores) for _ in range(args.repeats)]
        if scheme == "geneformer-v2":
            theirs = [geneformer_loop(tokenizer, x, totals) for _ in range(args.repeats)]
        elif scheme == "scgpt":
            theirs = [scgpt_loop(tokenizer, x) for _ in range(args.repeats)]
        else:
            theirs = [genecompass_loop(tokenizer, x, totals, species) for _ in range(args.repeats)]
        print(
            f"| {scheme} | {max(ours):,.0f} ({ours[0]:,.0f}) | {max(threaded):,.0f} ({threaded[0]:,.0f}) | "
            f"{max(theirs):,.0f} ({theirs[0]:,.0f}) | {max(ours) / max(theirs):.1f}x | {max(threaded) / (cores * max(theirs)):.1f}x |"
        )


if __name__ == "__main__":
    main()
