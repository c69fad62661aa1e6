"""The kron projection on transformers: a tied GPT-2, a BERT classifier and a Llama (RMSNorm, rotary, SiLU MLP), with
padding and attention masks, against per-sample gradients from a loop of ``backward()`` calls on the full model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from featurize import hf_models, kron_models
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import gradindex
from gradindex import TaskSpecError
from gradindex.checkpoints import parse_checkpoints
from gradindex.featurize import KronGradients, load_checkpoints
from gradindex.methods import TracInFeaturizer
from gradindex.pipeline import plan_rows
from gradindex.projection import ProjectionSpec

pytest.importorskip("transformers")


def _kron_layout(plan: list[dict], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Looped per-sample gradients ``{name: [B, *shape]}`` laid out as a full-rank kron vector: each factored group's
    ``[out, in]`` matrix (the bias its last input column), then the rest flattened in plan order."""
    blocks = []
    for entry in plan:
        if "module" in entry:
            weight = grads[entry["params"][0]]
            matrix = {
                "linear": lambda: weight,
                "hf_conv1d": lambda: weight.transpose(1, 2),  # Conv1D stores [in, out]
                "conv": lambda: weight.flatten(2),
                "embedding": lambda: weight.transpose(1, 2),  # the vocabulary is the input side
                "tied": lambda: (
                    weight.transpose(1, 2) if any(kind == "embedding" for _, kind in entry["uses"]) else weight
                ),
            }[entry["type"]]()
            if len(entry["params"]) > 1:
                matrix = torch.cat([matrix, grads[entry["params"][1]].unsqueeze(2)], dim=2)
            assert matrix.shape[1:] == (entry["out"], entry["in"])
            blocks.append(matrix.flatten(1))
        elif "params" in entry:
            blocks += [grads[name].flatten(1) for name in entry["params"]]
    return torch.cat(blocks, dim=1)


def _full_rank(name: str, tmp_path):
    task = hf_models.task(name, n_train=10)
    checkpoint = hf_models.trained_checkpoint(task, tmp_path / f"{name}.pt", steps=8)
    loaded = load_checkpoints(task, parse_checkpoints([checkpoint]), torch.device("cpu"))
    kron = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=10**6))
    return task, checkpoint, loaded, kron


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_full_rank_kron_gives_the_looped_per_sample_gradients(name, tmp_path):
    """Every parameter's per-sample gradient, factored or not, tied or not, against autograd one sample at a time."""
    task, checkpoint, _, kron = _full_rank(name, tmp_path)
    plan = kron.fingerprint()["projection"]["plan"]
    assert all(entry["k_in"] == entry["in"] and entry["k_out"] == entry["out"] for entry in plan if "module" in entry)
    assert plan[-1]["type"] == "identity"
    types = {entry["module"]: entry["type"] for entry in plan if "module" in entry}
    paths = {param: group["path"] for group in plan[-1]["groups"] for param in group["params"]}
    if name == "gpt2":
        tied = plan[0]
        assert tied["type"] == "tied" and tied["uses"] == [["transformer.wte", "embedding"], ["lm_head", "linear"]]
        assert types["transformer.wpe"] == "embedding"  # its call is shared by the batch: expanded to it
        assert types["transformer.h.0.attn.c_attn"] == "hf_conv1d"
        assert set(paths.values()) == {"norm"}
    if name == "bert":
        embeddings = [types[f"bert.embeddings.{part}_embeddings"] for part in ("word", "position", "token_type")]
        assert embeddings == ["embedding"] * 3 and types["classifier"] == "linear"
        assert set(paths.values()) == {"norm"}
    if name == "llama":
        assert types["model.embed_tokens"] == "embedding" and types["lm_head"] == "linear"
        assert set(paths.values()) == {"module"}  # RMSNorm: a vjp of its own call
    batch = task.train.tensors
    vectors = kron.featurize(batch)
    expected = _kron_layout(plan, hf_models.looped_gradients(task, checkpoint, batch))
    assert vectors.shape == expected.shape
    scale = float(expected.abs().max())
    torch.testing.assert_close(vectors, expected.float(), rtol=1e-4, atol=2e-5 * scale)


