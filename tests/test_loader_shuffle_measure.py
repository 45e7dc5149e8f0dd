"""The shuffle measures benchmarks/loaders.py reports beside every loader's speed."""

import numpy as np

from benchmarks.loader_peers import shuffle_quality


def test_contiguous_batches_are_one_run_in_one_range():
    runs, ranges = shuffle_quality(np.arange(64 * 100))
    assert runs == 1.0 and ranges == 1.0


def test_uniformly_random_rows_are_all_singletons_over_many_ranges():
    ids = np.random.default_rng(0).permutation(200_000)[: 64 * 500]
    runs, ranges = shuffle_quality(ids)
    assert runs > 63.5
    # a random 64 of 196 ranges of 1,024 rows: 196 * (1 - (195/196)**64) ~ 54.8 distinct
    assert 53.5 < ranges < 56


def test_shuffled_blocks_touch_only_the_blocks_in_memory():
    rng = np.random.default_rng(1)
    starts = rng.permutation(195)[:8] * 1024  # 8 blocks of 1,024 rows held, cells drawn among them
    ids = rng.permutation(np.concatenate([np.arange(s, s + 1024) for s in starts]))
    runs, ranges = shuffle_quality(ids)
    assert ranges <= 8 and runs > 60
