"""The scripts in examples/ run (in their --quick mode) and find what they say they find."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gradindex

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gradindex_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_here():
    tested = {"task_file", "quickstart", "curate_and_retrain"}
    assert {path.stem for path in EXAMPLES.glob("*.py")} == tested


def test_task_file_is_a_valid_task_spec():
    task = gradindex.load_task(f"{EXAMPLES / 'task_file.py'}:task")
    assert (len(task.train), len(task.test), len(task.split("val"))) == (1257, 270, 270)
    assert task.train_sample_ids()[:2] == ["digit-0000", "digit-0001"]
    noisy = gradindex.load_task(f"{EXAMPLES / 'task_file.py'}:task", flip_fraction=0.1)
    changed = int((noisy.train.tensors[1] != task.train.tensors[1]).sum())
    assert changed == 126  # round(0.1 * 1257), each moved to a different class


def test_quickstart(tmp_path):
    lines = []
    result = _load("quickstart").main(tmp_path, quick=True, echo=lambda *parts: lines.append(" ".join(map(str, parts))))
    assert result["found_top10"] > 0.5  # chance is 0.1
    assert result["kept"] == 1347 - 135
    assert (tmp_path / "report.html").is_file() and result["report"]["pictures"] == 24 + 2 + 2 * 4 * 2
    assert any("truly mislabeled" in line for line in lines)


def test_curate_and_retrain(tmp_path):
    result = _load("curate_and_retrain").main(tmp_path, quick=True, echo=lambda *parts: None)
    assert result["n_dropped"] == 135 and result["precision"] > 0.5
    assert set(result["accuracies"]) == {
        "all samples",
        "random 90%",
        "gradindex: drop top 10% self-influence",
        "oracle: drop the flipped labels",
    }
    assert all(0.5 < accuracy <= 1.0 for accuracy in result["accuracies"].values())
    assert result["share_of_threes"] > 0.3  # chance is 0.1