def test_tied_energies_and_calibration_count_every_use(tmp_path):
    """The tied group's calibration energy is |G_emb + G_head|² per sample (cross terms included), from the hooks."""
    task, checkpoint, loaded, _ = _full_rank("gpt2", tmp_path)
    kron = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=512, kron_sides="orthogonal"))
    batch = task.train.tensors
    grads = hf_models.looped_gradients(task, checkpoint, batch)
    layers, rest, _ = kron.kron._groups
    expected = [float(sum(grads[param].double().square().sum() for param in layer.params)) for layer in layers]
    expected.append(float(sum(grads[param].double().square().sum() for param in rest)))
    found = kron.kron.energies(batch, loaded[0].state)
    np.testing.assert_allclose(found, expected, rtol=1e-4)
    assert layers[0].kind == "tied" and found[0] > 0


def test_seeded_sides_are_unbiased_on_a_tied_gpt2(tmp_path):
    """Gaussian sides (and sjlt for the rest) are a JL sketch: the projected inner products, tied weight included,
    average to the exact ones over seeds."""
    task, _, loaded, exact = _full_rank("gpt2", tmp_path)
    batch = tuple(tensor[:4] for tensor in task.train.tensors)
    vectors = exact.featurize(batch).double()
    truth = vectors @ vectors.T
    model = task.model()
    names = [name for name, _ in model.named_parameters()]
    planned = KronGradients(model, task.loss, names, ProjectionSpec(kind="kron", dim=512), torch.device("cpu"))
    plan = planned.plan_dict()
    assert plan[0]["type"] == "tied" and "sides" not in plan[0]  # gaussian sides, narrower than the layer
    grams = []
    for seed in range(120):
        engine = KronGradients(
            model, task.loss, names, ProjectionSpec(kind="kron", dim=512, seed=seed), torch.device("cpu"), plan=plan
        )
        projected = engine(batch, loaded[0].state, 0).double()
        grams.append(projected @ projected.T)
    grams = torch.stack(grams)
    # each entry's mean over the seeds within 4 standard errors of the exact inner product (measured: 1.6)
    z = (grams.mean(0) - truth) / (grams.std(0) / len(grams) ** 0.5)
    assert float(z.abs().max()) < 4, z
    assert float((grams.mean(0) - truth).abs().max() / truth.abs().max()) < 0.1


class _TiedAndReused(nn.Module):
    """A tied embedding and head whose weight is also used once more through F.linear, outside any hooked call."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        hidden = self.mix(self.embed(tokens))
        return self.head(hidden) + 0.1 * F.linear(hidden, self.embed.weight)


class _NormReused(nn.Module):
    """A LayerNorm whose weight also scales the output functionally."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 40)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)) * self.norm.weight)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_TiedAndReused, "cannot factor embed: embed.weight gets gradient from outside the module calls"),
        (_NormReused, "cannot take norm.weight from the calls of module norm"),
    ],
)
def test_weights_reused_outside_their_hooked_calls_are_refused(make, message, tmp_path):
    tokens = kron_models.tokens(8, seed=0)
    task = gradindex.Task(
        model=make, train=TensorDataset(tokens, torch.zeros(8, dtype=torch.int64)), loss=kron_models.lm_loss
    )
    torch.manual_seed(0)
    torch.save(make().state_dict(), tmp_path / "c.pt")
    loaded = load_checkpoints(task, parse_checkpoints([f"{tmp_path / 'c.pt'}:1.0"]), torch.device("cpu"))
    kron = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=10**6))
    with pytest.raises(TaskSpecError, match=message):
        kron.featurize(task.train.tensors)


