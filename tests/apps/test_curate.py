"""gradindex curate: drop the most suspicious, or keep the most helpful for target queries (LESS-style)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_tasks
import torch
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex.apps.curation import parse_amount, summary
from gradindex.checkpoints import load_into, parse_checkpoints
from gradindex.cli import cli

MLP = f"{TINY}:mlp_task"


@pytest.fixture(scope="module")
def mlp_checkpoints(tmp_path_factory):
    return tiny_tasks.save_checkpoints(tiny_tasks.mlp, tmp_path_factory.mktemp("curate-ckpts"))


@pytest.fixture(scope="module")
def exact_store(tmp_path_factory, mlp_checkpoints):
    """No projection, float32: scores are exact sums of weighted gradient dot products. Read-only in these tests."""
    return gradindex.build(
        MLP,
        mlp_checkpoints,
        tmp_path_factory.mktemp("curate") / "exact.gradindex",
        projection="none",
        dtype="float32",
        rows_per_shard=50,
        progress=False,
    )


def _gradients(task, checkpoint: str, dataset) -> np.ndarray:
    """Per-sample loss gradients by a loop of backward() calls: the trusted slow path. ``[n, p]``."""
    model = load_into(task.model(), checkpoint)
    out = []
    for index in range(len(dataset)):
        inputs, target = dataset[index]
        model.zero_grad()
        task.loss(model, (inputs[None], target[None])).sum().backward()
        out.append(torch.cat([param.grad.reshape(-1) for param in model.parameters()]).numpy().astype(np.float64))
    return np.stack(out)


@pytest.mark.parametrize(
    "value, expected",
    [("5%", 6), ("0%", 0), ("100%", 120), ("2.5%", 3), ("20", 20), (20, 20), (0, 0), (0.25, 30), (" 10 % ", 12)],
)
def test_amounts(value, expected):
    assert parse_amount(value, 120) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("120%", r"drop_top 120% is more than 100%"),
        ("5x", r"drop_top '5x' must be a count such as 20 or a percentage such as 5%"),
        ("-3", r"must be a count such as 20"),
        (121, r"drop_top 121 is more than the store's 120 samples"),
        (-1, r"drop_top must not be negative, got -1"),
        (1.5, r"as a float is a fraction in \[0, 1\], got 1.5"),
        (True, r"must be a count such as 20 or a percentage such as 5%, got True"),
    ],
)
def test_bad_amounts_say_what_to_give(value, message):
    with pytest.raises(ValueError, match=message):
        parse_amount(value, 120)


def test_drop_top_drops_exactly_the_highest_self_influence(exact_store):
    table = gradindex.curate(exact_store, drop_top="10%")
    assert table.column_names == ["row", "sample_id", "label", "score", "rank", "keep"]
    assert table.column("row").to_pylist() == list(range(120))
    ranking = gradindex.self_influence(exact_store, top=12)
    dropped = [row for row, keep in zip(table.column("row").to_pylist(), table.column("keep").to_pylist()) if not keep]
    assert sorted(dropped) == sorted(ranking.column("row").to_pylist())
    rows, scores = exact_store.self_influence()
    np.testing.assert_allclose(table.column("score").to_numpy(), scores[np.argsort(rows)], rtol=1e-6)
    assert sorted(table.column("rank").to_pylist()) == list(range(1, 121))
    assert summary(table) == {
        "mode": "drop-top",
        "by": "self-influence",
        "amount": "10%",
        "dropped": 12,
        "kept": 108,
        "threshold": pytest.approx(float(ranking.column("score")[-1].as_py()), rel=1e-6),
    }
    # a count gives the same table as the matching percentage
    assert gradindex.curate(exact_store, drop_top=12).column("keep").equals(table.column("keep"))


def test_the_table_joins_on_sample_id_in_arrow_and_pandas(exact_store):
    keep = gradindex.curate(exact_store, drop_top=30)
    features = pa.table({"sample_id": pa.array(np.arange(120, dtype=np.int64)[::-1]), "x": pa.array(np.arange(120.0))})
    joined = features.join(keep.select(["sample_id", "keep"]), "sample_id").filter(pa.compute.field("keep"))
    assert joined.num_rows == 90
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"sample_id": np.arange(120), "x": 1.0}).merge(keep.to_pandas(), on="sample_id")
    assert int(frame["keep"].sum()) == 90


def test_select_keeps_the_highest_summed_influence_exactly(exact_store, mlp_checkpoints):
    task = tiny_tasks.mlp_task()
    targets = [0, 3, 4, 7]
    expected = np.zeros(120)
    for spec in parse_checkpoints(mlp_checkpoints):
        train_grads = _gradients(task, spec.path, task.train)
        query_grads = _gradients(task, spec.path, task.test)[targets]
        expected += spec.weight * train_grads @ query_grads.sum(axis=0)  # Σ_q Σ_c η_c ∇ℓ(q)·∇ℓ(z)
    table = gradindex.curate(exact_store, select="25%", split="test", samples="0,3-4,7", progress=False)
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=2e-4, atol=1e-6)
    kept = np.flatnonzero(table.column("keep").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-expected, kind="stable")[:30]))
    meta = summary(table)
    assert meta["mode"] == "select" and meta["kept"] == 30 and meta["n_queries"] == 4 and meta["split"] == "test"
    # streamed under the least memory budget its search can hold (blocks of one row): the same scores
    tiny = gradindex.search.least_memory_budget(exact_store, len(targets), exact_store.n_samples)
    streamed = gradindex.curate(exact_store, select=30, samples=targets, memory_budget=tiny, progress=False)
    np.testing.assert_allclose(
        streamed.column("score").to_numpy(), table.column("score").to_numpy(), rtol=1e-4, atol=1e-5
    )


def test_curate_needs_exactly_one_way_and_a_complete_store(exact_store):
    with pytest.raises(ValueError, match="give exactly one of drop_top"):
        gradindex.curate(exact_store)
    with pytest.raises(ValueError, match="give exactly one of drop_top"):
        gradindex.curate(exact_store, drop_top=1, select=1)
    with pytest.raises(ValueError, match="by must be one of self-influence, got 'loss'"):
        gradindex.curate(exact_store, drop_top=1, by="loss")
    with pytest.raises(gradindex.TaskSpecError, match="has no split 'val'"):
        gradindex.curate(exact_store, select=1, split="val")


def test_curate_command(exact_store, tmp_path):
    runner = CliRunner()
    store = str(exact_store.path)
    out = tmp_path / "keep.parquet"
    result = runner.invoke(cli, ["curate", store, "--drop-top", "5%", "-o", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"output": str(out), "n_samples": 120, **summary(pq.read_table(out))}
    assert pq.read_table(out).column("keep").to_pylist().count(False) == 6
    csv = tmp_path / "keep.csv"
    text = runner.invoke(cli, ["curate", store, "--drop-top", "7", "--by", "self-influence", "-o", str(csv)])
    assert text.exit_code == 0 and "keep 113, drop 7 of 120 samples (drop-top 7)" in text.stderr
    assert csv.read_text().splitlines()[0] == '"row","sample_id","label","score","rank","keep"'
    helpful = tmp_path / "helpful.jsonl"
    selected = runner.invoke(
        cli,
        [
            "-q",
            "curate",
            store,
            "--for-queries",
            "--split",
            "test",
            "--samples",
            "0-9",
            "--select",
            "10%",
            "-o",
            str(helpful),
        ],
    )
    assert selected.exit_code == 0, selected.output
    rows = [json.loads(line) for line in helpful.read_text().splitlines()]
    assert len(rows) == 120 and sum(row["keep"] for row in rows) == 12
    assert sorted(row["rank"] for row in rows if row["keep"]) == list(range(1, 13))


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([], 2, r"give --drop-top N\|P% \(drop the most suspicious\) or --for-queries --select"),
        (["--drop-top", "5%", "--select", "5%"], 2, "--drop-top and --for-queries/--select choose in different ways"),
        (["--for-queries"], 2, "--for-queries needs --select N or --select P%"),
        (
            ["--drop-top", "5%", "--samples", "0-3"],
            2,
            "--samples, --task, --task-arg and --checkpoint pick target queries for --select",
        ),
        (["--drop-top", "5%", "-o", "keep.txt"], 2, r"-o keep.txt: give a .parquet, .csv, .jsonl or .json file name"),
        (["--drop-top", "150%"], 1, r"--drop-top 150% is more than 100%"),
        (["--select", "10", "--samples", "0-999"], 1, r"query samples \[20, 21, 22, 23, 24\] are out of range"),
    ],
)
def test_curate_command_mistakes(exact_store, tmp_path, args, code, message):
    import re

    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "out.parquet")]
    result = CliRunner().invoke(cli, ["curate", str(exact_store.path), *args])
    assert result.exit_code == code, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
