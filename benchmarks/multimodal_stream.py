"""Streaming with several modalities: does multi-modal support slow the RNA-only path, and what do
the other modalities cost?

1. RNA-only corpus (the PBMC 3k set bundled with the package), `CorpusStream` in one process:
   this checkout against the code before multi-modal corpora landed (`--baseline-ref`, extracted
   with `git archive` into the work folder), alternating rounds in fresh processes so that both
   see the same machine; the same corpus for both (RNA shards did not change).
2. TEA-seq (1,262 cells, RNA + 46 proteins) and SNARE-seq (10,309 cells, RNA + 25,734 peaks in
   5 kb bins) built as multi-modal corpora from the shared data: cells/s of the stream with every
   modality, against an RNA-only corpus of the same RNA.

    python -m benchmarks.multimodal_stream [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE_MULTIMODAL = "b792e94"  # the last commit before multi-modal corpora (issue 18)
TIMER = """
import sys, time
from celltron.corpus.stream import CorpusStream
stream = CorpusStream(sys.argv[1], infinite=True, block_size=1024, buffer_size=8192, rank=0, world_size=1, prefetch=False)
cells = iter(stream)
for _ in range(2048):
    next(cells)  # start-up: first window
n, start = 0, time.perf_counter()
while time.perf_counter() - start < float(sys.argv[2]):
    for _ in range(1024):
        next(cells)
    n += 1024
print(n / (time.perf_counter() - start))
"""


def baseline_code(ref: str, workdir: Path) -> Path:
    """The package as it was at `ref`, extracted once (its `celltron/` only)."""
    target = workdir / f"celltron-{ref}"
    if not (target / "celltron").exists():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "celltron"], check=True, capture_output=True).stdout
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return target


def cells_per_second(code: Path, corpus: Path, seconds: float) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TIMER, str(corpus), str(seconds)], check=True, capture_output=True, text=True, env=env
    )
    return float(out.stdout.strip().splitlines()[-1])


def build(out: Path, inputs: list[Path] | None = None, modalities: dict | None = None, **options) -> Path:
    from celltron.corpus.build import build_corpus
    from celltron.corpus.build_multimodal import build_multimodal_corpus
    from celltron.corpus.options import BuildOptions

    if not out.exists():
        settings = BuildOptions(progress=False, val_fraction=0.0, **options)
        if modalities:
            build_multimodal_corpus(None, out, settings, modalities=modalities)
        else:
            build_corpus(inputs, out, settings)
    return out


def main() -> None:
    from benchmarks._data import add_shared_data_option, shared_paths
    from celltron.corpus.demo import demo_h5ad

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/celltron-bench/multimodal"))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-ref", default=BEFORE_MULTIMODAL)
    add_shared_data_option(parser)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")

    pbmc = build(args.workdir / "pbmc3k", [demo_h5ad()])
    before = baseline_code(args.baseline_ref, args.workdir)
    rounds = {"this checkout": [], f"before multi-modal ({args.baseline_ref})": []}
    for _ in range(args.rounds):
        rounds["this checkout"].append(cells_per_second(REPO, pbmc, args.seconds))
        rounds[f"before multi-modal ({args.baseline_ref})"].append(cells_per_second(before, pbmc, args.seconds))
    print("\n### RNA-only corpus (PBMC 3k), CorpusStream in one process, best of rounds\n")
    print("| code | cells/s (best) | rounds |\n|---|---|---|")
    for name, values in rounds.items():
        print(f"| {name} | {max(values):,.0f} | {', '.join(f'{v:,.0f}' for v in values)} |")
    ratio = max(rounds["this checkout"]) / max(rounds[f"before multi-modal ({args.baseline_ref})"])
    print(f"\nthis checkout / before: {ratio:.2f}")

    tea_rna, tea_adt, snare_rna, snare_atac = shared_paths(
        args.shared_data,
        "multiomics/teaseq_pbmc_1262cells_rna.h5ad",
        "multiomics/teaseq_pbmc_1262cells_adt.h5ad",
        "multiomics/snareseq_mouse_cortex_10309cells_rna.h5ad",
        "multiomics/snareseq_mouse_cortex_10309cells_atac.h5ad",
    )
    pairs = {
        "TEA-seq RNA + proteins": (tea_rna, {"rna": tea_rna, "adt": tea_adt}, {}),
        "SNARE-seq RNA + ATAC": (snare_rna, {"rna": snare_rna, "atac": snare_atac}, {"genome": "mm10"}),
    }
    print("\n### Multi-modal corpora: the stream with every modality vs the same RNA alone (one process, best of rounds)\n")
    print("| data | build s | RNA only cells/s | every modality cells/s | ratio |\n|---|---|---|---|---|")
    for name, (rna, files, options) in pairs.items():
        key = name.split()[0].lower().replace("-", "")
        start = time.perf_counter()
        multi = build(args.workdir / f"{key}_multi", modalities=files, **options)
        seconds = time.perf_counter() - start
        alone = build(args.workdir / f"{key}_rna", [rna])
        rna_rate = max(cells_per_second(REPO, alone, args.seconds) for _ in range(args.rounds))
        multi_rate = max(cells_per_second(REPO, multi, args.seconds) for _ in range(args.rounds))
        print(f"| {name} | {seconds:.1f} | {rna_rate:,.0f} | {multi_rate:,.0f} | {multi_rate / rna_rate:.2f} |")
    print(
        "\nbuild s: 0 when the corpus was already in --workdir; " + json.dumps({"seconds": args.seconds, "rounds": args.rounds})
    )


if __name__ == "__main__":
    main()
