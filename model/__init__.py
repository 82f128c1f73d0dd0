"""The CM3 decoder, the causal-masked objective, training and generation.

``from cm3.model import CM3, CM3Config`` works without importing torch until one is used.
"""

from __future__ import annotations

_LAZY = {"CM3": "cm3.model.decoder", "KVCache": "cm3.model.decoder", "CM3Config": "cm3.model.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cm3.model' has no attribute {name!r}")
