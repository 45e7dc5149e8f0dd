"""How the corpus's costs grow with the number of cells: build, stream and tokenize at 10k, 100k
and 1M synthetic cells, beside annbatch's preparation of the same cells.

    python -m benchmarks.corpus_scaling [--cells 10000 100000 1000000] [--nnz 500] [--workdir DIR]
        [--annbatch-python PY] [--repeats 3] [--plot benchmarks/scaling_corpus.png]

Per size, a synthetic .h5ad (20k human genes, `--nnz` detected genes per cell on average,
Zipf-like gene popularity, overdispersed integer counts: benchmarks/corpus_stream.py) is written
once under `--workdir`, and each measurement runs in a fresh process (its own peak resident
memory, VmHWM; the input read from page cache after the first):

- `corpus build`: wall time, peak memory, size on disk (default options: 256 MB shards);
- stream: CorpusStream over the training split, one pass, batches of 64 cells, no workers
  (cells/s, peak memory);
- tokenize: `celltron tokenize` of the training split to a `datasets` folder with the
  geneformer-v2 scheme on every core (cells/s as it reports them, peak memory);
- annbatch (when `--annbatch-python` names a Python with annbatch installed, e.g. a 3.12 venv
  with `pip install "annbatch[zarrs]"`): `DatasetCollection(DIR).add_adatas([h5ad],
  shuffle=True)`, its recommended preparation (wall time, peak memory, size on disk).

Prints one markdown table and writes a log-log plot of build time and peak memory against cells.
Disk: the 1M-cell input is ~4 GB at 500 genes per cell; each corpus and annbatch store is
deleted once measured (`--keep` keeps them).
"""

from __future__ import annotations

import os
import sys

# benchmarks/ first on sys.path would shadow the standard library's `tokenize`
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENES = 20_000

PEAK = """
def peak_kb():
    # VmHWM: this process's peak resident memory since exec (ru_maxrss of a forked child can
    # report the parent's size at the fork instead)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
"""

BUILD = """
import json, sys, time
from pathlib import Path
from celltron.corpus import BuildOptions, build_corpus
start = time.perf_counter()
build_corpus([Path(sys.argv[1])], Path(sys.argv[2]), BuildOptions(progress=False), overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_kb": peak_kb()}))
"""

STREAM = """
import json, sys, time
from pathlib import Path
from torch.utils.data import DataLoader
from celltron.corpus import Corpus, CorpusStream
stream = CorpusStream(Corpus(Path(sys.argv[1])), split="train", infinite=False)  # one pass
cells, start = 0, time.perf_counter()
for batch in DataLoader(stream, batch_size=64, num_workers=0, collate_fn=list):
    cells += len(batch)
seconds = time.perf_counter() - start
print(json.dumps({"cells": cells, "seconds": seconds, "peak_kb": peak_kb()}))
"""

TOKENIZE = """
import json, sys
from pathlib import Path
from celltron.tokenizers.dataset import tokenize_to_dataset
summary = tokenize_to_dataset(Path(sys.argv[1]), "geneformer-v2", Path(sys.argv[2]), progress=False)
print(json.dumps({"cells": summary["cells"], "seconds": summary["seconds"], "threads": summary["threads"],
                  "peak_kb": peak_kb()}))
"""

ANNBATCH = """
import json, sys, time
import annbatch
start = time.perf_counter()
annbatch.DatasetCollection(sys.argv[2]).add_adatas([sys.argv[1]], shuffle=True)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_kb": peak_kb(),
                  "version": annbatch.__version__}))
"""


