"""The query stage: featurize query samples exactly as the store's rows were, search the store, name the rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from gradindex.errors import ArgumentError, CheckpointError, IncompatibleStoreError, TaskSpecError
from gradindex.methods import stored_self_influence
from gradindex.pipeline._config import QueryConfig
from gradindex.projection import ProjectionSpec
from gradindex.search import search_store
from gradindex.store import GradientStore, as_store, fingerprint_differences, is_inside, is_remote
from gradindex.utils import check_positive_int, progress_bar

# torch, the task, the checkpoints and the featurizers load inside the functions that featurize: reading a store's
# stored self-influence (and importing this module) needs none of them
if TYPE_CHECKING:
    import torch

    from gradindex.featurize import Featurizer
    from gradindex.task import Task

__all__ = [
    "QueryConfig",
    "QuerySession",
    "method_query_options",
    "parse_samples",
    "query",
    "query_featurizer",
    "self_influence",
    "task_for_store",
]


def query_featurizer(store: GradientStore, task: Task, checkpoints, device: torch.device) -> tuple[Featurizer, list]:
    from gradindex.checkpoints import CheckpointSpec, checkpoint_sha256, parse_checkpoints
    from gradindex.featurize import load_checkpoints, model_fingerprint
    from gradindex.methods import make_featurizer
    from gradindex.pipeline._fingerprint import dataset_probe, mismatch_message

    fingerprint = store.fingerprint
    recorded = store.manifest.get("checkpoints", [])
    if checkpoints is None:
        specs = [CheckpointSpec(path=item["path"], weight=item["weight"]) for item in recorded]
    else:
        specs = parse_checkpoints(checkpoints)
    if len(specs) != len(fingerprint["checkpoints"]):
        raise IncompatibleStoreError(
            f"store {store.path} was built from {len(fingerprint['checkpoints'])} checkpoints; this query gives "
            f"{len(specs)}. "
            "Query with the store's checkpoints."
        )
    for position, (spec, expected) in enumerate(zip(specs, fingerprint["checkpoints"])):
        if not Path(spec.path).exists():
            raise CheckpointError(
                f"checkpoint {spec.path} (position {position} of store {store.path}) is not there; pass the moved "
                "files with --checkpoint"
            )
        if checkpoint_sha256(spec.path) != expected["sha256"]:
            raise IncompatibleStoreError(
                f"checkpoints[{position}].sha256: {spec.path} is not the file store {store.path} was built from. "
                "Query with the store's checkpoints or rebuild with overwrite=True."
            )
    specs = [
        CheckpointSpec(path=spec.path, weight=expected["weight"])
        for spec, expected in zip(specs, fingerprint["checkpoints"])
    ]
    model_print = model_fingerprint(task.model())
    if model_print != fingerprint["model"]:
        diffs = fingerprint_differences(fingerprint["model"], model_print, "model")
        raise IncompatibleStoreError(
            mismatch_message(
                store.path,
                diffs,
                {"model": fingerprint["model"]},
                {"model": model_print},
                "Query with the task the store was built from.",
            )
        )
    dataset = {"n_samples": len(task.train), "probe_sha256": dataset_probe(task.train)}
    diffs = fingerprint_differences(fingerprint["dataset"], dataset, "dataset")
    if diffs:
        raise IncompatibleStoreError(
            mismatch_message(
                store.path,
                diffs,
                {"dataset": fingerprint["dataset"]},
                {"dataset": dataset},
                "The task's training set is not the one the store indexes; query with the task it was built from.",
            )
        )
    loaded = load_checkpoints(task, specs, device)
    method = fingerprint["method"]
    featurizer = make_featurizer(
        method["name"],
        task,
        loaded,
        projection=ProjectionSpec.from_dict(fingerprint["projection"]),
        layers=fingerprint.get("layers"),
        normalize=method.get("normalize", False),
        device=device,
        options={key: value for key, value in method.items() if key not in ("name", "normalize")},
    )
    actual = featurizer.fingerprint()
    diffs = fingerprint_differences({key: fingerprint.get(key) for key in actual}, actual)
    if diffs:
        raise IncompatibleStoreError(
            mismatch_message(store.path, diffs, fingerprint, actual, "Query with the store's settings.")
        )
    return featurizer, loaded


def task_for_store(
    store: GradientStore, task: Task | str | None, task_options: Mapping[str, Any] | None = None
) -> Task:
    """``task`` loaded with ``task_options``, or when it is None the task the store recorded at build (its spec: a
    built-in name, a module, or a task file by absolute path, with the options it was built with, updated by
    ``task_options``: ``{"test": "other.jsonl"}`` queries another file). A recorded task file that lies inside the
    store is refused: a store is shared data, and running code it brings along would let whoever made it run anything.

    Raises:
        TaskSpecError: no task is given and the store records none, or it records a task file inside itself.
        ArgumentError: ``task_options`` with a ``Task`` object.
    """
    from gradindex.task import Task, load_task

    if task is not None:
        if isinstance(task, Task):
            if task_options:
                raise ArgumentError(
                    "task_options",
                    "task_options are keyword arguments of a task spec's factory; a Task object takes none",
                )
            return task
        return load_task(task, **dict(task_options or {}))
    recorded = store.manifest.get("task") or {}
    spec = recorded.get("spec")
    if not isinstance(spec, str) or not spec:
        raise TaskSpecError(
            f"store {store.path} does not record its task (it was built from a Python object); pass task=SPEC"
        )
    target, colon, _ = spec.rpartition(":")
    is_file = colon and (target.endswith(".py") or "/" in target)
    if is_file and not is_remote(store.path) and is_inside(store.path, Path(target)):
        raise TaskSpecError(
            f"store {store.path} records a task file inside itself ({target}); code that comes with a store is "
            "not run: pass task=SPEC naming a task file you trust"
        )
    options = {**(recorded.get("options") or {}), **dict(task_options or {})}
    return load_task(spec, **options)


def parse_samples(samples: Sequence[int] | str | None, n_available: int) -> list[int]:
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
                raise ArgumentError(
                    "samples", f"samples {samples!r} must be indices and ranges like 0,5,10-19"
                ) from None
        samples = picked
    picked = [int(value) for value in samples]
    if not picked:
        raise ArgumentError("samples", "no query samples given; pass samples (e.g. 0,1,2), or leave them out for all")
    bad = [value for value in picked if not 0 <= value < n_available]
    if bad:
        raise ValueError(
            f"query samples {bad[:5]} are out of range: the split has {n_available} samples (0..{n_available - 1})"
        )
    return picked


def query(
    store: GradientStore | str | Path,
    task: Task | str | None = None,
    *,
    split: str = "test",
    samples: Sequence[int] | str | None = None,
    k: int = 10,
    opponents: bool = False,
    checkpoints: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    memory_budget: int | None = None,
    allow_incomplete: bool = False,
    use_gpu: bool | None = None,
    progress: bool | None = None,
    index: str | None = None,
    nprobe: int | None = None,
    dask: Any = None,
    damping: float | None = None,
    solver: str | None = None,
    method_options: dict | None = None,
    storage_options: dict | None = None,
    task_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """The k most influential training samples for each query sample, as an Arrow table.

    Returns a table ``query, query_id, rank, row, sample_id, score``: ``query`` numbers the query samples in the order
    given, ``query_id`` is the sample's index in ``split``, ``row`` the store row, ``score`` ⟨φ(q), φ(z)⟩ (positive =
    proponent; with ``opponents=True`` the most negative first). The query samples are featurized exactly as the
    store's rows were (the store's checkpoints, projection and method, checked against their fingerprint).

    Args:
        store: the store: a path, an fsspec URL (``s3://...``) or an opened ``GradientStore``.
        task: a ``Task`` or task spec; default: the spec the store recorded at build.
        split: the query split of the task (``train``, ``test`` or a key of ``Task.queries``).
        samples: indices into ``split``: a sequence, or text like ``"0,5,10-19"``; default: the whole split.
        k: results per query sample.
        opponents: the k most negative scores instead of the k most positive.
        checkpoints: the checkpoint paths, if they moved since the build (same files, same order).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for featurizing the queries.
        batch_size: query samples featurized per batch.
        memory_budget: bytes in-memory search may use; a larger store is streamed shard by shard (same answers).
        allow_incomplete: search the finished shards of a store whose build has not completed.
        use_gpu: search with faiss on GPUs (default: when faiss has them).
        progress: show progress bars (default: when stderr is a terminal).
        index: search the persisted approximate index of this name (``build_index``) instead of exact search.
        nprobe: with ``index``, IVF lists probed (HNSW: efSearch); default: the index's own, for its target recall.
        dask: spread exact search over Dask workers: a scheduler address, ``"local:N"`` or a ``distributed.Client``.
        damping: asymmetric stores (if, trak): λ for this query instead of the store's, without a rebuild.
        solver: if stores: the inverse-HVP solver for this query (``exact``, ``cg``, ``lissa``).
        method_options: other query-side method options (``gradindex.methods.METHOD_OPTIONS``); asking for another
            value of a build-time option is an ``IncompatibleStoreError``.
        storage_options: options of the fsspec filesystem of a store URL (credentials, endpoint).
        task_options: keyword arguments of the task factory: with ``task``, all of them; without, they update the
            options the store recorded (``{"test": "other.jsonl"}``).

    Raises:
        IncompatibleStoreError: the task, checkpoints or settings are not the store's (the field is named).
        IncompleteStoreError: the store's build has not finished and ``allow_incomplete`` is not set.
        ArgumentError: a bad argument (the message names it).
    """
    QueryConfig(
        split=split,
        k=k,
        opponents=opponents,
        device=device,
        batch_size=batch_size,
        memory_budget=memory_budget,
        allow_incomplete=allow_incomplete,
        index=index,
        nprobe=nprobe,
        dask=dask,
    )
    store = as_store(store, storage_options)
    k = check_positive_int("k", k)
    store._require_readable(allow_incomplete)
    task = task_for_store(store, task, task_options)
    picked = parse_samples(samples, len(task.split(split)))
    session = QuerySession(
        store,
        task,
        checkpoints=checkpoints,
        device=device,
        damping=damping,
        solver=solver,
        method_options=method_options,
        allow_incomplete=allow_incomplete,
    )
    vectors = session.query_vectors(split, picked, batch_size=batch_size, progress=progress)
    scores, rows = search_store(
        store,
        vectors,
        k,
        opponents=opponents,
        memory_budget=memory_budget,
        allow_incomplete=allow_incomplete,
        use_gpu=use_gpu,
        progress=progress,
        index=index,
        nprobe=nprobe,
        dask=dask,
    )
    return session.table(picked, scores, rows)


class QuerySession:
    """What answering queries of one store needs, loaded once: the opened store, its task, the featurizer at the
    store's checkpoints (checked against the store's fingerprint, configured with the query-side method options) and,
    on first use, the store's samples table. ``query`` makes one per call; ``gradindex serve`` keeps one and answers
    every request from it.

    Args:
        store: the opened store.
        task: the loaded task (``task_for_store``).
        checkpoints: the checkpoint paths, if they moved since the build (same files, same order).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for featurizing the queries.
        damping: asymmetric stores (if, trak): λ for the queries instead of the store's.
        solver: if stores: the inverse-HVP solver of the queries.
        method_options: other query-side method options (``gradindex.methods.METHOD_OPTIONS``).
        allow_incomplete: name the rows of the finished shards of a store whose build has not completed.

    Raises:
        IncompatibleStoreError: the task, checkpoints or settings are not the store's (the field is named).
        CheckpointError: a checkpoint of the store is not there.
    """

    def __init__(
        self,
        store: GradientStore,
        task: Task,
        *,
        checkpoints: Sequence[str] | None = None,
        device: str = "auto",
        damping: float | None = None,
        solver: str | None = None,
        method_options: dict | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        from gradindex.featurize import resolve_device
        from gradindex.methods import as_method_featurizer
        from gradindex.task import running_user_code

        self.store = store
        self.task = task
        self.allow_incomplete = allow_incomplete
        with running_user_code("the model's construction (the query's featurizer)"):
            featurizer, _ = query_featurizer(store, task, checkpoints, resolve_device(device))
        self.featurizer = as_method_featurizer(featurizer)
        self.featurizer.configure_query(method_query_options(damping, solver, method_options), store.path)
        self.featurizer.attach(store)
        self._samples: pa.Table | None = None

    def query_vectors(
        self, split: str, picked: Sequence[int], *, batch_size: int = 256, progress: bool | None = None
    ) -> np.ndarray:
        """The query vectors ``[len(picked), D]`` float32 of the samples ``picked`` (indices from ``parse_samples``)
        of ``split``, featurized as the store's rows were."""
        import torch

        from gradindex.task import iter_batches, running_user_code

        dataset = self.task.split(split)
        vectors = np.empty((len(picked), self.featurizer.dim), dtype=np.float32)
        position = 0
        bar = progress_bar(len(picked), "featurize queries", enabled=progress)
        with torch.enable_grad(), running_user_code(f"the query samples of split {split!r}"):
            for batch in iter_batches(dataset, list(picked), batch_size, self.task.collate):
                block = self.featurizer.query_vectors(batch).detach().cpu().numpy()
                vectors[position : position + len(block)] = block
                position += len(block)
                bar.update(len(block))
        bar.close()
        return vectors

    def samples(self) -> pa.Table:
        """The store's ``row, sample_id, label`` table, read once."""
        if self._samples is None:
            self._samples = self.store.samples(allow_incomplete=self.allow_incomplete)
        return self._samples

    def table(self, picked: Sequence[int], scores: np.ndarray, rows: np.ndarray) -> pa.Table:
        """The result table ``query, query_id, rank, row, sample_id, score`` of a search of the samples ``picked``
        (``scores [q, k']``, ``rows [q, k']`` as ``search_store`` returns them)."""
        return _result_table(self.store, np.asarray(picked), scores, rows, self.allow_incomplete, self.samples())


