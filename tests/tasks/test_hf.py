"""The hf-causal-lm and hf-classifier built-in tasks: a model folder and data files, no Python.

Rows are compared with what the tokenizer makes of the text (the trusted slow path), the per-sequence loss with the
model's own Hugging Face loss, and every mistake with its one-sentence message naming the task option to fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hf_folders import SUBJECTS, checkpoints, classifier_folder, lm_folder, write_rows

import gradindex
from gradindex.checkpoints import load_into
from gradindex.cli import cli
from gradindex.errors import TaskSpecError
from gradindex.task import load_task
from gradindex.tasks import hf_causal_lm, hf_classifier, read_rows

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return lm_folder(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return classifier_folder(tmp_path_factory.mktemp("classifier"))


def _items(dataset) -> list[dict]:
    return [{key: value.tolist() for key, value in dataset[row].items()} for row in range(len(dataset))]


# ---- reading rows ----------------------------------------------------------------------------------------------------


def test_text_rows_are_tokenized_with_the_model_folders_tokenizer(lm):
    task = hf_causal_lm(str(lm["model"]), str(lm["train"]), str(lm["test"]), sample_id="id")
    tokenizer, corpus = lm["tokenizer"], lm["corpus"]
    assert len(task.train) == len(corpus.train) and len(task.test) == len(corpus.test)
    for row, sentence in enumerate(corpus.train):
        expected = tokenizer(sentence)
        assert task.train[row]["input_ids"].tolist() == expected["input_ids"]
        assert task.train[row]["attention_mask"].tolist() == expected["attention_mask"]
        assert "labels" not in task.train[row]  # every real token is scored
    assert task.tokenizer.decode(task.test[0]["input_ids"].tolist(), skip_special_tokens=True) == corpus.test[0]
    assert task.train_sample_ids() == [f"s{row}" for row in range(len(corpus.train))]
    assert task.name == "hf-causal-lm"
    assert type(task.model()).__name__ == "GPT2LMHeadModel"


def test_every_file_kind_gives_the_same_rows(lm, tmp_path):
    """jsonl text, parquet / csv / json pre-tokenized, and datasets save_to_disk folders (one split, or several)."""
    datasets = pytest.importorskip("datasets")
    tokenizer, sentences = lm["tokenizer"], lm["corpus"].train
    expected = _items(hf_causal_lm(str(lm["model"]), str(lm["train"])).train)
    tokens = [{"input_ids": tokenizer(s)["input_ids"]} for s in sentences]
    sources = {
        "parquet": write_rows(tmp_path / "t.parquet", tokens),
        "csv": write_rows(tmp_path / "t.csv", tokens),
        "csv-text": write_rows(tmp_path / "text.csv", [{"text": s} for s in sentences]),
        "json-array": tmp_path / "t.json",
    }
    sources["json-array"].write_text(json.dumps([{"text": s} for s in sentences]))
    one = datasets.Dataset.from_list([{"text": s} for s in sentences])
    one.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": one, "test": one.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    sources["save_to_disk"] = tmp_path / "one"
    sources["DatasetDict"] = tmp_path / "dict"
    for kind, path in sources.items():
        rows = _items(hf_causal_lm(str(lm["model"]), str(path)).train)
        ids_only = [{"input_ids": row["input_ids"]} for row in rows]
        assert ids_only == [{"input_ids": row["input_ids"]} for row in expected], kind
    split = hf_causal_lm(str(lm["model"]), str(tmp_path / "dict"), test=str(tmp_path / "dict"))
    assert len(split.train) == len(sentences) and len(split.test) == 2


def test_labels_with_a_masked_prompt_score_only_the_completion(lm, tmp_path):
    """A labels column (-100 on the prompt) reaches the loss, which equals the model's own HF loss per sequence."""
    tokenizer, sentences = lm["tokenizer"], lm["corpus"].train[:6]
    rows = []
    for sentence in sentences:
        ids = tokenizer(sentence)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    path = write_rows(tmp_path / "prompts.parquet", rows)
    task = hf_causal_lm(str(lm["model"]), str(path))
    assert [task.train[row]["labels"].tolist() for row in range(6)] == [row["labels"] for row in rows]
    model = task.model().eval()
    batch = task.collate([task.train[row] for row in range(6)]) if task.collate else None
    batch = batch or gradindex.task.collate_samples([task.train[row] for row in range(6)])
    with torch.no_grad():
        losses = task.loss(model, batch)
        for row, item in enumerate(rows):
            own = model(
                input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]])
            ).loss  # transformers' shifted, -100-ignoring mean
            torch.testing.assert_close(losses[row], own, rtol=1e-5, atol=1e-6)


