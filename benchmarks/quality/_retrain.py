"""Ground truth by retraining, vectorised so that hundreds of models cost about as much as a few.

* ``LogisticRegression``: multinomial L2 logistic regression in float64, the exact optimum of
  ``mean_i w_i·ℓ_i(θ) / mean_i w_i + λ/2 ||θ||²`` (bias included in the penalty, as the built-in
  ``breast-cancer`` task does) for many 0/1 sample-weight rows at once. The full-data optimum is
  found by Newton's method; the retrained models start from it and take Newton-like steps
  preconditioned by the full-data Hessian (one Cholesky factor shared by all models), with a
  per-model backtracking line search, until every model's gradient norm is below ``tol``.
* ``train_many``: many copies of a small torch model, each on its own subset of the training set
  and from its own initialisation, trained at once with ``torch.func.vmap`` by the same recipe as
  ``gradindex.training.train`` (mini-batch SGD with momentum, constant learning rate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

__all__ = ["LogisticRegression", "evaluate_many", "margin_and_loss", "train_many"]

FLOOR = 1e-8  # a gradient norm this small is accepted when round-off stops Newton short of the tolerance


def margin_and_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., q, C]`` logits -> (TRAK margin, cross-entropy), each ``[..., q]``."""
    index = targets.expand(*logits.shape[:-1]).unsqueeze(-1)
    correct = logits.gather(-1, index).squeeze(-1)
    others = logits.scatter(-1, index, float("-inf"))
    loss = torch.logsumexp(logits, dim=-1) - correct
    return correct - torch.logsumexp(others, dim=-1), loss


