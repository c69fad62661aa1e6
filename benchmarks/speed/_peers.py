"""Each method under test as ``prepare(...) -> Runner``: featurize training samples (or score them), on CPU.

A runner gives either ``vectors(inputs, targets) -> [B, D]`` (a φ whose inner products are the scores) or,
for methods that only score, ``scores(train_inputs, train_targets, test_inputs, test_targets) -> [n_test, n_train]``.
Peers are used through their public APIs as their documentation shows; when one cannot run here, ``prepare``
raises ``Unavailable`` with the reason, which the results record instead of a number.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.speed._models import Workload


class Unavailable(Exception):
    """The method cannot run here (not installed, or no CPU path): the message says why."""


@dataclass
class Runner:
    name: str
    vectors: Callable[[Tensor, Tensor], Tensor] | None = None
    scores: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    note: str = ""


def _load(workload: Workload, checkpoint: str) -> nn.Module:
    model = workload.make_model()
    model.load_state_dict(torch.load(checkpoint))
    return model.eval()


def _model_io(workload: Workload):
    """(model input, label) as a peer's ``model(*batch[:-1])``/``loss(out, label)`` convention wants them."""
    if workload.name.startswith("transformer"):
        return lambda inputs, targets: (inputs[:, :-1], inputs[:, 1:])
    return lambda inputs, targets: (inputs, targets)


def _sum_loss(workload: Workload, per_sample: bool = False):
    """Σ_b ℓ_b over a batch in the peer's (model output, label) convention (``[B]`` per-sample losses with
    ``per_sample``); mean over tokens for the LM."""
    if workload.name.startswith("transformer"):

        def loss(outputs, labels):
            losses = F.cross_entropy(outputs.transpose(1, 2), labels, reduction="none").mean(1)
            return losses if per_sample else losses.sum()
    else:

        def loss(outputs, labels):
            return F.cross_entropy(outputs, labels, reduction="sum")

    loss.reduction = "none" if per_sample else "sum"  # captum reads this attribute
    return loss


# ---- gradindex ------------------------------------------------------------------------------------


def gradindex_runner(
    kind: str, workload: Workload, checkpoint: str, k: int, *, chunk_bytes: int = 512 << 20, sides: str | None = None
) -> Runner:
    """gradindex's featurizer as a peer; ``sides`` picks kron's side matrices (None: the default, pca)."""
    if kind == "rademacher" and workload.name.startswith("transformer") and n_params(workload) > 10**6 and k >= 512:
        raise Unavailable(_DENSE_SKIP)
    import gradindex
    from gradindex.checkpoints import parse_checkpoints
    from gradindex.featurize import load_checkpoints
    from gradindex.methods import TracInFeaturizer
    from gradindex.projection import ProjectionSpec

    task = gradindex.Task(model=workload.make_model, train=workload.train, loss=workload.loss)
    loaded = load_checkpoints(task, parse_checkpoints([f"{checkpoint}:1.0"]), torch.device("cpu"))
    started = time.perf_counter()
    featurizer = TracInFeaturizer(
        task, loaded, projection=ProjectionSpec(kind=kind, dim=k, seed=0, kron_sides=sides), chunk_bytes=chunk_bytes
    )
    setup_s = time.perf_counter() - started

    def vectors(inputs, targets):
        return featurizer.featurize((inputs, targets))

    note = f"dim {featurizer.block_dim}"
    if kind == "kron":
        plan = featurizer.fingerprint()["projection"]["plan"]
        note += "; " + ", ".join(f"{e['module']} {e['k_out']}x{e['k_in']}" for e in plan if "module" in e)
        rest = [e for e in plan if "module" not in e and "dim" in e]
        note += (
            f"; rest {rest[0]['dim']} ({rest[0]['type']})" if rest else ""
        ) + f"; plan calibrated in {setup_s:.1f} s (untimed, once per build)"
        note += f"; {featurizer.kron.plan.layers[0].sides if featurizer.kron.plan.layers else 'no'} sides"
    return Runner(f"gradindex {kind}" + (f" ({sides} sides)" if sides else ""), vectors=vectors, note=note)


