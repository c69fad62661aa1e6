"""TracIn-CP (Pruthi et al. 2020): φ(z) = concat_c √η_c · P_c ∇ℓ(z; θ_c), the sum over checkpoints of learning-rate
weighted gradient dot products as one inner product.

With the default ``kron`` projection the per-sample gradients are never formed (``gradindex.featurize``'s factored
engine), and the projection is planned on calibration samples (the first ``CALIBRATION_SAMPLES`` of the training
set): the plan is recorded in the manifest and the pca side matrices kept in the store's ``transforms/kron_sides``.

``adam_normalize`` is TrackStar's optimizer correction (Chang et al. 2024): each checkpoint's gradients are divided
by √v̂ + ε, v̂ the Adam second moment its optimizer state holds (``gradindex.checkpoints.load_optimizer_moments``),
elementwise before a dense projection, or through Adafactor's rank-1 factors of each layer's v̂ folded into the kron
sides (``KronGradients.normalize_by``); with ``normalize`` (and ``precondition_side=both``) it is TrackStar's score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradindex.checkpoints import OptimizerMoments, load_optimizer_moments
from gradindex.errors import CheckpointError, CorruptStoreError, NonFiniteError
from gradindex.featurize import (
    Featurizer,
    KronGradients,
    LoadedCheckpoint,
    PerSampleGradients,
    model_fingerprint,
    select_parameters,
)
from gradindex.projection import (
    REST_SIDE,
    ParamPlan,
    ProjectionSpec,
    SideEigen,
    SideSketch,
    exact_side_eigen,
    flat_spectrum,
    make_projector,
    mix_spectra,
    pca_flat_matrix,
    pca_side_matrix,
    sketch_rank,
)
from gradindex.task import Task, batch_size, iter_batches, slice_batch, to_device
from gradindex.utils import check_fits

__all__ = ["CALIBRATION_SAMPLES", "KRON_SIDES_TRANSFORM", "TracInFeaturizer"]

# the kron plan's calibration: the first samples of the training set (up to CALIBRATION_SAMPLES, fewer where a sample
# holds many positions: enough for CALIBRATION_POSITIONS tokens or patches, never under CALIBRATION_MIN_SAMPLES), and
# how narrow sides are drawn by default. A calibration sample costs ~1.4 training steps of it (its forward, backward,
# side moments and sketches, exact gradient energies): at context 128, 128 sequences were 43% of a 256-sequence LM's
# build, so long samples calibrate on 8,192 positions (64 sequences), ample for the top ~100 directions of a side
CALIBRATION_SAMPLES = 256
CALIBRATION_POSITIONS = 8192
CALIBRATION_MIN_SAMPLES = 64
KRON_SIDES = "pca"
# the store transform that keeps the pca side matrices of a kron build (every checkpoint's, packed flat)
KRON_SIDES_TRANSFORM = "kron_sides"
# kron sizes its chunks on this many first training samples (the same in every process)
_PROBE_SAMPLES = 8
# calibration samples per forward/backward: 32, or up to 256 while they hold at most this many positions in all
_CALIBRATION_BATCH_POSITIONS = 4096
# a CPU featurizes batches of at most this much working memory (~1,000 rows of an MLP 784-512-512-10), or of 256
# samples where that is more: memory a batch frees is reused by the next, warm in cache, where a large batch's fresh
# pages can cost more than the compute done on them (4,096-row batches made a process's first build of that MLP ~9%
# slower); fewer than 256 rows left wide layers' products short (an MLP 1024-4096-4096-10 ~20% slower at 190). A GPU
# keeps chunk_bytes
_CPU_BATCH_BYTES = 32 << 20
# the kron groups projected flat (their calibration vectors kept, not their moments): small layers, the rest
_FLAT = ("flat", REST_SIDE[1])


def _decompose(key: tuple[str, str], value: Any, width: int) -> Any:
    """What calibration keeps of one side: a sketch's or a formed moment's eigenpairs (``SideEigen``), a flat group's
    calibration vectors ``[n, width]`` and a diagonal moment ``[width]`` as they are; None (the module never ran)
    as the zero moment's."""
    if isinstance(value, SideSketch):
        return value.eigen()
    if key[1] in _FLAT:
        return torch.zeros(1, width, dtype=torch.float64) if value is None else value
    if value is None:
        value = torch.zeros(width, width, dtype=torch.float64)
    return value if value.ndim == 1 else exact_side_eigen(value)


