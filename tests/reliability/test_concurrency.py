"""Guarantee 4: writers own whole shards. Several worker processes build disjoint shards of one store
while readers poll it: no reader sees "complete" early or a shard that differs from an uninterrupted
build; a worker that cuts other shards, and a writer reaching for a shard another holds, are rejected.
The control: two plain zarr writers on disjoint rows of one shared shard lose rows and exit 0, which
shows the check can see loss."""

from __future__ import annotations

from reliability import harness


def test_workers_on_disjoint_shards_with_polling_readers(env, capsys):
    result = harness.concurrency_run(
        env.fresh("concurrency"), harness.BIG, env.checkpoints, harness.BIG_OPTIONS, env.big, n_workers=4, n_readers=2
    )
    figures = result["figures"]
    harness.report(
        capsys,
        harness.summary(
            "concurrency (4 workers on 20 shards, 2 polling readers)",
            figures,
            [
                "workers ok",
                "completed by a worker",
                "polls",
                "shard reads",
                "saw complete",
                "complete too early",
                "wrong shards seen",
                "read errors",
                "misaligned rejected",
                "intruder rejected",
                "mismatches",
                "orphans",
            ],
        ),
    )
    assert result["problems"] == [], result["problems"]
    assert figures["workers ok"] == 4 and figures["completed by a worker"] >= 1
    assert figures["saw complete"] == 2  # both readers watched it finish
    assert (
        figures.get("complete too early", 0)
        == figures.get("wrong shards seen", 0)
        == figures.get("read errors", 0)
        == 0
    )
    assert figures["misaligned rejected"] == 1, result["misaligned"]
    assert "rows_per_shard: store has 1000, this call has 500" in result["misaligned"]["error"]
    assert figures["intruder rejected"] == 1 and "owned by writer holder" in result["intruder"]["message"]
    assert figures["mismatches"] == figures["orphans"] == 0, result["differing"]


def test_raw_zarr_shared_shard_control_loses_rows(env, capsys):
    control = harness.raw_zarr_control(env.fresh("control"))
    harness.report(
        capsys,
        f"raw-zarr control (2 writers, disjoint rows, one shared shard): rows {control['rows']}, "
        f"lost {control['lost']}, writer exit codes {control['exit codes']}, attempts {control['attempts']}",
    )
    assert control["exit codes"] == [0, 0]
    assert control["lost"] > 0  # the race the store's ownership rules prevent is real, and visible to this check