@dataclass
class LogisticRegression:
    """Multinomial L2 logistic regression on ``features [n, d]``, labels ``[n]``, solved to ``tol``.

    Parameters are ``θ [C, d+1]``: ``θ[:, :d]`` is ``nn.Linear.weight``, ``θ[:, d]`` its bias.
    """

    features: np.ndarray
    labels: np.ndarray
    n_classes: int
    l2: float
    tol: float = 1e-10

    def __post_init__(self) -> None:
        x = torch.as_tensor(np.asarray(self.features), dtype=torch.float64)
        self.x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [n, d+1]
        self.y = torch.as_tensor(np.asarray(self.labels), dtype=torch.int64)
        self.onehot = torch.nn.functional.one_hot(self.y, self.n_classes).to(torch.float64)
        self.n, self.d1 = self.x.shape
        self.theta_star, self.newton_iterations = self._fit_full()
        self._chol = torch.linalg.cholesky(self.hessian(self.theta_star))
        self.max_grad_norm = 0.0  # the largest final gradient norm of any model solved so far

    # ---- objective ----
    def _objective(self, theta: Tensor, weights: Tensor) -> Tensor:
        """theta [M, C, d+1], weights [M, n] -> [M]."""
        logits = torch.einsum("nd,mcd->mnc", self.x, theta)
        losses = torch.logsumexp(logits, dim=2) - logits.gather(2, self.y.expand(len(theta), -1).unsqueeze(2)).squeeze(
            2
        )
        return (losses * weights).sum(1) / weights.sum(1) + 0.5 * self.l2 * theta.pow(2).sum((1, 2))

    def _gradient(self, theta: Tensor, weights: Tensor) -> Tensor:
        logits = torch.einsum("nd,mcd->mnc", self.x, theta)
        residual = (torch.softmax(logits, dim=2) - self.onehot) * (weights / weights.sum(1, keepdim=True)).unsqueeze(2)
        return torch.einsum("mnc,nd->mcd", residual, self.x) + self.l2 * theta

    def hessian(self, theta: Tensor, weights: Tensor | None = None) -> Tensor:
        """The ``[C(d+1), C(d+1)]`` Hessian of one model's objective at ``theta [C, d+1]``."""
        w = torch.ones(self.n, dtype=torch.float64) if weights is None else weights
        w = w / w.sum()
        probs = torch.softmax(self.x @ theta.T, dim=1)  # [n, C]
        c, d1 = self.n_classes, self.d1
        scaled = (self.x * w[:, None]).T  # [d+1, n]
        h = torch.zeros(c, d1, c, d1, dtype=torch.float64)
        for k in range(c):
            h[k, :, k, :] = (scaled * probs[:, k]) @ self.x
        z = (probs[:, :, None] * self.x[:, None, :]).reshape(self.n, c * d1)  # [n, C(d+1)]
        h = h.reshape(c * d1, c * d1) - (z * w[:, None]).T @ z
        return h + self.l2 * torch.eye(c * d1, dtype=torch.float64)

    def _fit_full(self) -> tuple[Tensor, int]:
        theta = torch.zeros(self.n_classes, self.d1, dtype=torch.float64)
        ones = torch.ones(1, self.n, dtype=torch.float64)
        for iteration in range(1, 101):
            g = self._gradient(theta[None], ones)[0]
            # float64 round-off floors the gradient norm near 1e-11..1e-10 on some splits: accept the floor
            if g.norm() < self.tol or (iteration > 20 and g.norm() < FLOOR):
                return theta, iteration
            step = torch.linalg.solve(self.hessian(theta), g.reshape(-1)).reshape(theta.shape)
            t, f0 = 1.0, self._objective(theta[None], ones)[0]
            while self._objective((theta - t * step)[None], ones)[0] > f0 and t > 1e-8:
                t *= 0.5
            theta = theta - t * step
        raise RuntimeError(f"Newton did not reach gradient norm {self.tol} in 100 iterations")

    def fit(
        self, weights: np.ndarray | Tensor, max_iter: int = 100, chunk: int = 200, tol: float | None = None
    ) -> Tensor:
        """The optimum for each row of ``weights [M, n]`` (0/1 or any non-negative), to gradient norm ``tol``: ``[M, C,
        d+1]``."""
        weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        tol = self.tol if tol is None else tol
        return torch.cat(
            [self._fit_chunk(weights[start : start + chunk], max_iter, tol) for start in range(0, len(weights), chunk)]
        )

    def _hvp(self, probs: Tensor, weights: Tensor, vectors: Tensor) -> Tensor:
        """Hessian-vector products of each model's objective: probs [M, n, C], vectors [M, C, d+1]."""
        u = torch.einsum("nd,mcd->mnc", self.x, vectors)
        r = probs * (u - (probs * u).sum(2, keepdim=True)) * weights.unsqueeze(2)
        return torch.einsum("mnc,nd->mcd", r, self.x) + self.l2 * vectors

    def _precondition(self, vectors: Tensor) -> Tensor:
        return torch.cholesky_solve(vectors.flatten(1).T, self._chol).T.reshape(vectors.shape)

    def _fit_chunk(self, weights: Tensor, max_iter: int, tol: float, inner: int = 50) -> Tensor:
        """Newton's method with the full-data Hessian as the preconditioner of each inner CG solve."""
        m = len(weights)
        normalized = weights / weights.sum(1, keepdim=True)
        theta = self.theta_star.expand(m, -1, -1).clone()
        f = self._objective(theta, weights)
        for _ in range(max_iter):
            g = self._gradient(theta, weights)
            g_norm = g.flatten(1).norm(dim=1)
            if g_norm.max() < tol:
                break
            probs = torch.softmax(torch.einsum("nd,mcd->mnc", self.x, theta), dim=2)
            # PCG for H_m s = g, each model to a relative residual of 1e-4 (Newton stays superlinear)
            s = torch.zeros_like(g)
            r = g.clone()
            z = self._precondition(r)
            p = z.clone()
            rz = (r * z).sum((1, 2))
            for _ in range(inner):
                hp = self._hvp(probs, normalized, p)
                alpha = rz / (p * hp).sum((1, 2)).clamp_min(1e-300)
                s = s + alpha[:, None, None] * p
                r = r - alpha[:, None, None] * hp
                if (r.flatten(1).norm(dim=1) <= 1e-4 * g_norm).all():
                    break
                z = self._precondition(r)
                rz_new = (r * z).sum((1, 2))
                p = z + (rz_new / rz.clamp_min(1e-300))[:, None, None] * p
                rz = rz_new
            t = torch.ones(m, dtype=torch.float64)
            for _ in range(30):
                candidate = theta - t[:, None, None] * s
                f_new = self._objective(candidate, weights)
                worse = f_new > f + 1e-15 * f.abs()
                if not worse.any():
                    break
                t = torch.where(worse, t * 0.5, t)
            theta, f = candidate, f_new
        final = self._gradient(theta, weights).flatten(1).norm(dim=1).max().item()
        if final >= max(tol, FLOOR if tol < FLOOR else tol):
            raise RuntimeError(f"retraining stopped at gradient norm {final:.3g}, above the tolerance {tol:.3g}")
        self.max_grad_norm = max(self.max_grad_norm, final)
        return theta

    def outputs(self, theta: Tensor, features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(margin, loss) of models ``theta [M, C, d+1]`` on ``features [q, d]``: each ``[M, q]`` float64."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        logits = torch.einsum("qd,mcd->mqc", x, theta)
        margin, loss = margin_and_loss(logits, torch.as_tensor(np.asarray(targets), dtype=torch.int64))
        return margin.numpy(), loss.numpy()

    def gradients(self, features: np.ndarray, targets: np.ndarray) -> Tensor:
        """Per-sample loss gradients at the full-data optimum: ``[q, C(d+1)]`` float64."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        probs = torch.softmax(x @ self.theta_star.T, dim=1)
        residual = probs - torch.nn.functional.one_hot(torch.as_tensor(np.asarray(targets)), self.n_classes).to(
            torch.float64
        )
        return (residual[:, :, None] * x[:, None, :]).flatten(1)

    def exact_influence(self, features: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``g_q H⁻¹ g_z`` for every query and training sample, ``[q, n]``: the harness's own reference,
        used only to choose which points leave-one-out removes (the same points for every method)."""
        queries = self.gradients(features, targets)
        train = self.gradients(self.x[:, :-1].numpy(), self.y.numpy())
        return (torch.cholesky_solve(queries.T, self._chol).T @ train.T).numpy()

    def state_dict(self, theta: Tensor) -> dict[str, Tensor]:
        """``theta [C, d+1]`` as an ``nn.Linear(d, C)`` state dict (float32)."""
        return {
            "weight": theta[:, :-1].to(torch.float32).contiguous(),
            "bias": theta[:, -1].to(torch.float32).contiguous(),
        }


def train_many(
    make_model: Callable[[], nn.Module],
    inputs: Tensor,
    targets: Tensor,
    subsets: np.ndarray,
    *,
    seeds: np.ndarray,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float = 0.9,
    chunk: int = 100,
) -> list[dict[str, Tensor]]:
    """Train one model per row of ``subsets [M, m]`` (training-row indices, equal sizes) from init seed ``seeds[i]``.

    Mini-batch SGD with momentum at a constant learning rate, cross-entropy, the model in train mode
    (the small models used here have no dropout or batch norm): the recipe of ``gradindex.training.train``.
    Returns one ``(stacked params, stacked buffers, base module)`` per chunk of models, for ``evaluate_many``.
    """
    out = []
    for start in range(0, len(subsets), chunk):
        out.append(
            _train_chunk(
                make_model,
                inputs,
                targets,
                subsets[start : start + chunk],
                seeds[start : start + chunk],
                epochs,
                lr,
                batch_size,
                momentum,
            )
        )
    return out


def _train_chunk(make_model, inputs, targets, subsets, seeds, epochs, lr, batch_size, momentum):
    models = []
    for seed in seeds:
        torch.manual_seed(int(seed))
        models.append(make_model())
    params, buffers = stack_module_state(models)
    base = models[0]

    def loss_fn(p, b, x, y):
        return nn.functional.cross_entropy(functional_call(base, (p, b), (x,)), y)

    step_grad = vmap(grad(loss_fn), in_dims=(0, 0, 0, 0))
    velocity = {name: torch.zeros_like(value) for name, value in params.items()}
    subsets_t = torch.as_tensor(subsets, dtype=torch.int64)
    m, size = subsets_t.shape
    generator = torch.Generator().manual_seed(int(seeds[0]) + 7919)
    for _ in range(epochs):
        order = torch.argsort(torch.rand(m, size, generator=generator), dim=1)
        rows = subsets_t.gather(1, order)
        for s in range(0, size, batch_size):
            batch_rows = rows[:, s : s + batch_size]
            grads = step_grad(params, buffers, inputs[batch_rows], targets[batch_rows])
            with torch.no_grad():
                for name in params:
                    velocity[name].mul_(momentum).add_(grads[name])
                    params[name] = params[name] - lr * velocity[name]
    return {name: value.detach() for name, value in params.items()}, buffers, base


def evaluate_many(chunks, inputs: Tensor, targets: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(margin, loss) of every trained model on ``inputs [q, ...]``: each ``[M, q]``."""
    margins, losses = [], []
    for params, buffers, base in chunks:
        with torch.no_grad():
            logits = vmap(lambda p, b: functional_call(base, (p, b), (inputs,)))(params, buffers)
        margin, loss = margin_and_loss(logits.double(), targets)
        margins.append(margin.numpy())
        losses.append(loss.numpy())
    return np.concatenate(margins), np.concatenate(losses)
