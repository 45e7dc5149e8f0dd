"""Writing outputs whole, and never over what is not celltron's to replace.

A file or folder is written under a temporary name beside its destination and renamed into
place, so a reader, a crash or Ctrl-C never meets half of one. Every folder written through
`write_folder_atomically` carries a marker file (`.celltron-folder`); an existing folder is
replaced only when it holds that marker or the caller passes `overwrite` (the `--overwrite`
flag), and never, even then, when it is the current directory, the home directory, a mount
point, or a folder holding what the command reads (its checkpoint, model folder or run).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from celltron import __version__
from celltron.errors import OutputExistsError

FOLDER_MARKER = ".celltron-folder"
log = logging.getLogger(__name__)


def write_file_atomically(path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary sibling, then one rename puts it at `path`: the file is the
    previous one or the complete new one. The temporary name is unique to this process, so
    several processes (ranks) writing the same file never write into one another's, and keeps
    `path`'s suffix for writers that choose a format by it (savefig, write_h5ad)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    return path


def write_text_atomically(path, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomically(path, data: bytes) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomically(path, payload) -> Path:
    """`payload` as compact JSON, written whole."""
    return write_text_atomically(path, json.dumps(payload))


def write_h5ad_atomically(adata, path) -> Path:
    """An AnnData written whole to `path` (.h5ad)."""
    return write_file_atomically(path, adata.write_h5ad)


def holds_marker(folder) -> bool:
    """Whether `folder` was written by celltron's folder writer."""
    return (Path(folder) / FOLDER_MARKER).is_file()


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def never_replaced_reason(target: Path, protected: Iterable[tuple[str, Path]]) -> str | None:
    """Why the (resolved) `target` may never be replaced, even with --overwrite; None if it may."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd:
        return "is the current directory"
    if target in cwd.parents:
        return "holds the current directory"
    if target == home or target in home.parents:
        return "is your home directory or a folder above it"
    if os.path.ismount(target):
        return "is a filesystem mount point"
    sources = [(what, path, Path(path).resolve()) for what, path in protected]
    for what, path, source in sources:
        if target == source:
            return f"is {what} ({path}), which this command reads"
    for what, path, source in sources:
        if target in source.parents:
            return f"holds {what} ({path}), which this command reads"
    return None


def check_output_folder(
    out, *, overwrite: bool = False, protected: Iterable[tuple[str, object]] = (), flag: str = "--out", fix: str | None = None
) -> None:
    """Refuse, with an OutputExistsError naming the folder and the way out, to write a folder at
    `out` that would replace something celltron may not delete.

    Args:
        out: the folder to (re)write.
        overwrite: the user allows replacing a folder celltron did not write.
        protected: (description, path) of what the command reads (a checkpoint, the source
            model folder, the run directory): `out` may not be one of them nor hold one.
        flag: the option the user gave `out` with ('' when celltron chose it), for the messages.
        fix: what the user can do about a folder celltron did not write (default: pass
            --overwrite, or choose another `flag`).
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    named = f"{flag} {out}" if flag else str(out)
    why = never_replaced_reason(out.resolve(), [(what, Path(path)) for what, path in protected])
    if why:
        raise OutputExistsError(
            f"{named}: {why}; celltron never replaces it, even with --overwrite; choose another folder"
            + (f" for {flag}" if flag else "")
        )
    if overwrite or _is_empty_folder(out) or (out.is_dir() and not out.is_symlink() and holds_marker(out)):
        return
    kind = "is a file" if out.is_file() else "is a link" if out.is_symlink() else "exists"
    fix = fix or f"pass --overwrite to replace it, or choose another {flag or 'folder'}"
    raise OutputExistsError(
        f"{named}: {kind} and was not written by celltron (no {FOLDER_MARKER} marker), so it is left alone; {fix}"
    )


