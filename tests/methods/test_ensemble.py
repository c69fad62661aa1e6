"""`gradindex ensemble`: cyclic fine-tuning from a checkpoint, members for GEX and for TracIn over an ensemble."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tiny_tasks
import torch
from click.testing import CliRunner
from tiny_tasks import TINY

import gradindex
from gradindex.cli import cli
from gradindex.ensemble import EnsembleConfig, EnsembleExistsError, load_ensemble, make_ensemble


def test_learning_rate_schedules_and_save_points():
    cosine = EnsembleConfig(members=3, steps=10, lr=0.1, lr_min=0.001)
    assert cosine.learning_rate(0) == pytest.approx(0.1) and cosine.learning_rate(10) == pytest.approx(0.1)
    assert cosine.learning_rate(5) == pytest.approx(0.001 + 0.099 * 0.5)
    assert cosine.learning_rate(9) < cosine.learning_rate(8) < cosine.learning_rate(1)
    assert cosine.save_steps() == [9, 19, 29]  # the end of each cycle, where the rate is lowest
    triangular = EnsembleConfig(members=2, steps=10, lr=0.1, lr_min=0.001, schedule="triangular")
    assert triangular.learning_rate(4) == pytest.approx(0.001)  # t = 1/2: FGE saves here
    assert triangular.learning_rate(9) == pytest.approx(0.1)
    assert triangular.save_steps() == [4, 14]
    assert EnsembleConfig(lr=0.2).low == pytest.approx(0.002)
    assert EnsembleConfig(schedule="constant", lr=0.3).learning_rate(7) == 0.3
    with pytest.raises(ValueError, match="schedule must be one of cosine, triangular, constant"):
        EnsembleConfig(schedule="step")
    with pytest.raises(ValueError, match="lr_min must be between 0 and lr"):
        EnsembleConfig(lr=0.1, lr_min=0.5)


def _base(tmp_path) -> str:
    return tiny_tasks.save_checkpoints(tiny_tasks.mlp, tmp_path, weights=(1.0,))[0].rsplit(":", 1)[0]


def test_members_are_deterministic_checkpoints_around_the_base(tmp_path):
    task = tiny_tasks.mlp_task(n_train=48, n_test=4)
    base = _base(tmp_path)
    made = make_ensemble(task, base, tmp_path / "ge", members=3, steps=5, lr=0.05, batch_size=16)
    assert [path.name for path in made.members] == ["member-001.pt", "member-002.pt", "member-003.pt"]
    states = [torch.load(path) for path in made.members]
    start = torch.load(base)
    for state in states:
        assert set(state) == set(start)
        assert not torch.equal(state["0.weight"], start["0.weight"])
    assert not torch.equal(states[0]["0.weight"], states[1]["0.weight"])
    again = make_ensemble(task, base, tmp_path / "again", members=3, steps=5, lr=0.05, batch_size=16)
    for first, second in zip(made.members, again.members):
        for key, value in torch.load(first).items():
            torch.testing.assert_close(torch.load(second)[key], value, rtol=0, atol=0)
    assert load_ensemble(tmp_path / "ge") == made
    assert made.gex_checkpoints() == [str(made.base), *map(str, made.members)]
    assert made.tracin_checkpoints() == [f"{path}:{1 / 3!r}" for path in made.members]
    with pytest.raises(EnsembleExistsError, match="pass overwrite=True"):
        make_ensemble(task, base, tmp_path / "ge", members=2, steps=2, lr=0.05)
    assert len(make_ensemble(task, base, tmp_path / "ge", members=2, steps=2, lr=0.05, overwrite=True).members) == 2
    assert sorted(path.name for path in (tmp_path / "ge").glob("member-*.pt")) == ["member-001.pt", "member-002.pt"]


def test_the_tasks_training_step_is_used_with_the_cyclic_rate(tmp_path):
    seen = []

    def train_step(model, batch, optimizer):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss

    plain = tiny_tasks.mlp_task(n_train=32, n_test=2)
    task = gradindex.Task(model=plain.model, train=plain.train, test=plain.test, train_step=train_step)
    config = EnsembleConfig(members=2, steps=4, lr=0.1, lr_min=0.01, schedule="triangular", batch_size=8)
    made = make_ensemble(task, _base(tmp_path), tmp_path / "ge", config)
    assert len(made.members) == 2
    # triangular: the run stops at the last member, mid-cycle
    assert seen == pytest.approx([config.learning_rate(step) for step in range(config.save_steps()[-1] + 1)])


def _per_sample_gradients(task, checkpoint: str) -> np.ndarray:
    model = task.model()
    model.load_state_dict(torch.load(checkpoint))
    rows = []
    for inputs, target in task.train:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs.unsqueeze(0)), target.unsqueeze(0)).backward()
        rows.append(torch.cat([param.grad.reshape(-1) for param in model.parameters()]).double().numpy())
    return np.stack(rows)


def test_cli_ensemble_then_gex_and_tracin_over_its_members(tmp_path):
    runner = CliRunner()
    base = _base(tmp_path)
    task_spec = f"{TINY}:mlp_task"
    result = runner.invoke(
        cli,
        [
            "ensemble",
            "--task",
            task_spec,
            "--checkpoint",
            base,
            "--members",
            "3",
            "--steps",
            "4",
            "--lr",
            "0.05",
            "-o",
            str(tmp_path / "ge"),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    assert len(made["members"]) == 3 and made["gex_checkpoints"][1:] == made["members"]
    assert made["weight_decay"] == pytest.approx(EnsembleConfig(members=3, steps=4, lr=0.05).decay)  # auto
    assert tuple(made["distances"]) == load_ensemble(tmp_path / "ge").distances and len(made["distances"]) == 3
    assert made["gex_checkpoints"][0].endswith("ckpt-0.pt")
    text = runner.invoke(
        cli,
        [
            "ensemble",
            "--task",
            task_spec,
            "--checkpoint",
            base,
            "--members",
            "2",
            "--steps",
            "2",
            "--lr",
            "0.05",
            "-o",
            str(tmp_path / "ge2"),
        ],
    )
    assert text.exit_code == 0 and "--method gex --checkpoint" in text.output and "--method tracin" in text.output
    assert "wrote 2 members to" in text.output and "(weight decay " in text.output

    gex = [
        "build",
        "--task",
        task_spec,
        "--method",
        "gex",
        "--tau",
        "0.1",
        "-o",
        str(tmp_path / "gex.gradindex"),
        "--dtype",
        "float32",
    ]
    for spec in made["gex_checkpoints"]:
        gex += ["--checkpoint", spec]
    assert runner.invoke(cli, gex).exit_code == 0
    assert gradindex.open_store(tmp_path / "gex.gradindex").dim == 3

    tracin = [
        "build",
        "--task",
        task_spec,
        "-o",
        str(tmp_path / "t.gradindex"),
        "--projection",
        "none",
        "--dtype",
        "float32",
    ]
    for spec in made["tracin_checkpoints"]:
        tracin += ["--checkpoint", spec]
    assert runner.invoke(cli, tracin).exit_code == 0, "tracin build failed"
    store = gradindex.open_store(tmp_path / "t.gradindex")
    # TracIn over the members with weights 1/M: self-influence is the members' mean squared gradient norm
    task = tiny_tasks.mlp_task()
    expected = np.mean([(_per_sample_gradients(task, path) ** 2).sum(axis=1) for path in made["members"]], axis=0)
    np.testing.assert_allclose(store.self_influence()[1], expected, rtol=1e-4)
    assert all(math.isclose(item["weight"], 1 / 3) for item in store.fingerprint["checkpoints"])


def test_auto_weight_decay_shrinks_by_a_fixed_factor_per_cycle():
    """weight_decay=None (auto) is (1 − momentum)·DECAY_PER_CYCLE / Σ lr over a cycle, summed here step by step."""
    from gradindex.ensemble import DECAY_PER_CYCLE

    for config in (
        EnsembleConfig(members=8, steps=800, lr=0.05),
        EnsembleConfig(members=2, steps=7, lr=0.2, momentum=0.5, schedule="constant"),
        EnsembleConfig(members=2, steps=10, lr=0.1, lr_min=0.0, schedule="triangular"),
    ):
        total = 0.0
        for step in range(config.steps):
            total += config.learning_rate(step)
        assert config.weight_decay is None
        assert config.decay == pytest.approx((1 - config.momentum) * DECAY_PER_CYCLE / total)
    # the paper's recipe: 800 cosine steps from 0.05 (to 0.0005) -> about 0.015
    assert EnsembleConfig(members=8, steps=800, lr=0.05).decay == pytest.approx(0.0149, abs=2e-4)
    assert EnsembleConfig(weight_decay=0).decay == 0.0 and EnsembleConfig(weight_decay="0.01").decay == 0.01
    with pytest.raises(ValueError, match="weight_decay must be a non-negative number, got -1"):
        EnsembleConfig(weight_decay=-1)


def test_members_record_their_distance_and_a_degenerate_ensemble_warns(tmp_path):
    from gradindex.ensemble import relative_distance

    task = tiny_tasks.mlp_task(n_train=48, n_test=4)
    base = _base(tmp_path)
    made = make_ensemble(task, base, tmp_path / "ge", members=2, steps=5, lr=0.05, batch_size=16)
    start = torch.load(base)
    expected = [relative_distance(torch.load(path), start) for path in made.members]
    assert made.distances == pytest.approx(expected, rel=1e-6)
    by_hand = [
        math.sqrt(
            sum(float((torch.load(path)[k].double() - v.double()).pow(2).sum()) for k, v in start.items())
            / sum(float(v.double().pow(2).sum()) for v in start.values())
        )
        for path in made.members
    ]
    assert made.distances == pytest.approx(by_hand, rel=1e-9)
    manifest = json.loads((tmp_path / "ge" / "ensemble.json").read_text())
    assert manifest["weight_decay"] == pytest.approx(made.config.decay) and manifest["config"]["weight_decay"] is None
    assert load_ensemble(tmp_path / "ge").distances == made.distances
    # members that do not move: no decay and a tiny learning rate
    with pytest.warns(gradindex.GradIndexWarning, match=r"stayed within 0\.\d+% of θ\*'s weights .*--weight-decay"):
        still = make_ensemble(
            task, base, tmp_path / "still", members=2, steps=3, lr=1e-5, weight_decay=0, batch_size=16
        )
    assert max(still.distances) < 1e-3


def test_every_cycle_starts_with_a_fresh_optimizer(tmp_path):
    """As in the GEX authors' code: no momentum is carried from one member's cycle into the next."""
    seen = []

    def train_step(model, batch, optimizer):
        seen.append(optimizer)  # the object itself (its id could be reused once it is freed)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()

    plain = tiny_tasks.mlp_task(n_train=32, n_test=2)
    task = gradindex.Task(model=plain.model, train=plain.train, test=plain.test, train_step=train_step)
    config = EnsembleConfig(members=3, steps=4, lr=0.1, batch_size=8)
    make_ensemble(task, _base(tmp_path), tmp_path / "ge", config)
    assert len({id(optimizer) for optimizer in seen[:4]}) == 1
    assert len({id(seen[0]), id(seen[4]), id(seen[8])}) == 3
    assert all(optimizer.param_groups[0]["weight_decay"] == pytest.approx(config.decay) for optimizer in seen)
