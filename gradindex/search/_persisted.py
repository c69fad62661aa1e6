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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gradindex.errors import ArgumentError, IncompleteStoreError, SearchError, StoreExistsError
from gradindex.search._approx import (
    META_SUFFIX,
    TMP_MARK,
    ApproxIndex,
    OnDiskListsWriter,
    default_index_name,
    index_names,
    is_index_file,
    load_index,
    memory_per_row,
    new_ivfdata_path,
    read_index_meta,
    recall_at_k,
    remove_index,
    remove_scratch,
    save_index,
    scratch_dir,
    sweep_index_orphans,
    sweep_index_temporaries,
    write_index_meta,
)
from gradindex.search._arrays import without_rows
from gradindex.search._config import IndexConfig, check_index_name
from gradindex.search._exact import search_blocks
from gradindex.store import (
    GradientStore,
    RemotePath,
    contained_path,
    is_remote,
    open_store,
    remove_file,
    write_bytes_atomic,
)
from gradindex.utils import (
    available_memory,
    check_fits,
    default_memory_budget,
    progress_bar,
    sha256_bytes,
    sha256_file,
    sha256_json,
)

__all__ = [
    "IndexConfig",
    "build_index",
    "clear_index_cache",
    "drop_index",
    "list_indexes",
    "loaded_index",
    "search_index",
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


def _fetch(store: GradientStore, directory: Path, meta: dict) -> None:
    """Download a remote store's index files into its mirror unless a sound copy is there (load_index checks the
    sha256). ``meta`` is checked (``read_index_meta``): its file names stay inside the folder."""
    if not is_remote(store.path):
        return
    remote = store.path / INDEX_DIR
    checksums = {meta.get("file"): meta.get("sha256"), meta.get("ivfdata"): meta.get("ivfdata_sha256")}
    for file in _meta_files(meta):
        local = directory / file
        sound = local.is_file() and not local.is_symlink() and sha256_file(local) == checksums[file]
        if not sound:
            try:
                write_bytes_atomic(local, (remote / file).read_bytes())
            except FileNotFoundError:
                pass  # load_index names the missing file


def _push(store: GradientStore, directory: Path, name: str) -> None:
    """Upload index ``name`` from a remote store's mirror: its files first, its meta last (the meta is what
    readers go by), then delete the store's files of earlier versions of it."""
    if not is_remote(store.path):
        return
    remote = store.path / INDEX_DIR
    meta_name = f"{name}{META_SUFFIX}"
    meta = read_index_meta(directory, name)
    keep = set(_meta_files(meta))
    for file in keep:
        if not (remote / file).exists():
            write_bytes_atomic(remote / file, (directory / file).read_bytes())
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
    progress: bool | None = None,
) -> dict:
    """Build an approximate index of a complete store from a faiss ``index_factory`` string and persist it.

    Trains on a random sample of the store's rows, adds the store one shard at a time (the store is never held in
    memory whole), and measures recall@``k`` against exact search on held-out rows; IVF indexes search with the
    smallest nprobe reaching ``target_recall`` by default (HNSW: efSearch). The index is written under the store's
    ``indexes/`` atomically; query it with ``query(..., index=name)`` or ``search_store(..., index=name)``.

    Args:
        store: a complete store: a path, an fsspec URL or an opened ``GradientStore``.
        factory: a faiss ``index_factory`` string (``"IVF4096,SQfp16"``, ``"IVF,PQ64"``, ``"HNSW32"``).
        name: the index's name; default: made from the factory (``ivf4096-sqfp16``).
        k: the k of the recall@k measured.
        recall_queries: held-out store rows the recall is measured on.
        target_recall: the recall the default nprobe (efSearch) must reach, in (0, 1].
        train_size: rows the index is trained on; default: what the factory wants, within half the memory budget.
        on_disk: keep the IVF lists in a file beside the index (faiss ``contrib.ondisk``) instead of memory.
        use_gpu: train and search on all GPUs (default: when faiss has them).
        memory_budget: bytes the training sample may use (half of it).
        overwrite: replace an index of the same name.
        seed: seed of the training and held-out samples.
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        The index's meta (also listed by ``info``): its recall curve, nprobe, factory, files and build time.
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
    n_train = 0 if approx.is_trained else int(min(wanted, n_rows - n_eval, budget_rows))
    if not approx.is_trained and n_train <= 0:
        raise ValueError(
            f"store {store.path} has {n_rows} rows, too few to train {factory!r} and keep {n_eval} for measuring recall"
        )
    skipped = _skipped_rows(store)
    order = _random_rows(rng, n_rows, n_eval + n_train, skipped)
    eval_rows = np.sort(order[:n_eval])
    train_rows = np.sort(order[n_eval : n_eval + n_train])
    del order

    eval_vectors, train_vectors = _sample_rows(store, eval_rows, train_rows, progress)
    approx.train(train_vectors)
    del train_vectors
    log.info("trained %s on %d rows in %.1fs", approx.factory, n_train, time.perf_counter() - started)

    scratch = scratch_dir(directory) if on_disk else None
    try:
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

        _exact_scores, exact_rows = search_blocks(blocks(), eval_vectors, k + 1, use_gpu=use_gpu)
        ivfdata = None
        if writer is not None:
            ivfdata = new_ivfdata_path(directory, name)
            approx = ApproxIndex(writer.finish(ivfdata), approx.factory, use_gpu=False)
    finally:
        if scratch is not None:
            remove_scratch(scratch)
    exact_rows = _drop_self(exact_rows, eval_rows, k)
    curve = _recall_curve(approx, eval_vectors, eval_rows, exact_rows, k, target_recall)
    chosen = next((point for point in curve if point["recall"] >= target_recall), curve[-1])
    meta = {
        "factory": factory,
        "factory_resolved": approx.factory,
        "k": int(k),
        "recall": chosen["recall"],
        "search_parameter": approx.search_parameter,
        "nprobe": chosen.get("value"),
        "target_recall": target_recall,
        "seed": int(seed),
        "curve": curve,
        "recall_queries": int(n_eval),
        "recall_rows": eval_rows.tolist(),
        "train_rows": int(n_train),
        "on_disk": bool(on_disk),
        "gpu": approx.on_gpu,
        "store": {"n_samples": n_rows, "content_sha256": store_content_id(store)},
        "stale": None,
        "build_seconds": round(time.perf_counter() - started, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    written = save_index(approx.cpu_index(), directory, name, meta, ivfdata=ivfdata)
    _push(store, directory, name)
    _forget(directory, name)
    log.info(
        "index %s: recall@%d=%.3f at %s=%s", name, k, chosen["recall"], approx.search_parameter, chosen.get("value")
    )
    return written


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
    """Recall of an updated index, measured as at build time (same number of held-out rows, same k)."""
    k = int(meta.get("k", 10))
    rng = np.random.default_rng(int(meta.get("seed", 0)) + store.n_samples)
    n_eval = int(min(meta.get("recall_queries", 200), max(1, store.n_samples // 10)))
    eval_rows = np.sort(rng.choice(store.n_samples, n_eval, replace=False))
    queries = store.read_rows(eval_rows)
    _, exact_rows = search_blocks(store.iter_blocks(), queries, k + 1)
    exact_rows = _drop_self(exact_rows, eval_rows, k)
    curve = _recall_curve(approx, queries, eval_rows, exact_rows, k, float(meta.get("target_recall", 0.95)))
    chosen = next((point for point in curve if point["recall"] >= meta.get("target_recall", 0.95)), curve[-1])
    return {"recall": chosen["recall"], "nprobe": chosen.get("value"), "curve": curve, "recall_queries": n_eval}


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


def _read_built_meta(directory: Path, name: str) -> dict:
    """A checked meta (``read_index_meta``) of an index ``build_index`` made: its fields of the right types."""
    meta = read_index_meta(directory, name)
    wrong = [key for key, types in _BUILT_FIELDS.items() if not isinstance(meta.get(key), types)]
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


def loaded_index(store: GradientStore, name: str, use_gpu: bool | None) -> tuple[ApproxIndex, dict]:
    directory = index_dir(store)
    meta = _with_staleness(store, _read_built_meta(directory, name))
    if meta.get("stale"):
        raise SearchError(
            f"index {name} of {store.path} is stale ({meta['stale']}); rebuild it with "
            f"`gradindex index {store.path} --factory {meta.get('factory')!r} --name {name} --overwrite`, or search "
            "exactly without --index"
        )
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

    ``nprobe`` overrides the index's default search parameter (nprobe for IVF, efSearch for HNSW).
    Where fewer than k' rows are found, rows are -1 and scores -inf (+inf for opponents).
    """
    store = _open(store)
    _require_complete(store, "searching an index")
    approx, meta = loaded_index(store, name, use_gpu)
    param = nprobe if nprobe is not None else meta.get("nprobe")
    if nprobe is not None and approx.search_parameter is None:
        raise ArgumentError(
            "nprobe", f"nprobe does not apply to index {name} ({meta.get('factory')}): it has no nprobe or efSearch"
        )
    searched = -np.asarray(queries, dtype=np.float32) if opponents else queries
    skipped = _skipped_rows(store)
    scores, rows = approx.search(searched, k + len(skipped), param=param)
    scores, rows = without_rows(scores, rows, skipped, k)
    return (-scores if opponents else scores), rows


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