class _TiedWithBias(nn.Module):
    """A tied embedding and head, the head with a bias of its own, and a position embedding of arange(T)[None]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16, padding_idx=0)
        self.position = nn.Embedding(13, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        hidden = self.embed(tokens) + self.position(torch.arange(tokens.shape[1])[None])
        return self.head(torch.tanh(self.mix(hidden)))


def test_a_tied_head_with_its_own_bias(tmp_path):
    tokens = kron_models.tokens(6, seed=0)
    task = gradindex.Task(
        model=_TiedWithBias, train=TensorDataset(tokens, torch.zeros(6, dtype=torch.int64)), loss=kron_models.lm_loss
    )
    torch.manual_seed(0)
    torch.save(_TiedWithBias().state_dict(), tmp_path / "c.pt")
    checkpoint = f"{tmp_path / 'c.pt'}:1.0"
    loaded = load_checkpoints(task, parse_checkpoints([checkpoint]), torch.device("cpu"))
    kron = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=10**6))
    plan = kron.fingerprint()["projection"]["plan"]
    assert plan[0]["type"] == "tied" and plan[0]["uses"] == [["embed", "embedding"], ["head", "linear"]]
    assert plan[-1]["groups"] == [
        {"path": "module", "module": "head", "params": ["head.bias"], "why": plan[-1]["groups"][0]["why"]}
    ]
    batch = task.train.tensors
    expected = _kron_layout(plan, hf_models.looped_gradients(task, checkpoint, batch))
    torch.testing.assert_close(
        kron.featurize(batch), expected.float(), rtol=1e-4, atol=1e-5 * float(expected.abs().max())
    )


class _Mixed(nn.Module):
    """Every path a parameter can take: factored (a position embedding of arange(T)[None], shared by the batch),
    LayerNorm from hooks, RMSNorm and PReLU by their own calls, a Linear whose weight is frozen (its bias by its
    call), a bare parameter of the model itself and nn.MultiheadAttention (whole-model vmap)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.position = nn.Embedding(13, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.rms = nn.RMSNorm(16)
        self.act = nn.PReLU(16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(16, 40)
        self.temperature = nn.Parameter(torch.tensor([1.3]))

    def forward(self, tokens):
        hidden = self.embed(tokens) + self.position(torch.arange(tokens.shape[1])[None])
        hidden = hidden + self.attention(hidden, hidden, hidden, need_weights=False)[0]
        hidden = self.act(self.rms(self.norm(hidden)).transpose(1, 2)).transpose(1, 2)
        return self.head(self.frozen(hidden)) * self.temperature


def test_every_path_is_exact_and_says_why(tmp_path):
    tokens = kron_models.tokens(6, seed=0)
    task = gradindex.Task(
        model=_Mixed, train=TensorDataset(tokens, torch.zeros(6, dtype=torch.int64)), loss=kron_models.lm_loss
    )
    torch.manual_seed(0)
    model = _Mixed()
    with torch.no_grad():
        for param in (model.norm.weight, model.rms.weight, model.act.weight):
            param.add_(0.3 * torch.randn_like(param))
    torch.save(model.state_dict(), tmp_path / "c.pt")
    checkpoint = f"{tmp_path / 'c.pt'}:1.0"
    loaded = load_checkpoints(task, parse_checkpoints([checkpoint]), torch.device("cpu"))
    kron = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=10**6))
    rows = {row["param"]: row for row in plan_rows(kron.fingerprint()["projection"]["plan"])}
    assert set(rows) == {name for name, param in model.named_parameters() if param.requires_grad}
    assert {name: row["path"] for name, row in rows.items() if row["path"] != "factored"} == {
        "attention.in_proj_weight": "vmap",
        "attention.in_proj_bias": "vmap",
        "attention.out_proj.weight": "vmap",
        "attention.out_proj.bias": "vmap",
        "norm.weight": "norm",
        "norm.bias": "norm",
        "rms.weight": "module",
        "act.weight": "module",
        "frozen.bias": "module",
        "temperature": "vmap",
    }
    assert rows["position.weight"]["type"] == "embedding"
    assert "applied functionally by nn.MultiheadAttention attention" in rows["attention.out_proj.weight"]["why"]
    assert "a module with submodules" in rows["attention.in_proj_weight"]["why"]
    assert "a parameter of the model itself" in rows["temperature"]["why"]
    assert rows["rms.weight"]["why"].startswith("RMSNorm: its module's own call")
    batch = task.train.tensors
    vectors = kron.featurize(batch)
    grads = hf_models.looped_gradients(task, checkpoint, batch)
    expected = _kron_layout(kron.fingerprint()["projection"]["plan"], grads)
    torch.testing.assert_close(vectors, expected.float(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_tied_gpt2_store_tracks_exact_tracin_and_info_lists_every_path(tmp_path, monkeypatch):
    """The default projection end to end on a tied GPT-2: per-query Spearman ≥ 0.95 at k = 1024 against exact TracIn,
    scored on samples the calibration did not see, and ``gradindex info`` saying where each parameter went."""
    from click.testing import CliRunner

    from gradindex.cli import cli
    from gradindex.pipeline import query_featurizer

    task = hf_models.task("gpt2", n_train=160, n_test=6)
    checkpoint = hf_models.trained_checkpoint(task, tmp_path / "g.pt", steps=40)
    loaded = load_checkpoints(task, parse_checkpoints([checkpoint]), torch.device("cpu"))
    exact = TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=10**6))  # exact: see above
    monkeypatch.setattr("gradindex.methods._tracin.CALIBRATION_SAMPLES", 80)
    store = gradindex.build(task, [checkpoint], tmp_path / "g.gradindex", proj_dim=1024, dtype="float32")
    assert store.fingerprint["projection"]["kind"] == "kron" and store.dim <= 1024
    truth = (exact.featurize(task.test.tensors) @ exact.featurize(task.train.tensors)[80:].T).numpy()
    featurizer, _ = query_featurizer(store, task, None, torch.device("cpu"))
    featurizer.attach(store)
    scores = featurizer.featurize(task.test.tensors).numpy() @ store.read_features()[80:].T
    per_query = [spearmanr(truth[q], scores[q]).statistic for q in range(len(scores))]
    assert min(per_query) >= 0.9 and np.mean(per_query) >= 0.95, per_query
    output = CliRunner().invoke(cli, ["info", str(tmp_path / "g.gradindex")]).output
    assert "kron        transformer.wte.weight: factored, tied (transformer.wte embedding + lm_head linear)" in output
    assert "kron        transformer.h.1.ln_2.bias: norm, rest" in output


