"""Guarantees 6 and 7: bad input is rejected before a byte is written. Every case below -- wrong shapes
and dtypes, NaN/±inf vectors, float16 overflow, a store and a call that disagree on seed, dim, model,
data set, layout or checkpoints, bad CLI values -- raises its own specific message, and the store's
bytes (every name and byte under it) are the same before and after."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from reliability import harness

import gradindex
from gradindex import IncompatibleStoreError, NonFiniteError, ShardOwnershipError
from gradindex.cli import cli

T = harness.TASKS
OPTIONS = harness.SMALL_OPTIONS


def _build(spec: str, env, path, **options):
    return gradindex.build(spec, env.checkpoints, path, **{**OPTIONS, **options})


@pytest.fixture(scope="module")
def stores(env, tmp_path_factory):
    """The stores the cases are tried on: each left as it is by every case."""
    root = tmp_path_factory.mktemp("validation")
    made = {"complete": env.small}
    # incomplete stores whose next shard to build holds the bad rows
    made["nan"] = root / "nan.gradindex"
    _build(f"{T}:nan_task", env, made["nan"], shard=(1, 6))  # shard 1 done; shard 0 has NaN rows 5, 37, 38
    made["inf"] = root / "inf.gradindex"
    _build(f"{T}:inf_task", env, made["inf"], shard=(1, 6))  # shard 0 has +inf in row 7
    made["huge"] = root / "huge.gradindex"
    for shard in range(4):  # shards 0-3 done; row 450 overflows float16
        _build(f"{T}:huge_task", env, made["huge"], shard=(shard, 6))
    made["projected"] = root / "projected.gradindex"
    gradindex.build(
        harness.SMALL,
        env.checkpoints,
        made["projected"],
        **{**OPTIONS, "projection": "rademacher", "proj_dim": 8, "seed": 3},
    )
    made["claimed"] = root / "claimed.gradindex"
    store = gradindex.store.create_store(made["claimed"], gradindex.store.StoreLayout.auto(8, 2, rows_per_shard=4), {})
    store.claim_shard(0, owner="validation")
    return made


def _samples(start: int, stop: int, shift: int = 0) -> pa.Table:
    return pa.table(
        {
            "row": np.arange(start + shift, stop + shift, dtype=np.int64),
            "sample_id": np.arange(start, stop, dtype=np.int64),
        }
    )


def _write(path, features, scores=None, samples=None, **options):
    store = gradindex.open_store(path)
    scores = np.zeros(4, np.float32) if scores is None else scores
    return lambda: store.write_shard(0, features, scores, _samples(0, 4) if samples is None else samples, **options)


def _cli(*args: str) -> Callable[[], None]:
    def run() -> None:
        result = CliRunner().invoke(cli, list(args))
        if result.exit_code == 0:
            raise AssertionError(f"gradindex {' '.join(args)} was accepted")
        raise ValueError(result.output)  # the message, checked by the case's pattern

    return run


def _cases(env, stores):
    """``(name, store, call, exception, message)``: the call must raise the exception with the message."""
    ones = np.ones((4, 2), np.float32)
    nan = ones.copy()
    nan[2, 1] = np.nan
    queries = np.zeros((2, gradindex.open_store(env.small).dim), np.float32)
    bad_queries = queries.copy()
    bad_queries[1, 0] = np.inf
    small, projected = str(stores["complete"]), str(stores["projected"])
    ckpt = env.checkpoints[0]
    build = ["build", "--task", harness.SMALL, "--checkpoint", ckpt, "--projection", "none", "--rows-per-shard", "100"]
    return [
        # the store's own checks (a writer's shard 0 of a 2-dim store)
        (
            "features of the wrong shape",
            "claimed",
            _write(stores["claimed"], np.ones((3, 2), np.float32)),
            ValueError,
            r"features of shape \(4, 2\), got \(3, 2\)",
        ),
        (
            "integer features",
            "claimed",
            _write(stores["claimed"], np.ones((4, 2), np.int64)),
            ValueError,
            "floating-point features, got dtype int64",
        ),
        (
            "self-influence of the wrong shape",
            "claimed",
            _write(stores["claimed"], ones, np.zeros(5, np.float32)),
            ValueError,
            "4 self-influence values, got shape",
        ),
        (
            "sample rows of another shard",
            "claimed",
            _write(stores["claimed"], ones, samples=_samples(0, 4, shift=4)),
            ValueError,
            "'row' column with exactly those rows",
        ),
        (
            "NaN features",
            "claimed",
            _write(stores["claimed"], nan),
            NonFiniteError,
            r"rows \[2\] have non-finite features",
        ),
        (
            "+inf features",
            "claimed",
            _write(stores["claimed"], ones * np.inf),
            NonFiniteError,
            r"rows \[0, 1, 2, 3\] have non-finite",
        ),
        (
            "-inf self-influence",
            "claimed",
            _write(stores["claimed"], ones, np.array([0, -np.inf, 0, 0], np.float32)),
            NonFiniteError,
            r"rows \[1\]",
        ),
        (
            "float16 overflow",
            "claimed",
            _write(stores["claimed"], ones * 7e4),
            NonFiniteError,
            "past float16's maximum 65504; build with dtype=float32",
        ),
        (
            "skipped rows that are not zero",
            "claimed",
            _write(stores["claimed"], ones, nonfinite={"skipped": [1]}),
            ValueError,
            "must hold zero vectors",
        ),
        (
            "a shard another writer holds",
            "claimed",
            lambda: gradindex.open_store(stores["claimed"]).claim_shard(0, owner="other"),
            ShardOwnershipError,
            "owned by writer validation",
        ),
        # the build's checks, on a resume whose next shard holds bad rows
        (
            "NaN gradients",
            "nan",
            lambda: _build(f"{T}:nan_task", env, stores["nan"], resume=True),
            NonFiniteError,
            r"3 of the 100 vectors of shard 0 are NaN or infinite \(rows \[5, 37, 38\].*nonfinite=skip",
        ),
        (
            "±inf gradients",
            "inf",
            lambda: _build(f"{T}:inf_task", env, stores["inf"], resume=True),
            NonFiniteError,
            r"rows \[7\].*nonfinite=zero",
        ),
        (
            "float16 overflow in a build",
            "huge",
            lambda: _build(f"{T}:huge_task", env, stores["huge"], resume=True),
            NonFiniteError,
            "past float16's maximum 65504",
        ),
        (
            "float32 asked on resume",
            "huge",
            lambda: _build(f"{T}:huge_task", env, stores["huge"], resume=True, dtype="float32"),
            IncompatibleStoreError,
            "dtype: store has 'float16', this call has 'float32'",
        ),
        # store and call disagree (guarantee 6): resume
        (
            "another seed",
            "projected",
            lambda: gradindex.build(
                harness.SMALL,
                env.checkpoints,
                stores["projected"],
                resume=True,
                **{**OPTIONS, "projection": "rademacher", "proj_dim": 8, "seed": 4},
            ),
            IncompatibleStoreError,
            "projection.seed: store has 3, this call has 4",
        ),
        (
            "another dim",
            "projected",
            lambda: gradindex.build(
                harness.SMALL,
                env.checkpoints,
                stores["projected"],
                resume=True,
                **{**OPTIONS, "projection": "rademacher", "proj_dim": 16, "seed": 3},
            ),
            IncompatibleStoreError,
            "projection.dim: store has 8, this call has 16",
        ),
        (
            "another model",
            "complete",
            lambda: _build(f"{T}:wide_task", env, stores["complete"], resume=True),
            gradindex.CheckpointError,
            r"does not fit the task's model \(shape mismatch 0.weight",
        ),
        (
            "another data set size",
            "complete",
            lambda: _build(f"{T}:io_task", env, stores["complete"], resume=True),
            IncompatibleStoreError,
            "dataset.n_samples: store has 600, this call has 250",
        ),
        (
            "other rows per shard",
            "complete",
            lambda: _build(harness.SMALL, env, stores["complete"], resume=True, rows_per_shard=50),
            IncompatibleStoreError,
            "layout.rows_per_shard: store has 100, this call has 50",
        ),
        (
            "another checkpoint weight",
            "complete",
            lambda: gradindex.build(
                harness.SMALL, [ckpt.rsplit(":", 1)[0] + ":9"], stores["complete"], resume=True, **OPTIONS
            ),
            IncompatibleStoreError,
            r"checkpoints\[0\].weight",
        ),
        # store and call disagree: query
        (
            "queries of another dim",
            "complete",
            lambda: gradindex.search_store(small, np.zeros((1, 5), np.float32), 3),
            IncompatibleStoreError,
            "dimension 276",
        ),
        (
            "NaN/inf queries",
            "complete",
            lambda: gradindex.search_store(small, bad_queries, 3),
            NonFiniteError,
            "queries hold NaN or infinite",
        ),
        (
            "query with another model",
            "complete",
            lambda: gradindex.query(small, f"{T}:wide_task", samples=[0]),
            IncompatibleStoreError,
            "model.parameters",
        ),
        (
            "query with another data set",
            "complete",
            lambda: gradindex.query(small, f"{T}:io_task", samples=[0]),
            IncompatibleStoreError,
            "dataset.n_samples: store has 600, this call has 250",
        ),
        (
            "query with other settings",
            "projected",
            lambda: gradindex.query(projected, samples=[0], checkpoints=[env.checkpoints[0]] * 2),
            IncompatibleStoreError,
            "built from 1 checkpoints; this query gives 2",
        ),
        # bad CLI values
        ("-k 0", "complete", _cli("query", small, "--samples", "0", "-k", "0"), ValueError, r"Invalid value for '-k'"),
        (
            "--samples 5-x",
            "complete",
            _cli("query", small, "--samples", "5-x"),
            ValueError,
            "must be indices and ranges like 0,5,10-19",
        ),
        (
            "--memory-budget 12Q",
            "complete",
            _cli("query", small, "--samples", "0", "--memory-budget", "12Q"),
            ValueError,
            "must be a size such as 512M or 4G",
        ),
        ("--top 0", "complete", _cli("self-influence", small, "--top", "0"), ValueError, r"Invalid value for '--top'"),
        (
            "--shard 3/2",
            "complete",
            _cli(*build, "-o", small, "--resume", "--shard", "3/2"),
            ValueError,
            "needs 0 <= I < N",
        ),
        (
            "--shard x",
            "complete",
            _cli(*build, "-o", small, "--resume", "--shard", "x"),
            ValueError,
            "must look like I/N",
        ),
        (
            "--nonfinite maybe",
            "complete",
            _cli(*build, "-o", small, "--resume", "--nonfinite", "maybe"),
            ValueError,
            r"Invalid value for '--nonfinite'",
        ),
        (
            "--repair without --resume",
            "complete",
            _cli(*build, "-o", small, "--repair"),
            ValueError,
            "--repair needs --resume",
        ),
        (
            "--resume --overwrite",
            "complete",
            _cli(*build, "-o", small, "--resume", "--overwrite"),
            ValueError,
            "exclude each other",
        ),
        (
            "--dtype int8",
            "complete",
            _cli(*build, "-o", small, "--resume", "--dtype", "int8"),
            ValueError,
            r"Invalid value for '--dtype'",
        ),
        (
            "--rows-per-shard 0",
            "complete",
            _cli(*build, "-o", small, "--resume", "--rows-per-shard", "0"),
            ValueError,
            r"Invalid value for '--rows-per-shard'",
        ),
        (
            "--proj-dim 0",
            "complete",
            _cli(*build, "-o", small, "--resume", "--proj-dim", "0"),
            ValueError,
            r"Invalid value for '--proj-dim'",
        ),
        (
            "--checkpoint PATH:abc",
            "complete",
            _cli(
                "build",
                "--task",
                harness.SMALL,
                "--checkpoint",
                ckpt.rsplit(":", 1)[0] + ":abc",
                "-o",
                small,
                "--resume",
            ),
            ValueError,
            "weight",
        ),
        (
            "build over an existing store",
            "complete",
            lambda: _build(harness.SMALL, env, stores["complete"]),
            gradindex.StoreExistsError,
            "already exists; pass resume=True .* or overwrite=True",
        ),
    ]


def test_input_validation_matrix(env, stores, capsys):
    cases = _cases(env, stores)
    figures = {"cases": len(cases), "rejected with its message": 0, "store unchanged": 0}
    for name, which, call, exception, message in cases:
        before = harness.tree_hash(stores[which])
        with pytest.raises(exception, match=message):
            try:
                call()
            except exception:
                raise
            except Exception as error:
                raise AssertionError(f"{name}: {type(error).__name__}: {error}") from error
            else:
                raise AssertionError(f"{name}: accepted")
        figures["rejected with its message"] += 1
        after = harness.tree_hash(stores[which])
        assert after == before, f"{name}: the store changed"
        figures["store unchanged"] += 1
    harness.report(capsys, harness.summary("input validation matrix", figures, list(figures)))
    assert figures["rejected with its message"] == figures["store unchanged"] == len(cases)


def test_a_changed_sample_the_probe_misses_is_caught_on_resume(env, tmp_path, capsys):
    """Guarantee 6, the content hash: row 1 edited (the 32-item probe does not look at it) is caught by the
    per-shard hash of every sample, recorded while featurizing and checked on resume."""
    path = tmp_path / "s.gradindex"
    shutil.copytree(env.small, path)
    store = gradindex.open_store(path)
    assert store.manifest["dataset_sha256"] and all(record["content_sha256"] for record in store.manifest["shards"])
    store.reopen_for_repair([5])  # as if the build had stopped before its last shard
    before = harness.tree_hash(path)
    with pytest.raises(
        IncompatibleStoreError,
        match=r"dataset.content_sha256 of shard 0 \(rows 0..99\): store has .*The training set changed",
    ):
        _build(f"{T}:edited_task", env, path, resume=True)
    assert harness.tree_hash(path) == before
    # the same data resumes; a batch size other than the build's gives the same hashes
    resumed = _build(harness.SMALL, env, path, resume=True, batch_size=37)
    assert resumed.complete and harness.diff_names(harness.snapshot(path), env.small_bytes) == []
    harness.report(
        capsys,
        "content hash: an edited sample the 32-item probe misses caught on resume 1/1, store unchanged; "
        "resume with another batch size (37): byte mismatches 0",
    )
