from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

import tiny_tasks  # noqa: E402

TINY = str(TESTS / "tiny_tasks.py")


@pytest.fixture
def mlp_checkpoints(tmp_path):
    (tmp_path / "mlp-ckpts").mkdir()
    return tiny_tasks.save_checkpoints(tiny_tasks.mlp, tmp_path / "mlp-ckpts")


@pytest.fixture
def cnn_checkpoints(tmp_path):
    (tmp_path / "cnn-ckpts").mkdir()
    return tiny_tasks.save_checkpoints(tiny_tasks.cnn, tmp_path / "cnn-ckpts", weights=(0.3, 2.0))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def dask_client():
    """A local Dask cluster of two single-threaded worker processes (one per test module that asks for it)."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()