def test_a_prompt_column_scores_only_the_completion(lm, tmp_path):
    tokenizer = lm["tokenizer"]
    rows = [{"prompt": "the small cat ", "text": "chases a mouse ."}, {"prompt": "a dog ", "text": "buries a bone ."}]
    path = write_rows(tmp_path / "prompts.jsonl", rows)
    task = hf_causal_lm(str(lm["model"]), str(path), prompt="prompt")
    for row, item in enumerate(rows):
        ids = tokenizer(item["prompt"] + item["text"])["input_ids"]
        n_prompt = 1 + len(item["prompt"].split())  # <s> and the prompt's words
        assert task.train[row]["input_ids"].tolist() == ids
        assert task.train[row]["labels"].tolist() == [-100] * n_prompt + ids[n_prompt:]  # </s> is scored
    whole = hf_causal_lm(str(lm["model"]), str(path), text="text")
    model = task.model().eval()
    with torch.no_grad():
        completion = task.loss(model, gradindex.task.collate_samples([task.train[0]]))
        everything = whole.loss(model, gradindex.task.collate_samples([whole.train[0]]))
        ids = task.train[0]["input_ids"][None]
        own = model(input_ids=ids, labels=task.train[0]["labels"][None]).loss
    torch.testing.assert_close(completion[0], own, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(completion[0], everything[0])
    tokens = write_rows(tmp_path / "ids.jsonl", [{"input_ids": [2, 5, 3], "prompt": "x"}])
    with pytest.raises(TaskSpecError, match="prompt=prompt applies to text rows, but the train file is pre-tokenized"):
        hf_causal_lm(str(lm["model"]), str(tokens), prompt="prompt")
    with pytest.raises(TaskSpecError, match="the train file has no prompt column 'question'"):
        hf_causal_lm(str(lm["model"]), str(path), prompt="question")


def test_max_length_cuts_sequences_and_too_long_ones_name_it(lm, tmp_path):
    task = hf_causal_lm(str(lm["model"]), str(lm["train"]), max_length=4)
    assert {len(task.train[row]["input_ids"]) for row in range(len(task.train))} == {4}
    long = write_rows(tmp_path / "long.jsonl", [{"input_ids": list(range(4, 30))}])
    too_long = (
        r"row 0 of the train file has 26 tokens but the model .* takes at most 24; give the task option max_length=24"
    )
    with pytest.raises(TaskSpecError, match=too_long):
        hf_causal_lm(str(lm["model"]), str(long))
    assert len(hf_causal_lm(str(lm["model"]), str(long), max_length=24).train[0]["input_ids"]) == 24
    big = write_rows(tmp_path / "big.jsonl", [{"input_ids": [1, 2]}, {"input_ids": [3, 9999, -1]}])
    with pytest.raises(
        TaskSpecError, match="row 1 of the train file has token id 9999 but the model .* has a vocabulary"
    ):
        hf_causal_lm(str(lm["model"]), str(big))
    with pytest.raises(TaskSpecError, match="max_length must be a positive integer, got 0"):
        hf_causal_lm(str(lm["model"]), str(lm["train"]), max_length=0)


def _mistake(kind: str, lm: dict, tmp) -> dict:
    """Task options with one mistake of ``kind`` (beside the lm fixture's model)."""
    if kind == "missing file":
        return {"train": str(tmp / "nope.jsonl")}
    if kind == "unknown type":
        (tmp / "a.txt").write_text("a cat .\n")
        return {"train": str(tmp / "a.txt")}
    if kind == "no text column":
        return {"train": str(write_rows(tmp / "b.jsonl", [{"sentence": "a cat"}]))}
    if kind == "missing tokenizer folder":
        return {"train": str(lm["train"]), "tokenizer": str(tmp / "missing")}
    if kind == "no config":
        return {"model": str(tmp), "train": str(lm["train"])}
    if kind == "no train":
        return {}
    if kind == "no id column":
        return {"train": str(lm["train"]), "sample_id": "key"}
    if kind == "repeated ids":
        return {
            "train": str(write_rows(tmp / "e.jsonl", [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])),
            "sample_id": "id",
        }
    if kind == "not text":
        return {"train": str(write_rows(tmp / "c.jsonl", [{"text": 3}]))}
    if kind == "not token ids":
        return {"train": str(write_rows(tmp / "d.csv", [{"input_ids": "a b"}]))}
    raise AssertionError(kind)


MISTAKES = {
    "missing file": r"train file .*nope.jsonl does not exist; check the task option train=",
    "unknown type": r"is of an unknown type \(.txt\); give a .csv, .json, .jsonl, .ndjson, .parquet, .pq, .tsv file or",
    "no text column": r"the train file has no column 'text' and no input_ids \(its columns: sentence\); name the text "
    r"column with the task option text=COLUMN",
    "missing tokenizer folder": r"tokenizer folder .*missing does not exist; check the task option tokenizer=",
    "no config": r"model folder .* has no config.json; give the task option model=DIR",
    "no id column": r"the train file has no column 'key' for sample ids \(its columns: id, text\); check the task "
    r"option sample_id=key",
    "repeated ids": r"column 'id' of the train file repeats sample ids; give one unique id per row",
    "not text": r"row 0 of column 'text' of the train file is 3, not text",
    "not token ids": r"row 0 of column 'input_ids' of the train file is 'a b', not token ids; write them as \[1, 2",
    "no train": r"the task option train=FILE is required \(--task-arg train=FILE\): the training rows, a parquet",
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_mistakes_are_one_sentence_naming_the_option(lm, tmp_path, kind):
    options = {"model": str(lm["model"]), **_mistake(kind, lm, tmp_path)}
    with pytest.raises(TaskSpecError, match=MISTAKES[kind]):
        load_task("hf-causal-lm", **options)


def test_text_without_a_tokenizer_says_to_give_one(lm, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((lm["model"] / "config.json").read_text())
    no_tokenizer = (
        "the data has text but the model folder .*bare holds no tokenizer; give the task option tokenizer=DIR"
    )
    with pytest.raises(TaskSpecError, match=no_tokenizer):
        hf_causal_lm(str(bare), str(lm["train"]))
    task = hf_causal_lm(str(bare), str(lm["train"]), tokenizer=str(lm["model"]))  # the tokenizer from elsewhere
    assert len(task.train) == len(lm["corpus"].train)
    tokens = write_rows(tmp_path / "ids.jsonl", [{"input_ids": [2, 5, 6, 3]}])
    assert hf_causal_lm(str(bare), str(tokens)).tokenizer is None  # pre-tokenized: no tokenizer needed


def test_a_datasets_folder_without_the_split_names_them(lm, tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_list([{"text": "a cat ."}])
    datasets.DatasetDict({"validation": one}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(TaskSpecError, match=r"holds the splits validation, not 'train'; give the folder of one split"):
        read_rows(tmp_path / "dict", "train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(TaskSpecError, match="is not a datasets save_to_disk folder"):
        read_rows(tmp_path / "plain")


# ---- the classifier --------------------------------------------------------------------------------------------------


def test_classifier_names_its_classes_and_takes_string_labels(classifier):
    task = hf_classifier(str(classifier["model"]), str(classifier["train"]), str(classifier["test"]))
    table = pq.read_table(classifier["train"])
    assert task.train.classes == list(SUBJECTS)
    expected = [SUBJECTS.index(name) for name in table.column("label").to_pylist()]
    assert [int(task.train[row]["labels"]) for row in range(len(task.train))] == expected
    assert task.train[0]["input_ids"].tolist() == table.column("input_ids")[0].as_py()
    assert type(task.model()).__name__ == "BertForSequenceClassification"
    model = task.model().eval()
    batch = gradindex.task.collate_samples([task.train[row] for row in range(4)])
    with torch.no_grad():
        losses = task.loss(model, batch)
        for row in range(4):
            item = task.train[row]
            own = model(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss
            torch.testing.assert_close(losses[row], own, rtol=1e-5, atol=1e-6)


def test_classifier_labels_must_fit_the_model(classifier, tmp_path):
    model = str(classifier["model"])
    ints = write_rows(tmp_path / "ints.jsonl", [{"text": "a cat .", "target": 5}, {"text": "a dog .", "target": 0}])
    task = hf_classifier(model, str(ints), label="target")
    assert [int(task.train[row]["labels"]) for row in range(2)] == [5, 0] and task.train.classes is None
    wide = write_rows(tmp_path / "wide.jsonl", [{"text": "a cat .", "label": 6}])
    too_wide = r"row 0 of the train file has label 6 but the model in .* has num_labels=6; labels must be 0..5"
    with pytest.raises(TaskSpecError, match=too_wide):
        hf_classifier(model, str(wide))
    with pytest.raises(TaskSpecError, match="the train file has no label column 'kind'.*task option label=COLUMN"):
        hf_classifier(model, str(ints), label="kind")


# ---- through the command line ----------------------------------------------------------------------------------------


def _build(runner, task, options, specs, store, *extra):
    args = ["-q", "build", "--task", task, "-o", str(store), "--proj-dim", "16", *extra]
    for key, value in options.items():
        args += ["--task-arg", f"{key}={value}"]
    for spec in specs:
        args += ["--checkpoint", spec]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    return store


def _other_process(args, cwd):
    """The CLI in a fresh interpreter (ARROW_DEFAULT_MEMORY_POOL=system: pyarrow's mimalloc pool and torch can abort
    the interpreter at exit, after the output is written; the lead tracks that)."""
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    command = [sys.executable, "-c", "from gradindex.cli import main; main()", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_causal_lm_built_and_queried_from_the_command_line_alone(lm, tmp_path, monkeypatch):
    """Relative paths in --task-arg are recorded absolute; a later query in another process and another folder needs
    no --task, and --task-arg test=FILE there queries another file."""
    monkeypatch.chdir(lm["model"].parent)
    options = {"model": "gpt2", "train": "train.jsonl", "test": "test.jsonl", "sample_id": "id"}
    specs = checkpoints("hf-causal-lm", options, tmp_path / "run")
    assert [spec.rsplit(":", 1)[0].rsplit("/", 1)[1] for spec in specs] == ["checkpoint-3", "checkpoint-6"]
    store = _build(CliRunner(), "hf-causal-lm", options, specs, tmp_path / "lm.gradindex", "--projection", "sjlt")
    recorded = gradindex.open_store(store).manifest["task"]
    assert recorded["spec"] == "hf-causal-lm"
    assert recorded["options"] == {
        "model": str(lm["model"]),
        "train": str(lm["train"]),
        "test": str(lm["test"]),
        "sample_id": "id",
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _other_process(["query", str(store), "--samples", "0-1", "-k", "3", "--format", "jsonl"], elsewhere)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["query_id"], row["rank"]) for row in rows] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert all(row["sample_id"].startswith("s") for row in rows)
    same = gradindex.query(store, split="test", samples=[0, 1], k=3)
    assert [row["row"] for row in rows] == same.column("row").to_pylist()
    np.testing.assert_allclose([row["score"] for row in rows], same.column("score").to_numpy(), rtol=1e-5)
    # another query file through --task-arg, the rest of the recorded options kept
    other = write_rows(elsewhere / "more.jsonl", [{"text": lm["corpus"].train[5]}])
    again = _other_process(
        ["query", str(store), "--task-arg", "test=more.jsonl", "-k", "1", "--format", "json"], elsewhere
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)[0]["row"] == 5  # a training sentence is its own top proponent
    assert other.is_file()


def test_classifier_built_from_parquet_and_queried(classifier, tmp_path):
    options = {"model": str(classifier["model"]), "train": str(classifier["train"]), "test": str(classifier["test"])}
    specs = checkpoints("hf-classifier", options, tmp_path / "run", epochs=3, lr=3e-3)
    runner = CliRunner()
    store = _build(runner, "hf-classifier", options, specs, tmp_path / "c.gradindex", "--projection", "sjlt")
    labels = gradindex.open_store(store).samples().column("label").to_pylist()
    table = pq.read_table(classifier["train"])
    assert labels == [SUBJECTS.index(name) for name in table.column("label").to_pylist()]  # dict batches' labels
    result = runner.invoke(cli, ["-q", "query", str(store), "--samples", "0", "-k", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 2
    # the task's model at the last checkpoint classifies: its loss through the task equals the model's own
    task = load_task("hf-classifier", **options)
    model = load_into(task.model(), specs[-1].rsplit(":", 1)[0]).eval()
    item = task.test[0]
    with torch.no_grad():
        own = model(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss
        mine = task.loss(model, gradindex.task.collate_samples([item]))
    torch.testing.assert_close(mine[0], own, rtol=1e-5, atol=1e-6)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: kron's PCA sides call eigh, which on a 2-core machine shared with other
    work took 0.5-2 s per call with 2 OpenMP threads and milliseconds with one (measured; the lead tracks it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_default_projection_builds_gpt2(lm, tmp_path, one_thread):
    """The default (kron) projection on the tied GPT-2 of the no-Python path."""
    options = {"model": str(lm["model"]), "train": str(lm["train"]), "test": str(lm["test"])}
    specs = checkpoints("hf-causal-lm", options, tmp_path / "run")
    store = _build(CliRunner(), "hf-causal-lm", options, specs, tmp_path / "kron.gradindex")
    assert gradindex.open_store(store).fingerprint["projection"]["kind"] == "kron"
    table = gradindex.query(store, samples=[0], k=2)
    assert table.num_rows == 2 and np.isfinite(table.column("score").to_numpy()).all()


def test_arrow_tables_are_read_as_given(tmp_path):
    rows = [{"input_ids": [1, 2, 3], "text": "x"}, {"input_ids": [4], "text": "y"}]
    path = write_rows(tmp_path / "r.parquet", rows)
    assert read_rows(path).to_pylist() == pa.Table.from_pylist(rows).to_pylist()
