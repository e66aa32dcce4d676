"""Package attributes imported on first use, so ``import compress`` (and its sub-packages) stay light."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, tuple[str, str]]):
    """A module ``__getattr__`` for ``package``: name -> (module, attribute), imported and cached on first use."""

    def __getattr__(name: str):
        if name in exports:
            module, attr = exports[name]
            value = getattr(importlib.import_module(module), attr)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
