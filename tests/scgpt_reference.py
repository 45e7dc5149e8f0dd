"""scGPT's own binning and tokenisation functions, taken from the installed `scgpt` package.

Its modules import scanpy and torchtext, which do not install beside current torch; the
functions we compare against need only numpy and torch, so we compile just those function
definitions from the package's source files.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import torch


class _Logger:
    def warning(self, *args, **kwargs):
        pass

    info = warning


def _functions(relative: str, names: set[str]) -> dict:
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("needs the scgpt reference package: pip install --no-deps scgpt==0.2.4 (make test does)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    tree = ast.parse(path.read_text())
    keep = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    namespace = {
        "np": np,
        "torch": torch,
        "logger": _Logger(),
        "Union": object,
        "List": list,
        "Tuple": tuple,
        "Dict": dict,
        "Optional": object,
        "Vocab": dict,
    }
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def reference_binning():
    """scgpt.preprocess.binning (and its _digitize)."""
    return _functions("preprocess.py", {"_digitize", "binning"})["binning"]


def reference_tokenize_and_pad():
    """scgpt.tokenizer.gene_tokenizer.tokenize_and_pad_batch (with tokenize_batch, pad_batch)."""
    return _functions("tokenizer/gene_tokenizer.py", {"tokenize_batch", "pad_batch", "tokenize_and_pad_batch"})[
        "tokenize_and_pad_batch"
    ]


def reference_transformer_model():
    """scgpt.model.model.TransformerModel, loaded from the installed package's source without
    running `scgpt/__init__.py` (which needs scanpy and torchtext)."""
    import importlib.util
    import sys
    import types
    import warnings

    name = "_scgpt_reference_model"
    if f"{name}.model" not in sys.modules:
        spec = importlib.util.find_spec("scgpt")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("needs the scgpt reference package: pip install --no-deps scgpt==0.2.4 (make test does)")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
        module_spec = importlib.util.spec_from_file_location(f"{name}.model", folder / "model.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[f"{name}.model"] = module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash_attn is not installed"
            module_spec.loader.exec_module(module)
    return sys.modules[f"{name}.model"].TransformerModel
