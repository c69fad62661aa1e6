"""The gradient store: a Zarr v3 group of per-sample vectors, written shard by shard.

Layout (format ``gradindex/1``)::

    NAME.gradindex/
      zarr.json            group metadata; attributes["gradindex"] is the manifest
      features/            (N, D) float16|float32, row chunks grouped into shards (one file per shard)
      self_influence/      (N,) float32, one chunk per shard
      samples.parquet      row, sample_id, label (written when the build completes)
      _shards/             per-shard records (checksums), sample parts and writer claims

A shard's bytes are encoded in memory with the very array metadata of the store, then written to
a temporary name, fsynced and renamed; only then is the shard's record written (also atomically).
The manifest says ``complete`` only after every record exists and ``samples.parquet`` is durable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.storage

from gradindex._errors import (
    CorruptStoreError,
    IncompatibleStoreError,
    IncompleteStoreError,
    NonFiniteError,
    ShardOwnershipError,
    StoreExistsError,
    StoreNotFoundError,
)
from gradindex.store._atomic import TMP_MARK, crash_point, fsync_dir, write_bytes_atomic

__all__ = [
    "FORMAT",
    "StoreLayout",
    "GradientStore",
    "create_store",
    "open_store",
    "fingerprint_differences",
]

FORMAT = "gradindex/1"
FLOAT16_MAX = 65504.0
_MANIFEST_KEY = "gradindex"
_SHARD_DIR = "_shards"


@dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """How rows are cut into shards (the unit of writing) and chunks (the unit of reading)."""

    n_samples: int
    dim: int
    dtype: str = "float16"
    rows_per_shard: int = 8192
    rows_per_chunk: int = 1024

    def __post_init__(self) -> None:
        if self.n_samples <= 0:
            raise ValueError(f"a store needs at least one sample, got n_samples={self.n_samples}")
        if self.dim <= 0:
            raise ValueError(f"vector dimension must be positive, got {self.dim}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"store dtype must be float16 or float32, got {self.dtype!r}")
        if self.rows_per_shard <= 0 or self.rows_per_chunk <= 0:
            raise ValueError("rows_per_shard and rows_per_chunk must be positive")
        if self.rows_per_shard % self.rows_per_chunk:
            raise ValueError(
                f"rows_per_shard={self.rows_per_shard} must be a multiple of rows_per_chunk={self.rows_per_chunk}"
            )

    @staticmethod
    def auto(n_samples: int, dim: int, dtype: str = "float16", *, shard_bytes: int = 64 << 20, rows_per_shard: int | None = None) -> "StoreLayout":
        """A layout with shards of about ``shard_bytes`` (or exactly ``rows_per_shard`` rows)."""
        itemsize = 2 if dtype == "float16" else 4
        row_bytes = max(1, dim * itemsize)
        if rows_per_shard is None:
            rows_per_shard = max(1, min(n_samples, shard_bytes // row_bytes))
        # chunks of ~1 MiB, dividing the shard
        target_chunk = max(1, min(rows_per_shard, (1 << 20) // row_bytes))
        rows_per_chunk = next(c for c in range(target_chunk, 0, -1) if rows_per_shard % c == 0)
        return StoreLayout(n_samples=n_samples, dim=dim, dtype=dtype, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk)

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
    def from_dict(data: dict) -> "StoreLayout":
        return StoreLayout(**{key: data[key] for key in ("n_samples", "dim", "dtype", "rows_per_shard", "rows_per_chunk")})


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


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GradientStore:
    """An opened store. Cheap to open; reads shards on demand."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.layout = StoreLayout.from_dict(manifest["layout"])
        self._features: zarr.Array | None = None
        self._self_influence: zarr.Array | None = None

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

    def _shard_dir(self) -> Path:
        return self.path / _SHARD_DIR

    def _record_path(self, shard: int) -> Path:
        return self._shard_dir() / f"{shard:06d}.json"

    def _samples_part_path(self, shard: int) -> Path:
        return self._shard_dir() / f"{shard:06d}.parquet"

    def _claim_path(self, shard: int) -> Path:
        return self._shard_dir() / f"{shard:06d}.claim"

    def shard_record(self, shard: int) -> dict | None:
        """The record of a finished shard (checksums, rows), or None while it is not done."""
        if self.complete:
            return self.manifest["shards"][shard]
        path = self._record_path(shard)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptStoreError(
                f"shard record {path} is unreadable ({error}); run `gradindex build --resume --repair` to recompute the shard"
            ) from error

    def done_shards(self) -> list[int]:
        """Shards whose data and record are durable."""
        if self.complete:
            return list(range(self.n_shards))
        return [shard for shard in range(self.n_shards) if self._record_path(shard).exists()]

    def progress(self) -> str:
        done = self.done_shards()
        rows = sum(self.layout.shard_rows(shard)[1] - self.layout.shard_rows(shard)[0] for shard in done)
        return f"{len(done)}/{self.n_shards} shards ({rows}/{self.n_samples} rows)"

    # ---- arrays -----------------------------------------------------------------------------
    def _zarr_store(self) -> zarr.storage.LocalStore:
        return zarr.storage.LocalStore(self.path, read_only=True)

    @property
    def features_array(self) -> zarr.Array:
        if self._features is None:
            self._features = zarr.open_array(self._zarr_store(), path="features", mode="r")
        return self._features

    @property
    def self_influence_array(self) -> zarr.Array:
        if self._self_influence is None:
            self._self_influence = zarr.open_array(self._zarr_store(), path="self_influence", mode="r")
        return self._self_influence

    def _require_readable(self, allow_incomplete: bool) -> list[int]:
        if self.complete:
            return list(range(self.n_shards))
        if not allow_incomplete:
            raise IncompleteStoreError(
                f"store {self.path} is incomplete ({self.progress()} written); finish it with "
                "`gradindex build ... --resume`, or pass allow_incomplete=True (--allow-incomplete) to use the finished part"
            )
        return self.done_shards()

    def _check_shard_file(self, shard: int, path: Path, expected_sha: str | None) -> None:
        if not path.exists():
            raise CorruptStoreError(f"{path} is missing; run `gradindex verify {self.path}` and repair with --resume --repair")
        if path.stat().st_size == 0:
            raise CorruptStoreError(f"{path} is empty; run `gradindex verify {self.path}` and repair with --resume --repair")

    def read_shard(self, shard: int, *, allow_incomplete: bool = False) -> np.ndarray:
        """Rows of one shard as stored (float16 or float32), ``[n_rows, D]``."""
        readable = self._require_readable(allow_incomplete)
        if shard not in readable:
            raise IncompleteStoreError(f"shard {shard} of {self.path} is not written yet")
        start, stop = self.layout.shard_rows(shard)
        self._check_shard_file(shard, self.path / "features" / "c" / str(shard) / "0", None)
        try:
            return np.asarray(self.features_array[start:stop])
        except Exception as error:  # zarr raises many kinds on damaged bytes
            raise CorruptStoreError(
                f"shard {shard} of {self.path} cannot be decoded ({type(error).__name__}: {error}); "
                f"run `gradindex verify {self.path}`"
            ) from error

    def iter_blocks(self, *, allow_incomplete: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, vectors)`` per readable shard, in row order, one shard in memory at a time."""
        for shard in self._require_readable(allow_incomplete):
            yield self.layout.shard_rows(shard)[0], self.read_shard(shard, allow_incomplete=allow_incomplete)

    def read_features(self, *, allow_incomplete: bool = False) -> np.ndarray:
        """All readable rows stacked, as stored dtype; rows of unwritten shards are absent."""
        blocks = [block for _, block in self.iter_blocks(allow_incomplete=allow_incomplete)]
        if not blocks:
            return np.zeros((0, self.dim), dtype=self.dtype)
        return np.concatenate(blocks)

    def read_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Feature vectors of chosen rows, ``[len(rows), D]`` float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_samples):
            raise IndexError(f"rows must be in [0, {self.n_samples}), got {rows.min()}..{rows.max()}")
        return np.asarray(self.features_array.get_orthogonal_selection((rows, slice(None))), dtype=np.float32)

    def self_influence(self, *, allow_incomplete: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)`` of every readable row, scores float32."""
        row_blocks, score_blocks = [], []
        for shard in self._require_readable(allow_incomplete):
            start, stop = self.layout.shard_rows(shard)
            row_blocks.append(np.arange(start, stop, dtype=np.int64))
            score_blocks.append(np.asarray(self.self_influence_array[start:stop], dtype=np.float32))
        if not row_blocks:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(row_blocks), np.concatenate(score_blocks)

    def samples(self, *, allow_incomplete: bool = False) -> pa.Table:
        """``row, sample_id, label`` of every readable row, in row order."""
        if self.complete:
            path = self.path / "samples.parquet"
            try:
                return pq.read_table(path)
            except FileNotFoundError as error:
                raise CorruptStoreError(f"{path} is missing from a complete store; rebuild it with --overwrite") from error
            except (pa.ArrowInvalid, OSError) as error:
                raise CorruptStoreError(f"{path} is unreadable ({error}); rebuild it with --overwrite") from error
        parts = [pq.read_table(self._samples_part_path(shard)) for shard in self._require_readable(allow_incomplete)]
        if not parts:
            return pa.table({"row": pa.array([], pa.int64()), "sample_id": pa.array([], pa.string()), "label": pa.array([], pa.int64())})
        return pa.concat_tables(parts)

    # ---- writing ----------------------------------------------------------------------------
    def claim_shard(self, shard: int, *, owner: str) -> None:
        """Take ownership of a shard, or fail if a live writer (or a finished record) has it."""
        if self._record_path(shard).exists():
            raise ShardOwnershipError(f"shard {shard} of {self.path} is already finished")
        path = self._claim_path(shard)
        payload = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_claim(path)
                if holder.get("owner") == owner:
                    return
                if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
                    # A dead writer's claim: move it aside; only one contender's rename succeeds.
                    try:
                        os.rename(path, path.with_name(f"{path.name}{TMP_MARK}stale-{uuid.uuid4().hex}"))
                    except FileNotFoundError:
                        pass
                    continue
                raise ShardOwnershipError(
                    f"shard {shard} of {self.path} is owned by writer {holder.get('owner')} "
                    f"(pid {holder.get('pid')} on {holder.get('host')}); give each worker disjoint shards with --shard I/N"
                )
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            return
        raise ShardOwnershipError(f"could not claim shard {shard} of {self.path}: another writer raced for it")

    @staticmethod
    def _read_claim(path: Path) -> dict:
        try:
            return json.loads(path.read_text() or "{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def release_shard(self, shard: int) -> None:
        try:
            self._claim_path(shard).unlink()
        except FileNotFoundError:
            pass

    def _encode(self, name: str, start: int, values: np.ndarray) -> tuple[str, bytes]:
        """Bytes of the chunk/shard file holding ``values`` at ``start``, encoded exactly as the store's array would."""
        memory = zarr.storage.MemoryStore()
        metadata = json.loads((self.path / name / "zarr.json").read_text())
        memory._store_dict[f"{name}/zarr.json"] = zarr.core.buffer.default_buffer_prototype().buffer.from_bytes(
            json.dumps(metadata).encode()
        )
        array = zarr.open_array(memory, path=name, mode="r+")
        array[start : start + len(values)] = values
        keys = [key for key in memory._store_dict if key.startswith(f"{name}/c/")]
        if len(keys) != 1:
            raise RuntimeError(f"encoding rows {start}..{start + len(values)} of {name} touched {len(keys)} files, expected 1")
        return keys[0], memory._store_dict[keys[0]].to_bytes()

    def write_shard(self, shard: int, features: np.ndarray, self_influence: np.ndarray, samples: pa.Table) -> dict:
        """Write one shard durably and record it. ``features`` is ``[n_rows, D]`` float32 (cast here)."""
        start, stop = self.layout.shard_rows(shard)
        n_rows = stop - start
        if features.shape != (n_rows, self.dim):
            raise ValueError(f"shard {shard} needs features of shape ({n_rows}, {self.dim}), got {tuple(features.shape)}")
        if self_influence.shape != (n_rows,):
            raise ValueError(f"shard {shard} needs {n_rows} self-influence values, got shape {tuple(self_influence.shape)}")
        if samples.num_rows != n_rows:
            raise ValueError(f"shard {shard} needs {n_rows} sample rows, got {samples.num_rows}")
        if not np.isfinite(features).all():
            bad = np.flatnonzero(~np.isfinite(features).all(axis=1)) + start
            raise NonFiniteError(f"rows {bad[:10].tolist()} have non-finite features; nothing was written for shard {shard}")
        if self.dtype == "float16":
            peak = float(np.abs(features).max()) if features.size else 0.0
            if peak > FLOAT16_MAX:
                raise NonFiniteError(
                    f"feature values reach {peak:.3g}, past float16's maximum 65504; build with --dtype float32 "
                    f"(nothing was written for shard {shard})"
                )
        stored = features.astype(self.dtype, copy=False)
        feature_key, feature_bytes = self._encode("features", start, stored)
        influence_key, influence_bytes = self._encode("self_influence", start, self_influence.astype(np.float32, copy=False))
        write_bytes_atomic(self.path / feature_key, feature_bytes, crash_site="shard-before-rename")
        crash_point("shard-after-features")
        write_bytes_atomic(self.path / influence_key, influence_bytes)
        sink = pa.BufferOutputStream()
        pq.write_table(samples, sink)
        samples_bytes = sink.getvalue().to_pybytes()
        write_bytes_atomic(self._samples_part_path(shard), samples_bytes)
        crash_point("shard-before-record")
        record = {
            "shard": shard,
            "rows": [start, stop],
            "files": {
                feature_key: _sha256(feature_bytes),
                influence_key: _sha256(influence_bytes),
            },
            "samples_sha256": _sha256(samples_bytes),
        }
        write_bytes_atomic(self._record_path(shard), json.dumps(record).encode())
        crash_point("shard-after-record")
        self.release_shard(shard)
        return record

    def finalize(self) -> bool:
        """Mark the store complete if every shard is done; returns whether it is complete now."""
        if self.complete:
            return True
        records = [self.shard_record(shard) for shard in range(self.n_shards)]
        if any(record is None for record in records):
            return False
        parts = [pq.read_table(self._samples_part_path(shard)) for shard in range(self.n_shards)]
        table = pa.concat_tables(parts, promote_options="default")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        samples_bytes = sink.getvalue().to_pybytes()
        write_bytes_atomic(self.path / "samples.parquet", samples_bytes)
        crash_point("finalize-before-manifest")
        manifest = dict(self.manifest)
        manifest["state"] = "complete"
        manifest["shards"] = records
        manifest["samples_sha256"] = _sha256(samples_bytes)
        manifest["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_manifest(self.path, manifest)
        self.manifest = manifest
        crash_point("finalize-after-manifest")
        # The manifest now holds every record; the per-shard files are no longer read.
        shutil.rmtree(self._shard_dir(), ignore_errors=True)
        return True

    def sweep_temporaries(self) -> int:
        """Remove orphaned temporary files a killed writer left; returns how many."""
        removed = 0
        for path in self.path.rglob(f"*{TMP_MARK}*"):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
        return removed

    # ---- integrity --------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems found by re-hashing every shard file against its record; empty when all is well."""
        problems: list[str] = []
        for shard in range(self.n_shards):
            record = self.shard_record(shard)
            if record is None:
                problems.append(f"shard {shard}: not written")
                continue
            for key, expected in record["files"].items():
                path = self.path / key
                if not path.exists():
                    problems.append(f"shard {shard}: {key} is missing")
                elif _file_sha256(path) != expected:
                    problems.append(f"shard {shard}: {key} fails its checksum")
            if not self.complete:
                part = self._samples_part_path(shard)
                if not part.exists() or _file_sha256(part) != record["samples_sha256"]:
                    problems.append(f"shard {shard}: samples part is missing or fails its checksum")
        if self.complete:
            samples = self.path / "samples.parquet"
            if not samples.exists():
                problems.append("samples.parquet is missing")
            elif _file_sha256(samples) != self.manifest.get("samples_sha256"):
                problems.append("samples.parquet fails its checksum")
        return problems

    def bad_shards(self) -> list[int]:
        """Shards whose files are missing or fail their checksums (for --repair)."""
        bad = []
        for shard in range(self.n_shards):
            record = self.shard_record(shard)
            if record is None:
                continue
            for key, expected in record["files"].items():
                path = self.path / key
                if not path.exists() or _file_sha256(path) != expected:
                    bad.append(shard)
                    break
        return bad

    def reopen_for_repair(self, shards: Sequence[int]) -> None:
        """Turn a store back to building with ``shards`` marked not done, so a resume recomputes them."""
        shard_dir = self._shard_dir()
        shard_dir.mkdir(exist_ok=True)
        if self.complete:
            for shard, record in enumerate(self.manifest["shards"]):
                if shard in shards:
                    continue
                write_bytes_atomic(self._record_path(shard), json.dumps(record).encode())
            # samples parts come back from samples.parquet
            table = pq.read_table(self.path / "samples.parquet")
            rows = table.column("row").to_numpy()
            for shard in range(self.n_shards):
                if shard in shards:
                    continue
                start, stop = self.layout.shard_rows(shard)
                part = table.filter(pa.array((rows >= start) & (rows < stop)))
                sink = pa.BufferOutputStream()
                pq.write_table(part, sink)
                write_bytes_atomic(self._samples_part_path(shard), sink.getvalue().to_pybytes())
            manifest = {key: value for key, value in self.manifest.items() if key not in ("shards", "samples_sha256", "completed_at")}
            manifest["state"] = "building"
            _write_manifest(self.path, manifest)
            self.manifest = manifest
        else:
            for shard in shards:
                try:
                    self._record_path(shard).unlink()
                except FileNotFoundError:
                    pass

    def describe(self) -> dict:
        """The manifest plus the build's progress, for ``gradindex info``."""
        info = {key: value for key, value in self.manifest.items() if key != "shards"}
        info["path"] = str(self.path)
        info["progress"] = self.progress()
        return info


def _write_manifest(path: Path, manifest: dict) -> None:
    group = {"zarr_format": 3, "node_type": "group", "attributes": {_MANIFEST_KEY: manifest}}
    write_bytes_atomic(path / "zarr.json", json.dumps(group, indent=1, sort_keys=True).encode())


def create_store(path: str | Path, layout: StoreLayout, fingerprint: dict, *, extra: dict | None = None, overwrite: bool = False) -> GradientStore:
    """Create an empty store (state ``building``) with the given layout and fingerprint."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise StoreExistsError(
                f"{path} already exists; pass --resume to continue its build or --overwrite to replace it"
            )
        if path.is_dir() and not (path / "zarr.json").exists() and any(path.iterdir()):
            raise StoreExistsError(f"{path} exists and is not a gradindex store; refusing to delete it, choose another -o path")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    staging = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    local = zarr.storage.LocalStore(staging)
    zarr.create_array(
        local,
        name="features",
        shape=(layout.n_samples, layout.dim),
        chunks=(layout.rows_per_chunk, layout.dim),
        shards=(layout.rows_per_shard, layout.dim),
        dtype=layout.dtype,
        compressors=None,
        fill_value=0,
    )
    zarr.create_array(
        local,
        name="self_influence",
        shape=(layout.n_samples,),
        chunks=(layout.rows_per_shard,),
        dtype="float32",
        compressors=None,
        fill_value=0,
    )
    (staging / _SHARD_DIR).mkdir()
    manifest = {
        "format": FORMAT,
        "state": "building",
        "layout": layout.to_dict(),
        "fingerprint": fingerprint,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    _write_manifest(staging, manifest)
    # The store appears under its name only once its skeleton is whole.
    os.replace(staging, path)
    fsync_dir(path.parent)
    return GradientStore(path, manifest)


def open_store(path: str | Path) -> GradientStore:
    """Open an existing store (complete or not); raises StoreNotFoundError / CorruptStoreError."""
    path = Path(path)
    meta = path / "zarr.json"
    if not path.exists():
        raise StoreNotFoundError(f"no gradindex store at {path}; build one with `gradindex build ... -o {path}`")
    if not meta.exists():
        raise StoreNotFoundError(f"{path} is not a gradindex store (no zarr.json); check the path or build one there")
    try:
        group = json.loads(meta.read_text())
        manifest = group["attributes"][_MANIFEST_KEY]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CorruptStoreError(f"{meta} holds no readable gradindex manifest ({type(error).__name__}); rebuild with --overwrite") from error
    if manifest.get("format") != FORMAT:
        raise IncompatibleStoreError(
            f"{path} has format {manifest.get('format')!r}, this gradindex reads {FORMAT!r}; rebuild it with --overwrite"
        )
    try:
        return GradientStore(path, manifest)
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptStoreError(f"the manifest of {path} is damaged ({error}); rebuild with --overwrite") from error
