"""The trainer: config checks, checkpoints, accuracy on real data, determinism, RNG hygiene."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from gradindex.errors import CheckpointError, NonFiniteError, TaskSpecError
from gradindex.task import Task
from gradindex.tasks import breast_cancer, digits, digits_cnn
from gradindex.training import SavedCheckpoint, TrainConfig, evaluate, train


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"epochs": 2.5}, "epochs must be a positive integer"),
        ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
        ({"lr": -1e-3}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"n_checkpoints": 0}, r"n_checkpoints must be an integer between 1 and epochs \(30\), got 0"),
        ({"epochs": 5, "n_checkpoints": 6}, r"between 1 and epochs \(5\), got 6; lower n_checkpoints"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -0.1}, "weight_decay must be a non-negative number"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, got 'rmsprop'"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_config_is_keyword_only_and_round_trips():
    with pytest.raises(TypeError):
        TrainConfig(10)  # type: ignore[misc]
    config = TrainConfig(epochs=12, lr=0.05, optimizer="adam", n_checkpoints=4)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown TrainConfig field.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_default_checkpoint_epochs():
    assert TrainConfig().checkpoint_epochs() == (10, 20, 30)
    assert TrainConfig(epochs=10, n_checkpoints=3).checkpoint_epochs() == (4, 7, 10)
    assert TrainConfig(epochs=7, n_checkpoints=1).checkpoint_epochs() == (7,)


@given(epochs=st.integers(1, 500), data=st.data())
def test_checkpoint_epochs_are_distinct_even_and_end_at_the_last_epoch(epochs, data):
    n_checkpoints = data.draw(st.integers(1, epochs))
    at = TrainConfig(epochs=epochs, n_checkpoints=n_checkpoints).checkpoint_epochs()
    assert len(at) == n_checkpoints
    assert at[-1] == epochs
    assert all(1 <= a < b for a, b in itertools.pairwise(at)) and at[0] >= 1
    gaps = [b - a for a, b in zip((0, *at), at)]
    assert max(gaps) - min(gaps) <= 1


def test_digits_mlp_learns_and_checkpoints_load(tmp_path):
    task = digits()
    config = TrainConfig(epochs=10, n_checkpoints=3)
    checkpoints = train(task, config, tmp_path / "run")
    assert [c.epoch for c in checkpoints] == [4, 7, 10]
    assert [c.path.name for c in checkpoints] == ["ckpt-004.pt", "ckpt-007.pt", "ckpt-010.pt"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt-004.pt", "ckpt-007.pt", "ckpt-010.pt"]
    assert all(c.lr == config.lr for c in checkpoints)
    for checkpoint in checkpoints:
        model = task.model()
        model.load_state_dict(torch.load(checkpoint.path, weights_only=True))
    metrics = evaluate(task, checkpoints[-1])
    assert set(metrics) == {"accuracy", "loss"}
    assert metrics["accuracy"] >= 0.9
    # Later checkpoints fit the training set better.
    train_losses = [evaluate(task, c, split="train")["loss"] for c in checkpoints]
    assert train_losses[-1] < train_losses[0]


def test_breast_cancer_logistic_regression_learns(tmp_path):
    task = breast_cancer()
    checkpoints = train(task, TrainConfig(epochs=10, n_checkpoints=1), tmp_path)
    assert evaluate(task, checkpoints[0].path)["accuracy"] >= 0.93


def test_digits_cnn_trains(tmp_path):
    task = digits_cnn()
    checkpoints = train(task, TrainConfig(epochs=4, n_checkpoints=1, lr=0.05), tmp_path)
    assert evaluate(task, str(checkpoints[0].path))["accuracy"] >= 0.8


def test_training_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    train(digits(), TrainConfig(epochs=1, n_checkpoints=1), tmp_path)
    assert torch.equal(torch.get_rng_state(), before)


def _state(path):
    return torch.load(path, weights_only=True)


def test_training_is_deterministic_given_seed(tmp_path):
    task = digits()
    config = TrainConfig(epochs=2, n_checkpoints=1, seed=3)
    torch.manual_seed(0)
    first = train(task, config, tmp_path / "a")[0]
    torch.manual_seed(99)  # the caller's RNG state must not matter
    second = train(task, config, tmp_path / "b")[0]
    third = train(task, TrainConfig(epochs=2, n_checkpoints=1, seed=4), tmp_path / "c")[0]
    a, b, c = _state(first.path), _state(second.path), _state(third.path)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], c[name]) for name in a)


def test_adam_trains(tmp_path):
    task = digits()
    checkpoints = train(task, TrainConfig(epochs=3, n_checkpoints=1, lr=0.01, optimizer="adam"), tmp_path)
    assert evaluate(task, checkpoints[0])["accuracy"] >= 0.85


def _toy_task(**fields) -> Task:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 3, generator=generator)
    targets = (inputs[:, 0] > 0).long()
    dataset = TensorDataset(inputs, targets)
    return Task(model=lambda: nn.Linear(3, 2), train=dataset, test=dataset, **fields)


def _squared_norm(model: nn.Module) -> torch.Tensor:
    return sum(p.pow(2).sum() for p in model.parameters())


def test_regularization_is_part_of_the_objective(tmp_path):
    config = TrainConfig(epochs=50, n_checkpoints=1, lr=0.1, momentum=0.0)
    free = train(_toy_task(), config, tmp_path / "free")[0]
    strong = train(_toy_task(regularization=lambda model: 0.5 * _squared_norm(model)), config, tmp_path / "l2")[0]
    norm_free = sum(float(t.pow(2).sum()) for t in _state(free.path).values())
    norm_strong = sum(float(t.pow(2).sum()) for t in _state(strong.path).values())
    assert norm_strong < norm_free / 4


def test_train_step_replaces_the_default_step(tmp_path):
    calls = []

    def train_step(model, batch, optimizer):
        assert model.training
        calls.append(len(batch[0]))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss

    train(_toy_task(train_step=train_step), TrainConfig(epochs=3, n_checkpoints=1, batch_size=16), tmp_path)
    assert calls == [16, 16, 8] * 3


def test_datasets_without_tensors_are_collated(tmp_path):
    inputs = torch.randn(30, 3, generator=torch.Generator().manual_seed(1))
    samples = [(x, int(x[0] > 0)) for x in inputs]
    task = Task(model=lambda: nn.Linear(3, 2), train=samples, test=samples)
    checkpoints = train(task, TrainConfig(epochs=30, n_checkpoints=1, batch_size=8), tmp_path)
    assert evaluate(task, checkpoints[0])["accuracy"] >= 0.9


def test_non_finite_loss_names_the_fix(tmp_path):
    task = _toy_task(loss=lambda model, batch: model(batch[0]).sum(1) * float("nan"))
    with pytest.raises(NonFiniteError, match="lower the learning rate"):
        train(task, TrainConfig(epochs=2, n_checkpoints=1), tmp_path)


def test_progress_bar_runs(tmp_path, capsys):
    train(_toy_task(), TrainConfig(epochs=2, n_checkpoints=1), tmp_path, progress=True)
    assert "epoch" in capsys.readouterr().err


def test_evaluate_takes_a_module_and_restores_its_mode(tmp_path):
    task = _toy_task()
    model = task.model()
    model.train()
    metrics = evaluate(task, model, split="train")
    assert model.training
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["loss"])
    assert evaluate(task, model.state_dict()) == metrics


def test_evaluate_reports_missing_and_mismatched_checkpoints(tmp_path):
    task = digits()
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(task, tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(3, 2).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit task 'digits'"):
        evaluate(task, SavedCheckpoint(path=wrong, epoch=1, lr=0.1))


def test_saved_checkpoint_cli_spec(tmp_path):
    checkpoint = SavedCheckpoint(path=tmp_path / "ckpt-010.pt", epoch=10, lr=0.05)
    assert checkpoint.cli_spec() == f"{tmp_path / 'ckpt-010.pt'}:0.05"


# ---- Hugging Face models: dict batches, save_pretrained checkpoint folders ----------------------------------------


@pytest.fixture(scope="module")
def lm_task(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_folders import lm_folder

    from gradindex.task import load_task

    folders = lm_folder(tmp_path_factory.mktemp("lm"), n_train=32, n_test=8)
    return load_task(
        "hf-causal-lm", model=str(folders["model"]), train=str(folders["train"]), test=str(folders["test"])
    )


def test_a_transformers_model_trains_on_dict_batches_into_checkpoint_folders(lm_task, tmp_path):
    from transformers import AutoModelForCausalLM

    from gradindex.checkpoints import load_into

    config = TrainConfig(epochs=4, n_checkpoints=2, lr=1e-2, optimizer="adam", batch_size=8)
    checkpoints = train(lm_task, config, tmp_path)
    assert [c.path.name for c in checkpoints] == ["checkpoint-8", "checkpoint-16"]  # 4 steps per epoch
    assert [(c.epoch, c.step) for c in checkpoints] == [(2, 8), (4, 16)]
    for checkpoint in checkpoints:
        files = {path.name for path in checkpoint.path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files  # the task's tokenizer beside it
        own = AutoModelForCausalLM.from_pretrained(str(checkpoint.path)).state_dict()
        ours = load_into(lm_task.model(), checkpoint.path).state_dict()
        assert own.keys() == ours.keys() and all(torch.equal(own[name], ours[name]) for name in own)
        assert torch.equal(ours["lm_head.weight"], ours["transformer.wte.weight"])  # tied, restored
    losses = [evaluate(lm_task, c, split="train") for c in checkpoints]
    assert math.isnan(losses[0]["accuracy"])  # a language model has no per-sample class
    assert losses[-1]["loss"] < losses[0]["loss"] < math.log(len(lm_task.tokenizer))  # it learns
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_checkpoint_format_pt_and_hf(lm_task, tmp_path):
    from gradindex.checkpoints import load_into

    config = TrainConfig(epochs=1, n_checkpoints=1, lr=1e-2, optimizer="adam", checkpoint_format="pt")
    (saved,) = train(lm_task, config, tmp_path / "pt")
    assert saved.path.name == "ckpt-001.pt"
    model = load_into(lm_task.model(), saved.path)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    with pytest.raises(TaskSpecError, match="checkpoint_format='hf' saves transformers models, but task 'digits'"):
        train(digits(), TrainConfig(epochs=1, n_checkpoints=1, checkpoint_format="hf"), tmp_path / "hf")
    with pytest.raises(ValueError, match="checkpoint_format must be one of auto, pt, hf"):
        TrainConfig(checkpoint_format="safetensors")


def test_evaluate_reads_dict_batches_of_a_classifier(tmp_path):
    pytest.importorskip("transformers")
    from hf_folders import classifier_folder

    from gradindex.checkpoints import load_into
    from gradindex.task import collate_samples, load_task

    folders = classifier_folder(tmp_path, n_train=32, n_test=8)
    task = load_task(
        "hf-classifier", model=str(folders["model"]), train=str(folders["train"]), test=str(folders["test"])
    )
    (saved,) = train(task, TrainConfig(epochs=3, n_checkpoints=1, lr=3e-3, optimizer="adam"), tmp_path / "run")
    metrics = evaluate(task, saved, split="train")
    model = load_into(task.model(), saved.path).eval()
    batch = collate_samples([task.train[row] for row in range(len(task.train))])
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    expected = float((outputs.logits.argmax(1) == batch["labels"]).float().mean())
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["loss"] == pytest.approx(float(outputs.loss), rel=1e-5)  # the mean of the per-sample losses
