"""The built-in tasks: shapes, dtypes, determinism, label noise, option checks."""

from __future__ import annotations

import importlib.util
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from gradindex.errors import TaskSpecError
from gradindex.task import Task, load_task
from gradindex.tasks import (
    BUILTIN_TASKS,
    LabelNoise,
    breast_cancer,
    digits,
    digits_cnn,
    digits_with_info,
    flip_labels,
    mnist1d_with_info,
)

HAS_MNIST1D = importlib.util.find_spec("mnist1d") is not None
needs_mnist1d = pytest.mark.skipif(not HAS_MNIST1D, reason="the optional mnist1d package is not installed")

# name -> (n_train, n_test, input shape, n_classes, sample-id prefix)
EXPECTED = {
    "digits": (1347, 450, (64,), 10, "digits"),
    "digits-cnn": (1347, 450, (1, 8, 8), 10, "digits"),
    "breast-cancer": (426, 143, (30,), 2, "breast-cancer"),
    "mnist1d": (4000, 1000, (40,), 10, "mnist1d"),
    "mnist1d-cnn": (4000, 1000, (1, 40), 10, "mnist1d"),
}


# the built-ins that take a model folder and data files (tests/tasks/test_hf.py)
HF_TASKS = {"hf-causal-lm", "hf-classifier"}


def test_every_builtin_is_listed_and_expected():
    assert set(BUILTIN_TASKS) == set(EXPECTED) | HF_TASKS


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=needs_mnist1d) if name.startswith("mnist1d") else name for name in EXPECTED],
)
def test_builtin_loads_by_name(name):
    n_train, n_test, input_shape, n_classes, prefix = EXPECTED[name]
    task = load_task(name)
    assert isinstance(task, Task)
    assert task.name == name
    for dataset, n_samples in ((task.train, n_train), (task.test, n_test)):
        assert isinstance(dataset, TensorDataset)
        inputs, targets = dataset.tensors
        assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
        assert tuple(inputs.shape) == (n_samples, *input_shape)
        assert tuple(targets.shape) == (n_samples,)
        assert int(targets.min()) >= 0 and int(targets.max()) == n_classes - 1
        assert torch.isfinite(inputs).all()
    ids = task.train_sample_ids()
    assert len(ids) == n_train == len(set(ids))
    assert ids[17] == f"{prefix}/train/0017"
    assert all(re.fullmatch(rf"{prefix}/train/\d{{4}}", sample_id) for sample_id in ids)
    model = task.model()
    assert tuple(model(task.train.tensors[0][:5]).shape) == (5, n_classes)
    per_sample = task.loss(model, task.train.tensors)
    assert tuple(per_sample.shape) == (n_train,)


def test_digits_pixels_are_scaled_and_split_is_stratified():
    task = digits()
    x_train, y_train = task.train.tensors
    _x_test, y_test = task.test.tensors
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    train_share = torch.bincount(y_train, minlength=10) / len(y_train)
    test_share = torch.bincount(y_test, minlength=10) / len(y_test)
    assert torch.allclose(train_share, test_share, atol=0.01)


def test_digits_is_deterministic_given_seed():
    first, second = digits(seed=3), digits(seed=3)
    for a, b in zip(first.train.tensors + first.test.tensors, second.train.tensors + second.test.tensors):
        assert torch.equal(a, b)
    assert first.sample_ids == second.sample_ids


def test_digits_seeds_give_different_splits():
    a, b = digits(seed=0), digits(seed=1)
    assert not torch.equal(a.train.tensors[0], b.train.tensors[0])
    rows_a = {tuple(row.tolist()) for row in a.test.tensors[0]}
    rows_b = {tuple(row.tolist()) for row in b.test.tensors[0]}
    assert rows_a != rows_b


def test_model_factory_builds_fresh_models_with_one_architecture():
    task = digits(hidden=16)
    first, second = task.model(), task.model()
    assert first is not second
    assert isinstance(first, torch.nn.Sequential)
    assert [(n, p.shape) for n, p in first.named_parameters()] == [(n, p.shape) for n, p in second.named_parameters()]
    assert first[0].out_features == 16


