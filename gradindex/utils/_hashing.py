"""The one sha256 of gradindex: of bytes, of a file read in blocks, and of an object's canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["sha256_bytes", "sha256_file", "sha256_json"]

_BLOCK = 1 << 22


def sha256_bytes(data: bytes | memoryview) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Any) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB blocks; ``FileNotFoundError`` when it is not there.

    ``path`` is a str, a ``Path``, or any path object with ``open("rb")`` (a store's remote path)."""
    digest = hashlib.sha256()
    with path.open("rb") if hasattr(path, "open") else open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """The hex sha256 of ``value`` as JSON with sorted keys (anything JSON cannot say is written with ``str``)."""
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str).encode())
