"""The benchmarks' cache of pretrained models (benchmarks/_pretrained.py): keys follow the
configs' values, a complete entry is reused, and an interrupted build leaves no entry behind.
The corpus build and the pretraining are replaced by cheap stand-ins; the keys, the staging
folder and the rename are the real ones."""

from pathlib import Path

import pytest

from benchmarks import _pretrained as cache

PRETRAIN = "model:\n  family: geneformer\n  size: debug\ntrainer:\n  max_steps: 100\n"
CORPUS = "# corpus options\nseed: 0\ngene_column: gene_symbol_original\n"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Stand-in configs and shared data under tmp_path; builds counted instead of run."""
    shared = tmp_path / "shared"
    for name in cache.PBMC_INPUTS:
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).write_bytes(name.encode())
    config = tmp_path / "configs" / "geneformer_benchmark.yaml"
    config.parent.mkdir()
    config.write_text(PRETRAIN)
    corpus_config = tmp_path / "configs" / "pbmc.yaml"
    corpus_config.write_text(CORPUS)
    monkeypatch.setattr(cache, "CONFIGS", {"geneformer": config})
    monkeypatch.setattr(cache, "CORPUS_CONFIG", corpus_config)
    monkeypatch.setattr(cache, "REPO", tmp_path)
    builds = {"corpus": 0, "pretrain": 0}

    def fake_corpus(inputs, corpus_config, out):
        builds["corpus"] += 1
        out.mkdir()
        (out / "manifest.json").write_text("{}")

    def fake_pretrain(config, corpus, run_dir):
        builds["pretrain"] += 1
        assert (corpus / "manifest.json").exists()
        (run_dir / "export").mkdir(parents=True)
        (run_dir / "export" / "config.json").write_text(Path(config).read_text())

    monkeypatch.setattr(cache, "build_corpus", fake_corpus)
    monkeypatch.setattr(cache, "pretrain_model", fake_pretrain)
    return {"shared": shared, "config": config, "corpus_config": corpus_config, "runs": tmp_path / "runs", "builds": builds}


def test_model_key_follows_the_config_values_not_its_comments(tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text(PRETRAIN)
    key = cache.model_key(config, "corpus1")
    config.write_text("# a comment, other layout\n" + PRETRAIN.replace("max_steps: 100", "max_steps:   100"))
    assert cache.model_key(config, "corpus1") == key
    assert cache.model_key(config, "corpus2") != key
    config.write_text(PRETRAIN.replace("max_steps: 100", "max_steps: 101"))
    assert cache.model_key(config, "corpus1") != key


def test_corpus_key_follows_the_inputs_and_the_build_options(setup):
    inputs = cache.pbmc_inputs(setup["shared"])
    key = cache.corpus_key(inputs, setup["corpus_config"])
    assert cache.corpus_key(inputs, setup["corpus_config"]) == key
    assert cache.corpus_key(inputs[:-1], setup["corpus_config"]) != key
    inputs[0].write_bytes(b"other cells")
    assert cache.corpus_key(inputs, setup["corpus_config"]) != key


def test_a_complete_entry_is_reused_and_a_changed_config_rebuilds(setup):
    first = cache.benchmark_model("geneformer", setup["runs"], setup["shared"])
    assert first.name == "export" and (first / "config.json").exists()
    entry = first.parent.parent
    record = (entry / "build.json").read_text()
    assert '"pretrain_wall_s"' in record and '"torch"' in record
    assert cache.benchmark_model("geneformer", setup["runs"], setup["shared"]) == first
    assert setup["builds"] == {"corpus": 1, "pretrain": 1}

    setup["config"].write_text(PRETRAIN.replace("100", "200"))
    second = cache.benchmark_model("geneformer", setup["runs"], setup["shared"])
    assert second != first and first.exists()  # the old entry stays; the new config gets its own
    assert setup["builds"] == {"corpus": 1, "pretrain": 2}  # the corpus did not change

    setup["corpus_config"].write_text(CORPUS.replace("seed: 0", "seed: 1"))
    cache.benchmark_model("geneformer", setup["runs"], setup["shared"])
    assert setup["builds"] == {"corpus": 2, "pretrain": 3}
    assert not list(setup["runs"].glob(".*.partial"))


def test_an_interrupted_build_leaves_no_entry_and_the_next_call_continues_it(tmp_path):
    folder = tmp_path / "entry"

    def interrupted(staging):
        (staging / "checkpoint").write_text("step 10")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached(folder, interrupted)
    assert not folder.exists()

    def resumed(staging):
        assert (staging / "checkpoint").read_text() == "step 10"  # the earlier attempt's work is there
        return {"resumed": True}

    assert cache.cached(folder, resumed) == folder
    assert (folder / "checkpoint").exists() and '"resumed": true' in (folder / "build.json").read_text()
    assert not (tmp_path / ".entry.partial").exists()


def test_resolve_model_names_a_folder_or_the_cached_benchmark_model(setup):
    assert cache.resolve_model("some/folder") == Path("some/folder")
    model = cache.resolve_model("benchmark:geneformer", setup["runs"], setup["shared"])
    assert model == cache.benchmark_model("geneformer", setup["runs"], setup["shared"])
    with pytest.raises(SystemExit, match="unknown family"):
        cache.resolve_model("benchmark:nope", setup["runs"], setup["shared"])


def test_the_random_init_copy_is_cached_beside_its_model(setup, monkeypatch):
    copies = []

    def fake_copy(folder, out, seed):
        copies.append(seed)
        out.mkdir()
        (out / "config.json").write_text((folder / "config.json").read_text())

    monkeypatch.setattr(cache, "random_init_copy", fake_copy)
    random = cache.random_init("geneformer", setup["runs"], setup["shared"])
    assert (random / "config.json").read_text() == PRETRAIN
    assert random.parent.parent == cache.benchmark_model("geneformer", setup["runs"], setup["shared"]).parent.parent
    assert cache.random_init("geneformer", setup["runs"], setup["shared"]) == random and copies == [0]
    assert (
        cache.resolve_random_init("benchmark:geneformer", Path("unused"), Path("unused"), setup["runs"], setup["shared"])
        == random
    )
