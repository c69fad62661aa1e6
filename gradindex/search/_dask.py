"""Exact search beyond one machine: the store's shards spread over Dask workers, per-worker top-k merged.

Each worker holds a FAISS index of a contiguous range of the store's shards (a Dask actor, so the
index stays loaded between queries); the client sends every worker the queries and merges their
top-k. The answer equals single-process exact search (same rows, ties by row)::

    with DaskSearch("big.gradindex", "tcp://scheduler:8786") as search:   # or "local:4", or a Client
        scores, rows = search.search(vectors, k=10)

    gradindex query big.gradindex --samples 0-99 --dask tcp://scheduler:8786

Needs ``pip install 'gradindex[dask]'``. Every worker must reach the store at the same path (a shared
file system) or URL (``s3://...``: each worker reads it with the storage options given here and its
own environment's credentials).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import ArgumentError, GradIndexError, IncompatibleStoreError
from gradindex.search._arrays import without_rows
from gradindex.search._exact import ExactIndex, search_blocks
from gradindex.store import GradientStore, is_remote, open_store
from gradindex.utils import check_positive_int, default_memory_budget

__all__ = ["DaskSearch", "merge_topk", "search_store_dask"]

log = logging.getLogger("gradindex")


def _distributed():
    try:
        import distributed
    except ImportError:
        raise GradIndexError(
            "Dask search needs dask.distributed; install it with pip install 'gradindex[dask]'"
        ) from None
    return distributed


def _parse_local(spec: str) -> int | None:
    """``"local:N"`` -> N workers, ``"local"`` -> 2; None for a scheduler address."""
    if spec == "local":
        return 2
    if not spec.startswith("local:"):
        return None
    count = spec.partition(":")[2]
    if not count.isdigit() or int(count) <= 0:
        raise ArgumentError(
            "dask", f"dask={spec} must be local:N with N a positive number of worker processes, e.g. dask=local:4"
        )
    return int(count)


class _ShardSearcher:
    """A Dask actor: exact search over a contiguous range of a store's shards, held in memory when they fit."""

    def __init__(
        self,
        path: str,
        shards: list[int],
        memory_budget: int,
        allow_incomplete: bool,
        storage_options: dict | None = None,
    ) -> None:
        self._store = open_store(path, storage_options=storage_options)
        self._shards = shards
        self._allow_incomplete = allow_incomplete
        self._index: Any = None
        self._first_row = self._store.layout.shard_rows(shards[0])[0] if shards else 0
        rows = sum(stop - start for start, stop in map(self._store.layout.shard_rows, shards))
        if shards and rows * self._store.dim * 4 <= memory_budget:
            self._index = ExactIndex(self._store.dim, use_gpu=False)
            for first_row, block in self._blocks():
                if first_row != self._first_row + self._index.ntotal:  # a gap: stream instead
                    self._index = None
                    break
                self._index.add(block)
        self.n_rows = rows
        stop = self._store.layout.shard_rows(shards[-1])[1] if shards else 0
        skipped = getattr(self._store, "skipped_rows", None)
        skipped = np.asarray(skipped(allow_incomplete=allow_incomplete) if skipped is not None else [], dtype=np.int64)
        # rows the build left out as non-finite (stored as zeros) are never returned
        self._skipped = skipped[(skipped >= self._first_row) & (skipped < stop)]
        try:  # as many faiss threads as Dask gave this worker: more would fight the other workers for the cores
            import faiss
            from distributed import get_worker

            faiss.omp_set_num_threads(max(1, int(get_worker().state.nthreads)))
        except (ImportError, ValueError, AttributeError):
            pass

    def _blocks(self):
        for shard in self._shards:
            yield (
                self._store.layout.shard_rows(shard)[0],
                self._store.read_shard(shard, allow_incomplete=self._allow_incomplete),
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._shards:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        wanted = k + len(self._skipped)
        if self._index is not None:
            scores, rows = self._index.search(queries, wanted)
            rows = rows + self._first_row
        else:
            scores, rows = search_blocks(self._blocks(), queries, wanted, use_gpu=False)
        return without_rows(scores, rows, self._skipped, k)

    def holds_in_memory(self) -> bool:
        return self._index is not None


def _partition(store: GradientStore, shards: list[int], n_workers: int) -> list[list[int]]:
    """Contiguous runs of ``shards`` with about equal row counts, one per worker (some may be empty)."""
    sizes = np.array([np.subtract(*store.layout.shard_rows(shard)[::-1]) for shard in shards], dtype=np.int64)
    bounds = np.cumsum(sizes)
    total = int(bounds[-1]) if len(bounds) else 0
    parts: list[list[int]] = [[] for _ in range(n_workers)]
    for position, shard in enumerate(shards):
        # the worker whose equal share contains this shard's middle row
        middle = bounds[position] - sizes[position] / 2
        parts[min(n_workers - 1, int(middle * n_workers // max(total, 1)))].append(shard)
    return parts


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-worker ``(scores [q, k_i], rows [q, k_i])`` into the overall top-k, ties by row."""
    scores = np.concatenate([part[0] for part in results], axis=1)
    rows = np.concatenate([part[1] for part in results], axis=1)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return (
        np.ascontiguousarray(np.take_along_axis(scores, order, axis=1), dtype=np.float32),
        np.ascontiguousarray(np.take_along_axis(rows, order, axis=1), dtype=np.int64),
    )


def _is_lost(error: BaseException) -> bool:
    """Whether an actor call failed because the worker holding the actor went away (killed, closed, restarted)."""
    if isinstance(error, (OSError, EOFError)):
        return True
    return isinstance(error, RuntimeError) and "was lost" in str(error)


class DaskSearch:
    """Top-k over a store whose shards are spread over the workers of a Dask cluster; built once, searched many times.

    ``cluster`` is a ``distributed.Client``, a scheduler address (``"tcp://host:8786"``) or
    ``"local:N"`` (a LocalCluster of N worker processes on this machine, closed with this object).
    ``memory_budget`` is per worker: a worker whose shards fit holds them in a FAISS index, else
    streams them on every search.

    A worker lost between or during searches (killed, closed, restarted by its nanny) is survived: the parts it held
    are placed again on the workers still there (each reloads them from the store) and the search is retried, so the
    answer is the one the whole cluster would have given. ``gradindex.search.DaskIndexSearch`` is the same over a
    persisted IVF index.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``; every worker must reach it at the same
            path or URL.
        cluster: a ``distributed.Client``, a scheduler address or ``"local:N"``.
        memory_budget: bytes each worker may hold its shards in (as float32); default a quarter of its memory.
        allow_incomplete: search the finished shards of a store whose build has not completed.
    """

    def __init__(
        self,
        store: GradientStore | str | Path,
        cluster: Any,
        *,
        memory_budget: int | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        self._store = store if isinstance(store, GradientStore) else open_store(store)
        shards = self._store._require_readable(allow_incomplete)
        self._allow_incomplete = allow_incomplete
        self._budget = default_memory_budget() if memory_budget is None else memory_budget
        self._actors: list[Any] = []
        self._holders: list[str] = []
        self._connect(cluster)
        try:
            workers = self.workers()
            if is_remote(self._store.path):
                self._path, self._storage_options = str(self._store.path), self._store.path.storage_options
            else:
                self._path, self._storage_options = str(Path(self._store.path).resolve()), None
            self._parts = _partition(self._store, shards, len(workers))
            self._place(list(range(len(self._parts))), workers)
        except BaseException:
            self.close()
            raise
        self.n_workers = len(workers)
        self.replaced = 0  # parts placed again after their worker was lost

    # ---- the cluster -----------------------------------------------------------------------------------------------
    def _connect(self, cluster: Any) -> None:
        distributed = _distributed()
        self._own_client = not isinstance(cluster, distributed.Client)
        self._cluster = None
        self._client = None
        if isinstance(cluster, distributed.Client):
            self._client = cluster
        elif isinstance(cluster, str):
            n_local = _parse_local(cluster)
            if n_local is not None:
                self._cluster = distributed.LocalCluster(
                    n_workers=n_local, threads_per_worker=1, processes=True, dashboard_address=None
                )
                self._client = distributed.Client(self._cluster)
            else:
                try:
                    self._client = distributed.Client(cluster, timeout="20s")
                except (OSError, TimeoutError) as error:
                    raise GradIndexError(
                        f"cannot reach the Dask scheduler at {cluster} ({error}); check the address or use --dask "
                        "local:N"
                    ) from error
        else:
            raise ValueError(f"dask must be a distributed.Client, a scheduler address or 'local:N', got {cluster!r}")

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` searches go through."""
        return self._client

    def workers(self) -> list[str]:
        """The addresses of the cluster's workers now (GradIndexError when there are none)."""
        workers = sorted(self._client.scheduler_info()["workers"])
        if not workers:
            raise GradIndexError(
                "the Dask cluster has no workers (all were lost or none started); start some (dask worker SCHEDULER) "
                "and retry"
            )
        return workers

    def _actor(self, position: int) -> tuple[type, tuple]:
        """The actor class and arguments that hold part ``position``."""
        return _ShardSearcher, (
            self._path,
            self._parts[position],
            self._budget,
            self._allow_incomplete,
            self._storage_options,
        )

    def _place(self, positions: list[int], workers: list[str]) -> None:
        """Create the actors of ``positions`` on ``workers``: part i of n on worker i at the start; a lost worker's
        parts on the workers holding the fewest parts."""
        if not self._actors:
            self._actors = [None] * len(self._parts)
            self._holders = [""] * len(self._parts)
        load = {worker: self._holders.count(worker) for worker in workers}
        chosen = {}
        for position in positions:
            if len(positions) == len(self._parts) and len(workers) == len(self._parts):
                worker = workers[position]
            else:
                worker = min(workers, key=lambda name: (load[name], name))
            load[worker] += 1
            chosen[position] = worker
        futures = {}
        for position, worker in chosen.items():
            cls, args = self._actor(position)
            futures[position] = self._client.submit(
                cls, *args, actor=True, workers=[worker], allow_other_workers=False, pure=False
            )
        for position, future in futures.items():
            while True:
                try:
                    self._actors[position] = future.result(timeout=2)
                    break
                except TimeoutError:
                    # the part was placed on this worker only: if it died loading it, nothing else would run it
                    if chosen[position] not in self._client.scheduler_info()["workers"]:
                        future.cancel()
                        raise GradIndexError(
                            f"Dask worker {chosen[position]} died while loading part {position} of "
                            f"{self._store.path} (a crash or running out of memory); see the worker's log, give the "
                            "workers more memory or more workers, and retry"
                        ) from None
            self._holders[position] = chosen[position]

    def _replace_lost(self, lost: list[int]) -> None:
        workers = [worker for worker in self.workers() if worker not in {self._holders[p] for p in lost}] or (
            self.workers()
        )
        log.warning(
            "Dask worker(s) %s lost; placing their %d part(s) on %s",
            ", ".join(sorted({self._holders[p] for p in lost})),
            len(lost),
            ", ".join(workers),
        )
        self._place(lost, workers)
        self.replaced += len(lost)

    def _gather(self, call) -> list[Any]:
        """``call(actor, position)`` on every part's actor, their results in part order; a part whose worker was lost
        is placed again on a worker still there and asked again (up to once per part)."""
        for _attempt in range(len(self._parts) + 1):
            pending = []
            for position, actor in enumerate(self._actors):
                try:  # an actor whose worker is known to be gone refuses the call at once
                    pending.append((position, call(actor, position), None))
                except Exception as error:
                    pending.append((position, None, error))
            results: dict[int, Any] = {}
            lost: list[int] = []
            for position, future, refused in pending:
                try:
                    if refused is not None:
                        raise refused
                    results[position] = future.result()
                except Exception as error:
                    if not _is_lost(error) and self._holders[position] in self.workers():
                        raise
                    lost.append(position)
            if not lost:
                return [results[position] for position in range(len(self._parts))]
            self._replace_lost(lost)
        raise GradIndexError(
            "Dask workers kept being lost while searching; check the cluster's health (memory limits, restarts) "
            "and retry"
        )

    @property
    def parts(self) -> list[list[int]]:
        """The shards each part holds (a part per worker at the start)."""
        return [list(part) for part in self._parts]

    @property
    def holders(self) -> list[str]:
        """The worker holding each part now."""
        return list(self._holders)

    def _check_queries(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        k = check_positive_int("k", k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self._store.dim:
            raise IncompatibleStoreError(
                f"queries have shape {list(queries.shape)} but store {self._store.path} holds vectors of dimension "
                f"{self._store.dim}"
            )
        return queries, int(k)

    def search(self, queries: np.ndarray, k: int, *, opponents: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of ``queries [q, D]``: ``(scores [q, k'], rows [q, k'])`` as ``gradindex.search_store``
        answers it (opponents: the k most negative scores)."""
        queries, k = self._check_queries(queries, k)
        searched = -queries if opponents else queries
        scores, rows = merge_topk(self._gather(lambda actor, _position: actor.search(searched, k)), k)
        return (-scores if opponents else scores), rows

    def close(self) -> None:
        self._actors = []
        if self._own_client and getattr(self, "_client", None) is not None:
            self._client.close()
            self._client = None
        if getattr(self, "_cluster", None) is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> DaskSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def search_store_dask(
    store: GradientStore | str | Path,
    queries: np.ndarray,
    k: int,
    cluster: Any,
    *,
    opponents: bool = False,
    memory_budget: int | None = None,
    allow_incomplete: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One exact search over Dask workers (see ``DaskSearch``); a ``local:N`` cluster lives only for this call."""
    with DaskSearch(store, cluster, memory_budget=memory_budget, allow_incomplete=allow_incomplete) as search:
        return search.search(queries, k, opponents=opponents)