def method_query_options(damping: float | None, solver: str | None, method_options: dict | None) -> dict:
    """The query-side method options asked for (None = the store's)."""
    asked = dict(method_options or {})
    for name, value in (("damping", damping), ("solver", solver)):
        if value is not None:
            if name in asked and asked[name] != value:
                raise ValueError(
                    f"{name} is given twice ({value!r} and {asked[name]!r} in method options); give it once"
                )
            asked[name] = value
    return {name: value for name, value in asked.items() if value is not None}


def _column(values: np.ndarray) -> pa.Array:
    """A numpy vector as an Arrow array, without the pandas probe of ``pa.array`` (which imports pandas when it is
    installed: a quarter of a second of every query)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _sample_ids(
    store: GradientStore, rows: np.ndarray, allow_incomplete: bool, samples: pa.Table | None = None
) -> pa.Array:
    if samples is None:
        samples = store.samples(allow_incomplete=allow_incomplete)
    ids = samples.column("sample_id")
    if store.complete:
        return ids.take(_column(rows))
    lookup = {int(row): position for position, row in enumerate(samples.column("row").to_numpy())}
    return ids.take(_column(np.asarray([lookup[int(row)] for row in rows], dtype=np.int64)))


def _result_table(
    store: GradientStore,
    query_ids: np.ndarray,
    scores: np.ndarray,
    rows: np.ndarray,
    allow_incomplete: bool,
    samples: pa.Table | None = None,
) -> pa.Table:
    n_queries, found = rows.shape
    flat_rows = rows.reshape(-1).astype(np.int64)
    kept = flat_rows >= 0  # an approximate index may find fewer than k rows (row -1)
    flat_rows = flat_rows[kept]
    return pa.table(
        {
            "query": _column(np.repeat(np.arange(n_queries, dtype=np.int64), found)[kept]),
            "query_id": _column(np.repeat(query_ids.astype(np.int64), found)[kept]),
            "rank": _column(np.tile(np.arange(1, found + 1, dtype=np.int64), n_queries)[kept]),
            "row": _column(flat_rows),
            "sample_id": _sample_ids(store, flat_rows, allow_incomplete, samples),
            "score": _column(scores.reshape(-1).astype(np.float32)[kept]),
        }
    )


def self_influence(
    store: GradientStore | str | Path,
    *,
    top: int | None = None,
    allow_incomplete: bool = False,
    damping: float | None = None,
    solver: str | None = None,
    method_options: dict | None = None,
    task: Task | str | None = None,
    checkpoints: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool | None = None,
    storage_options: dict | None = None,
    task_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Training samples ranked by self-influence, highest first: a table ``rank, row, sample_id, score``.

    Self-influence is ⟨φ(z), φ(z)⟩, or ⟨T φ(z), φ(z)⟩ for asymmetric methods, as stored at build: high for mislabeled,
    duplicated and atypical samples. With ``damping``/``solver``/``method_options`` it is recomputed at those query-side
    settings: from the store alone for TRAK, through the task's gradients for influence functions.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.
        top: only the ``top`` highest; default: every row.
        allow_incomplete: rank the finished shards of a store whose build has not completed.
        damping: asymmetric stores (if, trak): recompute at this λ instead of the store's.
        solver: if stores: recompute with this inverse-HVP solver.
        method_options: other query-side method options to recompute with.
        task: if stores recomputed at other settings: the task (default: the store's recorded spec).
        checkpoints: with ``task``: the checkpoint paths, if they moved since the build.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for a recomputation.
        batch_size: training samples per batch of a recomputation.
        progress: show progress bars (default: when stderr is a terminal).
        storage_options: options of the fsspec filesystem of a store URL.
        task_options: with a recomputation: keyword arguments of the task factory (see ``query``).
    """
    store = as_store(store, storage_options)
    if top is not None:
        top = check_positive_int("top", top)
    asked = method_query_options(damping, solver, method_options)
    if asked:
        store._require_readable(False)  # recomputed self-influence needs every row
        scores = stored_self_influence(store, asked)
        if scores is None:
            from gradindex.featurize import resolve_device
            from gradindex.methods import as_method_featurizer, recompute_self_influence

            task = task_for_store(store, task, task_options)
            featurizer = as_method_featurizer(query_featurizer(store, task, checkpoints, resolve_device(device))[0])
            featurizer.configure_query(asked, store.path)
            featurizer.attach(store)
            bar = progress_bar(store.n_samples, "self-influence", enabled=progress)
            try:
                scores = recompute_self_influence(store, featurizer, task, batch_size=batch_size, bar=bar)
            finally:
                bar.close()
        rows = np.arange(store.n_samples, dtype=np.int64)
    else:
        rows, scores = store.self_influence(allow_incomplete=allow_incomplete)
    order = np.lexsort((rows, -scores.astype(np.float64)))
    if top is not None:
        order = order[:top]
    picked = rows[order]
    return pa.table(
        {
            "rank": _column(np.arange(1, len(order) + 1, dtype=np.int64)),
            "row": _column(picked),
            "sample_id": _sample_ids(store, picked, allow_incomplete),
            "score": _column(scores[order]),
        }
    )
