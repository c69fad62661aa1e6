"""Factored per-sample gradients: the ``kron`` projection computed from one batched forward + backward.

For ``nn.Linear``, transformers' ``Conv1D`` (GPT-2's ``x @ W + b``), ``nn.Conv1d``/``nn.Conv2d`` (through unfold)
and ``nn.Embedding``, forward hooks keep each layer call's input ``a`` and output ``y``; one ``autograd.grad`` of the
*summed* per-sample losses w.r.t. the outputs gives ``g = ∂ℓ_b/∂y_b`` for every sample b at once, and the projected
per-sample gradient is ``Σ_t (P_out g_t)(P_in a_t)ᵀ`` (see ``gradindex.projection``' kron plan). No per-sample
gradient of those layers is ever formed, and no weight gradient is computed at all.

Why the summed loss gives per-sample output gradients: ``∂(Σ_b ℓ_b)/∂y_b = ∂ℓ_b/∂y_b`` as long as
sample b's output reaches no other sample's loss. The model runs in eval mode, where dropout is off
and BatchNorm uses its running statistics, so that holds for ordinary models. A BatchNorm without
running statistics mixes the samples of a batch even in eval mode: such a model is featurized
entirely through ``vmap(grad)`` (plan reason recorded), and a first-batch self-check refuses any other
model whose samples interact (or whose parameters are also used outside the module calls the hooks see).

A call shared by the whole batch (a position embedding of ``arange(T)[None]``: input and output with leading
dimension 1) is expanded to the batch in its hook, so each sample gets its own copy of the output and its own
output gradient. A weight used by several modules (GPT-2's token embedding, which is also its output layer) is one
``tied`` group: its gradient is the sum over its uses, each use projected with the same two sides.

Every other parameter gets its per-sample gradient from the call of the module that owns it (``find_kron_layers``
records which path each took, and why): ``nn.LayerNorm`` in closed form from its hooked input and output gradient
(``Σ_t g ⊙ x̂``, ``Σ_t g``), any other leaf module (RMSNorm, a bias of a tied head, ...) by a per-sample vjp of that
module's own forward at its recorded input and output gradient; only a parameter that no module call owns (one
used in its parent's forward) falls back to a whole-model ``vmap(grad)``. Those "rest" gradients are projected
together with ``sjlt`` (the identity when their share covers them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from gradindex.errors import TaskSpecError
from gradindex.featurize._per_sample import LossModule, PerSampleGradients
from gradindex.projection import (
    PCA_MAX_SIDE,
    PCA_MAX_WIDTH,
    REST_SIDE,
    KronLayer,
    KronPlan,
    ParamPlan,
    ProjectionSpec,
    SideSketch,
    derive_seed,
    exact_width,
    kron_side_matrix,
    make_projector,
    plan_kron,
    sketch_rank,
    small_kernel,
)
from gradindex.task import batch_size, slice_batch

__all__ = [
    "KronGradients",
    "KronRouting",
    "ParamRoute",
    "find_kron_layers",
    "is_hf_conv1d",
    "layer_second_moment",
    "layer_sides",
    "mixing_modules",
    "squared_norms",
]

log = logging.getLogger("gradindex")

_CONV = (nn.Conv1d, nn.Conv2d)
# a layer is projected flat (pca of its whole per-sample gradient) up to this many entries per calibration sample
FLAT_SAMPLES_RATIO = 16
# the kinds a tied weight's uses may have (one pair of sides for all of them)
_TIED_KINDS = ("linear", "hf_conv1d", "embedding")
# how each path is described in the plan
_WHY = {
    "linear": "nn.Linear: Σ_t (P_out g_t)(P_in a_t)ᵀ from its hooked input and output gradient",
    "hf_conv1d": "transformers Conv1D (x @ W + b, weight stored [in, out]): factored like nn.Linear",
    "conv": "convolution: Σ_t (P_out g_t)(P_in patch_t)ᵀ, the patches projected by a convolution",
    "embedding": "nn.Embedding: P_out g_t into the P_in rows of the tokens it looked up (a call shared by the "
    "batch, such as a position embedding, is expanded to it)",
    "norm": "nn.LayerNorm: Σ_t g ⊙ x̂ and Σ_t g from its hooked input and output gradient (exact)",
    "module": "its module's own call: a per-sample vjp of that module's forward at its recorded input and output "
    "gradient (exact)",
}


def mixing_modules(model: nn.Module) -> list[str]:
    """Modules whose eval-mode output for one sample depends on the other samples of the batch."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            not module.track_running_stats or module.running_mean is None
        ):
            names.append(name or type(module).__name__)
    return names


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (``y = x @ W + b``, ``W`` stored ``[in, out]``), recognised
    without importing transformers: by its class name, its ``nf`` (output width) and its weight's shape."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and weight.shape[1] == module.nf
    )


