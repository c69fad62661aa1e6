"""TracIn-CP vectors against their definition: a plain loop of per-sample backward() calls."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_tasks
import torch
from scipy.stats import spearmanr
from torch import nn

import gradindex
from gradindex.checkpoints import parse_checkpoints
from gradindex.featurize import load_checkpoints
from gradindex.methods import TracInFeaturizer
from gradindex.projection import ProjectionSpec


def _loop_reference(task, specs, rows) -> torch.Tensor:
    """concat_c √η_c ∇ℓ(z; θ_c) by one backward() per sample and checkpoint: the trusted slow path."""
    vectors = []
    for row in rows:
        inputs, target = task.train[row]
        blocks = []
        for spec in specs:
            model = task.model()
            model.load_state_dict(torch.load(spec.path))
            model.eval()
            model.zero_grad()
            nn.functional.cross_entropy(model(inputs.unsqueeze(0)), target.unsqueeze(0)).backward()
            blocks.append(torch.cat([param.grad.flatten() for param in model.parameters()]) * spec.weight**0.5)
        vectors.append(torch.cat(blocks))
    return torch.stack(vectors)


def _featurizer(task, checkpoint_specs, **options):
    specs = parse_checkpoints(checkpoint_specs)
    return TracInFeaturizer(task, load_checkpoints(task, specs, torch.device("cpu")), **options), specs


@pytest.mark.parametrize("task_name", ["mlp", "cnn"])
def test_identity_tracin_equals_backward_loop(task_name, mlp_checkpoints, cnn_checkpoints):
    task = tiny_tasks.mlp_task() if task_name == "mlp" else tiny_tasks.cnn_task()
    checkpoints = mlp_checkpoints if task_name == "mlp" else cnn_checkpoints
    featurizer, specs = _featurizer(task, checkpoints, projection=ProjectionSpec(kind="none"))
    rows = list(range(10))
    inputs = torch.stack([task.train[row][0] for row in rows])
    targets = torch.stack([task.train[row][1] for row in rows])
    fast = featurizer.featurize((inputs, targets))
    slow = _loop_reference(task, specs, rows)
    assert fast.shape == slow.shape == (10, featurizer.dim)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    # the TracIn-CP score is the weighted sum of per-checkpoint gradient dot products
    torch.testing.assert_close(fast @ fast.T, slow @ slow.T, rtol=1e-4, atol=1e-5)


def test_chunking_does_not_change_vectors(mlp_checkpoints):
    task = tiny_tasks.mlp_task()
    whole, _ = _featurizer(task, mlp_checkpoints, projection=ProjectionSpec(kind="sjlt", dim=64))
    one_sample = 4 * (3 * whole.n_params + 64 * len(mlp_checkpoints))  # its gradient buffers and output: one per chunk
    chunked, _ = _featurizer(
        task, mlp_checkpoints, projection=ProjectionSpec(kind="sjlt", dim=64), chunk_bytes=one_sample
    )
    assert chunked.chunk_size == 1
    with pytest.raises(gradindex.ResourceLimitError, match="needs 4.0 KiB, more than the featurization memory"):
        _featurizer(task, mlp_checkpoints, projection=ProjectionSpec(kind="sjlt", dim=64), chunk_bytes=one_sample - 1)
    batch = task.train.tensors
    torch.testing.assert_close(whole.featurize(batch), chunked.featurize(batch))


def test_layers_restrict_the_gradient(mlp_checkpoints):
    task = tiny_tasks.mlp_task()
    last, _ = _featurizer(task, mlp_checkpoints[:1], projection=ProjectionSpec(kind="none"), layers=["2.*"])
    full, _ = _featurizer(task, mlp_checkpoints[:1], projection=ProjectionSpec(kind="none"))
    assert last.param_names == ["2.weight", "2.bias"]
    batch = tuple(t[:5] for t in task.train.tensors)
    # the last layer's entries come last in the flattened full gradient
    torch.testing.assert_close(last.featurize(batch), full.featurize(batch)[:, -last.dim :])


def test_layers_matching_nothing_is_a_clear_error(mlp_checkpoints):

    with pytest.raises(gradindex.ArgumentError, match="layers encoder.* match no trainable parameter.*0.weight"):
        _featurizer(
            tiny_tasks.mlp_task(), mlp_checkpoints, projection=ProjectionSpec(kind="none"), layers=["encoder.*"]
        )


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_projected_scores_track_exact_scores(kind, tmp_path):
    """k=1024 per checkpoint: Spearman ≥ 0.95 between projected and exact TracIn scores on a small MLP."""
    task = tiny_tasks.mlp_task()
    checkpoints = tiny_tasks.save_checkpoints(tiny_tasks.mlp, tmp_path, weights=(1.0, 1.0))
    exact, _ = _featurizer(task, checkpoints, projection=ProjectionSpec(kind="none"))
    projected, _ = _featurizer(task, checkpoints, projection=ProjectionSpec(kind=kind, dim=1024, seed=3))
    train = task.train.tensors
    test = task.test.tensors
    exact_scores = (exact.featurize(test) @ exact.featurize(train).T).numpy()
    projected_scores = (projected.featurize(test) @ projected.featurize(train).T).numpy()
    correlation = spearmanr(exact_scores.ravel(), projected_scores.ravel()).statistic
    assert correlation >= 0.95, correlation
    # and per query, the exact top-1 is near the top of the projected ranking
    ranks = [
        np.argsort(-projected_scores[q]).tolist().index(int(np.argmax(exact_scores[q])))
        for q in range(len(exact_scores))
    ]
    assert np.median(ranks) <= 2, ranks
