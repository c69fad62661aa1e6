"""The store's ``transforms/`` folder: small numpy arrays beside the vectors, for asymmetric methods and for what a
build computes once and every later use must share (Arnoldi's eigenbasis, kron's pca side matrices).

Layout::

    NAME.gradindex/transforms/
      NAME.npy                 a finished transform (e.g. TRAK's ΦᵀΦ per checkpoint), recorded in the
                               manifest under "transforms" with its shape, dtype and sha256
      _parts/NAME/000003.npy   one shard's share of a transform that is reduced when every shard is done

A transform is written like everything else in a store (temporary name, fsync, rename), and its
record goes into the manifest only after the file is durable. ``exclusive=True`` creates a transform
only if it does not exist yet, so several workers of one build agree on a single copy (the first).

A transform named ``self_influence`` ((N,) float32), when present, supersedes the per-shard
``self_influence`` column: methods whose self-influence needs the whole store (TRAK's ΦᵀΦ) write it
when the last shard is done.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import CorruptStoreError, IncompleteStoreError
from gradindex.store._atomic import create_exclusive, make_dir, write_bytes_atomic
from gradindex.store._manifest import MANIFEST_KEY, SEAL_KEY, seal, write_manifest
from gradindex.store._paths import REBUILD_STORE, contained_path
from gradindex.utils import sha256_bytes, sha256_file

# the functions here take the open store (a ``GradientStore``, which calls them) as ``store``
GradientStore = Any

__all__ = [
    "TRANSFORMS_DIR",
    "check_transform_name",
    "read_transform",
    "read_transform_parts",
    "transform_records",
    "verify_transforms",
    "write_transform",
    "write_transform_part",
]

TRANSFORMS_DIR = "transforms"
_PARTS_DIR = "_parts"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def check_transform_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"transform name {name!r} must be lower-case letters, digits and '_' (starting with a letter, at most 64)"
        )
    return name


def _encode(array: np.ndarray) -> bytes:
    array = np.asarray(array)
    if array.dtype == object:
        raise ValueError("a transform must be a numeric numpy array, not an object array")
    sink = io.BytesIO()
    np.save(sink, np.ascontiguousarray(array), allow_pickle=False)
    return sink.getvalue()


def _decode(data: bytes, path: Path, record: dict | None = None) -> np.ndarray:
    """The array in ``.npy`` bytes. Its header is read first: a numeric dtype, a shape whose bytes are exactly
    what follows the header, and (given a ``record``) the record's shape and dtype, or a CorruptStoreError before
    anything the header declares is allocated."""
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, _fortran, dtype = read_header[version](stream, max_header_size=1 << 16)
        size = math.prod(shape) * dtype.itemsize
        if dtype.kind not in "biufc" or dtype.hasobject or len(data) - stream.tell() != size:
            problem = f"declares a {dtype} array of shape {list(shape)} that its {len(data)} bytes do not hold"
        elif record is not None and ([int(n) for n in shape] != record["shape"] or str(dtype) != record["dtype"]):
            problem = f"holds {dtype} {list(shape)}, not the {record['dtype']} {record['shape']} its record says"
        else:
            return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # numpy raises several kinds on damaged bytes
        raise CorruptStoreError(
            f"{path} cannot be read as a numpy array ({type(error).__name__}); rebuild the store with overwrite=True"
        ) from error
    raise CorruptStoreError(f"{path} {problem}; {REBUILD_STORE}")


def _disk_manifest(store: GradientStore) -> dict:
    group = json.loads(contained_path(store.path, "zarr.json", what="the manifest").read_text())
    attributes = group["attributes"]
    if attributes.get(SEAL_KEY) != seal(attributes[MANIFEST_KEY]):  # never merge into (and re-seal) a damaged one
        raise CorruptStoreError(f"the manifest of {store.path} fails its checksum; {REBUILD_STORE}")
    return attributes[MANIFEST_KEY]


def _checked_record(store: GradientStore, name: Any, record: Any) -> dict:
    """A transform's record, checked before its file is touched: its file is ``transforms/NAME.npy`` (inside the
    store, no link out of it), its sha256, shape and dtype well formed."""
    try:
        check_transform_name(name)
        sound = (
            isinstance(record, dict)
            and record.get("file") == f"{TRANSFORMS_DIR}/{name}.npy"
            and isinstance(record.get("sha256"), str)
            and len(record["sha256"]) == 64
            and isinstance(record.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in record["shape"])
            and isinstance(record.get("dtype"), str)
        )
    except ValueError:
        sound = False
    if not sound:
        raise CorruptStoreError(f"the record of transform {name!r} in {store.path} is damaged; {REBUILD_STORE}")
    contained_path(store.path, record["file"], what=f"transform {name}'s file")
    return record


def transform_records(store: GradientStore) -> dict[str, dict]:
    """``{name: {file, shape, dtype, sha256}}`` of the finished transforms (what the manifest on disk says)."""
    records = dict(store.manifest.get("transforms") or {})
    try:
        records.update(_disk_manifest(store).get("transforms") or {})
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the in-memory manifest is all there is
    return records


def _record(store: GradientStore, name: str, record: dict) -> None:
    """Add one record to the manifest on disk (read, merge, atomic write) and to the open store's copy."""
    manifest = _disk_manifest(store)
    records = dict(manifest.get("transforms") or {})
    records[name] = record
    manifest["transforms"] = records
    write_manifest(store.path, manifest)
    merged = dict(store.manifest.get("transforms") or {})
    merged.update(records)
    store.manifest["transforms"] = merged


