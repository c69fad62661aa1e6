"""Checkpoints: ``PATH[:WEIGHT]`` specs, content hashes and state-dict loading.

A checkpoint is a file or a folder the way training code saves one:

* a ``torch.save`` file (a bare state dict, or one under ``state_dict``/``model``/``model_state_dict``/``module``, as
  Lightning and most training loops save it) or a ``.safetensors`` file;
* a Hugging Face ``save_pretrained`` folder or a Trainer/Accelerate ``checkpoint-N`` folder: its ``model.safetensors``,
  ``model.safetensors.index.json`` with its shards, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` with its
  shards (the first one present, in that order); optimizer, scheduler and RNG files beside them are never read;
* any other folder holding exactly one weight file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``).

Keys are matched to the model's own names: a prefix wrapped around every name (DDP's ``module.``, a LightningModule's
attribute such as ``model.``) and torch.compile's ``_orig_mod.`` are removed when the names then fit the model; names
the model ties to another (GPT-2's ``lm_head.weight``) may be absent, and must hold the same values when present.

A checkpoint's sha256 (what a store records and a later query verifies) is that of the file; for a folder, the sha256
of the ``sha256sum``-style listing of the files the weights are read from (``checkpoint_files``), by relative name.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gradindex.errors import CheckpointError, GradIndexWarning
from gradindex.utils import sha256_bytes, sha256_file

__all__ = [
    "HF_WEIGHT_FILES",
    "OPTIMIZER_FILES",
    "CheckpointSpec",
    "OptimizerMoments",
    "checkpoint_files",
    "checkpoint_sha256",
    "load_into",
    "load_optimizer_moments",
    "load_state_dict",
    "parse_checkpoints",
    "tied_aliases",
]

# the weight files of a save_pretrained or Trainer/Accelerate folder, in the order Hugging Face looks for them
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# what a folder's only weight file may be called, and the training-state files beside weights that are never read
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_TRAINING_STATE = ("optimizer", "scheduler", "rng_state", "random_states", "scaler", "training_args", "trainer_state")
# keys a torch.save file may hold its state dict under (Lightning: state_dict; DeepSpeed: module)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_ORIG_MOD = re.compile(r"(^|\.)_orig_mod\.")


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    """A checkpoint file and its TracIn weight (the learning rate in effect before it)."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise CheckpointError(f"checkpoint weight must be a positive number, got {self.weight} for {self.path}")

    @staticmethod
    def parse(text: str) -> CheckpointSpec:
        """``PATH`` or ``PATH:WEIGHT``, PATH a checkpoint file or folder (``ckpt.pt:0.1``, ``runs/checkpoint-500:0.1``);
        a PATH that exists is never split, so a file or folder whose name holds a colon is named as it is."""
        if not text:
            raise CheckpointError("an empty checkpoint; give PATH or PATH:WEIGHT, e.g. runs/ckpt-010.pt:0.1")
        path, sep, weight_text = text.rpartition(":")
        if not sep or Path(text).exists():
            return CheckpointSpec(path=text)
        try:
            weight = float(weight_text)
        except ValueError:
            raise CheckpointError(
                f"bad checkpoint {text!r}: the weight after ':' must be a number, e.g. {path or 'ckpt.pt'}:0.1"
            ) from None
        if not path:
            raise CheckpointError(f"bad checkpoint {text!r}: give PATH or PATH:WEIGHT, e.g. runs/ckpt-010.pt:0.1")
        return CheckpointSpec(path=path, weight=weight)

    def to_dict(self) -> dict:
        return {"path": self.path, "weight": self.weight}


