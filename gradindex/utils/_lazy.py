"""Packages whose public names load with their first use (PEP 562), so that importing gradindex, or a light part of
it, never imports torch or faiss: the command line's ``--help``, ``info`` and ``verify`` start in a fraction of torch's
own import time.

A package lists what loads lazily as ordinary imports under ``if TYPE_CHECKING:`` (so that type checkers, the docs and
the layout test see them) and ends with ``__getattr__, __dir__ = lazy_exports(__name__)``::

    if TYPE_CHECKING:  # loaded on first use (lazy_exports)
        from gradindex.methods._trak import TrakFeaturizer
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["lazy_exports"]


def _deferred_imports(path: Path) -> dict[str, str]:
    """``name -> module`` of every ``from module import name`` under the top-level ``if TYPE_CHECKING:`` of a file."""
    found: dict[str, str] = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
                    found.update({alias.asname or alias.name: statement.module for alias in statement.names})
    return found


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of a package whose public names load on first use.

    Args:
        package: the package's ``__name__``. Each name of its ``__all__`` that its ``if TYPE_CHECKING:`` block imports
            (``from module import name``) is imported from that module the first time it is read (``package.name``
            or ``from package import name``), then kept on the package. Its submodules load the same way
            (``gradindex.store``).

    Returns:
        ``(__getattr__, __dir__)``, to assign at the package's top level.
    """
    owner = sys.modules[package]
    public = set(getattr(owner, "__all__", ()))
    where = {name: module for name, module in _deferred_imports(Path(owner.__file__)).items() if name in public}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            if name.startswith("__"):
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            try:  # a submodule or subpackage: gradindex.store, gradindex.methods
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            value = getattr(importlib.import_module(module), name)
        setattr(owner, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(owner)) | set(where))

    return __getattr__, __dir__
