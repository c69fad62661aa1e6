"""Approximate inner-product indexes: faiss ``index_factory`` strings, trained on a sample, filled block by block.

This layer knows numpy and FAISS only; the pipeline feeds it vectors read from a store::

    index = ApproxIndex.create("IVF4096,SQfp16", dim=256, n_rows=5_000_000)
    index.train(sample)                         # [n_train, dim]; skipped by indexes that need none (HNSW)
    index.add(block)                            # [n, dim], rows numbered in add order, one block at a time
    scores, rows = index.search(queries, k, param=32)   # nprobe for IVF, efSearch for HNSW
    recall_at_k(rows, exact_rows)               # the fraction of the exact top-k found

    meta = save_index(index.cpu_index(), directory, "ivf", {...})   # atomic: files first, meta last
    faiss_index, meta = load_index(directory, "ivf", expect={"ntotal": n, "dim": d})

Persistence goes through ``save_index`` / ``load_index`` only, so that one implementation of
"write to a temporary name, rename, check on load against the manifest, wrap faiss errors" serves
every kind of index.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import SearchError
from gradindex.search._arrays import Float32Buffer, as_matrix, check_finite, row_chunks
from gradindex.search._config import INDEX_NAME, check_index_name
from gradindex.search._exact import as_queries
from gradindex.search._faiss import ensure_configured, faiss_errors, gpu_resources, resolve_gpus
from gradindex.store import check_file_name, is_inside
from gradindex.store.faults import crash_point
from gradindex.utils import HOST_TAG, check_positive_int, pid_alive, sha256_file, sha256_json

__all__ = [
    "ApproxIndex",
    "OnDiskListsWriter",
    "check_train_size",
    "default_index_name",
    "empty_copy",
    "index_files",
    "index_lock",
    "index_names",
    "is_index_file",
    "load_index",
    "read_index_meta",
    "recall_at_k",
    "remove_index",
    "resolve_factory",
    "rows_subset",
    "save_index",
    "stdout_to_stderr",
    "sweep_index_orphans",
    "sweep_index_temporaries",
    "write_index_meta",
]

METRIC = "inner_product"
META_SUFFIX = ".json"
# Temporaries name their writer (pid, host), so that a later build removes only those of dead writers.
TMP_MARK = ".gi-idx-tmp-"
# "IVF" with no list count, followed by "," or "_" (e.g. "IVF,PQ64", "IVF_HNSW32,Flat")
_IVF_WITHOUT_NLIST = re.compile(r"^IVF(?=[,_])")


# ---- factory strings --------------------------------------------------------------------------


def memory_per_row(index: Any) -> int:
    """Bytes an index holds in memory per row it is given: its code (HNSW: the stored vector and its level-0 links)
    and the row's id."""
    import faiss

    index = faiss.downcast_index(index)
    try:
        code = int(index.sa_code_size())
    except RuntimeError:
        storage = getattr(index, "storage", None)
        code = int(faiss.downcast_index(storage).sa_code_size()) if storage is not None else 4 * int(index.d)
        hnsw = getattr(index, "hnsw", None)
        if hnsw is not None:
            code += 4 * int(hnsw.nb_neighbors(0))
    return code + 8


def default_nlist(n_rows: int) -> int:
    """The IVF list count for ``n_rows`` vectors: a power of two near 4·√n, with ≥ 39 training points per list."""
    n_rows = max(1, int(n_rows))
    nlist = 1 << max(0, round(math.log2(4 * math.sqrt(n_rows))))
    while nlist > 1 and nlist * 50 > n_rows:  # faiss wants ≥ 39 training points per list; some rows are held out
        nlist //= 2
    return nlist


def resolve_factory(factory: str, n_rows: int) -> str:
    """``factory`` with the IVF list count filled in when it says just "IVF" (``"IVF,PQ64"`` -> ``"IVF4096,PQ64"``)."""
    if not isinstance(factory, str) or not factory.strip():
        raise ValueError(
            f"an index factory must be a faiss index_factory string such as 'IVF1024,SQfp16', got {factory!r}"
        )
    factory = factory.strip()
    return _IVF_WITHOUT_NLIST.sub(f"IVF{default_nlist(n_rows)}", factory)


# faiss's k-means wants this many training points per list (it warns below it and clusters badly)
MIN_POINTS_PER_LIST = 39