def parse_checkpoints(items: Sequence[str | CheckpointSpec | tuple]) -> list[CheckpointSpec]:
    """Checkpoint specs from strings, (path, weight) pairs or specs."""
    specs = []
    for item in items:
        if isinstance(item, CheckpointSpec):
            specs.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            specs.append(CheckpointSpec(path=str(item[0]), weight=float(item[1])))
        elif isinstance(item, (str, Path)):
            specs.append(CheckpointSpec.parse(str(item)))
        else:
            raise CheckpointError(f"cannot read a checkpoint from {item!r}; give 'PATH' or 'PATH:WEIGHT'")
    if not specs:
        raise CheckpointError("at least one checkpoint is needed: PATH or PATH:WEIGHT, e.g. runs/ckpt-010.pt:0.1")
    return specs


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a checkpoint's weights are read from: the file itself, or those of a folder (see the module
    docstring): a sharded index first, then its shards in name order.

    Args:
        path: a checkpoint file or folder.

    Returns:
        The weight files, each under ``path``.

    Raises:
        CheckpointError: ``path`` does not exist, or is a folder that holds no weights, several candidate weight
            files, only Trainer ``checkpoint-N`` folders, or a sharded index naming a shard that is not there.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; check its path")
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name, *_shards(path / name)] if name.endswith(".index.json") else [path / name]
    entries = sorted(path.iterdir())
    files = [
        entry
        for entry in entries
        if entry.is_file() and entry.suffix in _WEIGHT_SUFFIXES and not entry.name.startswith((".", *_TRAINING_STATE))
    ]
    if len(files) == 1:
        return files
    if files:
        raise CheckpointError(
            f"checkpoint {path} is a folder holding several weight files ({', '.join(f.name for f in files[:6])}); "
            f"give the one to load, e.g. {files[0]}"
        )
    runs = sorted(
        (entry for entry in entries if entry.is_dir() and re.fullmatch(r"checkpoint-\d+", entry.name)),
        key=lambda entry: int(entry.name.split("-")[1]),
    )
    if runs:
        raise CheckpointError(
            f"checkpoint {path} is a Trainer output folder holding {', '.join(run.name for run in runs[:8])}"
            + (" ..." if len(runs) > 8 else "")
            + f" and no weights of its own; give one of them, e.g. {runs[-1]}"
        )
    raise CheckpointError(
        f"checkpoint {path} is a folder holding no model weights; give a save_pretrained or Trainer checkpoint folder "
        f"({', '.join(HF_WEIGHT_FILES)}) or the checkpoint file itself (a torch.save state dict, .pt or .bin, or a "
        ".safetensors file)"
    )


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names (each once, in name order)."""
    weight_map = _weight_map(index)
    folder = index.parent
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(
                f"checkpoint {folder}'s {index.name} names the shard {name!r} outside its folder; save the model "
                "again with save_pretrained"
            )
        if not shard.is_file():
            raise CheckpointError(
                f"checkpoint {folder}'s {index.name} names the shard {name}, which is not there; copy the whole "
                "folder, every shard with it"
            )
        shards.append(shard)
    return shards


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(
            f"checkpoint index {index} is not readable JSON with a weight_map ({type(error).__name__}: {error}); "
            "save the model again with save_pretrained"
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(value, str) for value in weight_map.values()):
        raise CheckpointError(
            f"checkpoint index {index} holds no weight_map of tensor names to shard files; save the model again "
            "with save_pretrained"
        )
    return weight_map


def checkpoint_sha256(path: str | Path) -> str:
    """What a store records of a checkpoint: the sha256 of a file; of a folder, the sha256 of the listing
    ``"<sha256 of file>  <name relative to the folder>\\n"`` of its weight files (``checkpoint_files``) in name order,
    i.e. ``cd FOLDER && sha256sum FILE... | sha256sum`` with the files sorted. Other files of a folder (config,
    optimizer and scheduler state, RNG state) do not count.

    Args:
        path: a checkpoint file or folder.

    Returns:
        The hex digest.

    Raises:
        CheckpointError: ``path`` is not a checkpoint (see ``checkpoint_files``) or cannot be read.
    """
    path = Path(path)
    files = checkpoint_files(path)
    try:
        if path.is_file():
            return sha256_file(path)
        named = sorted((file.relative_to(path).as_posix(), file) for file in files)
        return sha256_bytes("".join(f"{sha256_file(file)}  {name}\n" for name, file in named).encode())
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error.strerror or error}); check its path") from None


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file or folder, under the names they were saved with (a sharded checkpoint's shards
    merged; a torch.save file's state dict taken from under ``state_dict``/``model``/``model_state_dict``/``module``
    when it is wrapped).

    Args:
        path: a checkpoint file or folder (see the module docstring).

    Returns:
        Name -> tensor, on the CPU.

    Raises:
        CheckpointError: not a checkpoint, an unreadable file, or a file that holds no state dict of tensors.
    """
    files = checkpoint_files(path)
    if not files[0].name.endswith(".index.json"):
        return _read_weights(files[0])
    weight_map = _weight_map(files[0])
    state: dict[str, Tensor] = {}
    for shard in files[1:]:
        state.update(_read_weights(shard))
    absent = [name for name in weight_map if name not in state]
    if absent:
        raise CheckpointError(
            f"checkpoint {path}: {files[0].name} names {', '.join(absent[:5])} but no shard holds "
            f"{'it' if len(absent) == 1 else 'them'}; save the model again with save_pretrained"
        )
    return state


