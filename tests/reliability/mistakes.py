"""The mistake matrix: what a careless user types, each answered with one sentence naming the fix, a non-zero exit and
no traceback (usage errors exit 2, every other error 1). Each case also says which words its message must hold.

``make_world(root)`` builds a store and the files the mistakes point at; ``run(world)`` runs every mistake through the
command line (click's CliRunner) and returns its figures and failures. ``tests/cli/test_mistakes.py`` and
``python -m benchmarks.reliability`` both run it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from click.testing import CliRunner
from tiny_tasks import TINY

from gradindex.cli import cli

MLP = f"{TINY}:mlp_task"

# a task file with the data mistakes users make: labels out of range, NaN inputs, a loss that fails, a bad factory
BAD_TASKS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    import gradindex

    def _mlp():
        return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)

    def labels_out_of_range():
        x, y = _data(40, 1)
        y[3] = 99
        return gradindex.Task(model=_mlp, train=TensorDataset(x, y), test=TensorDataset(x[:4], y[:4]))

    def nan_first_sample():
        x, y = _data(40, 1)
        x[0, 0] = float("nan")
        return gradindex.Task(model=_mlp, train=TensorDataset(x, y), test=TensorDataset(x[1:5], y[1:5]))

    def failing_loss():
        x, y = _data(40, 1)
        def loss(model, batch):
            raise RuntimeError("the user's loss broke")
        return gradindex.Task(model=_mlp, train=TensorDataset(x, y), loss=loss)

    def raising_factory():
        raise ValueError("no data today")

    def not_a_task():
        return 42

    def wrong_model():
        x, y = _data(40, 1)
        return gradindex.Task(model=lambda: nn.Linear(12, 4), train=TensorDataset(x, y))
    """
)


