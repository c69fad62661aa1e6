"""The client of ``gradindex serve``: Arrow tables from a running server, with the errors a direct call raises.

Light on purpose: it imports pyarrow (Flight) and gradindex's errors, never torch or faiss, so that a process that
only asks a server starts in a fraction of a second::

    with gradindex.connect("grpc://127.0.0.1:8815") as server:
        server.query(samples=[0, 1], k=5)          # -> pyarrow.Table, the rows gradindex.query returns
        server.self_influence(top=20)
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

import gradindex.errors as errors

__all__ = ["TOKEN_ENV", "Client", "connect", "error_from_detail"]

# the environment variable a server and its clients read their shared token from
TOKEN_ENV = "GRADINDEX_TOKEN"


def connect(url: str, *, token: str | None = None, timeout: float | None = None) -> Client:
    """A client of the ``gradindex serve`` server at ``url``.

    Args:
        url: the URL the server printed first, e.g. ``grpc://127.0.0.1:8815``.
        token: the token the server was started with; default: the ``GRADINDEX_TOKEN`` environment variable.
        timeout: seconds a request may take before it is given up; default: no limit.

    Returns:
        A ``Client`` (also a context manager that closes its connection).
    """
    return Client(url, token=token, timeout=timeout)


class Client:
    """Asks a ``gradindex serve`` server; each answer is exactly what the direct call returns (same Arrow schema,
    same values), and each refusal raises the error the direct call raises, with its message.

    Args:
        url: the server's URL (``grpc://host:port``).
        token: the server's token; default: the ``GRADINDEX_TOKEN`` environment variable.
        timeout: seconds a request may take; default: no limit.
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float | None = None) -> None:
        from pyarrow import flight

        self.url = url
        token = os.environ.get(TOKEN_ENV) if token is None else token
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = flight.FlightCallOptions(headers=headers, timeout=timeout)
        try:
            self._client = flight.FlightClient(url)
        except (pa.ArrowInvalid, flight.FlightError) as error:
            raise errors.ArgumentError(
                "url", f"url {url!r} is not a server address ({error}); give the URL `gradindex serve` printed"
            ) from None

    def query(
        self,
        samples: Sequence[int] | str | None = None,
        *,
        split: str = "test",
        k: int = 10,
        opponents: bool = False,
        batch_size: int = 256,
        nprobe: int | None = None,
        damping: float | None = None,
        solver: str | None = None,
        method_options: dict | None = None,
        store: str | Path | None = None,
    ) -> pa.Table:
        """The k most influential training samples for query samples: the table ``gradindex.query`` returns
        (``query, query_id, rank, row, sample_id, score``), featurized and searched by the server.

        Args:
            samples: indices into ``split``: a sequence, or text like ``"0,5,10-19"``; default: the whole split.
            split: the query split of the server's task.
            k: results per query sample.
            opponents: the k most negative scores instead of the k most positive.
            batch_size: query samples featurized per batch.
            nprobe: with a server started on a persisted index: IVF lists probed (HNSW: efSearch).
            damping: asymmetric stores (if, trak): λ for this query instead of the store's.
            solver: if stores: the inverse-HVP solver for this query.
            method_options: other query-side method options.
            store: the store this query is meant for; the server refuses it if it serves another.

        Raises:
            GradIndexError: the server's refusal, as the class the direct call raises (``ArgumentError``,
                ``IncompatibleStoreError``, ...), or that the server cannot be reached.
        """
        if samples is not None and not isinstance(samples, str):
            samples = [int(value) for value in samples]
        return self._table(
            "query",
            {
                "samples": samples,
                "split": split,
                "k": k,
                "opponents": bool(opponents),
                "batch_size": batch_size,
                "nprobe": nprobe,
                "damping": damping,
                "solver": solver,
                "method_options": dict(method_options or {}),
                "store": _store_text(store),
            },
        )

    def opponents(self, samples: Sequence[int] | str | None = None, **options: Any) -> pa.Table:
        """``query(samples, opponents=True, **options)``: the k most negative influences first."""
        return self.query(samples, opponents=True, **options)

    def self_influence(
        self,
        *,
        top: int | None = None,
        damping: float | None = None,
        solver: str | None = None,
        method_options: dict | None = None,
        store: str | Path | None = None,
    ) -> pa.Table:
        """Training samples ranked by self-influence: the table ``gradindex.self_influence`` returns
        (``rank, row, sample_id, score``).

        Args:
            top: only the ``top`` highest; default: every row.
            damping: asymmetric stores (if, trak): recompute at this λ instead of the store's.
            solver: if stores: recompute with this inverse-HVP solver.
            method_options: other query-side method options to recompute with.
            store: the store this request is meant for; the server refuses it if it serves another.
        """
        return self._table(
            "self_influence",
            {
                "top": top,
                "damping": damping,
                "solver": solver,
                "method_options": dict(method_options or {}),
                "store": _store_text(store),
            },
        )

    def info(self) -> dict:
        """What the server serves: ``url``, ``store``, ``content_id``, ``n_samples``, ``dim``, ``method``, ``search``
        (``exact in memory``, ``exact streamed``, ``index NAME``, ``dask ADDRESS``), ``loads`` (1 + the reloads after
        the store changed) and ``requests``."""
        from pyarrow import flight

        results = self._call(lambda: list(self._client.do_action(flight.Action("info", b""), self._options)))
        return json.loads(results[0].body.to_pybytes())

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _table(self, command: str, params: dict) -> pa.Table:
        from pyarrow import flight

        ticket = flight.Ticket(json.dumps({"command": command, "params": params}).encode())
        return self._call(lambda: self._client.do_get(ticket, self._options).read_all())

    def _call(self, request):
        from pyarrow import flight

        try:
            return request()
        except flight.FlightUnauthenticatedError:
            raise errors.ArgumentError(
                "token",
                f"the gradindex server at {self.url} refused the request: it needs the token it was started with; "
                f"pass token=TOKEN or set {TOKEN_ENV}",
            ) from None
        except flight.FlightUnavailableError as error:
            reason = str(error).split(". Detail:")[0]
            raise errors.GradIndexError(
                f"cannot reach a gradindex server at {self.url} ({reason}); start one with `gradindex serve STORE` "
                "or check the URL"
            ) from None
        except flight.FlightError as error:
            detail = _detail(error)
            if detail is None:
                raise errors.GradIndexError(
                    f"the gradindex server at {self.url} failed: {str(error).split('. Detail:')[0]}; see its log"
                ) from None
            raise error_from_detail(detail) from None


