"""Guarantees 2 and 5 under damage: every kind of file of a store (manifest, array metadata, feature
shards, self-influence chunks, samples.parquet; shard records, sample parts and claims of a store being
built) is truncated, bit-flipped, zero-filled and deleted in turn. What a user then gets from open,
verify, search, opponents, self-influence and the sample table is either a clean GradIndexError (or
verify naming the damage) or the pristine answer -- never a crash, never a silently different answer.
``build --resume --repair`` then recomputes exactly what verify names and gives back the pristine bytes
(everything but a damaged manifest, which holds the checksums: that one needs --overwrite)."""

from __future__ import annotations

import json
import os
import shutil
import socket

import numpy as np
import pytest
from click.testing import CliRunner
from reliability import harness

import gradindex
from gradindex.cli import cli
from gradindex.utils import HOST_TAG

K = 10


def _queries(dim: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((5, dim)).astype(np.float32)


def _repair(env):
    return lambda path: gradindex.build(
        harness.SMALL, env.checkpoints, path, resume=True, repair=True, **harness.SMALL_OPTIONS
    )


def test_complete_store_corruption_matrix(env, capsys):
    work = env.fresh("corrupt-complete")
    pristine = work / "pristine.gradindex"
    shutil.copytree(env.small, pristine)
    result = harness.corruption_matrix(
        pristine, work, _queries(gradindex.open_store(pristine).dim), K, seed=1, repair=_repair(env)
    )
    figures = result["figures"]
    unrepairable = result["by_kind"]["manifest"]["clean error"]
    harness.report(
        capsys,
        harness.summary(
            "corruption matrix, complete store (6 mutations x every file)",
            figures
            | {
                "repairable": figures.get("repair tried", 0) - unrepairable,
                "crashes": figures.get("crash", 0),
                "silently wrong answers": figures.get("silently wrong", 0),
            },
            ["mutations", "clean error", "harmless", "crashes", "silently wrong answers", "repairable", "repaired"],
        ),
    )
    assert result["findings"] == []
    assert figures.get("crash", 0) == figures.get("silently wrong", 0) == 0
    assert set(result["by_kind"]) == {
        "manifest",
        "array metadata",
        "feature shard",
        "self-influence chunk",
        "samples.parquet",
    }
    assert figures["clean error"] == figures["mutations"]  # every byte of a store is checked
    assert (
        figures["repaired"] == figures["repair tried"] - unrepairable
    )  # all but the manifest come back byte-identical


def _incomplete_store(env, work):
    """A store stopped after 3 of its 6 shards, with the claim of a writer that died on the 4th and the start of that
    shard's features file, streamed to its temporary name (whether the stopped build had begun its own is timing)."""
    path = work / "pristine.gradindex"
    code, _ = harness.run_child(
        harness.child_build, harness.SMALL, env.checkpoints, str(path), harness.SMALL_OPTIONS, "shard-after-record:3"
    )
    assert code == 137
    dead = 2**22 + 4321
    (path / "_shards" / "000003.claim").write_text(
        json.dumps({"owner": "dead", "host": socket.gethostname(), "pid": dead, "time": 0})
    )
    features = (path / "features" / "c" / "0" / "0").read_bytes()
    (path / "_shards" / f"000003.features.gi-tmp-{dead}-{HOST_TAG}-0123456789abcdef").write_bytes(features[:4096])
    return path


def test_incomplete_store_corruption_matrix(env, capsys):
    work = env.fresh("corrupt-incomplete")
    pristine = _incomplete_store(env, work)
    assert gradindex.open_store(pristine).done_shards() == [0, 1, 2]
    result = harness.corruption_matrix(
        pristine,
        work,
        _queries(gradindex.open_store(pristine).dim),
        K,
        seed=2,
        repair=_repair(env),
        repaired_bytes=env.small_bytes,
    )
    figures = result["figures"]
    by_kind = result["by_kind"]
    unrepairable = by_kind["manifest"]["clean error"]
    harness.report(
        capsys,
        harness.summary(
            "corruption matrix, store being built (records, parts, claims too)",
            figures
            | {
                "crashes": figures.get("crash", 0),
                "silently wrong answers": figures.get("silently wrong", 0),
                "repairable": figures.get("repair tried", 0) - unrepairable,
            },
            [
                "mutations",
                "clean error",
                "record lost",
                "harmless",
                "crashes",
                "silently wrong answers",
                "repairable",
                "repaired",
            ],
        ),
    )
    assert result["findings"] == []
    assert figures.get("crash", 0) == figures.get("silently wrong", 0) == 0
    assert {"shard record", "sample part", "claim"} <= set(by_kind)
    # a claim is a lock, not data, and a dead writer's temporary file (the features of the shard it was computing, when
    # it was killed while they streamed) is not read: reading ignores both (a resume removes them); every other file
    # is checked
    ignored = [by_kind.get(kind, {}) for kind in ("claim", "temporary")]
    assert by_kind["temporary"] and all(counts.get("harmless", 0) == sum(counts.values()) for counts in ignored)
    assert figures.get("harmless", 0) == sum(counts.get("harmless", 0) for counts in ignored)
    # a deleted record: the store then declares that shard unfinished and answers for the others; a resume redoes it
    assert figures.get("record lost", 0) == by_kind["shard record"].get("record lost", 0) == 3
    assert figures["repaired"] == figures["repair tried"] - unrepairable


def test_damaged_index_files_never_crash(env, capsys):
    """Guarantee 8 on load: a damaged or missing index file is a SearchError/CorruptStoreError, never a crash."""
    work = env.fresh("corrupt-index")
    pristine = work / "pristine.gradindex"
    shutil.copytree(env.small, pristine)
    gradindex.build_index(pristine, "IVF4,Flat", name="ivf", progress=False)
    result = harness.corruption_matrix(
        pristine,
        work,
        _queries(gradindex.open_store(pristine).dim),
        K,
        seed=3,
        index_name="ivf",
        select=lambda name: name.startswith("indexes/"),
    )
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            "corruption matrix, persisted index files",
            figures | {"crashes": figures.get("crash", 0), "silently wrong answers": figures.get("silently wrong", 0)},
            ["mutations", "clean error", "harmless", "crashes", "silently wrong answers"],
        ),
    )
    assert figures.get("crash", 0) == 0
    assert [finding for finding in result["findings"] if finding["outcome"] == "crash"] == []


