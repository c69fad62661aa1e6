"""The build and query stages: the one place where task, featurizer, store and index meet."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from gradindex import __version__
from gradindex._errors import (
    CheckpointError,
    GradIndexError,
    IncompatibleStoreError,
    StoreExistsError,
    TaskSpecError,
)
from gradindex.checkpoints import CheckpointSpec, file_sha256, parse_checkpoints
from gradindex.featurize import Featurizer, iter_batches, labels_of, load_checkpoints, model_fingerprint, resolve_device
from gradindex.index import ExactIndex, search_blocks
from gradindex.methods import METHODS, make_featurizer
from gradindex.project import ProjectionSpec
from gradindex.store import GradientStore, StoreLayout, create_store, fingerprint_differences, open_store
from gradindex.task import Task, load_task

__all__ = [
    "BuildConfig",
    "build",
    "query",
    "search_store",
    "self_influence",
    "info",
    "verify",
    "default_memory_budget",
]

log = logging.getLogger("gradindex")


def default_memory_budget() -> int:
    """A quarter of physical memory, at most 8 GiB: what in-memory search may hold."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(8 << 30, total // 4))


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True, leave=False)


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What a build computes (fingerprinted) and how (batching, device, layout)."""

    method: str = "tracin"
    projection: str = "rademacher"
    proj_dim: int = 1024
    seed: int = 0
    layers: tuple[str, ...] | None = None
    normalize: bool = False
    dtype: str = "float16"
    batch_size: int = 256
    device: str = "auto"
    rows_per_shard: int | None = None
    method_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.rows_per_shard is not None and self.rows_per_shard <= 0:
            raise ValueError(f"rows per shard must be positive, got {self.rows_per_shard}")
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
        self.projection_spec()  # validates kind, dim, seed

    def projection_spec(self) -> ProjectionSpec:
        return ProjectionSpec(kind=self.projection, dim=self.proj_dim, seed=self.seed)  # type: ignore[arg-type]


def _dataset_probe(dataset: Any) -> str:
    """A hash of the dataset's size and of up to 32 evenly spaced items: cheap, and catches a swapped data set."""
    n_samples = len(dataset)
    digest = hashlib.sha256(str(n_samples).encode())
    for position in np.unique(np.linspace(0, n_samples - 1, num=min(32, n_samples)).astype(np.int64)):
        for leaf in torch.utils._pytree.tree_leaves(dataset[int(position)]):
            if isinstance(leaf, torch.Tensor):
                digest.update(leaf.detach().cpu().contiguous().numpy().tobytes())
            elif isinstance(leaf, np.ndarray):
                digest.update(np.ascontiguousarray(leaf).tobytes())
            else:
                digest.update(repr(leaf).encode())
    return digest.hexdigest()


def _fingerprint(featurizer: Featurizer, checkpoints: Sequence, task: Task, dtype: str, model_print: dict) -> dict:
    return {
        **featurizer.fingerprint(),
        "model": model_print,
        "checkpoints": [{"sha256": ckpt.sha256, "weight": ckpt.spec.weight} for ckpt in checkpoints],
        "dataset": {"n_samples": len(task.train), "probe_sha256": _dataset_probe(task.train)},
        "dtype": dtype,
    }


def _mismatch_message(path: Path, diffs: list[str], expected: dict, actual: dict, fix: str) -> str:
    def value(tree: Any, dotted: str) -> Any:
        node = tree
        for part in dotted.replace("[", ".[").split("."):
            if not part:
                continue
            try:
                node = node[int(part[1:-1])] if part.startswith("[") else node[part]
            except (KeyError, IndexError, TypeError, ValueError):
                return "<absent>"
        return node

    shown = []
    for diff in diffs[:4]:
        left, right = value(expected, diff), value(actual, diff)
        if isinstance(left, str) and len(left) == 64 and isinstance(right, str):  # sha256 digests: a prefix is enough
            shown.append(f"{diff}: store has {left[:12]}…, this call has {right[:12]}…")
        elif isinstance(left, (str, int, float, bool, type(None))) and len(repr(left)) < 80:
            shown.append(f"{diff}: store has {left!r}, this call has {right!r}")
        else:
            shown.append(diff)
    more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
    return f"store {path} does not match this call: {'; '.join(shown)}{more}. {fix}"


