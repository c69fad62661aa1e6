"""A failing disk: every disk-changing step of a build (mkdir, open, write, fsync, link, rename, fsync of
the folder, unlink) fails in turn with EIO and with ENOSPC. Each failure is one typed error
(StoreWriteError, an OSError carrying the errno, naming the file and the fix) -- or, where the step is
best-effort cleanup after the store is complete, a warning; the store reopens; a resume finishes it
byte-identical to an uninterrupted build with no temporary file left (guarantees 1, 3)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from reliability import harness

import gradindex
from gradindex.store import StoreWriteError
from gradindex.store.faults import inject_io_errors


def test_every_write_step_fails_cleanly(env, capsys):
    work = env.fresh("io")
    reference = gradindex.build(harness.IO, env.checkpoints, work / "reference.gradindex", **harness.IO_OPTIONS)
    result = harness.io_error_sweep(
        work, harness.IO, env.checkpoints, harness.IO_OPTIONS, harness.snapshot(reference.path)
    )
    figures = result["figures"]
    injected = figures["injected"]
    harness.report(
        capsys,
        (
            f"I/O errors (EIO and ENOSPC at each of the {result['steps']} disk steps of a 3-shard build): injected "
            f"{injected}, "
            f"clean typed errors {figures.get('typed errors', 0)}/{injected - figures.get('completed anyway', 0)} "
            f"(+{figures.get('completed anyway', 0)} in best-effort cleanup, build complete), "
            f"reopen {figures.get('reopened', 0)}/{injected}, resume {figures.get('resumed', 0)}/{injected}, "
            f"mismatches {figures.get('mismatches', 0)}, orphans {figures.get('orphans', 0)}"
        ),
    )
    assert result["failures"] == []
    assert figures.get("untyped errors", 0) == 0
    assert figures["typed errors"] + figures.get("completed anyway", 0) == injected == 2 * result["steps"]
    assert figures["reopened"] == figures["resumed"] == injected
    assert figures.get("mismatches", 0) == figures.get("orphans", 0) == 0
    # every kind of step was hit
    assert set(result["step_kinds"]) == {"mkdir", "open", "write", "fsync", "link", "rename", "fsync-dir", "unlink"}


def test_a_full_disk_stops_the_build_with_the_fix(env, capsys):
    """A disk that fills up after the first shard and stays full: one clear error, the finished shard kept."""
    work = env.fresh("io-full")
    with inject_io_errors() as steps:
        gradindex.build(harness.IO, env.checkpoints, work / "count.gradindex", **harness.IO_OPTIONS)
    first_record = next(
        number
        for number, (step, path) in enumerate(steps.steps, 1)
        if step == "rename" and path.endswith("000000.json")
    )
    output = work / "full.gradindex"
    with (
        inject_io_errors(first_record + 5, errno.ENOSPC, sticky=True),
        pytest.raises(StoreWriteError, match=r"\[Errno 28\] No space left on device.*resume=True") as raised,
    ):
        gradindex.build(harness.IO, env.checkpoints, output, **harness.IO_OPTIONS)
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)
    store = gradindex.open_store(output)
    kept = store.done_shards()
    assert not store.complete and kept == [0]  # the shard finished before the disk filled is there
    store = gradindex.build(harness.IO, env.checkpoints, output, resume=True, **harness.IO_OPTIONS)
    assert store.complete and harness.orphans(output) == []
    harness.report(
        capsys,
        f"disk full from step {first_record + 5} on: typed error 1/1 (errno {raised.value.errno}), "
        f"finished shards kept {kept}, resumed 1/1, orphans 0",
    )


def test_writes_are_temporary_name_fsync_rename_fsync_dir(env, capsys):
    """Guarantee 1, read off the disk steps of a build: no final path is ever opened for writing; each
    is reached by renaming a temporary file that was written and fsynced, and the rename is followed
    by an fsync of its folder."""
    work = env.fresh("io-steps")
    with inject_io_errors() as steps:
        gradindex.build(harness.IO, env.checkpoints, work / "s.gradindex", **harness.IO_OPTIONS)
    log = steps.steps
    opened = [path for step, path in log if step == "open"]
    assert opened and all(".gi-tmp-" in path for path in opened)

    def temporary_steps(path: str, position: int) -> list[str]:
        """The steps on the temporary file put at ``path`` by step ``position`` (the last one written before it; the
        steps of other files, a shard's rows streamed on the background thread, may come in between). A temporary is
        ``path``'s sibling; a shard's features file (``features/c/S/0``) is streamed to one in the build folder,
        beside the shard's claim (``_shards/S.features``, S in 6 digits)."""
        names = [path + ".gi-tmp-"]
        parts = Path(path).parts
        if parts[-4:-2] == ("features", "c"):
            names.append(str(Path(*parts[:-4], "_shards", f"{int(parts[-2]):06d}.features.gi-tmp-")))
        steps: dict[str, list[tuple[int, str]]] = {}
        for number, (step, name) in enumerate(log[:position]):
            if name.startswith(tuple(names)):
                steps.setdefault(name, []).append((number, step))
        latest = max(steps.values(), key=lambda entries: entries[-1][0])
        return [step for _, step in latest]

    renames = 0
    for position, (step, path) in enumerate(log):
        if step == "rename" and ".gi-tmp-" not in path and not path.endswith(".gradindex"):
            renames += 1
            before = temporary_steps(path, position)
            # opened, written (a shard's features file: a write per block of rows as they come), fsynced
            assert before[0] == "open" and set(before[1:-1]) == {"write"} and before[-1] == "fsync", (path, before)
            folder = str(Path(path).parent)
            assert next(step for step, name in log[position + 1 :] if name == folder) == "fsync-dir", path
        if step == "link":  # claims: written whole, then linked (fails if taken)
            assert temporary_steps(path, position) == ["open", "write", "fsync"]
    assert renames >= 3 * 4  # features, self-influence, samples part and record of each shard
    links = sum(step == "link" for step, _ in log)
    harness.report(
        capsys,
        f"write protocol: final files {renames}, each open+write+fsync of a temporary, rename, fsync of the folder: "
        f"{renames}/{renames}; claims written then linked {links}; final paths opened for writing 0",
    )