def exact_runner(workload: Workload, checkpoint: str) -> Runner:
    """The trusted reference: unprojected per-sample gradients (vmap), exact TracIn scores."""
    runner = gradindex_runner("none", workload, checkpoint, 1, chunk_bytes=256 << 20)
    runner.name = "exact (vmap, no projection)"
    return runner


def training_step(workload: Workload, checkpoint: str) -> Callable[[Tensor, Tensor], None]:
    """One ordinary SGD step on a batch: batched forward + backward + update (the physical reference)."""
    model = _load(workload, checkpoint).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(inputs, targets):
        optimizer.zero_grad()
        workload.loss(model, (inputs, targets)).mean().backward()
        optimizer.step()

    return step


# ---- TRAK ------------------------------------------------------------------------------------------


_DENSE_SKIP = (
    "skipped: a dense p x k projection of the LM's 1.86M-parameter gradients (generated block by block for every "
    "batch on CPU) "
    "took ~1000 s per 180 samples when tried; too slow for this run"
)


def trak_runner(workload: Workload, checkpoint: str, k: int) -> Runner:
    """TRAK's recipe on CPU: per-sample gradients by torch.func (as its FunctionalGradientComputer), then
    BasicProjector."""
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as error:
        raise Unavailable(f"traker not installed ({error}); pip install traker") from error
    if workload.name.startswith("transformer") and n_params(workload) > 10**6 and k >= 512:
        raise Unavailable(_DENSE_SKIP)
    model = _load(workload, checkpoint)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    grad_dim = sum(p.numel() for p in params.values())
    projector = BasicProjector(
        grad_dim=grad_dim, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32
    )

    def sample_loss(params, buffers, inputs, targets):
        batch = (inputs.unsqueeze(0), targets.unsqueeze(0))
        return workload.loss(lambda x: torch.func.functional_call(model, (params, buffers), (x,)), batch).sum()

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, None, 0, 0))

    def vectors(inputs, targets):
        grads = per_sample(params, buffers, inputs, targets)
        flat = torch.cat([grads[name].flatten(1) for name in params], dim=1)
        return projector.project(flat, model_id=0)

    return Runner("TRAK BasicProjector (vmap grads)", vectors=vectors, note=f"rademacher, grad_dim {grad_dim}")


# ---- Captum ----------------------------------------------------------------------------------------


def _captum_common(workload: Workload, checkpoint: str):
    try:
        import captum.influence  # noqa: F401
    except ImportError as error:
        raise Unavailable(f"captum not installed ({error}); pip install captum") from error
    io = _model_io(workload)
    model = _load(workload, checkpoint)

    def load(net, path):
        net.load_state_dict(torch.load(path))
        return 1.0  # the learning rate: TracIn weight 1, like the other methods

    def dataset(inputs, targets):
        return TensorDataset(*io(inputs, targets))

    return model, load, dataset


def captum_tracincp_runner(workload: Workload, checkpoint: str, k: int) -> Runner:
    model, load, dataset = _captum_common(workload, checkpoint)
    from captum.influence import TracInCP

    # captum's per-batch sample-wise gradients support Linear and Conv2d only; the LM needs its per-sample loop
    batched = not workload.name.startswith("transformer")
    probe = dataset(workload.train.tensors[0][:1], workload.train.tensors[1][:1])
    tracin = TracInCP(
        model,
        probe,
        [checkpoint],
        checkpoints_load_func=load,
        loss_fn=_sum_loss(workload, per_sample=not batched),
        batch_size=workload.batch_size if batched else 1,
        sample_wise_grads_per_batch=batched,
    )

    def vectors(inputs, targets):
        loader = DataLoader(dataset(inputs, targets), batch_size=workload.batch_size if batched else 1)
        return tracin.compute_intermediate_quantities(loader)

    return Runner(
        "Captum TracInCP",
        vectors=vectors,
        note="full gradients, no projection" + ("" if batched else "; per-sample loop"),
    )


