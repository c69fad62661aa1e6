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
    "Ensemble",
    "EnsembleConfig",
    "EnsembleExistsError",
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
    batch_size: int = setting(64, "samples per step", minimum=1, integer=True)
    seed: int = setting(0, "sets the batches and any dropout", minimum=0, integer=True)

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

    from gradindex.checkpoints import checkpoint_sha256, load_into
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
        "weight_decay": decay,
        "distances": list(ensemble.distances),
        "task": task.name,
    }
    temporary = out_dir / f".{_MANIFEST}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, out_dir / _MANIFEST)
    farthest = max(distances)
    if farthest < DEGENERATE_DISTANCE:
        warnings.warn(
            f"every ensemble member stayed within {farthest:.2%} of θ*'s weights (relative distance), so GEX sees "
            f"only noise: make members that leave θ*'s basin with more weight decay (--weight-decay, now {decay:.3g}; "
            "auto is the default), a higher --lr or more --steps",
            GradIndexWarning,
            stacklevel=2,
        )
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
