"""The build stage: featurize the task's training set at its checkpoints, shard by shard, into a store.

Every worker (``--shard I/N``, torchrun ranks, a resume, an append) computes exactly what the store's fingerprint
says; the one that finishes the last shard completes the store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gradindex.checkpoints import CheckpointSpec, parse_checkpoints
from gradindex.errors import (
    ArgumentError,
    GradIndexError,
    IncompatibleStoreError,
    IncompleteStoreError,
    NonFiniteError,
    StoreExistsError,
    TaskSpecError,
)
from gradindex.featurize import load_checkpoints, model_fingerprint, resolve_device
from gradindex.methods import (
    KRON_SIDES_TRANSFORM,
    MethodFeaturizer,
    as_method_featurizer,
    finish_store,
    make_featurizer,
)
from gradindex.pipeline._config import NONFINITE_POLICIES, BuildConfig, rank_device
from gradindex.pipeline._fingerprint import (
    ContentHash,
    content_message,
    dataset_probe,
    fingerprint_of,
    hashing_thread,
    mismatch_message,
)
from gradindex.projection import ProjectionSpec
from gradindex.store import (
    GradientStore,
    ShardEncoder,
    StoreLayout,
    arrow_of,
    as_store,
    create_store,
    fingerprint_differences,
    open_store,
    store_path,
    sweep_orphans,
)
from gradindex.task import (
    Task,
    batch_size,
    iter_batches,
    load_task,
    running_user_code,
    slice_batch,
    tensor_rows,
    user_code_error,
)
from gradindex.utils import progress_bar
from gradindex.version import __version__

__all__ = ["NONFINITE_POLICIES", "BuildConfig", "build", "finalize"]

log = logging.getLogger("gradindex")


def _loader_batch_size(config: BuildConfig, featurizer: Any) -> int:
    """The batch size asked for, else what the featurizer says fits its memory budget (256 when it says nothing)."""
    if config.batch_size is not None:
        return config.batch_size
    inner = getattr(featurizer, "inner", featurizer)
    hint = getattr(inner, "batch_size_hint", None)
    return int(hint()) if callable(hint) else 256


def _absolute_spec(spec: str) -> str:
    """A file-based task spec with an absolute path, so the store's recorded task works from any directory."""
    target, sep, attr = spec.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{attr}"
    return spec


def _recorded_task_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``task_options`` as a store records them: checked to be JSON values under string keys, with every string that
    names an existing file or folder made absolute (as a task file's path is), so that a later command in any
    directory loads the same task from the store alone."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ArgumentError(
            "task_options", f"task_options must be a dict of factory keyword arguments, got {type(options).__name__}"
        )
    recorded: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ArgumentError(
                "task_options", f"task option name {key!r} must be a Python identifier (a keyword of the task factory)"
            )
        if (isinstance(value, str) and value and Path(value).exists()) or isinstance(value, os.PathLike):
            value = str(Path(value).resolve())
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ArgumentError(
                "task_options",
                f"task option {key}={value!r} cannot be recorded in the store's manifest; give strings, numbers, "
                "booleans, None or lists of them",
            ) from None
        recorded[key] = value
    return recorded


def _load_build_task(task: Task | str, task_options: Mapping[str, Any] | None) -> tuple[Task, dict[str, Any]]:
    """The task a build indexes and what its manifest records of it: ``{"spec", "name", "options"}``."""
    options = _recorded_task_options(task_options)
    if isinstance(task, Task):
        if options:
            raise ArgumentError(
                "task_options",
                "task_options are keyword arguments of a task spec's factory; a Task object takes none (give the "
                "spec, or build the Task with them)",
            )
        return task, {"spec": None, "name": task.name}
    spec = _absolute_spec(task) if isinstance(task, str) else None
    loaded = load_task(task, **options)
    record = {"spec": spec, "name": loaded.name}
    if options:
        record["options"] = options
    return loaded, record


