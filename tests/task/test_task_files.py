"""Task files load the same way in every process: a class they define keeps one name (a store built in one process is
queried in another, and after the file moved), and they import their sibling modules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradindex
from gradindex import TaskSpecError
from gradindex.task import TASK_FILE_PREFIX, load_task, model_class_name

HELPERS = textwrap.dedent(
    """
    import torch

    def tokens(n, seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 20, (n, 6), generator=generator), torch.randint(0, 3, (n,), generator=generator)
    """
)

TASK_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import gradindex
    from bag_helpers import tokens  # a sibling module


    class BagOfEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.EmbeddingBag(20, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.embed(ids))


    def task():
        return gradindex.Task(
            model=BagOfEmbeddings, train=TensorDataset(*tokens(30, 0)), test=TensorDataset(*tokens(4, 1)), name="bag"
        )


    def lazy():
        from bag_lazy import make  # imported when the factory runs, after the file loaded

        return make()
    """
)


def _write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bag_helpers.py").write_text(HELPERS)
    (folder / "bag_task.py").write_text(TASK_FILE)
    return folder / "bag_task.py"


def _forget(*names: str) -> None:
    for name in names:  # sibling modules are cached by their plain names, as any import is
        sys.modules.pop(name, None)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    command = [sys.executable, "-c", "from gradindex.cli import main; main()", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_store_of_a_task_file_class_is_queried_by_other_processes_and_after_the_file_moved(tmp_path):
    task_path = _write_task(tmp_path / "project")
    _forget("bag_helpers")
    model = load_task(f"{task_path}:task").model()
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), checkpoint)

    built = _cli(
        "build", "--task", f"{task_path}:task", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "bag.gradindex"),
        "--projection", "none", cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    manifest = gradindex.open_store(tmp_path / "bag.gradindex").fingerprint
    assert manifest["model"]["class"] == "bag_task.py:BagOfEmbeddings"

    first, second = (
        _cli("query", str(tmp_path / "bag.gradindex"), "--samples", "0-3", "-k", "3", "--format", "jsonl", cwd=tmp_path)
        for _ in range(2)
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(rows) == 12 and first.stdout == second.stdout

    moved = _write_task(tmp_path / "elsewhere" / "deeper")  # the same file in another folder
    shutil.rmtree(tmp_path / "project")
    again = _cli(
        "query", str(tmp_path / "bag.gradindex"), "--task", f"{moved}:task", "--samples", "0-3", "-k", "3",
        "--format", "jsonl", cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_the_module_name_is_derived_from_the_path_and_the_class_name_from_the_file(tmp_path):
    one, two = _write_task(tmp_path / "a"), _write_task(tmp_path / "b")
    _forget("bag_helpers")
    model_one = load_task(f"{one}:task").model()
    _forget("bag_helpers")
    model_two = load_task(f"{two}:task").model()
    module_one, module_two = type(model_one).__module__, type(model_two).__module__
    assert module_one.startswith(TASK_FILE_PREFIX + "bag_task_") and module_one != module_two  # two files, two modules
    assert sys.modules[module_one].__file__ == str(one) and sys.modules[module_two].__file__ == str(two)
    assert model_class_name(model_one) == model_class_name(model_two) == "bag_task.py:BagOfEmbeddings"
    assert model_class_name(torch.nn.Linear) == "torch.nn.modules.linear.Linear"  # other classes: module.qualname
    again = load_task(f"{one}:task").model()
    assert type(again).__module__ == module_one  # the same name every time the file loads


def test_the_module_name_does_not_depend_on_the_process(tmp_path):
    task_path = _write_task(tmp_path / "project")
    code = (
        "import sys; from gradindex.task import load_task; "
        f"print(type(load_task({str(task_path) + ':task'!r}).model()).__module__)"
    )
    names = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)}, capture_output=True,
            text=True, check=True, timeout=120,
        ).stdout.strip()
        for seed in (1, 2)
    }  # fmt: skip
    assert len(names) == 1 and next(iter(names)).startswith(TASK_FILE_PREFIX)


def test_a_task_file_imports_its_siblings_while_it_loads_and_later(tmp_path):
    task_path = _write_task(tmp_path / "project")
    (task_path.parent / "bag_lazy.py").write_text("from bag_task import task as make\n")
    _forget("bag_helpers", "bag_lazy", "bag_task")
    folder = str(task_path.parent)
    before = list(sys.path)
    try:
        task = load_task(f"{task_path}:lazy")
        assert isinstance(task, gradindex.Task) and task.name == "bag"
        assert sys.path[-1] == folder and folder not in before  # after loading: last, shadowing nothing installed
    finally:
        sys.path[:] = before
        _forget("bag_helpers", "bag_lazy", "bag_task")


def test_a_missing_sibling_says_which_folder_was_on_the_path(tmp_path):
    folder = tmp_path / "lonely"
    folder.mkdir()
    (folder / "task.py").write_text("from no_such_sibling import thing\n")
    with pytest.raises(TaskSpecError, match=r"ModuleNotFoundError.*no_such_sibling.*folder .*lonely was on sys.path"):
        load_task(f"{folder / 'task.py'}:task")
    (folder / "later.py").write_text("def task():\n    import also_missing\n")
    with pytest.raises(TaskSpecError, match=r"raised ModuleNotFoundError.*also_missing.*lonely was on sys.path"):
        load_task(f"{folder / 'later.py'}:task")
