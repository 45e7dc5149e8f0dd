import anndata as ad
import numpy as np
import pytest
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from celltron.corpus import Corpus, CorpusStream

SMALL = dict(block_size=64, buffer_size=256)


def _indices(batch):
    return [int(cell["cell_index"]) for cell in batch]


def _epoch(corpus, rank, world_size, epoch=0, num_workers=2, **kwargs):
    stream = CorpusStream(corpus, infinite=False, rank=rank, world_size=world_size, **SMALL, **kwargs)
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=32, num_workers=num_workers, collate_fn=list)
    return [i for batch in loader for i in _indices(batch)]


def test_cells_match_the_shards(small_corpus):
    corpus = Corpus(small_corpus)
    stream = CorpusStream(corpus, infinite=False, **SMALL)
    cells = {int(c["cell_index"]): c for c in stream}
    offset = 0
    for record in corpus.shards("train")[:3]:
        shard = ad.read_zarr(small_corpus / record["path"])
        for row in np.random.default_rng(0).choice(shard.n_obs, 20, replace=False):
            cell = cells[offset + row]
            expected = shard.X[row]
            assert cell["genes"].tolist() == expected.indices.tolist()
            assert cell["counts"].tolist() == expected.data.tolist()
            assert cell["n_counts"] == shard.obs["n_counts"].iloc[row]
            assert cell["dataset"] == shard.obs["dataset"].cat.codes.iloc[row]
            assert cell["Annotation"] == shard.obs["Annotation"].cat.codes.iloc[row]
        offset += shard.n_obs


def test_two_ranks_two_workers_cover_the_epoch_once(small_corpus):
    corpus = Corpus(small_corpus)
    total = corpus.manifest["splits"]["train"]["n_cells"]
    seen = {rank: _epoch(corpus, rank, 2) for rank in (0, 1)}
    everything = seen[0] + seen[1]
    dropped = CorpusStream(corpus, world_size=2, rank=0, **SMALL).dropped_cells(0)
    assert dropped == total % 2
    assert len(seen[0]) == len(seen[1]) == total // 2
    assert len(set(everything)) == len(everything) == total - dropped


def test_order_and_dropped_cells_change_between_epochs(small_corpus):
    corpus = Corpus(small_corpus)
    world = 3  # leaves a remainder to drop
    epochs = [
        sorted_pair for sorted_pair in ([_epoch(corpus, r, world, epoch=e, num_workers=0) for r in range(world)] for e in (0, 1))
    ]
    first, second = (sum(ranks, []) for ranks in epochs)
    assert first != second
    total = corpus.manifest["splits"]["train"]["n_cells"]
    missing = [set(range(total)) - set(cells) for cells in (first, second)]
    assert len(missing[0]) == len(missing[1]) == total % world
    if total % world:
        assert missing[0] != missing[1]


