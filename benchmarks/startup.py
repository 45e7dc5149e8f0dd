"""Start-up of the command line and of the corpus import path, against an earlier revision.

    python -m benchmarks.startup [--before REV] [--repeats 3]

For this tree and (with --before) a git revision checked out into a temporary worktree, run in
fresh interpreters with the same Python: `celltron --help`, `celltron corpus info` on the bundled
demo corpus, `import celltron.corpus` (counting the torch / transformers modules it loads), and a
one-step pretraining of the demo config (configs/pretrain/geneformer_debug.yaml) on the demo
corpus: start-up, corpus, tokenizer, model, the first step, then its checkpoint and export, so an
upper bound on the time to the first training step. Prints the best wall time of `--repeats`
runs and the ratio (n/a where a revision cannot run the command).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from celltron.cli import main; sys.exit(main(sys.argv[1:]))"


def _best_of(command: list[str], tree: Path, repeats: int) -> float:
    """The best wall time of `repeats` runs; NaN when the command fails in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if subprocess.run(command, cwd=tree, env=env, capture_output=True).returncode != 0:
            return float("nan")
        best = min(best, time.perf_counter() - start)
    return best


def _first_step(tree: Path, corpus: Path, repeats: int, work: Path) -> float:
    """A one-step pretraining of the demo config on the demo corpus, into a fresh folder each time."""
    config = tree / "configs" / "pretrain" / "geneformer_debug.yaml"
    command = [sys.executable, "-c", CLI, "pretrain", str(config), "--corpus", str(corpus), "--max-steps", "1"]
    quiet = ["--set", "logging.progress_bar=false"]
    return min(_best_of([*command, *quiet, "--out", str(work / f"run{i}")], tree, 1) for i in range(repeats))


def _heavy_modules(tree: Path) -> int:
    """Modules of torch and transformers that `import celltron.corpus` loads."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import celltron.corpus"], cwd=tree, env=env, capture_output=True, text=True
    )
    names = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    return sum(name.split(".")[0] in ("torch", "transformers") for name in names)


def measure(tree: Path, corpus: Path, repeats: int, work: Path) -> dict[str, float]:
    return {
        "celltron --help": _best_of([sys.executable, "-c", CLI, "--help"], tree, repeats),
        "celltron corpus info DEMO": _best_of([sys.executable, "-c", CLI, "corpus", "info", str(corpus)], tree, repeats),
        "torch/transformers modules loaded by `import celltron.corpus`": _heavy_modules(tree),
        "`celltron pretrain` demo config, 1 step (first step + checkpoint + export)": _first_step(tree, corpus, repeats, work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="git revision to compare with (checked out into a temporary worktree)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from celltron.corpus.demo import build_demo_corpus

    with tempfile.TemporaryDirectory() as work:
        corpus = build_demo_corpus(Path(work) / "corpus", progress=False).location
        trees = {"this tree": ROOT}
        if args.before:
            trees[args.before] = Path(work) / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[args.before]), args.before], cwd=ROOT, check=True)
        try:
            results = {
                name: measure(tree, Path(str(corpus)), args.repeats, Path(work) / name.replace(" ", "_"))
                for name, tree in trees.items()
            }
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees[args.before])], cwd=ROOT, check=False)
    names = list(trees)
    print(f"| measure | {' | '.join(names)} |" + (" ratio |" if len(names) == 2 else ""))
    print("|---|" + "---:|" * (len(names) + (len(names) == 2)))
    for row in results[names[0]]:
        values = [results[name][row] for name in names]
        cells = [("n/a" if v != v else f"{v:.2f} s") if isinstance(v, float) else str(v) for v in values]
        ratio = ""
        if len(names) == 2 and isinstance(values[0], float) and values[0] > 0 and values[1] == values[1]:
            ratio = f" {values[1] / values[0]:.1f}x |"
        print(f"| {row} | {' | '.join(cells)} |{ratio}")


if __name__ == "__main__":
    main()
