"""Where the benchmarks find the project's shared reference data (the full data sets, kept outside
the repository; the tests use trimmed copies in tests/data): `--shared-data DIR`, else the
environment variable CELLTRON_SHARED_DATA, else the folder shared/data beside the repository."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ENV = "CELLTRON_SHARED_DATA"


def default_shared_data() -> Path:
    return Path(os.environ.get(ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")


def add_shared_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-data",
        type=Path,
        default=default_shared_data(),
        help=f"the project's shared data folder (default: ${ENV}, else shared/data beside the repository: %(default)s)",
    )


def shared_paths(root: Path, *relative: str) -> list[Path]:
    """The files under `root`, or exit saying which are missing and how to point at them."""
    paths = [root / name for name in relative]
    missing = [name for name, path in zip(relative, paths) if not path.exists()]
    if missing:
        folders = sorted({name.rsplit("/", 1)[0] + "/" for name in missing})
        raise SystemExit(
            f"missing in {root}: {', '.join(missing)}. Fetch the folder(s) {', '.join(folders)} of the project's "
            f"shared data and pass --shared-data DIR or set {ENV}=DIR."
        )
    return paths