def test_unshuffled_stream_is_corpus_order(small_corpus):
    stream = CorpusStream(small_corpus, infinite=False, shuffle=False, **SMALL)
    assert [int(c["cell_index"]) for c in stream] == list(range(stream.cells_per_epoch()))


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(_indices(batch))
        if len(out) == n:
            return out
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_k_batches_with_plain_dataloader(small_corpus, num_workers):
    corpus = Corpus(small_corpus)
    make = lambda: CorpusStream(corpus, seed=5, rank=1, world_size=2, **SMALL)  # noqa: E731
    batch_size, k, more = 48, 37, 20  # 37 x 48 cells crosses an epoch boundary per worker
    uninterrupted = _take(DataLoader(make(), batch_size=batch_size, num_workers=num_workers, collate_fn=list), k + more)
    resumed_stream = make()
    resumed_stream.load_state_dict(make().state_after_batches(k, batch_size, max(num_workers, 1)))
    resumed = _take(DataLoader(resumed_stream, batch_size=batch_size, num_workers=num_workers, collate_fn=list), more)
    assert resumed == uninterrupted[k:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_stateful_dataloader(small_corpus, num_workers):
    corpus = Corpus(small_corpus)

    def make():
        return StatefulDataLoader(CorpusStream(corpus, seed=1, **SMALL), batch_size=40, num_workers=num_workers, collate_fn=list)

    first = make()
    iterator = iter(first)
    head = [_indices(next(iterator)) for _ in range(45)]
    state = first.state_dict()
    tail = [_indices(next(iterator)) for _ in range(15)]
    second = make()
    second.load_state_dict(state)
    assert _take(second, 15) == tail
    assert head[0] != tail[0]


def test_training_stream_runs_epoch_after_epoch(small_corpus):
    stream = CorpusStream(small_corpus, rank=0, world_size=2, **SMALL)
    per_epoch = stream.cells_per_epoch()
    cells = [int(c["cell_index"]) for _, c in zip(range(2 * per_epoch + 10), stream)]
    assert len(cells) == 2 * per_epoch + 10
    assert sorted(cells[:per_epoch]) == sorted(set(cells[:per_epoch]))
    assert cells[:per_epoch] != cells[per_epoch : 2 * per_epoch]


def test_resume_refuses_a_different_setup(small_corpus):
    state = CorpusStream(small_corpus, seed=1, **SMALL).state_dict()
    with pytest.raises(ValueError, match="seed"):
        CorpusStream(small_corpus, seed=2, **SMALL).load_state_dict(state)
    state = CorpusStream(small_corpus, **SMALL).state_after_batches(3, 8, num_workers=2)
    stream = CorpusStream(small_corpus, **SMALL)
    stream.load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        next(iter(stream))


def test_spawned_workers_open_their_own_stores(small_corpus):
    stream = CorpusStream(small_corpus, infinite=False, rank=0, world_size=1, **SMALL)
    loader = DataLoader(stream, batch_size=64, num_workers=2, collate_fn=list, multiprocessing_context="spawn")
    cells = [i for batch in loader for i in _indices(batch)]
    assert sorted(cells) == list(range(stream.cells_per_epoch()))


def test_validation_split_streams_once(small_corpus):
    stream = CorpusStream(small_corpus, split="val", **SMALL)
    cells = [int(c["cell_index"]) for c in stream]
    assert not stream.infinite
    assert sorted(cells) == list(range(Corpus(small_corpus).manifest["splits"]["val"]["n_cells"]))


def test_file_url_reads_like_a_path(small_corpus):
    by_url = CorpusStream(f"file://{small_corpus}", infinite=False, shuffle=False, **SMALL)
    by_path = CorpusStream(small_corpus, infinite=False, shuffle=False, **SMALL)
    for a, b in zip(by_url, by_path, strict=True):
        assert a["genes"].tolist() == b["genes"].tolist()


def test_zarrs_pipeline_reads_the_same_cells(small_corpus):
    import subprocess
    import sys

    pytest.importorskip("zarrs")
    # in a child process: the zarrs pipeline is process-wide and must not leak into forked tests
    code = (
        "import sys; from celltron.corpus import CorpusStream\n"
        f"a = [c['counts'].tolist() for c in CorpusStream({str(small_corpus)!r}, infinite=False, block_size=64, buffer_size=256)]\n"
        f"b = [c['counts'].tolist() for c in CorpusStream({str(small_corpus)!r}, infinite=False, block_size=64, buffer_size=256, zarrs=True)]\n"
        "import zarr; assert zarr.config.get('codec_pipeline.path') == 'zarrs.ZarrsCodecPipeline'\n"
        "sys.exit(0 if a == b and len(a) > 0 else 1)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_set_epoch_keeps_a_just_loaded_state_and_resets_otherwise(small_corpus):
    make = lambda: CorpusStream(small_corpus, seed=2, **SMALL)  # noqa: E731
    uninterrupted = _take(DataLoader(make(), batch_size=16, num_workers=2, collate_fn=list), 12)
    resumed = make()
    resumed.load_state_dict(make().state_after_batches(7, 16, 2))
    resumed.set_epoch(0)  # what trainers do at the start of the resumed epoch
    assert _take(DataLoader(resumed, batch_size=16, num_workers=2, collate_fn=list), 5) == uninterrupted[7:]
    resumed.set_epoch(1)  # a new epoch: plain epoch 1, no leftover rotation
    fresh = make()
    fresh.set_epoch(1)
    loader = lambda s: DataLoader(s, batch_size=16, num_workers=2, collate_fn=list)  # noqa: E731
    assert _take(loader(resumed), 4) == _take(loader(fresh), 4)


def test_iterating_in_the_main_process_does_not_pin_the_worker_count(small_corpus):
    stream = CorpusStream(small_corpus, infinite=False, **SMALL)
    next(iter(stream))
    stream.set_epoch(0)
    cells = [i for batch in DataLoader(stream, batch_size=64, num_workers=2, collate_fn=list) for i in _indices(batch)]
    assert sorted(cells) == list(range(stream.cells_per_epoch()))


def test_collate_cells_flattens_a_batch_in_the_workers(small_corpus):
    from celltron.corpus import collate_cells

    stream = CorpusStream(small_corpus, infinite=False, shuffle=False, **SMALL)
    cells = list(CorpusStream(small_corpus, infinite=False, shuffle=False, **SMALL))
    batches = list(DataLoader(stream, batch_size=32, num_workers=2, collate_fn=collate_cells))
    by_index = {int(c["cell_index"]): c for c in cells}
    seen = 0
    for batch in batches:
        assert set(batch) >= {"genes", "counts", "offsets", "n_counts", "cell_index", "dataset", "species"}
        for i, index in enumerate(batch["cell_index"].tolist()):
            lo, hi = int(batch["offsets"][i]), int(batch["offsets"][i + 1])
            assert batch["genes"][lo:hi].tolist() == by_index[index]["genes"].tolist()
            assert batch["counts"][lo:hi].tolist() == by_index[index]["counts"].tolist()
            assert int(batch["n_counts"][i]) == int(by_index[index]["n_counts"])
            seen += 1
    assert seen == len(cells)


def _same_batch(a: dict, b: dict) -> bool:
    a, b = ({k: np.asarray(v) for k, v in x.items()} for x in (a, b))  # a DataLoader turns arrays into tensors
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batched_stream_is_collate_cells_of_the_same_cells(small_corpus, num_workers):
    from celltron.corpus import collate_cells

    corpus = Corpus(small_corpus)
    # 37 cells a batch: batches straddle windows (256 cells) and, in 140 batches, epochs
    cells = DataLoader(CorpusStream(corpus, seed=3, **SMALL), batch_size=37, num_workers=num_workers, collate_fn=collate_cells)
    batched = DataLoader(CorpusStream(corpus, seed=3, batch_size=37, **SMALL), batch_size=None, num_workers=num_workers)
    expected, got = _take_batches(cells, 140), _take_batches(batched, 140)
    assert len(got) == 140 and all(_same_batch(a, b) for a, b in zip(got, expected))
    assert 140 * 37 // max(num_workers, 1) > CorpusStream(corpus, **SMALL).cells_per_epoch() // max(num_workers, 1)


@pytest.mark.parametrize("numba", ["1", "0"])
def test_batched_finite_stream_ends_with_the_remainder(small_corpus, numba, monkeypatch):
    from celltron.corpus import collate_cells

    monkeypatch.setenv("CELLTRON_NUMBA", numba)  # the compiled gather and numpy's give the same batches

    cells = list(CorpusStream(small_corpus, infinite=False, seed=2, **SMALL))
    batches = list(CorpusStream(small_corpus, infinite=False, seed=2, batch_size=100, **SMALL))
    assert [len(b["offsets"]) - 1 for b in batches] == [100] * (len(cells) // 100) + [len(cells) % 100]
    assert _same_batch(batches[-1], collate_cells(cells[-(len(cells) % 100) :]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batched_stream_resumes_after_k_batches(small_corpus, num_workers):
    corpus = Corpus(small_corpus)
    make = lambda: CorpusStream(corpus, seed=5, batch_size=48, **SMALL)  # noqa: E731
    k, more = 37, 12
    uninterrupted = _take_batches(DataLoader(make(), batch_size=None, num_workers=num_workers), k + more)
    resumed_stream = make()
    resumed_stream.load_state_dict(make().state_after_batches(k, 48, max(num_workers, 1)))
    resumed = _take_batches(DataLoader(resumed_stream, batch_size=None, num_workers=num_workers), more)
    assert all(_same_batch(a, b) for a, b in zip(resumed, uninterrupted[k:])) and len(resumed) == more


def test_batched_stream_refuses_a_batch_size_below_one(small_corpus):
    from celltron.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        CorpusStream(small_corpus, batch_size=0)


def _take_batches(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out
