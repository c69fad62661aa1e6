"""The build and query stages: the one place where task, featurizer, store and index meet."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import default_collate

from gradindex import __version__
from gradindex._errors import (
    CheckpointError,
    GradIndexError,
    IncompatibleStoreError,
    NonFiniteError,
    IncompleteStoreError,
    StoreExistsError,
    TaskSpecError,
)
from gradindex.checkpoints import CheckpointSpec, file_sha256, parse_checkpoints
from gradindex.featurize import Featurizer, iter_batches, labels_of, load_checkpoints, model_fingerprint, resolve_device
from gradindex.featurize._featurizer import KRON_SIDES_TRANSFORM
from gradindex.featurize._loading import tensor_rows
from gradindex.index import ExactIndex, search_blocks
from gradindex.index._prefetch import prefetch_blocks, prefetch_depth, to_float32
from gradindex._progress import progress_bar, track
from gradindex.methods import METHODS, make_featurizer
from gradindex.influence import MethodFeaturizer, as_method_featurizer, finish_store, recompute_self_influence, stored_self_influence
from gradindex.project import ProjectionSpec
from gradindex.store import GradientStore, StoreLayout, create_store, fingerprint_differences, open_store, store_path, sweep_orphans
from gradindex.task import Task, load_task

__all__ = [
    "BuildConfig",
    "build",
    "finalize",
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


def _progress(total: int, desc: str, enabled: bool | None, unit: str = "sample"):
    return progress_bar(total, desc, enabled=enabled, unit=unit)


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What a build computes (fingerprinted) and how (batching, device, layout)."""

    method: str = "tracin"
    projection: str | None = None  # None: kron for tracin (the factored fast path), the ProjectionSpec default otherwise
    proj_dim: int = 1024
    kron_sides: str | None = None  # kron: pca (None: the default), orthogonal or gaussian; the recorded plan keeps it
    seed: int = 0
    layers: tuple[str, ...] | None = None
    normalize: bool = False
    dtype: str = "float16"
    batch_size: int | None = None  # None: as many samples as fit featurize_memory (kron), else 256
    device: str = "auto"
    rows_per_shard: int | None = None
    method_options: dict = field(default_factory=dict)
    nonfinite: str = "error"
    # how featurization runs (not fingerprinted): working memory per chunk, torch.compile, CUDA bfloat16 autocast
    featurize_memory: int = 512 << 20
    compile: bool = False
    autocast: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.featurize_memory <= 0:
            raise ValueError(f"featurize memory must be positive, got {self.featurize_memory}")
        if self.projection is None:
            object.__setattr__(self, "projection", "kron" if self.method == "tracin" else ProjectionSpec().kind)
        if self.rows_per_shard is not None and self.rows_per_shard <= 0:
            raise ValueError(f"rows per shard must be positive, got {self.rows_per_shard}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"--nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.nonfinite!r}")
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
        self.projection_spec()  # validates kind, dim, seed

    def projection_spec(self) -> ProjectionSpec:
        return ProjectionSpec(kind=self.projection, dim=self.proj_dim, seed=self.seed, kron_sides=self.kron_sides)  # type: ignore[arg-type]


# What a build does with a sample whose vector is NaN or infinite: stop (nothing written for its
# shard), or record it and continue with a zero vector, left out of search (skip) or kept in it (zero).
NONFINITE_POLICIES = ("error", "skip", "zero")


def _loader_batch_size(config: BuildConfig, featurizer: Any) -> int:
    """The batch size asked for, else what the featurizer says fits its memory budget (256 when it says nothing)."""
    if config.batch_size is not None:
        return config.batch_size
    inner = getattr(featurizer, "inner", featurizer)
    hint = getattr(inner, "batch_size_hint", None)
    return int(hint()) if callable(hint) else 256