def check_train_size(factory: str, nlist: int | None, n_train: int, n_available: int) -> None:
    """Refuse to train ``nlist`` IVF lists on fewer than 39 points each, in one sentence naming the numbers and the
    fix: ``n_train`` rows were drawn of the ``n_available`` the store can give (its rows less those held out)."""
    if nlist is None or n_train >= MIN_POINTS_PER_LIST * nlist:
        return
    needed = MIN_POINTS_PER_LIST * nlist
    fitting = 1 << max(0, (max(1, n_train) // MIN_POINTS_PER_LIST).bit_length() - 1)
    source = (
        f"the store has only {n_available:,} rows to draw them from"
        if n_available < needed
        else f"only {n_train:,} of its {n_available:,} rows were drawn (train_size or the memory budget)"
    )
    raise ValueError(
        f"{factory!r} has nlist={nlist:,} IVF lists and needs at least {MIN_POINTS_PER_LIST} × {nlist:,} = "
        f"{needed:,} training rows, but {source}; use fewer lists (e.g. IVF{min(fitting, nlist // 2 or 1)}, or "
        "'IVF,...' to pick a count for the store), a larger train_size or memory budget, or a larger store"
    )


def default_index_name(factory: str) -> str:
    """A file-safe name for an index made from ``factory``: ``"IVF4096,SQfp16"`` -> ``"ivf4096-sqfp16"``."""
    return re.sub(r"[^a-z0-9]+", "-", factory.lower()).strip("-") or "index"


# ---- the index ----------------------------------------------------------------------------------


class ApproxIndex:
    """An approximate inner-product faiss index whose rows are numbered in add order.

    Search on all GPUs (lists sharded across them) when faiss has GPUs and ``use_gpu`` is not False
    and the index kind exists on GPU (IVF); else on CPU. Train and add happen on CPU, with the IVF
    k-means on GPU when there is one.
    """

    def __init__(self, index: Any, factory: str, *, use_gpu: bool | None = None, float16: bool = False) -> None:
        ensure_configured()
        self._index = index
        self._factory = factory
        self._use_gpu = use_gpu
        self._n_gpus = resolve_gpus(use_gpu)
        # GPU storage in float16 loses nothing when the store already holds float16 vectors
        self._float16 = float16
        self._gpu_resources: list[Any] = []
        self._gpu_index: Any = None
        self._gpu_ntotal = -1
        self._buffer = Float32Buffer()

    @classmethod
    def create(
        cls, factory: str, dim: int, n_rows: int, *, use_gpu: bool | None = None, float16: bool = False
    ) -> ApproxIndex:
        """A new, empty index from a faiss factory string (an "IVF" without a count gets one for ``n_rows``)."""
        import faiss

        dim = check_positive_int("dim", dim)
        resolved = resolve_factory(factory, n_rows)
        try:
            index = faiss.index_factory(dim, resolved, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[-200:]
            raise ValueError(
                f"faiss cannot make an index from {factory!r} for dimension {dim} ({detail}); use an index_factory "
                "string such as 'IVF1024,SQfp16', 'IVF,PQ64' (PQ's M must divide the dimension) or 'HNSW32'"
            ) from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:  # pragma: no cover - faiss keeps the metric asked for
            raise ValueError(f"{factory!r} does not support inner-product search")
        return cls(index, resolved, use_gpu=use_gpu, float16=float16)

    # ---- description ---------------------------------------------------------------------------
    @property
    def factory(self) -> str:
        return self._factory

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def nlist(self) -> int | None:
        import faiss

        ivf = faiss.try_extract_index_ivf(self._index)
        return int(ivf.nlist) if ivf is not None else None

    @property
    def search_parameter(self) -> str | None:
        """The knob trading speed for recall: ``"nprobe"`` (IVF), ``"efSearch"`` (HNSW) or None."""
        import faiss

        if faiss.try_extract_index_ivf(self._index) is not None:
            return "nprobe"
        if _hnsw_of(self._index) is not None:
            return "efSearch"
        return None

    def parameter_values(self) -> list[int]:
        """The values of ``search_parameter`` worth trying, cheapest first."""
        if self.search_parameter == "nprobe":
            nlist = self.nlist or 1
            values = [1 << power for power in range(0, nlist.bit_length()) if (1 << power) < nlist] + [nlist]
            return sorted(set(values))
        if self.search_parameter == "efSearch":
            return [16, 32, 64, 128, 256, 512]
        return []

    def default_train_size(self) -> int:
        """How many sample rows training wants: 50 per IVF list (≥ 256 per PQ/SQ codebook), 0 when untrained is fine."""
        if self.is_trained:
            return 0
        nlist = self.nlist or 1
        return max(50 * nlist, 10_000)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_index is not None

    def __repr__(self) -> str:
        return f"ApproxIndex({self._factory!r}, dim={self.dim}, ntotal={self.ntotal}, on_gpu={self.on_gpu})"

    def cpu_index(self) -> Any:
        """The faiss index itself (CPU), e.g. to save it."""
        return self._index

    # ---- building ------------------------------------------------------------------------------
    def train(self, sample: np.ndarray) -> None:
        """Train on ``sample [n, dim]`` (k-means for IVF lists, codebooks for PQ/SQ); a no-op when not needed."""
        import faiss

        if self.is_trained:
            return
        sample = as_matrix(sample, "training vectors", self.dim)
        check_finite(sample, "training vectors", self._buffer)
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        nlist = self.nlist
        if nlist is not None and sample.shape[0] < nlist:
            raise ValueError(
                f"{self._factory!r} has {nlist} IVF lists but only {sample.shape[0]} training vectors were given; "
                "use fewer lists (e.g. 'IVF,...' picks a count for the store) or a larger store"
            )
        ivf = faiss.try_extract_index_ivf(self._index)
        if self._n_gpus and ivf is not None:
            # k-means on the GPUs: the one costly step of training (faiss's bench_gpu_1bn does the same)
            resources = gpu_resources(self._n_gpus)
            flat = faiss.IndexFlatIP(self.dim)
            with faiss_errors(f"moving the k-means of {self._factory!r} to {self._n_gpus} GPU(s)"):
                ivf.clustering_index = faiss.index_cpu_to_gpu_multiple_py(resources, flat)
        with faiss_errors(f"training {self._factory!r} on {sample.shape[0]} vectors"):
            self._index.train(sample)
        if ivf is not None:
            ivf.clustering_index = None

    def add(self, vectors: np.ndarray) -> None:
        """Append ``vectors [n, dim]`` as rows ``ntotal .. ntotal + n - 1`` (nothing is added if any is not finite)."""
        if not self.is_trained:
            raise SearchError(f"index {self._factory!r} must be trained before vectors are added")
        vectors = as_matrix(vectors, "vectors", self.dim)
        check_finite(vectors, "vectors", self._buffer)
        with faiss_errors(f"adding {vectors.shape[0]} vectors to {self._factory!r} ({self.ntotal} rows)"):
            for start, stop in row_chunks(vectors.shape[0], self.dim):
                self._index.add(self._buffer.float32(vectors[start:stop]))

    # ---- searching -----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, param: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k: ``queries [q, dim]`` -> ``(scores [q, k'] float32, rows [q, k'] int64)``, best first.

        ``k' = min(k, ntotal)``. ``param`` sets ``search_parameter`` (nprobe / efSearch) for this call.
        Where the index finds fewer than k' rows for a query (a small nprobe), the row is -1 and the score -inf.
        """
        k = check_positive_int("k", k)
        queries = as_queries(queries, self.dim, "the index has")
        k_found = min(k, self.ntotal)
        if k_found == 0 or queries.shape[0] == 0:
            return np.empty((queries.shape[0], k_found), np.float32), np.empty((queries.shape[0], k_found), np.int64)
        index, where = self._searcher()
        if param is not None:
            self._set_parameter(index, check_positive_int(self.search_parameter or "param", param))
        with faiss_errors(f"searching {queries.shape[0]} queries (k={k_found}) in {self._factory!r} on {where}"):
            scores, rows = index.search(queries, k_found)
        scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
        return scores, rows.astype(np.int64)

    def _set_parameter(self, index: Any, value: int) -> None:
        import faiss

        name = self.search_parameter
        if name is None:
            raise ValueError(f"index {self._factory!r} has no search parameter (nprobe/efSearch) to set")
        if name == "nprobe":
            value = min(value, self.nlist or value)
        space = faiss.GpuParameterSpace() if index is not self._index else faiss.ParameterSpace()
        with faiss_errors(f"setting {name}={value} on {self._factory!r}"):
            space.set_index_parameter(index, name, value)

    def _searcher(self) -> tuple[Any, str]:
        import faiss

        if not self._n_gpus or self.search_parameter != "nprobe":
            return self._index, "CPU"  # HNSW and friends have no GPU version
        if self._gpu_index is None or self._gpu_ntotal != self.ntotal:
            self._gpu_index = None
            try:
                self._gpu_resources = self._gpu_resources or gpu_resources(self._n_gpus)
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True  # each GPU holds 1/n of the lists' contents
                options.useFloat16 = self._float16
                options.useFloat16CoarseQuantizer = False  # the list choice stays as on CPU
                with faiss_errors(f"copying {self._factory!r} ({self.ntotal} rows) to {self._n_gpus} GPU(s)"):
                    self._gpu_index = faiss.index_cpu_to_gpu_multiple_py(self._gpu_resources, self._index, options)
                self._gpu_ntotal = self.ntotal
            except SearchError:
                if self._use_gpu:
                    raise
                self._n_gpus = 0  # this kind of index has no GPU version here: search it on CPU
                return self._index, "CPU"
        return self._gpu_index, f"{self._n_gpus} GPU(s)"


def empty_copy(index: Any) -> Any:
    """A trained, empty copy of an IVF ``index`` (its quantizer, codec and transforms, none of its lists' contents),
    made without copying the lists: what each part of a distributed index starts from."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(
            "a distributed index needs an IVF factory string (e.g. 'IVF4096,SQfp16'); HNSW and flat indexes cannot "
            "be split by rows"
        )
    lists, owned, ntotal, outer_ntotal = ivf.invlists, ivf.own_invlists, ivf.ntotal, index.ntotal
    placeholder = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.replace_invlists(placeholder, False)
    ivf.ntotal = index.ntotal = 0
    try:
        with faiss_errors("copying a trained index without its lists"):
            blob = faiss.serialize_index(index)
    finally:
        ivf.replace_invlists(lists, owned)
        ivf.ntotal, index.ntotal = ntotal, outer_ntotal
    return faiss.deserialize_index(blob)


def rows_subset(index: Any, first_row: int, stop_row: int) -> Any:
    """An in-memory IVF index holding only the entries of rows ``first_row .. stop_row - 1`` of ``index`` (ids kept):
    the same lists are probed for a query, so the union of the subsets' results is ``index``'s result."""
    import faiss

    subset = empty_copy(index)
    source, target = faiss.extract_index_ivf(index), faiss.extract_index_ivf(subset)
    # list by list through the InvertedLists interface (faiss's own copy_subset_to crashes on memory-mapped on-disk
    # lists): the entries in the range keep their list, order and id
    lists, code_size, added = source.invlists, int(source.code_size), 0
    with faiss_errors(f"copying rows {first_row}..{stop_row - 1} of an index"):
        for number in range(int(source.nlist)):
            size = int(lists.list_size(number))
            if size == 0:
                continue
            ids_ptr, codes_ptr = lists.get_ids(number), lists.get_codes(number)
            try:
                ids = faiss.rev_swig_ptr(ids_ptr, size).copy()
                codes = faiss.rev_swig_ptr(codes_ptr, size * code_size).copy().reshape(size, code_size)
            finally:
                lists.release_ids(number, ids_ptr)
                lists.release_codes(number, codes_ptr)
            keep = (ids >= first_row) & (ids < stop_row)
            count = int(keep.sum())
            if count:
                kept_ids = np.ascontiguousarray(ids[keep])
                kept_codes = np.ascontiguousarray(codes[keep])
                target.invlists.add_entries(number, count, faiss.swig_ptr(kept_ids), faiss.swig_ptr(kept_codes))
                added += count
    target.ntotal = added
    subset.ntotal = added
    return subset


def index_to_bytes(index: Any) -> np.ndarray:
    """A faiss index as a uint8 array (to send to Dask workers)."""
    import faiss

    with faiss_errors("serializing an index"):
        return faiss.serialize_index(index)


def index_from_bytes(data: np.ndarray) -> Any:
    import faiss

    with faiss_errors("reading a serialized index"):
        return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))


def _hnsw_of(index: Any) -> Any:
    import faiss

    index = faiss.downcast_index(index)
    return getattr(index, "hnsw", None)


def recall_at_k(found_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact| for ``[q, k]`` row arrays (-1 entries count as misses)."""
    found_rows = np.asarray(found_rows)
    exact_rows = np.asarray(exact_rows)
    if found_rows.shape[0] != exact_rows.shape[0]:
        raise ValueError(
            f"recall needs as many found as exact result rows, got {found_rows.shape[0]} and {exact_rows.shape[0]}"
        )
    if exact_rows.size == 0:
        return 1.0
    hits = [
        len(set(found[found >= 0].tolist()) & set(exact.tolist())) / max(1, len(exact))
        for found, exact in zip(found_rows, exact_rows)
    ]
    return float(np.mean(hits))


# ---- on-disk inverted lists (faiss contrib.ondisk) ----------------------------------------------


class OnDiskListsWriter:
    """Fills a trained, empty IVF index block by block without holding its lists in memory.

    Blocks go into in-memory parts of at most ``part_bytes`` of codes; each full part is written to
    ``workdir`` and dropped. ``finish(ivfdata)`` merges the parts into one ``.ivfdata`` file (faiss
    ``contrib.ondisk.merge_ondisk``) and returns the index, whose lists are read from that file.
    """

    def __init__(self, trained: Any, workdir: Path, *, part_bytes: int = 256 << 20) -> None:
        import faiss

        ivf = faiss.try_extract_index_ivf(trained)
        if ivf is None:
            raise ValueError(
                "an on-disk index needs an IVF factory string (e.g. 'IVF4096,SQfp16'); HNSW and flat indexes are "
                "in-memory only"
            )
        if not trained.is_trained or trained.ntotal:
            raise ValueError("OnDiskListsWriter needs a trained, empty index")
        self._trained = trained
        self._workdir = Path(workdir)
        self._part_rows = max(1, part_bytes // max(1, ivf.code_size + 8))
        self._parts: list[str] = []
        self._current: Any = None
        self._buffer = Float32Buffer()
        self.ntotal = 0

    def add(self, vectors: np.ndarray) -> None:
        """Append ``vectors [n, dim]`` as rows ``ntotal .. ntotal + n - 1``."""
        import faiss

        vectors = as_matrix(vectors, "vectors", int(self._trained.d))
        check_finite(vectors, "vectors", self._buffer)
        for start, stop in row_chunks(vectors.shape[0], int(self._trained.d)):
            if self._current is None:
                self._current = faiss.clone_index(self._trained)
            ids = np.arange(self.ntotal, self.ntotal + stop - start, dtype=np.int64)
            with faiss_errors(f"adding {stop - start} vectors to an on-disk index part"):
                self._current.add_with_ids(self._buffer.float32(vectors[start:stop]), ids)
            self.ntotal += stop - start
            if self._current.ntotal >= self._part_rows:
                self._flush()

    def _flush(self) -> None:
        import faiss

        if self._current is None or self._current.ntotal == 0:
            return
        path = str(self._workdir / f"part-{len(self._parts):05d}.faiss")
        with faiss_errors(f"writing on-disk index part {path}"):
            faiss.write_index(self._current, path)
        self._parts.append(path)
        self._current = None

    def finish(self, ivfdata: Path) -> Any:
        """Merge the parts into ``ivfdata`` (written in place: give it its final name) and return the index."""
        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        self._flush()
        index = faiss.clone_index(self._trained)
        if not self._parts:
            return index
        with faiss_errors(f"merging {len(self._parts)} index parts into {ivfdata}"), _stdout_to_stderr():
            merge_ondisk(index, self._parts, str(ivfdata))
        for part in self._parts:
            Path(part).unlink(missing_ok=True)
        return index


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what faiss's C++ prints (on-disk lists: "resizing ...", "IO_FLAG_ONDISK_SAME_DIR: ...") to stderr,
    so that it never mixes into results written to stdout (``gradindex query --format jsonl``)."""
    try:
        import sys

        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. captured): nothing to protect
        yield
        return
    libc = ctypes.CDLL(None)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


stdout_to_stderr = _stdout_to_stderr


# ---- persistence ------------------------------------------------------------------------------
#
# An index NAME in a directory is NAME.json (its meta, written last, sealed with the sha256 of its canonical JSON)
# naming NAME.<token>.faiss and, for on-disk lists, NAME.<token>.ivfdata. Files get a fresh token on every save,
# so a reader always sees one whole version: the old files until the meta is replaced, the new ones after.
#
# Writers of one NAME take turns through NAME.lock (created exclusively, naming pid and host; a dead writer's
# lock on this host is taken over): everything a writer makes before its turn carries a temporary name with its
# pid (swept once that pid is dead); in its turn it renames its files into place, writes the meta, and deletes
# every NAME.<token>.* file the new meta does not name. A writer killed in its turn leaves its lock to the next
# writer, who sweeps what it left. No file name is ever taken from a meta to delete it: only names matching
# NAME.<token>.faiss / .ivfdata, found by listing the folder, are removed.

META_SEAL = "meta_sha256"
LOCK_SUFFIX = ".lock"
# how long a writer waits for another live writer's turn on the same index (a turn is a few renames)
LOCK_WAIT_S = 120.0
_TOKEN = "[0-9a-f]{12}"
_INDEX_FILE = re.compile(
    rf"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{{0,99}})\.(?P<token>{_TOKEN})\.(?P<kind>faiss|ivfdata)$"
)
_SHA = re.compile("[0-9a-f]{64}")


def _rebuild(name: str, factory: Any = None) -> str:
    shown = repr(factory) if isinstance(factory, str) else "..."
    return f"rebuild it with `gradindex index STORE --factory {shown} --name {name} --overwrite`"


def _meta_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"{check_index_name(name)}{META_SUFFIX}"


def _file_pattern(name: str, kind: str) -> re.Pattern:
    return re.compile(rf"{re.escape(name)}\.{_TOKEN}\.{kind}")


def is_index_file(file_name: str, name: str) -> bool:
    """Whether ``file_name`` is one of index ``name``'s files: ``NAME.<token>.faiss`` or ``NAME.<token>.ivfdata``."""
    match = _INDEX_FILE.match(file_name)
    return match is not None and match["name"] == name


def index_files(directory: str | Path, name: str) -> list[str]:
    """The names of every ``NAME.<token>.faiss`` / ``.ivfdata`` file of index ``name`` in ``directory``, referenced
    by its meta or not (found by listing, never by reading a meta)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(path.name for path in directory.iterdir() if is_index_file(path.name, name))


def _tmp_name(name: str) -> str:
    return f"{name}{TMP_MARK}{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:12]}"


def sweep_index_temporaries(directory: str | Path) -> int:
    """Remove temporary files and folders that dead index writers (on this host) left in ``directory``."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for path in directory.glob(f"*{TMP_MARK}*"):
        pid, _, rest = path.name.partition(TMP_MARK)[2].partition("-")
        if rest.startswith(HOST_TAG) and pid.isdigit() and pid_alive(int(pid)):
            continue
        if not rest.startswith(HOST_TAG) and pid.isdigit():
            continue  # another host's writer: it may be alive
        _remove_entry(path)
        removed += 1
    return removed


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(_tmp_name(path.name))
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- the writers' lock ------------------------------------------------------------------------------------------


def _lock_holder(path: Path) -> dict | None:
    """The lock's ``{"pid", "host"}``; None once it is gone, ``{}`` when it cannot be read (or is a link)."""
    if path.is_symlink():
        return {}
    try:
        holder = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else {}


def _lock_is_stale(path: Path, holder: dict) -> bool:
    """A lock of a dead writer on this host, or one that is unreadable (never written whole by gradindex) and old."""
    if not holder:
        try:
            return time.time() - path.lstat().st_mtime > 60
        except FileNotFoundError:
            return False
    return holder.get("host") == HOST_TAG and not pid_alive(holder["pid"])


_RETRY: dict = {"retry": True}


def _try_lock(path: Path) -> dict | None:
    """Take the lock (written whole, then hard-linked into place: one of several racers wins). None once held,
    ``_RETRY`` when it was just released or taken from a dead writer, else the holder (``{}`` if unreadable)."""
    tmp = path.with_name(_tmp_name(path.name))
    payload = {"pid": os.getpid(), "host": HOST_TAG, "hostname": socket.gethostname(), "time": time.time()}
    tmp.write_bytes(json.dumps(payload).encode())
    try:
        os.link(tmp, path)
        return None
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    holder = _lock_holder(path)
    if holder is None:
        return _RETRY
    if _lock_is_stale(path, holder):
        aside = path.with_name(_tmp_name(path.name))
        try:
            os.rename(path, aside)  # one of several takers wins the rename
        except FileNotFoundError:
            return _RETRY
        _remove_entry(aside)
        return _RETRY
    return holder


@contextlib.contextmanager
def index_lock(directory: str | Path, name: str, *, wait_s: float | None = LOCK_WAIT_S) -> Iterator[bool]:
    """Hold ``directory/NAME.lock`` for a write of index ``name``; yields True once held.

    A live writer's lock is waited for up to ``wait_s`` seconds (then a SearchError naming it); with ``wait_s=None``
    the context yields False at once instead. A dead writer's lock (its pid gone, on this host) is taken over.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{check_index_name(name)}{LOCK_SUFFIX}"
    started = time.monotonic()
    delay = 0.01
    while True:
        holder = _try_lock(path)
        if holder is None:
            break
        if holder is not _RETRY:
            if wait_s is None:
                yield False
                return
            if time.monotonic() - started > wait_s:
                raise SearchError(
                    f"index {name} in {directory} is being written by pid {holder.get('pid')} on "
                    f"{holder.get('hostname', 'another host')}; wait for that writer to finish, or delete {path} if "
                    "it is gone"
                )
        time.sleep(delay)
        delay = min(0.2, delay * 2)
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)


def _remove_entry(path: Path) -> None:
    """Remove a file, a link (never what it points at) or a folder (never following a link inside it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep_unreferenced(directory: Path, name: str, keep: set[str]) -> int:
    """Under the lock of ``name``: delete its ``NAME.<token>.*`` files that are not in ``keep``."""
    removed = 0
    for file in index_files(directory, name):
        if file not in keep:
            _remove_entry(directory / file)
            removed += 1
    return removed


def sweep_index_orphans(directory: str | Path) -> int:
    """Remove index files (``NAME.<token>.faiss`` / ``.ivfdata``) that no meta names: what writers killed in their
    turn left. An index whose lock a live writer holds, or whose meta cannot be checked, is left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    names = {match["name"] for match in map(_INDEX_FILE.match, (path.name for path in directory.iterdir())) if match}
    removed = 0
    for name in sorted(names):
        if not INDEX_NAME.match(name):
            continue
        with index_lock(directory, name, wait_s=None) as held:
            if not held:
                continue
            meta_path = _meta_path(directory, name)
            if meta_path.exists() or meta_path.is_symlink():
                try:
                    meta = _read_meta_file(meta_path, name, directory)
                except SearchError:
                    continue  # a meta we cannot check: its files stay until it is dropped or rebuilt
                keep = {meta["file"], meta.get("ivfdata")}
            else:
                keep = set()
            removed += _sweep_unreferenced(directory, name, keep)
    return removed


# ---- saving and loading -----------------------------------------------------------------------------------------


def new_ivfdata_path(directory: Path, name: str) -> Path:
    """A fresh temporary file for the on-disk lists of index ``name``, to pass to ``OnDiskListsWriter.finish`` and
    then to ``save_index``, which renames it to ``NAME.<token>.ivfdata``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    return Path(directory) / _tmp_name(f"{check_index_name(name)}.{uuid.uuid4().hex[:12]}.ivfdata")


def _ondisk_lists(index: Any) -> Any:
    """The on-disk inverted lists of an IVF index (``OnDiskInvertedLists``), or None."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def save_index(index: Any, directory: str | Path, name: str, meta: dict, *, ivfdata: Path | None = None) -> dict:
    """Persist a faiss index as ``directory/NAME``: the index file written under a temporary name and fsynced, then,
    holding the index's lock, renamed into place with its on-disk lists, its sealed meta (``meta`` plus ntotal, dim,
    metric, file names and their sha256) written atomically, and every older file of the index deleted. Returns the
    meta written (without its seal).

    ``ivfdata`` is the on-disk lists file the index reads, from ``new_ivfdata_path``.
    """
    import faiss

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = _meta_path(directory, name)
    ivfdata_name = None
    if ivfdata is not None:
        ivfdata = Path(ivfdata)
        ivfdata_name = ivfdata.name.partition(TMP_MARK)[0]
        if ivfdata.parent.resolve() != directory.resolve() or not _file_pattern(name, "ivfdata").fullmatch(
            ivfdata_name
        ):
            raise ValueError(f"the on-disk lists {ivfdata} must come from new_ivfdata_path({directory}, {name!r})")
    token = ivfdata_name.split(".")[-2] if ivfdata_name is not None else uuid.uuid4().hex[:12]
    file_name = f"{name}.{token}.faiss"
    lists = _ondisk_lists(index)
    if lists is not None and ivfdata_name is not None:
        lists.filename = str(directory / ivfdata_name)  # the name it is read back by (faiss keeps it in the file)
    tmp = directory / _tmp_name(file_name)
    try:
        with faiss_errors(f"writing index {name} to {directory}"):
            faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        written = {
            **meta,
            "name": name,
            "file": file_name,
            "ivfdata": ivfdata_name,
            "ntotal": int(index.ntotal),
            "dim": int(index.d),
            "metric": METRIC,
            # checked before faiss reads the files: damaged list data would otherwise load and answer differently
            "sha256": sha256_file(tmp),
            "ivfdata_sha256": sha256_file(ivfdata) if ivfdata is not None else None,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with index_lock(directory, name):
            if ivfdata is not None:
                os.replace(ivfdata, directory / ivfdata_name)
            os.replace(tmp, directory / file_name)
            _fsync_dir(directory)
            crash_point("index-before-meta")
            _write_atomic(meta_path, _sealed_bytes(written))
            _sweep_unreferenced(directory, name, {file_name, ivfdata_name})
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _sealed_bytes(meta: dict) -> bytes:
    body = {key: value for key, value in meta.items() if key != META_SEAL}
    return json.dumps({**body, META_SEAL: sha256_json(body)}, indent=1, sort_keys=True).encode()


def load_index(directory: str | Path, name: str, *, expect: dict | None = None, mmap: bool = False) -> tuple[Any, dict]:
    """Read index ``name`` back: ``(faiss index, meta)``.

    Checks the meta's seal and file names, the files' sha256 before faiss reads them, the file against its meta
    (ntotal, dim, inner-product metric) and against ``expect`` (the caller's manifest: ``{"ntotal": ..., "dim":
    ...}``); a mismatch, a missing or unreadable file is a SearchError that says how to rebuild. ``mmap`` maps the
    lists instead of reading them. faiss reads the files through links in a private folder, so that the on-disk lists
    file named inside the index file can only be the one the meta names.
    """
    import faiss

    directory = Path(directory)
    meta = read_index_meta(directory, name)
    rebuild = _rebuild(name, meta.get("factory"))
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise SearchError(
                f"index {name} was built for {key}={meta.get(key)} but the store has {key}={value}; {rebuild}"
            )
    files = {"file": meta["file"], "ivfdata": meta.get("ivfdata")}
    for key, checksum in (("file", "sha256"), ("ivfdata", "ivfdata_sha256")):
        if files[key] is None:
            continue
        path = directory / files[key]
        what = "file" if key == "file" else "on-disk lists"
        if not path.is_file():
            raise SearchError(f"index {name} is missing its {what} {path}; {rebuild}")
        if sha256_file(path) != meta[checksum]:
            raise SearchError(
                f"index {name}'s {what} {path} fails its checksum (it was damaged after it was written); {rebuild}"
            )
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0)
    private = Path(tempfile.mkdtemp(prefix="gradindex-load-"))
    try:
        for file in files.values():
            if file is not None:
                os.symlink(os.path.realpath(directory / file), private / file)
        try:
            with _stdout_to_stderr():
                index = faiss.read_index(str(private / files["file"]), flags)
        except (RuntimeError, MemoryError) as err:
            detail = " ".join(str(err).split())[-200:]
            raise SearchError(
                f"index {name} cannot be read from {directory / files['file']} ({detail}); {rebuild}"
            ) from err
        lists = _ondisk_lists(index)
        read_from = Path(lists.filename).name if lists is not None else None
        if read_from != files["ivfdata"]:
            raise SearchError(
                f"index {name}'s file {directory / files['file']} reads its lists from {read_from!r}, not the "
                f"{files['ivfdata']!r} its meta names; {rebuild}"
            )
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the lists stay mapped: faiss holds them open
    found = {
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "metric": METRIC if index.metric_type == faiss.METRIC_INNER_PRODUCT else str(index.metric_type),
    }
    for key, value in found.items():
        if meta.get(key) != value:
            raise SearchError(f"index {name}'s file holds {key}={value} but its meta says {meta.get(key)}; {rebuild}")
    return index, meta


def _read_meta_file(path: Path, name: str, directory: Path) -> dict:
    """The meta at ``path``, checked: inside ``directory``, its seal, its file names (inside ``directory`` too),
    ntotal, dim, metric and checksums. Returned without its seal."""
    rebuild = f"drop it with drop_index or {_rebuild(name)}"
    if not is_inside(directory, path):
        raise SearchError(f"index meta {path} is a link to {os.path.realpath(path)}, outside {directory}; {rebuild}")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise SearchError(f"index meta {path} is unreadable ({type(err).__name__}); {rebuild}") from err
    if not isinstance(raw, dict) or "file" not in raw:
        raise SearchError(f"index meta {path} is not a gradindex index meta; {rebuild}")
    rebuild = f"drop it with drop_index or {_rebuild(name, raw.get('factory'))}"
    meta = {key: value for key, value in raw.items() if key != META_SEAL}
    if raw.get(META_SEAL) != sha256_json(meta):
        if META_SEAL in raw:
            why = "fails its seal (it was changed after it was written)"
        else:
            why = "has no seal (it was written before gradindex sealed index metas)"
        raise SearchError(f"index meta {path} {why}; {rebuild}")
    check = {"error": SearchError, "fix": rebuild, "where": directory}
    for key, kind in (("file", "faiss"), ("ivfdata", "ivfdata")):
        if key == "file" or meta.get(key) is not None:
            pattern, form = _file_pattern(name, kind), f"{name}.<token>.{kind}"
            check_file_name(meta[key], what=f"index {name}'s {key}", pattern=pattern, form=form, **check)
    for key in ("file", "ivfdata"):
        if meta.get(key) is not None and not is_inside(directory, directory / meta[key]):
            raise SearchError(f"index {name}'s {key} {meta[key]!r} is a link out of {directory}; {rebuild}")
    sound = (
        meta.get("name") == name
        and meta.get("metric") == METRIC
        and all(isinstance(meta.get(key), int) and meta[key] >= low for key, low in (("ntotal", 0), ("dim", 1)))
        and isinstance(meta.get("sha256"), str)
        and _SHA.fullmatch(meta["sha256"]) is not None
        and (
            meta.get("ivfdata") is None
            or (isinstance(meta.get("ivfdata_sha256"), str) and _SHA.fullmatch(meta["ivfdata_sha256"]) is not None)
        )
    )
    if not sound:
        raise SearchError(f"index meta {path} lacks a sound name, ntotal, dim, metric or sha256; {rebuild}")
    return meta


def read_index_meta(directory: str | Path, name: str) -> dict:
    """The meta of index ``name`` (recall, factory, ...), checked (seal, file names); SearchError naming the indexes
    there if absent."""
    directory = Path(directory)
    path = _meta_path(directory, name)
    try:
        return _read_meta_file(path, name, directory)
    except FileNotFoundError:
        names = index_names(directory)
        have = f"it has {', '.join(names)}" if names else "it has none"
        raise SearchError(
            f"no index named {name!r} in {directory} ({have}); build one with `gradindex index STORE --factory ... "
            f"--name {name}`"
        ) from None


def write_index_meta(directory: str | Path, name: str, meta: dict) -> None:
    """Replace the meta of an existing index (e.g. to mark it stale), sealed, atomically, holding the index's lock;
    its file names must be the ones the current meta names."""
    directory = Path(directory)
    with index_lock(directory, name):
        current = read_index_meta(directory, name)
        if (meta.get("file"), meta.get("ivfdata")) != (current["file"], current.get("ivfdata")):
            raise ValueError(f"write_index_meta keeps index {name}'s files; save_index writes new ones")
        _write_atomic(_meta_path(directory, name), _sealed_bytes({**meta, "name": name}))


def index_names(directory: str | Path) -> list[str]:
    """Names of the indexes persisted in ``directory`` (their metas, sound or not), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        path.name[: -len(META_SUFFIX)]
        for path in directory.glob(f"*{META_SUFFIX}")
        if TMP_MARK not in path.name and INDEX_NAME.match(path.name[: -len(META_SUFFIX)])
    )