def _spectrum(key: tuple[str, str], value: Any) -> list[float]:
    """A kept side's eigenvalues, largest first (see ``_decompose``)."""
    if isinstance(value, SideEigen):
        return value.spectrum()
    return (flat_spectrum(value) if key[1] in _FLAT else value).tolist()


def _covers(value: Any, shape: tuple) -> bool:
    """Whether a kept side gives its pca matrix of ``shape`` (``(layer, side, width, k)``): a sketch must keep k and
    half as many again (its last directions are the least accurate)."""
    if value is None:
        return False
    if isinstance(value, SideEigen):
        return value.rank == value.width or value.rank >= sketch_rank(value.width, 0, shape[3])
    return True


def _side_matrix(value: Any, side: str, width: int, k: int) -> Tensor:
    """The ``[width, k]`` pca matrix of a kept side."""
    if side in _FLAT:
        return pca_flat_matrix(value, k)
    if isinstance(value, SideEigen):
        return value.matrix(k)
    return pca_side_matrix(value, k)  # a diagonal moment: token indicators


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
        nonfinite: str = "error",
        adam_normalize: bool = False,
    ):
        """``chunk_bytes`` bounds the working memory of one chunk of samples (the batch is cut into chunks);
        ``autocast`` runs forward/backward in bfloat16 on CUDA (ignored on CPU; projections stay float32);
        ``compile`` applies ``torch.compile`` to the kron projection kernels; ``nonfinite`` says what the kron
        calibration does with a sample whose gradient is NaN or infinite (``error`` stops, ``skip``/``zero`` leave
        it out of the calibration); ``adam_normalize`` divides each checkpoint's gradients by the Adam second moments
        its optimizer state holds before they are projected (TrackStar; ``_adam_moments``)."""
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
        self.nonfinite = nonfinite  # calibration samples with NaN/inf gradients: stop (error), or leave them out
        self._calibration: list[int] | None = None
        self._positions = 1  # the most positions a training sample has in a factored layer (calibration sizes)
        self._scales = [math.sqrt(ckpt.spec.weight) for ckpt in self.checkpoints]
        self.adam_normalize = adam_normalize
        moments = self._adam_moments(model) if adam_normalize else []
        if projection.kind == "kron":
            # per-sample gradients are never formed: a batched forward/backward per chunk, sized on the first one
            self.kron: KronGradients | None = KronGradients(
                model,
                task.loss,
                self.param_names,
                projection,
                device,
                autocast=autocast,
                compile=compile,
                plan=projection.plan,
            )
            self._states = [(ckpt.state, {}) for ckpt in self.checkpoints]
            for position, found in enumerate(moments):
                self.kron.normalize_by(position, found.moments, found.eps)
            if projection.plan is None and self.kron.needs_calibration:
                self._calibrate(projection.kron_sides or KRON_SIDES)
            self.block_dim = self.kron.dim
            self.chunk_size = 0  # unknown until the probe has been measured (_measure_chunks)
        else:
            self.kron = None
            self.gradients = PerSampleGradients(model, task.loss, self.param_names)
            self.projector = make_projector(projection, self.plans)
            self.block_dim = self.projector.out_dim
            self._states = [self.gradients.split_state(ckpt.state) for ckpt in self.checkpoints]
            # Adam's exact elementwise 1 / (√v̂ + ε), in the gradients' layout, per checkpoint
            self._adam_scales = [
                torch.cat([(1.0 / found.denominator(plan.name)).reshape(-1) for plan in self.plans]).to(device)
                for found in moments
            ]
            # one sample: vmap holds about three [p] gradient buffers, its [k] output per checkpoint and the
            # projection's own block (at least one [k] row of a dense matrix)
            per_sample = 4 * (3 * self.n_params + self.block_dim * len(self.checkpoints))
            matrix = 4 * self.block_dim if projection.kind in ("rademacher", "gaussian") else 0
            check_fits(
                f"featurizing one sample ({self.n_params:,} parameters, proj_dim={projection.dim})",
                per_sample + matrix,
                chunk_bytes,
                "the featurization memory",
                "lower proj_dim, featurize fewer layers (layers=GLOB), use projection=kron, or raise "
                "featurize_memory=SIZE",
            )
            self.chunk_size = max(1, chunk_bytes // per_sample)
        self.dim = self.block_dim * len(self.checkpoints)

    def _adam_moments(self, model: torch.nn.Module) -> list[OptimizerMoments]:
        """Each checkpoint's Adam second moments (``gradindex.checkpoints.load_optimizer_moments``), every featurized
        parameter's present; their files' sha256 go into the fingerprint (a query must read the same ones)."""
        found = []
        for ckpt in self.checkpoints:
            moments = load_optimizer_moments(model, ckpt.spec.path)
            missing = [name for name in self.param_names if name not in moments.moments]
            if missing:
                raise CheckpointError(
                    f"checkpoint {ckpt.spec.path}'s optimizer state holds no second moment for "
                    f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (not optimized, or no step taken); "
                    "featurize only the optimized parameters (layers=GLOB) or build without adam_normalize"
                )
            found.append(moments)
        self.optimizer_sha256 = [moments.sha256 for moments in found]
        return found

    def _calibrate(self, sides: str) -> None:
        """Plan kron from what the gradients look like on the first ``CALIBRATION_SAMPLES`` training samples
        (dataset order) at every checkpoint, so that k goes where the gradients are (see ``plan_kron``); with
        ``pca`` sides, the same pass over those samples gathers each side's statistics (a formed moment for narrow
        sides, a ``SideSketch`` for wide ones), whose top eigenpairs give the plan its spectra and each narrow side
        its top directions.

        The JL variance of a TracIn-CP score is about Σ_l Σ_c η_c² E_lc² v_l (E_lc: the mean squared per-sample
        gradient norm of group l at checkpoint c, v_l its projection's relative variance), so each group's
        energy counts as √(Σ_c η_c² E_lc²); with ``normalize`` each checkpoint's energies count relative to
        their total. Only a build calibrates: the plan is recorded in the manifest and the pca matrices in the
        store's ``transforms/kron_sides``, and every later use (queries, resumed or parallel workers, appends)
        reads them from there (``attach``).
        """
        rows = self._calibration_rows()
        if not rows:
            return
        shapes = self.kron.spectrum_shapes(len(rows)) if sides == "pca" else []
        found: dict[int, dict] = {}
        contributions = []
        for position, ((params, _), ckpt) in enumerate(zip(self._states, self.checkpoints)):
            energies = self._gather(position, params, shapes, found.setdefault(position, {}), rows)
            total = sum(energies) if self.normalize else 1.0
            contributions.append([ckpt.spec.weight * value / total if total > 0 else 0.0 for value in energies])
        energies = [math.sqrt(sum(row[group] ** 2 for row in contributions)) for group in range(len(contributions[0]))]
        spectra = self._spectra(contributions, found) if sides == "pca" else None
        self.kron.replan(energies, sides=sides, spectra=spectra)
        self._calibrate_pca(found)

    def _gather(
        self, position: int, params: dict, shapes: Sequence[tuple], found: dict, rows: list[int] | None = None
    ) -> list[float]:
        """One checkpoint's side statistics of ``shapes`` (``(layer, side, width[, k])``), decomposed into ``found``
        (``_decompose``), in as few passes over the calibration samples as ``chunk_bytes`` allows (one, unless the
        formed moments and sketches do not fit together). With ``rows`` (the calibration rows, planning) the first
        pass also sums the groups' energies and finds rows whose gradients are NaN or infinite; their mean energies
        are returned (else [])."""
        ranks = self.kron.sketch_ranks(shapes)
        groups = self.kron.moment_groups(shapes, self.chunk_bytes, ranks) or [[]]
        sums, counted = None, 0
        for number, group in enumerate(groups):
            stats: dict = {
                (name, side): self.kron.new_sketch(position, (name, side), width, ranks[(name, side)])
                for name, side, width, *_ in group
                if (name, side) in ranks
            }
            keys = {(name, side) for name, side, *_ in group}
            planning = rows is not None and number == 0
            batch_rows = rows if planning else self._calibration_rows()
            step = max(32, min(256, _CALIBRATION_BATCH_POSITIONS // self._positions))
            for start in range(0, len(batch_rows), step):
                chunk = batch_rows[start : start + step]
                if planning:
                    result = self._finite_batch(chunk, params, position, stats, keys)
                    if result is None:
                        continue
                    energies, size = result
                    sums = energies if sums is None else [a + b for a, b in zip(sums, energies)]
                    counted += size
                else:
                    self.kron.side_moments(self._calibration_batch(chunk), params, stats, keys)
            for name, side, width, *_ in group:
                found[(name, side)] = _decompose((name, side), stats.get((name, side)), width)
        if rows is None:
            return []
        if sums is None:
            raise NonFiniteError(
                f"every calibration sample's gradient is NaN or infinite at checkpoint {position}; "
                "fix the data or the checkpoint"
            )
        return [value / counted for value in sums]

    def _spectra(self, contributions: list[list[float]], found: dict[int, dict]) -> list:
        """Each group's spectra for the pca plan (``plan_kron``): the eigenvalues of every side's calibration moment
        at each checkpoint (a sketched side: its top eigenvalues, the rest of its trace spread over the other
        directions), mixed over the checkpoints by their share of the group's energy (``contributions``)."""
        eigenvalues = [
            {key: _spectrum(key, value) for key, value in found.get(position, {}).items()}
            for position in range(len(self.checkpoints))
        ]
        layers, rest, _ = self.kron._groups
        spectra: list = []
        for group, layer in enumerate(layers):
            weights = [row[group] for row in contributions]
            sides = ("flat",) if any((layer.name, "flat") in eigen for eigen in eigenvalues) else ("in", "out")
            spectra.append(
                {side: mix_spectra([eigen.get((layer.name, side)) for eigen in eigenvalues], weights) for side in sides}
            )
        if rest:
            weights = [row[-1] for row in contributions]
            spectra.append({"flat": mix_spectra([eigen.get(REST_SIDE) for eigen in eigenvalues], weights)})
        return spectra

    def _calibration_rows(self) -> list[int]:
        """The training rows the plan is calibrated on: the first ``CALIBRATION_SAMPLES`` (fewer for samples of many
        positions, see ``CALIBRATION_POSITIONS``), less any whose gradients were found NaN or infinite (``nonfinite``
        skip or zero; with error they stop the build)."""
        if self._calibration is None:
            count = min(CALIBRATION_SAMPLES, len(self.task.train))
            if count:  # side moments count positions: a long sequence brings many
                self._positions = self.kron.positions_per_sample(self._calibration_batch([0]), self._states[0][0])
            if count > CALIBRATION_MIN_SAMPLES:
                count = min(count, max(CALIBRATION_MIN_SAMPLES, -(-CALIBRATION_POSITIONS // self._positions)))
            self._calibration = list(range(count))
        return self._calibration

    def _calibration_batch(self, rows: Sequence[int]) -> Any:
        """The collated batch of training ``rows`` on the featurizer's device (consecutive rows are sliced)."""
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        wanted = range(rows[0], rows[0] + len(rows)) if consecutive else list(rows)
        batch = next(iter(iter_batches(self.task.train, wanted, len(rows), self.task.collate, prefetch=0)))
        return to_device(batch, self.device)

    def _finite_batch(
        self, rows: list[int], params: dict, checkpoint: int, stats: dict, keys: set
    ) -> tuple[list[float], int] | None:
        """The summed group energies of calibration ``rows`` and how many rows they count, their side statistics
        (``keys``) added into ``stats`` from the same pass; rows whose gradients are NaN or infinite are found one by
        one and left out of the calibration (their statistics too: ``calibrate_batch`` adds none for a batch with a
        non-finite energy), or stop the build (``nonfinite``)."""
        found = self.kron.calibrate_batch(self._calibration_batch(rows), params, stats, keys)
        if all(math.isfinite(value) for value in found):  # (statistics are added only then)
            return found, len(rows)
        bad = [
            row
            for row in rows
            if not all(math.isfinite(value) for value in self.kron.energies(self._calibration_batch([row]), params))
        ]
        if self.nonfinite == "error":
            ids = self.task.train_sample_ids()
            raise NonFiniteError(
                f"the gradients of training rows {bad[:10]} (sample ids {[ids[row] for row in bad[:10]]}) are NaN or "
                f"infinite at checkpoint {checkpoint}, among the samples the kron projection is calibrated on; fix "
                "the data or the model, or build with nonfinite=skip (leave such samples out of search) or "
                "nonfinite=zero (keep them as zero vectors)"
            )
        self._calibration = [row for row in self._calibration if row not in set(bad)]
        good = [row for row in rows if row not in set(bad)]
        if not good:
            return None
        return self.kron.calibrate_batch(self._calibration_batch(good), params, stats, keys), len(good)

    def _calibrate_pca(self, found: dict[int, dict] | None = None) -> None:
        """Each checkpoint's pca side matrices (and the rest's pca matrix), for the plan in place, from the calibration
        samples: from the decompositions the planning pass ``found`` when they keep enough directions (a sketch: k
        and half as many again), else from another pass over the calibration samples for the sides still missing
        (sketched to their k now known)."""
        shapes = self.kron.pca_shapes()
        for position, (params, _) in enumerate(self._states):
            ready = dict((found or {}).get(position, {}))
            missing = [shape for shape in shapes if not _covers(ready.get(shape[:2]), shape)]
            if missing:
                self._gather(position, params, missing, ready)
            for name, side, width, k in shapes:
                matrix = _side_matrix(ready[(name, side)], side, width, k)
                self.kron.set_pca_matrix(position, name, side, matrix)

    def _pca_layout(self) -> list[tuple[int, str, str, int, int]]:
        """``(checkpoint, layer, side, width, k)`` of every pca matrix, in the order ``transforms/kron_sides`` packs
        them."""
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
                    "rebuild it with overwrite=True"
                )
            if any(self.kron.pca_matrix(c, name, side) is None for c, name, side, _, _ in layout):
                self._calibrate_pca()
            packed = np.concatenate(
                [self.kron.pca_matrix(c, name, side).cpu().numpy().reshape(-1) for c, name, side, _, _ in layout]
            )
            store.write_transform(KRON_SIDES_TRANSFORM, packed.astype(np.float32), exclusive=True)
        packed = store.read_transform(KRON_SIDES_TRANSFORM)
        expected = sum(width * k for _, _, _, width, k in layout)
        if packed.dtype != np.float32 or packed.shape != (expected,):
            raise CorruptStoreError(
                f"store {store.path}'s transforms/{KRON_SIDES_TRANSFORM} holds {packed.dtype} {list(packed.shape)}, "
                "but its kron plan "
                f"needs float32 [{expected}]; rebuild it with overwrite=True"
            )
        offset = 0
        for c, name, side, width, k in layout:
            self.kron.set_pca_matrix(
                c, name, side, torch.from_numpy(packed[offset : offset + width * k].copy()).reshape(width, k)
            )
            offset += width * k

    def fingerprint(self) -> dict:
        projection = self.projection.to_dict()
        if projection["kind"] == "none":
            projection["dim"] = self.block_dim
        if self.kron is not None:
            projection["plan"] = self.kron.plan_dict()
        found = {
            "method": {"name": "tracin", "normalize": self.normalize},
            "projection": projection,
            "layers": self.layers,
            "params": [[plan.name, list(plan.shape)] for plan in self.plans],
            "block_dim": self.block_dim,
        }
        if self.adam_normalize:  # (left out otherwise: stores built before the option keep their fingerprint)
            found["method"]["adam_normalize"] = True
            found["optimizer_state"] = list(self.optimizer_sha256)
        return found

    def featurize(self, batch: Any) -> Tensor:
        """collated batch of B samples -> [B, C·k]."""
        size = batch_size(batch)
        out = torch.empty(size, self.dim, dtype=torch.float32, device=self.device)
        return self.featurize_into(batch, out)

    def featurize_into(self, batch: Any, out: Tensor) -> Tensor:
        """collated batch of B samples -> ``out`` [B, C·k] (a preallocated float32 buffer, on any device)."""
        batch = to_device(batch, self.device)
        size = batch_size(batch)
        if self.chunk_size == 0:
            self._measure_chunks()
        for start in range(0, size, self.chunk_size):
            stop = min(size, start + self.chunk_size)
            chunk = slice_batch(batch, start, stop)
            for position, ((params, constants), scale) in enumerate(zip(self._states, self._scales)):
                view = out[start:stop, position * self.block_dim : (position + 1) * self.block_dim]
                if self.kron is not None and view.device == self.device:
                    # written straight into the output's columns, scaled there (normalized first, in place)
                    self.kron(chunk, params, position, out=view, scale=1.0 if self.normalize else scale)
                    if self.normalize:
                        view.div_(view.norm(dim=1, keepdim=True).clamp_(min=1e-12))
                        if scale != 1.0:
                            view.mul_(scale)
                    continue
                if self.kron is not None:
                    block = self.kron(chunk, params, position)
                else:
                    gradients = self.gradients(chunk, params, constants)
                    if self.adam_normalize:
                        gradients = gradients * self._adam_scales[position]
                    block = self.projector.project(gradients, position)
                if self.normalize:
                    block = torch.nn.functional.normalize(block, dim=1)
                view.copy_(block * scale if scale != 1.0 else block)
        return out

    def _measure_chunks(self) -> None:
        """Size kron's chunks from the working memory of a fixed probe: the first (at most 8) training samples.

        Every process measures the same probe, so chunk boundaries (and the loader's batches, see ``batch_size_hint``)
        fall on the same rows whichever worker featurizes a shard; matrix products of another batch shape may round
        differently, and a store's bytes must not depend on which worker wrote them."""
        rows = range(min(_PROBE_SAMPLES, len(self.task.train)))
        if len(rows):
            probe = next(iter(iter_batches(self.task.train, rows, len(rows), self.task.collate, prefetch=0)))
            with torch.enable_grad():
                self.kron(to_device(probe, self.device), self._states[0][0], 0)
        self.chunk_size = max(1, min(1 << 16, self.chunk_bytes // max(1, self.kron.bytes_per_sample)))

    def batch_size_hint(self) -> int:
        """A loader batch size that fits the working-memory budget (kron: measured on the probe first); on a CPU, one
        of at most ``_CPU_BATCH_BYTES`` of working memory, or 256 samples where that is less."""
        if self.chunk_size == 0:
            self._measure_chunks()
        size = self.chunk_size
        if self.device.type == "cpu" and self.kron is not None and self.kron.bytes_per_sample:
            size = min(size, max(256, _CPU_BATCH_BYTES // self.kron.bytes_per_sample))
        return max(16, min(size, 4096))
