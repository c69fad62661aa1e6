"""A store built from checkpoint folders (``FOLDER:WEIGHT``) and queried in a later process through the command line,
which reads the folders again and checks their sha256; what may change in a folder after the build, and what may not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import tied_models
import torch
from safetensors.torch import load_file, save_file

import gradindex
from gradindex.checkpoints import checkpoint_sha256


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The gradindex command in a process of its own."""
    code = "import sys; from gradindex.cli import main; sys.argv[0] = 'gradindex'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A Trainer output folder with two checkpoints, and a TracIn store built from both folders."""
    root = tmp_path_factory.mktemp("folders")
    folders = [root / "out" / f"checkpoint-{step}" for step in (4, 8)]
    for seed, folder in zip((41, 42), folders):
        tied_models.save_gpt2(folder, seed)
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": seed}))
    store = gradindex.build(
        f"{tied_models.TIED}:gpt2_task",
        [f"{folders[0]}:0.1", f"{folders[1]}:0.05"],
        root / "lm.gradindex",
        projection="sjlt",
        proj_dim=32,
        dtype="float32",
    )
    return root, folders, store


def test_the_store_records_each_folder_and_its_weight_files_digest(built):
    _, folders, store = built
    recorded = store.manifest["checkpoints"]
    assert [item["path"] for item in recorded] == [str(folder) for folder in folders]
    assert [item["weight"] for item in recorded] == [0.1, 0.05]
    assert [item["sha256"] for item in store.fingerprint["checkpoints"]] == [checkpoint_sha256(f) for f in folders]


def test_a_later_process_queries_through_the_folders(built):
    root, folders, store = built
    expected = gradindex.query(store, split="test", k=3)
    # the trainer's other files may change: only the weights count
    (folders[0] / "optimizer.pt").write_bytes(b"resumed and saved again")
    (folders[1] / "trainer_state.json").write_text("{}")
    result = _cli("query", str(store.path), "-k", "3", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["query"], row["row"]) for row in rows] == list(
        zip(expected.column("query").to_pylist(), expected.column("row").to_pylist())
    )
    assert [row["score"] for row in rows] == pytest.approx(expected.column("score").to_pylist(), rel=1e-5)
    # moved folders are named with --checkpoint, weights and all
    moved = root / "moved"
    shutil.copytree(folders[0].parent, moved)
    result = _cli(
        "query", str(store.path), "-k", "3", "--format", "jsonl",
        "--checkpoint", str(moved / "checkpoint-4"), "--checkpoint", f"{moved / 'checkpoint-8'}:0.05",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["score"] for line in result.stdout.splitlines()] == pytest.approx(
        expected.column("score").to_pylist(), rel=1e-5
    )


def test_changed_weights_in_a_folder_are_refused(built):
    root, folders, store = built
    changed = root / "changed"
    shutil.copytree(folders[1], changed)
    weights = changed / "model.safetensors"
    save_file({name: value * 1.01 for name, value in load_file(weights).items()}, weights)
    result = _cli("query", str(store.path), "--checkpoint", str(folders[0]), "--checkpoint", str(changed))
    assert result.returncode == 1
    assert f"checkpoints[1].sha256: {changed} is not the file store" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_trainer_output_folder_as_the_checkpoint_is_one_sentence(built, tmp_path):
    root, _, _ = built
    result = _cli(
        "build", "--task", f"{tied_models.TIED}:gpt2_task", "--checkpoint", f"{root / 'out'}:0.1", "-o",
        str(tmp_path / "x.gradindex"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "is a Trainer output folder holding checkpoint-4, checkpoint-8 and no weights of its own; give one" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