def _hash_leaf(digest: Any, leaf: Any) -> None:
    if isinstance(leaf, torch.Tensor):
        flat = leaf.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(leaf.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(leaf, np.ndarray):
        digest.update(f"array {leaf.dtype} {leaf.shape}|".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    else:
        digest.update(f"{type(leaf).__name__} {leaf!r}|".encode())


class _ContentHash:
    """sha256 of training samples as the data loader hands them to collate; any batch size gives the same.

    One running hash per leaf of an item (input, target, ...): tensors of one shape are stacked and
    hashed a batch at a time, so hashing costs little next to featurizing.
    """

    def __init__(self, collate: Any) -> None:
        self._collate = collate or default_collate
        self._digests: list[Any] = []
        self._signatures: set[str] = set()

    def __call__(self, items: list) -> Any:
        rows = [list(item) if isinstance(item, (tuple, list)) else torch.utils._pytree.tree_leaves(item) for item in items]
        width = max(len(row) for row in rows)
        self._widen(width)
        if any(len(row) != width for row in rows):
            self._signatures.add(f"ragged {[len(row) for row in rows]}")
        for position in range(width):
            column = [row[position] for row in rows if len(row) > position]
            digest = self._digests[position]
            first = column[0]
            if isinstance(first, torch.Tensor) and all(isinstance(leaf, torch.Tensor) and leaf.shape == first.shape and leaf.dtype == first.dtype for leaf in column):
                with torch.no_grad():
                    self._hash_column(position, torch.stack(column))
            else:
                for leaf in column:
                    if isinstance(leaf, (tuple, list, dict)):
                        for part in torch.utils._pytree.tree_leaves(leaf):
                            _hash_leaf(digest, part)
                    else:
                        _hash_leaf(digest, leaf)
        return self._collate(items)

    def observe_columns(self, columns: Sequence[torch.Tensor]) -> None:
        """Hash a batch handed over as its columns (a sliced ``TensorDataset``: one tensor per item position) exactly
        as ``__call__`` hashes the same items one by one: the bytes of a slice are those of its rows stacked."""
        self._widen(len(columns))
        for position, column in enumerate(columns):
            self._hash_column(position, column)

    def _widen(self, width: int) -> None:
        while len(self._digests) < width:
            self._digests.append(hashlib.sha256())

    def _hash_column(self, position: int, column: torch.Tensor) -> None:
        """One item position of a batch, ``[B, *item shape]``: its signature and its bytes."""
        self._signatures.add(f"{position} tensor {column.dtype} {tuple(column.shape[1:])}")
        flat = column.detach().cpu().contiguous().reshape(-1)
        self._digests[position].update(memoryview(flat.view(torch.uint8).numpy()))

    def hexdigest(self) -> str:
        final = hashlib.sha256("\n".join(sorted(self._signatures)).encode())
        for digest in self._digests:
            final.update(digest.digest())
        return final.hexdigest()


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
    append: bool = False,
    repair: bool = False,
    storage_options: dict | None = None,
    claim_timeout: float | None = None,
    **options: Any,
) -> GradientStore:
    """Featurize the task's training set at the checkpoints and write a store at ``output``.

    ``options`` are BuildConfig fields (``proj_dim=512, projection="sjlt", dtype="float32"``, ...).
    ``shard=(I, N)`` computes only shards I, I+N, I+2N, ...; the worker that finishes the last one
    completes the store (or ``finalize(output)`` does). Returns the opened store (complete unless other
    workers still run). ``append=True`` adds the training samples beyond the store's rows to a complete
    store built with the same settings (the task's train set grew; its first rows must be unchanged),
    then updates the store's persisted indexes (or marks them stale).

    ``nonfinite`` (a BuildConfig field) says what to do with a sample whose vector is NaN or infinite:
    ``"error"`` (stop; nothing is written for its shard), ``"skip"`` or ``"zero"`` (store a zero vector,
    list the row in the manifest; skipped rows are left out of search and self-influence). On
    ``resume`` the training samples of the finished shards are hashed again and must match the
    hashes recorded with them; ``repair=True`` (with ``resume``) first recomputes exactly the shards
    ``verify`` finds damaged.

    ``output`` is a local folder or an fsspec URL (``s3://bucket/a.gradindex``, ``gs://...``, ``memory://...``);
    ``storage_options`` go to its filesystem (credentials and endpoint otherwise come from the environment).
    ``claim_timeout`` (seconds) is how old another machine's claim on a shard of a remote store must be
    before this build takes the shard over (default ``GRADINDEX_CLAIM_TIMEOUT``, else 6 hours).
    """
    if config is None:
        config = BuildConfig(**options)
    elif options:
        config = BuildConfig(**{**asdict(config), **options})
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues a build, overwrite replaces it")
    if repair and not resume:
        raise ValueError("--repair needs --resume: it recomputes the damaged shards of an existing store")
    if claim_timeout is not None and not claim_timeout > 0:
        raise ValueError(f"--claim-timeout must be a positive number of seconds, got {claim_timeout}")
    if append and overwrite:
        raise ValueError("--append and --overwrite exclude each other: append grows a store, overwrite replaces it")
    task_spec = _absolute_spec(task) if isinstance(task, str) else None
    task = load_task(task)
    specs = parse_checkpoints(checkpoints)
    device = resolve_device(config.device)
    shard_index, shard_count = _shard_assignment(shard)
    output = store_path(output, storage_options)

    loaded = load_checkpoints(task, specs, device)

    def featurizer_for(projection: ProjectionSpec) -> MethodFeaturizer:
        return as_method_featurizer(make_featurizer(
            config.method, task, loaded, projection=projection, layers=config.layers,
            normalize=config.normalize, device=device, options=config.method_options,
            runtime={"chunk_bytes": config.featurize_memory, "compile": config.compile, "autocast": config.autocast},
        ))

    # a store being joined (resume, another worker's, append) brings its recorded kron plan: never planned again
    joining = (resume or append or shard_count > 1) and not overwrite
    projection = (_recorded_projection(output, config) if joining else None) or config.projection_spec()
    featurizer = featurizer_for(projection)
    fingerprint = _fingerprint(featurizer, loaded, task, config.dtype, model_fingerprint(task.model()))
    n_samples = len(task.train)
    if n_samples == 0:
        raise TaskSpecError("the task's training set is empty; there is nothing to index")

    sweep_orphans(output)  # what killed writers left beside the store
    expected_content: dict[int, str] = {}
    appended_from = None
    if append:
        store, appended_from = _open_for_append(output, task, fingerprint, {"task": {"spec": task_spec, "name": task.name}})
    elif output.exists() and (resume or (shard_count > 1 and not overwrite)):
        store = open_store(output)
        _check_joinable(store, fingerprint, config)
        store.sweep_temporaries()
        if repair:
            expected_content = _reopen_for_repair(store)
        if store.complete:
            log.info("store %s is already complete", output)
            return store
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
                recorded = _recorded_projection(output, config)
                if recorded is not None and recorded.plan != projection.plan:  # its kron plan wins
                    featurizer = featurizer_for(recorded)
                    fingerprint = _fingerprint(featurizer, loaded, task, config.dtype, model_fingerprint(task.model()))
                _check_joinable(store, fingerprint, config)
            else:
                raise

    store.claim_timeout = claim_timeout
    featurizer.attach(store)  # e.g. Arnoldi's eigenbasis: computed once, shared by every worker through the store
    mine = [index for index in range(store.n_shards) if index % shard_count == shard_index]
    sample_ids = task.train_sample_ids()
    if resume and not append:
        # each worker re-hashes the samples of its own finished shards (a repair: of all of them)
        _check_finished_shards(store, task, config, None if repair else mine, sample_ids=sample_ids)
    todo = [index for index in mine if store.shard_record(index) is None]
    owner = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"
    total_rows = sum(store.layout.shard_rows(index)[1] - store.layout.shard_rows(index)[0] for index in todo)
    bar = _progress(total_rows, f"featurize {output.name} ({len(loaded)} checkpoints)", progress)
    started = time.perf_counter()
    try:
        for position, index in enumerate(todo):
            bar.set_postfix_str(f"shard {position + 1}/{len(todo)}", refresh=False)
            _build_shard(store, index, task, featurizer, sample_ids, config, owner, bar, expected_content.get(index))
            log.debug("wrote shard %d of %s (%d/%d of this worker's shards)", index, output, position + 1, len(todo))
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    if total_rows:
        log.info("featurized %d samples in %.1fs (%.0f samples/s)", total_rows, elapsed, total_rows / max(elapsed, 1e-9))
    if all(store.shard_record(index) is not None for index in range(store.n_shards)):
        featurizer.finish(store)  # transforms that need every shard (TRAK's ΦᵀΦ), written before the store says complete
        store.finalize()
    if appended_from is not None and store.complete:
        from gradindex.indexes import update_indexes

        for name, outcome in update_indexes(store, appended_from, progress=progress).items():
            log.info("index %s of %s: %s", name, output, outcome)
    return store


def _recorded_projection(output: Path, config: BuildConfig) -> ProjectionSpec | None:
    """The projection (with its recorded kron plan) of the store at ``output`` when it is the one ``config``
    asks for; None otherwise (no store yet, another projection: the fingerprint check then says what differs)."""
    asked = config.projection_spec()
    if asked.kind != "kron" or not output.exists():
        return None
    try:
        recorded = ProjectionSpec.from_dict(open_store(output).fingerprint["projection"])
    except Exception:  # noqa: BLE001 - not readable (yet): the normal checks report it
        return None
    if recorded != asked or recorded.plan is None:
        return None
    drawn = {entry.get("sides", "gaussian") for entry in recorded.plan
             if "module" in entry and (entry["k_in"] < entry["in"] or entry["k_out"] < entry["out"])}
    # pca plans draw orthogonal sides for layers too wide to decompose: such a store was built with pca
    built = "pca" if "pca" in drawn else min(drawn, default=None)
    if asked.kron_sides is not None and built is not None and asked.kron_sides != built:
        raise IncompatibleStoreError(
            f"store {output} was built with kron sides {built}, not {asked.kron_sides}; "
            f"continue it with --kron-sides {built} (or without --kron-sides), or rebuild with --overwrite"
        )
    return recorded


def _open_for_append(output: Path, task: Task, fingerprint: dict, extra: dict) -> tuple[GradientStore, int]:
    """Open a complete store and grow it to the task's training set; returns it and its old row count."""
    store = open_store(output)
    n_samples = fingerprint["dataset"]["n_samples"]
    diffs = [diff for diff in fingerprint_differences(store.fingerprint, fingerprint) if not diff.startswith("dataset.")]
    if diffs:
        raise IncompatibleStoreError(
            _mismatch_message(output, diffs, store.fingerprint, fingerprint, "Append with the store's settings, or rebuild with --overwrite.")
        )
    from_rows = sorted(name for name in store.transforms() if name != KRON_SIDES_TRANSFORM)  # kron sides: from the first rows only
    if from_rows:
        raise IncompatibleStoreError(
            f"store {output} holds query-side transforms ({', '.join(from_rows)}) computed from every row; "
            "appending would invalidate them. Rebuild with --overwrite."
        )
    appended_from = store.manifest.get("appended_from") if not store.complete else store.n_samples
    if appended_from is None:
        raise IncompatibleStoreError(f"store {output} is incomplete ({store.progress()}); finish it with --resume before appending")
    if store.complete and n_samples == store.n_samples:
        raise ValueError(f"the task's training set has {n_samples} samples and store {output} holds them all; there is nothing to append")
    if n_samples < appended_from:
        raise IncompatibleStoreError(
            f"the task's training set has {n_samples} samples but store {output} holds {appended_from}; append only adds samples. "
            "Rebuild with --overwrite."
        )
    # the store's rows must still be the task's first rows: their probe hash, taken as at the store's build
    # (an append that stopped midway already holds the grown data set's fingerprint)
    if store.complete:
        changed = _dataset_probe(torch.utils.data.Subset(task.train, range(appended_from))) != store.fingerprint["dataset"]["probe_sha256"]
    else:
        changed = store.fingerprint["dataset"] != fingerprint["dataset"]
    if changed:
        raise IncompatibleStoreError(
            f"the first {appended_from} training samples differ from those store {output} was built from; append needs the old "
            "samples unchanged and in the same order, with new ones after them. Rebuild with --overwrite."
        )
    store.sweep_temporaries()
    store.reopen_for_append(n_samples, fingerprint, extra=extra)
    return store, appended_from


def finalize(output: "GradientStore | str | Path", *, storage_options: dict | None = None) -> GradientStore:
    """Complete a store whose shards were all written by workers (``--shard I/N``): merge their records
    into the manifest. IncompleteStoreError naming the missing shards if some are not written."""
    store = _open(output, storage_options)
    if not store.complete and all(store.shard_record(shard) is not None for shard in range(store.n_shards)):
        finish_store(store)  # transforms that need every shard (TRAK's ΦᵀΦ), before the store says complete
    if store.finalize():
        return store
    missing = [shard for shard in range(store.n_shards) if store.shard_record(shard) is None]
    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
    raise IncompleteStoreError(
        f"store {store.path} cannot be finalized: {len(missing)} of {store.n_shards} shards are not written ({shown}); "
        "run the workers for them (gradindex build ... --shard I/N) or finish with --resume"
    )


def _build_shard(store: GradientStore, index: int, task: Task, featurizer: MethodFeaturizer, sample_ids: list, config: BuildConfig, owner: str,
                 bar, expected_content: str | None = None) -> None:
    store.claim_shard(index, owner=owner)
    try:
        _compute_shard(store, index, task, featurizer, sample_ids, config, bar, expected_content)
    except BaseException:
        # Free the shard for the next writer (a resume): our claim would block it for as long as we live.
        try:
            store.release_shard(index)
        except GradIndexError:
            pass
        raise


def _compute_shard(store: GradientStore, index: int, task: Task, featurizer: MethodFeaturizer, sample_ids: list, config: BuildConfig, bar,
                   expected_content: str | None) -> None:
    start, stop = store.layout.shard_rows(index)
    features = np.empty((stop - start, featurizer.dim), dtype=np.float32)
    self_scores = np.empty(stop - start, dtype=np.float32)
    featurizer.begin_shard(index)
    labels: list[np.ndarray] = []
    position = 0
    content = _ContentHash(task.collate)
    # a TensorDataset with the default collate is sliced, not loaded item by item (hashed from the slices, same digest)
    sliced = task.collate is None and tensor_rows(task.train, range(start, stop)) is not None
    with torch.inference_mode(False), torch.enable_grad():
        for batch in iter_batches(task.train, range(start, stop), _loader_batch_size(config, featurizer), None if sliced else content):
            if sliced:
                content.observe_columns(batch)
            vectors, scores = featurizer.featurize_train(batch)
            vectors = vectors.detach().cpu().numpy()
            if vectors.ndim != 2 or vectors.shape[1] != featurizer.dim or position + len(vectors) > stop - start:
                raise ValueError(
                    f"the {config.method} featurizer returned vectors of shape {list(vectors.shape)} at row {start + position}; "
                    f"expected [batch, {featurizer.dim}] (nothing was written for shard {index})"
                )
            features[position : position + len(vectors)] = vectors
            self_scores[position : position + len(vectors)] = scores.detach().cpu().numpy()
            batch_labels = labels_of(batch)
            if batch_labels is not None:
                labels.append(batch_labels)
            position += len(vectors)
            bar.update(len(vectors))
    if position != stop - start:
        raise TaskSpecError(f"the training set yielded {position} samples for rows {start}..{stop}; its __len__ disagrees with its items")
    if expected_content is not None and content.hexdigest() != expected_content:
        raise IncompatibleStoreError(_content_message(store, index, expected_content, content.hexdigest()))
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(features).all(axis=1) & np.isfinite(self_scores)
    nonfinite = None
    if not finite.all():
        bad = np.flatnonzero(~finite)
        rows = (bad + start).tolist()
        ids = [sample_ids[row] for row in rows[:10]]
        if config.nonfinite == "error":
            raise NonFiniteError(
                f"{len(bad)} of the {stop - start} vectors of shard {index} are NaN or infinite (rows {rows[:10]}"
                f"{' ...' if len(rows) > 10 else ''}, sample ids {ids}); nothing was written for this shard and finished shards are kept. "
                "Fix the data or the model, or resume with --nonfinite skip (leave those samples out of search) "
                "or --nonfinite zero (keep them with zero vectors)"
            )
        features[bad] = 0.0
        self_scores[bad] = 0.0
        kind = "skipped" if config.nonfinite == "skip" else "zeroed"
        nonfinite = {kind: rows}
        log.warning("shard %d: %d non-finite vectors %s (rows %s%s); listed in the manifest", index, len(rows), kind, rows[:10], " ..." if len(rows) > 10 else "")
    featurizer.end_shard(store, index)  # its share of any transform is durable before the shard's record
    store.write_shard(index, features, self_scores, _samples_table(start, stop, sample_ids, labels),
                      content_sha256=content.hexdigest(), nonfinite=nonfinite)


def _samples_table(start: int, stop: int, sample_ids: list, labels: list[np.ndarray]) -> pa.Table:
    columns = {"row": pa.array(np.arange(start, stop, dtype=np.int64)), "sample_id": _id_array(sample_ids[start:stop])}
    if labels and sum(len(part) for part in labels) == stop - start:
        columns["label"] = pa.array(np.concatenate(labels))
    return pa.table(columns)


def _content_message(store: GradientStore, shard: int, expected: str, actual: str) -> str:
    start, stop = store.layout.shard_rows(shard)
    return (
        f"store {store.path} does not match this call: dataset.content_sha256 of shard {shard} (rows {start}..{stop - 1}): "
        f"store has {expected[:12]}…, this call has {actual[:12]}…. The training set changed since those rows were written "
        "(or its items are not deterministic); resume with the same data, or rebuild with --overwrite."
    )


def _check_joinable(store: GradientStore, fingerprint: dict, config: BuildConfig) -> None:
    """A resuming (or joining) writer must compute exactly what the store holds, cut into the same shards."""
    diffs = fingerprint_differences(store.fingerprint, fingerprint)
    if diffs:
        raise IncompatibleStoreError(
            _mismatch_message(store.path, diffs, store.fingerprint, fingerprint, "Resume with the store's settings, or rebuild with --overwrite.")
        )
    if config.rows_per_shard is not None and config.rows_per_shard != store.layout.rows_per_shard:
        raise IncompatibleStoreError(
            f"store {store.path} does not match this call: layout.rows_per_shard: store has {store.layout.rows_per_shard}, "
            f"this call has {config.rows_per_shard}. Every writer must cut the same shards: leave out --rows-per-shard or pass "
            f"{store.layout.rows_per_shard}."
        )


def _reopen_for_repair(store: GradientStore) -> dict[int, str]:
    """Mark the shards ``verify`` finds damaged as not done (a resume then recomputes them); their expected content hashes."""
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


def _check_finished_shards(store: GradientStore, task: Task, config: BuildConfig, shards: Sequence[int] | None, *, sample_ids: list) -> None:
    """Hash the training samples of the finished ``shards`` (all if None) again, without gradients: they must be the ones written.

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
        content = _ContentHash(task.collate)
        labels = []
        # no gradients here: any batch size hashes the same
        for batch in iter_batches(task.train, range(start, stop), config.batch_size or 256, content):
            batch_labels = labels_of(batch)
            if batch_labels is not None:
                labels.append(batch_labels)
        if expected is not None and content.hexdigest() != expected:
            raise IncompatibleStoreError(_content_message(store, shard, expected, content.hexdigest()))
        if shard in missing_parts:
            store.restore_samples_part(shard, _samples_table(start, stop, sample_ids, labels))


def _id_array(ids: Sequence) -> pa.Array:
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in ids):
        return pa.array(np.asarray(ids, dtype=np.int64))
    return pa.array([str(value) for value in ids], pa.string())


# ---- query --------------------------------------------------------------------------------------


def _open(store: "GradientStore | str | Path", storage_options: dict | None = None) -> GradientStore:
    return store if isinstance(store, GradientStore) else open_store(store, storage_options=storage_options)


def search_store(
    store: "GradientStore | str | Path",
    queries: np.ndarray,
    k: int,
    *,
    opponents: bool = False,
    memory_budget: int | None = None,
    allow_incomplete: bool = False,
    use_gpu: bool | None = None,
    progress: bool | None = None,
    index: str | None = None,
    nprobe: int | None = None,
    dask: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search of ``queries [q, D]`` over the store: ``(scores [q, k'], rows [q, k'])``.

    Opponents are the top-k of the negated queries; their scores are reported as the true (negative) influence.
    The store is searched in memory when it fits ``memory_budget`` bytes (as float32), else streamed shard by shard.
    ``index=NAME`` searches a persisted approximate index instead (``build_index``; ``nprobe`` overrides its
    default nprobe/efSearch; rows not found are -1). ``dask`` (a scheduler address, ``"local:N"`` or a
    ``distributed.Client``) spreads the exact search over Dask workers, each holding some of the shards.
    """
    store = _open(store)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != store.dim:
        raise IncompatibleStoreError(f"queries have shape {list(queries.shape)} but store {store.path} holds vectors of dimension {store.dim}")
    if index is not None and dask is not None:
        raise ValueError("--index and --dask exclude each other: Dask search is exact")
    if nprobe is not None and index is None:
        raise ValueError("--nprobe applies to an approximate index; pass --index NAME too")
    if index is not None:
        from gradindex.indexes import search_index

        return _dropping_skipped(store, allow_incomplete, k, opponents, lambda wanted: search_index(
            store, queries, wanted, index, nprobe=nprobe, opponents=opponents, use_gpu=use_gpu))
    if dask is not None:
        from gradindex.distributed import search_store_dask

        return _dropping_skipped(store, allow_incomplete, k, opponents, lambda wanted: search_store_dask(
            store, queries, wanted, dask, opponents=opponents, memory_budget=memory_budget, allow_incomplete=allow_incomplete))
    searched = -queries if opponents else queries
    budget = default_memory_budget() if memory_budget is None else memory_budget
    store._require_readable(allow_incomplete)
    skipped = store.skipped_rows(allow_incomplete=allow_incomplete)  # --nonfinite skip: never returned
    if store.n_samples * store.dim * 4 <= budget:
        index = ExactIndex(store.dim, use_gpu=use_gpu)
        for first_row, block in _blocks(store, allow_incomplete, progress, "load", skipped):
            if first_row != index.ntotal:  # holes (unfinished shards) must not shift row numbers
                return _streamed(store, searched, k, allow_incomplete, use_gpu, opponents, progress, skipped, budget=budget)
            index.add(block)
        scores, rows = index.search(searched, k)
    else:
        return _streamed(store, searched, k, allow_incomplete, use_gpu, opponents, progress, skipped, budget=budget)
    return (-scores if opponents else scores), _store_rows(rows, skipped)


def _dropping_skipped(store: GradientStore, allow_incomplete: bool, k: int, opponents: bool, search) -> tuple[np.ndarray, np.ndarray]:
    """``search(k)`` for searches that see every stored row (an index, Dask workers): ask for k more per
    skipped row (``--nonfinite skip``) and leave those out. Missing places are row -1, score -inf (+inf for opponents)."""
    try:
        skipped = store.skipped_rows(allow_incomplete=allow_incomplete)
    except IncompleteStoreError:
        skipped = np.zeros(0, np.int64)  # the search itself says the store is incomplete
    if not skipped.size:
        return search(k)
    scores, rows = search(k + len(skipped))
    keep = (rows >= 0) & ~np.isin(rows, skipped)
    width = min(k, int(keep.sum(axis=1).max(initial=0)))
    kept_scores = np.full((rows.shape[0], width), np.inf if opponents else -np.inf, dtype=np.float32)
    kept_rows = np.full((rows.shape[0], width), -1, dtype=np.int64)
    for position in range(rows.shape[0]):
        picked = np.flatnonzero(keep[position])[:width]
        kept_scores[position, : len(picked)] = scores[position, picked]
        kept_rows[position, : len(picked)] = rows[position, picked]
    return kept_scores, kept_rows


def _blocks(store: GradientStore, allow_incomplete: bool, progress: bool | None, verb: str, skipped: np.ndarray | None = None):
    """The store's shards in row order, with a rows/s bar; without the ``skipped`` rows (then numbered as if they were absent)."""
    blocks = track(store.iter_blocks(allow_incomplete=allow_incomplete), store.n_samples, f"{verb} {store.path.name}",
                   enabled=progress, unit="row", size=lambda item: len(item[1]))
    return blocks if skipped is None or not skipped.size else _without_rows(blocks, skipped)


def _without_rows(blocks, skipped: np.ndarray):
    """Blocks with the ``skipped`` rows taken out; row r is renumbered r - (skipped rows before r), so rows stay consecutive."""
    for first_row, block in blocks:
        low, high = np.searchsorted(skipped, [first_row, first_row + len(block)])
        if high > low:
            block = np.delete(block, skipped[low:high] - first_row, axis=0)
        yield first_row - int(low), block


def _store_rows(rows: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """Store rows of rows numbered without the ``skipped`` ones (the inverse of ``_without_rows``)."""
    if not skipped.size:
        return rows
    return rows + np.searchsorted(skipped - np.arange(len(skipped)), rows, side="right")


def _streamed(store, searched, k, allow_incomplete, use_gpu, opponents, progress=None, skipped=None, budget=0):
    # read ahead (in a thread) as many shards as the memory budget allows beside the one being searched
    depth = prefetch_depth(store.layout.rows_per_shard * store.dim * 4, budget)
    blocks = prefetch_blocks(_blocks(store, allow_incomplete, progress, "search", skipped), depth, convert=_float32)
    scores, rows = search_blocks(blocks, searched, k, use_gpu=use_gpu)
    return (-scores if opponents else scores), _store_rows(rows, np.zeros(0, np.int64) if skipped is None else skipped)


def _float32(vectors: np.ndarray) -> np.ndarray:
    """A store block as C-contiguous float32: torch casts float16 several times faster than numpy (SIMD, threads)."""
    vectors = np.asarray(vectors)
    if vectors.dtype != np.float16 or not vectors.flags.c_contiguous:
        return to_float32(vectors)
    out = np.empty(vectors.shape, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only block: torch only reads it
        torch.from_numpy(out).copy_(torch.from_numpy(vectors))
    return out


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
    index: str | None = None,
    nprobe: int | None = None,
    dask: Any = None,
    damping: float | None = None,
    solver: str | None = None,
    method_options: dict | None = None,
    storage_options: dict | None = None,
) -> pa.Table:
    """The k most influential training samples for each query sample.

    Returns a table ``query, query_id, rank, row, sample_id, score``: ``query`` numbers the query
    samples in the order given, ``query_id`` is the sample's index in ``split``, ``row`` the store row,
    ``score`` ⟨φ(q), φ(z)⟩ (positive = proponent; with ``opponents=True`` the most negative).
    ``index``, ``nprobe`` and ``dask`` are as in ``search_store``. ``damping``, ``solver`` and
    ``method_options`` change the query side of asymmetric methods (IF: damping, solver and its settings;
    TRAK: damping) without a rebuild; asking for another value of a build-time option is an error.
    ``store`` is a path, an fsspec URL (``storage_options`` go to its filesystem) or an opened store.
    """
    store = _open(store, storage_options)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    store._require_readable(allow_incomplete)
    task = _task_for(store, task)
    dataset = task.split(split)
    picked = _parse_samples(samples, len(dataset))
    device_ = resolve_device(device)
    featurizer, _ = _query_featurizer(store, task, checkpoints, device_)
    featurizer = as_method_featurizer(featurizer)
    featurizer.configure_query(_method_query_options(damping, solver, method_options), store.path)
    featurizer.attach(store)
    vectors = np.empty((len(picked), featurizer.dim), dtype=np.float32)
    position = 0
    bar = _progress(len(picked), "featurize queries", progress)
    with torch.enable_grad():
        for batch in iter_batches(dataset, picked, batch_size, task.collate):
            block = featurizer.query_vectors(batch).detach().cpu().numpy()
            vectors[position : position + len(block)] = block
            position += len(block)
            bar.update(len(block))
    bar.close()
    scores, rows = search_store(store, vectors, k, opponents=opponents, memory_budget=memory_budget, allow_incomplete=allow_incomplete,
                                use_gpu=use_gpu, progress=progress, index=index, nprobe=nprobe, dask=dask)
    return _result_table(store, np.asarray(picked), scores, rows, allow_incomplete)


def _method_query_options(damping: float | None, solver: str | None, method_options: dict | None) -> dict:
    """The query-side method options asked for (None = the store's)."""
    asked = dict(method_options or {})
    for name, value in (("damping", damping), ("solver", solver)):
        if value is not None:
            if name in asked and asked[name] != value:
                raise ValueError(f"{name} is given twice ({value!r} and {asked[name]!r} in method options); give it once")
            asked[name] = value
    return {name: value for name, value in asked.items() if value is not None}


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
    kept = flat_rows >= 0  # an approximate index may find fewer than k rows (row -1)
    flat_rows = flat_rows[kept]
    return pa.table(
        {
            "query": pa.array(np.repeat(np.arange(n_queries, dtype=np.int64), found)[kept]),
            "query_id": pa.array(np.repeat(query_ids.astype(np.int64), found)[kept]),
            "rank": pa.array(np.tile(np.arange(1, found + 1, dtype=np.int64), n_queries)[kept]),
            "row": pa.array(flat_rows),
            "sample_id": _sample_ids(store, flat_rows, allow_incomplete),
            "score": pa.array(scores.reshape(-1).astype(np.float32)[kept]),
        }
    )


def self_influence(
    store: "GradientStore | str | Path",
    *,
    top: int | None = None,
    allow_incomplete: bool = False,
    damping: float | None = None,
    solver: str | None = None,
    method_options: dict | None = None,
    task: "Task | str | None" = None,
    checkpoints: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool | None = None,
    storage_options: dict | None = None,
) -> pa.Table:
    """Training samples ranked by self-influence, highest first: ``rank, row, sample_id, score``.

    Self-influence is ⟨φ(z), φ(z)⟩, or ⟨T φ(z), φ(z)⟩ for asymmetric methods, as stored at build. With
    ``damping``/``solver``/``method_options`` it is recomputed at those query-side settings: from the
    store alone for TRAK, through the task's gradients for influence functions (``task``, ``checkpoints``
    and ``device`` as in ``query``).
    """
    store = _open(store, storage_options)
    if top is not None and (isinstance(top, bool) or top <= 0):
        raise ValueError(f"--top must be a positive integer, got {top}")
    asked = _method_query_options(damping, solver, method_options)
    if asked:
        store._require_readable(False)  # recomputed self-influence needs every row
        scores = stored_self_influence(store, asked)
        if scores is None:
            task = _task_for(store, task)
            featurizer = as_method_featurizer(_query_featurizer(store, task, checkpoints, resolve_device(device))[0])
            featurizer.configure_query(asked, store.path)
            featurizer.attach(store)
            bar = _progress(store.n_samples, "self-influence", progress)
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
            "rank": pa.array(np.arange(1, len(order) + 1, dtype=np.int64)),
            "row": pa.array(picked),
            "sample_id": _sample_ids(store, picked, allow_incomplete),
            "score": pa.array(scores[order]),
        }
    )


def info(store: "GradientStore | str | Path", *, storage_options: dict | None = None) -> dict:
    """The store's manifest and build progress, and its persisted indexes (``indexes``: recall, factory, ...)."""
    from gradindex.indexes import list_indexes

    store = _open(store, storage_options)
    details = store.describe()
    details["indexes"] = list_indexes(store)
    return details


def verify(store: "GradientStore | str | Path", *, storage_options: dict | None = None) -> list[str]:
    """Every shard re-hashed against its recorded checksum; the problems found (empty when sound)."""
    return _open(store, storage_options).verify()
