"""The one containment check: a name read from a store's metadata stays inside the store.

A store is shared data (a folder someone sent, an S3 prefix): every file name its metadata gives (an index
meta's ``file``, a transform record's ``file``, a shard record's keys) is checked here *before* anything is
read, written or deleted at it::

    path = contained_path(store.path, record["file"], what="transform trak_gram's file")

The name must be relative, without ``..`` or ``.`` parts or empty parts, without a NUL, and, where a plain
file name is expected (``plain=True`` or a ``pattern``), without a ``/``. On a local disk the joined path is
then resolved (symlinks followed) and must still lie inside the resolved root: a symlink pointing out of the
store is refused like a ``../``. At an fsspec URL there are no symlinks; the name checks still apply.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from gradindex.errors import CorruptStoreError
from gradindex.store._remote import is_remote

__all__ = ["REBUILD_STORE", "check_file_name", "contained_path", "is_inside"]

REBUILD_STORE = "rebuild the store with overwrite=True"


def _problem(name: Any, plain: bool, pattern: re.Pattern | None, form: str | None) -> str | None:
    """What is wrong with ``name`` as a store-relative file name, or None."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name or "\\" in name:
        return "holds a NUL or a backslash"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "is an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' part"
    if (plain or pattern is not None) and len(parts) > 1:
        return "is not a plain file name"
    if pattern is not None and not pattern.fullmatch(name):
        return f"is not a name of the form {form}" if form else f"does not match {pattern.pattern!r}"
    return None


def check_file_name(
    name: Any,
    *,
    what: str,
    where: Any,
    plain: bool = False,
    pattern: re.Pattern | None = None,
    form: str | None = None,
    error: type[Exception] = CorruptStoreError,
    fix: str = REBUILD_STORE,
) -> str:
    """``name`` itself when it is a safe store-relative name (see the module docstring), else ``error``; ``form``
    says in words what ``pattern`` asks for (``NAME.<token>.faiss``)."""
    problem = _problem(name, plain, pattern, form)
    if problem is not None:
        raise error(f"{what} {name!r} in {where} {problem}; {fix}")
    return name


def is_inside(root: Any, path: Any) -> bool:
    """Whether ``path`` (symlinks followed) lies inside ``root`` (symlinks followed), or is it; True at a URL."""
    if is_remote(root) or is_remote(path):
        return True
    base = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath(path))
    return resolved == base or base in resolved.parents


def contained_path(
    root: Any,
    name: str,
    *,
    what: str,
    plain: bool = False,
    pattern: re.Pattern | None = None,
    error: type[Exception] = CorruptStoreError,
    fix: str = REBUILD_STORE,
) -> Any:
    """``root / name`` after checking that ``name`` is a safe relative name and that the path, symlinks followed,
    stays inside ``root`` (a ``Path`` or a store's ``RemotePath``); ``error`` (one sentence ending in ``fix``) if not.
    """
    check_file_name(name, what=what, where=root, plain=plain, pattern=pattern, error=error, fix=fix)
    path = root / name
    if not is_inside(root, path):
        raise error(f"{what} {name!r} in {root} is a link to {os.path.realpath(path)}, outside it; {fix}")
    return path
