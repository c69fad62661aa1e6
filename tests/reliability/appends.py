"""The append sweeps: ``build(append=True)`` killed at every step and failed at every disk step, refused for a changed
history, read while it runs; and ``overwrite=True`` refusing what is not a store.

Each function takes a work folder (and the checkpoints) and returns its figures and failures, so that
``benchmarks/reliability`` can run bigger versions; ``test_append_faults.py`` runs them small. The store is 1050 rows in
shards of 100 (the last one half full) grown to 1300 (``rel_tasks.append_*``); every grown store is compared byte for
byte with a fresh build of the 1300 rows.
"""

from __future__ import annotations

import errno as errno_codes
import json
import os
import random
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from reliability.harness import (
    TASKS,
    child_build,
    child_setup,
    context,
    diff_names,
    run_child,
    snapshot,
    tree_hash,
)

OLD = f"{TASKS}:append_old_task"
NEW = f"{TASKS}:append_new_task"
OPTIONS = {"projection": "none", "rows_per_shard": 100, "batch_size": 100, "progress": False}
K = 7

# The named crash points an append passes, in order (":N" = the Nth time): staging, the three shards it writes (the old
# half-full one and two new ones), the swap of the manifest, then moving the staged files into place.
APPEND_SITES = (
    "append-after-staging",
    "shard-before-rename",
    "shard-after-features",
    "shard-before-record",
    "shard-after-record",
    "shard-before-rename:3",
    "shard-after-record:3",
    "finalize-before-manifest",
    "append-before-manifest",
    "finalize-after-manifest",
    "append-after-manifest",
    "append-promote",
    "append-before-cleanup",
    "append-cleanup",
)
# the first site after the manifest swap: a kill before it leaves the old store, from it on the grown one
FIRST_AFTER_SWAP = APPEND_SITES.index("finalize-after-manifest")

# (what changed, task factory in rel_tasks, what the refusal must say)
HISTORY_CHANGES = (
    ("a changed sample", "append_changed_sample_task", r"shard 5 .* \(rows 500\.\.599, sample ids 500\.\.599\)"),
    ("a reordered sample", "append_reordered_task", r"shard 7 of store .* \(rows 700\.\.799, sample ids 700\.\.799\)"),
    ("changed id values", "append_changed_ids_task", r"row 300 of store .* has sample id 300 .* now has 10000 there"),
    ("ids of another type", "append_string_ids_task", r"integer sample ids .* now string \(row 0 has sample id '0'\)"),
    ("new ids of another type", "append_string_new_ids_task", r"now string \(row 1050 has sample id 'new-1050'\)"),
)  # fmt: skip


@dataclass
class World:
    """The store before the append, a fresh build of the grown rows, and what users get from each."""

    checkpoints: list[str]
    old: str  # the task spec of the store's rows
    new: str  # the task spec of the grown rows
    options: dict  # the build's options
    old_rows: int
    new_rows: int
    base: Path  # the complete 1050-row store every case starts from (copied)
    whole: Path  # a fresh build of the 1300 rows
    before: dict[str, bytes]  # snapshot of base
    grown: dict[str, bytes]  # snapshot of whole, as an append must leave it
    queries: np.ndarray
    answers: dict[int, Any]  # n_samples -> answers (old store, grown store)


def prepare(
    workdir: Path, checkpoints: list[str], old: str = OLD, new: str = NEW, options: dict | None = None
) -> World:
    """Build the store of ``old``'s rows and a fresh one of ``new``'s (a bigger sweep passes bigger tasks)."""
    import gradindex

    options = OPTIONS if options is None else options
    base = gradindex.build(old, checkpoints, workdir / "base.gradindex", **options)
    whole = gradindex.build(new, checkpoints, workdir / "whole.gradindex", **options)
    queries = np.random.default_rng(5).standard_normal((4, base.dim)).astype(np.float32)
    answers = {base.n_samples: observe(base.path, queries), whole.n_samples: observe(whole.path, queries)}
    return World(
        checkpoints,
        old,
        new,
        options,
        base.n_samples,
        whole.n_samples,
        base.path,
        whole.path,
        snapshot(base.path),
        comparable(whole.path),
        queries,
        answers,
    )


