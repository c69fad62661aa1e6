"""Comparing two stores byte for byte: every data file, and the manifest less what differs by when or how it was
made."""

from __future__ import annotations

import json
from pathlib import Path

# manifest keys that say when a store was made, or how it got its rows: not what it holds
VOLATILE = {"created_at", "completed_at", "appended_from"}


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of the store but its manifest and its indexes, by relative path."""
    files = {}
    for file in sorted(path.rglob("*")):
        name = str(file.relative_to(path))
        if file.is_file() and name != "zarr.json" and not name.startswith("indexes"):
            files[name] = file.read_bytes()
    return files


def manifest(path: Path) -> dict:
    attributes = json.loads((path / "zarr.json").read_text())["attributes"]
    return {key: value for key, value in attributes["gradindex"].items() if key not in VOLATILE}


def assert_same_store(left: Path, right: Path, *, ignore: set[str] = frozenset()) -> None:
    left_files, right_files = store_files(left), store_files(right)
    assert sorted(left_files) == sorted(right_files)
    differing = [name for name in left_files if left_files[name] != right_files[name]]
    assert differing == [], f"files differ: {differing}"
    left_manifest, right_manifest = manifest(left), manifest(right)
    for key in ignore:
        left_manifest.pop(key, None)
        right_manifest.pop(key, None)
    assert left_manifest == right_manifest
