"""The one way celltron opens a file a user gives it. The libraries underneath (h5py, anndata,
json, yaml, safetensors, torch) report a damaged file with a traceback of their internals; here
each format error becomes one line naming the file, what is wrong with it and what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

from celltron.errors import CheckpointError, ConfigError, InputError

RECOPY = "copy or download it again (was it written or transferred completely?)"
_HDF5_KINDS = {".h5ad": "AnnData .h5ad file", ".h5": "10x Genomics .h5 file"}
_TRUNCATED_HDF5 = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


class MissingInputError(InputError, FileNotFoundError):
    """A path the user gave does not exist (also a FileNotFoundError, as before)."""


def existing(path, what: str) -> Path:
    """`path` as a Path, or a one-line error naming it when nothing is there."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: no such {what}; check the path")
    return path


def first_line(error: BaseException) -> str:
    """The first line of a library's message, for the end of a one-line error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------- HDF5 / AnnData


def _hdf5_kind(path: Path) -> str:
    """'an AnnData .h5ad file', 'a 10x Genomics .h5 file' or 'an HDF5 file', by the suffix."""
    kind = _HDF5_KINDS.get(Path(path).suffix, "HDF5 file")
    return ("a " if kind[0].isdigit() else "an ") + kind


def hdf5_problem(path: Path, error: OSError) -> str:
    """One line saying why h5py could not open `path`, and what to do."""
    kind = _hdf5_kind(path)
    text = str(error)
    if "file signature not found" in text:
        return f"{path}: not an HDF5 file, so not {kind} (empty, or another format renamed); pass the file itself"
    truncated = _TRUNCATED_HDF5.search(text)
    if truncated:
        have, need = truncated.groups()
        return f"{path}: truncated, only {have} of its {need} bytes are there; {RECOPY}"
    return f"{path}: cannot be opened as {kind} ({first_line(error)}); {RECOPY}"


def open_h5(path, mode: str = "r", shown_as=None, require: tuple[str, ...] = ()):
    """h5py.File(path, mode); format errors name `shown_as` (default `path`), e.g. the user's
    file when `path` is a working copy of it. `require`: groups the file must hold (an HDF5
    file of another kind is named as such, not met with a KeyError)."""
    import h5py

    path = existing(path, _HDF5_KINDS.get(Path(path).suffix, "HDF5 file"))
    shown = Path(shown_as or path)
    try:
        handle = h5py.File(path, mode)
    except OSError as error:
        raise InputError(hdf5_problem(shown, error)) from error
    missing = [name for name in require if name not in handle]
    if missing:
        handle.close()
        groups = ", ".join(repr(name) for name in missing)
        raise InputError(
            f"{shown}: not {_hdf5_kind(shown)} (an HDF5 file without {groups}); pass a file written by anndata's write_h5ad"
        )
    return handle


def read_h5ad(path, backed=None):
    """anndata.read_h5ad, with a damaged file or an HDF5 file that is no AnnData named in one line."""
    import anndata

    path = existing(path, "AnnData .h5ad file")
    open_h5(path, require=("obs", "var")).close()  # not HDF5, truncated, not AnnData: said plainly first
    try:
        return anndata.read_h5ad(path, backed=backed)
    except (OSError, KeyError) as error:
        raise InputError(
            f"{path}: not a readable AnnData file ({first_line(error)}); write it with anndata's write_h5ad, or {RECOPY}"
        ) from error


# ---------------------------------------------------------------- JSON / YAML


def parse_json(text, source, what: str, fix: str = RECOPY):
    """json.loads(text) of the file `source` holding `what`; a damaged one is named in one line."""
    try:
        return json.loads(text)
    except UnicodeDecodeError as error:
        raise InputError(f"{source}: {what} is not text ({first_line(error)}); {fix}") from error
    except json.JSONDecodeError as error:
        ends_early = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated")
        problem = f"is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        problem = "is empty" if not text.strip() else "is truncated" if ends_early else problem
        raise InputError(f"{source}: {what} {problem}; {fix}") from error


def read_json(path, what: str, fix: str = RECOPY):
    """The JSON file `path` holding `what` (e.g. 'corpus manifest'), parsed."""
    path = existing(path, what)
    return parse_json(path.read_bytes(), path, what, fix)


def parse_yaml(text: str, source):
    """yaml.safe_load(text) of `source` (a file, or a --set item); a syntax error is a ConfigError
    naming the line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(error.problem or error.context or "").split())
        raise ConfigError(
            f"{source}: YAML syntax error{where}: {problem}; fix it there (quote values that hold ': ' or '#')"
        ) from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({first_line(error)})") from error


