"""Factored per-sample gradients: the ``kron`` projection computed from one batched forward + backward.

For ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (through unfold) and ``nn.Embedding``, forward hooks keep
each layer's input ``a`` and output ``y``; one ``autograd.grad`` of the *summed* per-sample losses
w.r.t. the outputs gives ``g = ∂ℓ_b/∂y_b`` for every sample b at once, and the projected per-sample
gradient is ``Σ_t (P_out g_t)(P_in a_t)ᵀ`` (see ``gradindex.projection``' kron plan). No per-sample gradient of
those layers is ever formed, and no weight gradient is computed at all.

Why the summed loss gives per-sample output gradients: ``∂(Σ_b ℓ_b)/∂y_b = ∂ℓ_b/∂y_b`` as long as
sample b's output reaches no other sample's loss. The model runs in eval mode, where dropout is off
and BatchNorm uses its running statistics, so that holds for ordinary models. A BatchNorm without
running statistics mixes the samples of a batch even in eval mode: such a model is featurized
entirely through ``vmap(grad)`` (plan reason recorded), and a first-batch self-check refuses any other
model whose samples interact (or whose layer weights are also used outside their module's call).

``nn.LayerNorm`` parameters are per-sample gradients computed from the same hooks
(``Σ_t g ⊙ x̂``, ``Σ_t g``); every other parameter falls back to ``vmap(grad)``. Those "rest" gradients
are projected together with ``sjlt`` (the identity when their share covers them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from gradindex.errors import TaskSpecError
from gradindex.featurize._per_sample import LossModule, PerSampleGradients
from gradindex.projection import (
    KronLayer,
    KronPlan,
    ParamPlan,
    ProjectionSpec,
    kron_side_matrix,
    make_projector,
    plan_kron,
)
from gradindex.task import batch_size, slice_batch

__all__ = ["KronGradients", "find_kron_layers", "layer_sides", "mixing_modules", "squared_norms"]

log = logging.getLogger("gradindex")

_CONV = (nn.Conv1d, nn.Conv2d)


def mixing_modules(model: nn.Module) -> list[str]:
    """Modules whose eval-mode output for one sample depends on the other samples of the batch."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            not module.track_running_stats or module.running_mean is None
        ):
            names.append(name or type(module).__name__)
    return names


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, count in counts.items() if count > 1}


def _layer_of(name: str, module: nn.Module, selected: set[str], shared: set[int]) -> KronLayer | None:
    """The factored view of ``module``'s selected weight (+ bias), or None when it must fall back."""
    weight_name, bias_name = f"{name}.weight", f"{name}.bias"
    weight = getattr(module, "weight", None)
    if weight_name not in selected or not isinstance(weight, nn.Parameter) or id(weight) in shared:
        return None
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, nn.Parameter) and bias_name in selected and id(bias) not in shared
    params = (weight_name, bias_name) if has_bias else (weight_name,)
    if isinstance(module, nn.Linear):
        return KronLayer(name, "linear", params, module.in_features + has_bias, module.out_features)
    if isinstance(module, _CONV):
        if module.groups != 1 or module.padding_mode != "zeros":
            return None
        return KronLayer(name, "conv", params, math.prod(weight.shape[1:]) + has_bias, module.out_channels)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq:
            return None  # max_norm rewrites the weights in the forward; frequency scaling couples samples
        return KronLayer(name, "embedding", (weight_name,), module.num_embeddings, module.embedding_dim)
    return None


def find_kron_layers(model: nn.Module, param_names: Sequence[str]) -> tuple[list[KronLayer], list[str], list[str]]:
    """Split the selected parameters: factored layers (model order), LayerNorm modules read from hooks, the rest.

    Returns ``(layers, hooked_norms, rest_params)``; ``rest_params`` lists every selected parameter not in a
    layer, in model order (LayerNorm parameters included: they are per-sample gradients, just not factored).
    """
    selected = set(param_names)
    if mixing_modules(model):
        return [], [], list(param_names)
    shared = _shared_parameter_ids(model)
    # submodules of nn.MultiheadAttention are applied functionally by their parent: hooks would never see them
    skip = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_modules()
        if child
    }
    layers, norms, covered = [], [], set()
    for name, module in model.named_modules():
        if not name or name in skip:
            continue
        layer = _layer_of(name, module, selected, shared)
        if layer is not None:
            layers.append(layer)
            covered.update(layer.params)
        elif (
            isinstance(module, nn.LayerNorm)
            and module.elementwise_affine
            and all(id(p) not in shared for p in module.parameters(recurse=False))
        ) and any(f"{name}.{key}" in selected for key, _ in module.named_parameters(recurse=False)):
            norms.append(name)
    rest = [name for name in param_names if name not in covered]
    return layers, norms, rest


