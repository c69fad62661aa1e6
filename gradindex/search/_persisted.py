"""Approximate indexes of a store: built shard by shard, persisted under ``indexes/``, with measured recall.

The one place (beside the pipeline) where the store and the FAISS layer meet for approximate search::

    meta = gradindex.build_index("big.gradindex", "IVF4096,SQfp16")     # trains, adds, measures recall@10
    meta["recall"], meta["nprobe"]                                        # e.g. 0.96 at nprobe=32
    scores, rows = gradindex.search_store("big.gradindex", vectors, k=10, index=meta["name"])

An index is trained on a random sample of the store's rows, filled one shard at a time (the store
is never held in memory whole), and its recall@k is measured at build time against exact search on
held-out store rows (each row's own entry left out): for IVF and HNSW over a range of nprobe /
efSearch values, the smallest reaching ``target_recall`` becoming the index's default.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import ArgumentError, IncompleteStoreError, SearchError, StoreExistsError
from gradindex.search._approx import (
    META_SUFFIX,
    TMP_MARK,
    ApproxIndex,
    OnDiskListsWriter,
    check_train_size,
    default_index_name,
    empty_copy,
    index_from_bytes,
    index_names,
    index_to_bytes,
    is_index_file,
    load_index,
    memory_per_row,
    new_ivfdata_path,
    read_index_meta,
    recall_at_k,
    remove_index,
    remove_scratch,
    rows_subset,
    save_index,
    scratch_dir,
    stdout_to_stderr,
    sweep_index_orphans,
    sweep_index_temporaries,
    write_index_meta,
)
from gradindex.search._arrays import without_rows
from gradindex.search._config import IndexConfig, check_index_name
from gradindex.search._dask import DaskSearch, merge_topk
from gradindex.search._exact import ExactIndex, search_blocks
from gradindex.search._faiss import faiss_errors
from gradindex.store import (
    GradientStore,
    RemotePath,
    contained_path,
    is_remote,
    open_store,
    remove_file,
    store_path,
    write_bytes_atomic,
)
from gradindex.utils import (
    HOST_TAG,
    available_memory,
    check_fits,
    default_memory_budget,
    progress_bar,
    sha256_bytes,
    sha256_file,
    sha256_json,
)

__all__ = [
    "DaskIndexSearch",
    "IndexConfig",
    "build_index",
    "clear_index_cache",
    "drop_index",
    "list_indexes",
    "loaded_index",
    "search_index",
    "search_index_dask",
    "store_content_id",
    "update_indexes",
]

log = logging.getLogger("gradindex")

INDEX_DIR = "indexes"
_LOADED: dict[tuple, ApproxIndex] = {}  # (index dir, name, file) -> loaded index, so repeated queries do not re-read it
_MAX_LOADED = 4


def _open(store: GradientStore | str | Path) -> GradientStore:
    return store if isinstance(store, GradientStore) else open_store(store)


def index_dir(store: GradientStore) -> Path:
    """The folder of the store's persisted indexes. For a remote store, a local mirror of its ``indexes/``
    with every meta fresh from the store; index files are fetched when loaded (``_fetch``) and uploaded
    when saved (``_push``), since faiss reads and writes local files only."""
    if is_remote(store.path):
        return _mirror(store.path / INDEX_DIR)
    return contained_path(
        Path(store.path),
        INDEX_DIR,
        what="the index folder",
        error=SearchError,
        fix=f"replace it with a folder and rebuild the indexes with `gradindex index {store.path} --factory ...`",
    )


def _cache_root() -> Path:
    return Path(os.environ.get("GRADINDEX_CACHE") or Path(tempfile.gettempdir()) / f"gradindex-cache-{os.getuid()}")


def _mirror(remote: RemotePath) -> Path:
    """A local folder holding copies of the metas under ``remote`` (and, once fetched, their files)."""
    local = _cache_root() / "indexes" / sha256_bytes(str(remote).encode())[:24]
    local.mkdir(parents=True, exist_ok=True)
    metas = {
        item.name: item
        for item in remote.glob(f"*{META_SUFFIX}")
        if TMP_MARK not in item.name and _is_index_name(item.name[: -len(META_SUFFIX)])
    }
    for stale in local.glob(f"*{META_SUFFIX}"):
        if stale.name not in metas:
            stale.unlink(missing_ok=True)
    for name, item in metas.items():
        data = item.read_bytes()
        if not (local / name).is_file() or (local / name).read_bytes() != data:
            write_bytes_atomic(local / name, data)
    return local


def _is_index_name(name: str) -> bool:
    try:
        check_index_name(name)
    except ValueError:
        return False
    return True


def _meta_files(meta: dict) -> list[str]:
    """The files a checked meta (``read_index_meta``) names: their names are NAME.<token>.faiss / .ivfdata."""
    return [file for file in (meta.get("file"), meta.get("ivfdata")) if file]


# bytes moved per read/write when an index file is copied to or from an object store: files stream through this much
# memory (an fsspec file object uploads in parts: S3 multipart), never whole
COPY_CHUNK = 8 << 20


def _local_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that ``sweep_index_temporaries`` removes once this process is dead."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:12]}")


def _download(remote: RemotePath, local: Path) -> None:
    """Stream ``remote`` into ``local`` (temporary name, then rename): memory use is one chunk, not the file."""
    tmp = _local_tmp(local)
    try:
        with remote.open("rb") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target, COPY_CHUNK)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def _upload(local: Path, remote: RemotePath) -> None:
    """Stream ``local`` to ``remote`` through an fsspec file object (S3: a multipart upload, the object appearing
    whole when it completes): memory use is one chunk, not the file."""
    with open(local, "rb") as source, remote.open("wb") as target:
        shutil.copyfileobj(source, target, COPY_CHUNK)


def _fetch(store: GradientStore, directory: Path, meta: dict) -> None:
    """Download a remote store's index files into its mirror unless a sound copy is there (load_index checks the
    sha256), streamed. ``meta`` is checked (``read_index_meta``): its file names stay inside the folder."""
    if not is_remote(store.path):
        return
    remote = store.path / INDEX_DIR
    checksums = {meta.get("file"): meta.get("sha256"), meta.get("ivfdata"): meta.get("ivfdata_sha256")}
    for file in _meta_files(meta):
        local = directory / file
        sound = local.is_file() and not local.is_symlink() and sha256_file(local) == checksums[file]
        if not sound:
            try:
                _download(remote / file, local)
            except FileNotFoundError:
                pass  # load_index names the missing file


def _push(store: GradientStore, directory: Path, name: str) -> None:
    """Upload index ``name`` from a remote store's mirror, streamed: its files first, its meta last (the meta is what
    readers go by), then delete the store's files of earlier versions of it."""
    if not is_remote(store.path):
        return
    remote = store.path / INDEX_DIR
    meta_name = f"{name}{META_SUFFIX}"
    meta = read_index_meta(directory, name)
    keep = set(_meta_files(meta))
    for file in keep:
        if not (remote / file).exists():
            _upload(directory / file, remote / file)
    write_bytes_atomic(remote / meta_name, (directory / meta_name).read_bytes())
    for item in remote.glob(f"{name}.*"):
        # only NAME.<token>.* objects of this index (not those of an index named "NAME.x"), never a name from a meta
        if is_index_file(item.name, name) and item.name not in keep:
            remove_file(item)


