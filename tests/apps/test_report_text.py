"""The report for text and dict batches: decoded text (or compact token ids), labels and predictions found in dict
items, a language model's loss per sample — each compared with what the tokenizer and the model say directly."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import torch
from hf_folders import SUBJECTS, checkpoints, classifier_folder, lm_folder

import gradindex
from gradindex.apps.html_report import render_input
from gradindex.checkpoints import load_into
from gradindex.task import collate_samples, load_task

pytest.importorskip("transformers")

CARD = re.compile(r'<figure class="card[^"]*" ([^>]*)>(.*?)</figure>', re.S)
ATTRIBUTE = re.compile(r'([\w-]+)="([^"]*)"')
TEXT = re.compile(r'<div class="text tokens"[^>]*>(.*?)</div>', re.S)


def _cards(page: str, section: str) -> list[dict]:
    """The cards of one section of the page: their data- attributes and shown text."""
    body = page.split(f'<section id="{section}">', 1)[1].split("</section>", 1)[0]
    cards = []
    for attributes, inner in CARD.findall(body):
        card = dict(ATTRIBUTE.findall(attributes))
        text = TEXT.search(inner)
        card["text"] = html.unescape(text.group(1)) if text else None
        card["labels"] = html.unescape(re.sub("<[^>]+>", "", inner.split('<div class="labels">', 1)[-1]))
        cards.append(card)
    return cards


def _store(spec: str, options: dict, root, name: str):
    specs = checkpoints(spec, options, root / f"{name}-run", epochs=3, lr=3e-3)
    store = gradindex.build(
        spec, specs, root / f"{name}.gradindex", task_options=options, proj_dim=16, projection="sjlt"
    )  # the report is under test here; the default projection on GPT-2 is tests/tasks/test_hf.py's
    return store, specs


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-report")
    folders = lm_folder(root)
    options = {"model": str(folders["model"]), "train": str(folders["train"]), "test": str(folders["test"])}
    store, specs = _store("hf-causal-lm", options, root, "lm")
    return {"store": store, "specs": specs, "options": options, "root": root, **folders}


@pytest.fixture(scope="module")
def classifier_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier-report")
    folders = classifier_folder(root)
    options = {"model": str(folders["model"]), "train": str(folders["train"]), "test": str(folders["test"])}
    store, specs = _store("hf-classifier", options, root, "classifier")
    return {"store": store, "specs": specs, "options": options, "root": root, **folders}


def test_a_language_model_report_shows_decoded_text_and_each_samples_loss(lm_store, tmp_path):
    output = tmp_path / "lm.html"
    summary = gradindex.report(lm_store["store"], output=output, top=8, queries=[0, 1], k=2)
    assert summary["predictions"] is True and summary["notes"] == []
    page = output.read_text()
    assert "given <b>?</b>" not in page and "with the sample's loss at the last checkpoint" in page
    task = load_task("hf-causal-lm", **lm_store["options"])
    model = load_into(task.model(), lm_store["specs"][-1].rsplit(":", 1)[0]).eval()
    suspects = _cards(page, "suspects")
    assert [int(card["data-row"]) for card in suspects] == summary["suspects"]
    for card in suspects:
        row = int(card["data-row"])
        assert card["text"] == lm_store["corpus"].train[row]  # decoded by the task's tokenizer: the sentence itself
        with torch.no_grad():
            loss = model(input_ids=task.train[row]["input_ids"][None], labels=task.train[row]["input_ids"][None]).loss
        assert float(card["data-loss"]) == pytest.approx(float(loss), rel=1e-5)
        assert card["labels"].startswith("loss ") and card["data-predicted"] == ""
    queries = _cards(page, "queries")
    shown = {card["text"] for card in queries}
    assert lm_store["corpus"].test[0] in shown and lm_store["corpus"].test[1] in shown
    assert len(queries) == 2 * (1 + 2 + 2)  # each query, its 2 proponents and 2 opponents


def test_a_classifier_report_on_dict_items_shows_given_and_predicted_classes(classifier_store, tmp_path):
    output = tmp_path / "classifier.html"
    summary = gradindex.report(classifier_store["store"], output=output, top=6, queries=[0], k=2)
    page = output.read_text()
    assert "given <b>?</b>" not in page
    task = load_task("hf-classifier", **classifier_store["options"])
    model = load_into(task.model(), classifier_store["specs"][-1].rsplit(":", 1)[0]).eval()
    for card in _cards(page, "suspects"):
        row = int(card["data-row"])
        item = task.train[row]
        with torch.no_grad():
            logits = model(input_ids=item["input_ids"][None]).logits
        given = int(item["labels"])
        assert int(card["data-given"]) == given
        assert int(card["data-predicted"]) == int(logits.argmax())
        assert f"given {given} ({SUBJECTS[given]})" in card["labels"]
        assert card["text"] == classifier_store["corpus"].train[row]
    query = _cards(page, "queries")[0]
    test_label = int(task.test[0]["labels"])
    assert int(query["data-given"]) == test_label  # a query sample's label, read from its dict item
    assert summary["predictions"] is True


def test_the_histogram_splits_a_dict_dataset_by_the_models_disagreement(classifier_store, tmp_path):
    output = tmp_path / "h.html"
    gradindex.report(classifier_store["store"], output=output, queries="none")
    page = output.read_text()
    task = load_task("hf-classifier", **classifier_store["options"])
    model = load_into(task.model(), classifier_store["specs"][-1].rsplit(":", 1)[0]).eval()
    batch = collate_samples([task.train[row] for row in range(len(task.train))])
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(1)
    disagree = int((predicted != batch["labels"]).sum())
    counts = [int(value) for value in re.findall(r'class="bar g1" data-group="1" data-count="(\d+)"', page)]
    assert sum(counts) == disagree
    assert "model disagrees with the given label" in page


def test_token_ids_without_a_tokenizer_are_shown_compactly():
    snippet, kind = render_input(torch.arange(100), None)
    text = html.unescape(re.search(r">(.*)</div>", snippet).group(1))
    assert kind == "text" and 'title="100 tokens"' in snippet
    assert text == " ".join(map(str, range(32))) + " … " + " ".join(map(str, range(92, 100))) + " (100 tokens)"
    short, _ = render_input(np.array([7, 8, 9]), None)
    assert ">7 8 9<" in short


def test_a_task_file_inside_the_store_is_not_run_by_the_report(lm_store, tmp_path):
    """The report loads the recorded task by the rules of a query: code that comes with a store is never run."""
    import json
    import shutil

    from gradindex.store import write_manifest

    copy = tmp_path / "copy.gradindex"
    shutil.copytree(lm_store["store"].path, copy)
    marker = tmp_path / "ran"
    (copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef task():\n    raise SystemExit\n")
    manifest = json.loads((copy / "zarr.json").read_text())["attributes"]["gradindex"]
    manifest["task"] = {"spec": f"{copy / 'evil.py'}:task", "name": "evil"}
    write_manifest(copy, manifest)
    summary = gradindex.report(copy, output=tmp_path / "r.html", queries="none")
    assert not marker.exists()
    assert any("records a task file inside itself" in note for note in summary["notes"])
