"""gradindex serve: a server process started with --port 0 prints its URL first, answers query, opponents and
self-influence with exactly the tables of the direct calls (Arrow schema and values), refuses as they refuse (same
class, same sentence), wants a token off loopback, reloads a store that grew, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import tiny_tasks
from click.testing import CliRunner

import gradindex
from gradindex import ArgumentError, GradIndexError, TaskSpecError
from gradindex.cli import cli

TESTS = Path(__file__).resolve().parents[1]

# a training set that grows by appending (its first rows never change), and a test split that takes its time
_TASKS = textwrap.dedent(
    f"""
    import sys, time
    import torch
    from torch.utils.data import Dataset, TensorDataset
    sys.path.insert(0, {str(TESTS)!r})
    import gradindex, tiny_tasks

    x, y = tiny_tasks._data(160, 12, 4, seed=1)
    x_test, y_test = tiny_tasks._data(20, 12, 4, seed=2)


    class Slow(Dataset):
        def __len__(self):
            return len(x_test)

        def __getitem__(self, index):
            time.sleep(0.2)
            return x_test[index], y_test[index]


    def grow(n_train=120, slow=False):
        if slow:
            print("a task that prints while it loads")  # not before the server's URL: to stderr
        test = Slow() if slow else TensorDataset(x_test, y_test)
        return gradindex.Task(model=tiny_tasks.mlp, train=TensorDataset(x[:n_train], y[:n_train]), test=test)
    """
)


def start(store, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``gradindex serve STORE --port 0 ARGS`` in a process of its own, and the URL it printed first."""
    process = subprocess.Popen(
        [sys.executable, "-c", "from gradindex.cli import main; main()", "serve", str(store), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = process.stdout.readline().strip()
    if not url:
        process.wait(30)
        raise AssertionError(process.stderr.read())
    return process, url


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    (folder / "tasks.py").write_text(_TASKS)
    return folder


@pytest.fixture(scope="module")
def checkpoints(folder):
    return tiny_tasks.save_checkpoints(tiny_tasks.mlp, folder)


@pytest.fixture(scope="module")
def store(folder, checkpoints):
    store = gradindex.build(
        f"{folder / 'tasks.py'}:grow", checkpoints, folder / "s.gradindex", proj_dim=16, rows_per_shard=50
    )
    return str(store.path)


@pytest.fixture(scope="module")
def served(store):
    process, url = start(store)
    yield url
    assert stop(process) == 0


def test_the_first_line_is_a_loopback_url_and_the_tables_are_the_direct_ones(store, served):
    assert re.fullmatch(r"grpc://127\.0\.0\.1:\d+", served)
    with gradindex.connect(served) as server:
        for samples in ([0], [3, 1, 3], "0-4,7", None):
            for opponents in (False, True):
                asked = server.query(samples, k=7, opponents=opponents)
                direct = gradindex.query(store, samples=samples, k=7, opponents=opponents)
                assert asked.schema == direct.schema and asked.equals(direct)
        assert server.opponents([2], k=3).equals(gradindex.query(store, samples=[2], k=3, opponents=True))
        assert server.query([1], split="train", k=200).equals(gradindex.query(store, split="train", samples=[1], k=200))
        assert server.self_influence(top=9).equals(gradindex.self_influence(store, top=9))
        assert server.self_influence().equals(gradindex.self_influence(store))
        info = server.info()
    assert info["store"] == store and info["n_samples"] == 120 and info["search"] == "exact in memory"
    assert info["loads"] == 1 and info["requests"] == 13


def test_refusals_are_the_direct_errors(store, served):
    server = gradindex.connect(served)
    for asked, error, text in [
        ({"samples": [500]}, ValueError, r"query samples \[500\] are out of range: the split has 20 samples"),
        ({"samples": "x"}, ArgumentError, "samples 'x' must be indices and ranges"),
        ({"k": 0}, ArgumentError, "k must be a positive integer, got 0"),
        ({"split": "nope"}, TaskSpecError, "has no split 'nope'"),
        ({"nprobe": 4}, ArgumentError, "nprobe applies to a search through a persisted index"),
    ]:
        with pytest.raises(error, match=text) as remote:
            server.query(**asked)
        with pytest.raises(error) as direct:
            gradindex.query(store, **asked)
        assert type(remote.value) is type(direct.value) and str(remote.value) == str(direct.value)
        assert getattr(remote.value, "argument", None) == getattr(direct.value, "argument", None)
    with pytest.raises(ArgumentError, match="top must be a positive integer"):
        server.self_influence(top=0)
    with pytest.raises(ArgumentError, match="this server serves .*, not .*other.gradindex; query .* without --server"):
        server.query([0], store="other.gradindex")
    assert server.query([0], store=store).num_rows == 10  # the store it serves, named: answered


def test_the_cli_prints_the_same_with_and_without_server(store, served):
    runner = CliRunner()
    for args in (
        ["query", "--samples", "0-3", "-k", "4"],
        ["query", "--samples", "5", "--opponents", "--format", "jsonl"],
        ["query", "--samples", "2,9", "--split", "train", "--format", "csv"],
        ["self-influence", "--top", "6", "--format", "jsonl"],
        ["query", "--samples", "99"],
        ["query", "--samples", "1", "-k", "0"],
    ):
        direct = runner.invoke(cli, [args[0], store, *args[1:]])
        remote = runner.invoke(cli, [args[0], "--server", served, *args[1:]])
        named = runner.invoke(cli, [args[0], store, "--server", served, *args[1:]])
        assert (remote.exit_code, remote.output) == (direct.exit_code, direct.output) == (named.exit_code, named.output)
    out_of_range = runner.invoke(cli, ["query", "--server", served, "--samples", "99"])
    assert out_of_range.exit_code == 1 and "Error: query samples [99] are out of range" in out_of_range.output
    for flag in (["--index", "x"], ["--task", "digits"], ["--device", "cpu"], ["--allow-incomplete"]):
        refused = runner.invoke(cli, ["query", "--server", served, *flag])
        assert refused.exit_code == 2 and f"{flag[0]} is the server's setting" in refused.output
    missing = runner.invoke(cli, ["query", "--samples", "0"])
    assert missing.exit_code == 2 and "Missing argument 'STORE'" in missing.output
    token_alone = runner.invoke(cli, ["query", store, "--token", "x"])
    assert token_alone.exit_code == 2 and "--token goes with --server" in token_alone.output


def test_a_port_in_use_is_one_sentence(store, served):
    port = served.rpartition(":")[2]
    refused = subprocess.run(
        [sys.executable, "-c", "from gradindex.cli import main; main()", "serve", store, "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"Error: cannot listen on 127.0.0.1 port {port}: it is in use" in refused.stderr
    assert "give another --port N (0 picks a free one) or --host ADDRESS" in refused.stderr


def test_off_loopback_needs_a_token_and_requests_without_it_are_refused(store, checkpoints):
    refused = subprocess.run(
        [sys.executable, "-c", "from gradindex.cli import main; main()", "serve", store, "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={name: value for name, value in os.environ.items() if name != "GRADINDEX_TOKEN"},
    )
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip().startswith("Error: serving on 0.0.0.0 (not loopback) lets other machines query")
    assert "give --token SECRET (or set GRADINDEX_TOKEN)" in refused.stderr and len(refused.stderr.splitlines()) == 1

    process, url = start(store, "--token", "s3cret")
    try:
        with pytest.raises(ArgumentError, match="refused the request: it needs the token it was started with") as error:
            gradindex.connect(url).query([0])
        assert error.value.argument == "token"
        with pytest.raises(ArgumentError, match="needs the token"):
            gradindex.connect(url, token="wrong").self_influence(top=1)
        assert gradindex.connect(url, token="s3cret").query([0], k=2).equals(gradindex.query(store, samples=[0], k=2))
        runner = CliRunner()
        without = runner.invoke(cli, ["query", "--server", url, "--samples", "0"])
        assert without.exit_code == 1 and "pass --token TOKEN or set GRADINDEX_TOKEN" in without.output
        with_env = runner.invoke(cli, ["query", "--server", url, "--samples", "0"], env={"GRADINDEX_TOKEN": "s3cret"})
        assert (
            with_env.exit_code == 0 and with_env.output == runner.invoke(cli, ["query", store, "--samples", "0"]).output
        )
    finally:
        assert stop(process) == 0


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(folder, store):
    process, url = start(store, "--task", f"{folder / 'tasks.py'}:grow", "--task-arg", "slow=true")
    assert re.fullmatch(r"grpc://127\.0\.0\.1:\d+", url)
    answers = []
    asking = threading.Thread(target=lambda: answers.append(gradindex.connect(url).query("0-5", k=3)))
    asking.start()
    time.sleep(0.6)  # featurizing the six slow samples takes 1.2 s
    process.send_signal(signal.SIGTERM)
    asking.join(30)
    assert process.wait(30) == 0
    assert answers and answers[0].equals(gradindex.query(store, samples="0-5", k=3))
    assert process.stdout.read() == "" and "a task that prints while it loads" in process.stderr.read()
    with pytest.raises(GradIndexError, match="cannot reach a gradindex server at .*; start one with `gradindex serve"):
        gradindex.connect(url).query([0])


def test_a_store_that_grows_is_reloaded_or_refused(folder, checkpoints, tmp_path):
    import shutil

    grown = tmp_path / "g.gradindex"
    shutil.copytree(folder / "s.gradindex", grown)
    reloading, reloading_url = start(grown)  # the store's recorded task: the grown one after the append
    pinned, pinned_url = start(grown, "--task", f"{folder / 'tasks.py'}:grow", "--task-arg", "n_train=120")
    try:
        before = gradindex.connect(reloading_url).query([0, 1], k=150)
        assert before.num_rows == 240
        assert gradindex.connect(pinned_url).query([0], k=3).num_rows == 3
        gradindex.build(
            f"{folder / 'tasks.py'}:grow",
            checkpoints,
            grown,
            proj_dim=16,
            rows_per_shard=50,
            append=True,
            task_options={"n_train": 160},
        )
        with gradindex.connect(reloading_url) as server:
            after = server.query([0, 1], k=150)
            assert after.equals(gradindex.query(grown, samples=[0, 1], k=150)) and not after.equals(before)
            assert server.self_influence().equals(gradindex.self_influence(grown))
            assert server.info()["loads"] == 2 and server.info()["n_samples"] == 160
        with pytest.raises(
            GradIndexError,
            match="changed while this server was running and reloading it failed .*; "
            "restart `gradindex serve` with a task that matches the store",
        ):
            gradindex.connect(pinned_url).query([0])
    finally:
        assert stop(reloading) == 0 and stop(pinned) == 0


def test_error_details_round_trip():
    from gradindex.apps.client import error_from_detail
    from gradindex.apps.serving import error_detail, is_loopback

    for error in [
        ArgumentError("top", "top must be a positive integer, got 0", also=["k"]),
        gradindex.StoreWriteError("disk full; free space", 28),
        FileNotFoundError(2, "No such file or directory", "/x/y"),
        KeyError("row"),
    ]:
        again = error_from_detail(json.loads(json.dumps(error_detail(error))))
        assert type(again).__name__ == type(error).__name__ and str(again) == str(error)
        if isinstance(error, ArgumentError):
            assert again.arguments == error.arguments
        if isinstance(error, OSError):
            assert (again.errno, again.strerror, again.filename) == (error.errno, error.strerror, error.filename)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