def _weight_kind(module: nn.Module) -> str | None:
    """The factored kind of ``module``'s weight, or None when its weight cannot be factored."""
    if isinstance(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "hf_conv1d"
    if isinstance(module, _CONV):
        return "conv" if module.groups == 1 and module.padding_mode == "zeros" else None
    if isinstance(module, nn.Embedding):
        # max_norm rewrites the weights in the forward; frequency scaling couples samples
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq else None
    return None


@dataclass(frozen=True)
class ParamRoute:
    """How a group of parameters that are not factored gets its per-sample gradients, and why.

    ``path``: ``norm`` (an ``nn.LayerNorm``, in closed form from its hooks), ``module`` (a per-sample vjp of the
    owning module's own call) or ``vmap`` (a whole-model ``vmap(grad)``: no module call of its own owns them).
    """

    path: str
    module: str  # the owning module ("" for the model itself)
    params: tuple[str, ...]
    why: str

    def to_dict(self) -> dict:
        return {"path": self.path, "module": self.module, "params": list(self.params), "why": self.why}


@dataclass(frozen=True)
class KronRouting:
    """Which path every selected parameter takes: factored ``layers`` (model order) and ``routes`` for the rest.

    ``rest`` lists every selected parameter not in a layer, in the selection's order (the order of the rest block).
    """

    layers: tuple[KronLayer, ...]
    routes: tuple[ParamRoute, ...]
    rest: tuple[str, ...]

    def path_of(self, param: str) -> str:
        return next(route.path for route in self.routes if param in route.params)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def find_kron_layers(model: nn.Module, param_names: Sequence[str]) -> KronRouting:
    """Route the selected parameters: factored layers, tied groups, hooked norms, module vjps, whole-model vmap.

    A weight owned by one factorable module is a layer (with that module's bias as an input column of ones when
    the bias is selected and its own); a weight owned by several Linear / Conv1D / Embedding modules is one ``tied``
    group. An ``nn.LayerNorm``'s parameters come from its hooks, any other leaf module's own parameters from a vjp
    of its call; what is left (parameters of the model itself or of a module with submodules, of
    ``nn.MultiheadAttention``, weights shared in a way no single call accounts for) goes to a whole-model vmap,
    each with the reason recorded.

    Args:
        model: the task's model.
        param_names: the selected parameters (``select_parameters``; a tied weight under its first name).

    Returns:
        The routing: layers, one route per group of other parameters, and the rest's order.
    """
    selected = list(param_names)
    wanted = set(selected)
    mixing = mixing_modules(model)
    if mixing:
        why = f"modules {', '.join(mixing)} mix the samples of a batch (BatchNorm without running statistics)"
        return KronRouting((), (ParamRoute("vmap", "", tuple(selected), why),), tuple(selected))
    canonical = {id(param): name for name, param in model.named_parameters()}
    modules = list(model.named_modules())
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in modules:
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((name, module, attr))
    # submodules of nn.MultiheadAttention are applied functionally by their parent: hooks would never see them
    functional = {
        f"{name}.{child}" if name else child: name
        for name, module in modules
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_modules()
        if child
    }
    layers: list[KronLayer] = []
    covered: set[str] = set()
    vmap_why: dict[str, tuple[str, str]] = {}  # param -> (owning module, why)
    for name, module in modules:
        kind = _weight_kind(module)
        weight = module._parameters.get("weight")
        if not name or name in functional or kind is None or weight is None:
            continue
        weight_name = canonical[id(weight)]
        if weight_name not in wanted or weight_name in covered or weight_name in vmap_why:
            continue
        uses = owners[id(weight)]
        if len(uses) == 1:
            bias = module._parameters.get("bias")
            has_bias = (
                kind != "embedding"
                and bias is not None
                and canonical[id(bias)] in wanted
                and len(owners[id(bias)]) == 1
            )
            params = (weight_name, canonical[id(bias)]) if has_bias else (weight_name,)
            in_dim, out_dim = {
                "linear": lambda: (module.in_features, module.out_features),
                "hf_conv1d": lambda: (weight.shape[0], weight.shape[1]),
                "conv": lambda: (math.prod(weight.shape[1:]), module.out_channels),
                "embedding": lambda: (module.num_embeddings, module.embedding_dim),
            }[kind]()
            layers.append(KronLayer(name, kind, params, in_dim + has_bias, out_dim))
            covered.update(params)
            continue
        kinds = [(use, _weight_kind(owner), attr) for use, owner, attr in uses]
        if all(attr == "weight" and use_kind in _TIED_KINDS and use not in functional for use, use_kind, attr in kinds):
            rows, cols = weight.shape
            # an embedding's vocabulary (its rows) is the input side, as for an untied embedding
            indicator = any(use_kind == "embedding" for _, use_kind, _ in kinds)
            in_dim, out_dim = (rows, cols) if indicator else (cols, rows)
            layers.append(
                KronLayer(name, "tied", (weight_name,), in_dim, out_dim, tuple((use, kind) for use, kind, _ in kinds))
            )
            covered.add(weight_name)
        else:
            users = ", ".join(f"{use} ({type(owner).__name__}.{attr})" for use, owner, attr in uses)
            vmap_why[weight_name] = (name, f"one weight used by {users}, not all of them factorable layers' weights")
    rest = [param for param in selected if param not in covered]
    routes: list[ParamRoute] = []
    routed: set[str] = set(vmap_why)
    for name, module in modules:
        own = [
            canonical[id(param)]
            for param in module._parameters.values()
            if param is not None and canonical[id(param)] in wanted and canonical[id(param)] not in covered
        ]
        own = [param for param in own if param not in routed and len(owners[id(model.get_parameter(param))]) == 1]
        if not own or not name or name in functional:
            continue
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            routes.append(ParamRoute("norm", name, tuple(own), _WHY["norm"]))
        elif not _is_leaf(module):
            continue
        elif isinstance(module, nn.Embedding) and module.max_norm is not None:
            for param in own:
                vmap_why[param] = (name, "nn.Embedding with max_norm rewrites its weight during the forward")
        else:
            why = f"{type(module).__name__}: {_WHY['module']}"
            routes.append(ParamRoute("module", name, tuple(own), why))
        routed.update(own)
    for param in rest:
        if param in routed and param not in vmap_why:
            continue
        if param not in vmap_why:
            owner, module, _ = owners[id(model.get_parameter(param))][0]
            if len(owners[id(model.get_parameter(param))]) > 1:
                users = ", ".join(use or "the model" for use, _, _ in owners[id(model.get_parameter(param))])
                why = f"used by several modules ({users}): no single module call accounts for it"
            elif owner in functional:
                why = f"applied functionally by nn.MultiheadAttention {functional[owner] or 'the model'}"
            elif not owner:
                why = "a parameter of the model itself, used in its own forward: no module call of its own"
            else:
                why = (
                    f"a parameter of {owner} ({type(module).__name__}), a module with submodules: only a whole-model "
                    "vmap sees how its forward uses it"
                )
            vmap_why[param] = (owner, why)
    by_reason: dict[tuple[str, str], list[str]] = {}
    for param in rest:
        if param in vmap_why:
            by_reason.setdefault(vmap_why[param], []).append(param)
    routes += [ParamRoute("vmap", owner, tuple(params), why) for (owner, why), params in by_reason.items()]
    return KronRouting(tuple(layers), tuple(routes), tuple(rest))


@dataclass
class _Call:
    """One call of a hooked module: its input (expanded to the batch when the call was shared), output and, after
    the backward, the output's per-sample gradient; a module whose parameters come from a vjp keeps all arguments."""

    inputs: Tensor | None
    output: Tensor | None
    version: int
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    grad: Tensor | None = None


def _detached(tree: Any) -> Any:
    return tree_map(lambda value: value.detach() if isinstance(value, Tensor) else value, tree)


class _Records:
    """What the hooks saw in one forward: per module, each call (input, output, output version)."""

    def __init__(self) -> None:
        self.active = False
        self.clone_outputs = False
        self.size = 0  # the batch size of the forward under way
        self.calls: dict[str, list[_Call]] = {}

    def hook(self, name: str, keep_arguments: bool = False):
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if not self.active:
                return None
            if not isinstance(output, Tensor):
                raise TaskSpecError(
                    f"the kron projection reads the output of module {name}, but it returned a "
                    f"{type(output).__name__}, not a tensor; leave its parameters out with --layers, or use "
                    "--projection sjlt"
                )
            inputs = args[0] if args and isinstance(args[0], Tensor) else None
            returned = None
            if (
                self.size > 1
                and output.ndim
                and output.shape[0] == 1
                and (inputs is None or (inputs.ndim and inputs.shape[0] == 1))
            ):
                # one call shared by the batch (a position embedding of arange(T)[None]): each sample gets its own
                # copy, whose gradient is that sample's (the model broadcasts it the same way)
                output = returned = output.expand(self.size, *output.shape[1:]).contiguous()
                if inputs is not None:
                    inputs = inputs.expand(self.size, *inputs.shape[1:])
            call = _Call(None if inputs is None else inputs.detach(), output, output._version)
            if keep_arguments:
                call.args, call.kwargs = _detached(args), _detached(kwargs)
            self.calls.setdefault(name, []).append(call)
            # a later in-place op (ReLU(inplace=True)) would rewrite the output autograd differentiates against
            return output.clone() if self.clone_outputs else returned

        return forward_hook


class KronGradients:
    """Per-sample projected gradients ``[B, plan.dim]`` of one model at given checkpoint states.

    ``engine(batch, state, checkpoint)``: ``state`` holds the LossModule's tensors (``model.<name>`` keys).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[nn.Module, Any], Tensor],
        param_names: Sequence[str],
        spec: ProjectionSpec,
        device: torch.device,
        *,
        autocast: bool = False,
        compile: bool = False,
        plan: Sequence[dict] | None = None,
    ):
        """``plan``: the per-layer plan a manifest recorded (``plan_dict()``), used as is; without it the plan
        is the shape-only one until ``replan`` gives it calibration energies."""
        self.module = LossModule(model, loss).eval()
        self.spec = spec
        self.device = device
        self.autocast = autocast and device.type == "cuda"
        self.mixing = mixing_modules(model)
        self.routing = find_kron_layers(model, param_names)
        layers, rest = list(self.routing.layers), list(self.routing.rest)
        shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
        rest_plans = ParamPlan.layout([(name, shapes[name]) for name in rest])
        self._groups = (layers, rest, sum(item.numel for item in rest_plans))
        self.modules = dict(self.module.model.named_modules())
        self.norms = [route.module for route in self.routing.routes if route.path == "norm"]
        self.module_routes = [route for route in self.routing.routes if route.path == "module"]
        self.rest_plans = rest_plans
        self.vmap_params = [name for name in rest if self.routing.path_of(name) == "vmap"]
        self.vmap = PerSampleGradients(model, loss, self.vmap_params) if self.vmap_params else None
        self.records = _Records()
        hooked = list(
            dict.fromkeys(
                [module for layer in layers for module, _, _ in _uses(layer)]
                + self.norms
                + [route.module for route in self.module_routes]
            )
        )
        kept = {route.module for route in self.module_routes}
        self._handles = [
            self.modules[name].register_forward_hook(self.records.hook(name, name in kept), with_kwargs=True)
            for name in hooked
        ]
        # the parameters that must require grad so that every hooked output does
        self._grad_keys = {f"model.{layer.params[0]}" for layer in layers} | {
            f"model.{param}" for route in self.routing.routes if route.path != "vmap" for param in route.params
        }
        # each module route's tensors in the state: (attribute, state key, differentiated)
        canonical = {id(value): name for name, value in model.named_parameters()}
        canonical.update({id(value): name for name, value in model.named_buffers()})
        self._module_state = {
            route.module: [
                (attr, f"model.{canonical[id(value)]}", canonical[id(value)] in route.params)
                for attr, value in [
                    *self.modules[route.module]._parameters.items(),
                    *self.modules[route.module]._buffers.items(),
                ]
                if value is not None and id(value) in canonical
            ]
            for route in self.module_routes
        }
        self._checked = False
        self.bytes_per_sample = 0  # measured on the first chunk
        self._outer = torch.compile(_project_layer, dynamic=True) if compile else _project_layer
        self._compiled = compile
        self._recorded = None if plan is None else [dict(entry) for entry in plan]
        # TrackStar's Adam normaliser per checkpoint (normalize_by): (out, in) side scales per layer, the rest's
        self._side_scales: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        self._rest_scales: dict[int, Tensor] = {}
        self._set_plan(plan_kron(spec.dim, *self._groups) if plan is None else KronPlan.from_dict(plan, *self._groups))

    # ---- plan and matrices -----------------------------------------------------------------------

    @property
    def needs_calibration(self) -> bool:
        """Whether the plan has a choice to make (not everything fits) that calibration would inform."""
        layers, _rest, rest_numel = self._groups
        return self.spec.dim < sum(layer.numel for layer in layers) + rest_numel

    def replan(self, energies: Sequence[float], sides: str = "gaussian", spectra: Sequence | None = None) -> None:
        """Plan from calibration ``energies`` (one per layer, then the rest) and, with pca sides, each side's
        ``spectra`` (see ``plan_kron``)."""
        self._set_plan(plan_kron(self.spec.dim, *self._groups, energies=energies, sides=sides, spectra=spectra))

    def _set_plan(self, plan: KronPlan) -> None:
        self.plan = plan
        self.dim = plan.dim
        self.rest_projector = (
            make_projector(
                ProjectionSpec(
                    kind="none" if plan.rest_kind == "identity" else "sjlt", dim=plan.rest_dim, seed=self.spec.seed
                ),
                self.rest_plans,
            )
            if plan.rest_params and plan.rest_kind != "pca"
            else None
        )
        self._matrices: dict[tuple[int, str, str], Tensor | None] = {}
        self.bytes_per_sample = 0

    def energies(self, batch: Any, state: dict[str, Tensor]) -> list[float]:
        """Σ over the batch of each group's per-sample squared gradient norm ``|G_b|²`` (layers, then the rest).

        Exact, from the same hooks as the projection: ``|Σ_t g_t a_tᵀ|²`` through the per-sample gradient or
        the Gram matrices of the two sides, whichever costs less (a tied weight: over all its uses together, cross
        terms included); the rest from its per-sample gradients.
        """
        return self.calibrate_batch(batch, state, {}, set())

    def calibrate_batch(
        self,
        batch: Any,
        state: dict[str, Tensor],
        moments: dict[tuple[str, str], Any],
        keys: set[tuple[str, str]] | None = None,
        block: int = 1 << 22,
    ) -> list[float]:
        """One forward and backward of a calibration batch: its group energies (``energies``), with the side
        statistics of ``keys`` added into ``moments`` (``side_moments``) from the same pass, unless an energy is NaN
        or infinite (the caller then finds the rows at fault and calibrates on the others)."""
        size = batch_size(batch)
        calls = self._forward_backward(batch, state)
        self._check_per_sample(calls, size)
        layers, rest, _ = self._groups
        sums = []
        parts = {}
        for layer in layers:
            parts[layer.name] = self._layer_parts(layer, calls)
            found = parts[layer.name]
            with small_kernel(sum(2.0 * g.numel() * (a.shape[-1] if a.ndim == 3 else 1) for a, g in found)):
                sums.append(float(_parts_squared_norms(found, layer.in_dim).sum()) if found else 0.0)
        rest_rows = None
        if rest:
            rest_rows = self._rest_gradients(batch, state, calls, size)
            sums.append(float(rest_rows.double().square().sum()))
        if (keys is None or keys) and all(math.isfinite(value) for value in sums):
            self._add_moments(batch, state, calls, size, moments, keys, block, rest_rows, parts)
        return sums

    def side_moments(
        self,
        batch: Any,
        state: dict[str, Tensor],
        moments: dict[tuple[str, str], Any],
        keys: set[tuple[str, str]] | None = None,
        block: int = 1 << 22,
    ) -> None:
        """Add one batch's second moments of the narrow pca sides into ``moments`` ({(layer, side): float64 tensor}),
        only those in ``keys`` when given (the caller bounds how many ``[width, width]`` moments live at once).

        Keys are ``(layer, side)`` with side ``in``/``out`` (a factored side), ``flat`` (a small layer's whole
        per-sample gradient) or ``REST_SIDE`` (the unfactored parameters); a flat key gathers the vectors themselves
        (``[samples, width]``, rows appended batch after batch) instead of their moment. A key whose entry in
        ``moments`` is a ``SideSketch`` (a wide side) streams into the sketch instead: its moment is never formed.

        A side's moment is Σ_b Σ_t w_t x_t x_tᵀ over samples and positions (``x`` the layer's input ``a`` or output
        gradient ``g``), each position weighted by the squared norm of its other side (``|g_t|²`` for the input,
        ``|a_t|²`` for the output): for one position ``|G|² = |g|²|a|²``, so the top eigenvectors are the directions
        that carry the most per-sample gradient energy, not merely the most activation. An embedding's input moment
        is diagonal and kept as a vector: the gradient energy that reached each token's row (a tied weight whose
        vocabulary side is also a head's output side adds the embedding's energies to the head's full moment). A tied
        weight's moments are gathered over all its uses. Positions are taken in blocks of about ``block`` numbers
        (float32 products, summed in float64), so long sequences do not double their memory.
        """
        size = batch_size(batch)
        calls = self._forward_backward(batch, state)
        self._check_per_sample(calls, size)
        self._add_moments(batch, state, calls, size, moments, keys, block, None)

    def _add_moments(
        self,
        batch: Any,
        state: dict[str, Tensor],
        calls: dict[str, list[_Call]],
        size: int,
        moments: dict[tuple[str, str], Any],
        keys: set[tuple[str, str]] | None,
        block: int,
        rest_rows: Tensor | None,
        parts: dict[str, list[tuple[Tensor, Tensor]]] | None = None,
    ) -> None:
        """``side_moments`` of one batch whose hooked calls are ``calls`` (``rest_rows``: its rest gradients, and
        ``parts``: each layer's ``_layer_parts``, when already computed)."""
        if keys is None:
            keys = {(name, side) for name, side, _, _ in self.pca_shapes()}
        for layer in self._groups[0]:
            wanted = [
                (side, width)
                for side, width in (("in", layer.in_dim), ("out", layer.out_dim))
                if (layer.name, side) in keys
            ]
            layer_parts = (parts or {}).get(layer.name) if wanted else []
            for a, g in self._layer_parts(layer, calls) if layer_parts is None else layer_parts:
                indicator = a.ndim == 2  # token ids [B, T]: the input vectors are their indicators
                a = a.reshape(-1) if indicator else a.reshape(-1, a.shape[-1])
                g = g.reshape(-1, g.shape[-1])
                for side, width in wanted:
                    key = (layer.name, side)
                    sketch = moments.get(key)
                    if isinstance(sketch, SideSketch):
                        _sketch_part(sketch, side, a, g, indicator)
                        continue
                    step = max(1, block // max(g.shape[1], 1 if indicator else a.shape[1]))
                    diagonal = side == "in" and layer.indicator_in
                    if key not in moments:  # one moment per side, summed into in place batch after batch
                        shape = (width,) if diagonal else (width, width)
                        moments[key] = torch.zeros(shape, dtype=torch.float64, device=g.device)
                    for start in range(0, g.shape[0], step):
                        # float32 products of a block of positions, summed in float64 (small ones on one thread)
                        g_part = g[start : start + step]
                        with small_kernel(2.0 * g_part.shape[0] * width * (1 if diagonal else width)):
                            self._add_block(
                                moments[key], side, width, a[start : start + step], g_part, indicator, diagonal
                            )
        # a flat group (a small layer's whole per-sample gradient, the unfactored parameters) keeps its calibration
        # vectors themselves, [n, width]: its moment Σ_b v_b v_bᵀ has rank at most n (see flat_spectrum)
        flat = [((layer.name, "flat"), layer) for layer in self._groups[0] if (layer.name, "flat") in keys]
        for key, layer in flat:
            rows = self._layer_gradient(layer, calls).reshape(size, -1).double()
            moments[key] = rows if key not in moments else torch.cat([moments[key], rows])
        if REST_SIDE in keys:
            rows = (rest_rows if rest_rows is not None else self._rest_gradients(batch, state, calls, size)).double()
            moments[REST_SIDE] = rows if REST_SIDE not in moments else torch.cat([moments[REST_SIDE], rows])

    @staticmethod
    def _add_block(found: Tensor, side: str, width: int, a: Tensor, g: Tensor, indicator: bool, diagonal: bool) -> None:
        """Add one block of positions' weighted moment of a side into ``found`` (see ``side_moments``)."""
        if side == "in" and indicator:
            energy = torch.linalg.vecdot(g, g).double()
            if diagonal:
                found.index_add_(0, a, energy)
            else:  # onto the diagonal of the full moment
                found.view(-1).index_add_(0, a * (width + 1), energy)
        elif side == "in":
            found += (a.T @ (a * torch.linalg.vecdot(g, g).unsqueeze(1))).double()
        else:
            weighted = g if indicator else g * torch.linalg.vecdot(a, a).unsqueeze(1)
            found += (g.T @ weighted).double()

    def sketch_ranks(self, shapes: Sequence[tuple]) -> dict[tuple[str, str], int]:
        """``{(layer, side): l}`` for each side among ``shapes`` (``(layer, side, width[, k])``) wide enough to be
        sketched (``SideSketch``) rather than formed: a factored side (not a diagonal token side) where
        ``exact_width`` says no; ``l`` from ``sketch_rank`` (the plan's dim, and k when the shape gives one)."""
        indicator = {layer.name for layer in self._groups[0] if layer.indicator_in}
        ranks = {}
        for shape in shapes:
            name, side, width = shape[:3]
            if side not in ("in", "out") or (side == "in" and name in indicator):
                continue
            rank = sketch_rank(width, self.spec.dim, shape[3] if len(shape) > 3 else 0)
            if not exact_width(width, rank):
                ranks[(name, side)] = rank
        return ranks

    def new_sketch(self, checkpoint: int, key: tuple[str, str], width: int, rank: int) -> SideSketch:
        """An empty sketch of one side at one checkpoint, its ``Ω`` seeded from the projection's seed and the side."""
        seed = derive_seed("kron-sketch", self.spec.seed, checkpoint, key[0], key[1], width, rank)
        return SideSketch(width, rank, seed, self.device)

    def pca_groups(self, budget: int) -> list[list[tuple[str, str, int, int]]]:
        """``pca_shapes`` cut into groups whose float64 moments take at most ``budget`` bytes together (see
        ``moment_groups``)."""
        return self.moment_groups(self.pca_shapes(), budget)

    def moment_groups(
        self, shapes: Sequence[tuple], budget: int, ranks: dict[tuple[str, str], int] | None = None
    ) -> list[list[tuple]]:
        """``shapes`` (``(layer, side, width, ...)``) cut into groups whose float64 moments (``[width, width]``; an
        embedding's input side, diagonal: ``[width]``; a side sketched to ``ranks[(layer, side)]`` directions:
        ``[width, rank]`` and its float32 copy) take at most ``budget`` bytes together; a side larger than that is a
        group of its own."""
        indicator = {layer.name for layer in self._groups[0] if layer.indicator_in}
        groups: list[list[tuple]] = [[]]
        used = 0
        for shape in shapes:
            name, side, width = shape[:3]
            if ranks and (name, side) in ranks:
                size = 12 * width * ranks[(name, side)]
            else:
                size = 8 * width * (1 if side == "in" and name in indicator else width)
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0
            groups[-1].append(shape)
            used += size
        return groups if groups[0] else []

    def pca_shapes(self) -> list[tuple[str, str, int, int]]:
        """``(layer, side, width, k)`` of every pca matrix one checkpoint needs (the rest's last, as ``REST_SIDE``),
        in the order they are packed."""
        shapes = [
            shape
            for plan in self.plan.layers
            if plan.sides == "pca"
            for shape in (
                [(plan.layer.name, "flat", plan.layer.numel, plan.flat)]
                if plan.flat
                else [(plan.layer.name, side, width, k) for side, width, k in plan.narrow_sides()]
            )
        ]
        if self.plan.rest_kind == "pca":
            shapes.append((*REST_SIDE, self.plan.rest_numel, self.plan.rest_dim))
        return shapes

    def spectrum_shapes(self, samples: int) -> list[tuple[str, str, int]]:
        """``(layer, side, width)`` of every moment whose spectrum a pca plan can use: a small layer's whole per-sample
        gradient (side ``flat``), else both sides of each layer narrow enough to decompose (an embedding's input side
        always), then the rest's.

        A layer is small when it has at most ``PCA_MAX_WIDTH`` entries and at most ``FLAT_SAMPLES_RATIO`` times the
        calibration ``samples``: a flat pca keeps only directions the calibration samples span (at most one per
        sample), so it pays only where they span a good share of the layer; factored sides reach beyond them."""
        layers, rest, rest_numel = self._groups
        shapes = []
        for layer in layers:
            if layer.numel <= min(PCA_MAX_WIDTH, FLAT_SAMPLES_RATIO * samples):
                shapes.append((layer.name, "flat", layer.numel))
            elif max(([] if layer.indicator_in else [layer.in_dim]) + [layer.out_dim]) <= PCA_MAX_SIDE:
                shapes += [(layer.name, "in", layer.in_dim), (layer.name, "out", layer.out_dim)]
        if rest and rest_numel <= PCA_MAX_WIDTH:
            shapes.append((*REST_SIDE, rest_numel))
        return shapes

    def pca_matrix(self, checkpoint: int, layer: str, side: str) -> Tensor | None:
        return self._matrices.get((checkpoint, layer, side))

    def set_pca_matrix(self, checkpoint: int, layer: str, side: str, matrix: Tensor) -> None:
        self._matrices[(checkpoint, layer, side)] = matrix.to(self.device, torch.float32)

    def normalize_by(self, checkpoint: int, moments: dict[str, Tensor], eps: dict[str, float]) -> None:
        """Divide one checkpoint's per-sample gradients by Adam's second moments before they are projected
        (TrackStar), folded into the projection. A factored layer's ``[out, in]`` moment V (bias as its last column)
        is replaced by its Adafactor factorisation V ≈ r cᵀ / Σr (r = V.sum(1), c = V.sum(0), the rank-1 fit
        that keeps every row and column sum), whose elementwise 1/√ is rank-1 too: the output side is scaled by
        √(Σr / r) and the input side by 1/√c, so Σ_t (P_out g_t)(P_in a_t)ᵀ becomes the projection of G ⊘ √V without
        forming G (exact when V is rank-1; Adam's ε is left out there, as Adafactor's). Every other parameter (norms,
        biases the hooks do not factor) is divided elementwise by Adam's own √v̂ + ε.

        Args:
            checkpoint: the checkpoint position the scales apply to.
            moments: parameter name -> v̂ (``gradindex.checkpoints.OptimizerMoments.moments``), every parameter of
                this engine present.
            eps: parameter name -> Adam's ε.
        """
        tiny = 1e-30  # Adafactor's ε₁: keeps a row or column that never moved finite
        for layer in self.routing.layers:
            moment = layer_second_moment(layer, moments).to(self.device, torch.float64)
            rows, columns = moment.sum(1).clamp_min(tiny), moment.sum(0).clamp_min(tiny)
            scale_out = (rows.sum() / rows).sqrt().float()
            self._side_scales[(checkpoint, layer.name)] = (scale_out, columns.rsqrt().float())
        if self.rest_plans:
            self._rest_scales[checkpoint] = torch.cat(
                [(1.0 / (moments[plan.name].double().sqrt() + eps[plan.name])).reshape(-1) for plan in self.rest_plans]
            ).to(self.device, torch.float32)

    def plan_dict(self) -> list[dict]:
        """The plan as the manifest records it: each factored group (its kind, sides and k, the path and why), then
        the rest (its projection, and each group of it with its path and why); a recorded plan comes back as it
        was recorded."""
        if self._recorded is not None:
            return [dict(entry) for entry in self._recorded]
        entries = self.plan.to_dict()
        for entry, plan in zip(entries, self.plan.layers):
            entry["path"] = "factored"
            entry["why"] = _layer_why(plan.layer) + (
                "; small enough to form its per-sample gradient from the hooks, projected on its top directions "
                "(flat pca)"
                if plan.flat
                else ""
            )
        if self.plan.rest_params:
            entries[len(self.routing.layers)]["groups"] = [route.to_dict() for route in self.routing.routes]
        if self.mixing:
            entries.append(
                {
                    "fallback_reason": f"modules {', '.join(self.mixing)} mix samples "
                    "(BatchNorm without running statistics)"
                }
            )
        return entries

    def _rest_side(self, checkpoint: int) -> Tensor:
        return self._flat_side(checkpoint, REST_SIDE[0], REST_SIDE[1])

    def _rest_dense(self, checkpoint: int, entries: int = 1 << 22) -> Tensor | None:
        """The rest's seeded projection (``sjlt``, or the identity) as a dense ``[rest_numel, rest_dim]`` matrix (the
        projector applied to the identity, once per checkpoint) when it has at most ``entries`` entries: one matrix
        product per chunk instead of a scatter per parameter. None when larger."""
        plan = self.plan
        if plan.rest_numel * plan.rest_dim > entries:
            return None
        key = (checkpoint, REST_SIDE[0], "dense")
        if key not in self._matrices:
            rows = []
            for start in range(0, plan.rest_numel, 1024):
                stop = min(plan.rest_numel, start + 1024)
                unit = torch.zeros(stop - start, plan.rest_numel, dtype=torch.float32, device=self.device)
                unit[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                rows.append(self.rest_projector.project(unit, checkpoint))
            self._matrices[key] = torch.cat(rows).contiguous()
        return self._matrices[key]

    def _flat_side(self, checkpoint: int, layer: str, side: str = "flat") -> Tensor:
        """The pca matrix of a flat group (a small layer, or the rest with ``side`` "rest")."""
        matrix = self._matrices.get((checkpoint, layer, side))
        if matrix is None:
            what = "the unfactored parameters" if side == "rest" else layer
            raise RuntimeError(
                f"the pca matrix of {what} is not loaded: it comes from the build's calibration and is kept in the "
                "store (transforms/kron_sides); attach the featurizer to its store first"
            )
        return matrix

    def _side(self, checkpoint: int, plan, side: str) -> Tensor | None:
        key = (checkpoint, plan.layer.name, side)
        if key not in self._matrices:
            if plan.sides == "pca" and any(narrow == side for narrow, _, _ in plan.narrow_sides()):
                raise RuntimeError(
                    f"the pca side matrices of {plan.layer.name} are not loaded: they come from the build's "
                    "calibration and are "
                    "kept in the store (transforms/kron_sides); attach the featurizer to its store first"
                )
            matrix = kron_side_matrix(
                self.spec.seed, checkpoint, plan.layer, side, plan.k_in if side == "in" else plan.k_out, plan.sides
            )
            self._matrices[key] = None if matrix is None else matrix.to(self.device)
        return self._matrices[key]

    # ---- one batch ---------------------------------------------------------------------------------

    def _forward_backward(self, batch: Any, state: dict[str, Tensor]) -> dict[str, list[_Call]]:
        """Every hooked module call with its input and per-sample output gradient, from one forward and one
        backward."""
        params = {
            key: (value.detach().requires_grad_(True) if key in self._grad_keys else value)
            for key, value in state.items()
        }
        for attempt in range(2):
            self.records.calls = {}
            self.records.size = batch_size(batch)
            self.records.active = True
            try:
                with torch.enable_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    losses = functional_call(self.module, params, (batch,))
            finally:
                self.records.active = False
            calls = self.records.calls
            rewritten = any(call.output._version != call.version for records in calls.values() for call in records)
            if rewritten and attempt == 0:
                self.records.clone_outputs = True  # once seen, keep cloning for this model
                continue
            break
        if losses.ndim != 1:
            raise TaskSpecError(
                f"the task's loss must return one value per sample, shape [B]; it returned shape {list(losses.shape)}"
            )
        outputs = [call.output for records in calls.values() for call in records if call.output.requires_grad]
        grads = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else [])
        for records in calls.values():
            for call in records:
                grad = next(grads) if call.output.requires_grad else None
                call.grad = torch.zeros_like(call.output) if grad is None else grad.detach()
                call.output = None
        return calls

    def __call__(
        self, batch: Any, state: dict[str, Tensor], checkpoint: int, out: Tensor | None = None, scale: float = 1.0
    ) -> Tensor:
        """collated batch of B samples -> [B, plan.dim] (float32), times ``scale``; written straight into ``out``
        (a ``[B, plan.dim]`` float32 view, e.g. one checkpoint's columns of a preallocated output) when given."""
        size = batch_size(batch)
        calls = self._forward_backward(batch, state)
        self._check_per_sample(calls, size)
        if not self.bytes_per_sample:
            self.bytes_per_sample = self._measure(calls, size)
        if out is None:
            out = torch.empty(size, self.dim, dtype=torch.float32, device=self.device)
        offset = 0
        for plan in self.plan.layers:
            view = out[:, offset : offset + plan.dim]
            if plan.flat:  # a small layer: its per-sample gradient on its top directions
                block = self._layer_block(plan, calls, checkpoint)
                if block is None:  # the module did not run: its parameters do not affect the loss
                    view.zero_()
                else:
                    torch.matmul(block.reshape(size, -1), self._flat_side(checkpoint, plan.layer.name), out=view)
            elif not self._layer_block(plan, calls, checkpoint, view.unflatten(1, (plan.k_out, plan.k_in))):
                view.zero_()
            offset += plan.dim
        rest = None
        if self.plan.rest_params:
            rest = self._rest_gradients(batch, state, calls, size)
            view = out[:, offset:]
            dense = self._rest_side(checkpoint) if self.rest_projector is None else self._rest_dense(checkpoint)
            normalized = rest if checkpoint not in self._rest_scales else rest * self._rest_scales[checkpoint]
            if dense is not None:
                torch.matmul(normalized, dense, out=view)
            else:
                view.copy_(self.rest_projector.project(normalized, checkpoint))
        if scale != 1.0:
            out.mul_(scale)
        if not self._checked:
            self._checked = True
            self._self_check(batch, state, calls, size, rest)
        return out

    def _layer_block(self, plan, calls: dict[str, list[_Call]], checkpoint: int, out: Tensor | None = None) -> Any:
        """One factored group's ``[B, k_out, k_in]`` block, summed over its calls (and a tied weight's uses); None
        when its module never ran. With ``out`` (a ``[B, k_out, k_in]`` view) the block is written there (the first
        call straight into it, the others added) and whether anything was written is returned instead."""
        layer = plan.layer
        p_in, p_out = self._side(checkpoint, plan, "in"), self._side(checkpoint, plan, "out")
        scales = self._side_scales.get((checkpoint, layer.name))
        if scales is not None:  # TrackStar's Adam normaliser, folded into the sides (normalize_by)
            p_out, p_in = (torch.diag(s) if p is None else s[:, None] * p for s, p in zip(scales, (p_out, p_in)))
        bias = layer.kind != "tied" and len(layer.params) > 1
        block = None
        for name, kind, swapped in _uses(layer):
            for call in calls.get(name, []):
                module = self.modules[name]
                if swapped:  # this use's input side is the group's output side
                    part = self._outer(kind, module, call.inputs, call.grad, False, p_out, p_in, 0).transpose(1, 2)
                elif out is not None and block is None and not self._compiled:
                    part = _project_layer(kind, module, call.inputs, call.grad, bias, p_in, p_out, layer.in_dim, out)
                else:
                    part = self._outer(kind, module, call.inputs, call.grad, bias, p_in, p_out, layer.in_dim)
                if out is None:
                    block = part if block is None else block + part
                elif block is None:
                    if part.data_ptr() != out.data_ptr() or part.stride() != out.stride():
                        out.copy_(part)
                    block = out
                else:
                    out.add_(part)
        return block if out is None else block is not None

    def _layer_gradient(self, layer: KronLayer, calls: dict[str, list[_Call]]) -> Tensor:
        """A group's per-sample gradient ``[B, out, in]`` (float32), formed from its calls: for small layers only."""
        bias = layer.kind != "tied" and len(layer.params) > 1
        found = None
        for name, kind, swapped in _uses(layer):
            for call in calls.get(name, []):
                module = self.modules[name]
                part = _project_layer(kind, module, call.inputs, call.grad, bias and not swapped, None, None, 0)
                part = part.transpose(1, 2) if swapped else part
                found = part if found is None else found + part
        if found is None:
            size = self.records.size
            return torch.zeros(size, layer.out_dim, layer.in_dim, dtype=torch.float32, device=self.device)
        return found

    def positions_per_sample(self, batch: Any, state: dict[str, Tensor]) -> int:
        """The most positions (tokens, convolution patches) a sample of ``batch`` has in any factored layer: what
        the side moments of calibration count."""
        calls = self._forward_backward(batch, state)
        layers, _, _ = self._groups
        return max([1] + [g.shape[1] for layer in layers for _, g in self._layer_parts(layer, calls) if g.ndim == 3])

    def _layer_parts(self, layer: KronLayer, calls: dict[str, list[_Call]]) -> list[tuple[Tensor, Tensor]]:
        """Each call of a group as ``(a, g)`` in the group's orientation (``G_b = Σ_t g_bt a_btᵀ`` summed over the
        parts): ``a`` [B, T, in] or token ids [B, T], ``g`` [B, T, out]."""
        bias = layer.kind != "tied" and len(layer.params) > 1
        parts = []
        for name, kind, swapped in _uses(layer):
            for call in calls.get(name, []):
                a, g = layer_sides(kind, self.modules[name], call.inputs, call.grad, bias)
                parts.append((g, a) if swapped else (a, g))
        return parts

    @staticmethod
    def _check_per_sample(calls: dict[str, list[_Call]], size: int) -> None:
        for name, records in calls.items():
            for call in records:
                if call.grad.ndim == 0 or call.grad.shape[0] != size:
                    raise TaskSpecError(
                        f"the kron projection needs per-sample outputs, but module {name} returned shape "
                        f"{list(call.grad.shape)} for a batch of {size} (a call without the batch dimension, e.g. a "
                        "position embedding of arange(T) rather than arange(T)[None]); give its input a leading batch "
                        "dimension, leave it out with --layers, or use --projection sjlt"
                    )

    def _measure(self, calls: dict[str, list[_Call]], size: int) -> int:
        """Working bytes per sample of one chunk: hooked inputs and output gradients (unfolded for convolutions),
        their projections, the model's own activations (about as many again), the vmap'd rest gradients and the
        per-sample gradients of flat groups."""
        total = 0
        for name, records in calls.items():
            module = self.modules[name]
            for call in records:
                n_inputs = 0 if call.inputs is None else call.inputs.numel()
                if isinstance(module, _CONV):
                    n_inputs *= math.prod(module.kernel_size)
                total += 4 * (2 * n_inputs + 3 * call.grad.numel())
        if self.vmap is not None:
            total += (
                4
                * 3
                * size
                * sum(math.prod(self.vmap.module.model.get_parameter(name).shape) for name in self.vmap_params)
            )
        # a flat group's per-sample gradient is formed (small layers only)
        total += 4 * 2 * size * sum(plan.layer.numel for plan in self.plan.layers if plan.flat)
        total += 4 * size * self.dim * 2
        return max(1, total // max(1, size))

    def _rest_gradients(self, batch: Any, state: dict[str, Tensor], calls: dict[str, list[_Call]], size: int) -> Tensor:
        """Per-sample gradients of the parameters that are not factored, ``[B, rest_numel]`` in plan order."""
        pieces: dict[str, Tensor] = {}
        for name in self.norms:
            module = self.modules[name]
            weight = bias = None
            for call in calls.get(name, []):
                inputs, grad = call.inputs.float(), call.grad.float()
                reduce = tuple(range(1, inputs.ndim - len(module.normalized_shape)))
                normalized = F.layer_norm(inputs, module.normalized_shape, None, None, module.eps)
                w = (grad * normalized).sum(reduce) if reduce else grad * normalized
                b = grad.sum(reduce) if reduce else grad
                weight = w if weight is None else weight + w
                bias = b if bias is None else bias + b
            for key, value in (("weight", weight), ("bias", bias)):
                if getattr(module, key, None) is not None:
                    shape = tuple(module.normalized_shape)
                    pieces[f"{name}.{key}"] = (
                        value if value is not None else torch.zeros(size, *shape, device=self.device)
                    ).reshape(size, -1)
        for route in self.module_routes:
            pieces.update(self._module_gradients(route, calls.get(route.module, []), state, size))
        if self.vmap is not None:
            params, constants = self.vmap.split_state(state)
            grads = self.vmap(batch, params, constants)
            position = 0
            for name in self.vmap_params:
                numel = math.prod(self.vmap.module.model.get_parameter(name).shape)
                pieces[name] = grads[:, position : position + numel]
                position += numel
        return torch.cat([pieces[plan.name].float() for plan in self.rest_plans], dim=1)

    def _module_gradients(
        self, route: ParamRoute, calls: list[_Call], state: dict[str, Tensor], size: int
    ) -> dict[str, Tensor]:
        """Per-sample gradients ``{param: [B, numel]}`` of one module's own parameters, from each of its calls: the
        vjp of that module's forward at the call's recorded arguments with the call's per-sample output gradient."""
        module = self.modules[route.module]
        values, constants = {}, {}
        for attr, key, differentiated in self._module_state[route.module]:
            if key in state:
                (values if differentiated else constants)[attr] = state[key].detach()
        names = {f"model.{param}": param for param in route.params}
        by_attr = {attr: names[key] for attr, key, differentiated in self._module_state[route.module] if differentiated}
        found = dict.fromkeys(route.params)
        for call in calls:
            leaves, spec = tree_flatten((call.args, call.kwargs))
            leaves = [
                value.float() if isinstance(value, Tensor) and value.is_floating_point() else value for value in leaves
            ]
            batched = [isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == size for value in leaves]

            def one(params, grad, *rows, leaves=leaves, batched=batched, spec=spec):
                rows = iter(rows)
                flat = [next(rows).unsqueeze(0) if is_batched else value for value, is_batched in zip(leaves, batched)]
                args, kwargs = tree_unflatten(flat, spec)
                _, pullback = vjp(lambda p: functional_call(module, {**constants, **p}, tuple(args), kwargs), params)
                return pullback(grad.unsqueeze(0))[0]

            rows = [value for value, is_batched in zip(leaves, batched) if is_batched]
            grads = vmap(one, in_dims=(None, 0, *([0] * len(rows))))(values, call.grad.float(), *rows)
            for attr, grad in grads.items():
                param = by_attr[attr]
                found[param] = grad if found[param] is None else found[param] + grad
        shapes = {param: state[f"model.{param}"].shape for param in route.params}
        return {
            param: (torch.zeros(size, *shapes[param], device=self.device) if grad is None else grad).reshape(size, -1)
            for param, grad in found.items()
        }

    # ---- the first-batch self-check ----------------------------------------------------------------

    def _self_check(
        self, batch: Any, state: dict[str, Tensor], calls: dict[str, list[_Call]], size: int, rest: Tensor | None
    ) -> None:
        """Refuse models the hooks would get wrong, on the first batch only.

        (1) The hooks must account for the whole batch gradient of every parameter they give (a factored weight,
        a tied weight over all its uses, a norm's or a module's own parameters): one also used outside the module
        calls the hooks see, e.g. reused through ``F.linear``, would be missed. (2) A sample's output gradient must
        not depend on its batch (samples that interact break the summed-loss trick).
        """
        if self.autocast:
            return
        found: dict[str, tuple[Tensor, str]] = {}  # param -> (its summed gradient from the hooks, the group)
        for plan in self.plan.layers:
            for param, value in self._summed_layer(plan.layer, calls).items():
                found[param] = (value, f"cannot factor {plan.layer.name}")
        if rest is not None:
            for plan in self.rest_plans:
                path = self.routing.path_of(plan.name)
                if path != "vmap":
                    owner = next(route.module for route in self.routing.routes if plan.name in route.params)
                    summed = rest[:, plan.offset : plan.offset + plan.numel].double().sum(0).reshape(plan.shape)
                    found[plan.name] = (summed, f"cannot take {plan.name} from the calls of module {owner}")
        if found:
            keys = [f"model.{param}" for param in found]
            params = {
                key: (value.detach().requires_grad_(True) if key in keys else value) for key, value in state.items()
            }
            with torch.enable_grad():
                losses = functional_call(self.module, params, (batch,))
                true = torch.autograd.grad(losses.sum(), [params[key] for key in keys], allow_unused=True)
            true = [
                torch.zeros_like(value) if grad is None else grad.detach().to(value.dtype)
                for (value, _), grad in zip(found.values(), true)
            ]
            # a gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise on both sides:
            # measured against the largest gradient around it
            floor = 1e-2 * max(float(expected.abs().max()) for expected in true)
            for (param, (value, what)), expected in zip(found.items(), true):
                scale = max(float(expected.abs().max()), floor) + 1e-12
                if expected.shape != value.shape or float(torch.sub(value, expected).abs_().max()) > 1e-3 * scale:
                    raise TaskSpecError(
                        f"the kron projection {what}: {param} gets gradient from outside the module calls its hooks "
                        "see (e.g. a weight tied or reused functionally); leave it out with --layers, or use "
                        "--projection sjlt"
                    )
        if size >= 2:
            first = [call.grad[0:1] for name in calls for call in calls[name]]
            alone = self._forward_backward(slice_batch(batch, 0, 1), state)
            alone_flat = [call.grad for name in alone for call in alone[name]]
            for together, single in zip(first, alone_flat):
                scale = float(single.abs().max()) + 1e-12
                if (
                    together.shape != single.shape
                    or float((together.float() - single.float()).abs().max()) > 1e-3 * scale
                ):
                    raise TaskSpecError(
                        "the kron projection needs samples that do not interact in eval mode, but this model's output "
                        "for one sample "
                        "depends on the others in its batch; use --projection sjlt (per-sample gradients by vmap)"
                    )

    def _summed_layer(self, layer: KronLayer, calls: dict[str, list[_Call]]) -> dict[str, Tensor]:
        """The batch gradient Σ_b G_b of one factored group from its hooks, per parameter in the parameter's own
        layout (float32, as autograd gives it)."""
        bias = layer.kind != "tied" and len(layer.params) > 1
        summed = torch.zeros(layer.out_dim, layer.in_dim, dtype=torch.float32, device=self.device)
        for name, kind, swapped in _uses(layer):
            for call in calls.get(name, []):
                part = _summed_gradient(kind, self.modules[name], call.inputs, call.grad, bias)
                summed += part.T if swapped else part
        weight = self.modules[layer.name]._parameters["weight"]
        if layer.kind == "tied":
            in_rows = any(kind == "embedding" for _, kind in layer.uses)
            return {layer.params[0]: summed.T if in_rows else summed}
        columns = summed[:, : layer.in_dim - bias]
        found = {
            layer.params[0]: {
                "linear": lambda: columns,
                "hf_conv1d": lambda: columns.T,
                "conv": lambda: columns.reshape(weight.shape),
                "embedding": lambda: columns.T,
            }[layer.kind]()
        }
        if bias:
            found[layer.params[1]] = summed[:, -1]
        return found


def layer_second_moment(layer: KronLayer, moments: dict[str, Tensor]) -> Tensor:
    """A factored group's parameters' tensors (e.g. Adam's second moments, by parameter name) as one ``[out_dim,
    in_dim]`` matrix in the group's orientation, the bias its last column: the inverse of ``_summed_layer``'s
    layout."""
    weight = moments[layer.params[0]].float()
    if layer.kind == "tied":
        return weight.T if any(kind == "embedding" for _, kind in layer.uses) else weight
    columns = {
        "linear": lambda: weight,
        "hf_conv1d": lambda: weight.T,
        "conv": lambda: weight.reshape(layer.out_dim, -1),
        "embedding": lambda: weight.T,
    }[layer.kind]()
    if len(layer.params) > 1:
        columns = torch.cat([columns, moments[layer.params[1]].float().reshape(-1, 1)], dim=1)
    return columns


def _sketch_part(sketch: SideSketch, side: str, a: Tensor, g: Tensor, indicator: bool) -> None:
    """Stream one call's positions into a side's sketch: ``a`` [R, in] (token ids [R] when ``indicator``), ``g``
    [R, out]; the input side weighted by ``|g|²``, the output side by ``|a|²`` (1 for a token indicator)."""
    g = g.float()
    if side == "out":
        sketch.add(g, None if indicator else torch.linalg.vecdot(a, a))
    elif indicator:  # token indicators (a tied vocabulary side): onto the diagonal
        sketch.add_diagonal(a, torch.linalg.vecdot(g, g))
    else:
        sketch.add(a.float(), torch.linalg.vecdot(g, g))


def _uses(layer: KronLayer) -> list[tuple[str, str, bool]]:
    """``(module, kind, swapped)`` of each module a group's gradient comes from; ``swapped`` when that use's input
    side is the group's output side (a Linear head tied to an embedding: its outputs run over the vocabulary, the
    embedding's input side)."""
    if layer.kind != "tied":
        return [(layer.name, layer.kind, False)]
    # the group's input side: the weight's rows when an embedding uses it (its vocabulary), else its columns
    in_rows = any(kind == "embedding" for _, kind in layer.uses)
    # the weight axis each use's input side runs over: a Linear's columns, a Conv1D's and an embedding's rows
    return [(name, kind, (kind != "linear") != in_rows) for name, kind in layer.uses]


def _layer_why(layer: KronLayer) -> str:
    if layer.kind != "tied":
        return _WHY[layer.kind]
    uses = " + ".join(f"{name} ({kind})" for name, kind in layer.uses)
    return (
        f"one weight used by {uses}: one factored group whose gradient is the sum over its uses, the same two "
        "sides for all of them"
    )


def _parts_squared_norms(parts: list[tuple[Tensor, Tensor]], in_dim: int, elements: int = 1 << 24) -> Tensor:
    """``|Σ_parts Σ_t g_t a_tᵀ|²`` per sample, float64 ``[B]``: the parts of one group (its calls, a tied weight's
    uses), token ids (``a`` [B, T]) or dense inputs (``a`` [B, T, in]); cross terms between the parts included."""
    indicators = {a.ndim == 2 for a, _ in parts}
    if len(indicators) == 1:
        a = parts[0][0] if len(parts) == 1 else torch.cat([a for a, _ in parts], dim=1)
        g = parts[0][1] if len(parts) == 1 else torch.cat([g for _, g in parts], dim=1)
        return squared_norms("embedding" if indicators == {True} else "linear", a, g, in_dim, elements)
    # token ids and dense inputs together (a tied embedding and head): Gram matrices, an indicator's inner product
    # with a dense vector being that vector's entry at the token
    batch = parts[0][1].shape[0]
    length = sum(g.shape[1] for _, g in parts)
    step = max(1, elements // max(1, length * length))
    norms = []
    for start in range(0, batch, step):
        chunk = [(a[start : start + step], g[start : start + step].double()) for a, g in parts]
        total = torch.zeros(chunk[0][1].shape[0], dtype=torch.float64, device=chunk[0][1].device)
        for a_u, g_u in chunk:
            for a_v, g_v in chunk:
                if a_u.ndim == 2 and a_v.ndim == 2:
                    inner = (a_u.unsqueeze(2) == a_v.unsqueeze(1)).double()
                elif a_u.ndim == 2:
                    inner = a_v.double().gather(2, a_u.unsqueeze(1).expand(-1, a_v.shape[1], -1)).transpose(1, 2)
                elif a_v.ndim == 2:
                    inner = a_u.double().gather(2, a_v.unsqueeze(1).expand(-1, a_u.shape[1], -1))
                else:
                    inner = a_u.double() @ a_v.double().transpose(1, 2)
                total += ((g_u @ g_v.transpose(1, 2)) * inner).sum((1, 2))
        norms.append(total)
    return torch.cat(norms)


def _project_layer(
    kind: str,
    module: nn.Module,
    inputs: Tensor,
    grad: Tensor,
    bias: bool,
    p_in: Tensor | None,
    p_out: Tensor | None,
    in_dim: int,
    out: Tensor | None = None,
) -> Tensor:
    """One call of one layer: ``[B, k_out, k_in]`` = Σ_t (P_out g_t)(P_in a_t)ᵀ (a side without P is the identity);
    the last product written into ``out`` (a ``[B, k_out, k_in]`` view) when given, else a new tensor."""
    batch = grad.shape[0]
    grad = grad.float()
    if kind == "embedding":
        tokens, grad = _embedding_sides(module, inputs, grad)
        projected_grad = grad if p_out is None else grad @ p_out  # [B, T, k_out]
        if p_in is None:
            block = torch.zeros(
                batch, module.num_embeddings, projected_grad.shape[-1], dtype=torch.float32, device=grad.device
            )
            block.scatter_add_(1, tokens.unsqueeze(-1).expand(-1, -1, projected_grad.shape[-1]), projected_grad)
            return block.transpose(1, 2)
        return torch.matmul(projected_grad.transpose(1, 2), p_in[tokens], out=out)
    inputs = inputs.float()
    if kind == "conv":
        # each patch times P_in is a convolution with P_in as its kernel: no unfold (im2col) of the input
        projected_in = _patches(module, inputs, p_in, bias).flatten(2).transpose(1, 2)  # [B, L, k_in]
        grad = grad.reshape(batch, grad.shape[1], -1).transpose(1, 2)  # [B, L, out]
        projected_grad = grad if p_out is None else grad @ p_out
        return torch.matmul(projected_grad.transpose(1, 2), projected_in, out=out)
    inputs = inputs.reshape(batch, -1, inputs.shape[-1])  # [B, T, in]
    grad = grad.reshape(batch, -1, grad.shape[-1])
    if p_in is None:
        projected_in = torch.cat([inputs, inputs.new_ones(*inputs.shape[:2], 1)], dim=2) if bias else inputs
    elif bias:
        projected_in = torch.addmm(p_in[-1], inputs.reshape(-1, in_dim - 1), p_in[:-1]).reshape(
            batch, inputs.shape[1], -1
        )
    else:
        projected_in = inputs @ p_in
    projected_grad = grad if p_out is None else grad @ p_out
    if projected_in.shape[1] == 1:
        outer = (projected_grad[:, 0, :, None], projected_in[:, 0, None, :])
        return torch.mul(*outer) if out is None else torch.mul(*outer, out=out)
    return torch.matmul(projected_grad.transpose(1, 2), projected_in, out=out)


def _embedding_sides(module: nn.Module, inputs: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """An embedding call as ``(tokens [B, T], g [B, T, dim])``, padding positions' gradients zeroed (their row gets
    none)."""
    tokens = inputs.reshape(grad.shape[0], -1)
    grad = grad.reshape(grad.shape[0], tokens.shape[1], -1)
    if module.padding_idx is not None:
        grad = grad * (tokens != module.padding_idx).unsqueeze(-1)
    return tokens, grad


def layer_sides(kind: str, module: nn.Module, inputs: Tensor, grad: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """One call of one layer as ``(a, g)`` with ``G_b = Σ_t g_bt a_btᵀ``: ``a`` [B, T, in] (an embedding: its
    tokens [B, T]), ``g`` [B, T, out]; float32, the bias a trailing input column of ones."""
    batch = grad.shape[0]
    grad = grad.float()
    if kind == "embedding":
        return _embedding_sides(module, inputs, grad)
    if kind == "conv":
        return _patches(module, inputs.float(), None, bias).flatten(2).transpose(1, 2), grad.reshape(
            batch, grad.shape[1], -1
        ).transpose(1, 2)
    inputs = inputs.float().reshape(batch, -1, inputs.shape[-1])
    if bias:
        inputs = torch.cat([inputs, inputs.new_ones(*inputs.shape[:2], 1)], dim=2)
    return inputs, grad.reshape(batch, -1, grad.shape[-1])


def squared_norms(kind: str, a: Tensor, g: Tensor, in_dim: int, elements: int = 1 << 24) -> Tensor:
    """``|Σ_t g_t a_tᵀ|²`` per sample, float64 ``[B]``: through the Gram matrices ``(g gᵀ) ⊙ (a aᵀ)`` summed, or the
    gradient itself, whichever costs less; in chunks of samples of about ``elements`` numbers each."""
    batch, length, out_dim = g.shape
    gram = kind == "embedding" or length * length * (in_dim + out_dim) <= length * in_dim * out_dim
    per_sample = length * length if gram else in_dim * out_dim
    step = max(1, elements // max(1, per_sample))
    norms = []
    for start in range(0, batch, step):
        a_part, g_part = a[start : start + step], g[start : start + step]
        if kind == "embedding":
            same = (a_part.unsqueeze(2) == a_part.unsqueeze(1)).float()
            norms.append(((g_part @ g_part.transpose(1, 2)) * same).sum((1, 2)))
        elif gram:
            norms.append(((g_part @ g_part.transpose(1, 2)) * (a_part @ a_part.transpose(1, 2))).sum((1, 2)))
        else:
            norms.append((g_part.transpose(1, 2) @ a_part).square().sum((1, 2)))
    return torch.cat(norms).double()


def _summed_gradient(kind: str, module: nn.Module, inputs: Tensor, grad: Tensor, bias: bool) -> Tensor:
    """The batch gradient Σ_b G_b of one layer call, ``[out_dim, in_dim]``: what autograd gives the weight (and
    bias)."""
    grad = grad.float()
    if kind == "embedding":
        tokens, grad = _embedding_sides(module, inputs, grad)
        tokens, grad = tokens.reshape(-1), grad.reshape(tokens.numel(), -1)
        summed = torch.zeros(module.num_embeddings, grad.shape[1], dtype=torch.float32, device=grad.device)
        return summed.index_add_(0, tokens, grad).T
    inputs = inputs.float()
    if kind == "conv":
        patches = _patches(module, inputs, None, bias).flatten(2)  # [B, C·kh·kw(+1), L]
        grad = grad.reshape(grad.shape[0], grad.shape[1], -1)
        return torch.einsum("bol,bil->oi", grad, patches)
    inputs = inputs.reshape(-1, inputs.shape[-1])
    grad = grad.reshape(-1, grad.shape[-1])
    if bias:
        inputs = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)
    return grad.T @ inputs


def _patches(module: nn.Module, inputs: Tensor, p_in: Tensor | None, bias: bool) -> Tensor:
    """Every convolution patch (in ``weight.flatten(1)`` order, then a 1 for the bias) times ``p_in [in_dim, k]``:
    ``[B, k, *out_spatial]``; with ``p_in`` None, the patches themselves (what unfold gives)."""
    weight = module.weight
    patch = math.prod(weight.shape[1:])
    if p_in is None:
        kernel = torch.eye(patch, dtype=torch.float32, device=inputs.device)
        shift = None
    else:
        kernel = p_in[:patch].T
        shift = p_in[patch] if bias else None
    kernel = kernel.reshape(-1, *weight.shape[1:]).contiguous()
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    out = conv(inputs, kernel, shift, module.stride, module.padding, module.dilation)
    if p_in is None and bias:
        out = torch.cat([out, out.new_ones(out.shape[0], 1, *out.shape[2:])], dim=1)
    return out