def run_child(python: str, code: str, *args) -> dict:
    """Run `code` in a fresh `python` (the repository on its path) and read the JSON it prints last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([python, "-c", PEAK + code, *map(str, args)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{python} failed on {args}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def ensure_input(workdir: Path, cells: int, nnz: int) -> Path:
    from benchmarks.corpus_stream import ensure_synthetic

    path, note = ensure_synthetic(workdir, cells, GENES, nnz)
    print(f"input {path.name}: {note}", flush=True)
    return path


def best_of(repeats: int, run, before=None) -> dict:
    """The fastest of `repeats` runs (`before()` first, each time), with the largest peak memory
    of them (memory barely varies; time does, with the page cache and the disk)."""
    results = []
    for _ in range(repeats):
        if before:
            before()
        results.append(run())
    best = min(results, key=lambda r: r["seconds"])
    return {**best, "peak_kb": max(r["peak_kb"] for r in results), "runs": [r["seconds"] for r in results]}


def measure(source: Path, workdir: Path, annbatch_python: str | None, keep: bool, repeats: int = 1) -> dict:
    corpus, tokens, store = (workdir / f"{source.stem}.{kind}" for kind in ("corpus", "tokens", "annbatch"))
    row = {"build": best_of(repeats, lambda: run_child(sys.executable, BUILD, source, corpus))}
    row["build"]["disk_gb"] = disk_gb(corpus)
    row["stream"] = best_of(repeats, lambda: run_child(sys.executable, STREAM, corpus))
    row["tokenize"] = run_child(sys.executable, TOKENIZE, corpus, tokens)
    shutil.rmtree(tokens, ignore_errors=True)
    if annbatch_python:
        remove = lambda: shutil.rmtree(store, ignore_errors=True)  # noqa: E731
        row["annbatch"] = best_of(repeats, lambda: run_child(annbatch_python, ANNBATCH, source, store), before=remove)
        row["annbatch"]["disk_gb"] = disk_gb(store)
        if not keep:
            shutil.rmtree(store, ignore_errors=True)
    if not keep:
        shutil.rmtree(corpus, ignore_errors=True)
    return row


def table(rows: dict[int, dict]) -> str:
    lines = [
        "| cells | build s | build peak GB | corpus GB | annbatch prep s | annbatch peak GB | annbatch GB "
        "| build / annbatch time | stream cells/s | stream peak GB | tokenize cells/s (threads) | tokenize peak GB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cells, r in rows.items():
        b, s, t, a = r["build"], r["stream"], r["tokenize"], r.get("annbatch")
        theirs = (
            f"{a['seconds']:.1f} | {a['peak_kb'] / 1e6:.2f} | {a['disk_gb']:.2f} | {b['seconds'] / a['seconds']:.2f}x"
            if a
            else "n/a | n/a | n/a | n/a"
        )
        lines.append(
            f"| {cells:,} | {b['seconds']:.1f} | {b['peak_kb'] / 1e6:.2f} | {b['disk_gb']:.2f} | {theirs} "
            f"| {s['cells'] / s['seconds']:,.0f} | {s['peak_kb'] / 1e6:.2f} "
            f"| {t['cells'] / t['seconds']:,.0f} ({t['threads']}) | {t['peak_kb'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(rows)
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    series = [("celltron corpus build", "build")] + (
        [("annbatch preparation", "annbatch")] if "annbatch" in rows[cells[0]] else []
    )
    for label, key in series:
        time_axis.plot(cells, [rows[c][key]["seconds"] for c in cells], "o-", label=label)
        memory_axis.plot(cells, [rows[c][key]["peak_kb"] / 1e6 for c in cells], "o-", label=label)
    memory_axis.plot(cells, [rows[c]["stream"]["peak_kb"] / 1e6 for c in cells], "s--", label="celltron stream")
    ideal = [
        rows[cells[-1]]["build"]["seconds"] * c / cells[-1] for c in cells
    ]  # through the largest: start-up dominates small builds
    time_axis.plot(cells, ideal, ":", color="grey", label="linear in cells")
    for axis, name in ((time_axis, "wall time (s)"), (memory_axis, "peak memory (GB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("cells")
        axis.set_ylabel(name)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--nnz", type=int, default=500, help="detected genes per cell, on average")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench" / "corpus_scaling")
    parser.add_argument("--annbatch-python", help="a Python with annbatch installed (its own environment)")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "scaling_corpus.png")
    parser.add_argument("--keep", action="store_true", help="keep each corpus and annbatch store")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs for build, stream and annbatch")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for cells in args.cells:
        source = ensure_input(args.workdir, cells, args.nnz)
        start = time.perf_counter()
        rows[cells] = measure(source, args.workdir, args.annbatch_python, args.keep, args.repeats)
        print(f"{cells:,} cells measured in {time.perf_counter() - start:.0f} s", flush=True)
    print(
        f"\n{GENES:,} genes, {args.nnz} detected genes per cell on average; fresh process per measurement; best of {args.repeats}"
    )
    print(table(rows))
    print("\n" + json.dumps(rows))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
