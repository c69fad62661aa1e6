"""Fast geometric ensembles: members around a trained checkpoint, for GEX and for TracIn over an ensemble.

Starting from the trained weights θ*, the model is fine-tuned for ``members`` learning-rate cycles of
``steps`` optimizer steps each, and one member is saved per cycle where the learning rate is lowest
(Garipov et al. 2018, "fast geometric ensembling"; Kim et al. 2023 use such members for GEX)::

    ensemble = make_ensemble(task, "runs/ckpt-030.pt", "runs/ge", members=8, steps=50, lr=0.05)
    gradindex.build(task, ensemble.gex_checkpoints(), "ge.gradindex", method="gex")        # θ*, then members
    gradindex.build(task, ensemble.tracin_checkpoints(), "ge-tracin.gradindex")             # members, weight 1/M

Schedules, with t the position in a cycle:

* ``cosine`` (default): lr_min + (lr − lr_min)(1 + cos πt)/2, restarting every cycle; saved at its end.
* ``triangular``: FGE's, lr → lr_min over the first half of a cycle and back; saved at the midpoint.
* ``constant``: lr throughout; saved at the end of every cycle (SWAG-like samples).

Each step is the task's ``train_step(model, batch, optimizer)`` when it has one, else plain SGD (with
momentum) on ``mean(task.loss) + task.regularization``. Members are ordinary ``torch.save(state_dict)``
checkpoints, ``DIR/member-001.pt`` …, described by ``DIR/ensemble.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradindex.checkpoints import checkpoint_sha256, load_into
from gradindex.errors import ArgumentError, CheckpointError, GradIndexError, NonFiniteError, TaskSpecError
from gradindex.featurize import resolve_device
from gradindex.task import Task, collate_samples, load_task, to_device
from gradindex.utils import check_settings, progress_bar, setting

__all__ = ["Ensemble", "EnsembleConfig", "EnsembleExistsError", "load_ensemble", "make_ensemble"]

_MANIFEST = "ensemble.json"


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
    weight_decay: float = setting(0.0, "SGD's coupled L2 weight decay, on top of the task's regularisation", minimum=0)
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

    def gex_checkpoints(self) -> list[str]:
        """``--method gex`` checkpoints: θ* first, then the members."""
        return [str(self.base), *(str(path) for path in self.members)]

    def tracin_checkpoints(self) -> list[str]:
        """``--method tracin`` checkpoints: the members, each with weight 1/M."""
        weight = 1.0 / len(self.members)
        return [f"{path}:{weight!r}" for path in self.members]


def _batch(dataset: Any, rows: torch.Tensor, collate: Any) -> Any:
    if collate is None and isinstance(dataset, TensorDataset):
        return tuple(tensor[rows] for tensor in dataset.tensors)
    return (collate or collate_samples)([dataset[int(row)] for row in rows])


def _save(model: nn.Module, path: Path) -> None:
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _step(task: Task, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer) -> float | None:
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
        ``method="gex"``, ``tracin_checkpoints()`` for TracIn over the members).
    """
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
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        model = load_into(task.model(), base).to(device)
        model.train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        shuffle = torch.Generator().manual_seed(config.seed + 0x9E3779B9)
        order = torch.randperm(n_samples, generator=shuffle)
        cursor = 0
        with progress_bar(total_steps, f"ensemble {task.name}", enabled=progress, unit="step") as bar:
            for step in range(total_steps):
                if cursor >= n_samples:
                    order, cursor = torch.randperm(n_samples, generator=shuffle), 0
                rows = order[cursor : cursor + config.batch_size]
                cursor += len(rows)
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
    ensemble = Ensemble(base=base.resolve(), members=tuple(path.resolve() for path in members), config=config)
    manifest = {
        "base": str(ensemble.base),
        "base_sha256": checkpoint_sha256(base),
        "members": [str(path) for path in ensemble.members],
        "config": config.to_dict(),
        "task": task.name,
    }
    temporary = out_dir / f".{_MANIFEST}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, out_dir / _MANIFEST)
    return ensemble


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
    )