def _shard_assignment(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is not None:
        index, count = shard
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index, count = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    else:
        return 0, 1
    if count <= 0 or not 0 <= index < count:
        raise ArgumentError("shard", f"shard (I, N) needs 0 <= I < N, got {index}/{count}")
    return index, count


def build(
    task: Task | str,
    checkpoints: Sequence[str | CheckpointSpec | tuple],
    output: str | Path,
    config: BuildConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool | None = None,
    append: bool = False,
    repair: bool = False,
    storage_options: dict | None = None,
    claim_timeout: float | None = None,
    task_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> GradientStore:
    """Featurize the task's training set at the checkpoints and write a store at ``output``.

    Every training sample becomes one vector (the method's φ), written shard by shard: each shard is durable and
    checksummed before it counts as done, so a stopped build continues with ``resume=True`` and loses at most the
    shards in flight. Several workers can build one store (``shard=(I, N)``, or torchrun's RANK/WORLD_SIZE); the
    worker that finishes the last shard completes it (or ``finalize(output)`` does).

    Args:
        task: a ``Task``, or a spec: ``path/to/file.py:factory``, ``package.module:factory`` or a built-in name.
        checkpoints: the checkpoints, in training order: ``"PATH"`` or ``"PATH:WEIGHT"`` strings (WEIGHT: the
            learning rate before it, TracIn's η), ``(path, weight)`` pairs or ``CheckpointSpec``s.
        output: where the store goes: a local folder or an fsspec URL (``s3://bucket/a.gradindex``, ``memory://...``).
        config: what to compute and how (``BuildConfig``); default: ``BuildConfig(**options)``.
        resume: continue the stopped build of the same store; the training samples of finished shards are hashed
            again and must match what was recorded.
        overwrite: replace the store at ``output`` (only a gradindex store: a file, a link or a folder holding
            anything else is refused and left as it is).
        shard: ``(I, N)``: compute only shards I, I+N, I+2N, ... (one of N workers).
        progress: show progress bars (default: when stderr is a terminal).
        append: add the training samples beyond the store's rows to a complete store built with the same settings;
            the first rows must be unchanged (their sample ids and each shard's content hash are checked before
            anything is written), and readers see the old store until the append completes (a stopped append is
            continued by running it again); its persisted indexes are updated or marked stale.
        repair: with ``resume``, first recompute exactly the shards ``verify`` finds damaged.
        storage_options: options of the fsspec filesystem of a store URL (credentials and endpoint otherwise come
            from the environment).
        claim_timeout: seconds after which another machine's unfinished claim on a shard is taken over (a store on a
            shared file system or at a URL; default ``GRADINDEX_CLAIM_TIMEOUT``, else 6 hours).
        task_options: keyword arguments of the task spec's factory (``{"flip_fraction": 0.1}``, or
            ``{"model": "runs/gpt2", "train": "train.jsonl"}`` for ``hf-causal-lm``); recorded in the manifest beside
            the spec (strings naming existing files or folders as absolute paths), so that ``query`` and the other
            commands load the same task from the store alone.
        **options: ``BuildConfig`` fields, over ``config``'s (``proj_dim=512``, ``method="trak"``,
            ``nonfinite="skip"``, ...).

    Returns:
        The opened store: complete, unless other workers are still writing their shards.

    Raises:
        StoreExistsError: ``output`` holds a store and neither ``resume``, ``overwrite`` nor ``append`` was given, or
            holds something that is not a store.
        IncompatibleStoreError: a resume or append whose task, checkpoints or settings differ from the store's, or an
            append whose old rows changed (the shard and rows, or the row and sample id, are named).
        NonFiniteError: a NaN or infinite vector with ``nonfinite="error"`` (finished shards are kept).
        ArgumentError: a bad argument or setting (the message names it).
    """
    if config is None:
        config = BuildConfig(**options)
    elif options:
        config = BuildConfig(**{**asdict(config), **options})
    if resume and overwrite:
        raise ArgumentError(
            "resume",
            "resume=True and overwrite=True exclude each other: resume continues a build, overwrite replaces it",
            also=["overwrite"],
        )
    if repair and not resume:
        raise ArgumentError(
            "repair", "repair needs resume=True: it recomputes the damaged shards of an existing store", also=["resume"]
        )
    if claim_timeout is not None and not claim_timeout > 0:
        raise ArgumentError("claim_timeout", f"claim_timeout must be a positive number of seconds, got {claim_timeout}")
    if append and overwrite:
        raise ArgumentError(
            "append",
            "append=True and overwrite=True exclude each other: append grows a store, overwrite replaces it",
            also=["overwrite"],
        )
    task, task_record = _load_build_task(task, task_options)
    specs = parse_checkpoints(checkpoints)
    device = resolve_device(rank_device(config.device))  # torchrun: one GPU per rank (LOCAL_RANK)
    shard_index, shard_count = _shard_assignment(shard)
    output = store_path(output, storage_options)

    loaded = load_checkpoints(task, specs, device)

    def featurizer_for(projection: ProjectionSpec) -> MethodFeaturizer:
        with running_user_code("the model's construction and the first training samples (the featurizer's set-up)"):
            return _featurizer_for(projection)

    def _featurizer_for(projection: ProjectionSpec) -> MethodFeaturizer:
        return as_method_featurizer(
            make_featurizer(
                config.method,
                task,
                loaded,
                projection=projection,
                layers=config.layers,
                normalize=config.normalize,
                device=device,
                options=config.method_options,
                runtime={
                    "chunk_bytes": config.featurize_memory,
                    "compile": config.compile,
                    "autocast": config.autocast,
                    "nonfinite": config.nonfinite,
                },
            )
        )

    # a store being joined (resume, another worker's, append) brings its recorded kron plan: never planned again
    joining = (resume or append or shard_count > 1) and not overwrite
    projection = (_recorded_projection(output, config) if joining else None) or config.projection_spec()
    featurizer = featurizer_for(projection)
    # the featurizer built the model already (a 21M-parameter model takes a second to build)
    built = getattr(featurizer, "model_fingerprint", None)
    fingerprint = fingerprint_of(
        featurizer, loaded, task, config.dtype, built if isinstance(built, dict) else model_fingerprint(task.model())
    )
    n_samples = len(task.train)
    if n_samples == 0:
        raise TaskSpecError("the task's training set is empty; there is nothing to index")

    sweep_orphans(output)  # what killed writers left beside the store
    expected_content: dict[int, str] = {}
    appended_from = None
    sample_ids = _uniform_ids(task.train_sample_ids())
    if append:
        store, appended_from = _open_for_append(output, task, fingerprint, {"task": task_record}, config, sample_ids)
        if store.complete:  # an earlier append completed these rows (stopped before updating the indexes, maybe)
            _update_indexes(store, appended_from, progress)
            return store
    elif output.exists() and (resume or (shard_count > 1 and not overwrite)):
        store = open_store(output)
        _check_joinable(store, fingerprint, config)
        store.sweep_temporaries(keep_stopped_append=True)
        if repair:
            expected_content = _reopen_for_repair(store)
        if store.complete:
            stopped = store.pending_append()
            if stopped is not None:
                log.info(
                    "store %s is complete; an append to %d rows stopped at %s: continue it with append=True",
                    output,
                    stopped.n_samples,
                    stopped.progress(),
                )
            log.info("store %s is already complete", output)
            return store
    else:
        layout = StoreLayout.auto(n_samples, featurizer.dim, config.dtype, rows_per_shard=config.rows_per_shard)
        extra = {
            "gradindex_version": __version__,
            "task": task_record,
            "checkpoints": [spec.to_dict() for spec in specs],
            "build": {"batch_size": config.batch_size, "device": str(device)},
        }
        try:
            store = create_store(output, layout, fingerprint, extra=extra, overwrite=overwrite)
        except StoreExistsError:
            if shard_count > 1:  # another worker created it first
                store = open_store(output)
                recorded = _recorded_projection(output, config)
                if recorded is not None and recorded.plan != projection.plan:  # its kron plan wins
                    featurizer = featurizer_for(recorded)
                    fingerprint = fingerprint_of(
                        featurizer, loaded, task, config.dtype, model_fingerprint(task.model())
                    )
                _check_joinable(store, fingerprint, config)
            else:
                raise

    try:
        store.claim_timeout = claim_timeout
        featurizer.attach(store)  # e.g. Arnoldi's eigenbasis: computed once, shared by every worker through the store
        mine = [index for index in range(store.n_shards) if index % shard_count == shard_index]
        if resume and not append:
            # each worker re-hashes the samples of its own finished shards (a repair: of all of them)
            _check_finished_shards(store, task, config, None if repair else mine, sample_ids=sample_ids)
        todo = [index for index in mine if store.shard_record(index) is None]
        owner = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"
        total_rows = sum(store.layout.shard_rows(index)[1] - store.layout.shard_rows(index)[0] for index in todo)
        bar = progress_bar(total_rows, f"featurize {output.name} ({len(loaded)} checkpoints)", enabled=progress)
        started = time.perf_counter()
        writer = _ShardWriter(store)
        try:
            for position, index in enumerate(todo):
                bar.set_postfix_str(f"shard {position + 1}/{len(todo)}", refresh=False)
                _build_shard(
                    store, index, task, featurizer, sample_ids, config, owner, bar, expected_content.get(index), writer
                )
                log.debug(
                    "featurized shard %d of %s (%d/%d of this worker's shards)", index, output, position + 1, len(todo)
                )
            writer.wait()
        finally:
            writer.close()
            bar.close()
        elapsed = time.perf_counter() - started
        if total_rows:
            log.info(
                "featurized %d samples in %.1fs (%.0f samples/s)", total_rows, elapsed, total_rows / max(elapsed, 1e-9)
            )
        if all(store.shard_record(index) is not None for index in range(store.n_shards)):
            featurizer.finish(
                store
            )  # transforms that need every shard (TRAK's ΦᵀΦ), written before the store says complete
            store.finalize()
    finally:
        if appended_from is not None:
            store.release_append()  # (what it staged stays, for a rerun to continue)
    if appended_from is not None and store.complete:
        _update_indexes(store, appended_from, progress)
    return store


def _update_indexes(store: GradientStore, appended_from: int, progress: bool | None) -> None:
    from gradindex.search import update_indexes  # here: a build without indexes does not load the search room

    for name, outcome in update_indexes(store, appended_from, progress=progress).items():
        log.info("index %s of %s: %s", name, store.path, outcome)


def _recorded_projection(output: Path, config: BuildConfig) -> ProjectionSpec | None:
    """The projection (with its recorded kron plan) of the store at ``output`` when it is the one ``config``
    asks for; None otherwise (no store yet, another projection: the fingerprint check then says what differs)."""
    asked = config.projection_spec()
    if asked.kind != "kron" or not output.exists():
        return None
    try:
        recorded = ProjectionSpec.from_dict(open_store(output).fingerprint["projection"])
    except Exception:
        return None
    if recorded != asked or recorded.plan is None:
        return None
    drawn = {
        entry.get("sides", "gaussian")
        for entry in recorded.plan
        if "module" in entry and (entry["k_in"] < entry["in"] or entry["k_out"] < entry["out"])
    }
    # pca plans draw orthogonal sides for layers too wide to decompose: such a store was built with pca
    built = "pca" if "pca" in drawn else min(drawn, default=None)
    if asked.kron_sides is not None and built is not None and asked.kron_sides != built:
        raise IncompatibleStoreError(
            f"store {output} was built with kron sides {built}, not {asked.kron_sides}; "
            f"continue it with kron_sides={built} (or without kron_sides), or rebuild with overwrite=True"
        )
    return recorded


def _open_for_append(
    output: Path, task: Task, fingerprint: dict, extra: dict, config: BuildConfig, sample_ids: list
) -> tuple[GradientStore, int]:
    """Stage the growth of the complete store at ``output`` to the task's training set (``GradientStore.begin_append``)
    once its rows are checked to be the task's first rows; returns the staging store (the store itself when an
    earlier append already completed this growth) and the old row count. Nothing is written before the checks pass.
    """
    store = open_store(output)
    if not store.complete:
        raise IncompleteStoreError(
            f"store {output} is incomplete ({store.progress()}); finish it with resume=True before appending"
        )
    n_samples = fingerprint["dataset"]["n_samples"]
    diffs = [
        diff for diff in fingerprint_differences(store.fingerprint, fingerprint) if not diff.startswith("dataset.")
    ]
    if diffs:
        raise IncompatibleStoreError(
            mismatch_message(
                output,
                diffs,
                store.fingerprint,
                fingerprint,
                "Append with the store's settings, or rebuild with overwrite=True.",
            )
        )
    from_rows = sorted(
        name for name in store.transforms() if name != KRON_SIDES_TRANSFORM
    )  # kron sides: from the first rows only
    if from_rows:
        raise IncompatibleStoreError(
            f"store {output} holds query-side transforms ({', '.join(from_rows)}) computed from every row; "
            "appending would invalidate them. Rebuild with overwrite=True."
        )
    if n_samples < store.n_samples:
        raise IncompatibleStoreError(
            f"the task's training set has {n_samples} samples but store {output} holds {store.n_samples}; append only "
            "adds samples, so rebuild with overwrite=True"
        )
    if n_samples == store.n_samples:
        if store.manifest.get("appended_from") is None:
            raise ValueError(
                f"the task's training set has {n_samples} samples and store {output} holds them all; there is nothing "
                "to append"
            )
        log.info("store %s already holds all %d samples (an append completed them)", output, n_samples)
        store.sweep_temporaries()  # what that append may have left staged
        return store, store.manifest["appended_from"]
    _check_history(store, task, config)
    store.sweep_temporaries(keep_stopped_append=True)  # what dead writers left; a stopped append is continued
    staging = store.begin_append(n_samples, fingerprint, extra=extra)
    try:
        # a stopped append of the same rows is continued: the samples of the shards it finished are hashed again
        again = [shard for shard in staging.done_shards() if shard >= store.n_samples // store.layout.rows_per_shard]
        _check_finished_shards(staging, task, config, again, sample_ids=sample_ids)
    except BaseException:
        staging.release_append()
        raise
    return staging, store.n_samples


def _check_history(store: GradientStore, task: Task, config: BuildConfig) -> None:
    """An append's check, before it writes anything, that the store's rows are still the task's first rows: each old
    row keeps its sample id (and the new ids are of the same type), and each shard's training samples hash as recorded
    when it was built (the build's own ContentHash). Shards built before content hashes were recorded are checked by
    the 32-sample probe of the fingerprint instead (a warning says so)."""
    fix = "append needs the store's samples unchanged and in order (new ones after them): rebuild with overwrite=True"
    stored = store.samples().column("sample_id")
    kinds = {pa.int64(): "integer", pa.string(): "string"}
    old_kind = kinds.get(stored.type, str(stored.type))
    sample_ids = task.train_sample_ids()
    typed = _id_array(sample_ids)
    if typed.type != stored.type:
        want = int if stored.type == pa.int64() else str
        row = next((row for row, value in enumerate(sample_ids) if not _is_id_of(value, want)), 0)
        raise IncompatibleStoreError(
            f"store {store.path} holds {old_kind} sample ids but the task's are now {kinds.get(typed.type, 'other')} "
            f"(row {row} has sample id {sample_ids[row]!r}); give every sample an id of the store's type, or rebuild "
            "with overwrite=True"
        )
    new_ids = typed.slice(0, store.n_samples)
    differing = np.flatnonzero(stored.to_numpy(zero_copy_only=False) != new_ids.to_numpy(zero_copy_only=False))
    if differing.size:
        row = int(differing[0])
        raise IncompatibleStoreError(
            f"row {row} of store {store.path} has sample id {stored[row].as_py()!r} but the task's training set now "
            f"has {new_ids[row].as_py()!r} there; {fix}"
        )
    unhashed = []
    for shard, record in enumerate(store.manifest["shards"]):
        expected = record.get("content_sha256")
        if expected is None:
            unhashed.append(shard)
            continue
        start, stop = store.layout.shard_rows(shard)
        if _hash_rows(task, start, stop, config.batch_size or 256)[0] != expected:
            raise IncompatibleStoreError(
                f"the training samples of shard {shard} of store {store.path} (rows {start}..{stop - 1}, sample ids "
                f"{stored[start].as_py()!r}..{stored[stop - 1].as_py()!r}) differ from those it was built from; {fix}"
            )
    if unhashed:
        log.warning(
            "store %s has no content hash for %d shard(s) (built by an older gradindex): their samples were checked "
            "by their sample ids and a 32-sample probe only; rebuild with overwrite=True to have every sample checked",
            store.path,
            len(unhashed),
        )
        probe = dataset_probe(torch.utils.data.Subset(task.train, range(store.n_samples)))
        if probe != store.fingerprint["dataset"]["probe_sha256"]:
            raise IncompatibleStoreError(
                f"the first {store.n_samples} training samples differ from those store {store.path} was built from "
                f"(its 32-sample probe); {fix}"
            )


def _is_id_of(value: Any, kind: type) -> bool:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    return is_int if kind is int else not is_int


def finalize(output: GradientStore | str | Path, *, storage_options: dict | None = None) -> GradientStore:
    """Complete a store whose shards were all written by workers (``shard=(I, N)``): merge their records into the
    manifest (and compute what needs every shard, as TRAK's ΦᵀΦ).

    Args:
        output: the store: a path, an fsspec URL or an opened ``GradientStore``.
        storage_options: options of the fsspec filesystem of a store URL.

    Returns:
        The complete store.

    Raises:
        IncompleteStoreError: some shards are not written yet (they are named).
    """
    store = as_store(output, storage_options)
    # an append whose workers wrote every shard but none completed it (it is staged beside the complete store)
    appending = store.pending_append()
    if appending is not None:
        store = appending
    if not store.complete and all(store.shard_record(shard) is not None for shard in range(store.n_shards)):
        finish_store(store)  # transforms that need every shard (TRAK's ΦᵀΦ), before the store says complete
    if store.finalize():
        return store
    missing = [shard for shard in range(store.n_shards) if store.shard_record(shard) is None]
    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
    what = f"the append to store {store.path}" if appending is not None else f"store {store.path}"
    again = "append=True" if appending is not None else "resume=True"
    raise IncompleteStoreError(
        f"{what} cannot be finalized: {len(missing)} of {store.n_shards} shards are not written ({shown}); "
        f"run the workers for them (gradindex build ... --shard I/N) or finish with {again}"
    )


def _build_shard(
    store: GradientStore,
    index: int,
    task: Task,
    featurizer: MethodFeaturizer,
    sample_ids: list,
    config: BuildConfig,
    owner: str,
    bar,
    expected_content: str | None = None,
    writer: _ShardWriter | None = None,
) -> None:
    # the shard's file is made as its rows come: each featurized batch is cast into it, checked, hashed and written to
    # its temporary name on the background thread while the next batch is featurized (nothing is written before its
    # first rows)
    encoder = store.shard_encoder(index)
    encoding: list[Future | None] = [None, None]
    store.claim_shard(index, owner=owner)
    try:
        shard = _compute_shard(
            store, index, task, featurizer, sample_ids, config, bar, expected_content, encoder, encoding
        )
        if writer is None:
            store.write_shard(index, **shard)
        else:
            writer.submit(index, shard)  # written while the next shard is computed
    except BaseException:
        wait([future for future in encoding if future is not None])  # the encoding under way ends first
        encoder.discard()  # no temporary file left behind (a no-op once the shard's file is in place)
        # Free the shard for the next writer (a resume): our claim would block it for as long as we live.
        try:
            store.release_shard(index)
        except GradIndexError:
            pass
        raise


def _compute_shard(
    store: GradientStore,
    index: int,
    task: Task,
    featurizer: MethodFeaturizer,
    sample_ids: list,
    config: BuildConfig,
    bar,
    expected_content: str | None,
    encoder: ShardEncoder,
    encoding: list[Future | None],
) -> dict:
    """The shard's rows featurized and handed to ``encoder`` (on the background thread, ``encoding`` holding the two
    encodings in flight), checked; ``write_shard``'s arguments."""
    start, stop = store.layout.shard_rows(index)
    # two batch buffers, in turn, for featurizers that write in place (their self-influence is each vector's squared
    # norm: finite exactly when the whole vector is)
    self_scores = np.empty(stop - start, dtype=np.float32)
    into = featurizer.writes_into
    buffers: list[torch.Tensor | None] = [None, None]
    bad_rows: list[np.ndarray] = []
    featurizer.begin_shard(index)
    labels: list[np.ndarray] = []
    position = 0
    content = ContentHash(task.collate)
    # a TensorDataset with the default collate is sliced, not loaded item by item (hashed from the slices, same digest)
    sliced = task.collate is None and tensor_rows(task.train, range(start, stop)) is not None
    with torch.inference_mode(False), torch.enable_grad():
        with running_user_code("the first training samples (sizing the featurization's chunks)"):
            loader_batch = _loader_batch_size(config, featurizer)
        loaded = iter_batches(task.train, range(start, stop), loader_batch, None if sliced else content)
        for turn, batch in enumerate(_loaded_rows(loaded, start, stop, loader_batch)):
            if sliced:
                content.observe_columns(batch)
            rows = batch_size(batch)
            slot = turn % 2
            if encoding[slot] is not None:
                encoding[slot].result()  # its buffer is free again (and the encoding's error raised here)
            if into and position + rows <= stop - start:
                if buffers[slot] is None or len(buffers[slot]) < rows:
                    buffers[slot] = torch.empty(rows, featurizer.dim, dtype=torch.float32)
                vectors = buffers[slot][:rows]
                scores = _featurize_rows(featurizer, batch, start + position, sample_ids, vectors)
                scores = scores.detach().cpu().numpy()
                finite = np.isfinite(scores)
            else:
                vectors, scores = _featurize_rows(featurizer, batch, start + position, sample_ids)
                # a float32 copy, as the shard's buffer took before (the featurizer may reuse what it returned)
                vectors = np.array(vectors.detach().cpu().numpy(), dtype=np.float32)
                if vectors.ndim != 2 or vectors.shape[1] != featurizer.dim or position + len(vectors) > stop - start:
                    raise ValueError(
                        f"the {config.method} featurizer returned vectors of shape {list(vectors.shape)} at row "
                        f"{start + position}; "
                        f"expected [batch, {featurizer.dim}] (nothing was written for shard {index})"
                    )
                scores = scores.detach().cpu().numpy()
                with np.errstate(over="ignore", invalid="ignore"):
                    finite = np.isfinite(vectors).all(axis=1) & np.isfinite(scores)
            rows = len(vectors)
            self_scores[position : position + rows] = scores
            if not finite.all():  # zeroed here; the shard is refused, or they are listed, below
                bad = np.flatnonzero(~finite)
                vectors[bad.tolist()] = 0.0
                self_scores[position + bad] = 0.0
                bad_rows.append(bad + position)
            encoding[slot] = hashing_thread().submit(encoder.add, vectors)
            batch_labels = task.labels_of(batch)
            if batch_labels is not None:
                labels.append(batch_labels)
            position += rows
            bar.update(rows)
    for future in encoding:
        if future is not None:
            future.result()
    if position != stop - start:
        raise TaskSpecError(
            f"the training set yielded {position} samples for rows {start}..{stop}; its __len__ disagrees with its "
            "items"
        )
    if expected_content is not None and content.hexdigest() != expected_content:
        raise IncompatibleStoreError(content_message(store, index, expected_content, content.hexdigest()))
    nonfinite = None
    if bad_rows:
        bad = np.concatenate(bad_rows)
        rows = (bad + start).tolist()
        ids = [sample_ids[row] for row in rows[:10]]
        if config.nonfinite == "error":
            raise NonFiniteError(
                f"{len(bad)} of the {stop - start} vectors of shard {index} are NaN or infinite (rows {rows[:10]}"
                f"{' ...' if len(rows) > 10 else ''}, sample ids {ids}); nothing was written for this shard and "
                "finished shards are kept. "
                "Fix the data or the model, or resume with nonfinite=skip (leave those samples out of search) "
                "or nonfinite=zero (keep them with zero vectors)"
            )
        kind = "skipped" if config.nonfinite == "skip" else "zeroed"
        nonfinite = {kind: rows}
        log.warning(
            "shard %d: %d non-finite vectors %s (rows %s%s); listed in the manifest",
            index,
            len(rows),
            kind,
            rows[:10],
            " ..." if len(rows) > 10 else "",
        )
    featurizer.end_shard(store, index)  # its share of any transform is durable before the shard's record
    return {
        "features": encoder,
        "self_influence": self_scores,
        "samples": _samples_table(start, stop, sample_ids, labels),
        "content_sha256": content.hexdigest(),
        "nonfinite": nonfinite,
    }


class _ShardWriter:
    """Writes finished shards (``GradientStore.write_shard``: cast, encode, checksum, write, record) on one background
    thread while the next shard is computed; at most one shard waits to be written, so memory stays bounded.

    A failed write surfaces in the build's thread as the error ``write_shard`` raised (its shard's claim released, so
    a resume computes it again) at the next ``submit`` or ``wait``; a build stopped for any reason first lets the
    write under way finish (``close``), so every shard computed before the stop is kept.
    """

    def __init__(self, store: GradientStore):
        self.store = store
        self._thread: threading.Thread | None = None
        self._failed: tuple[int, BaseException] | None = None

    def submit(self, index: int, shard: dict) -> None:
        """Write shard ``index`` (``write_shard``'s arguments) in the background, once the previous write is done."""
        self.wait()
        self._thread = threading.Thread(
            target=self._write, args=(index, shard), name=f"gradindex-write-shard-{index}", daemon=True
        )
        self._thread.start()

    def _write(self, index: int, shard: dict) -> None:
        try:
            self.store.write_shard(index, **shard)
        except BaseException as error:  # handed to the build's thread
            self._failed = (index, error)
            try:
                self.store.release_shard(index)
            except GradIndexError:
                pass

    def wait(self) -> None:
        """Wait for the write under way; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failed is not None:
            _, error = self._failed
            self._failed = None
            raise error

    def close(self) -> None:
        """Wait for the write under way without raising (the build is already stopping, or done)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failed is not None:
            index, error = self._failed
            self._failed = None
            log.warning("shard %d was not written: %s", index, error)


def _loaded_rows(batches: Iterator, first_row: int, stop_row: int, size: int) -> Iterator:
    """``batches`` (the training rows ``first_row``.. in batches of ``size``) as they come; an error of the task's
    dataset or collate while loading one is the one-sentence TaskSpecError naming its rows."""
    batches, row = iter(batches), first_row
    while True:
        with running_user_code(f"training rows {row}..{min(stop_row, row + size) - 1} (loading them)"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch
        row += batch_size(batch)


def _featurize_rows(
    featurizer: MethodFeaturizer, batch: Any, first_row: int, sample_ids: list, out: torch.Tensor | None = None
) -> Any:
    """``featurizer.featurize_train(batch)`` (with ``out``: ``featurize_train_into(batch, out)``, the self-influence
    alone); when the task's own code fails on it, the first row that fails alone is named in the error (or the
    batch's rows, when none does)."""
    try:
        return featurizer.featurize_train(batch) if out is None else featurizer.featurize_train_into(batch, out)
    except GradIndexError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as error:
        size = batch_size(batch)
        for offset in range(size):
            try:
                featurizer.featurize_train(slice_batch(batch, offset, offset + 1))
            except GradIndexError:
                raise
            except Exception as alone:
                row = first_row + offset
                raise user_code_error(f"training row {row} (sample id {sample_ids[row]!r})", alone) from alone
        raise user_code_error(f"training rows {first_row}..{first_row + size - 1}", error) from error


def _samples_table(start: int, stop: int, sample_ids: list, labels: list[np.ndarray]) -> pa.Table:
    columns = {"row": arrow_of(np.arange(start, stop, dtype=np.int64)), "sample_id": _id_array(sample_ids[start:stop])}
    if labels and sum(len(part) for part in labels) == stop - start:
        columns["label"] = arrow_of(np.concatenate(labels))
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))


def _check_joinable(store: GradientStore, fingerprint: dict, config: BuildConfig) -> None:
    """A resuming (or joining) writer must compute exactly what the store holds, cut into the same shards."""
    diffs = fingerprint_differences(store.fingerprint, fingerprint)
    if diffs:
        raise IncompatibleStoreError(
            mismatch_message(
                store.path,
                diffs,
                store.fingerprint,
                fingerprint,
                "Resume with the store's settings, or rebuild with overwrite=True.",
            )
        )
    if config.rows_per_shard is not None and config.rows_per_shard != store.layout.rows_per_shard:
        raise IncompatibleStoreError(
            f"store {store.path} does not match this call: layout.rows_per_shard: store has "
            f"{store.layout.rows_per_shard}, "
            f"this call has {config.rows_per_shard}. Every writer must cut the same shards: leave rows_per_shard out "
            f"or pass rows_per_shard={store.layout.rows_per_shard}."
        )


def _reopen_for_repair(store: GradientStore) -> dict[int, str]:
    """Mark the shards ``verify`` finds damaged as not done (a resume then recomputes them); their expected content
    hashes."""
    problems = [problem for problem in store.verify() if not problem.endswith(": not written")]
    if not problems:
        log.info("repair: nothing to repair in %s", store.path)
        return {}
    bad = store.bad_shards()
    expected: dict[int, str] = {}
    for shard in bad:
        try:
            record = store.shard_record(shard)
        except GradIndexError:
            record = None
        if record and record.get("content_sha256"):
            expected[shard] = record["content_sha256"]
    if bad:
        log.warning("repair: recomputing shard(s) %s of %s", bad, store.path)
    store.reopen_for_repair(bad)
    return expected


def _check_finished_shards(
    store: GradientStore, task: Task, config: BuildConfig, shards: Sequence[int] | None, *, sample_ids: list
) -> None:
    """Hash the training samples of the finished ``shards`` (all if None) again, without gradients: they must be the
    ones written.

    A finished shard whose sample table is missing (a repair after samples.parquet was damaged) gets it back here.
    """
    missing_parts = set(store.missing_samples_parts())
    for shard in store.done_shards():
        if shards is not None and shard not in shards and shard not in missing_parts:
            continue
        record = store.shard_record(shard)
        expected = record.get("content_sha256") if record else None
        if expected is None and shard not in missing_parts:
            continue
        start, stop = store.layout.shard_rows(shard)
        digest, labels = _hash_rows(task, start, stop, config.batch_size or 256)
        if expected is not None and digest != expected:
            raise IncompatibleStoreError(content_message(store, shard, expected, digest))
        if shard in missing_parts:
            store.restore_samples_part(shard, _samples_table(start, stop, sample_ids, labels))


def _hash_rows(task: Task, start: int, stop: int, batch_size: int) -> tuple[str, list[np.ndarray]]:
    """The content hash of training rows ``start..stop`` as a build takes it (no gradients here: any batch size hashes
    the same), and their labels."""
    content = ContentHash(task.collate)
    labels = []
    # a TensorDataset with the default collate is sliced, not loaded item by item (hashed from the slices, same digest)
    sliced = task.collate is None and tensor_rows(task.train, range(start, stop)) is not None
    for batch in iter_batches(task.train, range(start, stop), batch_size, None if sliced else content):
        if sliced:
            content.observe_columns(batch)
        batch_labels = task.labels_of(batch)
        if batch_labels is not None:
            labels.append(batch_labels)
    return content.hexdigest(), labels


def _uniform_ids(ids: list) -> list:
    """The sample ids as one type for the whole training set (integers when all are, else strings), so that every
    shard's sample table agrees with the others and with the rows a later append adds."""
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in ids):
        return ids
    return [str(value) for value in ids]


def _id_array(ids: Sequence) -> pa.Array:
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in ids):
        return arrow_of(np.asarray(ids, dtype=np.int64))
    return arrow_of([str(value) for value in ids], pa.string())
