"""A hypothesis state machine over one store: write shards, kill writers at every crash point (real
child processes, exit 137), reopen, finalize, corrupt shard files, verify, repair, search.

The model is a dict of the committed shards (and the set of damaged ones). After every step:
the store never says complete before every shard is committed; verify names exactly the damaged and
the unwritten shards; and exact top-k search equals numpy brute force over the committed rows (or, where
a committed shard is damaged, is a CorruptStoreError naming it -- never an answer)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from reliability import harness

import gradindex
from gradindex import CorruptStoreError, IncompleteStoreError, ShardOwnershipError
from gradindex.search import brute_force_topk, least_memory_budget
from gradindex.store import StoreLayout, create_store, open_store

N_ROWS, DIM, ROWS_PER_SHARD = 37, 3, 8
N_SHARDS = -(-N_ROWS // ROWS_PER_SHARD)
SITES = ("shard-before-rename", "shard-after-features", "shard-before-record", "shard-after-record")
FIGURES: Counter = Counter()
VECTORS = np.random.default_rng(2024).standard_normal((N_ROWS, DIM)).astype(np.float32)
QUERIES = np.random.default_rng(7).standard_normal((3, DIM)).astype(np.float32)


def _write(store, shard: int, owner: str) -> None:
    start, stop = store.layout.shard_rows(shard)
    harness.write_shard(store, shard, VECTORS[start:stop], owner)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="gi-stateful-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self.path = self.root / "s.gradindex"
        self.store = create_store(
            self.path, StoreLayout.auto(N_ROWS, DIM, "float32", rows_per_shard=ROWS_PER_SHARD), {"model": "stateful"}
        )
        self.committed: set[int] = set()
        self.damaged: set[int] = set()
        self.complete = False
        FIGURES["examples"] += 1

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- rules ----------------------------------------------------------------------------
    @rule(shard=st.integers(0, N_SHARDS - 1), misaligned_first=st.booleans())
    def write(self, shard: int, misaligned_first: bool) -> None:
        FIGURES["write steps"] += 1
        if misaligned_first:
            self._misaligned_write(shard)
        if shard in self.committed or self.complete:
            with pytest.raises(ShardOwnershipError, match="already finished"):
                _write(self.store, shard, owner="parent")
            return
        _write(self.store, shard, owner="parent")
        self.committed.add(shard)

    @rule(shard=st.integers(0, N_SHARDS - 1), site=st.sampled_from(SITES))
    def kill(self, shard: int, site: str) -> None:
        FIGURES["kill steps"] += 1
        start, stop = self.store.layout.shard_rows(shard)
        code, _ = harness.run_child(harness.child_write_shard, str(self.path), shard, VECTORS[start:stop], site)
        if shard in self.committed or self.complete:
            assert code == 1  # the child's claim was refused: "already finished"
            return
        assert code == 137, (site, code)
        FIGURES["writers killed"] += 1
        if site == "shard-after-record":  # the record was durable before the kill
            self.committed.add(shard)

    @rule()
    def resume(self) -> None:
        """What ``build --resume`` does at the store level: sweep, write every shard not yet committed, finalize."""
        FIGURES["resume steps"] += 1
        self.store = open_store(self.path)
        self.store.sweep_temporaries()
        if not self.complete:
            for shard in range(N_SHARDS):
                if shard not in self.committed:
                    _write(self.store, shard, owner="resume")
                    self.committed.add(shard)
        self.finalize()

    def _misaligned_write(self, shard: int) -> None:
        """A writer handing rows of another shard is rejected before it writes a byte."""
        if self.complete or shard in self.committed:
            return
        FIGURES["misaligned writes rejected"] += 1
        before = harness.tree_hash(self.path)
        start, stop = self.store.layout.shard_rows(shard)
        with pytest.raises(ValueError, match="exactly those rows"):
            self.store.write_shard(
                shard,
                VECTORS[start:stop],
                np.zeros(stop - start, np.float32),
                pa.table(
                    {
                        "row": np.arange(start + 1, stop + 1, dtype=np.int64),
                        "sample_id": [f"z{row}" for row in range(start + 1, stop + 1)],
                    }
                ),
            )
        assert harness.tree_hash(self.path) == before

    @rule()
    def reopen(self) -> None:
        FIGURES["reopen steps"] += 1
        self.store = open_store(self.path)
        self.store.sweep_temporaries()
        assert self.store.complete == self.complete

    @rule()
    def finalize(self) -> None:
        """A worker that has written its shards finalizes: complete only when every shard is."""
        FIGURES["finalize steps"] += 1
        done = self.store.finalize()
        assert done == (len(self.committed) == N_SHARDS)
        FIGURES["completed"] += done and not self.complete
        self.complete = done

    @rule(shard=st.integers(0, N_SHARDS - 1), mutation=st.sampled_from(harness.MUTATIONS), seed=st.integers(0, 2**16))
    def corrupt(self, shard: int, mutation: str, seed: int) -> None:
        FIGURES["corrupt steps"] += 1
        if shard not in self.committed or shard in self.damaged:
            return
        import random

        harness.mutate(self.path / "features" / "c" / str(shard) / "0", mutation, random.Random(seed))
        self.damaged.add(shard)

    @rule()
    def repair(self) -> None:
        """``build --resume --repair`` at the store level: verify names the damaged shards, they are recomputed."""
        FIGURES["repair steps"] += 1
        assert sorted(self.store.bad_shards()) == sorted(self.damaged)
        if not self.damaged:
            return
        self.store.reopen_for_repair(sorted(self.damaged))
        FIGURES["shards repaired"] += len(self.damaged)
        self.committed -= self.damaged
        self.damaged.clear()
        self.complete = False
        self.store = open_store(self.path)
        self.resume()

    # ---- invariants -----------------------------------------------------------------------
    @invariant()
    def never_complete_too_early(self) -> None:
        on_disk = open_store(self.path)
        if on_disk.complete:
            assert self.committed == set(range(N_SHARDS))
        assert set(on_disk.done_shards()) == (set(range(N_SHARDS)) if on_disk.complete else self.committed)

    @invariant()
    def verify_names_what_the_model_says(self) -> None:
        problems = open_store(self.path).verify()
        named = {int(problem.split(":")[0].split()[1]) for problem in problems if problem.startswith("shard ")}
        unwritten = set(range(N_SHARDS)) - self.committed
        assert named == self.damaged | unwritten, problems

    @invariant()
    def search_equals_brute_force_on_committed_rows(self) -> None:
        store = open_store(self.path)
        if not store.complete:
            with pytest.raises(IncompleteStoreError, match="incomplete"):
                gradindex.search_store(store, QUERIES, 5)
        if self.damaged:
            with pytest.raises(CorruptStoreError, match=r"shard \d+ .*(fails its checksum|is missing)"):
                gradindex.search_store(store, QUERIES, 5, allow_incomplete=True)
            return
        rows = (
            np.concatenate([np.arange(*store.layout.shard_rows(shard)) for shard in sorted(self.committed)])
            if self.committed
            else np.zeros(0, int)
        )
        for k in (5, N_ROWS):
            for memory_budget in (None, least_memory_budget(store, len(QUERIES), k)):  # in memory, streamed
                scores, found = gradindex.search_store(
                    store, QUERIES, k, allow_incomplete=True, memory_budget=memory_budget
                )
                FIGURES["searches checked against brute force"] += 1
                if rows.size == 0:
                    assert found.shape == (3, 0)
                    continue
                expected_scores, positions = brute_force_topk(VECTORS[rows], QUERIES, k)
                np.testing.assert_array_equal(found, rows[positions])
                np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_store_state_machine(env, capsys):  # env: the session's forkserver is stopped (and reaped) with it
    FIGURES.clear()
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=int(os.environ.get("GRADINDEX_STATEFUL_EXAMPLES", "10")),
            stateful_step_count=int(os.environ.get("GRADINDEX_STATEFUL_STEPS", "15")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    harness.report(
        capsys,
        harness.summary(
            "stateful store machine",
            FIGURES,
            [
                "examples",
                "write steps",
                "misaligned writes rejected",
                "writers killed",
                "resume steps",
                "reopen steps",
                "finalize steps",
                "completed",
                "corrupt steps",
                "shards repaired",
                "searches checked against brute force",
            ],
        )
        + ", complete too early 0, wrong answers 0",
    )
