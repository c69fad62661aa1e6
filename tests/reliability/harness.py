"""The fault-injection harness: kill sweeps, I/O-error sweeps, concurrency, corruption, all measured.

The tests in this folder run each sweep small enough for CI; ``benchmarks/reliability/sweep.py``
runs the same functions with more points and bigger stores and records their figures.

Child processes come from a ``forkserver`` that has already imported gradindex, torch and zarr, so a
build starts in milliseconds and can be killed (SIGKILL) at any moment or stopped at a named crash
point (``GRADINDEX_CRASH_AT``). Every resumed store is compared byte for byte with a reference build.
"""

from __future__ import annotations

import errno as errno_codes
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
TASKS = str(HERE / "rel_tasks.py")
TMP_MARKS = (".gi-tmp-", ".gi-idx-tmp-")

# A store built in about a second: 20 shards of 1000 rows, exact (unprojected) vectors of one checkpoint.
BIG = f"{TASKS}:big_task"
BIG_OPTIONS = {"projection": "none", "rows_per_shard": 1000, "batch_size": 1000, "progress": False}
IO = f"{TASKS}:io_task"
IO_OPTIONS = {"projection": "none", "rows_per_shard": 100, "batch_size": 100, "progress": False}
SMALL = f"{TASKS}:small_task"
SMALL_OPTIONS = {"projection": "none", "rows_per_shard": 100, "batch_size": 100, "progress": False}

# Named crash points of a build, in the order a build passes them (":N" = the Nth time).
BUILD_SITES = (
    "create-before-rename",
    "shard-before-rename",
    "shard-after-features",
    "shard-before-record",
    "shard-after-record",
    "shard-before-rename:7",
    "shard-after-features:12",
    "shard-before-record:19",
    "shard-after-record:20",
    "finalize-before-manifest",
    "finalize-after-manifest",
    "finalize-cleanup",
)


# ---- child processes --------------------------------------------------------------------------

_CONTEXT = None


def context() -> Any:
    """A forkserver context whose server has gradindex, torch and zarr imported (children start in ms)."""
    global _CONTEXT
    if _CONTEXT is None:
        if str(HERE.parent) not in sys.path:  # the forkserver imports this module as reliability.harness
            sys.path.insert(0, str(HERE.parent))
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(
            [
                "torch",
                "torch._dynamo",
                "torch.func",
                "zarr",
                "faiss",
                "gradindex",
                "gradindex.pipeline",
                "reliability.harness",
                "reliability.rel_tasks",
            ]
        )
    return _CONTEXT


def stop_children() -> None:
    """Stop the forkserver (and so reap it: the CPU time of every child then counts in this process's)."""
    global _CONTEXT
    if _CONTEXT is not None:
        import multiprocessing.forkserver

        stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
        if stop is not None:
            stop()
        _CONTEXT = None


def child_setup() -> None:
    """Children run tiny models: one torch thread is fastest (and several children share the cores)."""
    import torch

    torch.set_num_threads(1)


def write_shard(store: Any, shard: int, vectors: np.ndarray, owner: str) -> None:
    """Claim and write one shard of ``vectors`` (rows of that shard only; self-influence their squared norms)."""
    import pyarrow as pa

    start, stop = store.layout.shard_rows(shard)
    samples = pa.table(
        {"row": np.arange(start, stop, dtype=np.int64), "sample_id": [f"z{row}" for row in range(start, stop)]}
    )
    store.claim_shard(shard, owner=owner)
    store.write_shard(shard, vectors, (vectors.astype(np.float64) ** 2).sum(1).astype(np.float32), samples)


def child_write_shard(path: str, shard: int, vectors: np.ndarray, site: str) -> None:
    """A shard writer that stops at crash point ``site`` (exit 137), like a kill -9 there; exit 1 when refused."""
    child_setup()
    os.environ["GRADINDEX_CRASH_AT"] = site
    from gradindex import ShardOwnershipError
    from gradindex.store import open_store

    try:
        write_shard(open_store(path), shard, vectors, owner=f"child-{os.getpid()}")
    except ShardOwnershipError:
        os._exit(1)  # refused: the shard is finished
    os._exit(0)  # only when the site was never reached


