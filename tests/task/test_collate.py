"""The default collate: tuples (nested), dicts, HF ``datasets`` rows and variable-length sequences, against batches
written out by hand; the sliced TensorDataset path gives what collating its items gives."""

from __future__ import annotations

from collections import namedtuple

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from gradindex import TaskSpecError, collate_samples
from gradindex.task import gather_batch, iter_batches, labels_of, split_batch


def _equal(left, right) -> None:
    assert type(left) is type(right)
    if isinstance(left, dict):
        assert list(left) == list(right)
        for key in left:
            _equal(left[key], right[key])
    elif isinstance(left, (tuple, list)):
        assert len(left) == len(right)
        for a, b in zip(left, right):
            _equal(a, b)
    else:
        assert left.dtype == right.dtype and torch.equal(left, right)


def test_tuples_nested_tuples_and_namedtuples_stack_leaf_by_leaf():
    x = torch.randn(3, 4)
    items = [((x[i], x[i, :2]), i) for i in range(3)]
    _equal(collate_samples(items), ((x, x[:, :2]), torch.tensor([0, 1, 2])))
    Pair = namedtuple("Pair", "inputs target")
    batch = collate_samples([Pair(x[i], float(i)) for i in range(3)])
    assert type(batch) is Pair
    _equal(tuple(batch), (x, torch.tensor([0.0, 1.0, 2.0])))
    _equal(collate_samples([[x[i], i] for i in range(3)]), [x, torch.tensor([0, 1, 2])])  # a list item stays a list
    _equal(collate_samples([x[i] for i in range(3)]), x)


def test_numpy_and_python_numbers_become_tensors_float64_as_float32():
    items = [(np.arange(3, dtype=np.float64) + i, np.int64(i), True) for i in range(2)]
    features, targets, flags = collate_samples(items)
    assert features.dtype == torch.float32 and targets.dtype == torch.int64 and flags.dtype == torch.bool
    _equal(features, torch.tensor([[0.0, 1, 2], [1, 2, 3]]))
    assert collate_samples([(torch.zeros(2, dtype=torch.float64), 0)])[0].dtype == torch.float64  # tensors keep theirs


def test_dicts_of_variable_length_sequences_are_padded_and_get_an_attention_mask():
    items = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "text": "abc", "score": 0.5},
        {"input_ids": [8], "labels": [8], "text": "d", "score": 1.5},
    ]
    batch = collate_samples(items, pad_value=99)
    _equal(
        batch,
        {
            "input_ids": torch.tensor([[5, 6, 7], [8, 99, 99]]),
            "labels": torch.tensor([[-100, 6, 7], [8, -100, -100]]),
            "score": torch.tensor([0.5, 1.5]),
            "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
        },
    )  # the strings are dropped; the mask marks the real tokens
    given = collate_samples(
        [{"input_ids": [1, 2], "attention_mask": [1, 1]}, {"input_ids": [3], "attention_mask": [1]}]
    )
    _equal(given["attention_mask"], torch.tensor([[1, 1], [1, 0]]))
    same = collate_samples([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])
    assert "attention_mask" not in same  # no padding, no mask added
    named = collate_samples([{"ids": [1, 2], "target": [1, 2]}, {"ids": [3], "target": [3]}], label="target")
    _equal(named["target"], torch.tensor([[1, 2], [3, -100]]))


def test_variable_length_elements_of_tuples_pad_the_label_with_the_ignore_index():
    items = [(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])), (torch.tensor([7]), torch.tensor([8]))]
    inputs, labels = collate_samples(items)
    _equal(inputs, torch.tensor([[1, 2, 3], [7, 0, 0]]))
    _equal(labels, torch.tensor([[4, 5, 6], [8, -100, -100]]))
    frames = collate_samples([(torch.ones(3, 2), 0), (torch.ones(1, 2), 1)])[0]  # only the first dimension may vary
    _equal(frames, torch.tensor([[[1.0, 1], [1, 1], [1, 1]], [[1, 1], [0, 0], [0, 0]]]))


def test_hugging_face_datasets_rows_collate_through_the_loader():
    table = datasets.Dataset.from_dict(
        {
            "input_ids": [[3, 4, 5, 6], [7, 8], [9, 10, 11]],
            "label": [0, 1, 0],
            "sentence": ["a b c d", "e f", "g h i"],
            "pixel": [[[0.5, 1.0], [1.5, 2.0]]] * 3,
        }
    )
    (batch,) = list(iter_batches(table, range(3), batch_size=3))
    _equal(
        batch,
        {
            "input_ids": torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [9, 10, 11, 0]]),
            "label": torch.tensor([0, 1, 0]),
            "pixel": torch.tensor([[[0.5, 1.0], [1.5, 2.0]]] * 3),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]),
        },
    )
    np.testing.assert_array_equal(labels_of(batch), [0, 1, 0])
    _equal(gather_batch(table, [2, 0], None, torch.device("cpu"))["label"], torch.tensor([0, 0]))


def test_the_tensor_dataset_fast_path_equals_collating_its_items():
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    dataset = TensorDataset(x, y)
    sliced = list(iter_batches(dataset, range(10), batch_size=4))
    collated = list(iter_batches(dataset, range(10), batch_size=4, collate=collate_samples))
    assert len(sliced) == len(collated) == 3
    for fast, slow in zip(sliced, collated):
        _equal(tuple(fast), slow)


def test_labels_follow_one_rule_for_dicts_tuples_and_named_keys():
    x, y = torch.randn(3, 2), torch.tensor([2, 0, 1])
    np.testing.assert_array_equal(labels_of((x, y)), [2, 0, 1])
    np.testing.assert_array_equal(labels_of(((x, x), x, y)), [2, 0, 1])  # the last element, not the second
    np.testing.assert_array_equal(labels_of({"x": x, "label": y}), [2, 0, 1])
    np.testing.assert_array_equal(labels_of({"labels": y, "label": y + 1}), [2, 0, 1])  # labels before label
    np.testing.assert_array_equal(labels_of({"x": x, "target": y}, label="target"), [2, 0, 1])
    np.testing.assert_array_equal(labels_of((y, x), label=0), [2, 0, 1])
    assert labels_of({"input_ids": x.long()}) is None and labels_of((x,)) is None and labels_of(x) is None
    assert labels_of({"labels": torch.zeros(3, 4)}) is None  # not per-sample scalars
    inputs, labels = split_batch({"input_ids": x, "labels": y})
    assert list(inputs) == ["input_ids"] and labels is y
    inputs, labels = split_batch(((x, x), y))
    assert len(inputs) == 1 and labels is y


def test_what_cannot_be_batched_is_one_sentence():
    with pytest.raises(TaskSpecError, match="element 1 of the dataset's items is a str.*Task\\(collate=...\\)"):
        collate_samples([(torch.zeros(2), "cat"), (torch.zeros(2), "dog")])
    with pytest.raises(TaskSpecError, match="one has keys \\['a'\\], another \\['b'\\]"):
        collate_samples([{"a": 1}, {"b": 1}])
    with pytest.raises(TaskSpecError, match="only the first dimension may vary"):
        collate_samples([(torch.zeros(2, 3), 0), (torch.zeros(2, 4), 0)])
    with pytest.raises(TaskSpecError, match="no key 'target'"):
        split_batch({"x": torch.zeros(2)}, label="target")
    with pytest.raises(TaskSpecError, match="names a dict key but the batches are tuples"):
        split_batch((torch.zeros(2), torch.zeros(2)), label="target")
