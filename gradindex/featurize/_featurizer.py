"""Featurizers: a batch of samples -> one vector φ per sample, ⟨φ(q), φ(z)⟩ ≈ influence of z on q."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, default_collate

from gradindex._errors import CorruptStoreError
from gradindex.checkpoints import CheckpointSpec, file_sha256, load_into
from gradindex.featurize._grads import PerSampleGradients, select_parameters, to_device
from gradindex.featurize._kron import KronGradients
from gradindex.project._kron import pca_side_matrix
from gradindex.project import ParamPlan, ProjectionSpec, make_projector
from gradindex.task import Task

__all__ = [
    "Featurizer",
    "TracInFeaturizer",
    "LoadedCheckpoint",
    "load_checkpoints",
    "iter_batches",
    "resolve_device",
    "model_fingerprint",
]


# the kron plan's calibration: the first samples of the training set, and how narrow sides are drawn by default
CALIBRATION_SAMPLES = 256
KRON_SIDES = "pca"
# the store transform that keeps the pca side matrices of a kron build (every checkpoint's, packed flat)
KRON_SIDES_TRANSFORM = "kron_sides"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; an unavailable CUDA request is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from error


@dataclass(frozen=True)
class LoadedCheckpoint:
    spec: CheckpointSpec
    sha256: str
    state: dict[str, Tensor]  # the LossModule's state: "model.<name>" keys


def load_checkpoints(task: Task, specs: Sequence[CheckpointSpec], device: torch.device) -> list[LoadedCheckpoint]:
    """Load every checkpoint into the task's model (validating it fits) and keep its tensors on ``device``."""
    loaded = []
    for spec in specs:
        model = load_into(task.model(), spec.path)
        state = {f"model.{key}": value.detach().to(device) for key, value in model.state_dict(keep_vars=False).items()}
        # state_dict omits non-persistent buffers; functional_call keeps the module's own for those
        loaded.append(LoadedCheckpoint(spec=spec, sha256=file_sha256(spec.path), state=state))
    return loaded


def model_fingerprint(model: nn.Module) -> dict:
    """Class and parameter names/shapes: what must match between build and query."""
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": [[name, list(param.shape)] for name, param in model.named_parameters()],
    }


def iter_batches(dataset: Any, rows: Sequence[int] | range, batch_size: int, collate=None, *, num_workers: int = 0, prefetch: int = 2) -> Iterator[Any]:
    """Collated batches of ``dataset[rows]`` in order (tensor data sets sliced, others prefetched by a thread)."""
    from gradindex.featurize._loading import iter_batches as _iter_batches

    yield from _iter_batches(dataset, rows, batch_size, collate, num_workers=num_workers, prefetch=prefetch)


class Featurizer(ABC):
    """A batch -> ``[B, dim]`` float32 vectors. Built identically at build and at query time."""

    dim: int

    @abstractmethod
    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, dim]."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Method, projection and parameters that fix what the vectors mean (recorded in the manifest)."""

    def attach(self, store: Any) -> None:
        """Load (or compute and write) what the featurizer keeps in the store's ``transforms/``; called by every
        build worker before its first shard and by every query before its first batch."""