class _BruteForceNeighbors:
    """A NearestNeighbors for TracInCPFastRandProj without annoy: exact inner-product top-k in torch."""

    def setup(self, data: Tensor) -> None:
        self.data = data.flatten(1)

    def get_nearest_neighbors(self, query: Tensor, k: int):
        scores = query.flatten(1) @ self.data.T
        values, indices = scores.topk(min(k, scores.shape[1]), dim=1)
        return indices, values


def captum_fast_runner(workload: Workload, checkpoint: str, k: int, projected: bool) -> Runner:
    model, load, dataset = _captum_common(workload, checkpoint)
    from captum.influence import TracInCPFast, TracInCPFastRandProj

    layer = dict(model.named_modules())[workload.final_layer]
    loss = _sum_loss(workload)
    if workload.name.startswith("transformer"):
        raise Unavailable("TracInCPFast handles a final layer with 2-D outputs only; the LM head's are [B, T, V]")
    if projected:
        # made once (its constructor also featurizes and indexes the train set it is given: here one batch);
        # the projection is then fixed, and compute_intermediate_quantities is the featurization we time
        probe = dataset(
            workload.train.tensors[0][: workload.batch_size], workload.train.tensors[1][: workload.batch_size]
        )
        tracin = TracInCPFastRandProj(
            model,
            layer,
            probe,
            [checkpoint],
            checkpoints_load_func=load,
            loss_fn=loss,
            batch_size=workload.batch_size,
            nearest_neighbors=_BruteForceNeighbors(),
            projection_dim=k,
            seed=0,
        )

        def vectors(inputs, targets):
            return tracin.compute_intermediate_quantities(
                DataLoader(dataset(inputs, targets), batch_size=workload.batch_size)
            )

        return Runner("Captum TracInCPFastRandProj", vectors=vectors, note=f"final layer only, projection_dim {k}")

    def scores(train_inputs, train_targets, test_inputs, test_targets):
        tracin = TracInCPFast(
            model,
            layer,
            dataset(train_inputs, train_targets),
            [checkpoint],
            checkpoints_load_func=load,
            loss_fn=loss,
            batch_size=workload.batch_size,
        )
        return tracin.influence(dataset(test_inputs, test_targets)[:], k=None)

    return Runner("Captum TracInCPFast", scores=scores, note="final layer only, exact")


# ---- dattri ----------------------------------------------------------------------------------------


def dattri_runner(workload: Workload, checkpoint: str, k: int) -> Runner:
    try:
        import dattri.algorithm.tracin
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.task import AttributionTask
    except ImportError as error:
        raise Unavailable(f"dattri not installed ({error}); pip install dattri") from error
    dattri.algorithm.tracin.tqdm = lambda iterable, **_: (
        iterable
    )  # its progress bars, one per batch, would flood the log
    if workload.name.startswith("transformer") and n_params(workload) > 10**6 and k >= 512:
        raise Unavailable(_DENSE_SKIP)
    model = _load(workload, checkpoint)

    def loss_func(params, data):
        inputs, targets = data
        return workload.loss(
            lambda x: torch.func.functional_call(model, params, (x,)), (inputs.unsqueeze(0), targets.unsqueeze(0))
        ).sum()

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=[torch.load(checkpoint)])
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.tensor([1.0]),
        normalized_grad=False,
        projector_kwargs={"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"},
        device="cpu",
    )

    def scores(train_inputs, train_targets, test_inputs, test_targets):
        train = DataLoader(TensorDataset(train_inputs, train_targets), batch_size=min(workload.batch_size, 64))
        test = DataLoader(TensorDataset(test_inputs, test_targets), batch_size=len(test_inputs))
        return attributor.attribute(train, test).T

    return Runner(
        "dattri TracInAttributor",
        scores=scores,
        note=f"vmap grads + random projection {k}; test grads recomputed per train batch",
    )


# ---- Bergson ---------------------------------------------------------------------------------------


