"""Models and data for the kron tests: an MLP, CNNs (Conv2d and Conv1d) and a small transformer LM."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import gradindex


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(
            F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, dim)
        )
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=40, dim=32, layers=2, heads=2, length=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model, batch):
    tokens = batch[0]
    return F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(inplace=True), nn.Linear(128, 10))


def cnn():
    """Conv2d with padding, stride and 'same' padding, then Conv1d over rows, then a Linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding="same", dilation=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.ReLU(),  # [12, 4, 4]
        nn.Flatten(2),  # [12, 16]
        nn.Conv1d(12, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )


def digits(n_train: int, n_test: int, image: bool):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    if image:
        pixels = pixels.reshape(-1, 1, 8, 8)
    train = TensorDataset(pixels[:n_train], labels[:n_train])
    test = TensorDataset(pixels[-n_test:], labels[-n_test:])
    return train, test


def tokens(n_samples: int, seed: int, vocab: int = 40, length: int = 13) -> torch.Tensor:
    chain = torch.randint(1, vocab, (vocab, 3), generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(n_samples, length, dtype=torch.int64)
    out[:, 0] = torch.randint(1, vocab, (n_samples,), generator=generator)
    for position in range(1, length):
        out[:, position] = chain[out[:, position - 1], torch.randint(0, 3, (n_samples,), generator=generator)]
    out[: n_samples // 4, -3:] = 0  # some padding at the end of a quarter of the sequences
    return out


def task(name: str, n_train: int = 160, n_test: int = 12) -> gradindex.Task:
    if name == "mlp":
        train, test = digits(n_train, n_test, image=False)
        return gradindex.Task(model=mlp, train=train, test=test, name="kron-mlp")
    if name == "cnn":
        train, test = digits(n_train, n_test, image=True)
        return gradindex.Task(model=cnn, train=train, test=test, name="kron-cnn")
    train = tokens(n_train, seed=1)
    test = tokens(n_test, seed=2)
    zeros = torch.zeros
    return gradindex.Task(
        model=TinyLM,
        train=TensorDataset(train, zeros(n_train, dtype=torch.int64)),
        test=TensorDataset(test, zeros(n_test, dtype=torch.int64)),
        loss=lm_loss,
        name="kron-lm",
    )


def trained_checkpoint(task_: gradindex.Task, path, steps: int = 60, seed: int = 0) -> str:
    """A briefly trained model: TracIn on random weights measures little."""
    torch.manual_seed(seed)
    model = task_.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = task_.train.tensors
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(inputs), (64,), generator=generator)
        optimizer.zero_grad()
        task_.loss(model, (inputs[rows], targets[rows])).mean().backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    return f"{path}:1.0"


def upsampled_digits(n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """28×28 digits (sklearn's 8×8 upsampled, shifted, noised): the MNIST-like inputs of the speed benchmark."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    base = torch.tensor(bunch.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    base = F.pad(F.interpolate(base, size=(24, 24), mode="bilinear", align_corners=False), (2, 2, 2, 2))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(base), (n_samples,), generator=generator)
    images = base[picks] + 0.05 * torch.randn(n_samples, 1, 28, 28, generator=generator)
    return images.clamp(0, 1), torch.tensor(bunch.target, dtype=torch.int64)[picks]


def mnist_like_task(architecture: str, n_train: int = 300, n_test: int = 16) -> gradindex.Task:
    """The benchmark's 784-256-10 MLP or its two-conv CNN, on 28×28 digits."""
    x_train, y_train = upsampled_digits(n_train, seed=0)
    x_test, y_test = upsampled_digits(n_test, seed=1)
    if architecture == "mlp":
        model = lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))  # noqa: E731
        x_train, x_test = x_train.reshape(n_train, -1), x_test.reshape(n_test, -1)
    else:
        model = lambda: nn.Sequential(  # noqa: E731
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        )
    return gradindex.Task(model=model, train=TensorDataset(x_train, y_train), test=TensorDataset(x_test, y_test))
