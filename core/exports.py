"""Public names of a sub-package, imported from their modules on first use (PEP 562).

``from cm3.tokenizers import VQGAN`` then works without ``import cm3.tokenizers`` paying for torch: the command
line imports sub-packages at start-up and must stay light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """(``__getattr__``, ``__dir__``) for ``package`` whose public names are ``exports``: name -> the module (relative
    to ``package``) that defines it."""

    def getattr_(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def dir_() -> list:
        return sorted(exports)

    return getattr_, dir_
