"""A small, real trainer: makes the checkpoints the demo, the tests and the benchmarks index.

    checkpoints = train(task, TrainConfig(epochs=30, n_checkpoints=3), "runs/digits")
    evaluate(task, checkpoints[-1])   # {"accuracy": 0.97..., "loss": 0.1...}

Any task trains: batches are made the one way every stage makes them (``gather_batch``: tensors sliced, tuples, dicts
and HF rows collated and padded by the task's collate), and the step minimises ``task.loss`` — for a Hugging Face
model its default loss (``model(**inputs)``, ``.logits``, the causal LM loss). A ``transformers`` model's checkpoints
are ``save_pretrained`` folders ``checkpoint-STEP/`` (as HF's Trainer writes them, with the task's tokenizer beside
the weights), any other model's ``torch.save(state_dict)`` files ``ckpt-EPOCH.pt`` (``TrainConfig.checkpoint_format``
chooses). Both load with ``gradindex.checkpoints`` and ``gradindex build --checkpoint PATH:LR``.

Training is deterministic given ``TrainConfig.seed`` and leaves the caller's global torch RNG as it found it.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradindex.checkpoints import load_into
from gradindex.errors import ArgumentError, CheckpointError, NonFiniteError, TaskSpecError
from gradindex.task import Task, gather_batch
from gradindex.utils import check_settings, progress_bar, setting

__all__ = ["SavedCheckpoint", "TrainConfig", "evaluate", "train"]

# the optimizers ``train`` fits with
OPTIMIZERS: dict[str, str] = {"sgd": "SGD with momentum", "adam": "Adam (momentum is its first beta)"}
# how ``train`` saves checkpoints
CHECKPOINT_FORMATS: dict[str, str] = {
    "auto": "hf for a transformers model, pt for any other",
    "pt": "torch.save(state_dict) files ckpt-EPOCH.pt",
    "hf": "save_pretrained folders checkpoint-STEP/ (transformers models only), with the task's tokenizer",
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How ``train`` fits a task's model: mini-batch SGD (or Adam) at a constant learning rate."""

    epochs: int = setting(30, "passes over the training set", minimum=1, integer=True)
    lr: float = setting(0.1, "the constant learning rate; recorded on every checkpoint as its TracIn weight", above=0)
    batch_size: int = setting(
        64, "samples per step; the last batch of an epoch may be smaller", minimum=1, integer=True
    )
    momentum: float = setting(0.9, "SGD momentum; for Adam, its first beta", minimum=0, below=1)
    weight_decay: float = setting(
        0.0, "the optimizer's (coupled) L2 weight decay, on top of task.regularization", minimum=0
    )
    n_checkpoints: int = setting(
        3, "checkpoints saved, evenly spaced over the epochs, the last at the final epoch", minimum=1, integer=True
    )
    seed: int = setting(0, "sets the initial weights, the shuffling and any dropout", minimum=0, integer=True)
    optimizer: Literal["sgd", "adam"] = setting("sgd", "the optimizer", choices=OPTIMIZERS)
    checkpoint_format: Literal["auto", "pt", "hf"] = setting(
        "auto", "how checkpoints are saved", choices=CHECKPOINT_FORMATS
    )

    def __post_init__(self) -> None:
        if isinstance(self.n_checkpoints, int) and not isinstance(self.n_checkpoints, bool) and self.n_checkpoints < 1:
            self._too_many_checkpoints()
        check_settings(self)
        if self.n_checkpoints > self.epochs:
            self._too_many_checkpoints()

    def _too_many_checkpoints(self) -> None:
        raise ArgumentError(
            "n_checkpoints",
            f"n_checkpoints must be an integer between 1 and epochs ({self.epochs}), got {self.n_checkpoints!r}; "
            "lower n_checkpoints or train for more epochs",
        )

    def checkpoint_epochs(self) -> tuple[int, ...]:
        """The epochs after which a checkpoint is saved: ``ceil(k * epochs / n_checkpoints)``, k = 1..n."""
        return tuple(-(-k * self.epochs // self.n_checkpoints) for k in range(1, self.n_checkpoints + 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
            )
        return cls(**data)


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint written by ``train``: a ``torch.save(state_dict)`` file or a ``save_pretrained`` folder.

    lr: the learning rate in effect during the epochs leading to this checkpoint (its TracIn weight).
    step: the optimizer steps taken when it was saved.
    """

    path: Path
    epoch: int
    lr: float
    step: int | None = None

    def cli_spec(self) -> str:
        """``PATH:WEIGHT`` as ``gradindex build --checkpoint`` takes it."""
        return f"{self.path}:{self.lr!r}"


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay
        )
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _save_state_dict(model: nn.Module, path: Path) -> None:
    """Write to a temporary name and rename, so a killed run never leaves a truncated checkpoint."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _is_pretrained(model: nn.Module) -> bool:
    """A ``transformers`` model (a ``PreTrainedModel``, the user's subclasses included), which ``save_pretrained``
    writes as HF tools read it. Such a model was built by transformers, so it is imported when there is one."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _save_pretrained(model: nn.Module, tokenizer: Any, path: Path) -> None:
    """A ``save_pretrained`` folder (safetensors; tied weights once, as transformers saves them), the tokenizer beside
    it; written under a temporary name and renamed, so a killed run never leaves half a folder."""
    from transformers.utils import logging as hf_logging  # a transformers model: transformers is there

    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar, once per checkpoint, inside ours
    try:
        model.save_pretrained(temporary, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(temporary)
    if path.exists():
        shutil.rmtree(path)
    os.replace(temporary, path)


def _loss_value(value: Any) -> Tensor | None:
    """A train_step's return value as a detached scalar tensor (None when it returns nothing)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.detach().float().mean()
    return torch.tensor(float(value))


def train(
    task: Task,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> list[SavedCheckpoint]:
    """Fit a fresh ``task.model()`` on ``task.train`` and save ``config.n_checkpoints`` checkpoints.

    Each step minimises ``mean(task.loss(model, batch)) + task.regularization(model)`` in train mode,
    or calls ``task.train_step(model, batch, optimizer)`` when the task has one. Checkpoints are
    ``out_dir/ckpt-{epoch:03d}.pt`` (``torch.save`` of a CPU state dict) or, for a ``transformers`` model,
    ``out_dir/checkpoint-{step}/`` (``save_pretrained``, with ``task.tokenizer``), returned in epoch order.

    Args:
        task: the task; its model, training set, loss, collate and regularization.
        config: how to train (``TrainConfig``).
        out_dir: the folder the checkpoints go to (made if missing).
        progress: show a progress bar.
        device: where to train (``cpu``, ``cuda[:N]``).

    Returns:
        The checkpoints, in epoch order (``SavedCheckpoint.cli_spec()`` is the ``--checkpoint`` argument).

    Raises:
        TaskSpecError: an empty training set, or ``checkpoint_format="hf"`` for a model that is not a transformers
            model.
        NonFiniteError: the training loss became NaN or infinite.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    n_samples = len(task.train)
    if n_samples == 0:
        raise TaskSpecError(f"task {task.name!r} has an empty training set; give it training samples")
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_at = set(config.checkpoint_epochs())
    saved: list[SavedCheckpoint] = []

    cuda_devices: list[int] = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        # Inside the fork: seeding here sets the initial weights and dropout without touching the caller's RNG.
        torch.random.default_generator.manual_seed(config.seed)
        if cuda_devices:
            with torch.cuda.device(cuda_devices[0]):
                torch.cuda.manual_seed(config.seed)
        shuffle = torch.Generator().manual_seed(config.seed + 0x5DEECE66D)
        model = task.model().to(device)
        model.train()
        optimizer = _make_optimizer(model, config)
        pretrained = _is_pretrained(model)
        if config.checkpoint_format == "hf" and not pretrained:
            raise TaskSpecError(
                f"checkpoint_format='hf' saves transformers models, but task {task.name!r} builds a "
                f"{type(model).__name__}; use checkpoint_format='pt' (or 'auto')"
            )
        as_folders = pretrained and config.checkpoint_format != "pt"
        steps = 0

        bar = progress_bar(config.epochs, f"train {task.name}", enabled=progress, unit="epoch")
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(n_samples, generator=shuffle)
            total = torch.zeros((), device=device)
            weighed = 0
            for start in range(0, n_samples, config.batch_size):
                rows = order[start : start + config.batch_size]
                batch = gather_batch(task.train, rows, task.collate, device)
                if task.train_step is not None:
                    value = _loss_value(task.train_step(model, batch, optimizer))
                else:
                    optimizer.zero_grad(set_to_none=True)
                    objective = task.loss(model, batch).mean()
                    if task.regularization is not None:
                        objective = objective + task.regularization(model)
                    objective.backward()
                    optimizer.step()
                    value = objective.detach()
                steps += 1
                if value is not None:
                    total = total + value.to(total.device) * len(rows)
                    weighed += len(rows)
            epoch_loss = float(total) / weighed if weighed else math.nan
            if weighed and not math.isfinite(epoch_loss):
                raise NonFiniteError(
                    f"training loss of task {task.name!r} became {epoch_loss} in epoch {epoch}; "
                    f"lower the learning rate (now {config.lr}) or check the data for NaN/inf"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_loss:.4f}")
            if epoch in save_at:
                if as_folders:
                    path = out_dir / f"checkpoint-{steps}"
                    _save_pretrained(model, task.tokenizer, path)
                else:
                    path = out_dir / f"ckpt-{epoch:03d}.pt"
                    _save_state_dict(model, path)
                saved.append(SavedCheckpoint(path=path, epoch=epoch, lr=float(config.lr), step=steps))
        bar.close()
    return saved


def _load_model(task: Task, source: Any) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, SavedCheckpoint):
        source = source.path
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist; check the path or train the task first")
        try:
            return load_into(task.model(), path)
        except CheckpointError as error:
            raise CheckpointError(f"checkpoint {path} does not fit task {task.name!r}'s model: {error}") from error
    if isinstance(source, Mapping):
        state, path = source, "<state dict>"
    else:
        raise TypeError(f"expected a model, a checkpoint path or a state dict, got {type(source).__name__}")
    model = task.model()
    try:
        model.load_state_dict(state)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit task {task.name!r}'s model ({error}); "
            "give a checkpoint trained for this task"
        ) from error
    return model


@torch.no_grad()
def evaluate(
    task: Task,
    state_dict_path_or_model: str | os.PathLike | SavedCheckpoint | Mapping[str, Tensor] | nn.Module,
    split: str = "test",
    *,
    batch_size: int = 1024,
) -> dict[str, float]:
    """``{"accuracy": ..., "loss": ...}`` of a checkpoint (or model) on a split, in eval mode.

    loss is the mean of ``task.loss`` (without the regularization term); accuracy compares the argmax
    of ``[B, C]`` logits (``task.logits_of``) with the per-sample labels, and is NaN when there are none (a
    language model).

    Args:
        task: the task.
        state_dict_path_or_model: a checkpoint (file, folder, ``SavedCheckpoint``), a state dict or a model.
        split: the split to evaluate on.
        batch_size: samples per batch.

    Raises:
        CheckpointError: the checkpoint is missing or does not fit the task's model.
        TaskSpecError: the split is empty.
    """
    dataset = task.split(split)
    n_samples = len(dataset)
    if n_samples == 0:
        raise TaskSpecError(f"split {split!r} of task {task.name!r} is empty; evaluate on a split with samples")
    model = _load_model(task, state_dict_path_or_model)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loss_sum, n_correct, classification = 0.0, 0, True
    try:
        for start in range(0, n_samples, batch_size):
            rows = torch.arange(start, min(start + batch_size, n_samples))
            batch = gather_batch(dataset, rows, task.collate, device)
            loss_sum += float(task.loss(model, batch).sum())
            if classification:
                labels = task.labels_of(batch)
                logits = task.logits_of(model, batch) if labels is not None else None
                if isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[1] >= 2:
                    n_correct += int((logits.argmax(dim=1).cpu().numpy() == labels).sum())
                else:
                    classification = False
    finally:
        model.train(was_training)
    return {
        "accuracy": n_correct / n_samples if classification else math.nan,
        "loss": loss_sum / n_samples,
    }
