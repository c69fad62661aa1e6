"""Each method under test as ``prepare(...) -> Runner``: featurize training samples (or score them), on CPU.

A runner gives either ``vectors(inputs, targets) -> [B, D]`` (a φ whose inner products are the scores), or, for
methods that only score, ``scores(train_inputs, train_targets, test_inputs, test_targets) -> [n_test, n_train]``
batch by batch, or, for methods whose build is one pass over a whole training set (kronfluence's factor fit,
Bergson's ``collect_gradients``), ``whole(...)`` with the same signature, timed as a whole.
Peers are used through their public APIs as their documentation shows; when one cannot run here, ``prepare``
raises ``Unavailable`` with the reason, which the results record instead of a number.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.speed._models import Workload

# the most multiply-adds per sample of kronfluence's eigenbasis rotations run here (the wide MLP needs 3e11)
_KRONFLUENCE_ROTATION = 1e11


class Unavailable(Exception):
    """The method cannot run here (not installed, or no CPU path): the message says why."""


@dataclass
class Runner:
    name: str
    vectors: Callable[[Tensor, Tensor], Tensor] | None = None
    scores: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    whole: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    # (wall, CPU) seconds of one batch of this size, estimated from a part of the work (too slow to run whole here)
    estimate: Callable[[int], tuple[float, float]] | None = None
    note: str = ""


def _load(workload: Workload, checkpoint: str) -> nn.Module:
    model = workload.make_model()
    model.load_state_dict(torch.load(checkpoint))
    return model.eval()


def _model_io(workload: Workload):
    """(model input, label) as a peer's ``model(*batch[:-1])``/``loss(out, label)`` convention wants them."""
    if workload.kind == "tinylm":
        return lambda inputs, targets: (inputs[:, :-1], inputs[:, 1:])
    if workload.kind == "lm":  # the model reads the whole context; the loss shifts (as causal_lm_loss)
        return lambda inputs, targets: (inputs, inputs)
    return lambda inputs, targets: (inputs, targets)


def _sum_loss(workload: Workload, per_sample: bool = False):
    """Σ_b ℓ_b over a batch in the peer's (model output, label) convention (``[B]`` per-sample losses with
    ``per_sample``); mean over tokens for the LM."""
    if workload.kind in ("lm", "tinylm"):
        shift = workload.kind == "lm"

        def loss(outputs, labels):
            if shift:
                outputs, labels = outputs[:, :-1], labels[:, 1:]
            losses = F.cross_entropy(outputs.transpose(1, 2), labels, reduction="none").mean(1)
            return losses if per_sample else losses.sum()
    else:

        def loss(outputs, labels):
            return F.cross_entropy(outputs, labels, reduction="sum")

    loss.reduction = "none" if per_sample else "sum"  # captum reads this attribute
    return loss


def training_step(workload: Workload, checkpoint: str) -> Callable[[Tensor, Tensor], None]:
    """One ordinary SGD step on a batch: batched forward + backward + update."""
    model = _load(workload, checkpoint).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(inputs, targets):
        optimizer.zero_grad()
        workload.loss(model, (inputs, targets)).mean().backward()
        optimizer.step()

    return step


# ---- TRAK ------------------------------------------------------------------------------------------

DENSE_LIMIT = 5_000_000  # parameters above which a dense p × k projection per batch is estimated, not run
SLICE = 1 << 18  # the gradient columns the estimate projects


def _dense_estimate(grad_dim: int, k: int) -> Callable[[int], tuple[float, float]]:
    """(wall, CPU) seconds TRAK's BasicProjector takes to project one batch of ``grad_dim``-long gradients, from one
    projection of a ``SLICE``-column slice scaled by ``grad_dim / SLICE``: its cost is linear in the columns (it
    regenerates the p × k matrix block by block on every call). A lower bound: the per-sample gradients are not
    counted."""
    from trak.projectors import BasicProjector, ProjectionType

    def estimate(batch: int) -> tuple[float, float]:
        projector = BasicProjector(
            grad_dim=SLICE, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32
        )
        grads = torch.randn(batch, SLICE)
        started = time.perf_counter(), time.process_time()
        projector.project(grads, model_id=0)
        scale = grad_dim / SLICE
        return (time.perf_counter() - started[0]) * scale, (time.process_time() - started[1]) * scale

    return estimate