class _Records:
    """What the hooks saw in one forward: per module, the (input, output, output version) of each call."""

    def __init__(self) -> None:
        self.active = False
        self.clone_outputs = False
        self.calls: dict[str, list[tuple[Tensor, Tensor, int]]] = {}

    def hook(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor):
            if not self.active:
                return None
            self.calls.setdefault(name, []).append((args[0].detach(), output, output._version))
            # a later in-place op (ReLU(inplace=True)) would rewrite the output autograd differentiates against
            return output.clone() if self.clone_outputs else None

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
        layers, norms, rest = find_kron_layers(model, param_names)
        shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
        rest_plans = ParamPlan.layout([(name, shapes[name]) for name in rest])
        self._groups = (layers, rest, sum(item.numel for item in rest_plans))
        self.modules = dict(self.module.model.named_modules())
        self.norms = norms
        norm_params = {
            f"{name}.{key}" for name in norms for key, _ in self.modules[name].named_parameters(recurse=False)
        }
        self.rest_plans = rest_plans
        self.vmap_params = [name for name in rest if name not in norm_params]
        self.vmap = PerSampleGradients(model, loss, self.vmap_params) if self.vmap_params else None
        self.records = _Records()
        self._handles = [
            self.modules[layer.name].register_forward_hook(self.records.hook(layer.name)) for layer in layers
        ]
        self._handles += [self.modules[name].register_forward_hook(self.records.hook(name)) for name in norms]
        # the parameters that must require grad so that every hooked output does
        self._grad_keys = {f"model.{layer.params[0]}" for layer in layers} | {f"model.{name}" for name in norm_params}
        self._checked = False
        self.bytes_per_sample = 0  # measured on the first chunk
        self._outer = torch.compile(_project_layer, dynamic=True) if compile else _project_layer
        self._set_plan(plan_kron(spec.dim, *self._groups) if plan is None else KronPlan.from_dict(plan, *self._groups))

    # ---- plan and matrices -----------------------------------------------------------------------

    @property
    def needs_calibration(self) -> bool:
        """Whether the plan has a choice to make (not everything fits) that calibration would inform."""
        layers, _rest, rest_numel = self._groups
        return self.spec.dim < sum(layer.numel for layer in layers) + rest_numel

    def replan(self, energies: Sequence[float], sides: str = "gaussian") -> None:
        """Plan from calibration ``energies`` (one per layer, then the rest; see ``plan_kron``)."""
        self._set_plan(plan_kron(self.spec.dim, *self._groups, energies=energies, sides=sides))

    def _set_plan(self, plan: KronPlan) -> None:
        self.plan = plan
        self.dim = plan.dim
        self.rest_projector = (
            make_projector(
                ProjectionSpec(
                    kind="none" if plan.rest_dim == plan.rest_numel else "sjlt", dim=plan.rest_dim, seed=self.spec.seed
                ),
                self.rest_plans,
            )
            if plan.rest_params
            else None
        )
        self._matrices: dict[tuple[int, str, str], Tensor | None] = {}
        self.bytes_per_sample = 0

    def energies(self, batch: Any, state: dict[str, Tensor]) -> list[float]:
        """Σ over the batch of each group's per-sample squared gradient norm ``|G_b|²`` (layers, then the rest).

        Exact, from the same hooks as the projection: ``|Σ_t g_t a_tᵀ|²`` through the per-sample gradient or
        the Gram matrices of the two sides, whichever costs less; the rest from its per-sample gradients.
        """
        size = batch_size(batch)
        calls = self._forward_backward(batch, state)
        self._check_per_sample(calls, size)
        layers, rest, _ = self._groups
        sums = []
        for layer in layers:
            sides = [
                layer_sides(layer.kind, self.modules[layer.name], inputs, grad, len(layer.params) > 1)
                for inputs, grad in calls.get(layer.name, [])
            ]
            if not sides:
                sums.append(0.0)
                continue
            a, g = (torch.cat([side[index] for side in sides], dim=1) for index in (0, 1))
            sums.append(float(squared_norms(layer.kind, a, g, layer.in_dim).sum()))
        if rest:
            sums.append(float(self._rest_gradients(batch, state, calls, size).double().square().sum()))
        return sums

    def side_moments(
        self,
        batch: Any,
        state: dict[str, Tensor],
        moments: dict[tuple[str, str], Tensor],
        keys: set[tuple[str, str]] | None = None,
        block: int = 1 << 22,
    ) -> None:
        """Add one batch's second moments of the narrow pca sides into ``moments`` ({(layer, side): float64 tensor}),
        only those in ``keys`` when given (the caller bounds how many ``[width, width]`` moments live at once).

        A side's moment is Σ_b Σ_t w_t x_t x_tᵀ over samples and positions (``x`` the layer's input ``a`` or output
        gradient ``g``), each position weighted by the squared norm of its other side (``|g_t|²`` for the input,
        ``|a_t|²`` for the output): for one position ``|G|² = |g|²|a|²``, so the top eigenvectors are the directions
        that carry the most per-sample gradient energy, not merely the most activation. An embedding's input moment
        is diagonal and kept as a vector: the gradient energy that reached each token's row. Positions are taken in
        float64 blocks of about ``block`` numbers, so long sequences do not double their memory.
        """
        calls = self._forward_backward(batch, state)
        self._check_per_sample(calls, batch_size(batch))
        for plan in self.plan.layers:
            wanted = [
                (side, width)
                for side, width, _ in plan.narrow_sides()
                if keys is None or (plan.layer.name, side) in keys
            ]
            if plan.sides != "pca" or not wanted:
                continue
            for inputs, grad in calls.get(plan.layer.name, []):
                a, g = layer_sides(
                    plan.layer.kind, self.modules[plan.layer.name], inputs, grad, len(plan.layer.params) > 1
                )
                embedding = plan.layer.kind == "embedding"
                a = a.reshape(-1) if embedding else a.reshape(-1, a.shape[-1])
                g = g.reshape(-1, g.shape[-1])
                step = max(1, block // max(g.shape[1], 1 if embedding else a.shape[1]))
                for side, width in wanted:
                    key = (plan.layer.name, side)
                    found = torch.zeros(
                        width, *(() if side == "in" and embedding else (width,)), dtype=torch.float64, device=g.device
                    )
                    for start in range(0, g.shape[0], step):
                        g_part = g[start : start + step].double()
                        if side == "in" and embedding:
                            found.index_add_(0, a[start : start + step], g_part.square().sum(-1))
                        elif side == "in":
                            x = a[start : start + step].double()
                            found.addmm_(x.T, x * g_part.square().sum(-1, keepdim=True))
                        else:
                            weight = (
                                1.0 if embedding else a[start : start + step].double().square().sum(-1, keepdim=True)
                            )
                            found.addmm_(g_part.T, g_part * weight)
                    moments[key] = found if key not in moments else moments[key] + found

    def pca_groups(self, budget: int) -> list[list[tuple[str, str, int, int]]]:
        """``pca_shapes`` cut into groups whose float64 moments (``[width, width]``; an embedding's input side,
        diagonal:
        ``[width]``) take at most ``budget`` bytes together; a side larger than that is a group of its own."""
        groups: list[list[tuple[str, str, int, int]]] = [[]]
        used = 0
        for plan in self.plan.layers:
            if plan.sides != "pca":
                continue
            for side, width, k in plan.narrow_sides():
                size = 8 * width * (1 if side == "in" and plan.layer.kind == "embedding" else width)
                if groups[-1] and used + size > budget:
                    groups.append([])
                    used = 0
                groups[-1].append((plan.layer.name, side, width, k))
                used += size
        return groups if groups[0] else []

    def pca_shapes(self) -> list[tuple[str, str, int, int]]:
        """``(layer, side, width, k)`` of every pca side matrix one checkpoint needs, in the order they are packed."""
        return [
            (plan.layer.name, side, width, k)
            for plan in self.plan.layers
            if plan.sides == "pca"
            for side, width, k in plan.narrow_sides()
        ]

    def pca_matrix(self, checkpoint: int, layer: str, side: str) -> Tensor | None:
        return self._matrices.get((checkpoint, layer, side))

    def set_pca_matrix(self, checkpoint: int, layer: str, side: str, matrix: Tensor) -> None:
        self._matrices[(checkpoint, layer, side)] = matrix.to(self.device, torch.float32)

    def plan_dict(self) -> list[dict]:
        entries = self.plan.to_dict()
        if self.mixing:
            entries.append(
                {
                    "fallback_reason": f"modules {', '.join(self.mixing)} mix samples "
                    "(BatchNorm without running statistics)"
                }
            )
        return entries

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

    def _forward_backward(self, batch: Any, state: dict[str, Tensor]) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """Inputs and output gradients of every hooked module call, from one forward and one backward."""
        params = {
            key: (value.detach().requires_grad_(True) if key in self._grad_keys else value)
            for key, value in state.items()
        }
        for attempt in range(2):
            self.records.calls = {}
            self.records.active = True
            try:
                with torch.enable_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    losses = functional_call(self.module, params, (batch,))
            finally:
                self.records.active = False
            calls = self.records.calls
            rewritten = any(output._version != version for records in calls.values() for _, output, version in records)
            if rewritten and attempt == 0:
                self.records.clone_outputs = True  # once seen, keep cloning for this model
                continue
            break
        if losses.ndim != 1:
            raise TaskSpecError(
                f"the task's loss must return one value per sample, shape [B]; it returned shape {list(losses.shape)}"
            )
        outputs = [output for records in calls.values() for _, output, _ in records if output.requires_grad]
        grads = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else [])
        found = {}
        for name, records in calls.items():
            found[name] = []
            for inputs, output, _ in records:
                grad = next(grads) if output.requires_grad else None
                found[name].append((inputs, torch.zeros_like(output) if grad is None else grad.detach()))
        return found

    def __call__(self, batch: Any, state: dict[str, Tensor], checkpoint: int) -> Tensor:
        """collated batch of B samples -> [B, plan.dim] (float32)."""
        size = batch_size(batch)
        calls = self._forward_backward(batch, state)
        self._check_per_sample(calls, size)
        if not self.bytes_per_sample:
            self.bytes_per_sample = self._measure(calls, size)
        out = torch.empty(size, self.dim, dtype=torch.float32, device=self.device)
        offset = 0
        for plan in self.plan.layers:
            block = None
            for inputs, grad in calls.get(plan.layer.name, []):
                part = self._outer(
                    plan.layer.kind,
                    self.modules[plan.layer.name],
                    inputs,
                    grad,
                    len(plan.layer.params) > 1,
                    self._side(checkpoint, plan, "in"),
                    self._side(checkpoint, plan, "out"),
                    plan.layer.in_dim,
                )
                block = part if block is None else block + part
            view = out[:, offset : offset + plan.dim]
            if block is None:  # the module did not run: its parameters do not affect the loss
                view.zero_()
            else:
                view.copy_(block.reshape(size, -1))
            offset += plan.dim
        if self.rest_projector is not None:
            rest = self._rest_gradients(batch, state, calls, size)
            out[:, offset:] = self.rest_projector.project(rest, checkpoint)
        if not self._checked:
            self._checked = True
            self._self_check(batch, state, calls, size)
        return out

    @staticmethod
    def _check_per_sample(calls, size: int) -> None:
        for name, records in calls.items():
            for _, grad in records:
                if grad.ndim == 0 or grad.shape[0] != size:
                    raise TaskSpecError(
                        f"the kron projection needs per-sample outputs, but module {name} returned shape "
                        f"{list(grad.shape)} for a batch of "
                        f"{size} (its input is shared by all samples, e.g. a position embedding of arange(T)); expand "
                        "its input to "
                        "the batch, leave it out with --layers, or use --projection sjlt"
                    )

    def _measure(self, calls, size: int) -> int:
        """Working bytes per sample of one chunk: hooked inputs and output gradients (unfolded for convolutions),
        their projections, the model's own activations (about as many again), and the vmap'd rest gradients."""
        total = 0
        for name, records in calls.items():
            module = self.modules[name]
            for inputs, grad in records:
                n_inputs = inputs.numel()
                if isinstance(module, _CONV):
                    n_inputs *= math.prod(module.kernel_size)
                total += 4 * (2 * n_inputs + 3 * grad.numel())
        if self.vmap is not None:
            total += (
                4
                * 3
                * size
                * sum(math.prod(self.vmap.module.model.get_parameter(name).shape) for name in self.vmap_params)
            )
        total += 4 * size * self.dim * 2
        return max(1, total // max(1, size))

    def _rest_gradients(self, batch: Any, state: dict[str, Tensor], calls, size: int) -> Tensor:
        """Per-sample gradients of the parameters that are not factored, ``[B, rest_numel]`` in plan order."""
        pieces: dict[str, Tensor] = {}
        for name in self.norms:
            module = self.modules[name]
            weight = bias = None
            for inputs, grad in calls.get(name, []):
                inputs, grad = inputs.float(), grad.float()
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
        if self.vmap is not None:
            params, constants = self.vmap.split_state(state)
            grads = self.vmap(batch, params, constants)
            position = 0
            for name in self.vmap_params:
                numel = math.prod(self.vmap.module.model.get_parameter(name).shape)
                pieces[name] = grads[:, position : position + numel]
                position += numel
        return torch.cat([pieces[plan.name].float() for plan in self.rest_plans], dim=1)

    # ---- the first-batch self-check ----------------------------------------------------------------

    def _self_check(self, batch: Any, state: dict[str, Tensor], calls, size: int) -> None:
        """Refuse models the factored path would get wrong, on the first batch only.

        (1) The hooks must account for the whole batch gradient of each factored weight (a weight also used
        outside its module's call, e.g. tied through ``F.linear``, would be missed). (2) A sample's
        output gradient must not depend on its batch (samples that interact break the summed-loss trick).
        """
        if self.autocast or not self.plan.layers:
            return
        weights = [f"model.{plan.layer.params[0]}" for plan in self.plan.layers]
        params = {
            key: (value.detach().requires_grad_(True) if key in weights else value) for key, value in state.items()
        }
        with torch.enable_grad():
            losses = functional_call(self.module, params, (batch,))
            true = torch.autograd.grad(losses.sum(), [params[key] for key in weights], allow_unused=True)
        for plan, expected in zip(self.plan.layers, true):
            found = torch.zeros(plan.layer.out_dim, plan.layer.in_dim, dtype=torch.float64, device=self.device)
            for inputs, grad in calls.get(plan.layer.name, []):
                found += _summed_gradient(
                    plan.layer.kind, self.modules[plan.layer.name], inputs, grad, len(plan.layer.params) > 1
                ).double()
            has_bias = len(plan.layer.params) > 1
            found_weight = found[:, : plan.layer.in_dim - has_bias]
            if plan.layer.kind == "embedding":
                found_weight = found_weight.T
            expected = (
                torch.zeros_like(found_weight)
                if expected is None
                else expected.detach().double().reshape(found_weight.shape)
            )
            scale = float(expected.abs().max()) + 1e-12
            if float((found_weight - expected).abs().max()) > 1e-3 * scale:
                raise TaskSpecError(
                    f"the kron projection cannot factor {plan.layer.name}: its weight gets gradient from outside the "
                    "module's own call "
                    "(e.g. tied or functionally reused weights); leave it out with --layers, or use --projection sjlt"
                )
        if size >= 2:
            first = [(_slice(inputs, 0, 1), _slice(grad, 0, 1)) for name in calls for inputs, grad in calls[name]]
            alone = self._forward_backward(slice_batch(batch, 0, 1), state)
            alone_flat = [pair for name in alone for pair in alone[name]]
            for (_, together), (_, single) in zip(first, alone_flat):
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


def _project_layer(
    kind: str,
    module: nn.Module,
    inputs: Tensor,
    grad: Tensor,
    bias: bool,
    p_in: Tensor | None,
    p_out: Tensor | None,
    in_dim: int,
) -> Tensor:
    """One call of one layer: ``[B, k_out, k_in]`` = Σ_t (P_out g_t)(P_in a_t)ᵀ (a side without P is the identity)."""
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
        return projected_grad.transpose(1, 2) @ p_in[tokens]
    inputs = inputs.float()
    if kind == "conv":
        # each patch times P_in is a convolution with P_in as its kernel: no unfold (im2col) of the input
        projected_in = _patches(module, inputs, p_in, bias).flatten(2).transpose(1, 2)  # [B, L, k_in]
        grad = grad.reshape(batch, grad.shape[1], -1).transpose(1, 2)  # [B, L, out]
        projected_grad = grad if p_out is None else grad @ p_out
        return projected_grad.transpose(1, 2) @ projected_in
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
        return projected_grad[:, 0, :, None] * projected_in[:, 0, None, :]
    return projected_grad.transpose(1, 2) @ projected_in


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


def _slice(tensor: Tensor, start: int, stop: int) -> Tensor:
    return tensor[start:stop]