def comparable(path: Path) -> dict[str, bytes]:
    """A store's snapshot with the manifest's ``appended_from`` left out (a fresh build has none)."""
    files = snapshot(path)
    if "zarr.json" in files:
        manifest = json.loads(files["zarr.json"])
        manifest.pop("appended_from", None)
        files["zarr.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def observe(store: Any, queries: np.ndarray) -> tuple:
    """What a user gets from a store: its state, rows, top-k proponents and opponents, self-influence, sample ids."""
    import gradindex

    opened = gradindex.open_store(store) if not isinstance(store, gradindex.GradientStore) else store
    scores, rows = gradindex.search_store(opened, queries, K)
    streaming = gradindex.search.least_memory_budget(opened, len(queries), K)  # streamed, in pieces of one row
    _, opponents = gradindex.search_store(opened, queries, K, opponents=True, memory_budget=streaming)
    self_rows, self_scores = opened.self_influence()
    ids = opened.samples().column("sample_id").to_pylist()
    return (
        opened.complete,
        opened.n_samples,
        rows.tolist(),
        np.round(scores, 3).tolist(),
        opponents.tolist(),
        self_rows.tolist(),
        np.round(self_scores, 3).tolist(),
        ids,
    )


def staging_left(path: Path) -> list[str]:
    """What an append left inside a store: its staging folder, temporaries."""
    return [str(item) for item in Path(path).rglob("*") if item.name == "_append" or ".gi-tmp-" in item.name]


def _staged_stamps(path: Path) -> dict[str, tuple[int, int]]:
    """``{key: (inode, mtime)}`` of the shard files an append has staged (a continued append moves them, same inode)."""
    found = {}
    for array in ("features", "self_influence"):
        for item in (Path(path) / "_append" / array / "c").rglob("*"):
            if item.is_file():
                stat = item.stat()
                found[str(item.relative_to(Path(path) / "_append"))] = (stat.st_ino, stat.st_mtime_ns)
    return found


def check_after_stop(world: World, path: Path, label: str, expected: int | None, figures: Counter, failures: list):
    """A stopped or failed append: the store is complete and old or grown (``expected`` rows when known), answers as
    that store does; the orphan sweep (on a copy) leaves it byte-identical to that store; an append run again
    completes it, equal to a fresh build (continuing what was staged)."""
    import gradindex

    try:
        store = gradindex.open_store(path)
        answers = observe(store, world.queries)
    except Exception as error:
        failures.append(f"{label}: the store does not answer: {type(error).__name__}: {error}")
        return
    rows = store.n_samples
    figures["complete"] += store.complete
    if expected is not None and rows != expected:
        failures.append(f"{label}: the store has {rows} rows, expected {expected}")
    if rows not in world.answers or answers != world.answers[rows]:
        failures.append(f"{label}: queries answer differently from the {rows}-row store")
    else:
        figures["queries as before" if rows == world.old_rows else "queries as grown"] += 1
    swept = path.with_name(path.name + "-swept")
    shutil.copytree(path, swept, symlinks=True)
    gradindex.open_store(swept).sweep_temporaries()
    left = staging_left(swept)
    figures["orphans"] += len(left)
    differing = (
        diff_names(snapshot(swept), world.before)
        if rows == world.old_rows
        else diff_names(comparable(swept), world.grown)
    )
    if differing or left:
        failures.append(f"{label}: after the orphan sweep: differing {differing[:5]}, left {left[:3]}")
    else:
        figures["byte-identical after the sweep"] += 1
    shutil.rmtree(swept, ignore_errors=True)
    staged = _staged_stamps(path)
    try:
        gradindex.build(world.new, world.checkpoints, path, append=True, **world.options)
    except Exception as error:
        failures.append(f"{label}: the append run again failed: {type(error).__name__}: {error}")
        return
    differing = diff_names(comparable(path), world.grown)
    left = staging_left(path)
    if differing or left:
        failures.append(f"{label}: the append run again differs from a fresh build: {differing[:5]}, left {left[:3]}")
    else:
        figures["reruns equal a fresh build"] += 1
    kept = [key for key, stamp in staged.items() if _stamp(path / key) == stamp]
    figures["staged shard files kept by the rerun"] += len(kept)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


# ---- kills ------------------------------------------------------------------------------------------------------


def child_append(spec: str, checkpoints: list[str], output: str, options: dict, crash_at: str | None = None) -> None:
    """``build(append=True)`` in a child process, stopped at crash point ``crash_at`` (exit 137) when given."""
    child_build(spec, checkpoints, output, options, crash_at, append=True)


def append_kill_sweep(
    workdir: Path,
    checkpoints: list[str],
    *,
    sites: Iterable[str] = APPEND_SITES,
    n_random: int = 0,
    seed: int = 0,
    old: str = OLD,
    new: str = NEW,
    options: dict | None = None,
) -> dict:
    """Stop an appending child at each named crash point (and SIGKILL it at ``n_random`` random moments); after each,
    ``check_after_stop``. ``old`` and ``new`` are the task specs of the store's rows and of the grown rows (a site
    with ":N" must exist in that append). Returns ``{"figures", "failures", "append_seconds"}``."""
    world = prepare(workdir, checkpoints, old, new, options)
    rng = random.Random(seed)
    run_child(child_setup)  # start the forkserver first: the timed append below is then an append only
    timing = workdir / "timing.gradindex"
    shutil.copytree(world.base, timing)
    _, full = run_child(child_append, world.new, checkpoints, str(timing), world.options)
    shutil.rmtree(timing, ignore_errors=True)
    sites = list(sites)
    points = [("site", site, None) for site in sites] + [
        ("random", None, rng.uniform(0.0, full)) for _ in range(n_random)
    ]
    figures: Counter = Counter()
    failures: list[str] = []
    for number, (kind, site, when) in enumerate(points):
        path = workdir / f"kill-{number}.gradindex"
        shutil.copytree(world.base, path)
        code, _ = run_child(child_append, world.new, checkpoints, str(path), world.options, site, kill_after=when)
        label = site or f"SIGKILL at {when:.3f}s"
        figures["tried"] += 1
        figures["killed"] += code in (-9, 137)
        expected = None
        if kind == "site":
            if code != 137:
                failures.append(f"{site}: the child exited {code}, not at the crash point")
            name = site.partition(":")[0]
            before_swap = [known.partition(":")[0] for known in APPEND_SITES[:FIRST_AFTER_SWAP]]
            expected = world.old_rows if name in before_swap else world.new_rows
        check_after_stop(world, path, label, expected, figures, failures)
        shutil.rmtree(path, ignore_errors=True)
    return {"figures": dict(figures), "failures": failures, "append_seconds": round(full, 2)}


# ---- I/O errors -----------------------------------------------------------------------------------------------------


def append_io_error_sweep(
    workdir: Path,
    checkpoints: list[str],
    *,
    codes: Iterable[int] = (errno_codes.EIO,),
    every: int = 1,
    old: str = OLD,
    new: str = NEW,
    options: dict | None = None,
) -> dict:
    """Fail the Nth disk-changing step of an append for every N (every ``every``-th), with each errno in ``codes``:
    each failure must be one StoreWriteError carrying it (or the append completes anyway: a best-effort step), and
    then ``check_after_stop``."""
    import gradindex
    from gradindex.store import StoreWriteError
    from gradindex.store.faults import inject_io_errors

    world = prepare(workdir, checkpoints, old, new, options)
    probe = workdir / "count.gradindex"
    shutil.copytree(world.base, probe)
    with inject_io_errors() as counter:
        gradindex.build(world.new, checkpoints, probe, append=True, **world.options)
    steps = counter.count
    shutil.rmtree(probe, ignore_errors=True)
    figures: Counter = Counter()
    failures: list[str] = []
    for code in codes:
        for fail_at in range(1, steps + 1, every):
            path = workdir / f"io-{code}-{fail_at}.gradindex"
            shutil.copytree(world.base, path)
            figures["injected"] += 1
            label = f"errno {code} at step {fail_at}"
            try:
                with inject_io_errors(fail_at, code) as faults:
                    gradindex.build(world.new, checkpoints, path, append=True, **world.options)
                figures["completed anyway"] += 1
            except StoreWriteError as error:
                figures["typed errors"] += error.errno == code
                if error.errno != code:
                    failures.append(f"{label}: the error lacks its errno: {error}")
            except Exception as error:
                failures.append(f"{label} ({faults.failed}): {type(error).__name__}: {error}")
            check_after_stop(world, path, f"{label} ({faults.failed})", None, figures, failures)
            shutil.rmtree(path, ignore_errors=True)
    return {"figures": dict(figures), "failures": failures, "steps": steps}


# ---- a changed history ----------------------------------------------------------------------------------------------


def history_refusals(workdir: Path, checkpoints: list[str], changes: Iterable[tuple] = HISTORY_CHANGES) -> dict:
    """An append whose old rows changed (a sample, the order, the ids' values or type) is refused before it writes
    anything: an IncompatibleStoreError naming the row (or shard and rows) and the fix, the store byte-identical."""
    import gradindex

    store = gradindex.build(OLD, checkpoints, workdir / "history.gradindex", **OPTIONS).path
    before = tree_hash(store)
    figures: Counter = Counter()
    failures: list[str] = []
    for name, factory, pattern in changes:
        figures["tried"] += 1
        try:
            gradindex.build(f"{TASKS}:{factory}", checkpoints, store, append=True, **OPTIONS)
            failures.append(f"{name}: the append was accepted")
        except gradindex.IncompatibleStoreError as error:
            if re.search(pattern, str(error)) and "overwrite=True" in str(error):
                figures["refused, naming the row"] += 1
            else:
                failures.append(f"{name}: the message does not match {pattern!r}: {error}")
        except Exception as error:
            failures.append(f"{name}: {type(error).__name__}: {error}")
        if tree_hash(store) == before:
            figures["byte-identical"] += 1
        else:
            failures.append(f"{name}: the store changed")
    return {"figures": dict(figures), "failures": failures}


# ---- readers while an append runs -----------------------------------------------------------------------------------


def child_append_reader(
    path: str, queries: np.ndarray, answers: dict, old_rows: int, deadline: float, result_path: str, ready_path: str
) -> None:
    """Poll a store an append is growing: every poll must find it complete and answering exactly as the old or the
    grown store does; writes its counts to ``result_path``, and ``ready_path`` once it has seen the old store (the
    append starts only then: nothing here depends on how fast a process starts)."""
    child_setup()
    counts: Counter = Counter()
    problems: list[str] = []
    while time.time() < deadline:
        try:
            seen = observe(path, queries)
        except Exception as error:
            counts["errors"] += 1
            problems.append(f"{type(error).__name__}: {error}")
            continue
        counts["polls"] += 1
        if seen[1] not in answers or seen != answers[seen[1]]:
            counts["wrong answers"] += 1
            problems.append(f"a {seen[1]}-row answer that is neither store's")
        else:
            counts["saw the old store" if seen[1] == old_rows else "saw the grown store"] += 1
            if seen[1] == old_rows:
                Path(ready_path).touch()
            else:
                break
    Path(result_path).write_text(json.dumps({"counts": counts, "problems": problems[:10]}))


def append_reader_run(
    workdir: Path,
    checkpoints: list[str],
    *,
    n_readers: int = 2,
    old: str = OLD,
    new: str = NEW,
    options: dict | None = None,
) -> dict:
    """Readers poll a store while a child appends to it, and store objects opened before the append keep reading
    after it completed: none may see an error or anything but the old store, then the grown one."""
    import gradindex

    world = prepare(workdir, checkpoints, old, new, options)
    path = workdir / "read.gradindex"
    shutil.copytree(world.base, path)
    held = gradindex.open_store(path)
    held_before = observe(held, world.queries)  # reads (and caches) some of its files before the append
    held_unread = gradindex.open_store(path)  # reads nothing before the append
    ctx = context()
    deadline = time.time() + 120
    readers = []
    for number in range(n_readers):
        result, ready = workdir / f"reader-{number}.json", workdir / f"reader-{number}.ready"
        process = ctx.Process(
            target=child_append_reader,
            args=(str(path), world.queries, world.answers, world.old_rows, deadline, str(result), str(ready)),
        )
        process.start()
        readers.append((process, result, ready))
    while time.time() < deadline and not all(ready.exists() for _, _, ready in readers):
        time.sleep(0.05)  # every reader has seen the old store before the append starts
    code, _ = run_child(child_append, world.new, checkpoints, str(path), world.options)
    for process, _, _ in readers:
        process.join(150)
    figures: Counter = Counter()
    problems: list[str] = []
    for _, result, _ in readers:
        outcome = json.loads(result.read_text())
        figures.update(outcome["counts"])
        problems += outcome["problems"]
    figures["appended"] = int(code == 0)
    figures["held readers"] = 2
    if held_before != world.answers[world.old_rows]:
        problems.append("the store opened before the append did not answer as the old store to begin with")
    for name, store in (("read before", held), ("unread before", held_unread)):
        try:
            figures["held readers answering as before"] += int(observe(store, world.queries) == held_before)
        except Exception as error:
            problems.append(f"a store opened before the append ({name}): {type(error).__name__}: {error}")
    fresh = gradindex.open_store(path)
    figures["grown store equals a fresh build"] = int(not diff_names(comparable(path), world.grown))
    figures["grown store answers as a fresh build"] = int(
        observe(fresh, world.queries) == world.answers[world.new_rows]
    )
    return {"figures": dict(figures), "problems": problems}


# ---- overwrite ------------------------------------------------------------------------------------------------------


def _fingerprint_of(location: Any) -> str:
    """What must stay intact: bytes of a file, every name and byte of a folder, where a link points."""
    from gradindex.store import store_path

    path = store_path(location)
    if isinstance(path, Path):
        if path.is_symlink():
            target = path.resolve()
            content = tree_hash(target) if target.is_dir() else target.read_bytes().hex() if target.exists() else ""
            return f"link to {os.readlink(path)}: {content}"
        return tree_hash(path) if path.is_dir() else path.read_bytes().hex()
    names = sorted((str(item.relative_to(path)), item.read_bytes()) for item in path.rglob("*") if item.is_file())
    return repr(names) if path.is_dir() else path.read_bytes().hex()


def overwrite_refusals(workdir: Path, checkpoints: list[str]) -> dict:
    """``overwrite=True`` over what is not a gradindex store -- a regular file, a folder of other files, a symlink (to a
    store, to a file, dangling), a Zarr group of someone else's, locally and at memory:// -- is a StoreExistsError
    naming it, and leaves it as it was; over a store (complete, or with a damaged manifest) or an empty folder it
    builds."""
    import fsspec

    import gradindex

    workdir = Path(workdir)
    store = gradindex.build(OLD, checkpoints, workdir / "target.gradindex", **OPTIONS).path
    (workdir / "notes.txt").write_text("my notes, not a store\n")
    (workdir / "photos").mkdir()
    (workdir / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    (workdir / "zarr-group").mkdir()
    (workdir / "zarr-group" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    (workdir / "link-to-store").symlink_to(store)
    (workdir / "link-to-file").symlink_to(workdir / "notes.txt")
    (workdir / "dangling-link").symlink_to(workdir / "nothing-here")
    memory = fsspec.filesystem("memory")
    prefix = f"/gi-overwrite-{uuid.uuid4().hex[:8]}"
    memory.pipe_file(f"{prefix}/notes.txt", b"remote notes")
    memory.pipe_file(f"{prefix}/photos/a.jpg", b"remote photo")
    refused_cases = {
        "a regular file": workdir / "notes.txt",
        "a folder of other files": workdir / "photos",
        "a Zarr group of someone else's": workdir / "zarr-group",
        "a symlink to a store": workdir / "link-to-store",
        "a symlink to a file": workdir / "link-to-file",
        "a dangling symlink": workdir / "dangling-link",
        "a remote object": f"memory://{prefix}/notes.txt",
        "a remote folder of other files": f"memory://{prefix}/photos",
    }
    figures: Counter = Counter()
    failures: list[str] = []
    store_before = tree_hash(store)
    for name, target in refused_cases.items():
        figures["tried"] += 1
        before = _fingerprint_of(target)
        try:
            gradindex.build(OLD, checkpoints, target, overwrite=True, **OPTIONS)
            failures.append(f"{name}: replaced")
        except gradindex.StoreExistsError as error:
            if str(target) in str(error) and "not a gradindex store" in str(error):
                figures["refused, naming it"] += 1
            else:
                failures.append(f"{name}: the message does not name it: {error}")
        except Exception as error:
            failures.append(f"{name}: {type(error).__name__}: {error}")
        if _fingerprint_of(target) == before:
            figures["left intact"] += 1
        else:
            failures.append(f"{name}: changed")
    if tree_hash(store) != store_before:
        failures.append("the store a refused link pointed to changed")
    # what overwrite=True does replace
    damaged = workdir / "damaged.gradindex"
    shutil.copytree(store, damaged)
    (damaged / "zarr.json").write_bytes((damaged / "zarr.json").read_bytes()[:100])
    (workdir / "empty").mkdir()
    memory_store = f"memory://{prefix}/store.gradindex"
    gradindex.build(OLD, checkpoints, memory_store, **OPTIONS)
    for name, target in {
        "a complete store": store,
        "a store whose manifest is damaged": damaged,
        "an empty folder": workdir / "empty",
        "a remote store": memory_store,
    }.items():
        figures["stores tried"] += 1
        try:
            replaced = gradindex.build(OLD, checkpoints, target, overwrite=True, **OPTIONS)
            figures["stores replaced"] += replaced.complete
        except Exception as error:
            failures.append(f"{name}: not replaced: {type(error).__name__}: {error}")
    memory.rm(prefix, recursive=True)
    return {"figures": dict(figures), "failures": failures}