class TracInFeaturizer(Featurizer):
    """TracIn-CP: φ(z) = concat_c √η_c · P_c ∇ℓ(z; θ_c), optionally unit-normalised per checkpoint block."""

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[LoadedCheckpoint],
        *,
        projection: ProjectionSpec,
        layers: Sequence[str] | None = None,
        normalize: bool = False,
        device: torch.device = torch.device("cpu"),
        chunk_bytes: int = 256 << 20,
        autocast: bool = False,
        compile: bool = False,
    ):
        """``chunk_bytes`` bounds the working memory of one chunk of samples (the batch is cut into chunks);
        ``autocast`` runs forward/backward in bfloat16 on CUDA (ignored on CPU; projections stay float32);
        ``compile`` applies ``torch.compile`` to the kron projection kernels."""
        self.task = task
        self.checkpoints = list(checkpoints)
        self.device = device
        self.normalize = normalize
        self.layers = list(layers) if layers else None
        model = task.model().to(device)
        self.model_fingerprint = model_fingerprint(model)
        self.param_names = select_parameters(model, self.layers)
        shapes = dict(model.named_parameters())
        self.plans = ParamPlan.layout([(name, shapes[name].shape) for name in self.param_names])
        self.n_params = sum(plan.numel for plan in self.plans)
        self.projection = projection
        self.chunk_bytes = chunk_bytes
        self._scales = [math.sqrt(ckpt.spec.weight) for ckpt in self.checkpoints]
        if projection.kind == "kron":
            # per-sample gradients are never formed: a batched forward/backward per chunk, sized on the first one
            self.kron: KronGradients | None = KronGradients(
                model, task.loss, self.param_names, projection, device, autocast=autocast, compile=compile, plan=projection.plan
            )
            self._states = [(ckpt.state, {}) for ckpt in self.checkpoints]
            if projection.plan is None and self.kron.needs_calibration:
                self._calibrate(projection.kron_sides or KRON_SIDES)
            self.block_dim = self.kron.dim
            self.chunk_size = 0  # unknown until a first chunk has been measured
        else:
            self.kron = None
            self.gradients = PerSampleGradients(model, task.loss, self.param_names)
            self.projector = make_projector(projection, self.plans)
            self.block_dim = self.projector.out_dim
            self._states = [self.gradients.split_state(ckpt.state) for ckpt in self.checkpoints]
            # bound the [chunk, p] gradient buffer (vmap holds a few of them)
            self.chunk_size = max(1, chunk_bytes // (4 * 3 * max(1, self.n_params)))
        self.dim = self.block_dim * len(self.checkpoints)

    def _calibrate(self, sides: str) -> None:
        """Plan kron from what the gradients look like on the first ``CALIBRATION_SAMPLES`` training samples
        (dataset order) at every checkpoint, so that k goes where the gradients are (see ``plan_kron``); with
        ``pca`` sides, a second pass over the same samples gives each narrow side its top directions.

        The JL variance of a TracIn-CP score is about Σ_l Σ_c η_c² E_lc² v_l (E_lc: the mean squared per-sample
        gradient norm of group l at checkpoint c, v_l its projection's relative variance), so each group's
        energy counts as √(Σ_c η_c² E_lc²); with ``normalize`` each checkpoint's energies count relative to
        their total. Only a build calibrates: the plan is recorded in the manifest and the pca matrices in the
        store's ``transforms/kron_sides``, and every later use (queries, resumed or parallel workers, appends)
        reads them from there (``attach``).
        """
        rows = self._calibration_rows()
        if not len(rows):
            return
        contributions = []
        for (params, _), ckpt in zip(self._states, self.checkpoints):
            sums = None
            for batch in iter_batches(self.task.train, rows, 32, self.task.collate, prefetch=0):
                found = self.kron.energies(to_device(batch, self.device), params)
                sums = found if sums is None else [a + b for a, b in zip(sums, found)]
            energies = [value / len(rows) for value in sums]
            total = sum(energies) if self.normalize else 1.0
            contributions.append([ckpt.spec.weight * value / total if total > 0 else 0.0 for value in energies])
        self.kron.replan([math.sqrt(sum(row[group] ** 2 for row in contributions)) for group in range(len(contributions[0]))], sides=sides)
        self._calibrate_pca()

    def _calibration_rows(self) -> range:
        return range(min(CALIBRATION_SAMPLES, len(self.task.train)))

    def _calibrate_pca(self) -> None:
        """Each checkpoint's pca side matrices, for the plan in place, from the calibration samples. The float64
        ``[width, width]`` moments are gathered a group of sides at a time, each group within ``chunk_bytes`` (one
        more pass over the calibration samples per group), so wide models stay within the featurization budget."""
        groups = self.kron.pca_groups(self.chunk_bytes)
        rows = self._calibration_rows()
        for position, (params, _) in enumerate(self._states):
            for group in groups:
                moments: dict = {}
                keys = {(name, side) for name, side, _, _ in group}
                for batch in iter_batches(self.task.train, rows, 32, self.task.collate, prefetch=0):
                    self.kron.side_moments(to_device(batch, self.device), params, moments, keys)
                for name, side, width, k in group:
                    moment = moments.get((name, side))  # None: the module never ran
                    self.kron.set_pca_matrix(position, name, side, pca_side_matrix(torch.zeros(width, width) if moment is None else moment, k))

    def _pca_layout(self) -> list[tuple[int, str, str, int, int]]:
        """``(checkpoint, layer, side, width, k)`` of every pca matrix, in the order ``transforms/kron_sides`` packs them."""
        return [(position, *shape) for position in range(len(self.checkpoints)) for shape in self.kron.pca_shapes()]

    def attach(self, store: Any) -> None:
        """Use the store's pca side matrices (``transforms/kron_sides``): the builder writes its own there first (the
        first writer wins when several workers race); a worker joining before that calibrates and races too. Every
        process, the builder included, then reads the store's copy, so every vector of the store and every query
        vector uses the same matrices. A complete store without them is damaged (nothing is recomputed for a query)."""
        if self.kron is None or not self.kron.pca_shapes():
            return
        layout = self._pca_layout()
        if KRON_SIDES_TRANSFORM not in store.transforms():
            if store.complete:
                raise CorruptStoreError(
                    f"store {store.path} was built with pca kron sides but holds no transforms/{KRON_SIDES_TRANSFORM}; "
                    "rebuild it with --overwrite"
                )
            if any(self.kron.pca_matrix(c, name, side) is None for c, name, side, _, _ in layout):
                self._calibrate_pca()
            packed = np.concatenate([self.kron.pca_matrix(c, name, side).cpu().numpy().reshape(-1) for c, name, side, _, _ in layout])
            store.write_transform(KRON_SIDES_TRANSFORM, packed.astype(np.float32), exclusive=True)
        packed = store.read_transform(KRON_SIDES_TRANSFORM)
        expected = sum(width * k for _, _, _, width, k in layout)
        if packed.dtype != np.float32 or packed.shape != (expected,):
            raise CorruptStoreError(
                f"store {store.path}'s transforms/{KRON_SIDES_TRANSFORM} holds {packed.dtype} {list(packed.shape)}, but its kron plan "
                f"needs float32 [{expected}]; rebuild it with --overwrite"
            )
        offset = 0
        for c, name, side, width, k in layout:
            self.kron.set_pca_matrix(c, name, side, torch.from_numpy(packed[offset : offset + width * k].copy()).reshape(width, k))
            offset += width * k

    def fingerprint(self) -> dict:
        projection = self.projection.to_dict()
        if projection["kind"] == "none":
            projection["dim"] = self.block_dim
        if self.kron is not None:
            projection["plan"] = self.kron.plan_dict()
        return {
            "method": {"name": "tracin", "normalize": self.normalize},
            "projection": projection,
            "layers": self.layers,
            "params": [[plan.name, list(plan.shape)] for plan in self.plans],
            "block_dim": self.block_dim,
        }

    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, C·k]."""
        size = _batch_size(batch)
        out = torch.empty(size, self.dim, dtype=torch.float32, device=self.device)
        return self.featurize_into(batch, out)

    def featurize_into(self, batch: Any, out: Tensor) -> Tensor:
        """collated batch of B samples -> ``out`` [B, C·k] (a preallocated float32 buffer, on any device)."""
        batch = to_device(batch, self.device)
        size = _batch_size(batch)
        start = 0
        while start < size:
            if self.chunk_size == 0:  # kron: measure the memory of a small first chunk, then size chunks to the budget
                stop = min(size, 8)
            else:
                stop = min(size, start + self.chunk_size)
            chunk = torch.utils._pytree.tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) else t, batch)
            for position, ((params, constants), scale) in enumerate(zip(self._states, self._scales)):
                if self.kron is not None:
                    block = self.kron(chunk, params, position)
                else:
                    block = self.projector.project(self.gradients(chunk, params, constants), position)
                if self.normalize:
                    block = torch.nn.functional.normalize(block, dim=1)
                out[start:stop, position * self.block_dim : (position + 1) * self.block_dim] = block * scale
            if self.chunk_size == 0 and self.kron is not None:
                self.chunk_size = max(1, min(1 << 16, self.chunk_bytes // max(1, self.kron.bytes_per_sample)))
            start = stop
        return out

    def batch_size_hint(self) -> int:
        """A loader batch size that fits the working-memory budget (known once a first chunk ran, else a guess)."""
        return max(16, min(self.chunk_size or 1024, 4096))


def _batch_size(batch: Any) -> int:
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(batch) if isinstance(leaf, Tensor)]
    if not leaves:
        raise ValueError("a batch holds no tensors; the task's collate must return tensors")
    return int(leaves[0].shape[0])


def labels_of(batch: Any) -> np.ndarray | None:
    """The targets of a collated ``(input, target, ...)`` batch as numpy, when they are per-sample scalars."""
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], Tensor) and batch[1].ndim == 1:
        return batch[1].detach().cpu().numpy()
    return None