def child_index(store: str, name: str, factory: str, site: str) -> None:
    """``gradindex index --overwrite`` stopped at ``site``: after writing the index file under its temporary name
    (``before-rename``), halfway through writing it (``torn-temporary``), or before its meta (``before-meta``)."""
    child_setup()
    import faiss

    import gradindex

    if site in ("before-rename", "torn-temporary"):
        write = faiss.write_index

        def write_then_die(index, path):
            write(index, path)
            if site == "torn-temporary":
                os.truncate(path, os.path.getsize(path) // 2)
            os._exit(137)

        faiss.write_index = write_then_die
    elif site == "before-meta":
        os.environ["GRADINDEX_CRASH_AT"] = "index-before-meta"
    gradindex.build_index(store, factory, name=name, overwrite=True, progress=False)


def child_build(
    spec: str, checkpoints: list[str], output: str, options: dict, crash_at: str | None = None, **kwargs: Any
) -> None:
    """A build in a child process; ``crash_at`` names a crash point (the child exits 137 there)."""
    child_setup()
    if crash_at:
        os.environ["GRADINDEX_CRASH_AT"] = crash_at
    else:
        os.environ.pop("GRADINDEX_CRASH_AT", None)
    import gradindex

    try:
        gradindex.build(spec, checkpoints, output, **options, **kwargs)
    except Exception as error:  # reported through the exit code and stderr
        print(f"child build failed: {type(error).__name__}: {error}", file=sys.stderr)
        os._exit(3)


def run_child(
    target: Callable, *args: Any, kill_after: float | None = None, timeout: float = 300.0
) -> tuple[int | None, float]:
    """Run ``target(*args)`` in a forked child; SIGKILL it after ``kill_after`` seconds. ``(exit code, seconds)``.

    The child is always reaped (a zombie would still count as a live writer for the claims)."""
    process = context().Process(target=target, args=args)
    started = time.perf_counter()
    process.start()
    if kill_after is not None:
        process.join(kill_after)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode, time.perf_counter() - started


# ---- looking at stores --------------------------------------------------------------------------


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a store by relative path; the manifest without its timestamps and checksum."""
    path = Path(path)
    files = {}
    for item in sorted(path.rglob("*")):
        if not item.is_file():
            continue
        name = str(item.relative_to(path))
        if name == "zarr.json":
            group = json.loads(item.read_bytes())
            manifest = dict(group["attributes"]["gradindex"])
            for key in ("created_at", "completed_at"):
                manifest.pop(key, None)
            files[name] = json.dumps(manifest, sort_keys=True).encode()
        else:
            files[name] = item.read_bytes()
    return files


def tree_hash(path: Path) -> str:
    """sha256 over every name and byte under ``path`` (for 'unchanged' checks)."""
    digest = hashlib.sha256()
    path = Path(path)
    if not path.exists():
        return "absent"
    for item in sorted(path.rglob("*")):
        digest.update(str(item.relative_to(path)).encode() + b"\0")
        if item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def orphans(path: Path) -> list[str]:
    """Temporary files left in or beside a store, and the build folder of a complete store."""
    path = Path(path)
    found = [str(item) for item in path.parent.glob(f"{path.name}.gi-*")]
    if path.exists():
        found += [str(item) for item in path.rglob("*") if any(mark in item.name for mark in TMP_MARKS)]
        manifest = _manifest(path)
        if manifest and manifest.get("state") == "complete" and (path / "_shards").exists():
            found.append(str(path / "_shards"))
    return found


def _manifest(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / "zarr.json").read_bytes())["attributes"]["gradindex"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finished_shards(path: Path) -> dict[int, tuple[int, int]]:
    """``{shard: (inode, mtime_ns)}`` of the features file of every shard recorded as done."""
    path = Path(path)
    manifest = _manifest(path)
    if manifest is None:
        return {}
    if manifest.get("state") == "complete":
        shards = range(len(manifest["shards"]))
    else:
        shards = [int(item.stem) for item in (path / "_shards").glob("*.json")]
    found = {}
    for shard in shards:
        stat = (path / "features" / "c" / str(shard) / "0").stat()
        found[shard] = (stat.st_ino, stat.st_mtime_ns)
    return found


def diff_names(left: dict[str, bytes], right: dict[str, bytes]) -> list[str]:
    return sorted(name for name in set(left) | set(right) if left.get(name) != right.get(name))


# ---- kill sweep ----------------------------------------------------------------------------------


def kill_sweep(
    workdir: Path,
    spec: str,
    checkpoints: list[str],
    options: dict,
    reference: dict[str, bytes],
    *,
    n_random: int,
    sites: Iterable[str],
    seed: int = 0,
    rows_per_shard: int,
) -> dict:
    """Kill a child build at ``n_random`` random moments and at each named crash ``site``; resume each in
    this process and compare with ``reference``. Returns the figures (and the failures, if any)."""
    import gradindex

    rng = random.Random(seed)
    run_child(child_setup)  # start the forkserver first: the timed build below is then a build only
    _, full = run_child(child_build, spec, checkpoints, str(workdir / "timing.gradindex"), options)
    shutil.rmtree(workdir / "timing.gradindex", ignore_errors=True)
    points = [("random", None, rng.uniform(0.0, full)) for _ in range(n_random)] + [
        ("site", site, None) for site in sites
    ]
    figures = Counter()
    failures = []
    for number, (kind, site, when) in enumerate(points):
        output = workdir / f"kill-{number}.gradindex"
        code, _ = run_child(child_build, spec, checkpoints, str(output), options, site, kill_after=when)
        figures["tried"] += 1
        figures["killed"] += code in (-signal.SIGKILL, 137)
        if kind == "site" and code != 137:
            failures.append(f"{site}: the child exited {code}, not at the crash point")
        before = finished_shards(output)
        try:
            if output.exists():
                gradindex.open_store(output)  # reopens cleanly, complete or not
            store = gradindex.build(spec, checkpoints, output, resume=True, **options)
        except Exception as error:
            failures.append(f"{kind} {site or f'{when:.3f}s'}: resume failed: {type(error).__name__}: {error}")
            continue
        figures["resumed"] += store.complete
        after = finished_shards(output)
        lost = [shard for shard, stamp in before.items() if after.get(shard) != stamp]
        figures["rows lost"] += len(lost) * rows_per_shard
        left = orphans(output)
        figures["orphans"] += len(left)
        differing = diff_names(snapshot(output), reference)
        figures["mismatches"] += bool(differing)
        if lost or left or differing:
            failures.append(
                f"{kind} {site or f'{when:.3f}s'}: lost shards {lost}, orphans {left}, differing files {differing[:5]}"
            )
        shutil.rmtree(output, ignore_errors=True)
    return {"figures": dict(figures), "failures": failures, "build_seconds": round(full, 2)}


# ---- I/O errors ------------------------------------------------------------------------------------


def io_error_sweep(
    workdir: Path,
    spec: str,
    checkpoints: list[str],
    options: dict,
    reference: dict[str, bytes],
    *,
    codes: Iterable[int] = (errno_codes.EIO, errno_codes.ENOSPC),
    every: int = 1,
    sticky: bool = False,
) -> dict:
    """Fail the Nth disk-changing step of a build for every N (every ``every``-th N), with each errno in ``codes``.

    Each failure must be a StoreWriteError carrying that errno (or, for a best-effort step, the build
    completes anyway); the store must then reopen, and a resume must give the reference bytes with no
    orphans."""
    import gradindex
    from gradindex.store import StoreWriteError
    from gradindex.store.faults import inject_io_errors

    probe = workdir / "count.gradindex"
    with inject_io_errors() as counter:
        gradindex.build(spec, checkpoints, probe, **options)
    steps = counter.count
    step_kinds = Counter(step for step, _ in counter.steps)
    shutil.rmtree(probe, ignore_errors=True)
    figures = Counter()
    failures = []
    for code in codes:
        for fail_at in range(1, steps + 1, every):
            output = workdir / f"io-{code}-{fail_at}.gradindex"
            figures["injected"] += 1
            try:
                with inject_io_errors(fail_at, code, sticky=sticky) as faults:
                    gradindex.build(spec, checkpoints, output, **options)
                figures["completed anyway"] += 1  # the fault hit a best-effort step (cleanup)
            except StoreWriteError as error:
                if error.errno == code and str(code) in str(error) and "resume=True" in str(error):
                    figures["typed errors"] += 1
                else:
                    failures.append(f"errno {code} at step {fail_at}: error lacks its errno or fix: {error}")
            except Exception as error:
                failures.append(f"errno {code} at step {fail_at} ({faults.failed}): {type(error).__name__}: {error}")
                figures["untyped errors"] += 1
            try:
                if output.exists():
                    gradindex.open_store(output)
                figures["reopened"] += 1
                store = gradindex.build(spec, checkpoints, output, resume=True, **options)
                figures["resumed"] += store.complete
            except Exception as error:
                failures.append(
                    f"errno {code} at step {fail_at} ({faults.failed}): reopen/resume failed: {type(error).__name__}: "
                    f"{error}"
                )
                continue
            left = orphans(output)
            differing = diff_names(snapshot(output), reference)
            figures["orphans"] += len(left)
            figures["mismatches"] += bool(differing)
            if left or differing:
                failures.append(
                    f"errno {code} at step {fail_at} ({faults.failed}): orphans {left}, differing {differing[:5]}"
                )
            shutil.rmtree(output, ignore_errors=True)
    return {"figures": dict(figures), "failures": failures, "steps": steps, "step_kinds": dict(step_kinds)}


# ---- concurrency ------------------------------------------------------------------------------------


def child_reader(output: str, reference_path: str, deadline: float, result_path: str) -> None:
    """Poll a store being built: every shard it shows as done must equal the reference; "complete" must
    mean every shard is there and right. Writes its counts to ``result_path``."""
    import gradindex
    from gradindex import GradIndexError

    child_setup()
    reference = gradindex.open_store(reference_path)
    expected = {shard: reference.read_shard(shard) for shard in range(reference.n_shards)}
    counts = Counter()
    problems = []
    while time.time() < deadline:
        if not Path(output).exists():
            time.sleep(0.005)
            continue
        try:
            store = gradindex.open_store(output)
        except GradIndexError as error:
            problems.append(f"open: {error}")
            continue
        counts["polls"] += 1
        time.sleep(0.002)  # leave the cores to the writers
        if store.complete:
            counts["saw complete"] += 1
            good = all(np.array_equal(store.read_shard(shard), expected[shard]) for shard in range(store.n_shards))
            if not good or store.verify():
                counts["complete too early"] += 1
                problems.append(f"complete but verify says {store.verify()[:3]}")
            break
        try:
            for shard in store.done_shards():
                counts["shard reads"] += 1
                if not np.array_equal(store.read_shard(shard, allow_incomplete=True), expected[shard]):
                    counts["wrong shards seen"] += 1
                    problems.append(f"shard {shard} differs from the reference while building")
        except GradIndexError as error:
            # the store may complete under our feet (its build files go away): not an error of the store
            if not gradindex.open_store(output).complete:
                counts["read errors"] += 1
                problems.append(f"read while building: {type(error).__name__}: {error}")
    Path(result_path).write_text(json.dumps({"counts": counts, "problems": problems[:10]}))


def child_worker(
    spec: str, checkpoints: list[str], output: str, options: dict, shard: tuple[int, int], result_path: str
) -> None:
    import gradindex

    child_setup()
    try:
        store = gradindex.build(spec, checkpoints, output, shard=shard, **options)
        outcome = {"ok": True, "complete": store.complete}
    except Exception as error:
        outcome = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    Path(result_path).write_text(json.dumps(outcome))


def child_intruder(output: str, shard: int, result_path: str) -> None:
    """Try to claim a shard a live writer holds."""
    import gradindex

    store = gradindex.open_store(output)
    try:
        store.claim_shard(shard, owner="intruder")
        outcome = {"rejected": False}
    except gradindex.ShardOwnershipError as error:
        outcome = {"rejected": True, "message": str(error)}
    Path(result_path).write_text(json.dumps(outcome))


def concurrency_run(
    workdir: Path,
    spec: str,
    checkpoints: list[str],
    options: dict,
    reference_path: Path,
    *,
    n_workers: int,
    n_readers: int,
) -> dict:
    """``n_workers`` processes build disjoint shards of one store while ``n_readers`` poll it; then a
    misaligned worker (other rows per shard) and an intruder (claiming a held shard) must be rejected."""
    import gradindex

    output = workdir / "shared.gradindex"
    ctx = context()
    deadline = time.time() + 240
    readers = []
    for number in range(n_readers):
        result = workdir / f"reader-{number}.json"
        process = ctx.Process(target=child_reader, args=(str(output), str(reference_path), deadline, str(result)))
        process.start()
        readers.append((process, result))
    workers = []
    for number in range(n_workers):
        result = workdir / f"worker-{number}.json"
        process = ctx.Process(
            target=child_worker, args=(spec, checkpoints, str(output), options, (number, n_workers), str(result))
        )
        process.start()
        workers.append((process, result))
    # a worker cutting other shards, once the store exists: rejected (it must not write anything)
    while not output.exists() and any(process.is_alive() for process, _ in workers):
        time.sleep(0.005)
    misaligned = workdir / "misaligned.json"
    bad_options = {**options, "rows_per_shard": options["rows_per_shard"] // 2}
    run_child(child_worker, spec, checkpoints, str(output), bad_options, (0, n_workers), str(misaligned))
    for process, _ in workers:
        process.join(240)
    for process, _ in readers:
        process.join(240)
    worker_results = [json.loads(result.read_text()) for _, result in workers]
    reader_results = [json.loads(result.read_text()) for _, result in readers]
    misaligned_result = json.loads(misaligned.read_text())

    # an intruder on a shard held by a live writer (this process) is rejected
    store = gradindex.open_store(output)
    figures = Counter()
    held = gradindex.store.create_store(workdir / "held.gradindex", store.layout, {})
    held.claim_shard(3, owner="holder")
    intruder = workdir / "intruder.json"
    run_child(child_intruder, str(workdir / "held.gradindex"), 3, str(intruder))
    intruder_result = json.loads(intruder.read_text())

    for outcome in reader_results:
        figures.update(outcome["counts"])
    figures["workers ok"] = sum(result["ok"] for result in worker_results)
    figures["completed by a worker"] = sum(result.get("complete", False) for result in worker_results)
    figures["misaligned rejected"] = int(
        not misaligned_result["ok"] and "layout.rows_per_shard" in misaligned_result["error"]
    )
    figures["intruder rejected"] = int(intruder_result["rejected"])
    differing = diff_names(snapshot(output), snapshot(reference_path))
    figures["mismatches"] = int(bool(differing))
    figures["orphans"] = len(orphans(output))
    problems = [problem for outcome in reader_results for problem in outcome["problems"]]
    problems += [result["error"] for result in worker_results if not result["ok"]]
    return {
        "figures": dict(figures),
        "problems": problems,
        "misaligned": misaligned_result,
        "intruder": intruder_result,
        "differing": differing[:5],
    }


def child_raw_zarr_writer(path: str, start_event: Any, parity: int, n_rows: int, rows_per_write: int) -> None:
    """Write every other block of rows of a plain zarr array (one shard for all rows), block by block."""
    import zarr

    array = zarr.open_array(path, mode="r+")
    start_event.wait()
    for first in range(parity * rows_per_write, n_rows, 2 * rows_per_write):
        stop = min(n_rows, first + rows_per_write)
        array[first:stop] = np.full((stop - first, array.shape[1]), 1.0 + first, dtype=np.float32)


def raw_zarr_control(
    workdir: Path, *, n_rows: int = 200_000, dim: int = 4, rows_per_write: int = 4000, attempts: int = 3
) -> dict:
    """The control: two plain-zarr writers on disjoint rows of one shared shard. Rows silently lost, both exit 0."""
    import zarr

    ctx = context()
    results = []
    for attempt in range(attempts):
        path = workdir / f"raw-{attempt}.zarr"
        zarr.create_array(
            str(path),
            shape=(n_rows, dim),
            chunks=(rows_per_write, dim),
            shards=(n_rows, dim),
            dtype="float32",
            fill_value=0,
        )
        start = ctx.Event()
        writers = [
            ctx.Process(target=child_raw_zarr_writer, args=(str(path), start, parity, n_rows, rows_per_write))
            for parity in (0, 1)
        ]
        for process in writers:
            process.start()
        start.set()
        for process in writers:
            process.join(240)
        values = np.asarray(zarr.open_array(str(path), mode="r")[:])
        expected = (
            np.repeat(1.0 + (np.arange(n_rows) // rows_per_write) * rows_per_write, dim)
            .reshape(n_rows, dim)
            .astype(np.float32)
        )
        lost = int((~(values == expected).all(axis=1)).sum())
        results.append({"rows": n_rows, "lost": lost, "exit codes": [process.exitcode for process in writers]})
        shutil.rmtree(path, ignore_errors=True)
        if lost:
            break
    return results[-1] | {"attempts": len(results)}


# ---- corruption ---------------------------------------------------------------------------------

MUTATIONS = ("truncate-half", "truncate-last-byte", "truncate-empty", "bit-flip", "zero-fill", "delete")


def mutate(path: Path, mutation: str, rng: random.Random) -> str:
    """Damage one file in place; returns a description (the byte touched)."""
    data = bytearray(path.read_bytes())
    if mutation == "delete":
        path.unlink()
        return "deleted"
    if mutation == "truncate-half":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return f"cut to {len(data) // 2} of {len(data)} bytes"
    if mutation == "truncate-last-byte":
        path.write_bytes(bytes(data[:-1]))
        return f"cut to {len(data) - 1} bytes"
    if mutation == "truncate-empty":
        path.write_bytes(b"")
        return "emptied"
    if not data:
        path.write_bytes(b"\0")
        return "was empty; one zero byte written"
    if mutation == "bit-flip":
        position, bit = rng.randrange(len(data)), rng.randrange(8)
        data[position] ^= 1 << bit
        path.write_bytes(bytes(data))
        return f"bit {bit} of byte {position} flipped"
    if mutation == "zero-fill":
        start = rng.randrange(len(data))
        stop = min(len(data), start + max(1, len(data) // 8))
        if not any(data[start:stop]):
            data[start] = 0xFF  # zero-filling zeros would change nothing
        else:
            data[start:stop] = bytes(stop - start)
        path.write_bytes(bytes(data))
        return f"bytes {start}..{stop} zeroed"
    raise ValueError(mutation)


def file_kind(name: str) -> str:
    if ".gi-tmp-" in name:  # a dead writer's unfinished file (a shard's features streamed to its temporary name)
        return "temporary"
    if name == "zarr.json":
        return "manifest"
    if name.endswith("/zarr.json"):
        return "array metadata"
    if name.startswith("features/c/"):
        return "feature shard"
    if name.startswith("self_influence/c/"):
        return "self-influence chunk"
    if name == "samples.parquet":
        return "samples.parquet"
    if name.startswith("_shards/") and name.endswith(".json"):
        return "shard record"
    if name.startswith("_shards/") and name.endswith(".parquet"):
        return "sample part"
    if name.startswith("_shards/") and name.endswith(".claim"):
        return "claim"
    if name.startswith("indexes/") and name.endswith(".json"):
        return "index meta"
    if name.startswith("indexes/"):
        return "index data"
    return "other"


def observe(path: Path, queries: np.ndarray, k: int, *, complete: bool, index_name: str | None) -> dict[str, Any]:
    """What a user gets from a store: each operation's answer, or the type of error it raised."""
    import gradindex
    from gradindex import GradIndexError

    answers: dict[str, Any] = {}

    def attempt(name: str, call: Callable[[], Any]) -> None:
        try:
            answers[name] = ("ok", call())
        except GradIndexError as error:
            answers[name] = ("error", f"{type(error).__name__}: {error}")
        except Exception as error:
            answers[name] = ("crash", f"{type(error).__name__}: {error}")

    allow = not complete
    attempt("open", lambda: gradindex.open_store(path).complete)
    attempt("progress", lambda: tuple(gradindex.open_store(path).done_shards()))
    attempt("verify", lambda: tuple(gradindex.verify(path)))
    attempt(
        "search",
        lambda: tuple(
            np.round(part, 3).tolist() for part in gradindex.search_store(path, queries, k, allow_incomplete=allow)
        ),
    )
    attempt(
        "opponents",
        lambda: tuple(
            np.round(part, 3).tolist()
            for part in gradindex.search_store(
                path,
                queries,
                k,
                opponents=True,
                memory_budget=gradindex.search.least_memory_budget(path, len(queries), k),  # streamed, row by row
                allow_incomplete=allow,
            )
        ),
    )
    attempt("self-influence", lambda: gradindex.self_influence(path, allow_incomplete=allow).to_pylist())
    attempt("samples", lambda: gradindex.open_store(path).samples(allow_incomplete=allow).to_pylist())
    if index_name is not None:
        attempt(
            "index search",
            lambda: tuple(
                np.round(part, 3).tolist() for part in gradindex.search_store(path, queries, k, index=index_name)
            ),
        )
    return answers


def classify(
    answers: dict[str, Any], reference: dict[str, Any], declared: Callable[[tuple], dict] | None = None
) -> str:
    """One outcome per mutation: crash, silently wrong, clean error (someone reported it) or harmless.

    ``declared(done_shards)`` gives the pristine answers over fewer finished shards: a store being built
    that has lost a shard record answers for the shards it still declares finished (its progress says
    so, and a resume redoes the shard) -- that is "record lost", not a wrong answer."""
    if any(status == "crash" for status, _ in answers.values()):
        return "crash"
    # an answer that differs from the pristine store's, given without an error, is silently wrong --
    # unless it is verify's (reporting problems is its job)
    skip = ("verify", "progress")
    wrong = [
        name
        for name, (status, value) in answers.items()
        if status == "ok" and name not in skip and value != reference[name][1]
    ]
    if (
        wrong
        and declared is not None
        and answers["progress"][0] == "ok"
        and answers["progress"][1] != reference["progress"][1]
    ):
        fewer = declared(answers["progress"][1])
        if all(status != "ok" or name in skip or value == fewer[name][1] for name, (status, value) in answers.items()):
            return "record lost"
    if wrong:
        return "silently wrong"
    errors = [name for name, (status, _) in answers.items() if status == "error"]
    reported = answers["verify"][0] == "ok" and answers["verify"][1] != reference["verify"][1]
    if errors or reported:
        return "clean error"
    return "harmless"


def corruption_matrix(
    pristine: Path,
    workdir: Path,
    queries: np.ndarray,
    k: int,
    *,
    mutations: Iterable[str] = MUTATIONS,
    flips_per_file: int = 1,
    seed: int = 0,
    index_name: str | None = None,
    repair: Callable[[Path], None] | None = None,
    repaired_bytes: dict[str, bytes] | None = None,
    select: Callable[[str], bool] | None = None,
) -> dict:
    """Damage every file of ``pristine`` (a copy each time) with every mutation; classify what users see.

    With ``repair`` (a function running ``build --resume --repair`` on a path), also count the damaged
    stores that it brings back to ``repaired_bytes`` (default: the pristine bytes)."""
    import gradindex

    rng = random.Random(seed)
    complete = gradindex.open_store(pristine).complete
    reference = observe(pristine, queries, k, complete=complete, index_name=index_name)
    assert all(status == "ok" for status, _ in reference.values()), reference
    pristine_bytes = repaired_bytes if repaired_bytes is not None else snapshot(pristine)
    names = sorted(str(item.relative_to(pristine)) for item in pristine.rglob("*") if item.is_file())
    figures = Counter()
    by_kind: dict[str, Counter] = {}
    findings = []
    number = 0
    declared_cache: dict[tuple, dict] = {}

    def declared(done: tuple) -> dict:
        """The pristine answers of the store had only ``done`` shards been recorded."""
        if done not in declared_cache:
            fewer = workdir / f"declared-{len(declared_cache)}.gradindex"
            shutil.copytree(pristine, fewer)
            for record in (fewer / "_shards").glob("*.json"):
                if int(record.stem) not in done:
                    record.unlink()
            declared_cache[done] = observe(fewer, queries, k, complete=False, index_name=index_name)
            shutil.rmtree(fewer)
        return declared_cache[done]

    for name in names:
        if select is not None and not select(name):
            continue
        for mutation in mutations:
            for _ in range(flips_per_file if mutation in ("bit-flip", "zero-fill") else 1):
                number += 1  # a new path each time: nothing cached for one copy may serve another
                target = workdir / f"damaged-{number}.gradindex"
                shutil.copytree(pristine, target)
                what = mutate(target / name, mutation, rng)
                answers = observe(target, queries, k, complete=complete, index_name=index_name)
                outcome = classify(answers, reference, None if complete else declared)
                figures["mutations"] += 1
                figures[outcome] += 1
                kind = file_kind(name)
                by_kind.setdefault(kind, Counter())[outcome] += 1
                if outcome in ("crash", "silently wrong"):
                    findings.append(
                        {
                            "file": name,
                            "mutation": what,
                            "outcome": outcome,
                            "answers": {key: value[0] + ": " + str(value[1])[:200] for key, value in answers.items()},
                        }
                    )
                if repair is not None and outcome == "clean error" and kind not in ("index data", "index meta"):
                    try:
                        repair(target)
                        restored = not diff_names(snapshot(target), pristine_bytes)
                    except gradindex.GradIndexError:
                        restored = False
                    figures["repair tried"] += 1
                    figures["repaired"] += restored
                    by_kind[kind]["repaired"] += restored
                shutil.rmtree(target, ignore_errors=True)
    return {
        "figures": dict(figures),
        "by_kind": {kind: dict(counts) for kind, counts in by_kind.items()},
        "findings": findings,
    }


def report(capsys: Any, line: str) -> None:
    """Print a test's summary line past pytest's capture, so that it shows in every run."""
    with capsys.disabled():
        print(f"\n{line}", flush=True)


def summary(name: str, figures: dict, order: Iterable[str]) -> str:
    """One line: ``name: key value, key value, ...`` in the given order (missing keys read 0)."""
    return f"{name}: " + ", ".join(f"{key} {figures.get(key, 0)}" for key in order)
