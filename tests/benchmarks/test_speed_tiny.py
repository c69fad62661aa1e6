"""``python -m benchmarks.speed --tiny`` paths run inside the suite so they cannot rot; no timing assertions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.speed import _peers, _run
from benchmarks.speed._models import deep_mlp_workload


def test_speed_table_times_the_whole_build_beside_the_epoch_and_the_peers(tmp_path):
    payload = _run.run(
        tiny=True,
        models=["mlp", "lm"],
        peers=["captum_tracincp", "bergson"],
        with_query=False,
        with_scaling=False,
        write=False,
        log=lambda message: None,
    )
    rows = payload["build"]
    models = list(dict.fromkeys(row["model"] for row in rows))
    assert models == ["mlp-784-32-32-10", "llama-lm-1x32-ctx16"]
    for model, target in zip(models, (1.5, 2.0)):
        mine = {row["method"]: row for row in rows if row["model"] == model}
        epoch = mine["training epoch (reference)"]
        build = mine["gradindex build (end to end)"]
        assert epoch["seconds"] > 0 and epoch["samples_timed"] == epoch["n_train"]
        # every row is the whole training set's cost, and the ratio is to that epoch
        assert build["samples_timed"] == build["n_train"] and build["seconds"] > 0
        assert build["x_epoch"] == pytest.approx(build["seconds"] / epoch["seconds"])
        assert build["target_x_epoch"] == target and build["meets_target"] in ("yes", "no")
        assert -1 <= build["spearman_per_query"] <= 1
        # Captum's TracInCP keeps full gradients: its scores are exact TracIn, whatever order its rows were timed in
        if importlib.util.find_spec("captum") is None:  # (the bench extra installs it; the test extra does not)
            captum = mine["captum_tracincp"]
            assert captum["status"] == "not run" and "pip install captum" in captum["note"]
        else:
            captum = mine["Captum TracInCP"]
            assert captum["spearman_per_query"] == pytest.approx(1.0) and captum["seconds"] > 0
            assert captum["x_gradindex"] == pytest.approx(captum["seconds"] / build["seconds"])
        bergson = [row for row in mine.values() if row["method"].startswith(("Bergson", "bergson"))]
        assert len(bergson) == 1
        if importlib.util.find_spec("bergson") is None:
            assert bergson[0]["status"] == "not run" and "cannot be imported" in bergson[0]["note"]
        else:  # its real build path on the Hugging Face LM, its hook collector on the MLP
            expected = "collect_gradients (build path)" if "lm" in model else "HookCollector"
            assert expected in bergson[0]["method"] and bergson[0]["seconds"] > 0, bergson[0]
        # the comparison counts only peers at least as accurate per query, or says there is none
        ran = [row for row in mine.values() if row.get("seconds") and row is not build and row is not epoch]
        equal = [row for row in ran if row["spearman_per_query"] >= build["spearman_per_query"]]
        if not ran:
            assert build["fastest_peer_at_quality"] == "no peer ran"
        elif not equal:
            assert build["fastest_peer_at_quality"] == "none as accurate"
        else:
            best = min(equal, key=lambda row: row["seconds"])
            assert build["fastest_peer_at_quality"] == best["method"]
            assert build["x_gradindex"] == pytest.approx(best["seconds"] / build["seconds"])


def test_quality_reference_is_exact_tracin(tmp_path):
    """The table's ρ reference (one backward per sample) equals what an unprojected store scores through
    ``gradindex.query``: the two paths the table compares agree where no projection separates them."""
    workload = deep_mlp_workload(24, 3, (16, 16))
    checkpoint = str(tmp_path / "c.pt")
    torch.manual_seed(0)
    torch.save(workload.make_model().state_dict(), checkpoint)
    rows = np.arange(16, 24)
    exact = _run.exact_scores(workload, checkpoint, rows)
    wall, cpu, (store, task) = _run.gradindex_build(workload, checkpoint, 1, str(tmp_path), projection="none")
    assert wall > 0 and cpu > 0 and store.n_samples == 24
    through_store = _run.gradindex_scores(store, task, rows)
    np.testing.assert_allclose(through_store, exact, rtol=2e-2, atol=2e-3 * np.abs(exact).max())


def test_a_capped_peer_is_timed_on_the_evaluated_rows_first_and_extrapolated():
    """A vectors peer whose φ is the input itself: the evaluated (last) rows go first and come back in row order; a
    cap of 0 stops it after one batch, with no ρ (fewer rows than evaluated)."""
    workload = deep_mlp_workload(40, 2, (8, 8))
    workload.peer_batch = 3
    inputs, _ = workload.train.tensors
    test_inputs, _ = workload.test.tensors
    runner = _peers.Runner("identity", vectors=lambda inputs, targets: inputs)
    found = _run.run_peer(runner, workload, _run.Setting(None, 40, 7, 2, 0, 0.0, 1, 1e9, 5))
    assert found["timed"] == 40 and found["timed_s"][0] > 0
    np.testing.assert_allclose(found["scores"], (test_inputs @ inputs[-7:].T).numpy(), rtol=1e-6)
    capped = _run.run_peer(runner, workload, _run.Setting(None, 40, 7, 2, 0, 0.0, 1, 0.0, 5))
    assert capped["timed"] == 3 and capped["scores"] is None
    whole = _peers.Runner("whole", whole=lambda x, y, tx, ty: tx @ x.T)
    found = _run.run_peer(whole, workload, _run.Setting(None, 40, 5, 2, 0, 0.0, 1, 0.0, 5))
    assert found["timed"] == 5 and found["scores"].shape == (2, 5)
    np.testing.assert_allclose(found["scores"], (test_inputs @ inputs[-5:].T).numpy(), rtol=1e-6)


def test_scaling_curves_measure_each_point_or_take_it_from_the_table():
    table = [
        {"model": "mlp-784-32-32-10", "n_train": 64, "method": "training epoch (reference)", "seconds": 2.0},
        {
            "model": "mlp-784-32-32-10",
            "n_train": 64,
            "params": 26506,
            "method": "gradindex build (end to end)",
            "seconds": 3.0,
            "x_epoch": 1.5,
            "x_epoch_cpu": 1.25,
        },
    ]
    rows = _run.scaling("tiny", 32, table, log=lambda message: None)
    assert [(row["axis"], row["value"]) for row in rows] == [("N", 32), ("N", 64), ("width", 16), ("width", 32)]
    reused = rows[1]
    assert reused["note"] == "the table's row" and reused["build_s"] == 3.0 and reused["x_epoch"] == 1.5
    for row in rows[:1] + rows[2:]:
        assert row["build_s"] > 0 and row["epoch_s"] > 0
        assert row["x_epoch"] == pytest.approx(row["build_s"] / row["epoch_s"])
    assert rows[3]["model"] == "mlp-1024-32-32-10" and rows[3]["n_train"] == 64


def test_exact_search_is_timed_beside_the_blas_roofline():
    rows = _run.query("tiny", log=lambda message: None)
    methods = {row["method"] for row in rows}
    assert methods >= {"torch GEMM + topk (roofline)", "gradindex ExactIndex (in memory)", "numpy GEMM + argpartition"}
    assert all(row["seconds"] > 0 for row in rows)