def test_calibration_counts_positions_not_only_samples(monkeypatch, tmp_path):
    """Side moments gather one vector per position: a task of long sequences is calibrated on fewer samples (enough
    for CALIBRATION_POSITIONS tokens, never under CALIBRATION_MIN_SAMPLES), one of single vectors on them all."""
    monkeypatch.setattr("gradindex.methods._tracin.CALIBRATION_SAMPLES", 40)
    monkeypatch.setattr("gradindex.methods._tracin.CALIBRATION_MIN_SAMPLES", 8)
    monkeypatch.setattr("gradindex.methods._tracin.CALIBRATION_POSITIONS", 160)

    def featurizer(task):
        torch.save(task.model().state_dict(), tmp_path / f"{task.name}.pt")
        loaded = load_checkpoints(task, parse_checkpoints([str(tmp_path / f"{task.name}.pt")]), torch.device("cpu"))
        return TracInFeaturizer(task, loaded, projection=ProjectionSpec(kind="kron", dim=256))

    task = hf_models.task("gpt2", n_train=48, n_test=2, length=16)  # 16 positions a sample: 160 / 16 = 10 samples
    sequences = featurizer(task)
    assert sequences.kron.positions_per_sample(task.train.tensors, sequences._states[0][0]) == 16
    assert sequences._calibration_rows() == list(range(10))
    monkeypatch.setattr("gradindex.methods._tracin.CALIBRATION_MIN_SAMPLES", 30)
    assert featurizer(task)._calibration_rows() == list(range(30))
    assert featurizer(kron_models.task("mlp"))._calibration_rows() == list(range(40))  # one position a sample
