"""The gradient store: a Zarr v3 group of per-sample vectors, written shard by shard.

Layout (format ``gradindex/1``)::

    NAME.gradindex/
      zarr.json            group metadata; attributes["gradindex"] is the manifest
      features/            (N, D) float16|float32, row chunks grouped into shards (one file per shard)
      self_influence/      (N,) float32, one chunk per shard
      samples.parquet      row, sample_id, label (written when the build completes)
      _shards/             per-shard records (checksums), sample parts and writer claims
      _append/             what an append stages (its manifest, records, the files it rewrites) until one swap
      transforms/          optional query-side arrays of asymmetric methods, recorded in the manifest (_transforms.py)

A shard's features file is encoded by the very array metadata of the store as its rows arrive and
written to a temporary name meanwhile (``ShardEncoder``), then fsynced and renamed; its other files
are encoded in memory and written the same way (at an fsspec URL: one PUT each, see ``_remote``); only then is the
shard's record written (also atomically).
The manifest says ``complete`` only after every record exists and ``samples.parquet`` is durable.

Every read is checked: the manifest against its own checksum, array metadata, shard files and
sample tables against the checksums the manifest and records hold. Damage is a CorruptStoreError
that names the file, never a silently different answer. A shard file is read against the crc32c its record holds
(stores whose manifest says ``read_check: crc32c``; hardware speed) or else its sha256 (stores made before);
sha256 stays the checksum of record for ``verify``, repairs and appends. Records of stores with a read check also
hold their own sha256 (``record_sha256``).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import gradindex.store._transforms as _transforms
from gradindex.errors import (
    CorruptStoreError,
    GradIndexError,
    IncompatibleStoreError,
    IncompleteStoreError,
    NonFiniteError,
    ShardOwnershipError,
    StoreExistsError,
    StoreNotFoundError,
    StoreWriteError,
)
from gradindex.store._arrow import numpy_of
from gradindex.store._atomic import (
    TMP_MARK,
    create_exclusive,
    forget,
    hold,
    in_use,
    is_orphan,
    make_dir,
    move_file,
    remove_file,
    remove_tree,
    rename_aside,
    rename_into_place,
    tmp_path,
    write_bytes_atomic,
)
from gradindex.store._encoder import FLOAT16_MAX, ShardEncoder, cast_into, cast_vectors
from gradindex.store._manifest import (
    FORMAT,
    MANIFEST_KEY,
    SEAL_KEY,
    STORE_DTYPES,
    manifest_bytes,
    seal,
    write_manifest,
)
from gradindex.store._paths import REBUILD_STORE, contained_path, is_inside
from gradindex.store._pieces import plain_index, read_exactly, read_into
from gradindex.store._remote import RemotePath, claim_timeout, is_remote, store_path
from gradindex.store.faults import crash_point
from gradindex.utils import (
    Crc32cCheck,
    check_settings,
    crc32c_bytes,
    is_crc32c,
    page_array,
    pid_alive,
    setting,
    sha256_bytes,
    sha256_file,
    sha256_json,
)

if TYPE_CHECKING:
    import zarr
    import zarr.storage

__all__ = [
    "FORMAT",
    "STORE_DTYPES",
    "GradientStore",
    "StoreLayout",
    "as_store",
    "cast_vectors",
    "create_store",
    "fingerprint_differences",
    "open_store",
    "sweep_orphans",
]

# the most shards a layout may have: every loop over a store's shards stays bounded, whatever a manifest declares
MAX_SHARDS = 1 << 22
_SHARD_DIR = "_shards"
_ARRAYS = ("features", "self_influence")
# An append stages what it writes under _append/ (its manifest, build files, writers' marks, and the files it
# changes); readers see none of it until one manifest swap, after which the staged files are moved into place.
_APPEND_DIR = "_append"
_APPEND_MANIFEST = "manifest.json"
_APPEND_WRITERS = "writers"
# the files an append changes besides the shard files from its first changed shard on
_STAGED_FILES = ("samples.parquet", "features/zarr.json", "self_influence/zarr.json")
_SHARD_FILE = re.compile(r"features/c/(\d+)/0|self_influence/c/(\d+)")
# what a gradindex store holds at its top level (besides its writers' temporaries): overwrite=True replaces only that
_STORE_ENTRIES = frozenset({"zarr.json", *_ARRAYS, "samples.parquet", _SHARD_DIR, "transforms", "indexes", _APPEND_DIR})
# the manifest key saying which checksum every read checks ("crc32c": each shard record holds one); absent in stores
# made before it existed, whose reads check the sha256 of the records
READ_CHECK_KEY = "read_check"
# the key of a shard record's checksum of itself (records of stores with a read_check have one)
_RECORD_SEAL = "record_sha256"
_REPAIR = "run `gradindex verify STORE` to list the damage and `gradindex build ... --resume --repair` to recompute it"


@dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """How rows are cut into shards (the unit of writing) and chunks (the unit of reading)."""

    n_samples: int = setting(help="rows: one vector per training sample", minimum=1, integer=True)
    dim: int = setting(help="the vectors' dimension", minimum=1, integer=True)
    dtype: str = setting("float16", "the vectors' dtype", choices=STORE_DTYPES)
    rows_per_shard: int = setting(8192, "rows per shard: the unit of writing", minimum=1, integer=True)
    rows_per_chunk: int = setting(1024, "rows per chunk: the unit of reading", minimum=1, integer=True)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.rows_per_shard % self.rows_per_chunk:
            raise ValueError(
                f"rows_per_shard={self.rows_per_shard} must be a multiple of rows_per_chunk={self.rows_per_chunk}"
            )
        if self.n_shards > MAX_SHARDS:
            raise ValueError(
                f"n_samples={self.n_samples} in shards of rows_per_shard={self.rows_per_shard} makes {self.n_shards} "
                f"shards, more than {MAX_SHARDS}; use a larger rows_per_shard"
            )

    @staticmethod
    def auto(
        n_samples: int,
        dim: int,
        dtype: str = "float16",
        *,
        shard_bytes: int = 64 << 20,
        rows_per_shard: int | None = None,
    ) -> StoreLayout:
        """A layout with shards of about ``shard_bytes`` (or exactly ``rows_per_shard`` rows)."""
        itemsize = 2 if dtype == "float16" else 4
        row_bytes = max(1, dim * itemsize)
        target_chunk = max(1, (1 << 20) // row_bytes)  # read in chunks of ~1 MiB
        if rows_per_shard is None:
            # a whole number of chunks per shard, so no store ends up with 3-row chunks because N = 3 x 449
            rows_per_chunk = min(target_chunk, n_samples)
            chunks_per_shard = max(1, min(shard_bytes // (rows_per_chunk * row_bytes), -(-n_samples // rows_per_chunk)))
            rows_per_shard = rows_per_chunk * chunks_per_shard
        else:
            # an explicit shard size: the largest chunk of at most ~1 MiB that divides it
            target_chunk = max(1, min(rows_per_shard, target_chunk))
            rows_per_chunk = next(c for c in range(target_chunk, 0, -1) if rows_per_shard % c == 0)
        return StoreLayout(
            n_samples=n_samples, dim=dim, dtype=dtype, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk
        )

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """``(start, stop)`` rows of a shard."""
        if not 0 <= shard < self.n_shards:
            raise ValueError(f"shard {shard} is out of range: the store has {self.n_shards} shards")
        start = shard * self.rows_per_shard
        return start, min(self.n_samples, start + self.rows_per_shard)

    def to_dict(self) -> dict:
        return {
            "n_samples": self.n_samples,
            "dim": self.dim,
            "dtype": self.dtype,
            "rows_per_shard": self.rows_per_shard,
            "rows_per_chunk": self.rows_per_chunk,
        }

    @staticmethod
    def from_dict(data: dict) -> StoreLayout:
        return StoreLayout(
            **{key: data[key] for key in ("n_samples", "dim", "dtype", "rows_per_shard", "rows_per_chunk")}
        )


def fingerprint_differences(expected: Any, actual: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two fingerprints (nested dicts/lists) differ, e.g. ``['projection.dim']``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        diffs: list[str] = []
        for key in sorted(set(expected) | set(actual), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in expected or key not in actual:
                diffs.append(path)
            else:
                diffs.extend(fingerprint_differences(expected[key], actual[key], path))
        return diffs
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [prefix or "<root>"]
        diffs = []
        for position, (left, right) in enumerate(zip(expected, actual)):
            diffs.extend(fingerprint_differences(left, right, f"{prefix}[{position}]"))
        return diffs
    return [] if expected == actual else [prefix or "<root>"]


def _is_sha(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(char in "0123456789abcdef" for char in value)


# the codecs of the arrays every gradindex store writes: uncompressed little-endian bytes; the features' chunks grouped
# into one shard per file, its index (offset and size of each chunk, then the index's crc32c) at the end
_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_INDEX_CODECS = [_BYTES, {"name": "crc32c"}]


@functools.lru_cache(maxsize=16)
def _plain_layout(name: str, metadata: bytes) -> tuple[str, int, int] | None:
    """``(numpy dtype, rows per chunk, chunks per shard file)`` when array ``name``'s metadata is the plain layout
    gradindex writes, whose shard files numpy reads as they are; None for anything else (zarr decodes those)."""
    try:
        meta = json.loads(metadata)
        dtype = {"float16": "<f2", "float32": "<f4"}[meta["data_type"]]
        codecs = meta["codecs"]
        rows_per_shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        if name == "self_influence":
            return (dtype, rows_per_shard, 1) if codecs == [_BYTES] else None
        (sharding,) = codecs
        config = sharding["configuration"]
        rows_per_chunk = int(config["chunk_shape"][0])
        plain = (
            sharding["name"] == "sharding_indexed"
            and config["codecs"] == [_BYTES]
            and config["index_codecs"] == _INDEX_CODECS
            and config.get("index_location", "end") == "end"
            and config["chunk_shape"][1:] == meta["shape"][1:]  # a chunk holds whole rows
            and rows_per_chunk > 0
            and rows_per_shard % rows_per_chunk == 0
        )
        return (dtype, rows_per_chunk, rows_per_shard // rows_per_chunk) if plain else None
    except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError):
        return None


def _plain_decode(name: str, metadata: bytes, data: bytes, n_rows: int, dim: int) -> np.ndarray | None:
    """The first ``n_rows`` rows of a verified shard file of the plain layout, read by numpy (zarr's decoding costs
    several times the read itself: a task per chunk); None when the file is not laid out as gradindex writes it (the
    chunks these rows need in order, back to back from the start, as its index says), for zarr to decode."""
    layout = _plain_layout(name, metadata)
    if layout is None:
        return None
    dtype, rows_per_chunk, chunks_per_shard = layout
    width = dim if name == "features" else 1
    row_bytes = width * np.dtype(dtype).itemsize
    if len(data) < n_rows * row_bytes:
        return None
    if name == "features":
        # the index: (offset, nbytes) as little-endian uint64 for every chunk of the shard, then its crc32c
        index_bytes = 16 * chunks_per_shard + 4
        n_chunks = -(-n_rows // rows_per_chunk)
        if len(data) < index_bytes or n_chunks > chunks_per_shard:
            return None
        body = len(data) - index_bytes  # the chunks' bytes, before the index
        chunks_fit = n_chunks * rows_per_chunk * row_bytes <= body
        if not (chunks_fit and plain_index(data[body:], n_rows, rows_per_chunk, row_bytes)):
            return None
    values = np.frombuffer(data, dtype=dtype, count=n_rows * width).copy()  # writable, as zarr's arrays are
    return values.reshape(n_rows, dim) if name == "features" else values


def _plain_self_influence(metadata: bytes, values: np.ndarray) -> bytearray | None:
    """The file zarr writes for one shard of the self-influence array in the plain layout: the shard's float32 values
    zero-padded to its length. None for any other layout."""
    layout = _plain_layout("self_influence", metadata)
    if layout is None or len(values) > layout[1]:
        return None
    data = bytearray(layout[1] * 4)
    cast_into(np.frombuffer(data, dtype="<f4", count=len(values)), values.astype(np.float32, copy=False))
    return data


def _record_seal(record: dict) -> str:
    """The checksum a shard record holds of itself: sha256 of its canonical JSON without the seal."""
    return sha256_json({key: value for key, value in record.items() if key != _RECORD_SEAL})


def _sample_table(data: bytes, path: Any, start: int, stop: int) -> pa.Table:
    """A sample table read from (checksummed) bytes; it must hold a ``sample_id`` column and a ``row`` column that
    is exactly ``start .. stop - 1``, else a CorruptStoreError (a crafted table cannot map rows to other samples)."""
    try:
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, which imports pandas (a quarter second)
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except Exception as error:  # pyarrow raises several kinds on damaged bytes
        raise CorruptStoreError(
            f"{path} cannot be read as a sample table ({type(error).__name__}); {_REPAIR}"
        ) from error
    sound = table.num_rows == stop - start and {"row", "sample_id"} <= set(table.column_names)
    if sound:
        offset = start
        for chunk in table.column("row").chunks:  # chunk by chunk: no second copy of a billion rows
            values = numpy_of(chunk)
            if not np.array_equal(values, np.arange(offset, offset + len(values))):
                sound = False
                break
            offset += len(values)
    if not sound:
        raise CorruptStoreError(f"{path} does not hold the rows {start}..{stop - 1} with their sample ids; {_REPAIR}")
    return table


def _check_manifest(path: Any, manifest: dict, layout: StoreLayout) -> None:
    """What readers index with must agree with the layout: a complete store has one record per shard, and its
    non-finite rows are rows of the store; the records themselves are checked when read."""
    problem = None
    if manifest.get("state") == "complete":
        shards = manifest.get("shards")
        nonfinite = manifest.get("nonfinite") or {}
        if not isinstance(shards, list) or len(shards) != layout.n_shards:
            problem = f"does not hold one record for each of its {layout.n_shards} shards"
        elif not isinstance(nonfinite, dict) or not all(
            isinstance(rows, list)
            and all(isinstance(row, int) and 0 <= row < layout.n_samples for row in rows)
            and rows == sorted(set(rows))
            for rows in nonfinite.values()
        ):
            problem = "lists non-finite rows that are not rows of the store"
    transforms = manifest.get("transforms")
    if transforms is not None and not isinstance(transforms, dict):
        problem = "holds a damaged transforms table"
    if problem is not None:
        raise CorruptStoreError(f"the manifest of {path} {problem}; {REBUILD_STORE}")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _array_metadata(layout: StoreLayout) -> dict[str, bytes]:
    """The ``zarr.json`` bytes of the store's two arrays, byte for byte what zarr's ``create_array`` writes for them
    (a test holds them to it), made without importing zarr: the same bytes every time."""

    def array(shape: list[int], dtype: str, chunk_shape: list[int], codecs: list[dict]) -> bytes:
        meta = {
            "shape": shape,
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0.0,
            "codecs": codecs,
            "attributes": {},
            "zarr_format": 3,
            "node_type": "array",
            "storage_transformers": [],
        }
        return json.dumps(meta, indent=2).encode()

    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [layout.rows_per_chunk, layout.dim],
            "codecs": [_BYTES],
            "index_codecs": _INDEX_CODECS,
            "index_location": "end",
        },
    }
    return {
        "features": array(
            [layout.n_samples, layout.dim], layout.dtype, [layout.rows_per_shard, layout.dim], [sharding]
        ),
        "self_influence": array([layout.n_samples], "float32", [layout.rows_per_shard], [_BYTES]),
    }


def _zarr() -> Any:
    """zarr, imported on first use: writing and verifying a store of the plain layout never needs it."""
    import zarr
    import zarr.storage

    return zarr


class GradientStore:
    """An opened store. Cheap to open; reads shards on demand."""

    def __init__(self, path: Path | RemotePath, manifest: dict):
        self.path = path
        self.manifest = manifest
        # seconds after which a remote shard claim counts as abandoned (None: GRADINDEX_CLAIM_TIMEOUT or 6 hours)
        self.claim_timeout: float | None = None
        self.layout = StoreLayout.from_dict(manifest["layout"])
        self._features: zarr.Array | None = None
        self._self_influence: zarr.Array | None = None
        self._metadata: dict[str, bytes] = {}
        self._decoders: dict[tuple[str, bytes], tuple[dict, zarr.Array]] = {}
        self._decode_lock = threading.Lock()
        self._writer_mark: Path | None = None  # this process's mark in the _append/ of an append it is writing

    # ---- metadata -------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.manifest.get("state") == "complete"

    @property
    def n_samples(self) -> int:
        return self.layout.n_samples

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def n_shards(self) -> int:
        return self.layout.n_shards

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    def _at(self, relative: str) -> Path:
        """``self.path / relative``, checked to stay inside the store (no ``..``, no symlink out of it): every file
        the store reads, writes or deletes is reached through here."""
        return contained_path(self.path, relative, what="file")

    def _staged_from(self) -> int | None:
        """The first shard an append rewrites, while this manifest is an append's (being staged, or committed and
        its files not all moved into place yet); None otherwise."""
        staging = self.manifest.get("append_staging")
        shard = staging.get("from_shard") if isinstance(staging, dict) else None
        return shard if isinstance(shard, int) and 0 <= shard <= self.n_shards else None

    def _location(self, key: str) -> Path:
        """Where store file ``key`` is read and written: under ``_append/`` when an append stages it (its shard files
        from the first changed shard on, the arrays' metadata, samples.parquet), else in its place."""
        staged_from = self._staged_from()
        if staged_from is not None:
            match = _SHARD_FILE.fullmatch(key)
            if key in _STAGED_FILES or (match is not None and int(match.group(1) or match.group(2)) >= staged_from):
                return self._at(f"{_APPEND_DIR}/{key}")
        return self._at(key)

    def _read(self, key: str) -> tuple[Path, bytes]:
        """``(path, bytes)`` of store file ``key``; a committed append's staged file that was moved into place
        meanwhile is read there."""
        path = self._location(key)
        try:
            return path, path.read_bytes()
        except FileNotFoundError:
            if not self.complete or path == self._at(key):
                raise
        path = self._at(key)
        return path, path.read_bytes()

    def _located(self, key: str) -> Path:
        """Where store file ``key`` is now (for checks that look before reading)."""
        path = self._location(key)
        return path if not self.complete or path.exists() else self._at(key)

    def _build_dir(self) -> str:
        return f"{_APPEND_DIR}/{_SHARD_DIR}" if self._staged_from() is not None else _SHARD_DIR

    def _shard_dir(self) -> Path:
        return self._at(self._build_dir())

    def _record_path(self, shard: int) -> Path:
        return self._at(f"{self._build_dir()}/{shard:06d}.json")

    def _samples_part_path(self, shard: int) -> Path:
        return self._at(f"{self._build_dir()}/{shard:06d}.parquet")

    def _claim_path(self, shard: int) -> Path:
        return self._at(f"{self._build_dir()}/{shard:06d}.claim")

    def shard_record(self, shard: int) -> dict | None:
        """The record of a finished shard (checksums, rows), or None while it is not done."""
        if self.complete:
            return self._checked_record(shard, self.manifest["shards"][shard], "in the manifest")
        path = self._record_path(shard)
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise CorruptStoreError(
                f"shard record {path} is unreadable ({type(error).__name__}); run `gradindex build ... --resume "
                "--repair` to recompute the shard"
            ) from error
        return self._checked_record(shard, record, str(path))

    def _keys(self, shard: int) -> tuple[str, str]:
        """Where the shard's features and self-influence live, relative to the store."""
        return f"features/c/{shard}/0", f"self_influence/c/{shard}"

    def _checked_record(self, shard: int, record: Any, where: str) -> dict:
        start, stop = self.layout.shard_rows(shard)
        nonfinite = record.get("nonfinite", {}) if isinstance(record, dict) else None
        sound = (
            isinstance(record, dict)
            and record.get("shard") == shard
            and record.get("rows") == [start, stop]
            and isinstance(record.get("files"), dict)
            and set(record["files"]) == set(self._keys(shard))
            and all(_is_sha(value) for value in record["files"].values())
            # stores with a read_check hold both in every record; older ones neither (appended shards may)
            and (
                (record.get("crc32c") is None and self.manifest.get(READ_CHECK_KEY) != "crc32c")
                or (
                    isinstance(record.get("crc32c"), dict)
                    and set(record["crc32c"]) == set(record["files"])
                    and all(is_crc32c(value) for value in record["crc32c"].values())
                )
            )
            and (
                (record.get(_RECORD_SEAL) is None and self.manifest.get(READ_CHECK_KEY) != "crc32c")
                or record.get(_RECORD_SEAL) == _record_seal(record)
            )
            and _is_sha(record.get("samples_sha256"))
            and (record.get("content_sha256") is None or _is_sha(record["content_sha256"]))
            and isinstance(nonfinite, dict)
            and set(nonfinite) <= {"skipped", "zeroed"}
            and all(
                isinstance(rows, list) and all(isinstance(row, int) and start <= row < stop for row in rows)
                for rows in nonfinite.values()
            )
        )
        if not sound:
            raise CorruptStoreError(
                f"the record of shard {shard} ({where}) is damaged; run `gradindex build ... --resume --repair` to "
                "recompute the shard"
            )
        return record

    def done_shards(self) -> list[int]:
        """Shards whose data and record are durable."""
        if self.complete:
            return list(range(self.n_shards))
        # the records there, listed (not one look per shard: a layout may declare millions of shards)
        try:
            records = list(self._shard_dir().glob("*.json"))
        except FileNotFoundError:
            records = []
        if not records and self._reload_complete():
            # the build folder went away under us: another process finalized the store (its records now live in
            # the manifest)
            return list(range(self.n_shards))
        done = set()
        for item in records:
            stem = item.name[: -len(".json")]
            if stem.isdigit() and stem == f"{int(stem):06d}" and int(stem) < self.n_shards:
                done.add(int(stem))
        return sorted(done)

    def progress(self) -> str:
        done = self.done_shards()
        rows = sum(self.layout.shard_rows(shard)[1] - self.layout.shard_rows(shard)[0] for shard in done)
        return f"{len(done)}/{self.n_shards} shards ({rows}/{self.n_samples} rows)"

    # ---- arrays -----------------------------------------------------------------------------
    def _zarr_store(self) -> zarr.storage.LocalStore | zarr.storage.FsspecStore:
        if is_remote(self.path):
            return self.path.zarr_store()
        return _zarr().storage.LocalStore(self.path, read_only=True)

    @property
    def features_array(self) -> zarr.Array:
        """The raw zarr array (unchecked reads; ``read_shard`` checks every byte against its checksum)."""
        if self._features is None:
            self._array_metadata("features")
            self._features = _zarr().open_array(self._zarr_store(), path="features", mode="r")
        return self._features

    @property
    def self_influence_array(self) -> zarr.Array:
        if self._self_influence is None:
            self._array_metadata("self_influence")
            self._self_influence = _zarr().open_array(self._zarr_store(), path="self_influence", mode="r")
        return self._self_influence

    def _array_metadata(self, name: str) -> bytes:
        """An array's ``zarr.json``, checked against the checksum the manifest holds for it."""
        if name not in self._metadata:
            path = self._location(f"{name}/zarr.json")
            try:
                path, data = self._read(f"{name}/zarr.json")
            except OSError as error:
                raise CorruptStoreError(
                    f"{path} is {'missing' if isinstance(error, FileNotFoundError) else 'unreadable'}; {_REPAIR}"
                ) from error
            expected = (self.manifest.get("arrays") or {}).get(name)
            if expected is not None and sha256_bytes(data) != expected:
                grown = self._grown()
                if grown is not None:  # an append grew the store since we opened it: its metadata serves our rows
                    self._metadata[name] = grown._array_metadata(name)
                    return self._metadata[name]
                raise CorruptStoreError(f"{path} fails its checksum; {_REPAIR}")
            self._check_array_metadata(name, data, path)
            self._metadata[name] = data
        return self._metadata[name]

    def _check_array_metadata(self, name: str, data: bytes, path: Path) -> None:
        """An array's metadata must describe the manifest's layout (shape, dtype, one chunk per shard, zero fill):
        what is decoded is then never larger than the layout says, whatever a crafted ``zarr.json`` declares."""
        layout = self.layout
        width = [layout.dim] if name == "features" else []
        shape, dtype = [layout.n_samples, *width], layout.dtype if name == "features" else "float32"
        try:
            meta = json.loads(data)
            sound = (
                meta["shape"] == shape
                and meta["data_type"] == dtype
                and meta["chunk_grid"]["configuration"]["chunk_shape"] == [layout.rows_per_shard, *width]
                and meta.get("fill_value") == 0
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            sound = False
        if not sound:
            raise CorruptStoreError(
                f"{path} does not describe the manifest's {dtype} array of shape {shape}; {_REPAIR}"
            )

    def _verified(self, shard: int, key: str, expected: str, what: str, crc32c: str | None = None) -> bytes:
        """The bytes of store file ``key`` of ``shard``, checked against the crc32c its record holds (new stores'
        shard files: the whole file, at hardware speed) or else its sha256 (``expected``, the checksum of record)."""
        path = self._location(key)
        try:
            path, data = self._read(key)
        except FileNotFoundError:
            if not self.complete and self._reload_complete():
                return self._verified(shard, key, expected, what, crc32c)
            raise CorruptStoreError(f"{what} of shard {shard} ({path}) is missing; {_REPAIR}") from None
        except OSError as error:
            raise CorruptStoreError(f"{what} of shard {shard} ({path}) cannot be read ({error}); {_REPAIR}") from error
        if (crc32c_bytes(data) != crc32c) if crc32c is not None else (sha256_bytes(data) != expected):
            grown = self._grown()
            records = grown.manifest["shards"] if grown is not None else []
            if shard < len(records) and records[shard].get("files", {}).get(key) == sha256_bytes(data):
                return data  # the shard as an append grew it since we opened the store: our rows in it are unchanged
            raise CorruptStoreError(f"{what} of shard {shard} ({path}) fails its checksum; {_REPAIR}")
        return data

    def _grown(self) -> GradientStore | None:
        """The store as an append completed it after this object read its manifest, or None. Its first rows are ours,
        unchanged (an append checks them before it writes anything), in shards cut the same way, so the files it
        rewrote (the arrays' metadata, our partial last shard, samples.parquet) still serve our rows."""
        if not self.complete:
            return None
        try:
            fresh = open_store(self.path)
        except GradIndexError:
            return None
        old, new = self.layout, fresh.layout
        kept = self.n_samples // old.rows_per_shard  # our full shards: the append kept their files
        grown = (
            fresh.complete
            and fresh.manifest.get("appended_from") is not None
            and new.n_samples > old.n_samples
            and (new.dim, new.dtype, new.rows_per_shard, new.rows_per_chunk)
            == (old.dim, old.dtype, old.rows_per_shard, old.rows_per_chunk)
            and not [
                d for d in fingerprint_differences(self.fingerprint, fresh.fingerprint) if d.split(".")[0] != "dataset"
            ]
            and fresh.manifest["shards"][:kept] == self.manifest["shards"][:kept]
        )
        return fresh if grown else None

    def _decode(self, name: str, key: str, data: bytes, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of array ``name`` from one verified shard file, decoded in memory (by numpy for the
        plain layout gradindex writes, by zarr for any other)."""
        metadata = self._array_metadata(name)
        # shard files are written uncompressed, every chunk present: fewer bytes than the rows need is damage (or a
        # crafted layout), refused before zarr allocates what the layout declares
        needed = (stop - start) * (self.dim if name == "features" else 1) * np.dtype(self._dtype_of(name)).itemsize
        if len(data) < needed:
            raise CorruptStoreError(
                f"{key} of {self.path} holds {len(data)} bytes, fewer than the {needed} its {stop - start} rows need; "
                f"{_REPAIR}"
            )
        plain = _plain_decode(name, metadata, data, stop - start, self.dim)
        if plain is not None:
            return plain
        from zarr.core.buffer import default_buffer_prototype

        prototype = default_buffer_prototype().buffer
        try:
            with (
                self._decode_lock
            ):  # one in-memory array per metadata, reused (opening one costs more than a small read)
                if (name, metadata) not in self._decoders:
                    files: dict[str, Any] = {f"{name}/zarr.json": prototype.from_bytes(metadata)}
                    self._decoders[(name, metadata)] = (
                        files,
                        _zarr().open_array(_zarr().storage.MemoryStore(files), path=name, mode="r"),
                    )
                files, array = self._decoders[(name, metadata)]
                files[key] = prototype.from_bytes(data)
                try:
                    return np.asarray(array[start:stop])
                finally:
                    del files[key]
        except Exception as error:  # zarr raises many kinds on damaged bytes
            raise CorruptStoreError(
                f"{key} of {self.path} cannot be decoded ({type(error).__name__}: {error}); {_REPAIR}"
            ) from error

    def _dtype_of(self, name: str) -> str:
        return self.dtype if name == "features" else "float32"

    def _record_for_read(self, shard: int) -> dict:
        record = self.shard_record(shard)
        if record is None and not self.complete and self._reload_complete():
            record = self.shard_record(shard)
        if record is None:
            raise IncompleteStoreError(f"shard {shard} of {self.path} is not written yet")
        return record

    def _require_readable(self, allow_incomplete: bool) -> list[int]:
        if self.complete:
            return list(range(self.n_shards))
        if not allow_incomplete:
            raise IncompleteStoreError(
                f"store {self.path} is incomplete ({self.progress()} written); finish it with "
                "`gradindex build ... --resume`, or pass allow_incomplete=True (--allow-incomplete) to use the "
                "finished part"
            )
        return self.done_shards()

    def read_shard(self, shard: int, *, allow_incomplete: bool = False) -> np.ndarray:
        """Rows of one shard as stored (float16 or float32), ``[n_rows, D]``, checked against the shard's checksum."""
        readable = self._require_readable(allow_incomplete)
        if shard not in readable:
            raise IncompleteStoreError(f"shard {shard} of {self.path} is not written yet")
        start, stop = self.layout.shard_rows(shard)
        record = self._record_for_read(shard)
        key = self._keys(shard)[0]
        data = self._verified(shard, key, record["files"][key], "the features", record.get("crc32c", {}).get(key))
        return self._decode("features", key, data, start, stop)

    def iter_blocks(
        self, *, allow_incomplete: bool = False, max_rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, vectors)`` per readable shard, in row order, one shard in memory at a time.

        With ``max_rows``, a shard of more rows comes in pieces of at most ``max_rows`` rows, read from its file in
        order, one piece (an array of its own) in memory at a time. The file's checksum is taken over every byte as
        it is read and compared once the last bytes are in, before the shard's last piece is given: damage is a
        ``CorruptStoreError`` raised in place of that piece. Act on a shard's rows only after its last piece (search
        answers after the last block of the store, so it never answers from unchecked bytes).
        """
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        for shard in self._require_readable(allow_incomplete):
            start, stop = self.layout.shard_rows(shard)
            if max_rows is None or stop - start <= max_rows:
                yield start, self.read_shard(shard, allow_incomplete=allow_incomplete)
            else:
                yield from self._shard_pieces(shard, max_rows)

    def _shard_pieces(self, shard: int, max_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rows of a readable shard in pieces of ``max_rows``, read in order and checked as ``iter_blocks`` says. A
        file not laid out as gradindex writes it (what only zarr decodes) is read whole."""
        start, stop = self.layout.shard_rows(shard)
        record = self._record_for_read(shard)
        key = self._keys(shard)[0]
        plain = _plain_layout("features", self._array_metadata("features"))
        if plain is None:
            yield start, self.read_shard(shard, allow_incomplete=True)
            return
        dtype, rows_per_chunk, chunks_per_shard = plain
        expected_crc = record.get("crc32c", {}).get(key)
        path = self._location(key)
        try:
            path, handle = self._open(key)
        except FileNotFoundError:
            if not self.complete and self._reload_complete():
                yield from self._shard_pieces(shard, max_rows)
                return
            raise CorruptStoreError(f"the features of shard {shard} ({path}) is missing; {_REPAIR}") from None
        except OSError as error:
            raise CorruptStoreError(
                f"the features of shard {shard} ({path}) cannot be read ({error}); {_REPAIR}"
            ) from error
        n_rows, row_bytes = stop - start, self.dim * np.dtype(dtype).itemsize
        with handle:
            try:
                size = handle.seek(0, os.SEEK_END)
                index_size = 16 * chunks_per_shard + 4
                if size < -(-n_rows // rows_per_chunk) * rows_per_chunk * row_bytes + index_size:
                    raise CorruptStoreError(
                        f"the features of shard {shard} ({path}) hold {size} bytes, fewer than its {n_rows} rows "
                        f"need; {_REPAIR}"
                    )
                handle.seek(size - index_size)
                index = read_exactly(handle, index_size)
                if not plain_index(index, n_rows, rows_per_chunk, row_bytes):
                    yield start, self.read_shard(shard, allow_incomplete=True)  # chunks not back to back: zarr's
                    return
                check = Crc32cCheck(index[-4:]) if expected_crc is not None else hashlib.sha256()
                handle.seek(0)
                for first in range(0, n_rows, max_rows):
                    count = min(max_rows, n_rows - first)
                    data = read_into(handle, page_array(count * row_bytes, np.uint8))  # freed when dropped
                    check.update(data)
                    if first + count == n_rows:  # the rest of the file (padding, index), then its checksum
                        position, last = n_rows * row_bytes, data[-index_size:].tobytes()
                        while position < size:
                            rest = read_exactly(handle, min(1 << 20, size - position))
                            check.update(rest)
                            position += len(rest)
                            last = last[-index_size:] + rest
                        if last[-index_size:] != index or check.hexdigest() != (expected_crc or record["files"][key]):
                            self._checked_as_grown(shard, key, record, check.hexdigest(), expected_crc is not None)
                    piece = data.view(dtype).reshape(count, self.dim)
                    del data  # held once, by the reader, not again while the next piece is read
                    yield start + first, piece
                    del piece
            except (OSError, EOFError) as error:
                if isinstance(error, CorruptStoreError):
                    raise
                raise CorruptStoreError(
                    f"the features of shard {shard} ({path}) cannot be read ({error}); {_REPAIR}"
                ) from error

    def _open(self, key: str) -> tuple[Path, Any]:
        """``(path, binary file)`` of store file ``key``, found as ``_read`` finds it."""
        path = self._location(key)
        try:
            return path, path.open("rb")
        except FileNotFoundError:
            if not self.complete or path == self._at(key):
                raise
        path = self._at(key)
        return path, path.open("rb")

    def _checked_as_grown(self, shard: int, key: str, record: dict, digest: str, crc: bool) -> None:
        """A shard file read in pieces failed its checksum: accept it only when an append grew the store meanwhile
        and the bytes read are those of the file as the append left it (checked whole, as ``_verified`` does: this
        rare race reads the file once more, whole); else CorruptStoreError."""
        data = self._verified(shard, key, record["files"][key], "the features", record.get("crc32c", {}).get(key))
        if (crc32c_bytes(data) if crc else sha256_bytes(data)) != digest:
            raise CorruptStoreError(
                f"the features of shard {shard} ({self._located(key)}) fails its checksum; {_REPAIR}"
            )

    def read_features(self, *, allow_incomplete: bool = False) -> np.ndarray:
        """All readable rows stacked, as stored dtype; rows of unwritten shards are absent."""
        blocks = [block for _, block in self.iter_blocks(allow_incomplete=allow_incomplete)]
        if not blocks:
            return np.zeros((0, self.dim), dtype=self.dtype)
        return np.concatenate(blocks)

    def read_rows(self, rows: Sequence[int], *, allow_incomplete: bool = False) -> np.ndarray:
        """Feature vectors of chosen rows, ``[len(rows), D]`` float32 (each shard read whole and checked)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_samples):
            raise IndexError(f"rows must be in [0, {self.n_samples}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, self.dim), dtype=np.float32) if not rows.size else None
        shards = rows // self.layout.rows_per_shard
        for shard in np.unique(shards):
            picked = np.flatnonzero(shards == shard)
            block = self.read_shard(int(shard), allow_incomplete=allow_incomplete)
            if out is None:  # allocated once a shard's bytes back the declared dimension
                out = np.empty((rows.size, self.dim), dtype=np.float32)
            out[picked] = block[rows[picked] - self.layout.shard_rows(int(shard))[0]]
        return out

    def self_influence(self, *, allow_incomplete: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)`` of every readable row, scores float32; rows skipped as non-finite are left out.

        A complete store's ``self_influence`` transform, when it has one, supersedes the per-shard column
        (methods whose self-influence needs every row, e.g. TRAK's ΦᵀΦ, write it when the build completes).
        """
        if self.complete and "self_influence" in self.transforms():
            scores = np.asarray(self.read_transform("self_influence"), dtype=np.float32)
            if scores.shape != (self.n_samples,):
                raise CorruptStoreError(
                    f"transforms/self_influence of {self.path} has shape {list(scores.shape)}, not the store's "
                    f"[{self.n_samples}]; {REBUILD_STORE}"
                )
            rows = np.arange(self.n_samples, dtype=np.int64)
            keep = ~np.isin(rows, self.skipped_rows())
            return rows[keep], scores[keep]
        row_blocks, score_blocks = [], []
        for shard in self._require_readable(allow_incomplete):
            start, stop = self.layout.shard_rows(shard)
            record = self._record_for_read(shard)
            key = self._keys(shard)[1]
            data = self._verified(
                shard, key, record["files"][key], "the self-influence", record.get("crc32c", {}).get(key)
            )
            scores = self._decode("self_influence", key, data, start, stop).astype(np.float32)
            rows = np.arange(start, stop, dtype=np.int64)
            skipped = record.get("nonfinite", {}).get("skipped", [])
            if skipped:
                keep = ~np.isin(rows, skipped)
                rows, scores = rows[keep], scores[keep]
            row_blocks.append(rows)
            score_blocks.append(scores)
        if not row_blocks:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(row_blocks), np.concatenate(score_blocks)

    def nonfinite_rows(self, *, allow_incomplete: bool = False) -> dict[str, list[int]]:
        """Rows whose vectors were not finite, by what the build did: ``{"skipped": [...], "zeroed": [...]}``.

        Skipped rows hold zero vectors, are never returned by search and are left out of self-influence;
        zeroed rows hold zero vectors and take part (score 0 for every query).
        """
        if self.complete:
            recorded = self.manifest.get("nonfinite") or {}
            return {"skipped": list(recorded.get("skipped", [])), "zeroed": list(recorded.get("zeroed", []))}
        found: dict[str, list[int]] = {"skipped": [], "zeroed": []}
        for shard in self._require_readable(allow_incomplete):
            record = self._record_for_read(shard)
            for kind in found:
                found[kind].extend(record.get("nonfinite", {}).get(kind, []))
        return found

    def skipped_rows(self, *, allow_incomplete: bool = False) -> np.ndarray:
        """Sorted rows left out of search and self-influence (``--nonfinite skip``)."""
        return np.asarray(sorted(self.nonfinite_rows(allow_incomplete=allow_incomplete)["skipped"]), dtype=np.int64)

    def samples(self, *, allow_incomplete: bool = False) -> pa.Table:
        """``row, sample_id, label`` of every readable row, in row order (checked against their checksums)."""
        if self.complete:
            path = self._location("samples.parquet")
            try:
                path, data = self._read("samples.parquet")
            except FileNotFoundError as error:
                raise CorruptStoreError(f"{path} is missing from a complete store; {_REPAIR}") from error
            except OSError as error:
                raise CorruptStoreError(f"{path} cannot be read ({error}); {_REPAIR}") from error
            if sha256_bytes(data) != self.manifest.get("samples_sha256"):
                grown = self._grown()
                if grown is not None:  # an append grew the store since we opened it: our rows come first
                    return grown.samples().slice(0, self.n_samples)
                raise CorruptStoreError(f"{path} fails its checksum; {_REPAIR}")
            return _sample_table(data, path, 0, self.n_samples)
        parts = []
        readable = self._require_readable(allow_incomplete)
        for shard in readable:
            try:
                record = self._record_for_read(shard)
                if not self.complete:
                    key = str(self._samples_part_path(shard).relative_to(self.path))
                    data = self._verified(shard, key, record["samples_sha256"], "the sample table")
                    parts.append(_sample_table(data, key, *self.layout.shard_rows(shard)))
            except CorruptStoreError:
                if not self.complete:
                    raise
            if self.complete:  # completed while we read: samples.parquet now holds every row
                return self._rows_of(self.samples(), readable)
        if not parts:
            return pa.table(
                {
                    "row": pa.array([], pa.int64()),
                    "sample_id": pa.array([], pa.string()),
                    "label": pa.array([], pa.int64()),
                }
            )
        return pa.concat_tables(parts, promote_options="default")

    def _rows_of(self, table: pa.Table, shards: Sequence[int]) -> pa.Table:
        rows = table.column("row").to_numpy()
        keep = np.zeros(len(rows), dtype=bool)
        for shard in shards:
            start, stop = self.layout.shard_rows(shard)
            keep |= (rows >= start) & (rows < stop)
        return table.filter(pa.array(keep))

    # ---- writing ----------------------------------------------------------------------------
    def claim_shard(self, shard: int, *, owner: str) -> None:
        """Take ownership of a shard, or fail if a live writer (or a finished record) has it."""
        if self.complete or self._record_path(shard).exists():
            raise ShardOwnershipError(f"shard {shard} of {self.path} is already finished")
        if self._writer_mark is not None and is_remote(self.path):
            self._mark_writer()  # a remote append's writer shows it is alive (no pid check across machines)
        path = self._claim_path(shard)
        payload = json.dumps(
            {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        ).encode()
        make_dir(self._shard_dir())
        for _ in range(3):
            # written whole under a temporary name and hard-linked into place: never seen half-written
            if create_exclusive(path, payload):
                hold(path)
                if self._record_path(shard).exists():  # finished by another writer between our two looks
                    self.release_shard(shard)
                    raise ShardOwnershipError(f"shard {shard} of {self.path} is already finished")
                return
            holder = self._read_claim(path)
            if holder is None:
                continue  # released meanwhile
            if holder.get("owner") == owner:
                return
            if not holder:
                raise ShardOwnershipError(
                    f"the claim file {path} of shard {shard} is unreadable; if no writer is working on shard {shard}, "
                    "delete it and resume"
                )
            same_host = holder.get("host") == socket.gethostname()
            mine_but_given_up = holder.get("pid") == os.getpid() and not in_use(
                path
            )  # an earlier failed build here could not remove it
            if (same_host and (mine_but_given_up or not pid_alive(int(holder.get("pid", -1))))) or self._claim_expired(
                holder
            ):
                # A dead writer's claim: move it aside; only one contender's rename succeeds.
                aside = rename_aside(path, "stale-")
                if aside is not None:
                    remove_file(aside)
                    forget(aside)
                continue
            raise ShardOwnershipError(
                f"shard {shard} of {self.path} is owned by writer {holder.get('owner')} "
                f"(pid {holder.get('pid')} on {holder.get('host')}); give each worker disjoint shards with --shard I/N"
            )
        raise ShardOwnershipError(f"could not claim shard {shard} of {self.path}: another writer raced for it")

    def _claim_expired(self, holder: dict) -> bool:
        """A claim older than the claim timeout made on another machine (a shared file system or an object store, where
        its writer's process cannot be looked at): its writer is taken as gone. A claim of this host is judged by its
        pid instead."""
        if not is_remote(self.path) and holder.get("host") == socket.gethostname():
            return False
        timeout = self.claim_timeout if self.claim_timeout is not None else claim_timeout()
        stamp = holder.get("time")
        return isinstance(stamp, (int, float)) and time.time() - stamp > timeout

    @staticmethod
    def _read_claim(path: Path) -> dict | None:
        """The claim's content; None if it is gone, ``{}`` if it cannot be read."""
        try:
            holder = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return (
            holder if isinstance(holder, dict) and "owner" in holder and isinstance(holder.get("pid", -1), int) else {}
        )

    def release_shard(self, shard: int) -> None:
        forget(self._claim_path(shard))
        remove_file(self._claim_path(shard))

    def shard_encoder(self, shard: int, *, stream: bool = True) -> ShardEncoder:
        """An encoder of shard ``shard``'s features file, to hand its rows as they are computed (``add``) and then to
        ``write_shard`` in place of the features. With ``stream`` (and a local store) the file is written to its
        temporary name as the rows come; else it is made in memory and written whole."""
        start, stop = self.layout.shard_rows(shard)
        return ShardEncoder(
            stop - start,
            self.dim,
            self.dtype,
            _plain_layout("features", self._array_metadata("features")),
            lambda values: self._zarr_encode("features", start, values)[1],
            self._location(self._keys(shard)[0]) if stream else None,
            # its temporary name in the build folder, beside the shard's claim: a refused shard leaves no new folder
            self._at(f"{self._build_dir()}/{shard:06d}.features"),
        )

    def _zarr_encode(self, name: str, start: int, values: np.ndarray) -> tuple[str, bytes]:
        """The key and bytes of the chunk/shard file holding ``values`` at ``start`` (cast to the array's dtype), as
        zarr itself encodes them: the trusted path, and the one for arrays not of the plain layout."""
        zarr = _zarr()
        from zarr.core.buffer import default_buffer_prototype

        files: dict[str, Any] = {
            f"{name}/zarr.json": default_buffer_prototype().buffer.from_bytes(self._array_metadata(name))
        }
        # write_empty_chunks: an all-zero shard (zero gradients, zeroed non-finite rows) still gets its file, and zarr
        # skips comparing every chunk with the fill value
        array = zarr.open_array(zarr.storage.MemoryStore(files), path=name, mode="r+").with_config(
            {"write_empty_chunks": True}
        )
        array[start : start + len(values)] = values
        keys = [key for key in files if key.startswith(f"{name}/c/")]
        if len(keys) != 1:
            raise RuntimeError(
                f"encoding rows {start}..{start + len(values)} of {name} touched {len(keys)} files, expected 1"
            )
        return keys[0], files[keys[0]].to_bytes()

    def write_shard(
        self,
        shard: int,
        features: np.ndarray | ShardEncoder,
        self_influence: np.ndarray,
        samples: pa.Table,
        *,
        content_sha256: str | None = None,
        nonfinite: dict[str, Sequence[int]] | None = None,
    ) -> dict:
        """Write one shard durably and record it. ``features`` is ``[n_rows, D]`` float (cast here), or this shard's
        ``shard_encoder()`` given every row (this call then owns it: saved, or discarded on any failure).

        Everything is checked before a byte reaches a final name (given arrays: before a byte is written): shapes,
        dtypes, the sample table's rows, finiteness, float16 range. ``nonfinite`` lists rows (store rows) whose vectors
        were not finite and have been replaced by zeros: ``{"skipped": [...]}`` (left out of search) or
        ``{"zeroed": [...]}``. ``content_sha256`` is a hash of the shard's training samples, kept in its record.
        """
        start, stop = self.layout.shard_rows(shard)
        n_rows = stop - start
        encoder = features if isinstance(features, ShardEncoder) else None
        try:
            if encoder is not None:
                if (encoder.n_rows, encoder.dim) != (n_rows, self.dim):
                    raise ValueError(
                        f"shard {shard} needs an encoder of ({n_rows}, {self.dim}) rows, got ({encoder.n_rows}, "
                        f"{encoder.dim})"
                    )
            else:
                features = np.asarray(features)
                if features.shape != (n_rows, self.dim):
                    raise ValueError(
                        f"shard {shard} needs features of shape ({n_rows}, {self.dim}), got {tuple(features.shape)}"
                    )
                if not np.issubdtype(features.dtype, np.floating):
                    raise ValueError(f"shard {shard} needs floating-point features, got dtype {features.dtype}")
                encoder = self.shard_encoder(shard, stream=False)  # every row is here: checked before a byte is written
                encoder.add(features)
            self_influence = np.asarray(self_influence)
            if self_influence.shape != (n_rows,):
                raise ValueError(
                    f"shard {shard} needs {n_rows} self-influence values, got shape {tuple(self_influence.shape)}"
                )
            if not np.issubdtype(self_influence.dtype, np.floating):
                raise ValueError(
                    f"shard {shard} needs floating-point self-influence values, got dtype {self_influence.dtype}"
                )
            if samples.num_rows != n_rows:
                raise ValueError(f"shard {shard} needs {n_rows} sample rows, got {samples.num_rows}")
            if "row" not in samples.column_names or not np.array_equal(
                numpy_of(samples.column("row")), np.arange(start, stop)
            ):
                raise ValueError(
                    f"shard {shard} holds rows {start}..{stop - 1}; its sample table must have a 'row' column with "
                    "exactly those rows"
                )
            if "sample_id" not in samples.column_names:
                raise ValueError(f"shard {shard}'s sample table must have a 'sample_id' column")
            if content_sha256 is not None and not _is_sha(content_sha256):
                raise ValueError(f"content_sha256 must be a sha256 hex digest, got {content_sha256!r}")
            listed = {kind: sorted(int(row) for row in rows) for kind, rows in (nonfinite or {}).items() if len(rows)}
            if set(listed) - {"skipped", "zeroed"}:
                raise ValueError(f"nonfinite rows are 'skipped' or 'zeroed', got {sorted(listed)}")
            for kind, rows in listed.items():
                if any(not start <= row < stop for row in rows):
                    raise ValueError(f"{kind} rows {rows[:5]} are not all rows of shard {shard} ({start}..{stop - 1})")
                if np.any(encoder.rows(np.asarray(rows) - start)):
                    raise ValueError(f"{kind} rows of shard {shard} must hold zero vectors")
            feature_sha256, feature_crc32c = encoder.finish()  # cast, checked and hashed on the way
            with np.errstate(over="ignore", invalid="ignore"):
                finite = np.isfinite(self_influence.astype(np.float32, copy=False))
            finite[encoder.nonfinite_rows] = False
            if not finite.all():
                bad = np.flatnonzero(~finite) + start
                raise NonFiniteError(
                    f"rows {bad[:10].tolist()} have non-finite features; nothing was written for shard {shard}"
                )
            if self.dtype == "float16" and encoder.peak > FLOAT16_MAX:
                raise NonFiniteError(
                    f"feature values reach {encoder.peak:.3g}, past float16's maximum 65504; build with dtype=float32 "
                    f"(nothing was written for shard {shard})"
                )
            feature_key, influence_key = self._keys(shard)
            influence_bytes = _plain_self_influence(self._array_metadata("self_influence"), self_influence)
            if influence_bytes is None:
                influence_bytes = self._zarr_encode(
                    "self_influence", start, self_influence.astype(np.float32, copy=False)
                )[1]
            samples_bytes = _parquet_bytes(samples)
            encoder.save(self._location(feature_key), crash_site="shard-before-rename")
        except BaseException:
            if encoder is not None:
                encoder.discard()  # its temporary file: nothing of this shard is left behind
            raise
        crash_point("shard-after-features")
        write_bytes_atomic(self._location(influence_key), influence_bytes)
        write_bytes_atomic(self._samples_part_path(shard), samples_bytes)
        crash_point("shard-before-record")
        record = {
            "shard": shard,
            "rows": [start, stop],
            "files": {
                feature_key: feature_sha256,
                influence_key: sha256_bytes(influence_bytes),
            },
            # checked on every read (sha256 stays the checksum of record, for verify and repairs)
            "crc32c": {feature_key: feature_crc32c, influence_key: crc32c_bytes(influence_bytes)},
            "samples_sha256": sha256_bytes(samples_bytes),
        }
        if content_sha256 is not None:
            record["content_sha256"] = content_sha256
        if listed:
            record["nonfinite"] = listed
        record[_RECORD_SEAL] = _record_seal(record)  # any damage to the record itself is then seen by its next read
        write_bytes_atomic(self._record_path(shard), json.dumps(record).encode())
        crash_point("shard-after-record")
        self.release_shard(shard)
        return record

    def finalize(self) -> bool:
        """Mark the store complete if every shard is done; returns whether it is complete now.

        Safe to call from several workers at once: each writes the same ``samples.parquet`` and an
        equivalent manifest; one that finds the build files gone adopts the completed manifest.
        """
        if self.complete:
            self._remove_build_files()
            return True
        records = []
        for shard in range(self.n_shards):
            record = self.shard_record(shard)
            if record is None:
                return self._reload_complete()
            records.append(record)
        try:
            parts = [
                _sample_table(
                    self._verified(
                        shard,
                        str(self._samples_part_path(shard).relative_to(self.path)),
                        record["samples_sha256"],
                        "the sample table",
                    ),
                    self._samples_part_path(shard),
                    *self.layout.shard_rows(shard),
                )
                for shard, record in enumerate(records)
            ]
        except CorruptStoreError:
            if self._reload_complete():
                return True
            raise
        if self.complete:  # another worker completed it while we read the parts
            return True
        samples_bytes = _parquet_bytes(pa.concat_tables(parts, promote_options="default"))
        write_bytes_atomic(self._location("samples.parquet"), samples_bytes)
        crash_point("finalize-before-manifest")
        if self._staged_from() is not None:
            crash_point("append-before-manifest")  # everything staged: the next write is the swap
        manifest = dict(self.manifest)
        # transforms another worker recorded after this one opened the store (kron's pca sides, Arnoldi's eigenbasis)
        transforms = _transforms.transform_records(self)
        if transforms:
            manifest["transforms"] = transforms
        manifest["state"] = "complete"
        manifest["shards"] = records
        manifest["samples_sha256"] = sha256_bytes(samples_bytes)
        manifest["nonfinite"] = {
            kind: sorted(row for record in records for row in record.get("nonfinite", {}).get(kind, []))
            for kind in ("skipped", "zeroed")
        }
        content = [record.get("content_sha256") for record in records]
        if all(content):
            # a hash of every training sample, in row order: the per-shard hashes hashed together
            manifest["dataset_sha256"] = sha256_bytes("".join(content).encode())
        manifest["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_manifest(self.path, manifest)
        self.manifest = manifest
        crash_point("finalize-after-manifest")
        # The manifest now holds every record; the per-shard files are no longer read.
        self._remove_build_files()
        return True

    def _reload_complete(self) -> bool:
        """Re-read the manifest; adopt it and return True if another writer has completed the store."""
        try:
            fresh = open_store(self.path)
        except GradIndexError:
            return False
        if not fresh.complete or fresh.layout != self.layout:  # (an append's old store is not its completion)
            return False
        self.manifest = fresh.manifest
        return True

    def _remove_build_files(self) -> None:
        """Delete ``_shards/`` of a complete store, or finish a committed append (``_promote_append``); best effort
        (what is left is done on the next open for writing)."""
        if self._staged_from() is not None:
            try:
                self._promote_append()
            except StoreWriteError as error:
                logging.getLogger("gradindex").warning(
                    "store %s is complete; moving its append's files out of _append/ failed (%s) and is finished by "
                    "the next writer (readers find them there meanwhile)",
                    self.path,
                    error.__cause__ or error,
                )
            return
        build_files = self.path / _SHARD_DIR  # not _at: a link there is removed (never followed) like any file
        if build_files.exists() or build_files.is_symlink():
            try:
                remove_tree(build_files, crash_site="finalize-cleanup")
            except StoreWriteError as error:
                logging.getLogger("gradindex").warning(
                    "store %s is complete; its build folder _shards/ could not be removed (%s) and goes on the next "
                    "--resume",
                    self.path,
                    error.__cause__ or error,
                )
        staged = self._staged_manifest()
        if staged is not None and staged.get("appended_from") != self.n_samples:
            # what a committed append left (stopped while removing its staging): no longer this store's append
            try:
                remove_tree(self._at(_APPEND_DIR), crash_site="append-cleanup")
            except StoreWriteError as error:
                logging.getLogger("gradindex").warning(
                    "store %s is complete; what its append staged in _append/ could not be removed (%s) and goes "
                    "on the next write",
                    self.path,
                    error.__cause__ or error,
                )

    def sweep_temporaries(self, *, keep_stopped_append: bool = False) -> int:
        """Remove temporary files that dead writers left (never a live writer's); returns how many.

        A complete store also loses its build folder, gets a committed append's files moved into place, and, unless
        ``keep_stopped_append``, loses what a stopped append staged (``_append/`` with no live writer): the store is
        then byte-identical to what it was before that append.
        """
        removed = 0
        for path in sorted(self.path.rglob(f"*{TMP_MARK}*"), reverse=True):
            if is_orphan(path):
                if path.is_dir() and not path.is_symlink():
                    remove_tree(path)
                else:
                    remove_file(path)
                removed += 1
        if self.complete:
            self._remove_build_files()
            if not keep_stopped_append and self._at(_APPEND_DIR).exists() and not self._append_writers():
                log_stopped = self.pending_append()
                remove_tree(self._at(_APPEND_DIR))
                logging.getLogger("gradindex").info(
                    "store %s: removed what a stopped append had staged (%s)",
                    self.path,
                    log_stopped.progress() if log_stopped is not None else "no shards",
                )
                removed += 1
        return removed

    # ---- transforms (query-side arrays of asymmetric methods; see _transforms.py) ------------
    def transforms(self) -> dict[str, dict]:
        """``{name: record}`` of the finished transforms under ``transforms/``."""
        return _transforms.transform_records(self)

    def write_transform(self, name: str, array: np.ndarray, *, exclusive: bool = False) -> bool:
        """Write ``transforms/NAME.npy`` durably and record it; with ``exclusive`` only if absent (returns whether
        written)."""
        self._refuse_transforms_while_staged()
        return _transforms.write_transform(self, name, array, exclusive=exclusive)

    def read_transform(self, name: str) -> np.ndarray:
        """A finished transform, checked against its recorded sha256."""
        return _transforms.read_transform(self, name)

    def write_transform_part(self, name: str, shard: int, array: np.ndarray) -> None:
        """One shard's share of a transform (write it before the shard's record)."""
        self._refuse_transforms_while_staged()
        _transforms.write_transform_part(self, name, shard, array)

    def _refuse_transforms_while_staged(self) -> None:
        # transforms live in the store's manifest and transforms/ directly: an append writing one would show before
        # its swap (appending is refused for stores whose transforms come from every row)
        if self._staged_from() is not None:
            raise IncompatibleStoreError(
                f"an append to store {self.path} cannot write transforms; rebuild with overwrite=True"
            )

    def read_transform_parts(self, name: str) -> dict[int, np.ndarray]:
        """``{shard: array}`` of the shards' shares of a transform found on disk."""
        return _transforms.read_transform_parts(self, name)

    # ---- integrity --------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems found by re-hashing every file against its recorded checksum; empty when all is well."""
        problems: list[str] = []
        for name in _ARRAYS:
            try:
                self._metadata.pop(name, None)
                self._array_metadata(name)
            except CorruptStoreError:
                problems.append(f"{name}/zarr.json is missing or fails its checksum")
        for shard in range(self.n_shards):
            try:
                record = self.shard_record(shard)
            except CorruptStoreError:
                problems.append(f"shard {shard}: its record is damaged")
                continue
            if record is None:
                problems.append(f"shard {shard}: not written")
                continue
            for key, expected in record["files"].items():
                if not is_inside(self.path, self.path / key):
                    problems.append(f"shard {shard}: {key} is a link outside the store")
                    continue
                path = self._located(key)  # (a committed append's file may still be staged)
                if not path.exists():
                    problems.append(f"shard {shard}: {key} is missing")
                elif sha256_file(path) != expected:
                    problems.append(f"shard {shard}: {key} fails its checksum")
            if not self.complete:
                part = self._samples_part_path(shard)
                if not part.exists() or sha256_file(part) != record["samples_sha256"]:
                    problems.append(f"shard {shard}: samples part is missing or fails its checksum")
        if self.complete:
            samples = self.path / "samples.parquet"
            if self._staged_from() is not None and is_inside(self.path, samples):
                samples = self._located("samples.parquet")
            if not is_inside(self.path, samples):
                problems.append("samples.parquet is a link outside the store")
            elif not samples.exists():
                problems.append("samples.parquet is missing")
            elif sha256_file(samples) != self.manifest.get("samples_sha256"):
                problems.append("samples.parquet fails its checksum")
        problems.extend(_transforms.verify_transforms(self))
        return problems

    def bad_shards(self) -> list[int]:
        """Finished shards whose files or record are missing, damaged or fail their checksums (for --repair)."""
        bad = []
        for shard in range(self.n_shards):
            try:
                record = self.shard_record(shard)
            except CorruptStoreError:
                bad.append(shard)
                continue
            if record is None:
                continue
            try:
                paths = [(self._located(key), expected) for key, expected in record["files"].items()]
                if not self.complete:
                    paths.append((self._samples_part_path(shard), record["samples_sha256"]))
            except CorruptStoreError:
                bad.append(shard)  # a link out of the store: recomputing the shard writes real files there
                continue
            if any(not path.exists() or sha256_file(path) != expected for path, expected in paths):
                bad.append(shard)
        return bad

    def reopen_for_repair(self, shards: Sequence[int]) -> None:
        """Turn a store back to building with ``shards`` marked not done, so a resume recomputes them.

        Damaged array metadata is restored from the layout (checked against its recorded checksum).
        The sample table of every other shard comes back from ``samples.parquet`` when that file is
        sound; otherwise ``missing_samples_parts`` lists the shards whose table the caller restores
        with ``restore_samples_part``.
        """
        shards = {int(shard) for shard in shards}
        self._restore_array_metadata()
        make_dir(self._shard_dir())
        if self.complete:
            table = None
            try:
                table = self.samples()
            except CorruptStoreError:
                pass  # the caller regenerates the tables (missing_samples_parts)
            rows = table.column("row").to_numpy() if table is not None else None
            for shard, record in enumerate(self.manifest["shards"]):
                if shard in shards:
                    continue
                write_bytes_atomic(self._record_path(shard), json.dumps(record).encode())
                if table is not None:
                    start, stop = self.layout.shard_rows(shard)
                    part = _parquet_bytes(table.filter(pa.array((rows >= start) & (rows < stop))))
                    if sha256_bytes(part) == record["samples_sha256"]:
                        write_bytes_atomic(self._samples_part_path(shard), part)
            manifest = {
                key: value
                for key, value in self.manifest.items()
                if key not in ("shards", "samples_sha256", "completed_at", "nonfinite", "dataset_sha256")
            }
            manifest["state"] = "building"
            write_manifest(self.path, manifest)
            self.manifest = manifest
        else:
            for shard in shards:
                remove_file(self._record_path(shard))
                remove_file(self._samples_part_path(shard))

    # ---- appending: staged under _append/, shown by one manifest swap -------------------------
    def begin_append(self, n_samples: int, fingerprint: dict, *, extra: dict | None = None) -> GradientStore:
        """Stage the growth of this complete store to ``n_samples`` rows (same rows per shard) under ``_append/``.

        Returns the staging store a build fills: its full old shards are done already, the old partial last shard
        and the new ones are left to write, and its ``finalize`` swaps the manifest, the one moment the new rows
        appear. Until then this store and every reader see the old rows only; a stopped or failed append changes
        nothing they read, and ``sweep_temporaries`` removes what it staged. Staging already there for the same
        growth (a stopped append) is continued, its finished shards kept; staging for another growth is replaced,
        unless a live writer is at it (``ShardOwnershipError``). Call ``release_append`` on the returned store when
        this process stops writing it.

        Args:
            n_samples: the grown row count (more than the store holds).
            fingerprint: the grown data set's fingerprint (its ``dataset`` entry is the grown one).
            extra: manifest keys to set (the task that grew it).
        """
        if not self.complete:
            raise IncompleteStoreError(
                f"store {self.path} is incomplete ({self.progress()}); finish it with resume=True before appending"
            )
        if n_samples <= self.n_samples:
            raise ValueError(
                f"store {self.path} holds {self.n_samples} rows; appending needs more than that, got {n_samples}"
            )
        self._remove_build_files()  # (an earlier append committed but not yet moved into place is finished first)
        old = self.layout
        layout = StoreLayout(**{**old.to_dict(), "n_samples": int(n_samples)})
        kept = old.n_samples // old.rows_per_shard  # full shards keep their files; a partial last one is rewritten
        metadata = _array_metadata(layout)
        manifest = {
            key: value
            for key, value in self.manifest.items()
            if key not in ("shards", "samples_sha256", "completed_at", "nonfinite", "dataset_sha256")
        }
        manifest.update(extra or {})
        manifest.update(
            state="building",
            layout=layout.to_dict(),
            fingerprint=fingerprint,
            appended_from=old.n_samples,
            arrays={name: sha256_bytes(data) for name, data in metadata.items()},
            append_staging={"from_shard": kept},
        )
        staging = GradientStore(self.path, manifest)
        staging.claim_timeout = self.claim_timeout
        staging._mark_writer()  # first: a sweep leaves staging that has a live writer alone
        try:
            found = staging._staged_manifest()
            if found is not None and seal(found) != seal(manifest):
                staging._refuse_if_appended_by_others()
                for item in list(self._at(_APPEND_DIR).iterdir()):  # a stopped append of other rows: start over
                    if item.name != _APPEND_WRITERS:
                        remove_tree(item) if item.is_dir() and not item.is_symlink() else remove_file(item)
                found = None
            if found is None:
                table = self.samples()
                rows = table.column("row").to_numpy()
                for shard in range(kept):
                    start, stop = old.shard_rows(shard)
                    part = _parquet_bytes(table.filter(pa.array((rows >= start) & (rows < stop))))
                    write_bytes_atomic(staging._samples_part_path(shard), part)
                    record = json.dumps(self.manifest["shards"][shard]).encode()
                    write_bytes_atomic(staging._record_path(shard), record)
                for name, data in metadata.items():
                    write_bytes_atomic(staging._location(f"{name}/zarr.json"), data)
                if not create_exclusive(staging._at(f"{_APPEND_DIR}/{_APPEND_MANIFEST}"), manifest_bytes(manifest)):
                    found = staging._staged_manifest()  # another worker of an append staged it meanwhile
                    if found is None or seal(found) != seal(manifest):
                        staging._refuse_if_appended_by_others(racing=True)
                crash_point("append-after-staging")
        except BaseException:
            staging.release_append()
            raise
        return staging

    def pending_append(self) -> GradientStore | None:
        """The append staged in this complete store's ``_append/`` and not committed (running, or stopped), as the
        store being built; None when there is none."""
        manifest = self._staged_manifest() if self.complete else None
        if manifest is None or manifest.get("state") != "building" or manifest.get("appended_from") != self.n_samples:
            return None
        try:
            staging = GradientStore(self.path, manifest)
        except (KeyError, TypeError, ValueError):
            return None
        return staging if staging._staged_from() is not None else None

    def release_append(self) -> None:
        """This process stops writing this append: its writer's mark goes; what it staged stays (to be continued)."""
        mark, self._writer_mark = self._writer_mark, None
        if mark is not None:
            forget(mark)
            try:
                remove_file(mark)
            except StoreWriteError:
                pass  # a dead writer's mark: the next sweep or append sees it as such

    def _mark_writer(self) -> None:
        """Say in ``_append/writers/`` that this process writes this append (rewritten to refresh its time)."""
        mark = self._at(f"{_APPEND_DIR}/{_APPEND_WRITERS}/{socket.gethostname()}-{os.getpid()}.json")
        payload = {"owner": "append", "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        hold(mark)
        write_bytes_atomic(mark, json.dumps(payload).encode())
        self._writer_mark = mark

    def _append_writers(self) -> list[dict]:
        """The live writers of what ``_append/`` stages, this object's own mark left out (a mark whose process is
        dead on this host, or, at a URL, older than the claim timeout, is not one)."""
        live = []
        for item in self._at(f"{_APPEND_DIR}/{_APPEND_WRITERS}").glob("*.json"):
            holder = self._read_claim(item)
            if item == self._writer_mark or not holder:
                continue
            if holder.get("host") == socket.gethostname():
                pid = holder.get("pid", -1)
                alive = in_use(item) if pid == os.getpid() else pid_alive(int(pid))
            else:
                alive = not self._claim_expired(holder)
            if alive:
                live.append(holder)
        return live

    def _refuse_if_appended_by_others(self, *, racing: bool = False) -> None:
        others = self._append_writers()
        if others or racing:
            who = f" (pid {others[0].get('pid')} on {others[0].get('host')})" if others else ""
            raise ShardOwnershipError(
                f"store {self.path} is being appended to by another writer{who} with other data; wait for it to "
                "finish (or stop it) and run this append again"
            )

    def _staged_manifest(self) -> dict | None:
        """The manifest of the append staged in ``_append/`` (None when there is none, or it fails its seal)."""
        try:
            attributes = json.loads(self._at(f"{_APPEND_DIR}/{_APPEND_MANIFEST}").read_bytes())["attributes"]
            manifest = attributes[MANIFEST_KEY]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return manifest if isinstance(manifest, dict) and attributes.get(SEAL_KEY) == seal(manifest) else None

    def _promote_append(self) -> None:
        """After an append's manifest swap: move its staged files into place (the shard files, samples.parquet, then
        the arrays' metadata, so plain Zarr readers see the new shape last), drop the staging from the manifest and
        remove ``_append/``. Readers find each file staged or in place meanwhile; a writer finding this half done
        (the appender was stopped) finishes it."""
        crash_point("append-after-manifest")
        try:
            current = open_store(self.path).manifest
        except GradIndexError:
            current = None
        if current is not None and seal(current) != seal(self.manifest):
            # another writer finished this meanwhile (and _append/ may already stage the next append: not ours)
            if current.get("state") == "complete" and current.get("layout") == self.manifest.get("layout"):
                self.manifest = current
            return
        keys = [key for shard in range(self._staged_from(), self.n_shards) for key in self._keys(shard)]
        for position, key in enumerate([*keys, *_STAGED_FILES]):
            if position == 1:
                crash_point("append-promote")
            move_file(self._at(f"{_APPEND_DIR}/{key}"), self._at(key))
        manifest = {key: value for key, value in self.manifest.items() if key != "append_staging"}
        write_manifest(self.path, manifest)
        self.manifest = manifest
        crash_point("append-before-cleanup")
        remove_tree(self._at(_APPEND_DIR), crash_site="append-cleanup")

    def missing_samples_parts(self) -> list[int]:
        """Finished shards (of a store being built) whose sample table is missing or fails its checksum."""
        missing = []
        for shard in self.done_shards():
            record = self.shard_record(shard)
            part = self._samples_part_path(shard)
            if record is not None and (not part.exists() or sha256_file(part) != record["samples_sha256"]):
                missing.append(shard)
        return missing

    def restore_samples_part(self, shard: int, samples: pa.Table) -> None:
        """Write a finished shard's sample table again; it must be byte-identical to the recorded one."""
        record = self.shard_record(shard)
        if record is None:
            raise IncompleteStoreError(f"shard {shard} of {self.path} is not written yet")
        data = _parquet_bytes(samples)
        if sha256_bytes(data) != record["samples_sha256"]:
            raise IncompatibleStoreError(
                f"the sample ids and labels of shard {shard} differ from those recorded in {self.path}; "
                "the training set changed since the build: rebuild with overwrite=True"
            )
        write_bytes_atomic(self._samples_part_path(shard), data)

    def _restore_array_metadata(self) -> None:
        expected = self.manifest.get("arrays") or {}
        for name, data in _array_metadata(self.layout).items():
            self._metadata.pop(name, None)
            try:
                self._array_metadata(name)
                continue
            except CorruptStoreError:
                pass
            if sha256_bytes(data) != expected.get(name):
                raise CorruptStoreError(
                    f"{self.path / name / 'zarr.json'} is damaged and does not match the metadata this version writes; "
                    "rebuild with overwrite=True"
                )
            write_bytes_atomic(self._at(f"{name}/zarr.json"), data)

    def describe(self) -> dict:
        """The manifest plus the build's progress, for ``gradindex info``."""
        info = {key: value for key, value in self.manifest.items() if key != "shards"}
        info["path"] = str(self.path)
        info["progress"] = self.progress()
        return info


def _remove_quietly(path: Path) -> None:
    try:
        remove_tree(path)
    except StoreWriteError:
        pass  # a later sweep removes it (its writer will be dead by then)


def sweep_orphans(path: str | Path) -> int:
    """Remove what dead writers left beside a store: half-made stores and stores moved aside by --overwrite.

    Nothing is ever written beside a remote store (it is made in place), so there is nothing to sweep."""
    path = store_path(path)
    if is_remote(path):
        return 0
    removed = 0
    for item in sorted(path.parent.glob(f"{glob.escape(path.name)}{TMP_MARK}*")):
        if is_orphan(item):
            remove_tree(item) if item.is_dir() and not item.is_symlink() else remove_file(item)
            removed += 1
    return removed


def _not_a_store(path: Path | RemotePath) -> str | None:
    """Why what is at ``path`` is not a gradindex store that overwrite=True may replace, or None when it is one: a
    folder holding only what a store holds (complete or not, its manifest even damaged), or what a stopped creator
    left."""
    if not is_remote(path) and path.is_symlink():
        return f"is a symbolic link (to {os.readlink(path)})"
    if not path.is_dir():
        return "is a file"
    foreign = sorted(
        item.name for item in path.iterdir() if item.name not in _STORE_ENTRIES and TMP_MARK not in item.name
    )
    if foreign:
        return f"is a folder holding {foreign[0]}"
    try:
        group = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None  # no manifest yet (a stopped creator's), or a damaged one: still a store
    if isinstance(group, dict) and MANIFEST_KEY not in (group.get("attributes") or {}):
        return "is a Zarr group without a gradindex manifest"
    return None


def _refuse_unless_store(path: Path | RemotePath) -> None:
    reason = _not_a_store(path)
    if reason is not None:
        raise StoreExistsError(
            f"{path} {reason}, not a gradindex store; overwrite=True replaces only a store, so choose another output "
            "path (or move it away yourself)"
        )


def create_store(
    path: str | Path | RemotePath,
    layout: StoreLayout,
    fingerprint: dict,
    *,
    extra: dict | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> GradientStore:
    """Create an empty store (state ``building``) with the given layout and fingerprint.

    The store is made whole under a temporary name and renamed into place, so it appears complete
    or not at all. With ``overwrite`` the old store is first moved aside (atomically), then deleted;
    only a gradindex store is replaced: a file, a link, or a folder holding anything else is refused
    (``StoreExistsError``) and left as it is. At a remote URL (no folder renames there) the store is made
    in place and its manifest, created exclusively, is written last: until then it does not open as a store.
    """
    path = store_path(path, storage_options)
    if is_remote(path):
        return _create_remote_store(path, layout, fingerprint, extra=extra, overwrite=overwrite)
    replaced = None
    if path.exists() or path.is_symlink():
        _refuse_unless_store(path)
        if not overwrite:
            raise StoreExistsError(
                f"{path} already exists; pass resume=True to continue its build or overwrite=True to replace it"
            )
        replaced = rename_aside(path, "old-")
    staging = tmp_path(path, "new-")
    metadata = _array_metadata(layout)
    manifest = _new_manifest(layout, fingerprint, metadata, extra)
    try:
        for name, data in metadata.items():
            write_bytes_atomic(staging / name / "zarr.json", data)
        make_dir(staging / _SHARD_DIR)
        write_manifest(staging, manifest)
        crash_point("create-before-rename")
        # The store appears under its name only once its skeleton is whole.
        rename_into_place(staging, path)
    except FileExistsError:
        _remove_quietly(staging)
        forget(staging)
        raise StoreExistsError(
            f"{path} was created by another writer meanwhile; pass resume=True to continue its build"
        ) from None
    except StoreWriteError:
        _remove_quietly(staging)
        forget(staging)  # a later sweep removes what could not be
        if replaced is not None:  # the new store could not be made: put the old one back
            forget(replaced)
            try:
                os.rename(replaced, path)
            except OSError:
                pass
        raise
    forget(staging)
    if replaced is not None:
        forget(replaced)  # from here a sweep may remove it, should this fail
        remove_tree(replaced) if replaced.is_dir() else remove_file(replaced)
    return GradientStore(path, manifest)


def _new_manifest(layout: StoreLayout, fingerprint: dict, metadata: dict[str, bytes], extra: dict | None) -> dict:
    return {
        "format": FORMAT,
        "state": "building",
        "layout": layout.to_dict(),
        "fingerprint": fingerprint,
        "arrays": {name: sha256_bytes(data) for name, data in metadata.items()},
        # every shard record of this store holds the crc32c of its files, which each read checks (stores made before
        # this key existed are read through the sha256 of their records)
        READ_CHECK_KEY: "crc32c",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def _create_remote_store(
    path: RemotePath, layout: StoreLayout, fingerprint: dict, *, extra: dict | None, overwrite: bool
) -> GradientStore:
    """``create_store`` at a URL: array metadata first, the manifest last and exclusively (one creator wins).

    ``overwrite`` deletes the old store before the new one is written (an object store cannot swap a
    folder atomically): stopped in between, the old store is gone and the new one not there yet.
    """
    meta = path / "zarr.json"
    if path.exists():
        _refuse_unless_store(path)
        if meta.exists() and not overwrite:
            raise StoreExistsError(
                f"{path} already exists; pass resume=True to continue its build or overwrite=True to replace it"
            )
        remove_tree(path)  # a store, or what a creator stopped before its manifest left (never opened as a store)
    metadata = _array_metadata(layout)
    manifest = _new_manifest(layout, fingerprint, metadata, extra)
    for name, data in metadata.items():
        write_bytes_atomic(path / name / "zarr.json", data)
    crash_point("create-before-rename")
    if not create_exclusive(meta, manifest_bytes(manifest)):
        raise StoreExistsError(
            f"{path} was created by another writer meanwhile; pass resume=True to continue its build"
        )
    return GradientStore(path, manifest)


def _format_version(format_name: Any) -> int | None:
    """The N of ``gradindex/N``, else None."""
    name, _, version = str(format_name).partition("/")
    return int(version) if name == "gradindex" and version.isdigit() else None


def _format_message(path: Any, found: Any) -> str:
    """Which side to upgrade when a store's format is not the one this gradindex reads."""
    ours, theirs = _format_version(FORMAT), _format_version(found)
    if theirs is not None and ours is not None and theirs > ours:
        return (
            f"{path} has format {found!r}, newer than this gradindex reads ({FORMAT!r}); upgrade gradindex "
            "(pip install -U gradindex) to read it"
        )
    return (
        f"{path} has format {found!r}, which this gradindex does not read ({FORMAT!r}); rebuild it with overwrite=True"
    )


def as_store(store: GradientStore | str | Path | RemotePath, storage_options: dict | None = None) -> GradientStore:
    """``store`` itself when it is an opened store, else the store opened at that path or URL (``open_store``)."""
    return store if isinstance(store, GradientStore) else open_store(store, storage_options=storage_options)


def open_store(path: str | Path | RemotePath, *, storage_options: dict | None = None) -> GradientStore:
    """Open an existing store, complete or not; cheap (shards are read on demand, each checked against its checksum).

    Args:
        path: a local folder or an fsspec URL (``s3://bucket/a.gradindex``).
        storage_options: options of the URL's fsspec filesystem (credentials, endpoint).

    Raises:
        StoreNotFoundError: no store there.
        CorruptStoreError: its manifest is unreadable or fails its checksum.
        IncompatibleStoreError: it has another format version.
    """
    path = store_path(path, storage_options)
    meta = path / "zarr.json"
    if not path.exists():
        raise StoreNotFoundError(f"no gradindex store at {path}; build one with `gradindex build ... -o {path}`")
    if not meta.exists():
        raise StoreNotFoundError(f"{path} is not a gradindex store (no zarr.json); check the path or build one there")
    meta = contained_path(path, "zarr.json", what="the manifest")
    try:
        attributes = json.loads(meta.read_bytes())["attributes"]
        manifest = attributes[MANIFEST_KEY]
        recorded_seal = attributes.get(SEAL_KEY)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptStoreError(
            f"{meta} holds no readable gradindex manifest ({type(error).__name__}); rebuild with overwrite=True"
        ) from error
    if not isinstance(manifest, dict):
        raise CorruptStoreError(f"{meta} holds no readable gradindex manifest; rebuild with overwrite=True")
    if recorded_seal != seal(manifest):
        raise CorruptStoreError(
            f"the manifest in {meta} fails its checksum (damaged, or written by another program); rebuild with "
            "--overwrite"
        )
    if manifest.get("format") != FORMAT:
        raise IncompatibleStoreError(_format_message(path, manifest.get("format")))
    try:
        store = GradientStore(path, manifest)
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptStoreError(f"the manifest of {path} is damaged ({error}); rebuild with overwrite=True") from error
    _check_manifest(path, manifest, store.layout)
    return store
