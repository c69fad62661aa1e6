"""``gradindex serve``: a store kept resident and answered over Arrow Flight.

A direct query pays for the whole store again every time: it loads the task, checks and loads the checkpoints, makes
the featurizer, reads and checks every shard and the samples table, and (with Dask) starts its actors. A server does
all of that once (``QuerySession`` and the vectors in an exact index, or the persisted index, or Dask actors holding
the shards) and answers query, opponents and self-influence requests until it is stopped, each with exactly the rows
the direct call returns. Before each answer it looks at the store's manifest: when the store changed (an append, a
repair, a finished build) it loads the new content and answers from it, or refuses with a sentence naming the restart.

Requests are Flight ``do_get`` tickets (JSON: ``{"command": "query" | "self_influence", "params": {...}}``) answered
with an Arrow table, and the ``info`` action; a refused request carries its error's class and message
(``error_detail``) so that the client raises what the direct call raises (``gradindex.connect``). Off loopback a
token is required: clients send it as ``authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pyarrow import flight

from gradindex.apps.client import TOKEN_ENV
from gradindex.errors import ArgumentError, GradIndexError
from gradindex.pipeline import (
    QueryConfig,
    QuerySession,
    method_query_options,
    parse_samples,
    self_influence,
    task_for_store,
)
from gradindex.search import DaskSearch, ExactIndex, loaded_index, search_store, store_content_id
from gradindex.store import GradientStore, is_remote, open_store
from gradindex.utils import check_positive_int, default_memory_budget
from gradindex.version import __version__

__all__ = ["Server", "error_detail", "is_loopback", "serve"]

logger = logging.getLogger(__name__)

# query-side method option sets kept loaded beside the store's own (each holds a featurizer)
_MAX_SESSIONS = 4


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.1``, ``::1``, ``localhost``): only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def error_detail(error: BaseException) -> dict:
    """What a client needs to raise ``error`` again: its class, module and message (an ``ArgumentError``'s
    arguments, an ``OSError``'s errno, strerror and file name)."""
    detail: dict[str, Any] = {
        "class": type(error).__name__,
        "module": type(error).__module__,
        "message": str(error),
    }
    if not isinstance(error, GradIndexError) and all(isinstance(arg, (str, int, float)) for arg in error.args):
        detail["args"] = list(error.args)  # a builtin is made again from them (KeyError('row') says 'row')
    if isinstance(error, ArgumentError):
        detail.update(argument=error.argument, arguments=list(error.arguments))
    if isinstance(error, OSError):
        detail.update(
            errno=error.errno, strerror=error.strerror, filename=None if error.filename is None else str(error.filename)
        )
    return detail


class _ResidentExact:
    """The store's vectors in one exact index, held: answers as ``search_store``'s in-memory path does (rows it leaves
    out, ``--nonfinite skip`` or unfinished shards, are never returned; ties by row)."""

    def __init__(self, store: GradientStore, *, allow_incomplete: bool, use_gpu: bool | None) -> None:
        skipped = store.skipped_rows(allow_incomplete=allow_incomplete)
        self.index = ExactIndex(store.dim, use_gpu=use_gpu)
        if store.n_samples:
            self.index.reserve(store.n_samples)
        row_blocks = [np.zeros(0, np.int64)]
        for first_row, block in store.iter_blocks(allow_incomplete=allow_incomplete):
            rows = np.arange(first_row, first_row + len(block), dtype=np.int64)
            if skipped.size:
                kept = ~np.isin(rows, skipped)
                block, rows = block[kept], rows[kept]
            self.index.add(block)
            row_blocks.append(rows)
        # index position -> store row: increasing, so ties (broken by position) stay broken by row
        self.rows = np.concatenate(row_blocks)

    def search(self, queries: np.ndarray, k: int, opponents: bool) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = self.index.search(-queries if opponents else queries, k)
        return (-scores if opponents else scores), self.rows[positions]


class _Content:
    """One load of the store: the session (task, featurizer, samples), the vectors as they are searched, and the
    manifest it was loaded from."""

    def __init__(self, server: Server) -> None:
        self.store = open_store(server.store_location, storage_options=server.storage_options)
        self.key = _content_key(self.store, server.allow_incomplete)
        self.store._require_readable(server.allow_incomplete)
        self.task = task_for_store(self.store, server.task, server.task_options)
        self.sessions: dict[str, QuerySession] = {}
        self.session({}, server)  # the store's own query settings: loaded now, so that mistakes show at start
        self.dask: DaskSearch | None = None
        self.exact: _ResidentExact | None = None
        self._self_influence: pa.Table | None = None
        if server.dask is not None and server.index is not None:  # the index's lists on the workers, per request
            self.search_mode = f"index {server.index} on dask {server.dask}"
        elif server.dask is not None:
            self.dask = DaskSearch(
                self.store, server.dask, memory_budget=server.memory_budget, allow_incomplete=server.allow_incomplete
            )
            self.search_mode = f"dask {server.dask}"
        elif server.index is not None:
            loaded_index(self.store, server.index, server.use_gpu)  # read once, kept; a stale index refuses here
            self.search_mode = f"index {server.index}"
        else:
            budget = default_memory_budget() if server.memory_budget is None else server.memory_budget
            if self.store.n_samples * self.store.dim * 4 <= budget:
                self.exact = _ResidentExact(
                    self.store, allow_incomplete=server.allow_incomplete, use_gpu=server.use_gpu
                )
                self.search_mode = "exact in memory"
            else:  # larger than the budget: streamed shard by shard for every request, as a direct query does
                self.search_mode = "exact streamed"

    def session(self, options: Mapping[str, Any], server: Server) -> QuerySession:
        """The session of these query-side method options (``{}``: the store's), loaded on first use."""
        key = json.dumps(options, sort_keys=True, default=str)
        if key not in self.sessions:
            if len(self.sessions) >= _MAX_SESSIONS:
                del self.sessions[next(name for name in self.sessions if name != "{}")]
            self.sessions[key] = QuerySession(
                self.store,
                self.task,
                checkpoints=server.checkpoints,
                device=server.device,
                method_options=dict(options),
                allow_incomplete=server.allow_incomplete,
            )
        return self.sessions[key]

    def search(self, server: Server, vectors: np.ndarray, k: int, opponents: bool, nprobe: int | None):
        if self.exact is not None:
            return self.exact.search(vectors, k, opponents)
        if self.dask is not None:
            return self.dask.search(vectors, k, opponents=opponents)
        return search_store(
            self.store,
            vectors,
            k,
            opponents=opponents,
            memory_budget=server.memory_budget,
            allow_incomplete=server.allow_incomplete,
            use_gpu=server.use_gpu,
            progress=False,
            index=server.index,
            nprobe=nprobe,
            dask=server.dask,
        )

    def self_influence(self, server: Server) -> pa.Table:
        """Every row ranked by its stored self-influence, read once."""
        if self._self_influence is None:
            self._self_influence = self_influence(self.store, allow_incomplete=server.allow_incomplete, progress=False)
        return self._self_influence

    def close(self) -> None:
        if self.dask is not None:
            self.dask.close()
            self.dask = None


def _content_key(store: GradientStore, allow_incomplete: bool) -> str:
    """What the store holds, from its manifest: its content id, and for an incomplete store its finished shards."""
    key = store_content_id(store)
    if not store.complete and allow_incomplete:
        key += ":" + ",".join(map(str, store.done_shards()))
    return key


class _TokenCheck(flight.ServerMiddlewareFactory):
    """Refuses every call whose ``authorization`` header is not ``Bearer TOKEN``."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info, headers):
        given = (headers.get("authorization") or [""])[0]
        if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            raise flight.FlightUnauthenticatedError("this gradindex server needs the token it was started with")
        return None


class Server(flight.FlightServerBase):
    """A store served over Arrow Flight: loads it once, answers until ``shutdown()``.

    Args:
        store: the store: a path or an fsspec URL.
        task: the task spec (or ``Task``); default: the spec the store recorded at build.
        task_options: keyword arguments of the task factory (see ``gradindex.query``).
        checkpoints: the checkpoint paths, if they moved since the build.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for featurizing query samples.
        memory_budget: bytes the resident exact index may use; a larger store is streamed for every request.
        allow_incomplete: serve the finished shards of a store whose build has not completed.
        index: answer from the persisted approximate index of this name instead of exact search.
        dask: hold the shards in Dask actors: a scheduler address or ``local:N``.
        use_gpu: search with faiss on GPUs (default: when faiss has them).
        storage_options: options of the fsspec filesystem of a store URL.
        host: the address to listen on; anything but loopback needs ``token``.
        port: the port; 0 picks a free one.
        token: the secret clients must send; default: the ``GRADINDEX_TOKEN`` environment variable.

    Raises:
        ArgumentError: a non-loopback ``host`` without a token, or a bad setting.
        GradIndexError: what a direct query of the store would raise (incompatible task, incomplete store, ...).
    """

    def __init__(
        self,
        store: str | Path,
        task: Any = None,
        *,
        task_options: Mapping[str, Any] | None = None,
        checkpoints: Sequence[str] | None = None,
        device: str = "auto",
        memory_budget: int | None = None,
        allow_incomplete: bool = False,
        index: str | None = None,
        dask: Any = None,
        use_gpu: bool | None = None,
        storage_options: dict | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
    ) -> None:
        QueryConfig(
            device=device, memory_budget=memory_budget, allow_incomplete=allow_incomplete, index=index, dask=dask
        )
        token = os.environ.get(TOKEN_ENV) if token is None else token
        if not is_loopback(host) and not token:
            raise ArgumentError(
                "token",
                f"serving on {host} (not loopback) lets other machines query the store: give token=SECRET (or set "
                f"{TOKEN_ENV}) that clients pass too, or serve on 127.0.0.1",
            )
        if not 0 <= int(port) <= 65535:
            raise ArgumentError("port", f"port must be 0 (a free one) or 1-65535, got {port}")
        self.store_location = store
        self.store_path = str(store)
        self.task, self.task_options = task, dict(task_options or {})
        self.checkpoints = list(checkpoints) if checkpoints else None
        self.device, self.memory_budget, self.allow_incomplete = device, memory_budget, allow_incomplete
        self.index, self.dask, self.use_gpu, self.storage_options = index, dask, use_gpu, storage_options
        self._lock = threading.Lock()  # one request at a time: the featurizer's model is not shared between threads
        self._requests = 0
        self._loads = 0
        self._reload_error: GradIndexError | None = None
        self._content = self._load()
        location = self._content.store.path
        self.store_path = str(location) if is_remote(location) else str(Path(location).resolve())
        bracketed = f"[{host}]" if ":" in host else host
        middleware = {"token": _TokenCheck(token)} if token else None
        try:
            super().__init__(f"grpc://{bracketed}:{int(port)}", middleware=middleware)
        except pa.ArrowException as error:
            self.close()
            raise ArgumentError(
                "port",
                f"cannot listen on {host} port {port}: it is in use, or {host} is not an address of this machine; "
                "give another port=N (0 picks a free one) or host=ADDRESS",
            ) from error
        self.url = f"grpc://{bracketed}:{self.port}"

    def _load(self) -> _Content:
        started = time.perf_counter()
        content = _Content(self)
        self._loads += 1
        logger.info("loaded %s in %.2f s (%s)", self.store_path, time.perf_counter() - started, content.search_mode)
        return content

    def _current(self) -> _Content:
        """The loaded content, loaded again first when the store's manifest changed since."""
        content = self._content
        fresh = open_store(self.store_location, storage_options=self.storage_options)
        if _content_key(fresh, self.allow_incomplete) == content.key:
            return content
        try:
            replacement = self._load()
        except GradIndexError as error:
            raise type(error)(
                *([error.argument] if isinstance(error, ArgumentError) else []),
                f"store {self.store_path} changed while this server was running and reloading it failed "
                f"({str(error).rstrip('.')}); restart `gradindex serve` with a task that matches the store",
            ) from error
        content.close()
        self._content = replacement
        return replacement

    # ---- the requests --------------------------------------------------------------------------------------------

    def _check_store(self, params: Mapping[str, Any]) -> None:
        asked = params.get("store")
        if asked is not None and str(asked) != self.store_path:
            raise ArgumentError(
                "store",
                f"this server serves {self.store_path}, not {asked}; query {asked} without --server, or start "
                f"`gradindex serve {asked}`",
            )

    def _query(self, params: Mapping[str, Any]) -> pa.Table:
        self._check_store(params)
        content = self._current()
        split, k, opponents = params.get("split", "test"), params.get("k", 10), bool(params.get("opponents"))
        batch_size, nprobe = params.get("batch_size", 256), params.get("nprobe")
        QueryConfig(
            split=split,
            k=k,
            opponents=opponents,
            batch_size=batch_size,
            allow_incomplete=self.allow_incomplete,
            index=self.index,
            nprobe=nprobe,
            dask=self.dask,
        )
        k = check_positive_int("k", k)
        session = content.session(_method_options(params), self)
        picked = parse_samples(params.get("samples"), len(session.task.split(split)))
        vectors = session.query_vectors(split, picked, batch_size=batch_size, progress=False)
        scores, rows = content.search(self, vectors, k, opponents, nprobe)
        return session.table(picked, scores, rows)

    def _self_influence(self, params: Mapping[str, Any]) -> pa.Table:
        self._check_store(params)
        content = self._current()
        top = params.get("top")
        if top is not None:
            top = check_positive_int("top", top)
        asked = _method_options(params)
        if asked:  # recomputed at other query-side settings, as the direct call does
            return self_influence(
                content.store,
                top=top,
                allow_incomplete=self.allow_incomplete,
                method_options=asked,
                task=content.task,
                checkpoints=self.checkpoints,
                device=self.device,
                progress=False,
            )
        ranked = content.self_influence(self)
        return ranked if top is None else ranked.slice(0, top)

    def info(self) -> dict:
        """What this server serves (``Client.info``)."""
        content = self._content
        return {
            "url": self.url,
            "store": self.store_path,
            "content_id": content.key,
            "n_samples": content.store.n_samples,
            "dim": content.store.dim,
            "method": content.store.fingerprint.get("method"),
            "search": content.search_mode,
            "loads": self._loads,
            "requests": self._requests,
            "version": __version__,
        }

    def _answer(self, work: Callable[[], Any]) -> Any:
        """``work()`` under the lock; an error becomes a Flight error carrying its class and message."""
        try:
            with self._lock:
                self._requests += 1
                return work()
        except Exception as error:
            logger.info("refused a request: %s", error)
            raise flight.FlightServerError(str(error), extra_info=json.dumps(error_detail(error)).encode()) from None

    def do_get(self, context, ticket):
        try:
            request = json.loads(ticket.ticket)
            command, params = request["command"], dict(request.get("params") or {})
        except (ValueError, KeyError, TypeError):
            raise flight.FlightServerError("a gradindex request is JSON with a command and params") from None
        handlers = {"query": self._query, "self_influence": self._self_influence}
        if command not in handlers:
            raise flight.FlightServerError(f"unknown command {command!r}; ask query or self_influence")
        table = self._answer(lambda: handlers[command](params))
        return flight.RecordBatchStream(table)

    def do_action(self, context, action):
        if action.type != "info":
            raise flight.FlightServerError(f"unknown action {action.type!r}; ask info")
        yield flight.Result(json.dumps(self._answer(self.info), default=str).encode())

    def list_actions(self, context):
        return [("info", "what this server serves, as JSON")]

    def close(self) -> None:
        """Release what the loaded content holds (Dask actors and a ``local:N`` cluster)."""
        self._content.close()


def _method_options(params: Mapping[str, Any]) -> dict:
    """The query-side method options of a request (None = the store's), as ``gradindex.query`` gathers them."""
    return method_query_options(params.get("damping"), params.get("solver"), params.get("method_options"))


def serve(
    store: str | Path,
    task: Any = None,
    *,
    ready: Callable[[Server], None] | None = None,
    **options: Any,
) -> None:
    """Serve ``store`` until SIGTERM or Ctrl-C (SIGINT): the request in flight finishes, then this returns. Call it
    from the main thread (it installs the signal handlers); elsewhere make a ``Server`` and call its ``shutdown()``.

    Args:
        store: the store: a path or an fsspec URL.
        task: the task spec (or ``Task``); default: the spec the store recorded at build.
        ready: called with the ``Server`` once it listens (``gradindex serve`` prints its ``url`` first).
        **options: the ``Server``'s keyword arguments (``host``, ``port``, ``token``, ``index``, ``dask``, ...).
    """
    server = Server(store, task, **options)
    stop = threading.Event()
    handlers = {}
    for name in (signal.SIGTERM, signal.SIGINT):
        handlers[name] = signal.signal(name, lambda *_: stop.set())
    try:
        if ready is not None:
            ready(server)
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()  # waits for the requests in flight
        server.close()
        for name, previous in handlers.items():
            signal.signal(name, previous)
