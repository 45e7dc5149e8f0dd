"""Tokenise blocks of cells on a pool of threads, in input order, with the same output whatever
the number of threads.

The compiled kernels (`_kernels.py`, numba `nogil`) release the GIL, so threads share one copy
of the tokenizer and the blocks without pickling anything. Each block gets its own generator,
seeded by (seed, block index): scGPT's tie spreading and sampling draw the same numbers for a
block whether one thread or eight tokenise it, and whichever finishes first.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from celltron.errors import ConfigError


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a scheduler or container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity (macOS)
        return os.cpu_count() or 1


def block_generator(seed: int, index: int) -> np.random.Generator:
    """The generator of block `index` of a run seeded with `seed`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def encode_blocks(tokenizer, blocks: Iterable, seed: int, threads: int | None = None) -> Iterator[tuple]:
    """(block, tokens) for every block, in order, tokenised on `threads` threads (None: every
    available core); at most twice as many blocks as threads are in flight (bounded memory)."""
    threads = available_cores() if threads is None else threads
    if threads < 1:
        raise ConfigError(f"--threads {threads}: give 1 or more threads (default: every available core)")
    if threads == 1:
        for index, block in enumerate(blocks):
            yield block, tokenizer.encode_block(block, block_generator(seed, index))
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="celltron-tokenize") as pool:
        pending: deque = deque()
        for index, block in enumerate(blocks):
            pending.append((block, pool.submit(tokenizer.encode_block, block, block_generator(seed, index))))
            if len(pending) >= 2 * threads:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
