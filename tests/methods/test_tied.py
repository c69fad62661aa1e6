"""Tied and shared parameters in every method (kron aside): the gradient of a tied tensor is the sum over its uses.

Two models: a tiny GPT-2 whose head is tied to its token embedding (checkpoints saved with ``save_pretrained``, whose
safetensors lack ``lm_head.weight``), and ``SharedLinear``, one Linear registered in two places and applied twice.
Every store is compared with the trusted slow path on the plain module: one ``backward()`` per sample (the tied
tensor's ``.grad`` sums its uses), the Hessian by double backward, losses of models read back by
``transformers.from_pretrained`` or ``load_state_dict``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tied_models
import torch
from transformers import GPT2LMHeadModel

import gradindex
from gradindex.projection import ParamPlan, ProjectionSpec, make_projector

WEIGHTS = (0.5, 1.5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of both models: ``{"gpt2": [folder, ...], "shared": [file, ...]}`` (θ* first, then more)."""
    root = tmp_path_factory.mktemp("tied")
    gpt2 = [root / f"gpt2-{seed}" for seed in (21, 22, 23)]
    for seed, folder in zip((21, 22, 23), gpt2):
        tied_models.save_gpt2(folder, seed)
    shared = [root / f"shared-{seed}.pt" for seed in (31, 32, 33)]
    for seed, path in zip((31, 32, 33), shared):
        tied_models.save_shared(path, seed)
    return {"gpt2": gpt2, "shared": shared}


def _task(name: str) -> gradindex.Task:
    return tied_models.gpt2_task() if name == "gpt2" else tied_models.shared_task()


def _plain(name: str, checkpoint) -> torch.nn.Module:
    """The checkpoint in a plain module, read by the model's own loader (transformers, or torch's load_state_dict)."""
    if name == "gpt2":
        return GPT2LMHeadModel.from_pretrained(checkpoint)
    model = tied_models.SharedLinear()
    model.load_state_dict(torch.load(checkpoint))
    return model


def _names(name: str, layers=None) -> list[str]:
    model = _task(name).model()
    if layers:
        return ["transformer.wte.weight"]  # "lm_head" selects the tied tensor
    return [param_name for param_name, _ in model.named_parameters()]


def _layers(name: str):
    return ["lm_head"] if name == "gpt2" else None


def _build(name, checkpoints, tmp_path, method, **options):
    return gradindex.build(
        _task(name), checkpoints, tmp_path / f"{method}.gradindex", method=method, dtype="float32", **options
    )


