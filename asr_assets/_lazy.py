"""Module attributes imported on first access (PEP 562), so light entry points stay light."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``name`` in ``table`` is imported from the
    submodule ``table[name]`` on first access and cached in the module's globals.

    Raises (from the returned function):
        AttributeError: ``name`` is neither in ``table`` nor defined in the module.
    """

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