def _absolute_spec(spec: str) -> str:
    """A file-based task spec with an absolute path, so the store's recorded task works from any directory."""
    target, sep, attr = spec.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{attr}"
    return spec


def _shard_assignment(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is not None:
        index, count = shard
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index, count = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    else:
        return 0, 1
    if count <= 0 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {index}/{count}")
    return index, count


def build(
    task: "Task | str",
    checkpoints: Sequence["str | CheckpointSpec | tuple"],
    output: str | Path,
    config: BuildConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool | None = None,
    **options: Any,
) -> GradientStore:
    """Featurize the task's training set at the checkpoints and write a store at ``output``.

    ``options`` are BuildConfig fields (``proj_dim=512, projection="sjlt", dtype="float32"``, ...).
    ``shard=(I, N)`` computes only shards I, I+N, I+2N, ...; the worker that finishes the last one
    completes the store. Returns the opened store (complete unless other workers still run).
    """
    if config is None:
        config = BuildConfig(**options)
    elif options:
        config = BuildConfig(**{**asdict(config), **options})
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues a build, overwrite replaces it")
    task_spec = _absolute_spec(task) if isinstance(task, str) else None
    task = load_task(task)
    specs = parse_checkpoints(checkpoints)
    device = resolve_device(config.device)
    shard_index, shard_count = _shard_assignment(shard)
    output = Path(output)

    loaded = load_checkpoints(task, specs, device)
    featurizer = make_featurizer(
        config.method, task, loaded, projection=config.projection_spec(), layers=config.layers,
        normalize=config.normalize, device=device, options=config.method_options,
    )
    fingerprint = _fingerprint(featurizer, loaded, task, config.dtype, model_fingerprint(task.model()))
    n_samples = len(task.train)
    if n_samples == 0:
        raise TaskSpecError("the task's training set is empty; there is nothing to index")

    if output.exists() and (resume or (shard_count > 1 and not overwrite)):
        store = open_store(output)
        diffs = fingerprint_differences(store.fingerprint, fingerprint)
        if diffs:
            raise IncompatibleStoreError(
                _mismatch_message(output, diffs, store.fingerprint, fingerprint, "Resume with the store's settings, or rebuild with --overwrite.")
            )
        if store.complete:
            log.info("store %s is already complete", output)
            return store
        store.sweep_temporaries()
    else:
        if output.exists() and not overwrite:
            raise StoreExistsError(f"{output} already exists; pass --resume to continue its build or --overwrite to replace it")
        layout = StoreLayout.auto(n_samples, featurizer.dim, config.dtype, rows_per_shard=config.rows_per_shard)
        extra = {
            "gradindex_version": __version__,
            "task": {"spec": task_spec, "name": task.name},
            "checkpoints": [spec.to_dict() for spec in specs],
            "build": {"batch_size": config.batch_size, "device": str(device)},
        }
        try:
            store = create_store(output, layout, fingerprint, extra=extra, overwrite=overwrite)
        except StoreExistsError:
            if shard_count > 1:  # another worker created it first
                store = open_store(output)
            else:
                raise

    mine = [index for index in range(store.n_shards) if index % shard_count == shard_index]
    todo = [index for index in mine if store.shard_record(index) is None]
    sample_ids = task.train_sample_ids()
    owner = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"
    total_rows = sum(store.layout.shard_rows(index)[1] - store.layout.shard_rows(index)[0] for index in todo)
    bar = _progress(total_rows, f"featurize {output.name}", progress)
    started = time.perf_counter()
    try:
        for index in todo:
            _build_shard(store, index, task, featurizer, sample_ids, config, owner, bar)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    if total_rows:
        log.info("featurized %d samples in %.1fs (%.0f samples/s)", total_rows, elapsed, total_rows / max(elapsed, 1e-9))
    store.finalize()
    return store


def _build_shard(store: GradientStore, index: int, task: Task, featurizer: Featurizer, sample_ids: list, config: BuildConfig, owner: str, bar) -> None:
    store.claim_shard(index, owner=owner)
    start, stop = store.layout.shard_rows(index)
    features = np.empty((stop - start, featurizer.dim), dtype=np.float32)
    labels: list[np.ndarray] = []
    position = 0
    with torch.inference_mode(False), torch.enable_grad():
        for batch in iter_batches(task.train, range(start, stop), config.batch_size, task.collate):
            vectors = featurizer.featurize(batch).detach().cpu().numpy()
            features[position : position + len(vectors)] = vectors
            batch_labels = labels_of(batch)
            if batch_labels is not None:
                labels.append(batch_labels)
            position += len(vectors)
            bar.update(len(vectors))
    if position != stop - start:
        raise TaskSpecError(f"the training set yielded {position} samples for rows {start}..{stop}; its __len__ disagrees with its items")
    self_scores = np.einsum("ij,ij->i", features, features, dtype=np.float64).astype(np.float32)
    columns = {"row": pa.array(np.arange(start, stop, dtype=np.int64)), "sample_id": _id_array(sample_ids[start:stop])}
    if labels and sum(len(part) for part in labels) == stop - start:
        columns["label"] = pa.array(np.concatenate(labels))
    store.write_shard(index, features, self_scores, pa.table(columns))


def _id_array(ids: Sequence) -> pa.Array:
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in ids):
        return pa.array(np.asarray(ids, dtype=np.int64))
    return pa.array([str(value) for value in ids], pa.string())


