"""Fast geometric ensembles: members around a trained checkpoint, for GEX and for TracIn over an ensemble.

Starting from the trained weights θ*, the model is fine-tuned for ``members`` learning-rate cycles of
``steps`` optimizer steps each, and one member is saved per cycle where the learning rate is lowest
(Garipov et al. 2018, "fast geometric ensembling"; Kim et al. 2023 use such members for GEX)::

    ensemble = make_ensemble(task, "runs/ckpt-030.pt", "runs/ge", members=8, steps=800, lr=0.05)  # the paper's recipe
    gradindex.build(task, ensemble.gex_checkpoints(), "ge.gradindex", method="gex")        # θ*, then members
    gradindex.build(task, ensemble.tracin_checkpoints(), "ge-tracin.gradindex")             # members, weight 1/M

Schedules, with t the position in a cycle:

* ``cosine`` (default): lr_min + (lr − lr_min)(1 + cos πt)/2, restarting every cycle; saved at its end.
* ``triangular``: FGE's, lr → lr_min over the first half of a cycle and back; saved at the midpoint.
* ``constant``: lr throughout; saved at the end of every cycle (SWAG-like samples).

Each step is the task's ``train_step(model, batch, optimizer)`` when it has one, else plain SGD (with
momentum) on ``mean(task.loss) + task.regularization``. The optimizer (and its momentum) starts afresh every
cycle, as in the GEX authors' code. Members are ordinary ``torch.save(state_dict)`` checkpoints,
``DIR/member-001.pt`` …, described by ``DIR/ensemble.json`` (with each member's distance from θ*).

Members must leave θ*'s basin. A model that fits its training labels has (nearly) zero gradients at θ*,
so fine-tuning on the same data alone does not move it, and GEX's loss deviations are then noise. Kim et
al. fine-tune with the pre-training weight decay and data augmentation; without augmentation the default
weight decay here is ``auto``: λ = (1 − momentum)·DECAY_PER_CYCLE / Σ_cycle lr_t, the decay that alone
would shrink the weights by e^-3 over one cycle (0.015 for the paper's 800 steps at lr 0.05, cosine).
The data's gradients hold what generalises; memorised labels (flipped ones, atypical samples) are
forgotten by the members, and their losses rise. An ensemble whose members all stay within
``DEGENERATE_DISTANCE`` (relative parameter distance) of θ* gets a ``GradIndexWarning``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gradindex.errors import (
    ArgumentError,
    CheckpointError,
    GradIndexError,
    GradIndexWarning,
    NonFiniteError,
    TaskSpecError,
)
from gradindex.utils import check_settings, progress_bar, setting

# torch and the task load with make_ensemble: EnsembleConfig (the command line's options) stays light
if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradindex.task import Task

__all__ = [
    "DECAY_PER_CYCLE",
    "DEGENERATE_DISTANCE",
    "LAPLACE_MAX_SIDE",
    "Ensemble",
    "EnsembleConfig",
    "EnsembleExistsError",
    "KfacLaplace",
    "kfac_laplace",
    "load_ensemble",
    "make_ensemble",
    "relative_distance",
]

_MANIFEST = "ensemble.json"

# weight_decay="auto": the decay that alone would shrink the weights by e^-DECAY_PER_CYCLE over one cycle
DECAY_PER_CYCLE = 3.0
# members all closer to θ* than this (‖θ_m − θ*‖ / ‖θ*‖) make a degenerate ensemble: a GradIndexWarning
DEGENERATE_DISTANCE = 0.1


class EnsembleExistsError(GradIndexError, FileExistsError):
    """The output folder already holds an ensemble."""


# the learning-rate schedules of a cycle
SCHEDULES: dict[str, str] = {
    "cosine": "cosine restarts, a member saved at each cycle's end",
    "triangular": "FGE's triangular cycle, a member saved mid-cycle",
    "constant": "a constant rate, a member saved at each cycle's end",
}


@dataclass(frozen=True, kw_only=True)
class EnsembleConfig:
    """How the members are made: ``make_ensemble(task, checkpoint, out_dir, **options)`` takes these as keywords."""

    members: int = setting(5, "M: members to make, one per learning-rate cycle", minimum=1, integer=True)
    steps: int = setting(100, "optimizer steps per cycle", minimum=1, integer=True)
    lr: float = setting(0.01, "peak learning rate of a cycle", above=0)
    lr_min: float | None = setting(
        None, "lowest learning rate of a cycle (unused by constant)", minimum=0, optional=True, default_text="lr/100"
    )
    schedule: Literal["cosine", "triangular", "constant"] = setting("cosine", "the cycle's schedule", choices=SCHEDULES)
    momentum: float = setting(0.9, "SGD momentum", minimum=0, below=1)
    weight_decay: float | None = setting(
        None,
        "SGD's coupled L2 weight decay, on top of the task's regularisation; it moves members out of θ*'s basin",
        minimum=0,
        optional=True,
        default_text="auto: (1 − momentum)·3 / Σ lr over a cycle, a shrink of e^-3 per cycle from decay alone",
    )
    batch_size: int = setting(64, "samples per step (laplace: per batch of the Fisher pass)", minimum=1, integer=True)
    seed: int = setting(0, "sets the batches and any dropout (laplace: the draws)", minimum=0, integer=True)
    laplace: bool = setting(
        False,
        "GEX's la_kfac: draw the members from a K-FAC Laplace posterior around θ*, N(θ*, (N·F + τI)^-1), F the "
        "training set's empirical Fisher, Kronecker-factored per Linear / Conv1D layer and diagonal for the other "
        "parameters (layer sides up to 4096 wide); steps, lr, lr_min, schedule, momentum and weight_decay are "
        "unused then",
        flag=True,
    )
    prior_precision: float | None = setting(
        None,
        "with laplace: τ, the prior precision added to N·F",
        above=0,
        optional=True,
        default_text="auto: the τ that maximises the Laplace marginal likelihood (laplace-redux's "
        "optimize_prior_precision, method marglik)",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.lr_min is not None and self.lr_min > self.lr:
            raise ArgumentError("lr_min", f"lr_min must be between 0 and lr ({self.lr}), got {self.lr_min!r}")
        if self.schedule == "triangular" and self.steps < 2:
            raise ArgumentError(
                "steps", "steps must be at least 2 for the triangular schedule (a cycle goes down, then up)"
            )

    @property
    def low(self) -> float:
        return self.lr / 100 if self.lr_min is None else float(self.lr_min)

    @property
    def decay(self) -> float:
        """The weight decay used: ``weight_decay``, or for ``auto`` (None) (1 − momentum)·DECAY_PER_CYCLE / Σ lr_t
        over one cycle (momentum SGD moves by lr/(1 − momentum) per unit gradient)."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        total = sum(self.learning_rate(step) for step in range(self.steps))
        return (1 - self.momentum) * DECAY_PER_CYCLE / total

    def learning_rate(self, step: int) -> float:
        """The learning rate of global step ``step`` (0-based)."""
        position = step % self.steps
        if self.schedule == "constant":
            return float(self.lr)
        if self.schedule == "cosine":
            t = position / self.steps
            return self.low + (self.lr - self.low) * (1 + math.cos(math.pi * t)) / 2
        t = (position + 1) / self.steps  # FGE's t(i) = (mod(i - 1, c) + 1) / c
        if t <= 0.5:
            return (1 - 2 * t) * self.lr + 2 * t * self.low
        return (2 - 2 * t) * self.low + (2 * t - 1) * self.lr

    def save_steps(self) -> list[int]:
        """The global steps after which member 1, 2, … is saved (where the cycle's learning rate is lowest)."""
        offset = self.steps // 2 - 1 if self.schedule == "triangular" else self.steps - 1
        return [cycle * self.steps + offset for cycle in range(self.members)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnsembleConfig:
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class Ensemble:
    """A trained checkpoint θ* and the members made around it."""

    base: Path
    members: tuple[Path, ...]
    config: EnsembleConfig
    distances: tuple[float, ...] = ()  # each member's ‖θ_m − θ*‖ / ‖θ*‖ (empty for ensembles made before it was kept)

    def gex_checkpoints(self) -> list[str]:
        """``--method gex`` checkpoints: θ* first, then the members."""
        return [str(self.base), *(str(path) for path in self.members)]

    def tracin_checkpoints(self) -> list[str]:
        """``--method tracin`` checkpoints: the members, each with weight 1/M."""
        weight = 1.0 / len(self.members)
        return [f"{path}:{weight!r}" for path in self.members]


def _batch(dataset: Any, rows: torch.Tensor, collate: Any) -> Any:
    from torch.utils.data import TensorDataset

    from gradindex.task import collate_samples

    if collate is None and isinstance(dataset, TensorDataset):
        return tuple(tensor[rows] for tensor in dataset.tensors)
    return (collate or collate_samples)([dataset[int(row)] for row in rows])


def _save(model: nn.Module, path: Path) -> None:
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    import torch

    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _step(task: Task, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer) -> float | None:
    import torch

    if task.train_step is not None:
        value = task.train_step(model, batch, optimizer)
        if value is None:
            return None
        return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
    optimizer.zero_grad(set_to_none=True)
    objective = task.loss(model, batch).mean()
    if task.regularization is not None:
        objective = objective + task.regularization(model)
    objective.backward()
    optimizer.step()
    return float(objective.detach())


def make_ensemble(
    task: Task | str,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EnsembleConfig | None = None,
    *,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    **options: Any,
) -> Ensemble:
    """Fine-tune from ``checkpoint`` in ``config.members`` learning-rate cycles, saving one member per cycle.

    Args:
        task: a ``Task`` or task spec whose model the checkpoint fits.
        checkpoint: the trained checkpoint θ* to ensemble around.
        out_dir: the folder for ``member-001.pt``, ... and ``ensemble.json``.
        config: how the members are made (``EnsembleConfig``); default: ``EnsembleConfig(**options)``.
        overwrite: replace an ensemble already in ``out_dir``.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for the fine-tuning.
        progress: show a progress bar (default: when stderr is a terminal).
        **options: ``EnsembleConfig`` fields, over ``config``'s (``members=8, steps=50, lr=0.05``, ...).

    Returns:
        The ensemble: its base and members, and the checkpoint lists to build with (``gex_checkpoints()`` for
        ``method="gex"``, ``tracin_checkpoints()`` for TracIn over the members), and each member's relative
        distance from θ* (``distances``, also in ``ensemble.json`` with the weight decay used).

    Warns:
        GradIndexWarning: every member stayed within ``DEGENERATE_DISTANCE`` (10%) of θ*'s weights: GEX would see
            only noise; the message names the fix (the default weight decay, a higher lr, more steps).
    """
    import torch

    from gradindex.checkpoints import load_into
    from gradindex.featurize import resolve_device
    from gradindex.task import load_task, to_device

    if config is None:
        config = EnsembleConfig(**options)
    elif options:
        config = EnsembleConfig(**{**config.to_dict(), **options})
    task = load_task(task)
    base = Path(checkpoint)
    if not base.exists():
        raise CheckpointError(f"checkpoint {base} does not exist; give the trained checkpoint to ensemble around")
    if len(task.train) == 0:
        raise TaskSpecError(f"task {task.name!r} has an empty training set; an ensemble needs training samples")
    out_dir = Path(out_dir)
    existing = sorted(out_dir.glob("member-*.pt")) + ([out_dir / _MANIFEST] if (out_dir / _MANIFEST).exists() else [])
    if existing and not overwrite:
        raise EnsembleExistsError(
            f"{out_dir} already holds an ensemble ({existing[0].name}, ...); pass overwrite=True to replace it or "
            "choose "
            "another -o"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    device = resolve_device(device)
    if config.laplace:
        members, distances, prior_precision = _laplace_members(task, base, out_dir, config, device, progress)
        return _finish_ensemble(task, base, out_dir, config, members, distances, prior_precision)
    n_samples = len(task.train)
    save_at = {step: position for position, step in enumerate(config.save_steps())}
    total_steps = config.save_steps()[-1] + 1
    members: list[Path] = []
    distances: list[float] = []
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        model = load_into(task.model(), base).to(device)
        model.train()
        start = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        decay = config.decay
        shuffle = torch.Generator().manual_seed(config.seed + 0x9E3779B9)
        order = torch.randperm(n_samples, generator=shuffle)
        cursor = 0
        with progress_bar(total_steps, f"ensemble {task.name}", enabled=progress, unit="step") as bar:
            for step in range(total_steps):
                if cursor >= n_samples:
                    order, cursor = torch.randperm(n_samples, generator=shuffle), 0
                rows = order[cursor : cursor + config.batch_size]
                cursor += len(rows)
                if step % config.steps == 0:  # a fresh optimizer (no momentum carried over) every cycle
                    optimizer = torch.optim.SGD(
                        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=decay
                    )
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate(step)
                loss = _step(task, model, to_device(_batch(task.train, rows, task.collate), device), optimizer)
                if loss is not None and not math.isfinite(loss):
                    raise NonFiniteError(
                        f"the training loss became {loss} at ensemble step {step}; lower --lr (now {config.lr}) or "
                        "check the data"
                    )
                bar.update(1)
                if loss is not None:
                    bar.set_postfix_str(f"loss {loss:.4f} lr {config.learning_rate(step):.3g}", refresh=False)
                if step in save_at:
                    path = out_dir / f"member-{save_at[step] + 1:03d}.pt"
                    _save(model, path)
                    members.append(path)
                    distances.append(relative_distance(model.state_dict(), start))
    ensemble = _finish_ensemble(task, base, out_dir, config, members, distances)
    farthest = max(distances)
    if farthest < DEGENERATE_DISTANCE:
        warnings.warn(
            f"every ensemble member stayed within {farthest:.2%} of θ*'s weights (relative distance), so GEX sees "
            f"only noise: make members that leave θ*'s basin with more weight decay (--weight-decay, now "
            f"{config.decay:.3g}; auto is the default), a higher --lr or more --steps",
            GradIndexWarning,
            stacklevel=2,
        )
    return ensemble


def _finish_ensemble(
    task: Task,
    base: Path,
    out_dir: Path,
    config: EnsembleConfig,
    members: list[Path],
    distances: list[float],
    prior_precision: float | None = None,
) -> Ensemble:
    """The ensemble of the members written, its ``ensemble.json`` written beside them."""
    from gradindex.checkpoints import checkpoint_sha256

    ensemble = Ensemble(
        base=base.resolve(),
        members=tuple(path.resolve() for path in members),
        config=config,
        distances=tuple(distances),
    )
    manifest = {
        "base": str(ensemble.base),
        "base_sha256": checkpoint_sha256(base),
        "members": [str(path) for path in ensemble.members],
        "config": config.to_dict(),
        "weight_decay": None if config.laplace else config.decay,
        **({"prior_precision": prior_precision} if prior_precision is not None else {}),
        "distances": list(ensemble.distances),
        "task": task.name,
    }
    temporary = out_dir / f".{_MANIFEST}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, out_dir / _MANIFEST)
    return ensemble


def relative_distance(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref‖ over the floating-point tensors of two state dicts with the same keys."""
    import torch

    moved, norm = 0.0, 0.0
    for name, value in reference.items():
        if not torch.is_floating_point(value):
            continue
        value = value.detach().double().cpu()
        moved += float((state[name].detach().double().cpu() - value).pow(2).sum())
        norm += float(value.pow(2).sum())
    return math.sqrt(moved / norm) if norm > 0 else math.sqrt(moved)


def load_ensemble(out_dir: str | os.PathLike) -> Ensemble:
    """The ensemble ``make_ensemble`` wrote in ``out_dir``."""
    path = Path(out_dir) / _MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{out_dir} holds no {_MANIFEST}; make one with `gradindex ensemble ... -o {out_dir}`"
        ) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); make the ensemble again with overwrite=True"
        ) from None
    return Ensemble(
        base=Path(manifest["base"]),
        members=tuple(Path(item) for item in manifest["members"]),
        config=EnsembleConfig.from_dict(manifest["config"]),
        distances=tuple(manifest.get("distances", ())),
    )


# ---- GEX's la_kfac: members drawn from a K-FAC Laplace posterior -----------------------------------------------------

# a K-FAC side wider than this is refused (its [width, width] factor and eigendecomposition)
LAPLACE_MAX_SIDE = 4096


@dataclass
class KfacLaplace:
    """A Laplace posterior N(θ*, (N·F + τI)^-1) around a trained model (Ritter et al. 2018; laplace-redux's
    ``KronLaplace``; GEX's ``la_kfac``), F the empirical Fisher of the training loss:

    * a Linear / transformers Conv1D layer (weight W [out, in] and its bias as a last input column):
      F ≈ A ⊗ G with A = Σ a aᵀ / P over the layer's P input positions and G = Σ g gᵀ / N over the per-sample output
      gradients (K-FAC; with one position per sample A = E[a aᵀ], G = E[g gᵀ]). With A = U_A Λ_A U_Aᵀ and
      G = U_G Λ_G U_Gᵀ the posterior covariance is exactly (U_G ⊗ U_A) diag(1 / (N λ_G,i λ_A,j + τ)) (U_G ⊗ U_A)ᵀ,
      so a draw is δW = U_G (Z ⊘ √(N λ_G λ_Aᵀ + τ)) U_Aᵀ with Z ~ N(0, I).
    * every other parameter (embeddings, norms, a weight tied to another module's): the diagonal, δ = Z / √(N E[g²] +
      τ).

    Attributes:
        n_samples: N, the training samples the Fisher is averaged over.
        prior_precision: τ.
        layers: module name -> (weight name, bias name or None, transposed: the weight is stored [in, out]).
        factors: module name -> (A [in(+1), in(+1)], G [out, out]), float64.
        diagonal: parameter name -> E[g²] (its shape), float64.
    """

    n_samples: int
    prior_precision: float
    layers: dict[str, tuple[str, str | None, bool]]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    diagonal: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        import torch

        self._eigen = {
            name: tuple(torch.linalg.eigh(0.5 * (m + m.T)) for m in pair) for name, pair in self.factors.items()
        }

    def curvature_eigenvalues(self) -> torch.Tensor:
        """Every eigenvalue of N·F (the Kronecker products of each layer's factor eigenvalues, and the diagonal)."""
        import torch

        parts = [
            self.n_samples * (values_g.clamp_min(0)[:, None] * values_a.clamp_min(0)[None, :]).reshape(-1)
            for (values_a, _), (values_g, _) in self._eigen.values()
        ]
        parts += [self.n_samples * fisher.reshape(-1) for fisher in self.diagonal.values()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def marginal_likelihood_precision(self, model: nn.Module) -> float:
        """The scalar τ that maximises ½P log τ − ½τ‖θ*‖² − ½ Σ log(Nλ + τ) (the τ-dependent part of the Laplace log
        marginal likelihood, λ the curvature eigenvalues and θ* the covered parameters), on a log grid 1e-6 … 1e8."""
        import torch

        params = dict(model.named_parameters())
        covered = [name for weight, bias, _ in self.layers.values() for name in (weight, bias) if name is not None]
        covered += list(self.diagonal)
        norm = sum(float(params[name].detach().double().square().sum()) for name in covered)
        eigenvalues = self.curvature_eigenvalues()
        grid = torch.logspace(-6, 8, 281, dtype=torch.float64)
        objective = (
            0.5 * len(eigenvalues) * grid.log()
            - 0.5 * grid * norm
            - 0.5 * (eigenvalues[None, :] + grid[:, None]).log().sum(1)
        )
        return float(grid[int(objective.argmax())])

    def covariance(self, layer: str) -> torch.Tensor:
        """A layer's ``[out·in, out·in]`` posterior covariance (N·G ⊗ A + τI)^-1 over vec(δW) (row-major [out, in],
        the bias the last column): formed densely, for tests and tiny layers."""
        import torch

        a, g = self.factors[layer]
        precision = self.n_samples * torch.kron(g, a)
        return torch.linalg.inv(precision + self.prior_precision * torch.eye(len(precision), dtype=precision.dtype))

    def draw(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One δ ~ N(0, (N·F + τI)^-1): parameter name -> a float64 tensor of its shape."""
        import torch

        deltas: dict[str, torch.Tensor] = {}
        for name, (weight, bias, transposed) in self.layers.items():
            (values_a, basis_a), (values_g, basis_g) = self._eigen[name]
            precision = self.n_samples * values_g.clamp_min(0)[:, None] * values_a.clamp_min(0)[None, :]
            noise = torch.randn(precision.shape, generator=generator, dtype=torch.float64)
            delta = basis_g @ (noise / (precision + self.prior_precision).sqrt()) @ basis_a.T
            if bias is not None:
                deltas[bias] = delta[:, -1].clone()
                delta = delta[:, :-1]
            deltas[weight] = delta.T.contiguous() if transposed else delta
        for name, fisher in self.diagonal.items():
            noise = torch.randn(fisher.shape, generator=generator, dtype=torch.float64)
            deltas[name] = noise / (self.n_samples * fisher + self.prior_precision).sqrt()
        return deltas


def kfac_laplace(
    task: Task,
    model: nn.Module,
    *,
    prior_precision: float | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> KfacLaplace:
    """The K-FAC Laplace posterior of ``model`` (at its current weights, θ*) on ``task.train`` (see ``KfacLaplace``).

    Args:
        task: the task; its per-sample loss and training set make the empirical Fisher.
        model: the trained model, on the device to compute on (put in eval mode).
        prior_precision: τ; None: the τ that maximises the Laplace approximation of the log marginal likelihood,
            ½P log τ − ½τ‖θ*‖² − ½ log det(N·F + τI) (the data term does not depend on τ), over a log grid.
        batch_size: training samples per forward / backward.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        The posterior's factors.

    Raises:
        ArgumentError: a layer side is wider than ``LAPLACE_MAX_SIDE``.
    """
    import torch

    from gradindex.checkpoints import tied_aliases
    from gradindex.featurize import PerSampleGradients, is_hf_conv1d
    from gradindex.task import to_device

    model.eval()
    device = next(model.parameters()).device
    owners: dict[int, int] = {}  # a weight used by several modules (tied) is not factored
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    names = {id(param): name for name, param in model.named_parameters()}
    layers: dict[str, tuple[str, str | None, bool]] = {}
    modules: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(module, torch.nn.Linear) or is_hf_conv1d(module)) or weight is None:
            continue
        if not weight.requires_grad or owners.get(id(weight), 0) > 1 or id(weight) not in names:
            continue
        bias = module.bias if getattr(module, "bias", None) is not None and module.bias.requires_grad else None
        transposed = not isinstance(module, torch.nn.Linear)
        out_dim, in_dim = weight.shape[::-1] if transposed else weight.shape
        widest = max(out_dim, in_dim + (bias is not None))
        if widest > LAPLACE_MAX_SIDE:
            raise ArgumentError(
                "laplace",
                f"layer {module_name} has a side {widest} wide, over the {LAPLACE_MAX_SIDE} a K-FAC Laplace factor may "
                "have (a dense [width, width] matrix): K-FAC Laplace is for small models; make a geometric ensemble "
                "instead (leave laplace out)",
            )
        layers[module_name] = (names[id(weight)], None if bias is None else names[id(bias)], transposed)
        modules[module_name] = module
    covered = {name for weight, bias, _ in layers.values() for name in (weight, bias) if name is not None}
    rest = [name for name, param in model.named_parameters() if param.requires_grad and name not in covered]
    sums_a = dict.fromkeys(layers, 0.0)
    sums_g = dict.fromkeys(layers, 0.0)
    positions = dict.fromkeys(layers, 0)
    diagonal = dict.fromkeys(rest, 0.0)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
            outputs[name] = output

        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    gradients = None
    if rest:
        aliases = tied_aliases(model)
        gradients = PerSampleGradients(model, task.loss, rest)
        state = {f"model.{key}": value.detach() for key, value in model.state_dict().items() if key not in aliases}
        params, constants = gradients.split_state(state)
    n_samples = len(task.train)
    try:
        with progress_bar(n_samples, f"K-FAC Laplace {task.name}", enabled=progress, unit="sample") as bar:
            for start in range(0, n_samples, batch_size):
                rows = torch.arange(start, min(n_samples, start + batch_size))
                batch = to_device(_batch(task.train, rows, task.collate), device)
                if layers:
                    with torch.enable_grad():
                        losses = task.loss(model, batch)
                        found = [outputs[name] for name in layers]
                        grads = torch.autograd.grad(losses.sum(), found, allow_unused=True)
                    for (name, (_, bias, _)), grad in zip(layers.items(), grads):
                        if grad is None:
                            continue
                        a = inputs[name].double().reshape(-1, inputs[name].shape[-1])
                        if bias is not None:
                            a = torch.cat([a, a.new_ones(len(a), 1)], dim=1)
                        g = grad.double().reshape(-1, grad.shape[-1])
                        sums_a[name] = sums_a[name] + a.T @ a
                        sums_g[name] = sums_g[name] + g.T @ g
                        positions[name] += len(a)
                if gradients is not None:
                    per_sample = gradients(batch, params, constants).double()
                    offset = 0
                    shapes = dict(model.named_parameters())
                    for name in rest:
                        numel = shapes[name].numel()
                        part = per_sample[:, offset : offset + numel].square().sum(0).reshape(shapes[name].shape)
                        diagonal[name] = diagonal[name] + part
                        offset += numel
                bar.update(len(rows))
    finally:
        for handle in handles:
            handle.remove()
    factors = {}
    for name, (weight, bias, transposed) in layers.items():
        shape = dict(model.named_parameters())[weight].shape
        out_dim, in_dim = shape[::-1] if transposed else shape
        in_dim += bias is not None
        zero_a = torch.zeros(in_dim, in_dim, dtype=torch.float64, device=device)
        zero_g = torch.zeros(out_dim, out_dim, dtype=torch.float64, device=device)
        a = sums_a[name] / max(1, positions[name]) if positions[name] else zero_a
        g = sums_g[name] / n_samples if positions[name] else zero_g
        factors[name] = (a.cpu(), g.cpu())
    shapes = dict(model.named_parameters())
    diagonal = {
        name: (value / n_samples).cpu()
        if isinstance(value, torch.Tensor)
        else torch.zeros(shapes[name].shape, dtype=torch.float64)
        for name, value in diagonal.items()
    }
    posterior = KfacLaplace(
        n_samples, 1.0 if prior_precision is None else float(prior_precision), layers, factors, diagonal
    )
    if prior_precision is None:
        posterior.prior_precision = posterior.marginal_likelihood_precision(model)
    return posterior


def _laplace_members(
    task: Task, base: Path, out_dir: Path, config: EnsembleConfig, device: torch.device, progress: bool | None
) -> tuple[list[Path], list[float], float]:
    """``config.members`` draws θ* + δ from the K-FAC Laplace posterior around ``base``, saved as members; their
    distances from θ* and the prior precision used."""
    import torch

    from gradindex.checkpoints import load_into

    model = load_into(task.model(), base).to(device)
    posterior = kfac_laplace(
        task, model, prior_precision=config.prior_precision, batch_size=config.batch_size, progress=progress
    )
    start = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(config.seed)
    members, distances = [], []
    for position in range(config.members):
        deltas = posterior.draw(generator)
        with torch.no_grad():
            for name, delta in deltas.items():
                params[name].copy_(start[name] + delta.to(params[name].device, params[name].dtype))
        path = out_dir / f"member-{position + 1:03d}.pt"
        _save(model, path)
        members.append(path)
        distances.append(relative_distance(model.state_dict(), start))
    return members, distances, posterior.prior_precision