def _read_weights(path: Path) -> dict[str, Tensor]:
    """The state dict of one torch.save or safetensors file."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(
                f"{path} is a safetensors file; install safetensors (pip install safetensors)"
            ) from None
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError on a damaged or foreign file
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file ({type(error).__name__}: {error}); "
                "check the file, or save it again with safetensors.torch.save_file"
            ) from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        foreign = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if foreign:  # e.g. a Lightning file whose hyper-parameters are an argparse.Namespace
            raise CheckpointError(
                f"cannot load checkpoint {path} with torch.load(weights_only=True): it pickles a {foreign.group(1)} "
                "beside its tensors, and gradindex never runs code from a checkpoint; if you trust the file, save its "
                "weights alone, e.g. torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt')"
            ) from error
        raise CheckpointError(
            f"cannot load checkpoint {path} with torch.load ({type(error).__name__}: {error})"
        ) from error
    if isinstance(state, dict) and not all(isinstance(value, Tensor) for value in state.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict of tensors; save it with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """The second and later names of each parameter or buffer registered under several names (tied weights, a module
    used in two places), each mapped to its first name: the one ``named_parameters()`` and ``named_buffers()`` give.

    Args:
        model: any module.

    Returns:
        Alias -> first name (empty when nothing is tied).
    """
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into a model: the names fitted to the model's (see the module docstring), tied names
    restored from the one saved, with a clear error naming missing/unexpected keys, shape mismatches, tied names
    saved with different values, or NaN weights.

    Args:
        model: the task's model.
        path: a checkpoint file or folder.

    Returns:
        ``model``, holding the checkpoint's weights.

    Raises:
        CheckpointError: the checkpoint cannot be read, does not fit the model, or holds NaN or infinite weights.
    """
    state = _fit(model, load_state_dict(path), path)
    model.load_state_dict(state)
    return model


def _fit(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """The checkpoint's tensors under every name of the model's state dict (see ``load_into``)."""
    own = model.state_dict()
    aliases = {alias: name for alias, name in tied_aliases(model).items() if alias in own and name in own}
    groups: dict[str, list[str]] = {}
    for alias, name in aliases.items():
        groups.setdefault(name, [name]).append(alias)
    # (what was removed from the names, the prefix, the names read, the tensors under the model's names, why they do not
    # fit): the names as saved, and only when they do not fit, every reading with a prefix or _orig_mod. removed
    candidates = [("", "", state, state, _problems(state, own, aliases, groups))]
    if candidates[0][4]:
        views = [("", state)]
        if any(_ORIG_MOD.search(key) for key in state):
            views.append(("'_orig_mod.'", {_ORIG_MOD.sub(r"\1", key): value for key, value in state.items()}))
        for removed, view in views:
            for prefix in _prefixes(view, own):
                if prefix or removed:
                    sub = {key[len(prefix) :]: value for key, value in view.items() if key.startswith(prefix)}
                    how = " and ".join(part for part in (f"'{prefix}'" if prefix else "", removed) if part)
                    candidates.append((how, prefix, view, sub, _problems(sub, own, aliases, groups)))
    # two readings that give the same tensors the same names are one (DDP's 'module.' removed, or '_orig_mod.' removed
    # either way)
    fitting = list({frozenset((k, id(v)) for k, v in c[3].items()): c for c in candidates if not c[4]}.values())
    if len(fitting) > 1:
        raise CheckpointError(
            f"checkpoint {path} holds the model under several prefixes ({', '.join(c[0] for c in fitting[:5])}); "
            "save the weights of the one model alone, e.g. torch.save(lightning_module.model.state_dict(), path)"
        )
    if not fitting:
        how, _, _, sub, problems = max(candidates, key=lambda candidate: len(own.keys() & candidate[3].keys()))
        read = f" (read with {how} removed from its names)" if how else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit the task's model ({'; '.join(problems)}){read}; check the task and the "
            "checkpoint"
        )
    how, prefix, view, sub, _ = fitting[0]
    if len(sub) < len(view):
        left_out = [key for key in view if not key.startswith(prefix)][:3]
        warnings.warn(
            f"checkpoint {path}: the model's weights were read from the names under {how}; {len(view) - len(sub)} "
            f"other tensors ({', '.join(left_out)}{', ...' if len(view) - len(sub) > 3 else ''}) were left out",
            GradIndexWarning,
            stacklevel=3,
        )
    for names in groups.values():
        present = [key for key in names if key in sub]
        for other in present[1:]:
            if not torch.equal(sub[present[0]], sub[other]):
                raise CheckpointError(
                    f"checkpoint {path} holds different values for {present[0]} and {other}, which the task's model "
                    "ties (one tensor); load it into a model that does not tie them (e.g. tie_word_embeddings=False), "
                    "or save it from the tied model"
                )
    for key, value in sub.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"checkpoint {path} holds NaN or infinite values in {key} ({count} of {value.numel()}): the training "
                "run had diverged when it was saved; use an earlier checkpoint"
            )
    saved = {name: next(sub[key] for key in names if key in sub) for name, names in groups.items()}
    return {key: sub[key] if key in sub else saved[aliases.get(key, key)] for key in own}