# ---- query --------------------------------------------------------------------------------------


def _open(store: "GradientStore | str | Path") -> GradientStore:
    return store if isinstance(store, GradientStore) else open_store(store)


def search_store(
    store: "GradientStore | str | Path",
    queries: np.ndarray,
    k: int,
    *,
    opponents: bool = False,
    memory_budget: int | None = None,
    allow_incomplete: bool = False,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search of ``queries [q, D]`` over the store: ``(scores [q, k'], rows [q, k'])``.

    Opponents are the top-k of the negated queries; their scores are reported as the true (negative) influence.
    The store is searched in memory when it fits ``memory_budget`` bytes (as float32), else streamed shard by shard.
    """
    store = _open(store)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != store.dim:
        raise IncompatibleStoreError(f"queries have shape {list(queries.shape)} but store {store.path} holds vectors of dimension {store.dim}")
    searched = -queries if opponents else queries
    budget = default_memory_budget() if memory_budget is None else memory_budget
    store._require_readable(allow_incomplete)
    if store.n_samples * store.dim * 4 <= budget:
        index = ExactIndex(store.dim, use_gpu=use_gpu)
        for first_row, block in store.iter_blocks(allow_incomplete=allow_incomplete):
            if first_row != index.ntotal:  # holes (unfinished shards) must not shift row numbers
                return _streamed(store, searched, k, allow_incomplete, use_gpu, opponents)
            index.add(block)
        scores, rows = index.search(searched, k)
    else:
        return _streamed(store, searched, k, allow_incomplete, use_gpu, opponents)
    return (-scores if opponents else scores), rows


def _streamed(store, searched, k, allow_incomplete, use_gpu, opponents):
    scores, rows = search_blocks(store.iter_blocks(allow_incomplete=allow_incomplete), searched, k, use_gpu=use_gpu)
    return (-scores if opponents else scores), rows


def _query_featurizer(store: GradientStore, task: Task, checkpoints, device: torch.device) -> tuple[Featurizer, list]:
    fingerprint = store.fingerprint
    recorded = store.manifest.get("checkpoints", [])
    if checkpoints is None:
        specs = [CheckpointSpec(path=item["path"], weight=item["weight"]) for item in recorded]
    else:
        specs = parse_checkpoints(checkpoints)
    if len(specs) != len(fingerprint["checkpoints"]):
        raise IncompatibleStoreError(
            f"store {store.path} was built from {len(fingerprint['checkpoints'])} checkpoints; this query gives {len(specs)}. "
            "Query with the store's checkpoints."
        )
    for position, (spec, expected) in enumerate(zip(specs, fingerprint["checkpoints"])):
        if not Path(spec.path).is_file():
            raise CheckpointError(
                f"checkpoint {spec.path} (position {position} of store {store.path}) is not there; pass the moved files with --checkpoint"
            )
        if file_sha256(spec.path) != expected["sha256"]:
            raise IncompatibleStoreError(
                f"checkpoints[{position}].sha256: {spec.path} is not the file store {store.path} was built from. "
                "Query with the store's checkpoints or rebuild with --overwrite."
            )
    specs = [CheckpointSpec(path=spec.path, weight=expected["weight"]) for spec, expected in zip(specs, fingerprint["checkpoints"])]
    model_print = model_fingerprint(task.model())
    if model_print != fingerprint["model"]:
        diffs = fingerprint_differences(fingerprint["model"], model_print, "model")
        raise IncompatibleStoreError(
            _mismatch_message(store.path, diffs, {"model": fingerprint["model"]}, {"model": model_print}, "Query with the task the store was built from.")
        )
    dataset = {"n_samples": len(task.train), "probe_sha256": _dataset_probe(task.train)}
    diffs = fingerprint_differences(fingerprint["dataset"], dataset, "dataset")
    if diffs:
        raise IncompatibleStoreError(
            _mismatch_message(store.path, diffs, {"dataset": fingerprint["dataset"]}, {"dataset": dataset},
                              "The task's training set is not the one the store indexes; query with the task it was built from.")
        )
    loaded = load_checkpoints(task, specs, device)
    method = fingerprint["method"]
    featurizer = make_featurizer(
        method["name"], task, loaded, projection=ProjectionSpec.from_dict(fingerprint["projection"]),
        layers=fingerprint.get("layers"), normalize=method.get("normalize", False), device=device,
        options={key: value for key, value in method.items() if key not in ("name", "normalize")},
    )
    actual = featurizer.fingerprint()
    diffs = fingerprint_differences({key: fingerprint.get(key) for key in actual}, actual)
    if diffs:
        raise IncompatibleStoreError(_mismatch_message(store.path, diffs, fingerprint, actual, "Query with the store's settings."))
    return featurizer, loaded


def _task_for(store: GradientStore, task: "Task | str | None") -> Task:
    if task is None:
        spec = (store.manifest.get("task") or {}).get("spec")
        if not spec:
            raise TaskSpecError(f"store {store.path} does not record its task (it was built from a Python object); pass --task SPEC")
        return load_task(spec)
    return load_task(task)


def _parse_samples(samples: "Sequence[int] | str | None", n_available: int) -> list[int]:
    if samples is None:
        return list(range(n_available))
    if isinstance(samples, str):
        picked: list[int] = []
        for part in samples.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    low, high = part.split("-", 1)
                    picked.extend(range(int(low), int(high) + 1))
                else:
                    picked.append(int(part))
            except ValueError:
                raise ValueError(f"--samples {samples!r} must be indices and ranges like 0,5,10-19") from None
        samples = picked
    picked = [int(value) for value in samples]
    if not picked:
        raise ValueError("no query samples given; pass --samples 0,1,2 or --all")
    bad = [value for value in picked if not 0 <= value < n_available]
    if bad:
        raise ValueError(f"query samples {bad[:5]} are out of range: the split has {n_available} samples (0..{n_available - 1})")
    return picked


def query(
    store: "GradientStore | str | Path",
    task: "Task | str | None" = None,
    *,
    split: str = "test",
    samples: "Sequence[int] | str | None" = None,
    k: int = 10,
    opponents: bool = False,
    checkpoints: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    memory_budget: int | None = None,
    allow_incomplete: bool = False,
    use_gpu: bool | None = None,
    progress: bool | None = None,
) -> pa.Table:
    """The k most influential training samples for each query sample.

    Returns a table ``query, query_id, rank, row, sample_id, score``: ``query`` numbers the query
    samples in the order given, ``query_id`` is the sample's index in ``split``, ``row`` the store row,
    ``score`` ⟨φ(q), φ(z)⟩ (positive = proponent; with ``opponents=True`` the most negative).
    """
    store = _open(store)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    store._require_readable(allow_incomplete)
    task = _task_for(store, task)
    dataset = task.split(split)
    picked = _parse_samples(samples, len(dataset))
    device_ = resolve_device(device)
    featurizer, _ = _query_featurizer(store, task, checkpoints, device_)
    vectors = np.empty((len(picked), featurizer.dim), dtype=np.float32)
    position = 0
    bar = _progress(len(picked), "featurize queries", progress)
    with torch.enable_grad():
        for batch in iter_batches(dataset, picked, batch_size, task.collate):
            block = featurizer.featurize(batch).detach().cpu().numpy()
            vectors[position : position + len(block)] = block
            position += len(block)
            bar.update(len(block))
    bar.close()
    scores, rows = search_store(store, vectors, k, opponents=opponents, memory_budget=memory_budget, allow_incomplete=allow_incomplete, use_gpu=use_gpu)
    return _result_table(store, np.asarray(picked), scores, rows, allow_incomplete)


def _sample_ids(store: GradientStore, rows: np.ndarray, allow_incomplete: bool) -> pa.Array:
    samples = store.samples(allow_incomplete=allow_incomplete)
    ids = samples.column("sample_id")
    if store.complete:
        return ids.take(pa.array(rows))
    lookup = {int(row): position for position, row in enumerate(samples.column("row").to_numpy())}
    return ids.take(pa.array([lookup[int(row)] for row in rows]))


def _result_table(store: GradientStore, query_ids: np.ndarray, scores: np.ndarray, rows: np.ndarray, allow_incomplete: bool) -> pa.Table:
    n_queries, found = rows.shape
    flat_rows = rows.reshape(-1).astype(np.int64)
    return pa.table(
        {
            "query": pa.array(np.repeat(np.arange(n_queries, dtype=np.int64), found)),
            "query_id": pa.array(np.repeat(query_ids.astype(np.int64), found)),
            "rank": pa.array(np.tile(np.arange(1, found + 1, dtype=np.int64), n_queries)),
            "row": pa.array(flat_rows),
            "sample_id": _sample_ids(store, flat_rows, allow_incomplete),
            "score": pa.array(scores.reshape(-1).astype(np.float32)),
        }
    )


def self_influence(store: "GradientStore | str | Path", *, top: int | None = None, allow_incomplete: bool = False) -> pa.Table:
    """Training samples ranked by self-influence ⟨φ(z), φ(z)⟩, highest first: ``rank, row, sample_id, score``."""
    store = _open(store)
    if top is not None and (isinstance(top, bool) or top <= 0):
        raise ValueError(f"--top must be a positive integer, got {top}")
    rows, scores = store.self_influence(allow_incomplete=allow_incomplete)
    order = np.lexsort((rows, -scores.astype(np.float64)))
    if top is not None:
        order = order[:top]
    picked = rows[order]
    return pa.table(
        {
            "rank": pa.array(np.arange(1, len(order) + 1, dtype=np.int64)),
            "row": pa.array(picked),
            "sample_id": _sample_ids(store, picked, allow_incomplete),
            "score": pa.array(scores[order]),
        }
    )


def info(store: "GradientStore | str | Path") -> dict:
    """The store's manifest and build progress."""
    return _open(store).describe()


def verify(store: "GradientStore | str | Path") -> list[str]:
    """Every shard re-hashed against its recorded checksum; the problems found (empty when sound)."""
    return _open(store).verify()
