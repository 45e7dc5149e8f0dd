"""Reading reference pickles without executing arbitrary code.

Upstream projects (Geneformer) ship their dictionaries as pickles. A pickle can run any code on
load, so we only ever read them through an unpickler that resolves the handful of globals that
plain dictionaries of numpy scalars need, and refuses everything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

_ALLOWED_GLOBALS = {
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a pickle: only plain dictionaries "
                "of strings and numbers are accepted"
            )
        return super().find_class(module, name)


def load_restricted_pickle(path: str | Path) -> Any:
    """Load a pickle that may only contain builtin containers and numpy scalars.

    Args:
        path: the pickle file.
    """
    with open(path, "rb") as handle:
        return _RestrictedUnpickler(handle).load()
