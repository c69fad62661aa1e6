"""The manifest: the store's ``zarr.json`` group attributes, sealed with a checksum of their canonical JSON."""

from __future__ import annotations

import json
from pathlib import Path

from gradindex.store._atomic import write_bytes_atomic
from gradindex.utils import sha256_bytes

__all__ = ["FORMAT", "MANIFEST_KEY", "SEAL_KEY", "STORE_DTYPES", "manifest_bytes", "seal", "write_manifest"]

# the format every store records; a shard record may also hold the crc32c of its files (checked on every read), which
# readers without it ignore (they check the sha256 beside it), so both read each other's stores
FORMAT = "gradindex/1"
# the dtypes a store keeps its vectors in
STORE_DTYPES: dict[str, str] = {
    "float16": "half the bytes; a value beyond float16's ±65504 is refused (build with float32 then)",
    "float32": "exact",
}

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