def _store_text(store: str | Path | None) -> str | None:
    """A store as the server compares it: a URL as given, a local path made absolute here."""
    if store is None:
        return None
    text = str(store)
    return text if "://" in text else str(Path(text).resolve())


def _detail(error: Exception) -> dict | None:
    extra = getattr(error, "extra_info", b"") or b""
    try:
        detail = json.loads(extra)
    except ValueError:
        return None
    return detail if isinstance(detail, dict) and "class" in detail and "message" in detail else None


def error_from_detail(detail: dict) -> Exception:
    """The exception a server described (``gradindex.apps.serving.error_detail``), rebuilt with its class and
    message: a gradindex error as its own class (an ``ArgumentError`` with the arguments it names), a builtin as the
    builtin (an ``OSError`` with its errno, strerror and file name), anything else as an exception of that name."""
    name, message = str(detail["class"]), str(detail["message"])
    ours = getattr(errors, name, None) if name in errors.__all__ else None
    if isinstance(ours, type) and issubclass(ours, errors.GradIndexError):
        if issubclass(ours, errors.ArgumentError):
            arguments = [str(value) for value in detail.get("arguments") or [detail.get("argument") or ""]]
            return ours(str(detail.get("argument") or arguments[0]), message, also=arguments[1:])
        if issubclass(ours, errors.StoreWriteError):
            return ours(message, detail.get("errno"))
        return ours(message)
    builtin = getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        if issubclass(builtin, OSError) and detail.get("strerror") is not None:
            return builtin(
                detail.get("errno"), detail["strerror"], *([detail["filename"]] if detail.get("filename") else [])
            )
        return builtin(*detail.get("args", [message]))
    made = type(name, (Exception,), {"__module__": str(detail.get("module") or __name__)})
    return made(*detail.get("args", [message]))
