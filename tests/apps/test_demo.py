"""The demos: the GPT-2 one end to end at small settings (the no-Python path, detection, decoded proponents), and the
command line that picks a demo."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import gradindex
from gradindex.apps import DEMOS, run_gpt2_demo
from gradindex.cli import cli
from gradindex.tasks import procedural_corpus

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2-demo")
    lines: list[str] = []
    threads = torch.get_num_threads()
    results = run_gpt2_demo(root, n_train=160, n_test=6, epochs=4, proj_dim=32, echo=lines.append, progress=False)
    assert torch.get_num_threads() == threads  # the demo's one thread is given back
    return {"root": root, "lines": lines, "results": results}


def test_the_gpt2_demo_finds_corrupted_sentences_better_than_chance(gpt2_demo):
    results = gpt2_demo["results"]
    assert results["self_influence"]["auc"] > 0.75 > results["random"]["auc"]
    assert results["training_loss"]["auc"] > 0.9
    saved = json.loads((gpt2_demo["root"] / "results.json").read_text())
    assert saved["self_influence"] == results["self_influence"]
    ranking = pq.read_table(gpt2_demo["root"] / "self_influence.parquet")
    assert ranking.num_rows == 160


def test_the_gpt2_demo_builds_through_the_hf_causal_lm_task(gpt2_demo):
    """The store records the built-in task and its options, as `gradindex build --task hf-causal-lm --task-arg ...`
    does; the printed command names the same options and checkpoint folders."""
    root = gpt2_demo["root"]
    store = gradindex.open_store(root / "gpt2.gradindex")
    task = store.manifest["task"]
    assert task["spec"] == "hf-causal-lm"
    assert task["options"] == {
        "model": str(root / "gpt2"),
        "train": str(root / "data" / "train.jsonl"),
        "test": str(root / "data" / "test.jsonl"),
        "sample_id": "id",
    }
    checkpoints = [item["path"] for item in store.manifest["checkpoints"]]
    assert [path.rsplit("/", 1)[1] for path in checkpoints] == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]
    command = next(line for line in gpt2_demo["lines"] if line.strip().startswith("gradindex build"))
    for key, value in task["options"].items():
        assert f"--task-arg {key}={value}" in command
    assert all(f"--checkpoint {path}:0.003" in command for path in checkpoints)
    assert store.samples().column("sample_id").to_pylist()[:2] == ["train-0000", "train-0001"]
    assert gradindex.query(store, samples=[0], k=1).num_rows == 1  # the recorded task answers a query


def test_the_gpt2_demo_prints_proponents_as_decoded_text(gpt2_demo):
    corpus = procedural_corpus(n_train=160, n_test=6, corrupt_fraction=0.1, seed=0)
    lines = gpt2_demo["lines"]
    for query_id in range(3):
        assert f'  test #{query_id}: "{corpus.test[query_id]}"' in lines
    shown = [line for line in lines if line.startswith(("    + row", "    - row"))]
    assert len(shown) == 3 * (3 + 2)
    for line in shown:
        row = int(line.split()[2])
        assert f'"{corpus.train[row]}"' in line  # the training sentence, decoded from its token ids
        assert line.endswith(f"[{corpus.corruption[row]}]") == bool(corpus.corruption[row])


def test_demo_names_its_demos_and_refuses_others():
    runner = CliRunner()
    help_text = runner.invoke(cli, ["demo", "--help"])
    assert help_text.exit_code == 0 and "gradindex demo gpt2" in help_text.output
    assert set(DEMOS) == {"digits", "gpt2"}
    bad = runner.invoke(cli, ["demo", "bert"])
    assert bad.exit_code == 2 and "'bert' is not one of 'digits', 'gpt2'" in bad.output


def test_the_gpt2_demo_needs_three_epochs(tmp_path):
    with pytest.raises(gradindex.ArgumentError, match="epochs must be at least 3"):
        run_gpt2_demo(tmp_path, epochs=2, echo=lambda line: None)
