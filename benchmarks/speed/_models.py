"""The three benchmark workloads: an MNIST-like MLP, a small CNN and a small transformer LM, all on data made here.

Nothing is downloaded: the 28×28 images are sklearn's bundled 8×8 digits, upsampled and jittered; the
tokens are structured synthetic text (motifs chained by a sparse random Markov chain, so a language model has
something to learn), and, as one control row, i.i.d. uniform tokens (nothing to learn).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

__all__ = [
    "WORKLOADS",
    "Workload",
    "cnn_workload",
    "deep_mlp_workload",
    "llama_workload",
    "mlp_workload",
    "transformer_uniform_workload",
    "transformer_workload",
]


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    train: TensorDataset
    test: TensorDataset
    loss: Callable[[nn.Module, tuple], Tensor]  # per-sample loss [B]
    final_layer: str  # the module name Captum's TracInCPFast uses
    batch_size: int
    kind: str = ""  # "mlp", "cnn" or "lm": how peers feed the model (default: from the name)
    peer_batch: int | None = None  # the batch size peers featurize with (default: batch_size)

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = {"mlp": "mlp", "cnn": "cnn"}.get(self.name.split("-")[0], "lm")

    def train_checkpoint(self, steps: int, lr: float, seed: int = 0) -> nn.Module:
        """A briefly trained model (TracIn on random weights would measure nothing useful)."""
        torch.manual_seed(seed)
        model = self.make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        inputs, targets = self.train.tensors
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            rows = torch.randint(0, len(inputs), (min(128, len(inputs)),), generator=generator)
            optimizer.zero_grad()
            self.loss(model, (inputs[rows], targets[rows])).mean().backward()
            optimizer.step()
        return model.eval()


def cross_entropy(model: nn.Module, batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _digit_images(n_samples: int, seed: int, side: int = 28) -> tuple[Tensor, Tensor]:
    """``[n, 1, side, side]`` float32 in [0, 1] and labels: sklearn digits upsampled, shifted ±2 px, with pixel
    noise."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    base = torch.from_numpy((bunch.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    base = F.interpolate(base, size=(side - 4, side - 4), mode="bilinear", align_corners=False)
    base = F.pad(base, (2, 2, 2, 2))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(base), (n_samples,), generator=generator)
    images = base[picks].clone()
    shifts = torch.randint(-2, 3, (n_samples, 2), generator=generator)
    for dx in range(-2, 3):
        for dy in range(-2, 3):
            rows = ((shifts[:, 0] == dx) & (shifts[:, 1] == dy)).nonzero().squeeze(1)
            images[rows] = torch.roll(images[rows], shifts=(dy, dx), dims=(2, 3))
    images += 0.05 * torch.randn(images.shape, generator=generator)
    return images.clamp_(0, 1), labels[picks]


def mlp_workload(n_train: int, n_test: int, hidden: int = 256) -> Workload:
    x_train, y_train = _digit_images(n_train, seed=0)
    x_test, y_test = _digit_images(n_test, seed=1)
    return Workload(
        name=f"mlp-784-{hidden}-10",
        make_model=lambda: nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)),
        train=TensorDataset(x_train.reshape(n_train, 784), y_train),
        test=TensorDataset(x_test.reshape(n_test, 784), y_test),
        loss=cross_entropy,
        final_layer="2",
        batch_size=1024,
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def cnn_workload(n_train: int, n_test: int) -> Workload:
    x_train, y_train = _digit_images(n_train, seed=0)
    x_test, y_test = _digit_images(n_test, seed=1)
    return Workload(
        name="cnn-2conv-28x28",
        make_model=small_cnn,
        train=TensorDataset(x_train, y_train),
        test=TensorDataset(x_test, y_test),
        loss=cross_entropy,
        final_layer="7",
        batch_size=256,
    )


