"""Tables as datasets: pandas, pyarrow and HF ``datasets`` through ``TableDataset``, and a Task given a DataFrame."""

from __future__ import annotations

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from torch import nn

import gradindex
from gradindex import TableDataset, TaskSpecError
from gradindex.task import default_loss, iter_batches, labels_of

FRAME = pd.DataFrame(
    {
        "x1": [0.5, 1.5, 2.5, 3.5],
        "x2": [1, 2, 3, 4],
        "y": [0, 1, 1, 0],
        "note": ["a", "b", "c", "d"],
        "ids": [[1, 2, 3], [4], [5, 6], [7, 8, 9]],
    }
)


@pytest.mark.parametrize("kind", ["pandas", "arrow", "datasets"])
def test_every_kind_of_table_gives_the_same_rows(kind):
    table = {
        "pandas": lambda: FRAME,
        "arrow": lambda: pa.Table.from_pandas(FRAME, preserve_index=False),
        "datasets": lambda: datasets.Dataset.from_pandas(FRAME, preserve_index=False),
    }[kind]()
    dataset = TableDataset(table, label="y")
    assert len(dataset) == 4 and list(dataset.columns) == ["x1", "x2", "ids"]  # the string column is left out
    row = dataset[1]
    assert list(row) == ["x1", "x2", "ids", "labels"]
    assert row["x1"].dtype == torch.float32 and row["x2"].dtype == torch.int64 and row["labels"].item() == 1
    assert torch.equal(row["ids"], torch.tensor([4]))
    (batch,) = list(iter_batches(dataset, range(4), batch_size=4))
    assert torch.equal(batch["ids"], torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 8, 9]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]))
    np.testing.assert_array_equal(labels_of(batch), [0, 1, 1, 0])


def test_a_shuffled_hf_dataset_keeps_its_order():
    table = datasets.Dataset.from_pandas(FRAME, preserve_index=False).select([3, 0])
    dataset = TableDataset(table, columns=["x1"], label="y")
    assert [dataset[i]["x1"].item() for i in range(2)] == [3.5, 0.5]


def test_stacked_features_feed_an_mlp_and_a_task_wraps_a_dataframe():
    stacked = TableDataset(FRAME, columns=["x1", "x2"], label="y", stack=True)
    features, label = stacked[2]
    assert torch.equal(features, torch.tensor([2.5, 3.0])) and label.item() == 1
    model = nn.Linear(2, 2)
    batch = next(iter(iter_batches(stacked, range(4), batch_size=4)))
    expected = nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")
    assert torch.allclose(default_loss(model, batch), expected)

    task = gradindex.Task(model=lambda: model, train=FRAME[["x1", "x2", "y"]], test=pa.Table.from_pandas(FRAME))
    assert isinstance(task.train, TableDataset) and isinstance(task.test, TableDataset)
    assert list(task.train[0]) == ["x1", "x2", "y"]  # wrapped as it is: the label keeps its column name
    named = gradindex.Task(model=lambda: model, train=FRAME[["x1", "y"]], label="y")
    assert named.labels_of(next(iter(iter_batches(named.train, range(4), 4, named.collate)))).tolist() == [0, 1, 1, 0]


def test_what_a_table_cannot_be_is_one_sentence():
    with pytest.raises(TaskSpecError, match="no column 'z'; its columns are x1, x2, y, note, ids"):
        TableDataset(FRAME, columns=["z"])
    with pytest.raises(TaskSpecError, match="column 'note' is (large_)?string, not numbers"):
        TableDataset(FRAME, columns=["note"])
    with pytest.raises(TaskSpecError, match="column 'x1' has 1 missing values"):
        TableDataset(pd.DataFrame({"x1": [1.0, None]}))
    with pytest.raises(TaskSpecError, match="stacks numeric scalar columns"):
        TableDataset(FRAME, columns=["ids"], stack=True)
    with pytest.raises(TaskSpecError, match="pandas DataFrame, a pyarrow Table or a datasets.Dataset"):
        TableDataset([[1, 2]])
