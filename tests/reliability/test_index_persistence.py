"""Guarantee 8: a persisted FAISS index is written to a temporary name and renamed, its meta last; it is
checked on load against its meta and the store (ntotal, d, metric); FAISS failures are gradindex errors.
Here a process building an index is stopped at each step of the write, first for a new index and then
while replacing one: a reader then finds the old index whole (or a clean "no index" error, never a
torn file), and building it again works and leaves no temporary file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from reliability import harness

import gradindex
from gradindex.search import clear_index_cache, read_index_meta, write_index_meta

K = 10
# where the child stops: after writing the index under its temporary name; halfway through writing
# it; after renaming it into place, before its meta
SITES = ("before-rename", "torn-temporary", "before-meta")


def _search(store, queries, name):
    return tuple(np.asarray(part).tolist() for part in gradindex.search_store(store, queries, K, index=name))


def _index_files(store):
    folder = store / "indexes"
    metas = [json.loads(path.read_text()) for path in folder.glob("*.json")]
    referenced = {meta["file"] for meta in metas} | {meta.get("ivfdata") for meta in metas if meta.get("ivfdata")}
    temporaries = [path.name for path in folder.iterdir() if ".gi-idx-tmp-" in path.name or ".gi-tmp-" in path.name]
    unreferenced = [
        path.name
        for path in folder.iterdir()
        if path.is_file() and path.suffix != ".json" and path.name not in referenced and path.name not in temporaries
    ]
    return temporaries, unreferenced


def test_index_write_interrupted_at_each_step(env, capsys):
    work = env.fresh("index-kill")
    queries = np.random.default_rng(5).standard_normal((5, gradindex.open_store(env.small).dim)).astype(np.float32)
    reference = work / "reference.gradindex"
    shutil.copytree(env.small, reference)
    gradindex.build_index(reference, "IVF4,Flat", name="ivf", progress=False)
    expected = _search(reference, queries, "ivf")
    figures = {
        "tried": 0,
        "old index intact": 0,
        "clean errors": 0,
        "torn reads": 0,
        "rebuilt": 0,
        "temporaries left": 0,
        "unreferenced files left": 0,
    }
    for replacing in (False, True):
        for site in SITES:
            store = work / f"{site}-{'replace' if replacing else 'new'}.gradindex"
            shutil.copytree(reference if replacing else env.small, store)
            code, _ = harness.run_child(harness.child_index, str(store), "ivf", "IVF4,Flat", site)
            assert code == 137, (site, code)
            figures["tried"] += 1
            try:
                found = _search(store, queries, "ivf")
            except gradindex.GradIndexError as error:
                assert not replacing, f"{site}: the old index is gone: {error}"
                assert "no index named 'ivf'" in str(error)
                figures["clean errors"] += 1
            else:
                if replacing and found == expected:
                    figures["old index intact"] += 1
                else:
                    figures["torn reads"] += 1
            gradindex.build_index(store, "IVF4,Flat", name="ivf", overwrite=True, progress=False)
            figures["rebuilt"] += _search(store, queries, "ivf") == expected
            temporaries, unreferenced = _index_files(store)
            figures["temporaries left"] += len(temporaries)
            figures["unreferenced files left"] += len(unreferenced)
    harness.report(capsys, harness.summary("index write interrupted (3 steps x new/replace)", figures, list(figures)))
    assert figures["torn reads"] == 0
    assert figures["clean errors"] == figures["old index intact"] == len(SITES)
    assert figures["rebuilt"] == figures["tried"] == 2 * len(SITES)
    assert figures["temporaries left"] == 0


def test_index_checked_against_the_store_on_load(env, tmp_path, capsys):
    """An index whose meta disagrees with its file, or with the store (ntotal, d), is refused with a SearchError."""
    store = tmp_path / "s.gradindex"
    shutil.copytree(env.small, store)
    meta = gradindex.build_index(store, "IVF4,Flat", name="ivf", progress=False)
    queries = np.zeros((1, gradindex.open_store(store).dim), np.float32)
    folder = store / "indexes"
    recorded = read_index_meta(folder, "ivf")
    write_index_meta(folder, "ivf", {**recorded, "ntotal": recorded["ntotal"] + 1})  # sealed, as if built so
    with pytest.raises(gradindex.SearchError, match="ntotal"):
        gradindex.search_store(store, queries, K, index="ivf")
    write_index_meta(folder, "ivf", {**recorded, "dim": recorded["dim"] + 1})
    with pytest.raises(gradindex.SearchError, match="dim"):
        gradindex.search_store(store, queries, K, index="ivf")
    write_index_meta(folder, "ivf", recorded)
    (store / "indexes" / meta["file"]).write_bytes(b"not a faiss index")
    other = tmp_path / "other.gradindex"  # a fresh path: nothing cached from the sound file
    shutil.copytree(store, other)
    with pytest.raises(gradindex.SearchError, match="fails its checksum.*--overwrite"):
        gradindex.search_store(other, queries, K, index="ivf")
    harness.report(capsys, "index load checks: wrong ntotal, wrong dim, unreadable file: refused as SearchError 3/3")


def test_an_interrupted_index_write_leaves_no_unreferenced_file(env):
    """A write stopped after its file is renamed into place, before its meta, leaves NAME.<token>.faiss that no meta
    names (and its lock): the next writer takes the dead writer's lock over and sweeps the file."""
    work = env.fresh("index-unreferenced")
    store = work / "s.gradindex"
    shutil.copytree(env.small, store)
    code, _ = harness.run_child(harness.child_index, str(store), "ivf", "IVF4,Flat", "before-meta")
    assert code == 137
    gradindex.build_index(store, "IVF4,Flat", name="ivf", overwrite=True, progress=False)
    assert _index_files(store) == ([], [])
    assert not (store / "indexes" / "ivf.lock").exists()


def test_concurrent_writers_of_one_index_leave_one_consistent_index(env, capsys):
    """Two ``build_index(name="same", overwrite=True)`` at once, several rounds: both finish, and the index left is
    whole (its meta names files that are there and load) with no unreferenced file beside it."""
    work = env.fresh("index-concurrent")
    store = work / "s.gradindex"
    shutil.copytree(env.small, store)
    queries = np.random.default_rng(6).standard_normal((3, gradindex.open_store(store).dim)).astype(np.float32)
    figures = {"rounds": 0, "writers ok": 0, "whole indexes": 0, "unreferenced files left": 0, "temporaries left": 0}
    harness.run_child(harness.child_setup)  # start the forkserver first, so that both writers start together
    for _ in range(3):
        writers = [
            harness.context().Process(target=harness.child_index, args=(str(store), "same", "IVF4,Flat", "none"))
            for _ in range(2)
        ]
        for process in writers:
            process.start()
        for process in writers:
            process.join(300)
        figures["rounds"] += 1
        figures["writers ok"] += sum(process.exitcode == 0 for process in writers)
        clear_index_cache()
        found = _search(store, queries, "same")
        figures["whole indexes"] += len(found[1]) == len(queries)
        temporaries, unreferenced = _index_files(store)
        figures["unreferenced files left"] += len(unreferenced)
        figures["temporaries left"] += len(temporaries)
    harness.report(capsys, harness.summary("two writers of one index at once", figures, list(figures)))
    assert figures["writers ok"] == 2 * figures["rounds"]
    assert figures["whole indexes"] == figures["rounds"]
    assert figures["unreferenced files left"] == figures["temporaries left"] == 0