def test_cached_data_is_not_changed_by_editing_a_task():
    task = digits()
    task.train.tensors[0].fill_(7.0)
    task.train.tensors[1].fill_(0)
    fresh = digits()
    assert float(fresh.train.tensors[0].max()) == 1.0
    assert int(fresh.train.tensors[1].max()) == 9


def test_digits_cnn_is_the_digits_data_as_images():
    flat, images = digits(seed=2), digits_cnn(seed=2)
    assert torch.equal(flat.train.tensors[0].reshape(-1, 1, 8, 8), images.train.tensors[0])
    assert torch.equal(flat.train.tensors[1], images.train.tensors[1])
    assert flat.sample_ids == images.sample_ids


def test_flip_fraction_flips_exactly_the_reported_rows():
    clean_task = digits(seed=5)
    task, noise = digits_with_info(flip_fraction=0.1, seed=5)
    n_train = len(task.train)
    assert isinstance(noise, LabelNoise)
    assert noise.n_flipped == round(0.1 * n_train) == 135
    assert noise.flipped_rows.dtype == np.int64
    assert np.all(np.diff(noise.flipped_rows) > 0)
    flipped = noise.flipped_mask
    assert np.all(noise.noisy_labels[flipped] != noise.clean_labels[flipped])
    assert np.array_equal(noise.noisy_labels[~flipped], noise.clean_labels[~flipped])
    # The task trains on the noisy labels; the clean ones are the noise-free task's, on the same split.
    assert np.array_equal(task.train.tensors[1].numpy(), noise.noisy_labels)
    assert np.array_equal(clean_task.train.tensors[1].numpy(), noise.clean_labels)
    assert torch.equal(clean_task.train.tensors[0], task.train.tensors[0])
    assert torch.equal(clean_task.test.tensors[1], task.test.tensors[1])


def test_flip_is_deterministic_and_digits_returns_the_same_task():
    task, noise = digits_with_info(flip_fraction=0.2, seed=9)
    _again, noise_again = digits_with_info(flip_fraction=0.2, seed=9)
    assert np.array_equal(noise.flipped_rows, noise_again.flipped_rows)
    assert np.array_equal(noise.noisy_labels, noise_again.noisy_labels)
    assert torch.equal(digits(flip_fraction=0.2, seed=9).train.tensors[1], task.train.tensors[1])
    _, other = digits_with_info(flip_fraction=0.2, seed=10)
    assert not np.array_equal(noise.flipped_rows, other.flipped_rows)


def test_no_flip_reports_no_rows():
    _, noise = digits_with_info()
    assert noise.n_flipped == 0
    assert np.array_equal(noise.clean_labels, noise.noisy_labels)


def test_flipped_labels_are_spread_over_the_other_classes():
    _, noise = digits_with_info(flip_fraction=1.0, seed=0)
    offsets = (noise.noisy_labels - noise.clean_labels) % 10
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0
    # 1347 flips over 9 offsets: about 150 each; a biased draw (e.g. always +1) fails this.
    assert counts[1:].min() > 100 and counts[1:].max() < 200


@settings(max_examples=60, deadline=None)
@given(
    n_classes=st.integers(2, 12),
    n_samples=st.integers(1, 300),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_flip_labels_properties(n_classes, n_samples, fraction, seed, data):
    labels = np.array(data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n_samples, max_size=n_samples)))
    noise = flip_labels(labels, fraction, n_classes, seed)
    assert noise.n_flipped == int(round(fraction * n_samples))
    assert len(set(noise.flipped_rows.tolist())) == noise.n_flipped
    assert np.array_equal(noise.clean_labels, labels)
    changed = np.flatnonzero(noise.noisy_labels != noise.clean_labels)
    assert np.array_equal(changed, noise.flipped_rows)
    assert noise.noisy_labels.min() >= 0 and noise.noisy_labels.max() < n_classes


