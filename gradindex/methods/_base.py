"""The stages a method may add to a featurizer, and the shared helpers of the gradient methods.

A plain ``Featurizer`` maps a batch to ``[B, D]`` and is symmetric: the query vector is φ(q) itself
and self-influence is ⟨φ(z), φ(z)⟩. ``MethodFeaturizer`` adds what asymmetric and store-aware
methods need, each a no-op by default, called by the pipeline in this order::

    build:  attach(store) → per shard: begin_shard, featurize_train(batch)…, end_shard(store) → finish(store)
    query:  configure_query(options) → attach(store) → query_vectors(batch)…

Score of training row z for query q: ⟨query_vectors(q), row z⟩ (positive = proponent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradindex.errors import ArgumentError
from gradindex.featurize import Featurizer, LoadedCheckpoint, PerSampleGradients, model_fingerprint, select_parameters
from gradindex.methods._curvature import Curvature
from gradindex.methods._options import METHOD_OPTIONS, query_overrides, recorded_options, resolve_options
from gradindex.projection import ParamPlan, ProjectionSpec, make_projector
from gradindex.task import Task, batch_size, slice_batch, to_device
from gradindex.utils import check_fits

if TYPE_CHECKING:
    from gradindex.store import GradientStore

__all__ = ["MethodFeaturizer", "as_method_featurizer", "row_dots"]


class MethodFeaturizer(Featurizer):
    """A featurizer with the optional build and query stages of a method (see the module docstring)."""

    method: str = "custom"
    symmetric: bool = True
    # featurize_train_into writes the vectors in place and returns their squared norms as self-influence
    writes_into: bool = False

    def attach(self, store: GradientStore) -> None:
        """Load (or compute and write) what this method keeps in the store's ``transforms/``."""

    def begin_shard(self, shard: int) -> None:
        """A new shard starts: reset per-shard accumulators."""

    def featurize_train(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Stored vectors ``[B, D]`` and self-influence ``[B]`` of a batch of training samples."""
        vectors = self.featurize(batch)
        return vectors, row_dots(vectors, vectors)

    def featurize_train_into(self, batch: Any, out: Tensor) -> Tensor:
        """``featurize_train`` with the vectors written into ``out`` (``[B, D]`` float32, e.g. rows of a shard's
        preallocated buffer); returns the self-influence ``[B]``."""
        vectors, scores = self.featurize_train(batch)
        out.copy_(vectors)
        return scores

    def end_shard(self, store: GradientStore, shard: int) -> None:
        """The shard's rows are featurized: write its share of any transform (before its record)."""

    def finish(self, store: GradientStore) -> None:
        """Every shard is done (the store is not yet marked complete): reduce and write transforms."""

    def configure_query(self, options: Mapping[str, Any], store_path: Any = "this store") -> None:
        """Apply query-time options (e.g. IF's damping); asking for another value of a build-time option is an
        ``IncompatibleStoreError`` naming it, and an option of another method a ``ValueError``."""
        recorded = getattr(self, "options", {})
        if self.method in METHOD_OPTIONS:
            overrides = query_overrides(self.method, recorded, options, store_path)
        else:
            asked = sorted(name for name, value in (options or {}).items() if value is not None)
            if asked:
                raise ValueError(
                    f"store {store_path} was built with method={self.method}, which takes no options (got "
                    f"{', '.join(asked)})"
                )
            overrides = {}
        self.query_settings = {**recorded, **overrides}

    def query_vectors(self, batch: Any) -> Tensor:
        """Query vectors ``[B, D]``: φ(q) for symmetric methods, T φ(q) for asymmetric ones."""
        return self.featurize(batch)


class _BuiltinMethod(MethodFeaturizer):
    """The constructor steps gradindex's own methods share (``_setup`` first, then what the method needs)."""

    def _setup(
        self,
        method: str,
        task: Task,
        *,
        layers: Sequence[str] | None,
        normalize: bool,
        device: torch.device,
        options: Mapping[str, Any] | None,
    ) -> nn.Module:
        """Record the arguments, resolve the method's options, build the model once: the model (on ``device``)."""
        self.method = method
        self.task = task
        self.device = device
        self.normalize = normalize
        self.layers = list(layers) if layers else None
        self.options = resolve_options(method, options)
        self.query_settings = dict(self.options)
        model = task.model().to(device)
        self.model_fingerprint = model_fingerprint(model)
        return model

    def _setup_gradients(self, model: nn.Module, function: Any, checkpoints: Sequence[LoadedCheckpoint]) -> None:
        """The selected parameters and their layout, per-sample gradients of ``function`` (the loss or the margin), and
        each checkpoint's state split into those parameters and the rest (``_states``)."""
        self.param_names = select_parameters(model, self.layers)
        shapes = dict(model.named_parameters())
        self.plans = ParamPlan.layout([(name, shapes[name].shape) for name in self.param_names])
        self.n_params = sum(plan.numel for plan in self.plans)
        self.gradients = PerSampleGradients(model, function, self.param_names)
        self._states = [self.gradients.split_state(checkpoint.state) for checkpoint in checkpoints]
        self.chunk_size = chunk_rows(self.n_params)

    def _setup_projection(self, projection: ProjectionSpec) -> None:
        self.projection = projection
        self.projector = make_projector(projection, self.plans)
        self.block_dim = self.projector.out_dim
        matrix = 4 * self.block_dim if projection.kind in ("rademacher", "gaussian") else 0
        check_fits(
            f"featurizing one sample ({self.n_params:,} parameters, proj_dim={projection.dim})",
            4 * (3 * self.n_params + self.block_dim) + matrix,
            CHUNK_BYTES,
            "the featurization memory of a method",
            "lower proj_dim or featurize fewer layers (layers=GLOB)",
        )

    def _projected_fingerprint(self) -> dict:
        """The fingerprint of a method whose rows are projected gradients (``if``, ``trak``)."""
        projection = self.projection.to_dict()
        if projection["kind"] == "none":
            projection["dim"] = self.block_dim
        return {
            "method": {"name": self.method, "normalize": self.normalize, **recorded_options(self.method, self.options)},
            "projection": projection,
            "layers": self.layers,
            "params": [[plan.name, list(plan.shape)] for plan in self.plans],
            "block_dim": self.block_dim,
        }


class _GradientMethod(_BuiltinMethod):
    """What IF and Arnoldi share: one checkpoint, selected parameters, per-sample loss gradients, curvature."""

    def _setup_checkpoint(self, checkpoint: LoadedCheckpoint, model: torch.nn.Module) -> None:
        self._setup_gradients(model, self.task.loss, [checkpoint])
        self.checkpoint = checkpoint
        self._params, self._constants = self._states[0]
        self._curvatures: dict[tuple[str, int], Curvature] = {}

    def curvature(self, kind: str, batch_size: int) -> Curvature:
        key = (kind, batch_size)
        if key not in self._curvatures:
            self._curvatures[key] = Curvature(
                self.task,
                self.checkpoint.state,
                self.param_names,
                self.plans,
                kind=kind,
                batch_size=batch_size,
                device=self.device,
            )
        return self._curvatures[key]

    def loss_gradients(self, batch: Any) -> Tensor:
        """``[B, p]`` per-sample gradients of the loss at θ*."""
        batch = to_device(batch, self.device)
        size = batch_size(batch)
        parts = [
            self.gradients(slice_batch(batch, start, min(size, start + self.chunk_size)), self._params, self._constants)
            for start in range(0, size, self.chunk_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.n_params, device=self.device)


class _Symmetric(MethodFeaturizer):
    """A plain Featurizer (e.g. TracIn) seen as a method with no extra stages."""

    def __init__(self, inner: Featurizer, method: str):
        self.inner = inner
        self.method = method
        self.dim = inner.dim

    def featurize(self, batch: Any) -> Tensor:
        return self.inner.featurize(batch)

    @property
    def writes_into(self) -> bool:
        return callable(getattr(self.inner, "featurize_into", None))

    def featurize_train_into(self, batch: Any, out: Tensor) -> Tensor:
        into = getattr(self.inner, "featurize_into", None)
        if into is None:
            return super().featurize_train_into(batch, out)
        into(batch, out)
        return row_dots(out, out)

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def attach(self, store: GradientStore) -> None:
        self.inner.attach(store)

    def __getattr__(self, name: str) -> Any:  # the wrapped featurizer's own attributes (task, plans, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def as_method_featurizer(featurizer: Featurizer) -> MethodFeaturizer:
    """The featurizer itself when it has the method stages, else a symmetric wrapper."""
    if isinstance(featurizer, MethodFeaturizer):
        return featurizer
    method = "custom"
    try:
        method = featurizer.fingerprint().get("method", {}).get("name", method)
    except Exception:  # a featurizer whose fingerprint needs more setup: keep the generic name
        pass
    return _Symmetric(featurizer, method)


def row_dots(left: Tensor, right: Tensor) -> Tensor:
    """``[B, D] x [B, D] -> [B]`` float32 row-wise inner products: squared norms (``left is right``, no cancellation)
    as float32 norms squared (relative error ~1e-7; one fused reduction, 5× cheaper than a dot, 25× than float64),
    other products accumulated in float64."""
    if left is right and left.dtype == torch.float32:
        return torch.linalg.vector_norm(left, dim=1).square()
    return (left.double() * right.double()).sum(dim=1).float()


# the working memory of one chunk of samples of the methods other than TracIn
CHUNK_BYTES = 256 << 20


def chunk_rows(n_params: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Samples per chunk so that a few ``[chunk, p]`` float32 buffers stay within ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * 3 * max(1, n_params)))


def single_checkpoint(method: str, checkpoints: Sequence[LoadedCheckpoint]) -> LoadedCheckpoint:
    if len(checkpoints) != 1:
        raise ArgumentError(
            "checkpoints",
            f"method={method} uses one trained checkpoint θ* (the final one); got {len(checkpoints)}. "
            "Pass only the final checkpoint (use method=tracin or trak to combine checkpoints)",
        )
    return checkpoints[0]


def check_projection(method: str, projection: ProjectionSpec) -> None:
    """Methods whose vectors are not projected gradients accept only ``none`` or the untouched default."""
    if projection.kind == "none" or projection == ProjectionSpec(seed=projection.seed):
        return
    raise ArgumentError(
        "projection",
        f"projection={projection.kind} proj_dim={projection.dim} does not apply to method={method}: its vectors "
        + ("are per-member losses" if method == "gex" else "are coordinates in the top-r eigenbasis (set r by rank=R)")
        + "; leave projection and proj_dim at their defaults, or pass projection=none",
        also=["proj_dim", "method", "rank"],
    )


def check_gradient_projection(method: str, projection: ProjectionSpec) -> None:
    if projection.kind == "kron":
        raise ArgumentError(
            "projection",
            f"projection=kron is not available for method={method} yet; use rademacher, gaussian, sjlt or none",
            also=["method"],
        )


def unit_blocks(vectors: Tensor, block_dim: int) -> Tensor:
    """Unit-normalise each ``block_dim`` block of every row (zero rows stay zero)."""
    shape = vectors.shape
    blocks = vectors.reshape(shape[0], -1, block_dim)
    return nn.functional.normalize(blocks, dim=2).reshape(shape)


def damping_error(what: str, smallest: float, damping: float, option: str = "damping") -> ArgumentError:
    needed = max(-smallest, 0.0)
    return ArgumentError(
        option,
        f"{what} + λI is not positive definite: its smallest eigenvalue is {smallest + damping:.3g} at λ={damping:g}. "
        f"Raise {option} above {needed:.3g}, e.g. {option}={max(needed * 1.5, 1e-3):.3g}"
        + (" or use hessian=ggn (positive semi-definite)" if "Hessian" in what else ""),
        also=["hessian"],
    )
