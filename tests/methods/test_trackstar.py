"""TrackStar's corrections (Chang et al. 2024): Adam's second moments read from a checkpoint's optimizer state as a
diagonal normaliser (exact on the vmap path, Adafactor's rank-1 factors folded into the kron sides), unit
normalisation after it, and the query curvature mixed into the preconditioner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradindex
from gradindex.checkpoints import load_optimizer_moments
from gradindex.errors import CheckpointError
from gradindex.featurize import load_checkpoints
from gradindex.methods import Preconditioner, PreconditionGroup, make_featurizer
from gradindex.projection import ProjectionSpec
from tests.tiny_tasks import cnn_task, mlp_task


def _adam_run(model: nn.Module, task: gradindex.Task, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    inputs, targets = task.train.tensors
    for step in range(steps):
        optimizer.zero_grad()
        rows = slice(16 * step, 16 * step + 16)
        task.loss(model, (inputs[rows], targets[rows])).mean().backward()
        optimizer.step()


def _trained(
    task: gradindex.Task, eps: float = 1e-8, epochs: int = 1, **adam
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = task.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, eps=eps, **adam)
    for _ in range(epochs):
        _adam_run(model, task, optimizer)
    return model, optimizer


def _expected(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """v̂ = exp_avg_sq / (1 − β₂^step) of every parameter, straight from the live optimizer."""
    beta2 = optimizer.param_groups[0]["betas"][1]
    found = {}
    for name, param in model.named_parameters():
        state = optimizer.state[param]
        found[name] = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
    return found


def _assert_moments(found, expected) -> None:
    assert sorted(found.moments) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(found.moments[name], value, rtol=1e-6, atol=0)


# ---- reading optimizer state from each checkpoint format ------------------------------------------------------------


def test_plain_torch_save_dict(tmp_path):
    task = mlp_task()
    model, optimizer = _trained(task)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    found = load_optimizer_moments(task.model(), path)
    _assert_moments(found, _expected(model, optimizer))
    assert found.eps["0.weight"] == 1e-8 and len(found.sha256) == 64


def test_named_parameters_optimizer_records_names(tmp_path):
    task = mlp_task()
    torch.manual_seed(0)
    model = task.model()
    optimizer = torch.optim.Adam(list(model.named_parameters())[::-1], lr=1e-2)  # any order: the names decide
    _adam_run(model, task, optimizer)
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
    _assert_moments(load_optimizer_moments(task.model(), path), _expected(model, optimizer))


def test_lightning_checkpoint(tmp_path):
    task = mlp_task()
    model, optimizer = _trained(task)
    path = tmp_path / "epoch=2.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
            "optimizer_states": [optimizer.state_dict()],
            "global_step": 3,
        },
        path,
    )
    _assert_moments(load_optimizer_moments(task.model(), path), _expected(model, optimizer))


def test_hf_trainer_folder_with_decay_groups(tmp_path):
    """A Trainer checkpoint-N folder: save_pretrained weights beside optimizer.pt from the Trainer's two parameter
    groups (transformers' own get_parameter_names picks the decayed ones, as Trainer.get_decay_parameter_names)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.trainer_pt_utils import get_parameter_names

    config = GPT2Config(vocab_size=31, n_embd=16, n_layer=1, n_head=2, n_positions=12, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], patterns))
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    ids = torch.randint(0, 31, (4, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    folder = tmp_path / "checkpoint-2"
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    found = load_optimizer_moments(GPT2LMHeadModel(config), folder)
    _assert_moments(found, _expected(model, optimizer))
    assert found.source.endswith("optimizer.pt")


def test_amsgrad_uses_the_running_maximum(tmp_path):
    task = mlp_task()
    model, optimizer = _trained(task, amsgrad=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    found = load_optimizer_moments(task.model(), path)
    param = dict(model.named_parameters())["2.weight"]
    state = optimizer.state[param]
    torch.testing.assert_close(found.moments["2.weight"], state["max_exp_avg_sq"] / (1 - 0.999 ** float(state["step"])))


def test_refusals_name_the_fix(tmp_path):
    task = mlp_task()
    model, _ = _trained(task)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"holds no optimizer state.*torch.save\(\{'model'"):
        load_optimizer_moments(task.model(), bare)
    folder = tmp_path / "checkpoint-9"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="optimizer.pt or optimizer.bin"):
        load_optimizer_moments(task.model(), folder)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _adam_run(model, task, sgd, steps=1)
    path = tmp_path / "sgd.pt"
    torch.save({"model": model.state_dict(), "optimizer": sgd.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"no Adam second moments \(exp_avg_sq; it holds momentum_buffer\)"):
        load_optimizer_moments(task.model(), path)
    # an optimizer over the parameters in another order: the shapes do not fit, and the numbering is refused
    shuffled = torch.optim.Adam(list(model.parameters())[::-1], lr=1e-2)
    _adam_run(model, task, shuffled, steps=1)
    path = tmp_path / "shuffled.pt"
    torch.save({"model": model.state_dict(), "optimizer": shuffled.state_dict()}, path)
    with pytest.raises(CheckpointError, match="numbering is not this model's"):
        load_optimizer_moments(task.model(), path)
    fresh = torch.optim.Adam(model.parameters())
    path = tmp_path / "fresh.pt"
    torch.save({"model": model.state_dict(), "optimizer": fresh.state_dict()}, path)
    with pytest.raises(CheckpointError, match="had taken no step"):
        load_optimizer_moments(task.model(), path)


# ---- the normaliser on the exact and kron paths ----------------------------------------------------------------------


def _per_sample_loop(task, state: dict, denominators: dict, rows: range) -> torch.Tensor:
    """Trusted slow path: one backward() per sample, each gradient divided by √v̂ + ε, flattened in model order."""
    model = task.model()
    model.load_state_dict(state)
    inputs, targets = task.train.tensors
    found = []
    for row in rows:
        model.zero_grad()
        task.loss(model, (inputs[row : row + 1], targets[row : row + 1])).sum().backward()
        found.append(torch.cat([(p.grad / denominators[n]).reshape(-1) for n, p in model.named_parameters()]))
    return torch.stack(found)


def _featurizer(task, path, projection: ProjectionSpec, normalize: bool = False, **options):
    loaded = load_checkpoints(task, gradindex.checkpoints.parse_checkpoints([str(path)]), torch.device("cpu"))
    return make_featurizer(
        "tracin",
        task,
        loaded,
        projection=projection,
        layers=None,
        normalize=normalize,
        device=torch.device("cpu"),
        options={"adam_normalize": True, **options},
    )


def test_exact_path_divides_by_adam_denominator_and_unit_normalizes(tmp_path):
    task = mlp_task()
    model, optimizer = _trained(task)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    moments = load_optimizer_moments(task.model(), path)
    denominators = {name: moments.denominator(name) for name in moments.moments}
    expected = _per_sample_loop(task, model.state_dict(), denominators, range(10))
    batch = tuple(tensor[:10] for tensor in task.train.tensors)
    plain = _featurizer(task, path, ProjectionSpec(kind="none", dim=1))
    torch.testing.assert_close(plain.featurize(batch), expected, rtol=1e-4, atol=1e-6)
    unit = _featurizer(task, path, ProjectionSpec(kind="none", dim=1), normalize=True)
    torch.testing.assert_close(unit.featurize(batch), nn.functional.normalize(expected, dim=1), rtol=1e-4, atol=1e-6)
    fingerprint = unit.fingerprint()
    assert fingerprint["method"]["adam_normalize"] is True and fingerprint["optimizer_state"] == [moments.sha256]


def _rank_one_state(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """Give every Linear's [out, in + 1] second moment (bias as the last column) exactly rank 1: r cᵀ."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out_dim, in_dim = module.weight.shape[0], module.weight[0].numel()
            r = torch.rand(out_dim, generator=generator) + 0.1
            c = torch.rand(in_dim + 1, generator=generator) + 0.1
            v = torch.outer(r, c) * 1e-4
            optimizer.state[module.weight]["exp_avg_sq"].copy_(v[:, :-1].reshape(module.weight.shape))
            optimizer.state[module.bias]["exp_avg_sq"].copy_(v[:, -1])


def _gram(featurizer, batch) -> torch.Tensor:
    vectors = featurizer.featurize(batch).double()
    return vectors @ vectors.T


@pytest.mark.parametrize("make_task", [mlp_task, cnn_task], ids=["mlp", "cnn"])
def test_kron_factored_normaliser_equals_exact_for_rank_one_moments(tmp_path, make_task):
    task = make_task()
    model, optimizer = _trained(task, eps=0.0)
    _rank_one_state(model, optimizer, seed=5)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    batch = tuple(tensor[:12] for tensor in task.train.tensors)
    exact = _featurizer(task, path, ProjectionSpec(kind="none", dim=1))
    kron = _featurizer(task, path, ProjectionSpec(kind="kron", dim=4096))  # every side full: no projection
    torch.testing.assert_close(_gram(kron, batch), _gram(exact, batch), rtol=1e-4, atol=1e-8)
    plain = make_featurizer(
        "tracin",
        task,
        load_checkpoints(task, gradindex.checkpoints.parse_checkpoints([str(path)]), torch.device("cpu")),
        projection=ProjectionSpec(kind="kron", dim=4096),
        layers=None,
        normalize=False,
        device=torch.device("cpu"),
    )
    assert not torch.allclose(_gram(plain, batch), _gram(exact, batch), rtol=1e-2)  # the normaliser did something


def test_kron_factored_normaliser_on_random_moments_is_close(tmp_path):
    """On Adam's own (not rank-1) moments the Adafactor factorisation is an approximation: the scores of the two paths
    still agree closely (cosine of the score matrices: measured 0.95 after 39 steps, 0.80 after 3)."""
    task = mlp_task()
    model, optimizer = _trained(task, epochs=13)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    batch = tuple(tensor[:24] for tensor in task.train.tensors)
    exact, kron = (
        _gram(_featurizer(task, path, ProjectionSpec(kind="none", dim=1)), batch),
        _gram(_featurizer(task, path, ProjectionSpec(kind="kron", dim=4096)), batch),
    )
    cosine = float((exact * kron).sum() / (exact.norm() * kron.norm()))
    assert cosine > 0.9, cosine


def test_build_and_query_round_trip_with_adam_normalize(tmp_path):
    task = mlp_task(n_train=48, n_test=6)
    model, optimizer = _trained(task)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    store = gradindex.build(
        task,
        [str(path)],
        tmp_path / "s.gradindex",
        projection="none",
        normalize=True,
        dtype="float32",
        method_options={"adam_normalize": True},
        progress=False,
        device="cpu",
    )
    table = gradindex.query(store, task, k=3, progress=False, device="cpu")
    assert table.num_rows == 18
    assert store.fingerprint["method"]["adam_normalize"] is True


# ---- mixing the query curvature -------------------------------------------------------------------------------------


def test_mixed_dense_curvature_is_the_mixture():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    queries = torch.randn(20, 6, generator=generator, dtype=torch.float64) * 3
    groups = [PreconditionGroup("dense", 0, 6)]
    mixed = Preconditioner.fit(lambda: [train], groups, [1.0], "ekfac", mix_rows=lambda: [queries], mix=0.3)
    expected = 0.7 * train.T @ train / 50 + 0.3 * queries.T @ queries / 20
    torch.testing.assert_close(mixed.dense()[0], expected)
    alone = Preconditioner.fit(lambda: [train], groups, [1.0], "ekfac", mix_rows=lambda: [queries], mix=0.0)
    torch.testing.assert_close(alone.dense()[0], train.T @ train / 50)


def test_mixed_kron_ekfac_refits_the_mixed_diagonal():
    """A kron group: the eigenbasis of the mixed side factors, the eigenvalues the diagonal of the mixed H there."""
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    queries = torch.randn(10, 6, generator=generator, dtype=torch.float64) + 1.0
    groups = [PreconditionGroup("kron", 0, 6, k_out=2, k_in=3)]
    fitted = Preconditioner.fit(lambda: [train], groups, [1.0], "ekfac", mix_rows=lambda: [queries], mix=0.5)
    hessian = 0.5 * train.T @ train / 40 + 0.5 * queries.T @ queries / 10
    basis = fitted.dense()[0]  # U diag(Λ) Uᵀ
    values = torch.linalg.eigvalsh(basis)
    # the refit eigenvalues are the diagonal of the mixed H in the fitted basis: trace preserved, and Uᵀ H U's diagonal
    torch.testing.assert_close(torch.trace(basis), torch.trace(hessian))
    assert np.isfinite(values.numpy()).all()


def test_precondition_mix_changes_the_both_side_vectors(tmp_path):
    task = mlp_task(n_train=48, n_test=8)
    model, optimizer = _trained(task)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    common = dict(projection="none", normalize=True, dtype="float32", progress=False, device="cpu")
    options = {"adam_normalize": True, "precondition": "ekfac", "precondition_side": "both"}
    base = gradindex.build(task, [str(path)], tmp_path / "a.gradindex", method_options=options, **common)
    mixed = gradindex.build(
        task, [str(path)], tmp_path / "b.gradindex", method_options={**options, "precondition_mix": 0.9}, **common
    )
    assert (
        mixed.fingerprint["method"]["precondition_mix"] == 0.9 and "precondition_mix" not in base.fingerprint["method"]
    )
    a, b = np.asarray(base.read_rows(range(4))), np.asarray(mixed.read_rows(range(4)))
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)
    table = gradindex.query(mixed, task, k=2, progress=False, device="cpu")
    assert table.num_rows == 16


def test_cli_build_help_lists_the_trackstar_options():
    from click.testing import CliRunner

    from gradindex.cli import cli

    result = CliRunner().invoke(cli, ["build", "--help"])
    assert result.exit_code == 0
    for flag in ("--adam-normalize", "--precondition-mix", "--normalize"):
        assert flag in result.output


def test_precondition_mix_on_the_query_side_fits_the_mixture(tmp_path):
    """precondition_side=query: the factors written at the end of the build are those of the stored rows mixed with
    the test split's rows (a dense group: exactly 0.6·H_train + 0.4·H_query)."""
    from gradindex.methods import PRECONDITION_TRANSFORM, precondition_groups

    task = mlp_task(n_train=40, n_test=10)
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save(task.model().state_dict(), path)
    store = gradindex.build(
        task, [str(path)], tmp_path / "q.gradindex", projection="none", dtype="float32", progress=False, device="cpu",
        method_options={"precondition": "ekfac", "precondition_mix": 0.4},
    )  # fmt: skip
    rows = torch.from_numpy(np.asarray(store.read_rows(range(40)))).double()
    plain = make_featurizer(
        "tracin",
        task,
        load_checkpoints(task, gradindex.checkpoints.parse_checkpoints([str(path)]), torch.device("cpu")),
        projection=ProjectionSpec(kind="none", dim=1),
        layers=None,
        normalize=False,
        device=torch.device("cpu"),
    )
    queries = plain.featurize(task.test.tensors).double()
    expected = 0.6 * rows.T @ rows / 40 + 0.4 * queries.T @ queries / 10
    fitted = Preconditioner.unpack(
        store.read_transform(PRECONDITION_TRANSFORM), precondition_groups(store.fingerprint), [1.0]
    )
    torch.testing.assert_close(fitted.dense()[0], expected, rtol=1e-4, atol=1e-9)