class _SequenceView(nn.Module):
    """The same model, its Linear layers fed ``[N, S, I]`` inputs as Bergson's hooks require (S = 1 for the MLP and
    the CNN's head, the output squeezed back): numerically the same function of the same parameters."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, inputs):
        if self.kind == "mlp":
            return self.model(inputs.unsqueeze(1)).squeeze(1)
        if self.kind == "cnn":
            return self.model[-1](self.model[:-1](inputs).unsqueeze(1)).squeeze(1)
        return self.model(inputs)


def bergson_runner(workload: Workload, checkpoint: str, k: int) -> Runner:
    """EleutherAI's Bergson (LoGra-style per-module projections), through its hook collector on our own model.

    Its entry point ``collect_gradients(model: PreTrainedModel, data: datasets.Dataset, ...)`` wants a Hugging Face
    causal LM; its collector (``HookCollectorBase``) works on any module, so we drive that with the same
    forward/backward as ours: per-module projections p × p of each nn.Linear's gradient (Gaussian, seeded per
    module), p = ⌊√(k / modules)⌋. Its hooks take [N, S, I] inputs (the MLP and the CNN head get S = 1) and
    handle nn.Linear only in practice (its forward hook asserts 3-D inputs, so a Conv2d cannot be hooked): on the
    CNN it indexes the final Linear only, and on the LM every Linear (not the embeddings or LayerNorms).

    Not in the ``bench`` extra: ``pip install bergson`` (2.5.1) resolves to torch 2.15 with CUDA wheels,
    torchvision, torchaudio and bitsandbytes, replacing the CPU torch. Installed here without them:
    ``pip install --no-deps bergson==2.5.1`` plus its pure-python requirements (transformers 5.23, peft,
    datasets, accelerate, huggingface_hub, safetensors, tokenizers, torchopt, optree, jaxtyping,
    simple-parsing, natsort, petname, ml_dtypes, ...), also with ``--no-deps``; torch stays 2.13.0+cpu.
    """
    try:
        from bergson import GradientProcessor
        from bergson.collector.collector import HookCollectorBase
    except Exception as error:  # its import pulls transformers, datasets, peft...: any failure means it cannot run here
        raise Unavailable(f"bergson cannot be imported here: {type(error).__name__}: {error}") from error
    from dataclasses import dataclass as _dataclass

    model = _load(workload, checkpoint)
    kind = workload.name.split("-")[0]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    view = _SequenceView(model, kind)
    p = max(1, math.isqrt(k // len(linears)))

    @_dataclass(kw_only=True)
    class Collect(HookCollectorBase):
        def setup(self) -> None:
            self.found = {}

        def teardown(self) -> None:
            pass

        def backward_hook(self, module, g) -> None:
            self.found[module._name] = self._compute_gradient(module, g)

        def process_batch(self, indices, **kwargs) -> None:
            pass

    processor = GradientProcessor(projection_dim=p, include_bias=True, projection_type="normal", projection_seed=0)
    collector = Collect(model=view, target_modules={f"model.{name}" for name in linears}, processor=processor)
    names = list(collector.target_info)

    def vectors(inputs, targets):
        found = collector.found = {}
        with collector, warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Full backward hook is firing"
            )  # no input requires grad: expected
            view.zero_grad(set_to_none=True)
            workload.loss(view, (inputs, targets)).sum().backward()
        return torch.cat([found[name].float() for name in names], dim=1)

    scope = {
        "cnn": "final Linear only (its hooks cannot take Conv2d)",
        "transformer": "every nn.Linear (no embeddings/LayerNorm)",
    }.get(kind, "every nn.Linear")
    return Runner(
        "Bergson HookCollector (per-module p×p)",
        vectors=vectors,
        note=f"{scope}; {len(names)} modules × {p}×{p} = {len(names) * p * p} dims; normal projection",
    )


PEERS = {
    "captum_tracincp": captum_tracincp_runner,
    "captum_fast": lambda w, c, k: captum_fast_runner(w, c, k, projected=False),
    "captum_fast_randproj": lambda w, c, k: captum_fast_runner(w, c, k, projected=True),
    "trak": trak_runner,
    "dattri": dattri_runner,
    "bergson": bergson_runner,
}


def n_params(workload: Workload) -> int:
    return sum(math.prod(p.shape) for p in workload.make_model().parameters())