def test_damaged_index_data_is_detected(env):
    work = env.fresh("corrupt-index-data")
    store = work / "s.gradindex"
    shutil.copytree(env.small, store)
    meta = gradindex.build_index(store, "IVF4,Flat", name="ivf", progress=False)
    queries = _queries(gradindex.open_store(store).dim)
    before = gradindex.search_store(store, queries, K, index="ivf")
    damaged = work / "damaged.gradindex"  # a fresh path: nothing loaded from the first copy is reused
    shutil.copytree(store, damaged)
    data = damaged / "indexes" / meta["file"]
    raw = bytearray(data.read_bytes())
    quarter = len(raw) // 4
    raw[quarter : 2 * quarter] = bytes(quarter)  # zero a quarter of the inverted lists
    data.write_bytes(bytes(raw))
    try:
        after = gradindex.search_store(damaged, queries, K, index="ivf")
    except gradindex.GradIndexError:
        return  # detected: what the guarantee asks
    assert all(np.array_equal(left, right) for left, right in zip(before, after))


def test_verify_names_bad_shards_and_repair_recomputes_only_those(env, tmp_path, capsys):
    """The CLI path of guarantee 5: verify exits 1 naming the damaged shards; build --resume --repair
    recomputes those shards only (the others keep their files) and the store is byte-identical again."""
    store = tmp_path / "s.gradindex"
    shutil.copytree(env.small, store)
    runner = CliRunner()
    assert runner.invoke(cli, ["verify", str(store)]).exit_code == 0
    flipped = store / "features" / "c" / "2" / "0"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    flipped.write_bytes(bytes(raw))
    (store / "self_influence" / "c" / "4").unlink()
    result = runner.invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1
    assert "shard 2: features/c/2/0 fails its checksum" in result.output
    assert "shard 4: self_influence/c/4 is missing" in result.output
    assert "--resume --repair" in result.output
    with pytest.raises(gradindex.CorruptStoreError, match=r"shard 2 .* fails its checksum.*--repair"):
        gradindex.search_store(store, _queries(gradindex.open_store(store).dim), K)
    kept = {shard: os.stat(store / "features" / "c" / str(shard) / "0").st_ino for shard in (0, 1, 3, 5)}
    args = [
        "build",
        "--task",
        harness.SMALL,
        "-o",
        str(store),
        "--resume",
        "--repair",
        "--projection",
        "none",
        "--rows-per-shard",
        "100",
        "--batch-size",
        "100",
        "--checkpoint",
        env.checkpoints[0],
    ]
    repaired = runner.invoke(cli, args)
    assert repaired.exit_code == 0, repaired.output
    assert "recomputing shard(s) [2, 4]" in repaired.output
    assert runner.invoke(cli, ["verify", str(store)]).exit_code == 0
    assert {shard: os.stat(store / "features" / "c" / str(shard) / "0").st_ino for shard in kept} == kept
    assert harness.diff_names(harness.snapshot(store), env.small_bytes) == []
    harness.report(
        capsys,
        "verify + build --resume --repair (CLI): damaged shards named [2, 4], recomputed [2, 4], "
        f"other shards' files untouched {len(kept)}/{len(kept)}, byte mismatches after repair 0",
    )
    with pytest.raises(ValueError, match="repair needs resume=True"):
        gradindex.build(harness.SMALL, env.checkpoints, store, repair=True, **harness.SMALL_OPTIONS)


def test_a_repair_that_meets_other_data_refuses(env, tmp_path, capsys):
    """A shard recomputed by --repair must hash to the training samples it held: with edited data, it refuses."""
    store = tmp_path / "s.gradindex"
    shutil.copytree(env.small, store)
    (store / "features" / "c" / "0" / "0").unlink()
    edited = f"{harness.TASKS}:edited_task"  # row 1 changed: the cheap 32-item probe does not look at it
    with pytest.raises(gradindex.IncompatibleStoreError, match=r"dataset.content_sha256 of shard 0 \(rows 0..99\)"):
        gradindex.build(edited, env.checkpoints, store, resume=True, repair=True, **harness.SMALL_OPTIONS)
    harness.report(capsys, "repair against an edited training set (row 1 changed): refused 1/1")