def trak_runner(workload: Workload, checkpoint: str, k: int) -> Runner:
    """TRAK's recipe on CPU: per-sample gradients by torch.func (as its FunctionalGradientComputer), then
    BasicProjector."""
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as error:
        raise Unavailable(f"traker not installed ({error}); pip install traker") from error
    model = _load(workload, checkpoint)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    grad_dim = sum(p.numel() for p in params.values())
    if grad_dim > DENSE_LIMIT:
        return Runner(
            "TRAK BasicProjector (vmap grads)",
            estimate=_dense_estimate(grad_dim, k),
            note=f"estimated, a lower bound: its dense rademacher projection of grad_dim {grad_dim:,} timed on a "
            f"{SLICE:,}-column slice and scaled (per-sample gradients not counted); running it here would take hours",
        )
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
    batched = workload.kind in ("mlp", "cnn")
    batch_size = workload.peer_batch or workload.batch_size
    probe = dataset(workload.train.tensors[0][:1], workload.train.tensors[1][:1])
    tracin = TracInCP(
        model,
        probe,
        [checkpoint],
        checkpoints_load_func=load,
        loss_fn=_sum_loss(workload, per_sample=not batched),
        batch_size=batch_size if batched else 1,
        sample_wise_grads_per_batch=batched,
    )

    def vectors(inputs, targets):
        loader = DataLoader(dataset(inputs, targets), batch_size=batch_size if batched else 1)
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
    if workload.kind in ("lm", "tinylm"):
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
    if n_params(workload) > DENSE_LIMIT:
        raise Unavailable(
            f"its TracIn projects every batch with TRAK's dense p × k projector (see TRAK's estimated row: "
            f"hours for {n_params(workload):,} parameters here)"
        )
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
        train = DataLoader(TensorDataset(train_inputs, train_targets), batch_size=len(train_inputs))
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
    """EleutherAI's Bergson (LoGra-style per-module projections p × p, Gaussian, seeded per module), with
    p = ⌊√(k / modules)⌋ so that its vectors have at most k entries.

    On a Hugging Face causal LM it runs its real build path, ``bergson.collect_gradients(model, dataset, processor,
    cfg)`` (what ``bergson build`` runs per worker: hooks on every nn.Linear of the base model, gradients written to
    ``gradients.bin`` in its run folder), over a ``datasets.Dataset`` of the same token rows. Elsewhere (the MLPs and
    the CNN, which are not ``PreTrainedModel``s) it drives its hook collector (``HookCollectorBase``) with the same
    forward/backward as ours; its hooks take [N, S, I] inputs (the MLPs and the CNN head get S = 1) and handle
    nn.Linear only (its forward hook asserts 3-D inputs, so a Conv2d cannot be hooked): on the CNN it indexes the
    final Linear only.

    ``pip install bergson`` (2.5.1) also installs torchvision and torchaudio wheels built for another torch (and
    bitsandbytes); with torch 2.13.0+cpu those fail to load and break ``transformers``' imports, so they are
    uninstalled after it (Bergson itself does not need them).
    """
    try:
        from bergson import GradientProcessor
        from bergson.collector.collector import HookCollectorBase
    except Exception as error:  # its import pulls transformers, datasets, peft...: any failure means it cannot run here
        raise Unavailable(f"bergson cannot be imported here: {type(error).__name__}: {error}") from error
    model = _load(workload, checkpoint)
    if workload.kind == "lm":
        return _bergson_build_path(workload, model, k)
    from dataclasses import dataclass as _dataclass

    kind = workload.kind
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

    scope = "final Linear only (its hooks cannot take Conv2d)" if kind == "cnn" else "every nn.Linear"
    return Runner(
        "Bergson HookCollector (per-module p×p)",
        vectors=vectors,
        note=f"its hook collector, not its build path (needs a PreTrainedModel); {scope}; {len(names)} modules × "
        f"{p}×{p} = {len(names) * p * p} dims",
    )