def _prefixes(state: dict[str, Tensor], own: dict[str, Tensor]) -> list[str]:
    """The prefixes that turn some saved name into one of the model's, most frequent first; always ``""`` first."""
    counts: dict[str, int] = {}
    for key in state:
        for start in [0] + [match.end() for match in re.finditer(r"\.", key)]:
            if key[start:] in own and start:
                counts[key[:start]] = counts.get(key[:start], 0) + 1
    return ["", *sorted(counts, key=lambda prefix: (-counts[prefix], prefix))]


def _problems(
    sub: dict[str, Tensor], own: dict[str, Tensor], aliases: dict[str, str], groups: dict[str, list[str]]
) -> list[str]:
    """Why ``sub`` does not fit the model's state dict: missing, unexpected and mismatched names (empty: it fits)."""
    missing = [
        key for key in own if key not in sub and not any(name in sub for name in groups.get(aliases.get(key, key), ()))
    ]
    unexpected = [key for key in sub if key not in own]
    mismatched = [
        f"{key} {tuple(sub[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in sub and sub[key].shape != own[key].shape
    ]
    parts = []
    if missing:
        parts.append(
            f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    if unexpected:
        parts.append(
            f"unexpected {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    if mismatched:
        parts.append(f"shape mismatch {', '.join(mismatched[:5])}")
    return parts


# ---- optimizer state: Adam's second moments (TrackStar's normalizer) -------------------------------------------------

# the optimizer files of a Trainer / Accelerate checkpoint folder, in the order they are looked for
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
# keys a torch.save file may hold one optimizer's state dict under (Lightning: a list under optimizer_states)
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim")
# the parameter names HF's Trainer leaves out of weight decay (Trainer.get_decay_parameter_names), which puts them in
# its second parameter group
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
_SAVE_HINT = (
    "save it beside the weights, e.g. torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict()}, "
    "path), or give a Trainer checkpoint-N folder with its optimizer.pt"
)


@dataclass(frozen=True)
class OptimizerMoments:
    """Adam's second moments at a checkpoint, under the model's parameter names.

    ``moments[name]`` is v̂ = exp_avg_sq / (1 − β₂^step) (``max_exp_avg_sq`` with amsgrad), the bias-corrected second
    moment Adam divides by (as √v̂ + ε); ``eps[name]`` the ε of its parameter group; ``source`` and ``sha256`` the
    file they were read from.
    """

    source: str
    sha256: str
    moments: dict[str, Tensor]
    eps: dict[str, float]

    def denominator(self, name: str) -> Tensor:
        """Adam's elementwise denominator √v̂ + ε of one parameter (its shape)."""
        return self.moments[name].sqrt().add_(self.eps[name])


def load_optimizer_moments(model: nn.Module, path: str | Path) -> OptimizerMoments:
    """The Adam second moments saved with a checkpoint, mapped to ``model``'s parameter names.

    The optimizer state is read from a Trainer / Accelerate folder's ``optimizer.pt`` (or ``optimizer.bin``), from a
    ``torch.save`` file's ``optimizer`` (``optimizer_state_dict``, ``optimizer_state``, ``optim``) entry, or from a
    Lightning file's only ``optimizer_states`` entry. An optimizer state dict numbers the parameters; the numbers are
    mapped to names by the names it records (``param_names``: an optimizer built from ``named_parameters()``), else
    by ``model.parameters()`` order (one parameter group), else by HF Trainer's two groups (weight decay, then the
    biases and norm weights it exempts), and every moment's shape must then equal its parameter's.

    Args:
        model: the task's model (only its parameter names, shapes and module types are used).
        path: a checkpoint file or folder.

    Returns:
        The bias-corrected second moments of every parameter the optimizer holds state for.

    Raises:
        CheckpointError: no optimizer state is found, it is not Adam's (no ``exp_avg_sq``), or its numbering cannot be
            mapped to the model's parameters.
    """
    path = Path(path)
    state, source = _optimizer_state(path)
    groups = state["param_groups"]
    names = _optimizer_names(model, state, path)
    entries = state["state"]
    if not entries:
        raise CheckpointError(
            f"checkpoint {path}'s optimizer state is empty (the optimizer had taken no step when it was saved); use a "
            "checkpoint saved after training"
        )
    if not any(isinstance(entry, dict) and "exp_avg_sq" in entry for entry in entries.values()):
        held = sorted({key for entry in entries.values() if isinstance(entry, dict) for key in entry})
        raise CheckpointError(
            f"checkpoint {path}'s optimizer state holds no Adam second moments (exp_avg_sq; it holds "
            f"{', '.join(held[:4]) or 'nothing'}): adam_normalize needs a model trained with Adam or AdamW; build "
            "without adam_normalize"
        )
    group_of = {int(index): group for group in groups for index in group.get("params", [])}
    shapes = dict(model.named_parameters())
    moments: dict[str, Tensor] = {}
    eps: dict[str, float] = {}
    for index, entry in entries.items():
        name = names.get(int(index))
        if name is None or not isinstance(entry, dict) or "exp_avg_sq" not in entry:
            continue
        group = group_of.get(int(index), {})
        amsgrad = bool(group.get("amsgrad")) and isinstance(entry.get("max_exp_avg_sq"), Tensor)
        value = (entry["max_exp_avg_sq"] if amsgrad else entry["exp_avg_sq"]).detach().to("cpu", torch.float32)
        if tuple(value.shape) != tuple(shapes[name].shape):
            raise CheckpointError(
                f"checkpoint {path}'s optimizer state entry {index} has a second moment of shape "
                f"{tuple(value.shape)}, but it maps to {name} of shape {tuple(shapes[name].shape)}: the optimizer's "
                "parameter numbering is not this model's; " + _SAVE_HINT + " from an optimizer over model.parameters()"
            )
        step = entry.get("step", 0)
        step = float(step.item() if isinstance(step, Tensor) else step)
        beta2 = float((group.get("betas") or (0.9, 0.999))[1])
        if step > 0 and beta2 < 1:
            value = value / (1.0 - beta2**step)
        moments[name] = value
        eps[name] = float(group.get("eps", 1e-8))
    return OptimizerMoments(source=str(source), sha256=sha256_file(source), moments=moments, eps=eps)


def _optimizer_state(path: Path) -> tuple[dict, Path]:
    """``(optimizer state dict, the file it came from)`` of a checkpoint (see ``load_optimizer_moments``)."""
    if path.is_dir():
        found = [path / name for name in OPTIMIZER_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(
                f"checkpoint {path} holds no optimizer state ({' or '.join(OPTIMIZER_FILES)}); {_SAVE_HINT}, or "
                "build without adam_normalize"
            )
        return _checked_optimizer(_torch_load(found[0]), found[0]), found[0]
    files = checkpoint_files(path)
    if path.suffix == ".safetensors" or files[0].name.endswith(".index.json"):
        raise CheckpointError(
            f"checkpoint {path} holds weights only (safetensors), no optimizer state; {_SAVE_HINT}, or build without "
            "adam_normalize"
        )
    saved = _torch_load(path)
    if isinstance(saved, dict):
        for key in _OPTIMIZER_KEYS:
            if isinstance(saved.get(key), dict):
                return _checked_optimizer(saved[key], path), path
        lightning = saved.get("optimizer_states")
        if isinstance(lightning, (list, tuple)) and len(lightning) == 1:
            return _checked_optimizer(lightning[0], path), path
        if isinstance(lightning, (list, tuple)) and len(lightning) > 1:
            raise CheckpointError(
                f"checkpoint {path} holds {len(lightning)} optimizers' states (optimizer_states); save the one that "
                f"trained the model beside its weights, e.g. torch.save({{'model': ..., 'optimizer': "
                f"checkpoint['optimizer_states'][0]}}, path)"
            )
    raise CheckpointError(
        f"checkpoint {path} holds no optimizer state (no {', '.join(_OPTIMIZER_KEYS)} or optimizer_states entry); "
        f"{_SAVE_HINT}, or build without adam_normalize"
    )


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot load {path} with torch.load(weights_only=True) ({type(error).__name__}: {str(error)[:200]}); "
            "save the optimizer state dict alone, e.g. torch.save(optimizer.state_dict(), path)"
        ) from error


def _checked_optimizer(state: object, path: Path) -> dict:
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), (list, tuple))
    ):
        raise CheckpointError(
            f"{path} holds no optimizer state dict (a dict of 'state' and 'param_groups'); {_SAVE_HINT}"
        )
    return state