def make_world(root: Path) -> dict:
    """A built store, its checkpoints, and the files the mistakes point at, under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "ckpts").mkdir()
    torch.manual_seed(0)
    from tiny_tasks import mlp

    checkpoints = []
    for position in range(2):
        path = root / "ckpts" / f"ckpt-{position}.pt"
        torch.save(mlp().state_dict(), path)
        checkpoints.append(str(path))
    nan_state = mlp().state_dict()
    nan_state["0.weight"][0, 0] = float("nan")
    torch.save(nan_state, root / "nan-weights.pt")
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (root / "fake.safetensors").write_bytes(b"\x00\x01 not safetensors")
    (root / "bad_tasks.py").write_text(BAD_TASKS)
    (root / "syntax_error.py").write_text("def task(:\n")
    (root / "notes.txt").write_text("my notes\n")
    (root / "a-folder").mkdir()
    store = root / "s.gradindex"
    args = ["build", "--task", MLP, "-o", str(store), "--proj-dim", "16", "--dtype", "float32"]
    for checkpoint in checkpoints:
        args += ["--checkpoint", f"{checkpoint}:0.5"]
    made = CliRunner().invoke(cli, ["-q", *args])
    assert made.exit_code == 0, made.output
    newer = root / "newer.gradindex"
    made = CliRunner().invoke(cli, ["-q", *[str(newer) if arg == str(store) else arg for arg in args]])
    assert made.exit_code == 0, made.output
    group = json.loads((newer / "zarr.json").read_text())
    group["attributes"]["gradindex"]["format"] = "gradindex/9"
    from gradindex.store import write_manifest

    write_manifest(newer, group["attributes"]["gradindex"])
    return {"root": root, "store": str(store), "checkpoints": checkpoints, "newer": str(newer)}


def cases(w) -> list[tuple[str, list[str], int, str]]:
    root, store, ckpt = w["root"], w["store"], w["checkpoints"][0]
    bad = f"{root}/bad_tasks.py"

    outputs = iter(range(1000))

    def build(*extra, task=MLP, checkpoint=ckpt, output=None):
        output = output or root / f"x{next(outputs)}.gradindex"  # a fresh place each: a mistake must not need another
        return ["build", "--task", task, "--checkpoint", checkpoint, "-o", str(output), *extra]

    return [
        # (name, arguments, exit code, words the message must hold)
        ("a store that is not there", ["query", str(root / "nope.gradindex")], 1, "no gradindex store at"),
        ("a regular file as the store", ["info", str(root / "notes.txt")], 1, "not a gradindex store"),
        ("a folder that is not a store", ["verify", str(root / "a-folder")], 1, "not a gradindex store"),
        ("a store of a newer format", ["info", w["newer"]], 1, "upgrade gradindex"),
        ("an unknown built-in task", build(task="digitz"), 1, "unknown task 'digitz'"),
        ("a task file that is not there", build(task=f"{root}/nope.py:task"), 1, "does not exist"),
        ("a task file with a syntax error", build(task=f"{root}/syntax_error.py:task"), 1, "SyntaxError"),
        ("a task factory that raises", build(task=f"{bad}:raising_factory"), 1, "no data today"),
        ("a task factory returning no Task", build(task=f"{bad}:not_a_task"), 1, "not a gradindex.Task"),
        ("a factory name that is not there", build(task=f"{bad}:nothing"), 1, "has no attribute 'nothing'"),
        ("a checkpoint that is not there", build(checkpoint=f"{root}/nope.pt"), 1, "does not exist"),
        ("a folder as the checkpoint", build(checkpoint=str(root / "a-folder")), 1, "is a folder"),
        ("a checkpoint glob matching nothing", build(checkpoint=f"{root}/runs-*/final.pt"), 2, "no checkpoint matches"),
        ("a checkpoint that is not a torch file", build(checkpoint=f"{root}/garbage.pt"), 1, "cannot load checkpoint"),
        ("a .safetensors file that is not one", build(checkpoint=f"{root}/fake.safetensors"), 1, "safetensors"),
        ("a checkpoint of another model", build(task=f"{bad}:wrong_model"), 1, "does not fit the task's model"),
        ("NaN inside a checkpoint's weights", build(checkpoint=f"{root}/nan-weights.pt"), 1, "NaN"),
        ("a checkpoint weight that is not a number", build(checkpoint=f"{ckpt}:fast"), 2, "must be a number"),
        ("a negative checkpoint weight", build(checkpoint=f"{ckpt}:-1"), 2, "positive number"),
        ("labels out of range", build(task=f"{bad}:labels_out_of_range"), 1, "Target 99 is out of bounds"),
        ("labels out of range, exact", build("--projection", "none", task=f"{bad}:labels_out_of_range"), 1,
         "training row 3 (sample id 3)"),
        ("NaN in the first training sample", build(task=f"{bad}:nan_first_sample"), 1, "--nonfinite skip"),
        ("NaN in the first training sample, skipped", build("--nonfinite", "skip", task=f"{bad}:nan_first_sample"), 0,
         "1 row(s) had NaN/inf vectors and were skipped"),
        ("a loss that fails", build(task=f"{bad}:failing_loss"), 1, "the user's loss broke"),
        ("a dense projection too big for memory", build("--projection", "rademacher", "--proj-dim", "1000000000"), 1,
         "featurize"),
        ("a kron option with another projection", build("--projection", "sjlt", "--kron-sides", "pca"), 1,
         "--kron-sides applies to --projection kron only"),
        ("layers that match nothing", build("--layers", "encoder.*"), 1, "--layers encoder.* match no"),
        ("building over a store without resume or overwrite", build(output=store), 1, "--resume"),
        ("overwriting a regular file", build("--overwrite", output=root / "notes.txt"), 1, "not a gradindex store"),
        ("resume and overwrite together", build("--resume", "--overwrite"), 1, "--resume and --overwrite exclude"),
        ("repair without resume", build("--repair"), 1, "--repair needs --resume"),
        ("if with several checkpoints", [*build("--method", "if"), "--checkpoint", w["checkpoints"][1]], 1,
         "uses one trained checkpoint"),
        ("a bad size", build("--featurize-memory", "12X"), 2, "must be a size"),
        ("k of zero", ["query", store, "-k", "0"], 2, "-k"),
        ("query samples out of range", ["query", store, "--samples", "500"], 1, "out of range"),
        ("query samples that are not indices", ["query", store, "--samples", "a-b"], 1, "--samples"),
        ("a split the task does not have", ["query", store, "--split", "val"], 1, "has no split 'val'"),
        ("an index that is not there", ["query", store, "--samples", "0", "--index", "ivf"], 1, "no index named"),
        ("nprobe without an index", ["query", store, "--samples", "0", "--nprobe", "4"], 1, "give --index NAME"),
        ("a damping for a tracin store", ["query", store, "--samples", "0", "--damping", "0.1"], 1,
         "built with --method tracin"),
        ("a bad dask address", ["query", store, "--samples", "0", "--dask", "local:x"], 1, "local:N"),
        ("an index factory faiss does not know", ["index", store, "--factory", "IVF,PQ1000"], 1, "faiss"),
        ("an unknown storage protocol", ["info", "nosuch://bucket/a.gradindex"], 1, "nosuch"),
        ("a storage option that is not KEY=VALUE", ["info", store, "--storage-option", "endpoint"], 2, "KEY=VALUE"),
        ("curating more than everything", ["curate", store, "--drop-top", "120%", "-o", f"{root}/k.parquet"], 1,
         "--drop-top 120% is more than 100%"),
        ("a report into a folder", ["report", store, "-o", str(root / "a-folder"), "--queries", "none"], 2, "folder"),
        ("an ensemble around a missing checkpoint",
         ["ensemble", "--task", MLP, "--checkpoint", f"{root}/nope.pt", "--members", "2", "--steps", "2", "--lr", "0.1",
          "-o", f"{root}/ge"], 1, "does not exist"),
    ]  # fmt: skip


def run(world: dict) -> tuple[dict, list[str]]:
    """Every mistake once through the command line: ``(figures, failures)``; a failure says what was wrong."""
    runner = CliRunner()
    failures = []
    every = cases(world)
    tracebacks = 0
    for name, arguments, code, words in every:
        result = runner.invoke(cli, arguments)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        uncaught = result.exception is not None and not isinstance(result.exception, SystemExit)
        problems = []
        if uncaught:
            problems.append(f"raised {type(result.exception).__name__}: {result.exception}")
        if result.exit_code != code:
            problems.append(f"exit {result.exit_code}, not {code}")
        if "Traceback" in result.output:
            problems.append("printed a traceback")
        tracebacks += uncaught or "Traceback" in result.output
        error_lines = [line for line in lines if line.startswith("Error:")]
        if len(error_lines) != (1 if code else 0):  # the one case that succeeds (a policy the user chose) has none
            problems.append(f"{len(error_lines)} 'Error:' lines")
        if words not in result.output:
            problems.append(f"message lacks {words!r}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)} -- {result.output.strip()[-300:]}")
    figures = {"mistakes": len(every), "answered in one sentence": len(every) - len(failures), "tracebacks": tracebacks}
    return figures, failures
