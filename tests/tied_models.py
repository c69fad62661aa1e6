"""Models with tied or shared parameters, their tasks, and the trusted slow references the tests compare with.

* a tiny GPT-2 built from a transformers config, ``tie_word_embeddings`` left at its default (``lm_head.weight`` is
  ``transformer.wte.weight``);
* ``SharedLinear``: one ``nn.Linear`` registered in two places and applied twice.

The references use plain modules and ``backward()``: ``model.parameters()`` lists a tied tensor once and its ``.grad``
sums every use, which is what a featurizer must reproduce.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import gradindex

# this file as a task spec prefix: f"{TIED}:gpt2_task"
TIED = str(Path(__file__).resolve())

VOCAB, SEQ = 13, 6


def gpt2() -> GPT2LMHeadModel:
    """A ~1,000-parameter GPT-2 whose head is tied to its token embedding (the config's default)."""
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy: ``[B]``."""
    ids = batch[0]
    logits = model(input_ids=ids).logits
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def lm_margin(model: nn.Module, batch) -> torch.Tensor:
    """TRAK's output function for the LM: the mean log-likelihood of the sequence."""
    return -lm_loss(model, batch)


def gpt2_task(n_train: int = 8, n_test: int = 3) -> gradindex.Task:
    generator = torch.Generator().manual_seed(11)
    train = torch.randint(0, VOCAB, (n_train, SEQ), generator=generator)
    test = torch.randint(0, VOCAB, (n_test, SEQ), generator=generator)
    return gradindex.Task(
        model=gpt2,
        train=TensorDataset(train),
        test=TensorDataset(test),
        loss=lm_loss,
        margin=lm_margin,
        name="tied-gpt2",
    )


class SharedLinear(nn.Module):
    """``shared`` is also registered as ``again`` and applied twice: its gradient sums both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.again = self.shared
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.again(hidden)))


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-sample cross-entropy: ``[B]``."""
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def ce_margin(model: nn.Module, batch) -> torch.Tensor:
    """The classification margin: logit of the true class minus logsumexp of the others."""
    logits = model(batch[0])
    mask = batch[1].unsqueeze(-1) == torch.arange(logits.shape[-1])
    return logits.masked_fill(~mask, 0.0).sum(dim=-1) - torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=-1)


def shared_task(n_train: int = 16, n_test: int = 4) -> gradindex.Task:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(n_train + n_test, 5, generator=generator)
    y = torch.randint(0, 3, (n_train + n_test,), generator=generator)
    return gradindex.Task(
        model=SharedLinear,
        train=TensorDataset(x[:n_train], y[:n_train]),
        test=TensorDataset(x[n_train:], y[n_train:]),
        loss=ce_loss,
        margin=ce_margin,
        name="shared-linear",
    )


def save_gpt2(folder: Path, seed: int) -> GPT2LMHeadModel:
    """A tied GPT-2 with seeded weights, saved with ``save_pretrained`` (its safetensors lack ``lm_head.weight``)."""
    torch.manual_seed(seed)
    model = gpt2()
    model.save_pretrained(folder)
    return model


def save_shared(path: Path, seed: int) -> SharedLinear:
    torch.manual_seed(seed)
    model = SharedLinear()
    torch.save(model.state_dict(), path)
    return model


def per_sample_gradients(model: nn.Module, function, dataset, names=None) -> torch.Tensor:
    """``[N, p]``: one ``backward()`` per sample of ``function(model, batch).sum()`` on the plain module, the
    gradients of ``names`` (default: every parameter, each tensor once) flattened in that order."""
    model.eval()
    params = dict(model.named_parameters())
    chosen = [params[name] for name in (names or params)]
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        for index in range(len(dataset)):
            batch = tuple(t.unsqueeze(0) for t in dataset[index])
            grads = torch.autograd.grad(function(model, batch).sum(), chosen)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


def hessian(model: nn.Module, function, dataset, names) -> torch.Tensor:
    """``[p, p]`` float64: the Hessian of the mean of ``function`` over ``dataset`` w.r.t. ``names`` (each tensor once),
    by double backward on the plain module, one row per parameter entry."""
    model.eval()
    params = dict(model.named_parameters())
    chosen = [params[name] for name in names]
    batch = tuple(torch.stack([dataset[i][j] for i in range(len(dataset))]) for j in range(len(dataset[0])))
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(function(model, batch).mean(), chosen, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(flat[i], chosen, retain_graph=True)])
            for i in range(flat.numel())
        ]
    matrix = torch.stack(rows).double()
    return 0.5 * (matrix + matrix.T)
