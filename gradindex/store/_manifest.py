"""The manifest: the store's ``zarr.json`` group attributes, sealed with a checksum of their canonical JSON."""

from __future__ import annotations

import json
from pathlib import Path

from gradindex.store._atomic import write_bytes_atomic
from gradindex.utils import sha256_bytes

__all__ = ["MANIFEST_KEY", "SEAL_KEY", "manifest_bytes", "seal", "write_manifest"]

# the group attribute holding the manifest, and the one holding its checksum
MANIFEST_KEY = "gradindex"
SEAL_KEY = "gradindex_sha256"


def seal(manifest: dict) -> str:
    """The manifest's checksum: sha256 of its canonical JSON."""
    return sha256_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())


def manifest_bytes(manifest: dict) -> bytes:
    """The ``zarr.json`` of a store's group: the manifest and its seal as attributes."""
    group = {"zarr_format": 3, "node_type": "group", "attributes": {MANIFEST_KEY: manifest, SEAL_KEY: seal(manifest)}}
    return json.dumps(group, indent=1, sort_keys=True).encode()


def write_manifest(path: Path, manifest: dict) -> None:
    """Replace the manifest of the store at ``path`` (atomically)."""
    write_bytes_atomic(path / "zarr.json", manifest_bytes(manifest))