def store_content_id(store: GradientStore) -> str:
    """A hash of what the store's vectors are: fingerprint, row count and every shard's checksums (from the
    manifest)."""
    shards = store.manifest.get("shards") or []
    payload = {
        "fingerprint": store.fingerprint,
        "n_samples": store.n_samples,
        "dim": store.dim,
        "shards": [sorted((record or {}).get("files", {}).values()) for record in shards],
    }
    return sha256_json(payload)


def _require_complete(store: GradientStore, doing: str) -> None:
    if not store.complete:
        raise IncompleteStoreError(
            f"store {store.path} is incomplete ({store.progress()} written); finish it with `gradindex build ... "
            f"--resume` before {doing}"
        )


def _progress(total: int, desc: str, enabled: bool | None):
    return progress_bar(total, desc, enabled=enabled, unit="row")


def build_index(
    store: GradientStore | str | Path,
    factory: str,
    *,
    name: str | None = None,
    k: int = 10,
    recall_queries: int = 200,
    target_recall: float = 0.95,
    train_size: int | None = None,
    on_disk: bool = False,
    use_gpu: bool | None = None,
    memory_budget: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
    dask: Any = None,
    progress: bool | None = None,
) -> dict:
    """Build an approximate index of a complete store from a faiss ``index_factory`` string and persist it.

    Trains once on a random sample drawn across all the store's shards, adds the store one shard at a time (the store
    is never held in memory whole; with ``dask``, the shards are added in parallel on the cluster's workers, each
    filling the lists of its own shards, and the parts merged), and measures recall@``k`` against exact search on
    held-out rows in both directions: proponents (the queries) and opponents (the negated queries). Each direction
    gets the smallest nprobe reaching ``target_recall`` (HNSW: efSearch), used by queries in that direction. The index
    is written under the store's ``indexes/`` atomically; query it with ``query(..., index=name)``,
    ``search_store(..., index=name)`` or, spread over Dask workers, ``DaskIndexSearch``.

    Args:
        store: a complete store: a path, an fsspec URL or an opened ``GradientStore``.
        factory: a faiss ``index_factory`` string (``"IVF4096,SQfp16"``, ``"IVF,PQ64"``, ``"HNSW32"``).
        name: the index's name; default: made from the factory (``ivf4096-sqfp16``).
        k: the k of the recall@k measured.
        recall_queries: held-out store rows the recall is measured on.
        target_recall: the recall the default nprobe (efSearch) must reach, in (0, 1].
        train_size: rows the index is trained on; default: what the factory wants, within half the memory budget.
            IVF needs at least 39 per list: fewer is refused, naming nlist, the rows available and the fix.
        on_disk: keep the IVF lists in a file beside the index (faiss ``contrib.ondisk``) instead of memory.
        use_gpu: train and search on all GPUs (default: when faiss has them).
        memory_budget: bytes the training sample may use (half of it).
        overwrite: replace an index of the same name.
        seed: seed of the training and held-out samples.
        dask: fill an IVF index's lists on Dask workers in parallel: a scheduler address, ``"local:N"`` or a
            ``distributed.Client`` (every worker must reach the store; a local store's ``indexes/`` must be on a file
            system the workers share).
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        The index's meta (also listed by ``info``): per direction its recall curve, chosen nprobe and recall
        (``recall``/``nprobe``/``curve`` for proponents, ``recall_opponents``/``nprobe_opponents``/
        ``curve_opponents``), the factory, files and build time.

    Raises:
        ValueError: a factory faiss cannot make, or too few rows to train it (the message names the numbers).
        StoreExistsError: an index of that name exists and ``overwrite`` is not set.
        IncompleteStoreError: the store's build has not finished.
    """
    config = IndexConfig(
        factory=factory,
        name=name,
        k=k,
        recall_queries=recall_queries,
        target_recall=target_recall,
        train_size=train_size,
        on_disk=on_disk,
        use_gpu=use_gpu,
        memory_budget=memory_budget,
        overwrite=overwrite,
        seed=seed,
        dask=dask,
    )
    k, recall_queries, train_size, seed = config.k, config.recall_queries, config.train_size, config.seed
    store = _open(store)
    _require_complete(store, "indexing it")
    name = check_index_name(name if name is not None else default_index_name(factory))
    directory = index_dir(store)
    if name in index_names(directory) and not overwrite:
        raise StoreExistsError(
            f"index {name!r} already exists in {store.path}; pass overwrite=True to rebuild it or choose another name"
        )
    sweep_index_temporaries(directory)
    sweep_index_orphans(directory)  # what writers killed while publishing left (never a live writer's)
    started = time.perf_counter()
    n_rows, dim = store.n_samples, store.dim
    store.read_shard(0)  # the declared dimension is trusted once a shard's bytes back it (faiss allocates by it)
    approx = ApproxIndex.create(factory, dim, n_rows, use_gpu=use_gpu, float16=store.dtype == "float16")
    if dask is not None and approx.nlist is None:
        raise ArgumentError(
            "dask",
            f"{approx.factory!r} is not an IVF index: only IVF lists can be filled on Dask workers; build it without "
            "dask=, or use an IVF factory such as 'IVF,SQfp16'",
        )
    budget = default_memory_budget() if memory_budget is None else memory_budget
    if not on_disk:  # the whole index lives in memory: refuse one that cannot, before training it
        check_fits(
            f"the in-memory index {approx.factory} of {n_rows:,} rows",
            n_rows * memory_per_row(approx.cpu_index()),
            available_memory(),
            "the memory this machine has available",
            "keep the IVF lists on disk (on_disk=True) or use a compressing factory such as IVF,PQ64",
        )

    rng = np.random.default_rng(seed)
    n_eval = int(min(recall_queries, max(1, n_rows // 10)))
    wanted = approx.default_train_size() if train_size is None else int(train_size)
    budget_rows = max(1, (budget // 2) // (4 * dim))
    skipped = _skipped_rows(store)
    n_available = max(0, n_rows - len(skipped) - n_eval)
    n_train = 0 if approx.is_trained else int(min(wanted, n_available, budget_rows))
    if not approx.is_trained and n_train <= 0:
        raise ValueError(
            f"store {store.path} has {n_rows} rows, too few to train {factory!r} and keep {n_eval} for measuring recall"
        )
    if not approx.is_trained:
        check_train_size(approx.factory, approx.nlist, n_train, n_available)
    order = _random_rows(rng, n_rows, n_eval + n_train, skipped)
    eval_rows = np.sort(order[:n_eval])
    train_rows = np.sort(order[n_eval : n_eval + n_train])
    del order

    builder = _DaskIndexBuilder(store, dask) if dask is not None else None
    try:
        if builder is not None:
            eval_vectors, train_vectors = builder.sample(eval_rows, train_rows)
        else:
            eval_vectors, train_vectors = _sample_rows(store, eval_rows, train_rows, progress)
        approx.train(train_vectors)
        del train_vectors
        log.info("trained %s on %d rows in %.1fs", approx.factory, n_train, time.perf_counter() - started)
        # the exact top-(k+1) of the held-out rows, both directions in one pass: [proponent queries; opponent queries]
        both = np.concatenate([eval_vectors, -eval_vectors])
        ivfdata = None
        scratch = scratch_dir(directory) if on_disk or builder is not None else None
        try:
            if builder is not None:
                parts, (_exact_scores, exact_rows) = builder.fill(approx.cpu_index(), both, k + 1, scratch)
                ivfdata = new_ivfdata_path(directory, name) if on_disk else None
                approx = ApproxIndex(
                    _merge_parts(approx.cpu_index(), parts, ivfdata),
                    approx.factory,
                    use_gpu=False if on_disk else use_gpu,
                    float16=store.dtype == "float16",
                )
            else:
                writer = OnDiskListsWriter(approx.cpu_index(), scratch) if on_disk else None
                sink = writer.add if writer is not None else approx.add

                # One pass adds each shard to the index and feeds it to the exact search of the held-out rows.
                def blocks() -> Iterator[tuple[int, np.ndarray]]:
                    bar = _progress(n_rows, f"index {store.path.name}", progress)
                    try:
                        for first_row, block in store.iter_blocks():
                            sink(block)
                            yield first_row, block
                            bar.update(len(block))
                    finally:
                        bar.close()

                _exact_scores, exact_rows = search_blocks(blocks(), both, k + 1, use_gpu=use_gpu)
                if writer is not None:
                    ivfdata = new_ivfdata_path(directory, name)
                    approx = ApproxIndex(writer.finish(ivfdata), approx.factory, use_gpu=False)
        finally:
            if scratch is not None:
                remove_scratch(scratch)
    finally:
        if builder is not None:
            builder.close()
    measured = _measure_both(approx, eval_vectors, eval_rows, exact_rows, k, target_recall)
    meta = {
        "factory": factory,
        "factory_resolved": approx.factory,
        "k": int(k),
        **measured,
        "search_parameter": approx.search_parameter,
        "target_recall": target_recall,
        "seed": int(seed),
        "recall_queries": int(n_eval),
        "recall_rows": eval_rows.tolist(),
        "train_rows": int(n_train),
        "nlist": approx.nlist,
        "on_disk": bool(on_disk),
        "gpu": approx.on_gpu,
        "built_on": f"dask ({builder.n_workers} workers)" if builder is not None else "one process",
        "store": {"n_samples": n_rows, "content_sha256": store_content_id(store)},
        "stale": None,
        "build_seconds": round(time.perf_counter() - started, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    written = save_index(approx.cpu_index(), directory, name, meta, ivfdata=ivfdata)
    _push(store, directory, name)
    _forget(directory, name)
    log.info(
        "index %s: recall@%d=%.3f at %s=%s (proponents), %.3f at %s=%s (opponents)",
        name,
        k,
        measured["recall"],
        approx.search_parameter,
        measured["nprobe"],
        measured["recall_opponents"],
        approx.search_parameter,
        measured["nprobe_opponents"],
    )
    return written


def _measure_both(
    approx: ApproxIndex,
    queries: np.ndarray,
    query_rows: np.ndarray,
    exact_both: np.ndarray,
    k: int,
    target_recall: float,
) -> dict:
    """Recall curves and chosen nprobe for proponents (``queries``) and opponents (``-queries``); ``exact_both`` is
    the exact top-(k+1) of ``[queries; -queries]``."""
    n = len(queries)
    found: dict = {}
    for suffix, searched, exact in (
        ("", queries, exact_both[:n]),
        ("_opponents", -queries, exact_both[n:]),
    ):
        exact = _drop_self(exact, query_rows, k)
        curve = _recall_curve(approx, searched, query_rows, exact, k, target_recall)
        chosen = next((point for point in curve if point["recall"] >= target_recall), curve[-1])
        found.update(
            {f"recall{suffix}": chosen["recall"], f"nprobe{suffix}": chosen.get("value"), f"curve{suffix}": curve}
        )
    return found


def _merge_parts(trained: Any, parts: list[Path], ivfdata: Path | None) -> Any:
    """One index from the part files the workers wrote (each the trained index holding its rows, ids = store rows,
    parts in row order): in memory by moving each part's lists in, or on disk by faiss ``merge_ondisk``."""
    import faiss

    index = empty_copy(trained)
    parts = [str(part) for part in parts]
    if ivfdata is not None:
        from faiss.contrib.ondisk import merge_ondisk

        with faiss_errors(f"merging {len(parts)} index parts into {ivfdata}"), stdout_to_stderr():
            merge_ondisk(index, parts, str(ivfdata))
        return index
    target = faiss.extract_index_ivf(index)
    for part in parts:
        with faiss_errors(f"merging index part {part}"):
            source = faiss.read_index(part)
            target.merge_from(faiss.extract_index_ivf(source), 0)
        del source
    index.ntotal = target.ntotal
    return index


def _random_rows(rng: np.random.Generator, n_rows: int, count: int, skipped: np.ndarray) -> np.ndarray:
    """``count`` distinct random rows of ``n_rows`` (fewer if there are not that many), none of ``skipped`` (zero rows
    left by --nonfinite skip: neither queries nor training points). Memory grows with ``count``, not ``n_rows``, past
    16M rows: a store's declared size is only trusted once its shards are read."""
    if n_rows <= 1 << 24:
        order = rng.permutation(n_rows)
    else:
        order = rng.choice(n_rows, size=min(n_rows, count + len(skipped)), replace=False)
    if len(skipped):
        order = order[~np.isin(order, skipped)]
    return order[:count]


def _sample_rows(
    store: GradientStore, eval_rows: np.ndarray, train_rows: np.ndarray, progress: bool | None
) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of the held-out rows and of the training rows, as float32."""
    if train_rows.size == 0:
        return store.read_rows(eval_rows), np.empty((0, store.dim), np.float32)
    eval_vectors = np.empty((eval_rows.size, store.dim), np.float32)
    train_vectors = np.empty((train_rows.size, store.dim), np.float32)
    bar = _progress(store.n_samples, f"sample {store.path.name}", progress)
    try:
        for first_row, block in store.iter_blocks():
            stop = first_row + len(block)
            for wanted, out in ((eval_rows, eval_vectors), (train_rows, train_vectors)):
                low, high = np.searchsorted(wanted, [first_row, stop])
                out[low:high] = block[wanted[low:high] - first_row]
            bar.update(len(block))
    finally:
        bar.close()
    return eval_vectors, train_vectors


def _drop_self(rows: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """Each query's result without its own store row, cut to k (a held-out row finds itself trivially)."""
    kept = np.full((rows.shape[0], k), -1, dtype=np.int64)
    for position, (found, own) in enumerate(zip(rows, self_rows)):
        others = found[found != own][:k]
        kept[position, : len(others)] = others
    return kept


def _recall_curve(
    approx: ApproxIndex,
    queries: np.ndarray,
    query_rows: np.ndarray,
    exact_rows: np.ndarray,
    k: int,
    target_recall: float,
) -> list[dict]:
    values: list[int | None] = list(approx.parameter_values()) or [None]
    curve = []
    for value in values:
        started = time.perf_counter()
        _, rows = approx.search(queries, k + 1, param=value)
        seconds = max(time.perf_counter() - started, 1e-9)
        point = {
            "value": value,
            "recall": round(recall_at_k(_drop_self(rows, query_rows, k), exact_rows), 4),
            "queries_per_s": round(len(queries) / seconds, 1),
        }
        curve.append(point)
        if point["recall"] >= target_recall:
            break
    return curve


def _remeasure(store: GradientStore, approx: ApproxIndex, meta: dict) -> dict:
    """Recall of an updated index in both directions, measured as at build time (same number of held-out rows, same
    k)."""
    k = int(meta.get("k", 10))
    rng = np.random.default_rng(int(meta.get("seed", 0)) + store.n_samples)
    n_eval = int(min(meta.get("recall_queries", 200), max(1, store.n_samples // 10)))
    eval_rows = np.sort(rng.choice(store.n_samples, n_eval, replace=False))
    queries = store.read_rows(eval_rows)
    _, exact_both = search_blocks(store.iter_blocks(), np.concatenate([queries, -queries]), k + 1)
    measured = _measure_both(approx, queries, eval_rows, exact_both, k, float(meta.get("target_recall", 0.95)))
    return {**measured, "recall_queries": n_eval}


def list_indexes(store: GradientStore | str | Path) -> list[dict]:
    """The metas of the store's persisted indexes, by name.

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.

    Returns:
        One dict per index: its name, factory, recall curve and default nprobe, files, and ``stale`` (why it no longer
        matches the store, or None).
    """
    store = _open(store)
    directory = index_dir(store)
    metas = []
    for name in index_names(directory):
        try:
            meta = _read_built_meta(directory, name)
        except SearchError as error:
            meta = {"name": name, "error": str(error)}
        metas.append(_with_staleness(store, meta))
    return metas


# what build_index writes into a meta beside save_index's keys, with the types readers rely on
_BUILT_FIELDS: dict[str, tuple[type, ...]] = {
    "factory": (str,),
    "factory_resolved": (str,),
    "k": (int,),
    "recall": (int, float),
    "recall_queries": (int,),
    "search_parameter": (str, type(None)),
    "nprobe": (int, type(None)),
    "on_disk": (bool,),
    "stale": (str, type(None)),
    "curve": (list,),
    "store": (dict,),
}
# written by builds since opponents are measured too: checked when present
_OPPONENT_FIELDS: dict[str, tuple[type, ...]] = {
    "recall_opponents": (int, float),
    "nprobe_opponents": (int, type(None)),
    "curve_opponents": (list,),
}


def _read_built_meta(directory: Path, name: str) -> dict:
    """A checked meta (``read_index_meta``) of an index ``build_index`` made: its fields of the right types."""
    meta = read_index_meta(directory, name)
    wrong = [key for key, types in _BUILT_FIELDS.items() if not isinstance(meta.get(key), types)]
    wrong += [key for key, types in _OPPONENT_FIELDS.items() if key in meta and not isinstance(meta[key], types)]
    if wrong or isinstance(meta["k"], bool) or not isinstance(meta["store"].get("content_sha256", ""), str):
        raise SearchError(
            f"index {name}'s meta in {directory} has no sound {(wrong or ['store'])[0]}; rebuild it with "
            f"`gradindex index STORE --factory ... --name {name} --overwrite`"
        )
    return meta


def _with_staleness(store: GradientStore, meta: dict) -> dict:
    if meta.get("stale") or "error" in meta:
        return meta
    built_for = (meta.get("store") or {}).get("content_sha256")
    if built_for is not None and built_for != store_content_id(store):
        return {**meta, "stale": "the store changed since the index was built"}
    return meta


def drop_index(store: GradientStore | str | Path, name: str) -> None:
    """Delete a persisted index (its meta first, so readers stop finding it, then its files).

    Args:
        store: the store: a path, an fsspec URL or an opened ``GradientStore``.
        name: the index's name.
    """
    store = _open(store)
    directory = index_dir(store)
    check_index_name(name)
    if name not in index_names(directory):
        read_index_meta(directory, name)  # the "no index named" error
    if is_remote(store.path):  # the meta first, so the index disappears at once; then its files (listed, not read)
        remote = store.path / INDEX_DIR
        remove_file(remote / f"{name}{META_SUFFIX}")
        for item in remote.glob(f"{name}.*"):
            if is_index_file(item.name, name):
                remove_file(item)
    remove_index(directory, name)  # also a damaged or unsealed meta: only NAME.<token>.* files go
    _forget(directory, name)


def clear_index_cache() -> None:
    """Forget every index this process loaded (the next search reads its files again)."""
    _LOADED.clear()


def _forget(directory: Path, name: str) -> None:
    for key in [key for key in _LOADED if key[0] == str(directory) and key[1] == name]:
        del _LOADED[key]


def _usable_meta(store: GradientStore, name: str) -> dict:
    """The checked meta of index ``name``; a SearchError saying how to rebuild it when it is stale."""
    meta = _with_staleness(store, _read_built_meta(index_dir(store), name))
    if meta.get("stale"):
        raise SearchError(
            f"index {name} of {store.path} is stale ({meta['stale']}); rebuild it with "
            f"`gradindex index {store.path} --factory {meta.get('factory')!r} --name {name} --overwrite`, or search "
            "exactly without --index"
        )
    return meta


def loaded_index(store: GradientStore, name: str, use_gpu: bool | None) -> tuple[ApproxIndex, dict]:
    directory = index_dir(store)
    meta = _usable_meta(store, name)
    key = (str(directory), name, meta["file"], use_gpu)
    if key not in _LOADED:
        _fetch(store, directory, meta)
        index, meta = load_index(directory, name, expect={"ntotal": store.n_samples, "dim": store.dim})
        while len(_LOADED) >= _MAX_LOADED:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = ApproxIndex(
            index,
            meta.get("factory_resolved", meta.get("factory", "")),
            use_gpu=use_gpu,
            float16=store.dtype == "float16",
        )
    return _LOADED[key], meta


def search_index(
    store: GradientStore | str | Path,
    queries: np.ndarray,
    k: int,
    name: str,
    *,
    nprobe: int | None = None,
    opponents: bool = False,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k with the persisted index ``name``: ``(scores [q, k'], rows [q, k'])``.

    ``nprobe`` overrides the index's default search parameter (nprobe for IVF, efSearch for HNSW), which is the one
    chosen at build for the direction searched (``nprobe`` for proponents, ``nprobe_opponents`` for opponents).
    Where fewer than k' rows are found, rows are -1 and scores -inf (+inf for opponents).
    """
    store = _open(store)
    _require_complete(store, "searching an index")
    approx, meta = loaded_index(store, name, use_gpu)
    param = nprobe if nprobe is not None else default_nprobe(meta, opponents)
    if nprobe is not None and approx.search_parameter is None:
        raise ArgumentError(
            "nprobe", f"nprobe does not apply to index {name} ({meta.get('factory')}): it has no nprobe or efSearch"
        )
    searched = -np.asarray(queries, dtype=np.float32) if opponents else queries
    skipped = _skipped_rows(store)
    scores, rows = approx.search(searched, k + len(skipped), param=param)
    scores, rows = without_rows(scores, rows, skipped, k)
    return (-scores if opponents else scores), rows


def default_nprobe(meta: dict, opponents: bool) -> int | None:
    """The search parameter an index's meta chose for a direction (indexes built before opponents were measured
    have one for both)."""
    if opponents and isinstance(meta.get("nprobe_opponents"), int):
        return meta["nprobe_opponents"]
    return meta.get("nprobe")


def _skipped_rows(store: GradientStore) -> np.ndarray:
    """Rows the build left out as non-finite (``--nonfinite skip``): stored as zeros, never to be returned."""
    skipped = getattr(store, "skipped_rows", None)
    return np.asarray(skipped() if skipped is not None else [], dtype=np.int64)


def update_indexes(
    store: GradientStore | str | Path, first_new_row: int, *, progress: bool | None = None
) -> dict[str, str]:
    """After rows ``first_new_row ..`` were appended to a store, add them to its in-memory indexes
    (re-measuring recall at the index's nprobe) and mark on-disk ones stale. Returns ``{name: "updated" | "stale"}``
    (``"current"`` for one that holds every row already)."""
    store = _open(store)
    directory = index_dir(store)
    outcome: dict[str, str] = {}
    for name in index_names(directory):
        try:
            meta = _read_built_meta(directory, name)
        except SearchError:
            outcome[name] = "stale"  # damaged or unsealed: left as it is, unusable until rebuilt
            continue
        if (meta.get("store") or {}).get("content_sha256") == store_content_id(store) and not meta.get("stale"):
            outcome[name] = "current"  # already holds every row (an append run again after it completed)
            continue
        if meta.get("on_disk") or meta.get("stale") or meta.get("ntotal") != first_new_row:
            reason = (
                meta.get("stale") or f"the store grew from {meta.get('ntotal')} to {store.n_samples} rows; rebuild it"
            )
            write_index_meta(directory, name, {**meta, "stale": reason})
            _push(store, directory, name)
            outcome[name] = "stale"
            continue
        try:
            _fetch(store, directory, meta)
            index, meta = load_index(directory, name)
            approx = ApproxIndex(index, meta.get("factory_resolved", meta["factory"]), use_gpu=False)
            for first_row, block in store.iter_blocks():
                stop = first_row + len(block)
                if stop <= first_new_row:
                    continue
                approx.add(block[max(0, first_new_row - first_row) :])
            meta = {
                **meta,
                **_remeasure(store, approx, meta),
                "store": {"n_samples": store.n_samples, "content_sha256": store_content_id(store)},
                "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            save_index(approx.cpu_index(), directory, name, meta)
            _push(store, directory, name)
            _forget(directory, name)
            outcome[name] = "updated"
        except (SearchError, ValueError) as error:
            write_index_meta(directory, name, {**meta, "stale": f"could not add the appended rows ({error})"})
            _push(store, directory, name)
            outcome[name] = "stale"
    return outcome


# ---- across Dask workers: the lists filled in parallel, searched in parallel --------------------------------------


def _set_worker_threads() -> None:
    """As many faiss threads as Dask gave this worker: more would fight the other workers for the cores."""
    try:
        import faiss
        from distributed import get_worker

        faiss.omp_set_num_threads(max(1, int(get_worker().state.nthreads)))
    except (ImportError, ValueError, AttributeError):
        pass


class _PartBuilder:
    """A Dask actor over a contiguous range of a store's shards: reads the sampled rows among them, then fills a
    part of a trained IVF index with them (ids = store rows) and finds the exact top-k of the held-out rows there."""

    def __init__(self, path: str, shards: list[int], storage_options: dict | None = None) -> None:
        self._store = open_store(path, storage_options=storage_options)
        self._shards = shards
        _set_worker_threads()

    def _blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for shard in self._shards:
            yield self._store.layout.shard_rows(shard)[0], self._store.read_shard(shard)

    def sample(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of ``rows`` (sorted store rows) that fall in this part's shards: ``(rows, vectors)``."""
        found_rows, found = [], []
        for first_row, block in self._blocks():
            low, high = np.searchsorted(rows, [first_row, first_row + len(block)])
            if high > low:
                found_rows.append(rows[low:high])
                found.append(np.asarray(block[rows[low:high] - first_row], dtype=np.float32))
        if not found:
            return np.zeros(0, np.int64), np.zeros((0, self._store.dim), np.float32)
        return np.concatenate(found_rows), np.concatenate(found)

    def fill(self, trained: np.ndarray, queries: np.ndarray, k: int, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Add this part's rows to a copy of the ``trained`` index (serialized), write it to ``part`` and return the
        exact top-``k`` of ``queries`` over the same rows."""
        import faiss

        index = index_from_bytes(trained)
        exact = ExactIndex(self._store.dim, use_gpu=False)
        first = None
        for first_row, block in self._blocks():
            first = first_row if first is None else first
            vectors = np.ascontiguousarray(block, dtype=np.float32)
            ids = np.arange(first_row, first_row + len(vectors), dtype=np.int64)
            with faiss_errors(f"adding rows {first_row}..{first_row + len(vectors) - 1} to an index part"):
                index.add_with_ids(vectors, ids)
            exact.add(vectors)
        target = store_path(part, getattr(self._store.path, "storage_options", None))
        if is_remote(target):  # the part goes to the store's object storage, streamed from a local file
            local = Path(tempfile.mkdtemp(prefix="gradindex-part-")) / "part.faiss"
            try:
                with faiss_errors(f"writing index part {local}"):
                    faiss.write_index(index, str(local))
                _upload(local, target)
            finally:
                shutil.rmtree(local.parent, ignore_errors=True)
        else:
            with faiss_errors(f"writing index part {part}"):
                faiss.write_index(index, str(target))
        if first is None:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        scores, rows = exact.search(queries, k)
        return scores, rows + first


class _DaskIndexBuilder(DaskSearch):
    """The store's shards spread over Dask workers (as for exact search), each worker reading its own: they give the
    training sample and fill the index's parts in parallel."""

    def _actor(self, position: int) -> tuple[type, tuple]:
        return _PartBuilder, (self._path, self._parts[position], self._storage_options)

    def sample(self, eval_rows: np.ndarray, train_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of the held-out rows and of the training rows, read by the workers holding them."""
        wanted = np.union1d(eval_rows, train_rows)
        found = self._gather(lambda actor, _position: actor.sample(wanted))
        rows = np.concatenate([part[0] for part in found])
        vectors = np.concatenate([part[1] for part in found])
        position = np.searchsorted(rows, wanted)
        if not np.array_equal(rows[np.minimum(position, len(rows) - 1)], wanted):
            raise SearchError(f"the Dask workers did not return every sampled row of {self._store.path}; retry")
        by_row = vectors[position]
        return by_row[np.searchsorted(wanted, eval_rows)], by_row[np.searchsorted(wanted, train_rows)]

    def fill(
        self, trained: Any, queries: np.ndarray, k: int, scratch: Path
    ) -> tuple[list[Path], tuple[np.ndarray, np.ndarray]]:
        """Fill the parts on the workers (written under ``scratch``, or, for a remote store, under a temporary
        prefix of its ``indexes/`` and streamed back into ``scratch``); the parts' files in row order and the exact
        top-k of ``queries`` over the whole store."""
        blob = index_to_bytes(trained)
        remote_dir = None
        if is_remote(self._store.path):
            remote_dir = (
                self._store.path / INDEX_DIR / f"parts{TMP_MARK}{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}"
            )
            targets = [str(remote_dir / f"part-{position:05d}.faiss") for position in range(len(self._parts))]
        else:
            targets = [
                str(Path(scratch).resolve() / f"part-{position:05d}.faiss") for position in range(len(self._parts))
            ]
        results = self._gather(lambda actor, position: actor.fill(blob, queries, k, targets[position]))
        local = [Path(scratch) / f"part-{position:05d}.faiss" for position in range(len(self._parts))]
        if remote_dir is not None:
            try:
                for target, path in zip(targets, local):
                    _download(store_path(target, self._store.path.storage_options), path)
            finally:
                for target in targets:
                    remove_file(store_path(target, self._store.path.storage_options))
        return local, merge_topk(results, k)


class _RowsSearcher:
    """A Dask actor holding the entries of rows ``first_row .. stop_row - 1`` of a persisted IVF index, in memory (on
    the worker's GPUs when it has them): every worker probes the same lists, so the merged answers are the whole
    index's."""

    def __init__(
        self, path: str, storage_options: dict | None, name: str, file: str, first_row: int, stop_row: int
    ) -> None:
        _set_worker_threads()
        store = open_store(path, storage_options=storage_options)
        directory = index_dir(store)
        meta = _read_built_meta(directory, name)
        if meta["file"] != file:
            raise SearchError(
                f"index {name} of {store.path} was rebuilt while the Dask workers were loading it; search again"
            )
        _fetch(store, directory, meta)
        # on-disk lists are memory-mapped by faiss anyway: only this worker's entries are copied into memory
        index, meta = load_index(directory, name, expect={"ntotal": store.n_samples, "dim": store.dim})
        subset = rows_subset(index, first_row, stop_row)
        del index
        self._index = ApproxIndex(
            subset, meta.get("factory_resolved", meta["factory"]), float16=store.dtype == "float16"
        )
        self.n_rows = int(subset.ntotal)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self._index.ntotal == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        return self._index.search(queries, k, param=nprobe)

    def holds(self) -> int:
        return self.n_rows


class DaskIndexSearch(DaskSearch):
    """Approximate top-k through a persisted IVF index whose lists are spread over the workers of a Dask cluster;
    built once, searched many times (a server holds one).

    The index was trained once (``build_index``); each worker holds the entries of the store rows of its shards (the
    same contiguous ranges as exact ``DaskSearch``), every worker probes the same lists for a query, and the client
    merges their top-k: the answer is the single-process index's. Each direction searches with the nprobe chosen for
    it at build (``nprobe`` / ``nprobe_opponents`` in the meta) unless ``nprobe`` is given. A lost worker's rows are
    loaded again on a worker still there and the search retried.

    Args:
        store: a complete store: a path, an fsspec URL or an opened ``GradientStore``; every worker must reach it.
        cluster: a ``distributed.Client``, a scheduler address (``"tcp://host:8786"``) or ``"local:N"``.
        index: the name of a persisted IVF index of the store (``gradindex index STORE --factory IVF...``).
        nprobe: IVF lists probed in both directions; default: the index's own per direction.

    Example::

        with DaskIndexSearch("big.gradindex", "tcp://scheduler:8786", "ivf4096-sqfp16") as search:
            scores, rows = search.search(vectors, 10)
            scores, rows = search.search(vectors, 10, opponents=True)
    """

    def __init__(
        self, store: GradientStore | str | Path, cluster: Any, index: str, *, nprobe: int | None = None
    ) -> None:
        store = _open(store)
        _require_complete(store, "searching an index")
        meta = _usable_meta(store, index)
        if meta.get("search_parameter") != "nprobe":
            raise ArgumentError(
                "index",
                f"index {index} ({meta.get('factory_resolved')}) is not an IVF index: only IVF lists can be spread "
                "over Dask workers; query it without dask=, or build an IVF index (e.g. --factory 'IVF,SQfp16')",
                also=["dask"],
            )
        self._name, self._meta = index, meta
        self._nprobe = {
            False: nprobe if nprobe is not None else default_nprobe(meta, False),
            True: nprobe if nprobe is not None else default_nprobe(meta, True),
        }
        self._skipped = _skipped_rows(store)
        super().__init__(store, cluster)

    @property
    def meta(self) -> dict:
        """The index's meta (recall and nprobe per direction)."""
        return dict(self._meta)

    def _actor(self, position: int) -> tuple[type, tuple]:
        part = self._parts[position]
        rows = (
            (self._store.layout.shard_rows(part[0])[0], self._store.layout.shard_rows(part[-1])[1]) if part else (0, 0)
        )
        return _RowsSearcher, (self._path, self._storage_options, self._name, self._meta["file"], *rows)

    def search(
        self, queries: np.ndarray, k: int, *, opponents: bool = False, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k of ``queries [q, D]``: ``(scores [q, k'], rows [q, k'])`` as ``search_index`` answers
        it; rows not found are -1 (scores -inf, +inf for opponents). ``nprobe`` overrides this object's for one
        call."""
        queries, k = self._check_queries(queries, k)
        param = int(nprobe) if nprobe is not None else self._nprobe[bool(opponents)]
        searched = -queries if opponents else queries
        wanted = k + len(self._skipped)
        scores, rows = merge_topk(self._gather(lambda actor, _position: actor.search(searched, wanted, param)), wanted)
        scores, rows = without_rows(scores, rows, self._skipped, k)
        return (-scores if opponents else scores), rows


def search_index_dask(
    store: GradientStore | str | Path,
    queries: np.ndarray,
    k: int,
    name: str,
    cluster: Any,
    *,
    nprobe: int | None = None,
    opponents: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One search through the persisted IVF index ``name`` spread over Dask workers (see ``DaskIndexSearch``); a
    ``local:N`` cluster lives only for this call."""
    with DaskIndexSearch(store, cluster, name, nprobe=nprobe) as search:
        return search.search(queries, k, opponents=opponents)
