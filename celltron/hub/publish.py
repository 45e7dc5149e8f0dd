"""`celltron publish`: a model folder (or a pretraining checkpoint, exported first) made
Hub-ready with a model card, then uploaded to a Hugging Face Hub repository.

The upload goes through `huggingface_hub.HfApi`: the repository is created if needed, a
`--revision` branch is created if new, and a revision that already holds files is replaced
only with `force` (the new commit then holds exactly the published files). The token comes
from the environment (HF_TOKEN, or the variable `token_env` names) or the local
`hf auth login`; it is passed to the client and never printed, logged or written.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import celltron
from celltron.errors import ConfigError, OutputExistsError, UserError
from celltron.hub.model_card import MARKER, gather_facts, render_card
from celltron.inputs import MissingInputError
from celltron.io import check_output_folder, write_folder_atomically, write_text_atomically
from celltron.pretrain.run import export_checkpoint

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
CARD = "README.md"


class PublishError(UserError):
    """The Hub refused a step; the message names the repository and the fix."""


@dataclass
class PublishResult:
    """What publishing did (or, in a dry run, would do).

    folder: the Hub-ready folder. files: (path in the repository, bytes) of each file.
    card: the README.md text. card_kept: an existing hand-written README.md was kept.
    commit_url: the new commit (None in a dry run). evaluations: metrics files on the card.
    """

    folder: Path
    repo_id: str
    revision: str
    files: list
    card: str
    dry_run: bool
    card_kept: bool = False
    commit_url: str | None = None
    evaluations: list = field(default_factory=list)


def is_checkpoint(path: Path) -> bool:
    """A Lightning .ckpt file or a DeepSpeed checkpoint folder (its `latest` tag file)."""
    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / "latest").exists())


def run_dir_of(source: Path, run_dir=None) -> Path | None:
    """The pretraining run folder around a source: given, the checkpoint's grandparent
    (checkpoints/step=N.ckpt), or an export folder's parent when it holds the run's config.yaml."""
    if run_dir:
        return Path(run_dir)
    guess = source.parent.parent if is_checkpoint(source) else source.parent
    return guess if (guess / "config.yaml").exists() else None


def check_source(source: Path) -> None:
    if not source.exists():
        raise MissingInputError(
            f"{source}: no such folder or checkpoint; pass an exported model folder "
            "(config.json + model.safetensors) or a step=N.ckpt / DeepSpeed checkpoint"
        )
    if not is_checkpoint(source) and not (source / "config.json").exists():
        raise MissingInputError(
            f"{source}: neither a model folder (no config.json) nor a checkpoint; "
            "pass a `celltron export` folder, a run's export/ folder, or a checkpoint"
        )


def staging_folder(source: Path, run_dir: Path | None, out=None) -> Path:
    """Where the Hub-ready folder goes: the model folder itself (also when `out` names it), or
    `out` (for a checkpoint, default: `hub/` in the run folder)."""
    if out and not (Path(out).exists() and Path(out).resolve() == source.resolve() and not is_checkpoint(source)):
        return Path(out)
    if not is_checkpoint(source):
        return source
    base = run_dir or source.parent.parent
    return base / "hub"


def check_out_folder(source: Path, folder: Path, run: Path | None, out=None, overwrite: bool = False) -> None:
    """Refuse, before any export, copy or upload, a Hub-ready folder that would replace a folder
    celltron did not write (without `overwrite`), or the source, its run or the current directory."""
    if folder == source:  # the card goes into the model folder itself: nothing is replaced
        return
    check_output_folder(
        folder,
        overwrite=overwrite,
        protected=_read_by_publish(source, run),
        flag="--out" if out else "",
        fix=None if out else "pass --overwrite to replace it, or choose a folder with --out",
    )


def prepare_folder(
    source, out=None, run_dir=None, base_model=None, license="apache-2.0", metrics=(), repo_id=None, overwrite: bool = False
):
    """Make a Hub-ready folder with its model card; returns (folder, card text, card kept, evaluations).

    Args:
        source: exported model folder, or a checkpoint (exported first, into `out`).
        out: folder for a checkpoint's export (default `RUN/hub`); with a model folder, a copy
            is not made: the card is written into the folder itself unless `out` is given.
        run_dir: the pretraining run folder (default: found from the source).
        base_model: Hub id of the model this one was initialised from.
        license: licence id for the card.
        metrics: extra fine-tuning metrics.json files to report.
        repo_id: the Hub id, for the card's title and loading examples.
        overwrite: replace an existing `out` that celltron did not write (never the source,
            its run directory or the current directory).
    """
    source = Path(source)
    check_source(source)
    run = run_dir_of(source, run_dir)
    folder = staging_folder(source, run, out)
    check_out_folder(source, folder, run, out, overwrite)
    if is_checkpoint(source):
        export_checkpoint(source, folder, run, overwrite=overwrite)
    elif folder != source:
        _copy_folder(source, folder, run, overwrite)
    facts = gather_facts(folder, run, metrics, base_model, license, repo_id)
    card_path = folder / CARD
    if card_path.exists() and MARKER not in card_path.read_text(errors="replace"):
        # a card someone wrote by hand (or edited and unmarked) is theirs to keep
        return folder, card_path.read_text(errors="replace"), True, facts.evaluations
    card = render_card(facts)
    write_text_atomically(card_path, card)
    return folder, card, False, facts.evaluations


def _read_by_publish(source: Path, run: Path | None) -> list[tuple[str, Path]]:
    """What the Hub-ready folder may never replace nor hold."""
    return [("the model being published", source)] + ([("the run directory", run)] if run else [])


def _copy_folder(source: Path, out: Path, run: Path | None, overwrite: bool) -> None:
    write_folder_atomically(
        out,
        lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True),
        overwrite=overwrite,
        protected=_read_by_publish(source, run),
        written_by="celltron publish",
    )


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(path in the repository, size) of what upload_folder sends: hidden files and folders
    (caches, temporary files) left out."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def resolve_token(token_env: str = "HF_TOKEN") -> str:
    """The write token: the environment variable `token_env`, else the local login.

    Args:
        token_env: name of the environment variable holding the token.
    """
    value = os.environ.get(token_env, "").strip()
    if value:
        return value
    if token_env != "HF_TOKEN":
        raise ConfigError(
            f"--token-env {token_env}: that environment variable is empty or unset; export a Hugging Face "
            "write token in it, or leave --token-env out to use HF_TOKEN or `hf auth login`"
        )
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError(
            "no Hugging Face token: set HF_TOKEN to a write token (huggingface.co/settings/tokens) or run "
            "`hf auth login`; --dry-run needs none"
        )
    return token


def check_repo_id(repo_id: str, flag: str = "--repo-id") -> None:
    if not REPO_ID.match(repo_id or ""):
        raise ConfigError(f"{flag} {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.'), e.g. my-lab/geneformer-pbmc")


def remote_files(api, repo_id: str, revision: str) -> list[str] | None:
    """Files at `revision` of the repository, or None when that branch does not exist yet."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:
        return None