def _bergson_build_path(workload: Workload, model: nn.Module, k: int) -> Runner:
    """Bergson's ``collect_gradients`` on the LM's ``PreTrainedModel``: one call over the training rows (timed as a
    whole, its writes included), then once more over the queries (untimed) with the same seeded projections."""
    import tempfile

    from bergson import GradientProcessor, IndexConfig, collect_gradients, load_gradients
    from datasets import Dataset

    hf = model.hf
    linears = [name for name, module in hf.base_model.named_modules() if isinstance(module, nn.Linear)]
    p = max(1, math.isqrt(k // len(linears)))
    batch_size = workload.peer_batch or workload.batch_size

    def collect(tokens: Tensor) -> Tensor:
        rows = tokens.tolist()
        data = Dataset.from_dict({"input_ids": rows, "length": [len(row) for row in rows]})
        folder = tempfile.mkdtemp(prefix="bergson-")
        cfg = IndexConfig(
            run_path=f"{folder}/run", projection_dim=p, projection_type="normal", projection_seed=0, include_bias=True
        )
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        processor = GradientProcessor(projection_dim=p, include_bias=True, projection_type="normal", projection_seed=0)
        batches = [list(range(start, min(len(rows), start + batch_size))) for start in range(0, len(rows), batch_size)]
        collect_gradients(hf, data, processor, cfg, batches=batches)
        found = torch.from_numpy(np.array(load_gradients(cfg.partial_run_path), dtype=np.float32))
        shutil.rmtree(folder, ignore_errors=True)
        return found

    def whole(train_inputs, train_targets, test_inputs, test_targets):
        train = collect(train_inputs)
        started = time.perf_counter(), time.process_time()
        test = collect(test_inputs)
        # (wall, CPU) seconds of the query side, not part of the build
        whole.query_s = (time.perf_counter() - started[0], time.process_time() - started[1])
        return test @ train.T

    return Runner(
        "Bergson collect_gradients (build path)",
        whole=whole,
        note=f"its build path on the PreTrainedModel: every nn.Linear of the base model (not embeddings or lm_head); "
        f"{len(linears)} modules × {p}×{p} = {len(linears) * p * p} dims; sum of token losses",
    )


# ---- kronfluence -----------------------------------------------------------------------------------


def kronfluence_runner(workload: Workload, checkpoint: str, k: int) -> Runner:
    """kronfluence (Grosse et al. 2023): EK-FAC factors fitted on the training rows (``fit_all_factors``), then
    ``compute_pairwise_scores`` of the queries against them; the loss is the measurement (as TracIn's queries).
    Influence functions with an EK-FAC inverse Hessian, not TracIn: its ρ against exact TracIn measures agreement
    with another quantity. No projection (k does not apply); it tracks nn.Linear and nn.Conv2d only."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task as KronTask
    except Exception as error:
        raise Unavailable(f"kronfluence cannot be imported here: {type(error).__name__}: {error}") from error
    import logging
    import tempfile

    # EK-FAC scores each training sample's gradient after rotating it into its layers' eigenbases (in² · out +
    # in · out² multiply-adds a layer): a model whose layers make that dearer than this is not run
    rotation = sum(
        (m.in_features + 1) * m.out_features * (m.in_features + 1 + m.out_features)
        for m in workload.make_model().modules()
        if isinstance(m, nn.Linear)
    )
    if rotation > _KRONFLUENCE_ROTATION:
        raise Unavailable(
            f"its EK-FAC rotates every sample's gradient into the factors' eigenbases, {rotation:.2g} "
            "multiply-adds a sample for this model; on this 2-core machine it did not finish 64 rows of it in 13 "
            "minutes (an earlier run)"
        )
    io = _model_io(workload)
    loss = _sum_loss(workload)

    class Task(KronTask):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            outputs = model(inputs)
            if sample:  # the true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    drawn = torch.distributions.Categorical(logits=outputs.detach()).sample()
                if workload.kind == "lm":
                    drawn = torch.cat([drawn[:, -1:], drawn[:, :-1]], dim=1)  # the loss shifts labels by one
                labels = drawn
            return loss(outputs, labels)

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return loss(model(inputs), labels)

    batch_size = workload.peer_batch or workload.batch_size

    def whole(train_inputs, train_targets, test_inputs, test_targets):
        model = prepare_model(_load(workload, checkpoint), Task())
        folder = tempfile.mkdtemp(prefix="kronfluence-")
        analyzer = Analyzer(
            analysis_name="speed",
            model=model,
            task=Task(),
            cpu=True,
            disable_tqdm=True,
            output_dir=folder,
            log_level=logging.WARNING,
        )
        train = TensorDataset(*io(train_inputs, train_targets))
        test = TensorDataset(*io(test_inputs, test_targets))
        started = time.perf_counter(), time.process_time()
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        # (wall, CPU) seconds of the fit, whose factors may come from a subset of the data
        whole.fixed_s = (time.perf_counter() - started[0], time.process_time() - started[1])
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="ekfac",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=len(test),
            per_device_train_batch_size=batch_size,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        shutil.rmtree(folder, ignore_errors=True)
        return scores

    return Runner(
        "kronfluence EK-FAC (fit factors + score)",
        whole=whole,
        note="influence functions (EK-FAC), not TracIn; nn.Linear/Conv2d only; no projection; factors fitted on the "
        "rows timed (a subset, as its docs allow, where fewer than N)",
    )


PEERS = {
    "captum_tracincp": captum_tracincp_runner,
    "captum_fast": lambda w, c, k: captum_fast_runner(w, c, k, projected=False),
    "captum_fast_randproj": lambda w, c, k: captum_fast_runner(w, c, k, projected=True),
    "trak": trak_runner,
    "dattri": dattri_runner,
    "kronfluence": kronfluence_runner,
    "bergson": bergson_runner,
}


def n_params(workload: Workload) -> int:
    return sum(math.prod(p.shape) for p in workload.make_model().parameters())