def remove_index(directory: str | Path, name: str) -> None:
    """Delete index ``name``: its meta first (so it disappears at once), then its files; also an index whose meta
    is damaged or unsealed. Only ``NAME.<token>.faiss`` / ``.ivfdata`` files found in ``directory`` are deleted,
    never a name read from the meta."""
    directory = Path(directory)
    meta_path = _meta_path(directory, name)
    with index_lock(directory, name):
        if not (meta_path.exists() or meta_path.is_symlink()):
            read_index_meta(directory, name)  # the "no index named" error
        _remove_entry(meta_path)
        _fsync_dir(directory)
        _sweep_unreferenced(directory, name, set())


def scratch_dir(directory: str | Path) -> Path:
    """A temporary working folder inside ``directory`` (same file system), marked for the store's sweep."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _tmp_name("build")
    path.mkdir()
    return path


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def blocks_in_order(blocks: Iterable[tuple[int, np.ndarray]], start: int = 0) -> Iterable[np.ndarray]:
    """The vectors of ``(first_row, vectors)`` blocks, checking that they are consecutive from ``start``."""
    expected = start
    for first_row, vectors in blocks:
        if first_row != expected:
            raise ValueError(f"blocks must come in row order without gaps: expected row {expected}, got {first_row}")
        expected += len(vectors)
        yield vectors