def test_breast_cancer_is_standardized_with_an_l2_term():
    task = breast_cancer(l2=0.5)
    x_train = task.train.tensors[0]
    assert torch.allclose(x_train.mean(0), torch.zeros(30), atol=1e-5)
    assert torch.allclose(x_train.std(0, unbiased=False), torch.ones(30), atol=1e-4)
    model = task.model()
    assert isinstance(model, torch.nn.Linear) and (model.in_features, model.out_features) == (30, 2)
    expected = 0.25 * sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    penalty = task.regularization(model)
    assert penalty.requires_grad and penalty.ndim == 0
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    assert breast_cancer(l2=0.0).regularization is None


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("digits", {"flip_fraction": 1.5}, r"flip_fraction must be in \[0, 1\], got 1.5"),
        ("digits", {"flip_fraction": -0.1}, r"flip_fraction must be in \[0, 1\]"),
        ("digits", {"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\)"),
        ("digits", {"hidden": 0}, "hidden must be a positive integer"),
        ("digits", {"seed": -1}, "seed must be a non-negative integer"),
        ("digits-cnn", {"channels": 0}, "channels must be a positive integer"),
        ("breast-cancer", {"l2": -1.0}, "l2 must be a non-negative number"),
        ("digits", {"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_options_raise_task_spec_errors(name, options, message):
    with pytest.raises(TaskSpecError, match=message):
        load_task(name, **options)


def test_unknown_architecture_is_rejected():
    with pytest.raises(TaskSpecError, match="architecture must be 'mlp' or 'cnn'"):
        digits_with_info(architecture="resnet")


@needs_mnist1d
def test_mnist1d_leaves_global_random_state_alone_and_flips_labels():
    numpy_state, python_state = np.random.get_state(), random.getstate()
    task, noise = mnist1d_with_info(flip_fraction=0.05, seed=1, n_samples=1000, data_seed=7)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert random.getstate() == python_state
    assert len(task.train) == 800 and len(task.test) == 200
    assert noise.n_flipped == 40
    again, _ = mnist1d_with_info(flip_fraction=0.05, seed=1, n_samples=1000, data_seed=7)
    assert torch.equal(task.train.tensors[0], again.train.tensors[0])


def test_default_margin_is_true_logit_minus_logsumexp_of_the_others_and_runs_under_vmap():
    from gradindex.task import default_margin

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    inputs, targets = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 1, 0, 2])
    logits = model(inputs).detach().double()
    expected = torch.tensor(
        [
            logits[i, targets[i]]
            - torch.logsumexp(torch.cat([logits[i, : targets[i]], logits[i, targets[i] + 1 :]]), dim=0)
            for i in range(len(targets))
        ]
    )
    assert torch.allclose(default_margin(model, (inputs, targets)).double(), expected, atol=1e-5)
    # per sample under vmap (how TRAK calls it) equals the batched call
    per_sample = torch.vmap(lambda x, y: default_margin(model, (x[None], y[None]))[0])(inputs, targets)
    assert torch.allclose(per_sample, default_margin(model, (inputs, targets)), atol=1e-6)


def test_task_options_reach_the_factory_and_the_manifest(tmp_path):
    """``task_options`` in Python, as ``--task-arg`` on the command line: given to the factory, recorded beside the
    spec, reused by a query without a task; a Task object takes none; values must be recordable."""
    import gradindex
    from gradindex.training import TrainConfig, train

    (saved,) = train(digits(hidden=8), TrainConfig(epochs=1, n_checkpoints=1), tmp_path / "run")
    options = {"hidden": 8, "flip_fraction": 0.1}
    store = gradindex.build(
        "digits", [saved.cli_spec()], tmp_path / "s.gradindex", proj_dim=8, projection="sjlt", task_options=options
    )
    assert store.manifest["task"] == {"spec": "digits", "name": "digits", "options": options}
    assert gradindex.query(store, samples=[0], k=1).num_rows == 1  # hidden=8 from the manifest, not the default 32
    with pytest.raises(gradindex.IncompatibleStoreError, match=r"model\.parameters"):
        gradindex.query(store, "digits", samples=[0], k=1)  # with a spec, only the options given count
    with pytest.raises(gradindex.ArgumentError, match="a Task object takes none"):
        gradindex.build(digits(), [saved.cli_spec()], tmp_path / "t.gradindex", task_options={"hidden": 8})
    with pytest.raises(
        gradindex.ArgumentError, match=r"task option hidden=.* cannot be recorded in the store's manifest"
    ):
        gradindex.build("digits", [saved.cli_spec()], tmp_path / "u.gradindex", task_options={"hidden": object()})
    with pytest.raises(TaskSpecError, match="unexpected keyword argument 'hiden'"):
        gradindex.build("digits", [saved.cli_spec()], tmp_path / "v.gradindex", task_options={"hiden": 8})
