"""A BERT classifier on Hugging Face ``datasets`` rows (dicts of python lists, a string column, variable lengths) with
the default loss, built and queried through ``gradindex.build`` / ``gradindex.query``: the exact store holds HF's own
per-sample gradients (autograd on ``outputs.loss`` of each unpadded sample), and an sjlt store ranks like it."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig

import gradindex

VOCAB = 40
N_TRAIN, N_TEST = 24, 4


def _rows(n: int, seed: int) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        ids.append(torch.randint(1, VOCAB, (length,), generator=generator).tolist())
        labels.append(int(ids[-1][0] % 3))  # learnable: the first token decides
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "token_type_ids": [[0] * len(row) for row in ids],
            "label": labels,
            "sentence": [" ".join(map(str, row)) for row in ids],
        }
    )


def _config() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, type_vocab_size=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip


def _task() -> gradindex.Task:
    return gradindex.Task.sequence_classification(_config(), train=_rows(N_TRAIN, 0), test=_rows(N_TEST, 1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[tuple[str, float]]:
    folder = tmp_path_factory.mktemp("bert-ckpts")
    task = _task()
    torch.manual_seed(0)
    model = task.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = gradindex.collate_samples([task.train[i] for i in range(N_TRAIN)])
    saved = []
    for step in range(2):
        model.train()
        optimizer.zero_grad()
        task.loss(model, batch).mean().backward()
        optimizer.step()
        path = folder / f"ckpt-{step}.pt"
        torch.save(model.state_dict(), path)
        saved.append((str(path), 0.5))
    return saved


def _hf_gradients(task: gradindex.Task, checkpoints, dataset) -> np.ndarray:
    """φ(z) = concat over checkpoints of √η ∇ HF's own loss, each sample alone and unpadded (autograd)."""
    parts = []
    for path, weight in checkpoints:
        model = task.model()
        model.load_state_dict(torch.load(path))
        model.eval()
        per_sample = []
        for index in range(len(dataset)):
            item = dataset[index]
            loss = model(
                input_ids=torch.tensor([item["input_ids"]]),
                token_type_ids=torch.tensor([item["token_type_ids"]]),
                labels=torch.tensor([item["label"]]),
            ).loss
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            per_sample.append(np.sqrt(weight) * torch.cat([g.reshape(-1) for g in grads]).double().numpy())
        parts.append(np.stack(per_sample))
    return np.concatenate(parts, axis=1)


def _scores(table, n_queries: int) -> np.ndarray:
    data = table.to_pydict()
    scores = np.zeros((n_queries, N_TRAIN))
    for query, row, score in zip(data["query"], data["row"], data["score"]):
        scores[query, row] = score
    return scores


def test_a_bert_classifier_on_hf_rows_builds_and_queries_with_the_default_loss(tmp_path, checkpoints):
    task = _task()
    exact = gradindex.build(task, checkpoints, tmp_path / "exact.gradindex", projection="none", dtype="float32")
    trusted = _hf_gradients(task, checkpoints, task.train)
    vectors = exact.read_features().astype(np.float64)
    # the same vectors up to the order of the parameters: compare the Gram matrices (TracIn's scores)
    np.testing.assert_allclose(vectors @ vectors.T, trusted @ trusted.T, rtol=2e-4, atol=1e-6)
    assert exact.samples().column("label").to_pylist() == task.train["label"]  # labels found by convention

    queries = _hf_gradients(task, checkpoints, task.test)
    scores = _scores(gradindex.query(exact, task, split="test", k=N_TRAIN), N_TEST)
    np.testing.assert_allclose(scores, queries @ trusted.T, rtol=2e-3, atol=1e-5)

    sketched = gradindex.build(task, checkpoints, tmp_path / "sjlt.gradindex", projection="sjlt", proj_dim=2048)
    approximate = _scores(gradindex.query(sketched, task, split="test", k=N_TRAIN), N_TEST)
    for query in range(N_TEST):
        assert np.corrcoef(approximate[query], scores[query])[0, 1] > 0.9