class Block(nn.Module):
    """Pre-LayerNorm transformer block with nn.Linear projections (so every matmul is a factorable layer)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 256, layers: int = 2, heads: int = 4, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, batch) -> Tensor:
    """Mean next-token cross-entropy per sequence: ``[B]``."""
    tokens = batch[0]
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


def _motif_text(n_samples: int, length: int, vocab: int, seed: int, motifs: int = 48, noise: float = 0.05) -> Tensor:
    """Structured synthetic text: sequences of motifs (fixed runs of 3-8 tokens) that follow each other along a
    sparse Markov chain (3 possible successors per motif), with a few tokens replaced at random. The motifs and
    the chain are shared by train and test (seed 1234); ``seed`` draws the sequences."""
    shared = np.random.default_rng(1234)
    runs = [shared.integers(0, vocab, size=int(shared.integers(3, 9))) for _ in range(motifs)]
    successors = shared.integers(0, motifs, size=(motifs, 3))
    rng = np.random.default_rng(seed)
    out = np.empty((n_samples, length), dtype=np.int64)
    for row in range(n_samples):
        motif, tokens = int(rng.integers(motifs)), []
        while len(tokens) < length:
            tokens.extend(runs[motif].tolist())
            motif = int(successors[motif, rng.integers(3)])
        out[row] = tokens[:length]
    flips = rng.random((n_samples, length)) < noise
    out[flips] = rng.integers(0, vocab, size=int(flips.sum()))
    return torch.from_numpy(out)


def _uniform_tokens(n_samples: int, length: int, vocab: int, seed: int) -> Tensor:
    """i.i.d. uniform tokens: nothing to learn, so training gradients are nearly orthogonal (the hard, unrealistic
    case)."""
    return torch.randint(0, vocab, (n_samples, length), generator=torch.Generator().manual_seed(seed))


def transformer_workload(
    n_train: int, n_test: int, length: int = 65, vocab: int = 512, dim: int = 256, layers: int = 2, text: str = "motifs"
) -> Workload:
    make = {"motifs": _motif_text, "uniform": _uniform_tokens}[text]
    train = make(n_train, length, vocab, seed=0)
    test = make(n_test, length, vocab, seed=1)
    zeros = lambda n: torch.zeros(n, dtype=torch.int64)  # noqa: E731 - a dummy target keeps (input, target) batches
    return Workload(
        name=f"transformer-lm-{layers}x{dim}" + ("-uniform-tokens" if text == "uniform" else ""),
        make_model=lambda: TinyLM(vocab=vocab, dim=dim, layers=layers, heads=4, length=length - 1),
        train=TensorDataset(train, zeros(n_train)),
        test=TensorDataset(test, zeros(n_test)),
        loss=lm_loss,
        final_layer="head",
        batch_size=64,
        kind="tinylm",
    )


def transformer_uniform_workload(n_train: int, n_test: int, **options) -> Workload:
    return transformer_workload(n_train, n_test, text="uniform", **options)


def deep_mlp_workload(n_train: int, n_test: int, widths: tuple[int, ...] = (512, 512), side: int = 28) -> Workload:
    """An MLP ``side²-widths-10`` on the digit images (28×28: 784 inputs; 32×32: 1024)."""
    x_train, y_train = _digit_images(n_train, seed=0, side=side)
    x_test, y_test = _digit_images(n_test, seed=1, side=side)
    sizes = [side * side, *widths]

    def make_model() -> nn.Module:
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(sizes[-1], 10))

    params = sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise([*sizes, 10]))
    return Workload(
        name="mlp-" + "-".join(str(size) for size in [*sizes, 10]),
        make_model=make_model,
        train=TensorDataset(x_train.reshape(n_train, -1), y_train),
        test=TensorDataset(x_test.reshape(n_test, -1), y_test),
        loss=cross_entropy,
        final_layer=str(2 * len(widths)),
        batch_size=256,
        kind="mlp",
        peer_batch=max(1, min(256, 2**30 // (4 * params))),  # peers holding per-sample gradients: 1 GiB of them
    )


class CausalLM(nn.Module):
    """A Hugging Face causal LM that returns its logits (so every peer sees a plain ``tokens -> [B, T, V]`` model);
    ``hf`` is the ``PreTrainedModel`` itself (what Bergson's ``collect_gradients`` takes)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, tokens: Tensor) -> Tensor:
        return self.hf(input_ids=tokens).logits


def llama_config(vocab: int = 4096, dim: int = 512, layers: int = 6, length: int = 128):
    """A Llama configuration (every matmul an nn.Linear, as kronfluence and Bergson's hooks need), built here."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=(8 * dim // 3 + 63) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, dim // 64),
        num_key_value_heads=max(1, dim // 64),
        max_position_embeddings=length,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="sdpa",
    )


def llama_workload(
    n_train: int, n_test: int, length: int = 128, vocab: int = 4096, dim: int = 512, layers: int = 6
) -> Workload:
    """A Llama-style causal LM from a transformers config (default 23M parameters), context ``length``, on the
    structured synthetic text; its loss is the mean next-token cross-entropy per sequence."""
    from transformers import LlamaForCausalLM

    config = llama_config(vocab=vocab, dim=dim, layers=layers, length=length)
    train = _motif_text(n_train, length, vocab, seed=0)
    test = _motif_text(n_test, length, vocab, seed=1)
    zeros = lambda n: torch.zeros(n, dtype=torch.int64)  # noqa: E731 - a dummy target keeps (input, target) batches

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return CausalLM(LlamaForCausalLM(config))

    return Workload(
        name=f"llama-lm-{layers}x{dim}-ctx{length}",
        make_model=make_model,
        train=TensorDataset(train, zeros(n_train)),
        test=TensorDataset(test, zeros(n_test)),
        loss=causal_lm_loss,
        final_layer="hf.lm_head",
        batch_size=32,
        kind="lm",
        peer_batch=8,
    )


def causal_lm_loss(model: nn.Module, batch) -> Tensor:
    """Mean next-token cross-entropy per sequence over the whole context (``model(tokens)`` are logits): ``[B]``."""
    tokens = batch[0]
    logits = model(tokens)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


WORKLOADS = {
    "mlp": mlp_workload,
    "cnn": cnn_workload,
    "transformer": transformer_workload,
    "transformer-uniform": transformer_uniform_workload,
}


def n_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
