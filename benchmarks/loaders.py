"""celltron's CorpusStream beside the single-cell training loaders people use, on the same cells.

    python -m benchmarks.loaders                      # 200k synthetic cells + PBMC, 5 s x best of 3 per row
    python -m benchmarks.loaders --quick              # 20k synthetic cells, 2 s x 1
    python -m benchmarks.loaders --envs DIR           # where the peers' environments are (made if missing)

Data: the synthetic 200k cells x 20k genes (~2k detected genes per cell; benchmarks/corpus_stream.py
writes it) and the five PBMC files concatenated (7,772 cells), both uncompressed .h5ad with an
`obs["src"]` row number. Each loader gets the same .h5ad and its own recommended preparation
(time and size on disk in the first table):

- celltron: `build_corpus` (lz4 shards; every cell in the training split, in input order);
- annbatch: `DatasetCollection(DIR).add_adatas([h5ad], shuffle=True)` (a preshuffled sharded zarr),
  in a Python 3.12 venv (annbatch needs >= 3.12), zarrs codec pipeline as it documents;
- scDataset: no preparation, the .h5ad in backed mode (`BlockShuffling`, `to_memory()` per fetch);
- bionemo-scdl: `SingleCellMemMapDataset(DIR, h5ad_path=...)` (memory-mapped CSR arrays);
- TileDB-SOMA ML: `tiledbsoma.io.from_h5ad` (a SOMA experiment), `ExperimentDataset`;
- SLAF: `SLAFConverter().convert` (Lance tables), `SLAFDataLoader(raw_mode=True)`.

Each peer is installed from the package registry into its own venv under --envs (created the first
time; a peer that does not install gets a row saying why). Every measurement runs in a fresh
process of that venv (benchmarks/loader_peers.py): --seconds of batches after the first one,
best of --repeats fresh iterators, store files read once beforehand (page cache). Every row also
reports how random its batches are, from the source rows it delivered: over windows of 64
delivered cells, the contiguous runs of source rows (64 = no two neighbours together) and the
distinct 1,024-cell source ranges touched (a uniformly random sample of 64 of 200k rows touches
~55; a loader that shuffles 8 contiguous 1,024-cell blocks touches at most 16). "Matched" rows run
celltron with a peer's shuffle pattern (its contiguous run length and the number of runs held in
memory), so the ratio compares equal shuffle quality.

The last table is what training consumes: cells/s of stream + tokenisation (+ masking and
padding, the pretraining data path) for each tokenizer scheme, one process and 2 workers, beside
SLAF's tokenised loader where it has the scheme.
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
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.corpus_stream import (  # noqa: E402
    PBMC_DIR,
    ensure_concatenation,
    ensure_synthetic,
    machine_lines,
    warm_page_cache,
)

DRIVER = Path(__file__).with_name("loader_peers.py")
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; an unpinned torch pulls CUDA


@dataclass
class Peer:
    name: str
    title: str
    python: str  # interpreter that makes its venv ("3.11": this one)
    packages: list[str]
    distributions: list[str]  # whose versions the table reports
    prepared: bool = True  # False: reads the .h5ad itself


PEERS = [
    Peer("annbatch", "annbatch", "3.12", ["annbatch[zarrs]", "anndata"], ["annbatch", "zarr", "zarrs", "anndata"]),
    Peer("scdataset", "scDataset", "3.11", [TORCH, "scdataset", "anndata"], ["scdataset", "anndata"], prepared=False),
    Peer("scdl", "bionemo-scdl", "3.11", [TORCH, "bionemo-scdl", "anndata"], ["bionemo-scdl"]),
    Peer("soma", "TileDB-SOMA ML", "3.11", [TORCH, "tiledbsoma", "tiledbsoma-ml", "anndata"], ["tiledbsoma", "tiledbsoma-ml"]),
    Peer("slaf", "SLAF", "3.11", [TORCH, "slafdb", "anndata", "psutil"], ["slafdb"]),
]


@dataclass
class Row:
    dataset: str
    loader: str
    setting: str
    settings: dict
    result: dict = field(default_factory=dict)
    why: str = ""  # why there is no figure


# ---------------------------------------------------------------- environments


def find_python(version: str) -> str | None:
    """A Python `version` that runs: on PATH, else one of pyenv's installed versions (a pyenv shim
    on PATH fails unless that version is selected, so each candidate is tried)."""
    if version == "3.11":
        return sys.executable
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}")] + sorted(
        str(p) for p in root.glob(f"versions/{version}.*/bin/python{version}")
    )
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def ensure_env(peer: Peer, envs: Path) -> tuple[str | None, str]:
    """The peer's venv Python (made and installed from the registry if missing), or None and why."""
    python = envs / peer.name / "bin" / "python"
    if python.exists():
        return str(python), ""
    base = find_python(peer.python)
    if base is None:
        return None, f"needs Python {peer.python}, not found on PATH"
    envs.mkdir(parents=True, exist_ok=True)
    partial = envs / f"{peer.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([base, "-m", "venv", str(partial)], check=True)
    pip = [str(partial / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch = [p for p in peer.packages if p == TORCH]
    for step in ([torch] if torch else []) + [[p for p in peer.packages if p != TORCH]]:
        done = subprocess.run(pip + step, capture_output=True, text=True)
        if done.returncode:
            return None, f"`pip install {' '.join(step)}` failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    # venvs hard-code their path in scripts; the python binary itself runs from anywhere
    partial.rename(envs / peer.name)
    return str(python), ""


def versions(python: str, distributions: list[str]) -> str:
    code = "import json,sys; from importlib import metadata as m; print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    out = subprocess.run([python, "-c", code, *distributions], capture_output=True, text=True)
    found = json.loads(out.stdout) if out.returncode == 0 else {}
    return ", ".join(f"{k} {v}" for k, v in found.items()) + f" (Python {python_version(python)})"


def python_version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True
    ).stdout.strip()


# ---------------------------------------------------------------- running the driver


def run_driver(python: str, args: list[str], timeout: float) -> tuple[dict | None, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TQDM_DISABLE": "1"}
    try:
        done = subprocess.run([python, str(DRIVER), *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"no result within {timeout:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return None, f"failed (exit {done.returncode}): {tail[0][:200]}"
    return json.loads(lines[-1]), ""


def prepare(python: str, loader: str, h5ad: Path, store: Path, timeout: float) -> tuple[dict | None, str]:
    return run_driver(python, ["prepare", loader, str(h5ad), str(store)], timeout)


def measure(python: str, row: Row, h5ad: Path, store: Path, seconds: float, repeats: int) -> None:
    settings = {**row.settings, "seconds": seconds, "repeats": repeats}
    timeout = 240 + repeats * (seconds + 120)
    result, why = run_driver(python, ["measure", row.loader, str(h5ad), str(store), json.dumps(settings)], timeout)
    row.result, row.why = result or {}, why


# ---------------------------------------------------------------- what runs


def loader_rows(dataset: str, batch: int) -> list[Row]:
    """Every loader with its documented settings, and celltron with each peer's shuffle pattern."""
    cell = lambda setting, block, buffer, workers=0, b=batch: Row(  # noqa: E731
        dataset, "celltron", setting, {"block": block, "buffer": buffer, "workers": workers, "batch_size": b}
    )
    per_cell = cell("defaults, single cells + collate_cells (before batched streams)", 1024, 8192)
    per_cell.settings["per_cell"] = True
    rows = [
        cell("defaults (1,024-cell blocks x 8)", 1024, 8192),
        per_cell,
        cell("defaults, 1 worker", 1024, 8192, 1),
        cell("defaults, 2 workers", 1024, 8192, 2),
        Row(dataset, "annbatch", "defaults (512-cell chunks x 32)", {"batch_size": batch}),
        cell("matched to annbatch's defaults (512 x 32)", 512, 512 * 32),
        Row(
            dataset,
            "annbatch",
            "matched to celltron's defaults (1,024 x 8)",
            {"batch_size": batch, "chunk_size": 1024, "preload_nchunks": 8},
        ),
        Row(dataset, "scdataset", "defaults (BlockShuffling 8-cell blocks, fetch_factor 16)", {"batch_size": batch}),
        Row(dataset, "scdataset", "defaults, 2 workers", {"batch_size": batch, "workers": 2}),
        cell("matched to scDataset's defaults (8 x 128)", 8, 1024),
        Row(dataset, "scdl", "defaults (random rows, DataLoader shuffle=True)", {"batch_size": batch}),
        Row(dataset, "scdl", "defaults, 2 workers", {"batch_size": batch, "workers": 2}),
        Row(dataset, "soma", "defaults (64-cell chunks, io_batch_size 65,536)", {"batch_size": batch}),
        cell("matched to SOMA's defaults (64 x 1,024)", 64, 65536),
        Row(dataset, "slaf", "defaults (mixture of scanners)", {"batch_size": batch}),
        # built for large batches: annbatch's own benchmarks use 4,096
        Row(dataset, "annbatch", "defaults, batch 4,096", {"batch_size": 4096}),
        cell("matched to annbatch's defaults, batch 4,096", 512, 512 * 32, 0, 4096),
        cell("defaults, batch 4,096", 1024, 8192, 0, 4096),
    ]
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| dataset | loader | setting | batch | cells/s (best) | all repeats | runs / 64 | 1k ranges / 64 | output |",
        "|---|---|---|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        if r.why:
            lines.append(f"| {r.dataset} | {r.loader} | {r.setting} | {r.settings['batch_size']} | — | {r.why} | | | |")
            continue
        rates = r.result["rates"]
        lines.append(
            f"| {r.dataset} | {r.loader} | {r.setting} | {r.settings['batch_size']} | {max(rates):,.0f} | "
            f"{' / '.join(f'{x:,.0f}' for x in rates)} | {r.result['runs64']:.1f} | {r.result['bins64']:.1f} | {r.result['output']} |"
        )
    return "\n".join(lines)


def ratios(rows: list[Row]) -> str:
    """celltron / peer at equal shuffle pattern and with each side's defaults."""
    best = {(r.dataset, r.loader, r.setting): max(r.result["rates"]) for r in rows if r.result}
    pairs = [
        (
            "celltron defaults / annbatch defaults",
            "celltron",
            "defaults (1,024-cell blocks x 8)",
            "annbatch",
            "defaults (512-cell chunks x 32)",
        ),
        (
            "celltron / annbatch, both 512 x 32",
            "celltron",
            "matched to annbatch's defaults (512 x 32)",
            "annbatch",
            "defaults (512-cell chunks x 32)",
        ),
        (
            "celltron / annbatch, both 1,024 x 8",
            "celltron",
            "defaults (1,024-cell blocks x 8)",
            "annbatch",
            "matched to celltron's defaults (1,024 x 8)",
        ),
        (
            "celltron / annbatch, both 512 x 32, batch 4,096",
            "celltron",
            "matched to annbatch's defaults, batch 4,096",
            "annbatch",
            "defaults, batch 4,096",
        ),
        (
            "celltron defaults / scDataset defaults",
            "celltron",
            "defaults (1,024-cell blocks x 8)",
            "scdataset",
            "defaults (BlockShuffling 8-cell blocks, fetch_factor 16)",
        ),
        (
            "celltron / scDataset, both 8 x 128",
            "celltron",
            "matched to scDataset's defaults (8 x 128)",
            "scdataset",
            "defaults (BlockShuffling 8-cell blocks, fetch_factor 16)",
        ),
        ("celltron 2 workers / scDataset 2 workers", "celltron", "defaults, 2 workers", "scdataset", "defaults, 2 workers"),
        (
            "celltron defaults / bionemo-scdl",
            "celltron",
            "defaults (1,024-cell blocks x 8)",
            "scdl",
            "defaults (random rows, DataLoader shuffle=True)",
        ),
        ("celltron 2 workers / bionemo-scdl 2 workers", "celltron", "defaults, 2 workers", "scdl", "defaults, 2 workers"),
        (
            "celltron / SOMA, both 64 x 1,024",
            "celltron",
            "matched to SOMA's defaults (64 x 1,024)",
            "soma",
            "defaults (64-cell chunks, io_batch_size 65,536)",
        ),
        (
            "celltron defaults / SLAF defaults",
            "celltron",
            "defaults (1,024-cell blocks x 8)",
            "slaf",
            "defaults (mixture of scanners)",
        ),
    ]
    lines = ["| dataset | comparison | ratio |", "|---|---|---:|"]
    for dataset in dict.fromkeys(r.dataset for r in rows):
        for name, a_loader, a_setting, b_loader, b_setting in pairs:
            a, b = best.get((dataset, a_loader, a_setting)), best.get((dataset, b_loader, b_setting))
            lines.append(f"| {dataset} | {name} | {a / b:.2f}x |" if a and b else f"| {dataset} | {name} | — |")
    return "\n".join(lines)


# ---------------------------------------------------------------- tokenised stream


def tokenised_rows(corpus: Path, seconds: float, repeats: int) -> list[str]:
    """The pretraining data path (stream -> tokenizer -> masking -> padded batches of 64) per scheme."""
    from benchmarks.loader_peers import measure as time_batches
    from celltron.corpus import Corpus
    from celltron.pretrain.config import DataSection
    from celltron.pretrain.data import PretrainDataModule, corpus_tokenizer

    lines = []
    store = Corpus(str(corpus))
    for family, scheme, max_len in (
        ("geneformer", "geneformer-v2", 2048),
        ("scgpt", "scgpt", 1200),
        ("genecompass", "ortholog", 2048),
    ):
        tokenizer = corpus_tokenizer(store, scheme, max_len, seed=0)
        for workers in (0, 2):
            section = DataSection(batch_size=64, round_cells=512, num_workers=workers, block_size=1024, buffer_size=8192)

            def make(section=section, tokenizer=tokenizer, family=family):
                module = PretrainDataModule(store, family, tokenizer, section, seed=0)
                for batch in module.train_dataloader():
                    yield None, range(int(batch["n_cells"]))

            result = time_batches(make, seconds, repeats)
            lines.append(f"| celltron {scheme}, max_len {max_len}, {workers} workers | {max(result['rates']):,.0f} |")
    return lines


# ---------------------------------------------------------------- main


def datasets(args) -> list[tuple[str, Path]]:
    args.workdir.mkdir(parents=True, exist_ok=True)
    synthetic, _ = ensure_synthetic(args.workdir, args.cells, 20_000, 2_000)
    found = [(f"synthetic {args.cells // 1000}k", synthetic)]
    pbmc = sorted(PBMC_DIR.glob("*.h5ad"))
    if pbmc and not args.skip_pbmc:
        found.append(("PBMC 5 files", ensure_concatenation(pbmc, args.workdir / "pbmc5.h5ad")[0]))
    return found


def run(args) -> None:
    print("\n".join(machine_lines()))
    pythons, why_not = {"celltron": sys.executable}, {}
    for peer in PEERS:
        if args.only and peer.name not in args.only:
            why_not[peer.name] = "not asked for (--only)"
            continue
        python, why = ensure_env(peer, args.envs)
        if python:
            pythons[peer.name] = python
            print(f"{peer.title}: {versions(python, peer.distributions)}")
        else:
            why_not[peer.name] = why
            print(f"{peer.title}: {why}")
    prep_lines = ["| dataset | loader | preparation s | size on disk MiB |", "|---|---|---:|---:|"]
    rows: list[Row] = []
    tokenised: list[str] = []
    for dataset, h5ad in datasets(args):
        print(f"\n{dataset}: {h5ad} ({h5ad.stat().st_size / 2**20:,.0f} MiB)", flush=True)
        stores = {}
        for loader in ["celltron", *(p.name for p in PEERS)]:
            peer = next((p for p in PEERS if p.name == loader), None)
            if loader not in pythons:
                prep_lines.append(f"| {dataset} | {loader} | {why_not[loader]} | |")
                continue
            store = args.workdir / f"{h5ad.stem}.{loader}"
            if peer is not None and not peer.prepared:
                stores[loader] = h5ad
                prep_lines.append(f"| {dataset} | {loader} | none (reads the .h5ad) | {h5ad.stat().st_size / 2**20:,.0f} |")
                continue
            done, why = prepare(pythons[loader], loader, h5ad, store, args.prepare_timeout)
            if done is None:
                why_not[loader] = f"preparation {why}"
                prep_lines.append(f"| {dataset} | {loader} | {why} | |")
                shutil.rmtree(store, ignore_errors=True)
                continue
            stores[loader] = store
            prep_lines.append(f"| {dataset} | {loader} | {done['seconds']:.1f} | {done['bytes'] / 2**20:,.0f} |")
            print(prep_lines[-1], flush=True)
        for row in loader_rows(dataset, 64):
            if args.only and row.loader not in args.only and row.loader != "celltron":
                continue
            if row.loader not in stores:
                row.why = why_not.get(row.loader, "no store")
            else:
                warm_page_cache([stores[row.loader]])
                measure(pythons[row.loader], row, h5ad, stores[row.loader], args.seconds, args.repeats)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        if not args.skip_tokenised and dataset.startswith("synthetic") and "celltron" in stores:
            tokenised = tokenised_rows(stores["celltron"], args.seconds, args.repeats)
            for scheme in ("geneformer", "scgpt"):  # SLAF's own tokenised loader, where it ran
                if "slaf" in stores:
                    row = Row(dataset, "slaf", f"tokenised {scheme}", {"batch_size": 64, "tokenizer": scheme, "max_genes": 2048})
                    measure(pythons["slaf"], row, h5ad, stores["slaf"], args.seconds, args.repeats)
                    rate = f"{max(row.result['rates']):,.0f}" if row.result else row.why
                    tokenised.append(f"| SLAF tokenizer_type={scheme}, max_genes 2048 (token ids, no masking) | {rate} |")
            for line in tokenised:
                print(line, flush=True)
        if not args.keep:
            for loader, store in stores.items():
                if store != h5ad and loader != "celltron":
                    shutil.rmtree(store, ignore_errors=True)
    print("\n## Preparation\n\n" + "\n".join(prep_lines))
    print("\n## Batches of raw counts\n\n" + table(rows))
    print("\n## Ratios (best of repeats)\n\n" + ratios(rows))
    if tokenised:
        print("\n## Stream + tokenisation (pretraining data path, batches of 64)\n\n| path | cells/s |\n|---|---:|")
        print("\n".join(tokenised))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/loaders"), help="data and stores")
    parser.add_argument("--envs", type=Path, default=Path("runs/bench/loaders/envs"), help="the peers' venvs")
    parser.add_argument("--cells", type=int, default=200_000, help="synthetic cells (default 200000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per repeat (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh iterators per row, best reported (default 3)")
    parser.add_argument("--prepare-timeout", type=float, default=1800.0, help="seconds a preparation may take")
    parser.add_argument("--only", nargs="*", help="peers to run (celltron always runs)")
    parser.add_argument("--keep", action="store_true", help="keep the peers' stores")
    parser.add_argument("--skip-pbmc", action="store_true")
    parser.add_argument("--skip-tokenised", action="store_true")
    parser.add_argument("--quick", action="store_true", help="20k synthetic cells, 2 s x 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.seconds, args.repeats = 20_000, 2.0, 1
    return args


if __name__ == "__main__":
    run(parse_args())