def _projected(store, gradients: list[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """Each checkpoint's reference gradients ``[N, p]`` through the store's own projection."""
    model = dict(_task("gpt2" if "transformer.wte.weight" in names else "shared").model().named_parameters())
    projector = make_projector(
        ProjectionSpec.from_dict(store.fingerprint["projection"]),
        ParamPlan.layout([(name, model[name].shape) for name in names]),
    )
    return [projector.project(grads.float(), position).double() for position, grads in enumerate(gradients)]


def _score_matrix(table, n_queries: int, n_rows: int) -> np.ndarray:
    scores = np.full((n_queries, n_rows), np.nan)
    for query, row, score in zip(*(table.column(c).to_pylist() for c in ("query", "row", "score"))):
        scores[query, row] = score
    return scores


def _self_influence(store) -> np.ndarray:
    table = gradindex.self_influence(store)
    out = np.full(store.n_samples, np.nan)
    out[table.column("row").to_numpy()] = table.column("score").to_numpy()
    return out


def _damping(hessian: torch.Tensor) -> float:
    """A damping that makes H + λI comfortably positive definite."""
    return float(max(0.0, -torch.linalg.eigvalsh(hessian).min()) + 0.5)


@pytest.mark.parametrize("name", ["gpt2", "shared"])
@pytest.mark.parametrize("projection", ["none", "sjlt", "gaussian"])
def test_tracin_sums_the_uses_of_a_tied_tensor(name, projection, saved, tmp_path):
    checkpoints = saved[name][:2]
    task = _task(name)
    names = _names(name)
    store = _build(
        name, [f"{path}:{w}" for path, w in zip(checkpoints, WEIGHTS)], tmp_path, "tracin", projection=projection,
        proj_dim=24,
    )  # fmt: skip
    assert [entry[0] for entry in store.fingerprint["model"]["parameters"]] == names  # each tensor once
    gradients = [
        tied_models.per_sample_gradients(_plain(name, path), task.loss, task.train, names) for path in checkpoints
    ]
    vectors = torch.from_numpy(store.read_features()).double()
    blocks = _projected(store, gradients, names)
    reference = torch.cat([block * weight**0.5 for block, weight in zip(blocks, WEIGHTS)], dim=1)
    torch.testing.assert_close(vectors, reference, rtol=1e-4, atol=1e-6)
    # the scores: ⟨φ(a), φ(b)⟩ = Σ_c η_c ⟨P g_c(a), P g_c(b)⟩; with no projection, the autograd gradients' own products
    expected = sum(weight * block @ block.T for block, weight in zip(blocks, WEIGHTS))
    if projection == "none":
        torch.testing.assert_close(expected, sum(w * g @ g.T for g, w in zip(gradients, WEIGHTS)))
    torch.testing.assert_close(vectors @ vectors.T, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_self_influence(store), expected.diagonal().numpy(), rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "shared"])
def test_trak_on_tied_weights(name, saved, tmp_path):
    checkpoints = saved[name][:2]
    task = _task(name)
    names = _names(name)
    store = _build(name, [str(path) for path in checkpoints], tmp_path, "trak", projection="sjlt", proj_dim=16)
    plain = [_plain(name, path).eval() for path in checkpoints]
    margins = [tied_models.per_sample_gradients(model, task.margin, task.train, names) for model in plain]
    phi = torch.stack(_projected(store, margins, names), dim=1)  # [N, C, k]
    with torch.no_grad():
        values = [task.margin(model, task.train.tensors).double() for model in plain]
    out_to_loss = sum(torch.sigmoid(-value) for value in values) / len(plain)
    rows = torch.from_numpy(store.read_features()).double()
    torch.testing.assert_close(rows, (phi * out_to_loss[:, None, None]).flatten(1), rtol=1e-4, atol=1e-7)
    gram = torch.einsum("nci,ncj->cij", phi, phi)
    torch.testing.assert_close(torch.from_numpy(store.read_transform("trak_gram")), gram, rtol=1e-4, atol=1e-7)
    assert store.fingerprint["method"]["damping"] is None  # auto: 0.1 × the mean eigenvalue of each ΦᵀΦ
    damping = 0.1 * torch.linalg.eigvalsh(gram).clamp_min(0).mean(dim=1)
    inverses = torch.linalg.inv(gram + damping[:, None, None] * torch.eye(gram.shape[1]))
    queries = [tied_models.per_sample_gradients(model, task.margin, task.test, names) for model in plain]
    phi_q = torch.stack(_projected(store, queries, names), dim=1)
    expected = torch.einsum("qci,cij,ncj->qn", phi_q, inverses, phi) * out_to_loss / len(plain)
    table = gradindex.query(store, task=task, split="test", k=len(task.train))
    np.testing.assert_allclose(_score_matrix(table, len(task.test), len(task.train)), expected.numpy(), rtol=2e-3,
                               atol=1e-6 * float(expected.abs().max()))  # fmt: skip
    self_scores = torch.einsum("nci,cij,ncj->n", phi, inverses, phi) * out_to_loss / len(plain)
    np.testing.assert_allclose(_self_influence(store), self_scores.numpy(), rtol=2e-3)


@pytest.mark.parametrize(("name", "solver"), [("gpt2", "exact"), ("shared", "exact"), ("shared", "cg")])
def test_influence_functions_on_tied_weights_against_the_explicit_hessian(name, solver, saved, tmp_path):
    task = _task(name)
    layers = _layers(name)
    names = _names(name, layers)
    model = _plain(name, saved[name][0])
    hessian = tied_models.hessian(model, task.loss, task.train, names)
    damping = _damping(hessian)
    store = _build(
        name, [str(saved[name][0])], tmp_path, "if", projection="none", layers=layers,
        method_options={"solver": solver, "damping": damping},
    )  # fmt: skip
    assert [entry[0] for entry in store.fingerprint["params"]] == names
    train = tied_models.per_sample_gradients(model, task.loss, task.train, names)
    test = tied_models.per_sample_gradients(model, task.loss, task.test, names)
    inverse = torch.linalg.inv(hessian + damping * torch.eye(len(hessian)))
    torch.testing.assert_close(torch.from_numpy(store.read_features()).double(), train, rtol=1e-4, atol=1e-6)
    expected = test @ inverse @ train.T
    table = gradindex.query(store, task=task, split="test", k=len(task.train))
    tolerance = 1e-4 if solver == "exact" else 1e-3
    np.testing.assert_allclose(_score_matrix(table, len(task.test), len(task.train)), expected.numpy(),
                               rtol=tolerance, atol=tolerance * float(expected.abs().max()))  # fmt: skip
    self_scores = ((train @ inverse) * train).sum(dim=1)
    np.testing.assert_allclose(_self_influence(store), self_scores.numpy(), rtol=tolerance)


@pytest.mark.parametrize("name", ["gpt2", "shared"])
def test_arnoldi_on_tied_weights_in_the_full_eigenbasis(name, saved, tmp_path):
    task = _task(name)
    layers = _layers(name)
    names = _names(name, layers)
    model = _plain(name, saved[name][0])
    hessian = tied_models.hessian(model, task.loss, task.train, names)
    damping = _damping(hessian)
    store = _build(
        name, [str(saved[name][0])], tmp_path, "arnoldi", layers=layers,
        method_options={"rank": len(hessian), "damping": damping},
    )  # fmt: skip
    train = tied_models.per_sample_gradients(model, task.loss, task.train, names)
    # every eigenpair kept: ⟨φ(a), φ(b)⟩ = g_aᵀ (H + λI)^{-1} g_b
    expected = train @ torch.linalg.inv(hessian + damping * torch.eye(len(hessian))) @ train.T
    vectors = torch.from_numpy(store.read_features()).double()
    torch.testing.assert_close(vectors @ vectors.T, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    np.testing.assert_allclose(_self_influence(store), expected.diagonal().numpy(), rtol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "shared"])
def test_gex_loss_deviations_of_tied_models(name, saved, tmp_path):
    task = _task(name)
    store = _build(name, [str(path) for path in saved[name]], tmp_path, "gex")
    with torch.no_grad():
        losses = [task.loss(_plain(name, path).eval(), task.train.tensors).double() for path in saved[name]]
    tau = store.fingerprint["method"]["tau"]
    expected = torch.stack([member - losses[0].clamp(min=tau) for member in losses[1:]], dim=1) / 2**0.5
    vectors = torch.from_numpy(store.read_features()).double()
    torch.testing.assert_close(vectors, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_self_influence(store), (expected**2).sum(dim=1).numpy(), rtol=1e-4, atol=1e-9)


def test_layers_name_a_tied_tensor_by_any_of_its_names(saved, tmp_path):
    for layers in (["lm_head"], ["transformer.wte"], ["lm_head.weight"]):
        store = gradindex.build(
            tied_models.gpt2_task(), [str(saved["gpt2"][0])], tmp_path / "s.gradindex", projection="none",
            layers=layers, overwrite=True,
        )  # fmt: skip
        assert store.fingerprint["params"] == [["transformer.wte.weight", [tied_models.VOCAB, 8]]]
    store = gradindex.build(
        tied_models.shared_task(), [str(saved["shared"][0])], tmp_path / "t.gradindex", projection="none",
        layers=["again"], overwrite=True,
    )  # fmt: skip
    assert store.fingerprint["params"] == [["shared.weight", [4, 4]], ["shared.bias", [4]]]


def test_gauss_newton_is_refused_for_a_causal_lm(saved, tmp_path):
    """The closed-form output Hessian is a classifier's; a causal LM (default loss) asks for the true Hessian."""
    lm = tied_models.gpt2_task()
    task = gradindex.Task(model=tied_models.gpt2, train=lm.train, test=lm.test)  # the default loss: causal LM
    with pytest.raises(gradindex.ArgumentError, match=r"hessian=ggn is for classifiers .* logits \(8, 6, 13\) and no"):
        gradindex.build(
            task, [str(saved["gpt2"][0])], tmp_path / "ggn.gradindex", method="if", projection="none",
            layers=["lm_head"], method_options={"hessian": "ggn", "solver": "exact"},
        )  # fmt: skip