def read_yaml(path, what: str = "config file"):
    """The YAML file `path` parsed; missing or unparsable, a one-line error naming it."""
    path = existing(path, what)
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: {what} is not text ({first_line(error)}); pass the YAML file itself") from error
    return parse_yaml(text, path)


# ---------------------------------------------------------------- weights and checkpoints


MODEL_FIX = "copy or download the model folder again, or export it again (`celltron export`)"
RESUME_FIX = "delete it and resume from an earlier one (`--resume auto` picks the newest intact one)"


def open_safetensors(path, framework: str = "pt"):
    """safetensors' safe_open (a context manager); a truncated or damaged file is named in one
    line. Only the header is read: the tensors are memory-mapped."""
    from safetensors import SafetensorError, safe_open

    path = existing(path, "safetensors weights file")
    try:
        return safe_open(str(path), framework=framework)
    except SafetensorError as error:
        raise InputError(f"{path}: damaged or truncated safetensors weights ({first_line(error)}); {MODEL_FIX}") from error


def check_safetensors(path) -> None:
    """Refuse a truncated or damaged .safetensors file before a model is built from it."""
    with open_safetensors(path):
        pass


def load_safetensors(path) -> dict:
    """All tensors of a .safetensors file, checked first."""
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path))


def check_model_files(folder, what: str = "model") -> dict:
    """The parsed config.json of a model folder, each of its .safetensors files checked: a
    damaged folder is named here, not deep inside transformers."""
    folder = Path(folder)
    config = read_json(folder / "config.json", f"{what} config", MODEL_FIX)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    return config


def load_torch_checkpoint(path, fix: str = RESUME_FIX, **kwargs):
    """torch.load(path, map_location='cpu', **kwargs); a missing, truncated or foreign file is a
    CheckpointError naming it and `fix`."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except (
        RuntimeError,
        OSError,
        EOFError,
        KeyError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as error:  # torch's words for a bad file
        # torch's own words, to their first sentence (miniz adds a paragraph); a bare KeyError is the unpickler's
        detail = "not a PyTorch checkpoint" if isinstance(error, KeyError) else first_line(error).split(". ")[0]
        detail = "it ends early" if isinstance(error, EOFError) else detail
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({detail}); {fix}") from error


def read_truth(path, flag: str = "--truth"):
    """A TRRUST-style table (tab-separated TF, target[, mode, PubMed IDs], header optional) as
    unique directed (tf, target) pairs (a pandas DataFrame). Refused in one line naming the file
    (`flag`: the option that gave it) when missing, unparsable or without pairs. Read by the GRN
    tasks (truth tables) and by the GRN prior."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{flag} {path}: no such file")
    expected = "expected TRRUST format, one 'TF<TAB>target' pair per line"
    if not path.is_file():
        raise InputError(f"{flag} {path}: is a folder, not a table; {expected}")
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=str, comment="#")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise InputError(f"{flag} {path}: cannot be read as a tab-separated table ({reason}); {expected}") from None
    if table.shape[1] < 2:
        raise InputError(
            f"{flag} {path}: expected tab-separated columns TF, target (TRRUST format); got {table.shape[1]} column(s)"
        )
    table = table.iloc[:, :2].set_axis(["tf", "target"], axis=1).dropna()
    if len(table) and table.iloc[0].str.lower().tolist() in (["tf", "target"], ["tf", "gene"]):
        table = table.iloc[1:]
    if table.empty:
        raise InputError(f"{flag} {path}: holds no TF-target pairs; {expected}")
    return table.drop_duplicates().reset_index(drop=True)
