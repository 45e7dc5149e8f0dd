"""The benchmarks' pretrained models, built once and cached: each family's benchmark config
(configs/pretrain/<family>_benchmark.yaml) pretrained on the human PBMC corpus, and the same
architecture with fresh random weights (does pretraining help?).

    python benchmarks/_pretrained.py geneformer [--runs-dir runs/bench/pretrained] [--random-init]

prints the exported model folder, building the corpus and pretraining first when no cached copy
matches (about 30 minutes per family on 2 CPU cores). Under `--runs-dir`:

    corpus-<key>/        the PBMC corpus; key: the input files (names and content) + configs/corpus/pbmc.yaml
    <family>-<key>/      run/ (the pretraining run; run/export is the model) and, once asked
                         for, random_init-seed0/model; key: the family's config + the corpus key
    each with build.json: what it was built from, the wall time of the build and the versions.

A key hashes the parsed YAML, so editing a config's comments keeps its cache and changing any
value rebuilds it. An entry is built under a hidden `.NAME.partial` name and renamed when
complete, so a folder with the final name is always whole; an interrupted pretraining resumes
from its newest checkpoint on the next call.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/_pretrained.py`: import siblings as benchmarks.*
    # replace, not prepend: benchmarks/ on the path would shadow the standard library's `tokenize`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import yaml

from benchmarks._data import default_shared_data, shared_paths

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    family: REPO / "configs" / "pretrain" / f"{family}_benchmark.yaml" for family in ("geneformer", "scgpt", "genecompass")
}
CORPUS_CONFIG = REPO / "configs" / "corpus" / "pbmc.yaml"
RUNS_DIR = Path("runs/bench/pretrained")
# Every human raw-count PBMC set of the shared data except the labelled PBMC 4k set
# (scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad), which the embedding and GRN benchmarks
# evaluate on and so must never be pretrained on.
PBMC_INPUTS = (
    "scrna/human/10x_pbmc3k_2700cells_raw.h5ad",
    "scrna/human/scWGParis_1k_PBMC_v2_raw_996cells_raw.h5ad",
    "scrna/human/scWGParis_1k_PBMC_v3_filt_906cells_raw.h5ad",
    "scrna/human/scWGParis_5prime_PBMC_filt_1kcells_1000cells_raw.h5ad",
)  # TEA-seq's RNA (multiomics/) is left out too: the multi-omics tasks evaluate on it
KEY_CHARS = 12  # of the sha256: enough to tell configs apart, short enough to read


# ---------------------------------------------------------------- keys


def parsed_yaml_digest(path: Path) -> str:
    """sha256 of a YAML file's parsed content: comments and layout do not count, values do."""
    content = yaml.safe_load(Path(path).read_text())
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def corpus_key(inputs: list[Path], corpus_config: Path) -> str:
    """The corpus's cache key: its inputs (by name and content, in order) and its build options."""
    parts = [f"{path.name}:{file_digest(path)}" for path in inputs] + [parsed_yaml_digest(corpus_config)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:KEY_CHARS]


def model_key(config: Path, corpus: str) -> str:
    """A pretrained model's cache key: its config's values and the corpus it was trained on."""
    return hashlib.sha256(f"{parsed_yaml_digest(config)}\n{corpus}".encode()).hexdigest()[:KEY_CHARS]


# ---------------------------------------------------------------- the cache


