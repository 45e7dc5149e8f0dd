"""celltron: pretraining and fine-tuning single-cell foundation models."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"


def _register_models() -> None:
    """`import celltron` makes transformers' AutoConfig / AutoModel load celltron folders: loading
    the model code registers it (see the end of model_zoo/registry.py)."""
    if "celltron.model_zoo" in sys.modules:
        # loaded, or being loaded (transformers' first import came from the model code): it registers at its end
        return
    importlib.import_module("celltron.model_zoo.registry")  # here, not at the top: the model code needs torch


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Registers celltron's model classes right after `transformers` itself is imported.

    Registering at `import celltron` would load torch and transformers (seconds) for every user of
    the corpus, the tokenizers and the CLI, none of which need them. Registration is only useful to
    someone who calls transformers, so it waits for `transformers` to be imported: this finder sees
    that import first, hands it to the normal finders, and wraps the loader so registration runs as
    soon as transformers' own module code has finished. It removes itself on first use.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the normal finders, now that this one is gone
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """The loader of `transformers`, plus registration once the module has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        # later reloads and resource look-ups see transformers' own loader, not this wrapper
        for target in (module, sys.modules.get(module.__name__)):  # transformers replaces itself by a lazy module
            if getattr(target, "__loader__", None) is self:
                target.__loader__ = self.loader
            spec = getattr(target, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self.loader
        try:
            _register_models()
        except Exception as error:  # a broken celltron model must not make `import transformers` fail for the user
            warnings.warn(
                f"celltron could not register its models with transformers' Auto classes: {type(error).__name__}: {error}",
                stacklevel=2,
            )


if "transformers" in sys.modules:
    _register_models()  # transformers is loaded already, so registering costs only celltron's model code
elif not any(type(finder).__name__ == "_RegisterAfterTransformers" for finder in sys.meta_path):  # once, even on reload
    sys.meta_path.insert(0, _RegisterAfterTransformers())