def hub_api(token: str):
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="celltron", library_version=celltron.__version__)


@contextmanager
def hub_step(repo_id: str, revision: str):
    """Turn the Hub's HTTP errors into a PublishError naming the repository and the likely fix."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as error:
        raise PublishError(
            f"{repo_id}@{revision}: the Hub refused ({_first_line(error)}); check that the token has "
            "write access to that namespace and that the id is right"
        ) from None


def open_target(api, repo_id: str, revision: str, *, private: bool = False, force: bool = False) -> bool:
    """Create the repository (and the branch `revision`) if missing; refuse a revision that
    already holds files unless `force`. Returns whether the upload must replace what the
    revision holds: files kept with `force`, or those a new branch starts with (main's).

    Args:
        api: an HfApi holding the token.
        repo_id: ORG/NAME.
        revision: the branch to publish to (created from main when new).
        private: create the repository private (an existing repository keeps its visibility).
        force: allow replacing the files the revision holds.
    """
    with hub_step(repo_id, revision):
        api.create_repo(repo_id, private=private, exist_ok=True)
        existing = remote_files(api, repo_id, revision)
        held = [f for f in existing or [] if f != ".gitattributes"]  # a new repository holds only .gitattributes
        if held and not force:
            raise OutputExistsError(
                f"{repo_id}@{revision} already holds {len(held)} files ({', '.join(held[:4])}"
                f"{', ...' if len(held) > 4 else ''}); pass --force to replace them, or publish to another --revision"
            )
        if existing is None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    return existing is None or bool(held)


def upload(api, folder: Path, repo_id: str, revision: str, replace: bool, commit_message: str) -> str:
    """Upload `folder` as one commit on `revision`; returns the commit URL.

    Args:
        api: an HfApi holding the token.
        folder: the Hub-ready folder.
        repo_id, revision: where to.
        replace: delete what the revision holds and the folder does not, so the commit holds
            exactly the published files (the client always keeps .gitattributes).
        commit_message: the commit's title.
    """
    with hub_step(repo_id, revision):
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=[".*", "**/.*"],
            delete_patterns="*" if replace else None,
        )
    return info.commit_url


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def publish(
    source,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    token_env: str = "HF_TOKEN",
    out=None,
    run_dir=None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    metrics=(),
    overwrite: bool = False,
) -> PublishResult:
    """Write the model card into a Hub-ready folder, then (unless `dry_run`) upload it.

    Args:
        source: exported model folder, or a Lightning checkpoint file / DeepSpeed checkpoint folder.
        repo_id: the Hub repository, ORG/NAME.
        private: create the repository private.
        revision: branch to publish to (default main).
        commit_message: the commit's title (default names the source).
        force: replace a revision that already holds files.
        dry_run: write the card, upload nothing, need no token.
        token_env: environment variable holding the token (default HF_TOKEN, then the local login).
        out, run_dir, base_model, license, metrics, overwrite: as `prepare_folder`.
    """
    check_repo_id(repo_id)
    source_path = Path(source)
    check_source(source_path)
    if base_model is not None:
        check_repo_id(base_model, "--base-model")
    run = run_dir_of(source_path, run_dir)
    check_out_folder(source_path, staging_folder(source_path, run, out), run, out, overwrite)
    revision = revision or "main"
    api = replace = None
    if not dry_run:
        # the token and the target are checked before any export or card: a refusal costs nothing
        api = hub_api(resolve_token(token_env))
        replace = open_target(api, repo_id, revision, private=private, force=force)
    folder, card, kept, evaluations = prepare_folder(source, out, run_dir, base_model, license, metrics, repo_id, overwrite)
    result = PublishResult(folder, repo_id, revision, folder_files(folder), card, dry_run, kept, evaluations=evaluations)
    if not dry_run:
        message = commit_message or f"Publish celltron model from {Path(source).name} with `celltron publish`"
        result.commit_url = upload(api, folder, repo_id, revision, replace, message)
    return result


def describe(result: PublishResult) -> str:
    """What the CLI prints: the target, the files and, in a dry run, the card."""
    total = sum(size for _, size in result.files)
    head = "dry run: nothing uploaded; would publish" if result.dry_run else "published"
    lines = [
        f"{head} {len(result.files)} files ({total / 1e6:.1f} MB) from {result.folder} to {result.repo_id} (revision {result.revision})"
    ]
    lines += [f"  {path}  ({size:,} bytes)" for path, size in result.files]
    lines.append(
        f"model card: {result.folder / CARD}" + (" (kept: written by hand, no celltron marker)" if result.card_kept else "")
    )
    lines += [f"  evaluation on the card: {p['folder']}/{p['file']} ({p['task']})" for p in result.evaluations]
    if result.commit_url:
        lines.append(f"commit: {result.commit_url}")
        on_main = result.revision == "main"
        hub_id = result.repo_id + ("" if on_main else f"@{result.revision}")
        lines.append(
            f'load with: celltron.model_zoo.registry.load_pretrained("{hub_id}")' + (f", or --model {hub_id}" if on_main else "")
        )
    if result.dry_run:
        lines += ["", result.card]
    return "\n".join(lines)