@contextmanager
def exclusive(lock_path: Path):
    """One builder per entry: a second process waits, then finds the entry complete."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(folder: Path, build: Callable[[Path], dict]) -> Path:
    """`folder`, built by `build(staging)` if it does not exist yet. `build` fills the staging
    folder and returns what build.json should record; the staging folder is renamed to `folder`
    only once it is complete. The staging name is fixed (not per process), so a build killed
    midway leaves its work for the next call to continue (a pretraining resumes)."""
    if folder.exists():
        return folder
    with exclusive(folder.parent / f".{folder.name}.lock"):
        if folder.exists():  # built by another process while this one waited
            return folder
        staging = folder.parent / f".{folder.name}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        record = build(staging)
        record = {**record, "build_wall_s": round(time.perf_counter() - start, 1), "versions": versions()}
        (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(staging, folder)
    return folder


def versions() -> dict:
    """The versions a cached model was built with (recorded, not part of the key)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for package in ("celltron", "torch", "transformers", "lightning"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


# ---------------------------------------------------------------- the corpus and the models


def pbmc_inputs(shared_data: Path) -> list[Path]:
    return shared_paths(shared_data, *PBMC_INPUTS)


def build_corpus(inputs: list[Path], corpus_config: Path, out: Path) -> None:
    """`celltron corpus build` of the inputs into `out`."""
    from celltron.cli import main as celltron

    command = ["corpus", "build", *map(str, inputs), "--out", str(out), "--config", str(corpus_config), "--no-progress"]
    assert celltron(command) == 0, f"celltron {' '.join(command)} failed"


def pretrain_model(config: Path, corpus: Path, run_dir: Path) -> None:
    """`celltron pretrain` of the config on the corpus, continuing from the newest checkpoint
    when an earlier attempt left one."""
    from celltron.cli import main as celltron

    command = ["pretrain", str(config), "--corpus", str(corpus), "--out", str(run_dir), "--resume", "auto"]
    assert celltron(command) == 0, f"celltron {' '.join(command)} failed"


def benchmark_corpus(runs_dir: Path = RUNS_DIR, shared_data: Path | None = None) -> Path:
    """The PBMC corpus folder (its `corpus/` inside), built when no cached copy matches."""
    inputs = pbmc_inputs(shared_data or default_shared_data())
    folder = Path(runs_dir) / f"corpus-{corpus_key(inputs, CORPUS_CONFIG)}"

    def build(staging: Path) -> dict:
        if (staging / "corpus").exists():  # an interrupted build: corpus build refuses to reuse it
            shutil.rmtree(staging / "corpus")
        build_corpus(inputs, CORPUS_CONFIG, staging / "corpus")
        return {"inputs": [str(path) for path in inputs], "corpus_config": str(CORPUS_CONFIG)}

    return cached(folder, build)


def benchmark_entry(family: str, runs_dir: Path = RUNS_DIR, shared_data: Path | None = None) -> Path:
    """The family's cache folder (run/, build.json), pretrained when no cached copy matches."""
    config = CONFIGS[family]
    corpus_folder = benchmark_corpus(runs_dir, shared_data)
    key = model_key(config, corpus_folder.name.removeprefix("corpus-"))

    def build(staging: Path) -> dict:
        start = time.perf_counter()
        pretrain_model(config, corpus_folder / "corpus", staging / "run")
        return {
            "family": family,
            "config": str(config.relative_to(REPO)),
            "corpus": str(corpus_folder),
            "pretrain_wall_s": round(time.perf_counter() - start, 1),  # this attempt's (a resumed run: the rest only)
            **last_metrics(staging / "run" / "metrics.csv"),
        }

    return cached(Path(runs_dir) / f"{family}-{key}", build)


def last_metrics(metrics_csv: Path) -> dict:
    """The final training loss and validation figures of a run, for build.json."""
    import csv

    if not metrics_csv.exists():
        return {}
    rows = list(csv.DictReader(metrics_csv.open()))
    last = lambda field: next((float(r[field]) for r in reversed(rows) if r.get(field)), None)  # noqa: E731
    return {
        "steps": int(rows[-1]["step"]) if rows else 0,
        "final_loss": last("loss"),
        "val_loss": last("val_loss"),
        "val_masked_accuracy": last("val_masked_accuracy"),
        "cells_per_s": last("cells_per_s"),
    }


def benchmark_model(family: str, runs_dir: Path = RUNS_DIR, shared_data: Path | None = None) -> Path:
    """The exported Hugging Face folder of the family's cached benchmark model."""
    return benchmark_entry(family, runs_dir, shared_data) / "run" / "export"


def random_init(family: str, runs_dir: Path = RUNS_DIR, shared_data: Path | None = None, seed: int = 0) -> Path:
    """The benchmark model's architecture and tokenizer with fresh random weights (seeded, so
    every benchmark compares against the same random model)."""
    entry = benchmark_entry(family, runs_dir, shared_data)

    def build(staging: Path) -> dict:
        random_init_copy(entry / "run" / "export", staging / "model", seed)
        return {"family": family, "from": str(entry / "run" / "export"), "seed": seed}

    return cached(entry / f"random_init-seed{seed}", build) / "model"


def random_init_copy(folder: Path, out: Path, seed: int | None = None) -> Path:
    """The model's architecture and tokenizer with fresh random weights (torch's generator
    seeded first when `seed` is given)."""
    import torch
    from transformers import AutoConfig

    import celltron  # noqa: F401  (Auto classes)
    from celltron.model_zoo.registry import family_of

    config = AutoConfig.from_pretrained(folder)
    spec = family_of(config)
    if seed is not None:
        torch.manual_seed(seed)
    model = spec.model_class(spec.config_class.from_pretrained(folder))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    for item in folder.iterdir():  # the tokenizer's files
        if item.suffix == ".json" and item.name != "config.json":
            shutil.copy2(item, out / item.name)
    return out


# ---------------------------------------------------------------- option for the benchmarks

PREFIX = "benchmark:"


def resolve_model(value: str | Path, runs_dir: Path = RUNS_DIR, shared_data: Path | None = None) -> Path:
    """A benchmark's `--model`: a folder, or `benchmark:<family>` for the cached benchmark model
    (built when missing)."""
    text = str(value)
    if not text.startswith(PREFIX):
        return Path(text)
    family = text.removeprefix(PREFIX)
    if family not in CONFIGS:
        raise SystemExit(f"--model {text}: unknown family {family!r}; choose one of {', '.join(PREFIX + f for f in CONFIGS)}")
    return benchmark_model(family, runs_dir, shared_data)


def resolve_random_init(value: str | Path, model: Path, out: Path, runs_dir: Path = RUNS_DIR, shared_data=None) -> Path:
    """The random-initialisation counterpart of `--model`: the cached one for `benchmark:<family>`,
    else a copy written to `out`."""
    text = str(value)
    if text.startswith(PREFIX):
        return random_init(text.removeprefix(PREFIX), runs_dir, shared_data)
    return random_init_copy(model, out, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build (when missing) and print a family's cached benchmark model.")
    parser.add_argument("family", choices=sorted(CONFIGS))
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--random-init", action="store_true", help="print the random-initialisation copy instead")
    parser.add_argument("--shared-data", type=Path, default=default_shared_data())
    args = parser.parse_args()
    pick = random_init if args.random_init else benchmark_model
    print(pick(args.family, args.runs_dir, args.shared_data))


if __name__ == "__main__":
    main()
