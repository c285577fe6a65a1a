"""Lazy re-exports for a package's ``__init__``: its public names, imported on first use.

A package such as :mod:`cogen.coordinator` re-exports a few classes whose modules import torch and
hivemind (seconds); importing the package for its command's ``--help`` must not pay for them::

    if TYPE_CHECKING:  # what type checkers and readers see
        from cogen.coordinator.service import Coordinator
    __getattr__ = lazy_exports(__name__, {"Coordinator": "cogen.coordinator.service"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``exports[name]`` (a module) for ``name``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # imported once
        return value

    return __getattr__
