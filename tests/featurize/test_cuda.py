"""Featurization on CUDA (skipped without a CUDA GPU): a build on the GPU gives the CPU build's vectors and answers,
with bfloat16 autocast close to them, and torch.compile's kernels equal to the eager ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_tasks import TINY

import gradindex

pytestmark = pytest.mark.gpu

MLP = f"{TINY}:mlp_task"
CNN = f"{TINY}:cnn_task"


def _build(task, checkpoints, path, **options):
    return gradindex.build(task, checkpoints, path, proj_dim=32, dtype="float32", progress=False, **options)


def _cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left, right = left.astype(np.float64), right.astype(np.float64)
    norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    return (left * right).sum(1) / np.maximum(norms, 1e-30)


@pytest.mark.parametrize("projection", ["kron", "rademacher", "none"])
def test_a_cuda_build_gives_the_cpu_builds_vectors_and_answers(tmp_path, mlp_checkpoints, projection):
    cpu = _build(MLP, mlp_checkpoints, tmp_path / "cpu.gradindex", projection=projection, device="cpu")
    gpu = _build(MLP, mlp_checkpoints, tmp_path / "gpu.gradindex", projection=projection, device="cuda")
    np.testing.assert_allclose(gpu.read_features(), cpu.read_features(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(gpu.self_influence()[1], cpu.self_influence()[1], rtol=1e-3, atol=1e-5)
    on_cpu = gradindex.query(cpu, samples="0-9", k=5, device="cpu")
    on_gpu = gradindex.query(gpu, samples="0-9", k=5, device="cuda")
    assert on_gpu.column("row").to_pylist() == on_cpu.column("row").to_pylist()


def test_a_cuda_build_of_a_convolutional_model_gives_the_cpu_builds_vectors(tmp_path, cnn_checkpoints):
    cpu = _build(CNN, cnn_checkpoints, tmp_path / "cpu.gradindex", device="cpu")
    gpu = _build(CNN, cnn_checkpoints, tmp_path / "gpu.gradindex", device="cuda")
    np.testing.assert_allclose(gpu.read_features(), cpu.read_features(), rtol=1e-3, atol=1e-5)


def test_bfloat16_autocast_stays_close_to_float32(tmp_path, mlp_checkpoints):
    exact = _build(MLP, mlp_checkpoints, tmp_path / "cpu.gradindex", device="cpu")
    autocast = _build(MLP, mlp_checkpoints, tmp_path / "bf16.gradindex", device="cuda", autocast=True)
    # bfloat16 keeps 8 bits of mantissa: each vector points the same way to within a few parts in a thousand
    assert _cosines(autocast.read_features(), exact.read_features()).min() > 0.99


def test_compiled_kron_kernels_equal_the_eager_ones(tmp_path, mlp_checkpoints):
    eager = _build(MLP, mlp_checkpoints, tmp_path / "eager.gradindex", device="cuda")
    compiled = _build(MLP, mlp_checkpoints, tmp_path / "compiled.gradindex", device="cuda", compile=True)
    np.testing.assert_allclose(compiled.read_features(), eager.read_features(), rtol=1e-4, atol=1e-6)


def test_each_torchrun_rank_builds_on_its_own_gpu(monkeypatch):
    from gradindex.featurize import resolve_device
    from gradindex.pipeline import rank_device

    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    assert resolve_device(rank_device("auto")) == torch.device("cuda", last)
    assert resolve_device(rank_device("cuda")) == torch.device("cuda", last)