def _optimizer_names(model: nn.Module, state: dict, path: Path) -> dict[int, str]:
    """Optimizer parameter number -> the model's parameter name (see ``load_optimizer_moments``)."""
    groups = list(state["param_groups"])
    numbers = [[int(index) for index in group.get("params", [])] for group in groups]
    named = list(model.named_parameters())
    own = {name for name, _ in named}
    if groups and all(len(group.get("param_names") or ()) == len(found) for group, found in zip(groups, numbers)):
        mapping = {}
        for group, found in zip(groups, numbers):
            for index, recorded in zip(found, group["param_names"]):
                name = _ORIG_MOD.sub(r"\1", str(recorded))
                parts = name.split(".")
                fitted = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in own), None)
                if fitted is None:
                    raise CheckpointError(
                        f"checkpoint {path}'s optimizer names the parameter {recorded}, which the task's model does "
                        "not have; check the task and the checkpoint"
                    )
                mapping[index] = fitted
        return mapping
    flat = [index for found in numbers for index in found]
    trainable = [name for name, param in named if param.requires_grad]
    if len(groups) == 1:
        for order in (trainable, [name for name, _ in named]):
            if len(order) == len(flat):
                return dict(zip(flat, order))
        raise CheckpointError(
            f"checkpoint {path}'s optimizer holds {len(flat)} parameters but the task's model has {len(trainable)} "
            "trainable ones: the optimizer was not built over model.parameters(); "
            + _SAVE_HINT
            + " from an optimizer over model.parameters() or named_parameters()"
        )
    modules = dict(model.named_modules())
    normed = {
        name
        for name in trainable
        if any(
            isinstance(modules.get(".".join(name.split(".")[:end])), nn.LayerNorm) for end in range(name.count(".") + 1)
        )
    }
    decay = [name for name in trainable if name not in normed and not _NO_DECAY.search(name.lower())]
    exempt = [name for name in trainable if name not in set(decay)]
    if len(groups) == 2 and [len(found) for found in numbers] == [len(decay), len(exempt)]:
        return dict(zip(flat, decay + exempt))
    raise CheckpointError(
        f"cannot map checkpoint {path}'s optimizer parameters to the model's names: its {len(groups)} parameter groups "
        f"of {', '.join(str(len(found)) for found in numbers)} parameters are neither one group over "
        f"model.parameters() nor HF Trainer's decay / no-decay split ({len(decay)}, {len(exempt)}); build the "
        "optimizer from model.named_parameters() (torch records the names then) and save its state again"
    )