def _write_marker(folder: Path, written_by: str) -> None:
    written_at = datetime.now(UTC).isoformat(timespec="seconds")
    record = {"written_by": written_by, "celltron_version": __version__, "written_at": written_at}
    (folder / FOLDER_MARKER).write_text(json.dumps(record, indent=1) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _swap_in(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; a previous `out` is moved aside first and removed only once
    the new folder is in place (put back if the rename fails)."""
    if not out.exists() and not out.is_symlink():
        staging.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    aside.rmdir()  # a free name beside `out` on the same filesystem
    out.rename(aside)
    try:
        staging.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    _remove(aside)


def write_folder_atomically(
    out,
    fill: Callable[[Path], None],
    *,
    overwrite: bool = False,
    protected: Iterable[tuple[str, object]] = (),
    written_by: str = "celltron",
    flag: str = "--out",
) -> Path:
    """Let `fill` write a folder under a temporary name beside `out`, mark it as celltron's,
    then swap it in: `out` is either the previous folder or the complete new one.

    Args:
        out: the folder to write.
        fill: writes the folder's files into the directory it is given.
        overwrite: allow replacing an existing folder celltron did not write (--overwrite).
        protected: (description, path) of what the command reads; see `check_output_folder`.
        written_by: the command, recorded in the marker file.
        flag: the option naming `out`, for the messages.
    """
    out = Path(out)
    protected = list(protected)
    check_output_folder(out, overwrite=overwrite, protected=protected, flag=flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fill(staging)
        _write_marker(staging, written_by)
        # checked again: the folder may have appeared (or been changed) while `fill` ran
        check_output_folder(out, overwrite=overwrite, protected=protected, flag=flag)
        _swap_in(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


# Partial output directories: a build or tokenize run writes into `.NAME.partial-XXXXXXXX` beside
# its output and renames it into place; the one a killed run leaves is removed by the next run.


PARTIAL_OWNER = ".celltron-owner.json"  # inside a partial directory: the process writing it
STALE_UNOWNED_SECONDS = 30 * 60  # a partial directory without an owner record, untouched this long, is abandoned


def new_partial_dir(out: Path) -> Path:
    """A new hidden `.NAME.partial-XXXXXXXX` directory beside `out` to write the output into,
    recording the process that owns it. Partial directories of the same `out` that no running
    process owns (left by a killed run) are removed first (`remove_stale_partials`)."""
    remove_stale_partials(out)
    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    record = work / f"{PARTIAL_OWNER}.partial"
    record.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    record.rename(work / PARTIAL_OWNER)
    return work


def release_partial_dir(work: Path) -> None:
    """Remove the owner record, before the partial directory is renamed into the output."""
    (work / PARTIAL_OWNER).unlink(missing_ok=True)


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the partial directories of `out` (exactly `.NAME.partial-` + 8 hex digits, real
    directories, not links) that no running process owns; returns them."""
    pattern = re.compile(re.escape(f".{out.name}.partial-") + "[0-9a-f]{8}")
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in sorted(out.parent.iterdir()):
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        reason = _abandoned(path)
        if reason:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (%s)", path, reason)
            removed.append(path)
    return removed


def _abandoned(partial: Path) -> str | None:
    """Why `partial` is no longer in use, or None while it may be."""
    try:
        owner = json.loads((partial / PARTIAL_OWNER).read_text())
    except (OSError, ValueError):
        owner = None
    if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner["pid"] > 0:
        if owner.get("host") != socket.gethostname():
            return None  # its process runs on another machine (a shared filesystem): we cannot tell
        return None if _process_alive(owner["pid"]) else f"its process {owner['pid']} is not running"
    # Written by an older celltron, or killed before the record was written: judge by age.
    idle = time.time() - _newest_change(partial)
    return f"no owner record, untouched for {idle / 60:.0f} min" if idle > STALE_UNOWNED_SECONDS else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process: it exists
    return True


def _newest_change(directory: Path) -> float:
    newest = directory.lstat().st_mtime
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:  # removed while we look: the directory is in use
                return time.time()
    return newest
