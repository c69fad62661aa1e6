"""L2-regularised two-class softmax regression (the built-in breast-cancer task) in closed form, float64 numpy.

Parameters are packed as gradindex flattens them: ``weight`` [2, 30] row-major, then ``bias`` [2].
The objective is J(θ) = (1/N) Σ_i CE(z_i; θ) + (l2/2)||θ||², so with p_i = softmax(W x_i + b),
x̃_i = [x_i, 1] and r_i = p_i − e_{y_i}:

    ∇ℓ(z_i) = r_i ⊗ x̃_i            H = (1/N) Σ_i (diag p_i − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ + l2·I

Newton's method fits it to machine precision, which is what leave-one-out retraining uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradindex.tasks import breast_cancer

N_CLASSES, N_FEATURES = 2, 30
N_PARAMS = N_CLASSES * N_FEATURES + N_CLASSES
# packed position k -> index in the [2, 31] (class, feature-or-bias) layout
_PACKED = np.concatenate(
    [
        np.arange(N_CLASSES * (N_FEATURES + 1)).reshape(N_CLASSES, N_FEATURES + 1)[:, :N_FEATURES].reshape(-1),
        np.arange(N_CLASSES) * (N_FEATURES + 1) + N_FEATURES,
    ]
)


def augment(features: np.ndarray) -> np.ndarray:
    return np.hstack([features, np.ones((len(features), 1))])


def probabilities(theta: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    matrix = np.empty(N_CLASSES * (N_FEATURES + 1))
    matrix[_PACKED] = theta
    logits = inputs @ matrix.reshape(N_CLASSES, N_FEATURES + 1).T
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def gradients(theta: np.ndarray, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample loss gradients ``[n, 62]``."""
    residual = probabilities(theta, inputs)
    residual[np.arange(len(labels)), labels] -= 1.0
    return (residual[:, :, None] * inputs[:, None, :]).reshape(len(labels), -1)[:, _PACKED]


def losses(theta: np.ndarray, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -np.log(probabilities(theta, inputs)[np.arange(len(labels)), labels])


def hessian(theta: np.ndarray, inputs: np.ndarray, l2: float) -> np.ndarray:
    """Hessian of the mean loss plus (l2/2)||θ||², ``[62, 62]``."""
    probs = probabilities(theta, inputs)
    curvature = probs[:, :, None] * np.eye(N_CLASSES)[None] - probs[:, :, None] * probs[:, None, :]
    blocks = np.einsum("ncd,ni,nj->cidj", curvature, inputs, inputs) / len(inputs)
    full = blocks.reshape(N_CLASSES * (N_FEATURES + 1), -1)
    return full[np.ix_(_PACKED, _PACKED)] + l2 * np.eye(N_PARAMS)


def fit(inputs: np.ndarray, labels: np.ndarray, l2: float, start: np.ndarray | None = None) -> np.ndarray:
    """The exact minimiser of the objective by Newton's method."""
    theta = np.zeros(N_PARAMS) if start is None else start.copy()
    for _ in range(100):
        step = np.linalg.solve(hessian(theta, inputs, l2), gradients(theta, inputs, labels).mean(axis=0) + l2 * theta)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    return theta


@dataclass
class LogReg:
    task: object
    l2: float
    theta: np.ndarray
    checkpoint: str
    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    def train_gradients(self) -> np.ndarray:
        return gradients(self.theta, self.train_inputs, self.train_labels)

    def test_gradients(self) -> np.ndarray:
        return gradients(self.theta, self.test_inputs, self.test_labels)

    def hessian(self) -> np.ndarray:
        return hessian(self.theta, self.train_inputs, self.l2)

    def influence(self, damping: float, queries=None) -> np.ndarray:
        """Closed-form scores ``[n_queries, N]``: ∇ℓ(q)ᵀ(H + λI)^{-1}∇ℓ(z), positive = proponent."""
        test = self.test_gradients() if queries is None else self.test_gradients()[queries]
        return test @ np.linalg.solve(self.hessian() + damping * np.eye(N_PARAMS), self.train_gradients().T)

    def self_influence(self, damping: float) -> np.ndarray:
        train = self.train_gradients()
        return np.einsum("ij,ij->i", train @ np.linalg.inv(self.hessian() + damping * np.eye(N_PARAMS)), train)


def make(directory: Path, l2: float = 0.1) -> LogReg:
    """The breast-cancer task with strength ``l2``, fitted exactly, its θ* saved as a float32 checkpoint."""
    task = breast_cancer(l2=l2)
    train_inputs = augment(task.train.tensors[0].double().numpy())
    train_labels = task.train.tensors[1].numpy()
    test_inputs = augment(task.test.tensors[0].double().numpy())
    test_labels = task.test.tensors[1].numpy()
    theta = fit(train_inputs, train_labels, l2)
    matrix = np.empty(N_CLASSES * (N_FEATURES + 1))
    matrix[_PACKED] = theta
    matrix = matrix.reshape(N_CLASSES, N_FEATURES + 1)
    path = Path(directory) / "theta.pt"
    torch.save(
        {
            "weight": torch.tensor(matrix[:, :N_FEATURES], dtype=torch.float32),
            "bias": torch.tensor(matrix[:, N_FEATURES], dtype=torch.float32),
        },
        path,
    )
    # the model sees the float32 weights: evaluate the closed forms there too
    theta32 = theta.astype(np.float32).astype(np.float64)
    return LogReg(task, l2, theta32, str(path), train_inputs, train_labels, test_inputs, test_labels)


def task_l2_0_1():
    """``--task`` factory: the breast-cancer task with l2 = 0.1, as ``make`` fits it."""
    return breast_cancer(l2=0.1)