def write_transform(store: GradientStore, name: str, array: np.ndarray, *, exclusive: bool = False) -> bool:
    """Write ``transforms/NAME.npy`` durably, then record it in the manifest.

    With ``exclusive=True`` nothing is written when the transform exists already (returns False);
    the caller then reads the existing one.
    """
    check_transform_name(name)
    data = _encode(array)
    path = contained_path(store.path, f"{TRANSFORMS_DIR}/{name}.npy", what=f"transform {name}'s file")
    if exclusive:
        make_dir(path.parent)
        if not create_exclusive(path, data):
            if name not in transform_records(store):
                # the winner wrote the file but had not recorded it yet (or died in between): record what is there
                existing = path.read_bytes()
                decoded = _decode(existing, path)
                _record(store, name, _record_of(name, decoded, existing))
            return False
    else:
        write_bytes_atomic(path, data)
    _record(store, name, _record_of(name, np.asarray(array), data))
    return True


def _record_of(name: str, array: np.ndarray, data: bytes) -> dict:
    return {
        "file": f"{TRANSFORMS_DIR}/{name}.npy",
        "shape": [int(size) for size in array.shape],
        "dtype": str(array.dtype),
        "sha256": sha256_bytes(data),
    }


def read_transform(store: GradientStore, name: str) -> np.ndarray:
    """A finished transform, checked against its recorded sha256."""
    check_transform_name(name)
    records = transform_records(store)
    if name not in records:
        raise IncompleteStoreError(
            f"store {store.path} has no transform {name!r}: its build did not finish; run `gradindex build ... "
            "--resume` "
            "with the same settings to complete it"
        )
    record = _checked_record(store, name, records[name])
    path = store.path / record["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptStoreError(f"{path} is missing; rebuild the store with overwrite=True") from None
    except OSError as error:
        raise CorruptStoreError(f"{path} cannot be read ({error}); rebuild the store with overwrite=True") from error
    if sha256_bytes(data) != record["sha256"]:
        raise CorruptStoreError(f"{path} fails its checksum; rebuild the store with overwrite=True")
    return _decode(data, path, record)


def _part_path(store: GradientStore, name: str, shard: int) -> Path:
    relative = f"{TRANSFORMS_DIR}/{_PARTS_DIR}/{check_transform_name(name)}/{shard:06d}.npy"
    return contained_path(store.path, relative, what=f"transform {name}'s part")


def write_transform_part(store: GradientStore, name: str, shard: int, array: np.ndarray) -> None:
    """One shard's share of a transform; write it before the shard's record so a resume recomputes both."""
    check_transform_name(name)
    store.layout.shard_rows(shard)  # validates the shard number
    write_bytes_atomic(_part_path(store, name, shard), _encode(array))


def read_transform_parts(store: GradientStore, name: str) -> dict[int, np.ndarray]:
    """``{shard: array}`` of every shard's share of a transform that has one on disk."""
    check_transform_name(name)
    parts = {}
    for shard in range(store.n_shards):
        path = _part_path(store, name, shard)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        parts[shard] = _decode(data, path)
    return parts


def verify_transforms(store: GradientStore) -> list[str]:
    """Problems with the recorded transforms: missing files or failed checksums."""
    problems = []
    for name, record in sorted(transform_records(store).items(), key=lambda item: str(item[0])):
        try:
            record = _checked_record(store, name, record)
        except CorruptStoreError as error:
            problems.append(f"transform {name}: {error}")
            continue
        path = store.path / record["file"]
        if not path.exists():
            problems.append(f"transform {name}: {record['file']} is missing")
            continue
        if sha256_file(path) != record["sha256"]:
            problems.append(f"transform {name}: {record['file']} fails its checksum")
    return problems
