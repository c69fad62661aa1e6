"""The transformer workloads, as a Hugging Face user has them: a config saved with ``save_pretrained``, a list
of dict rows (variable-length ``input_ids``; the classifier's ``token_type_ids`` and ``labels``), a ``gradindex.Task``
made by ``Task.causal_lm`` / ``Task.sequence_classification`` with the default loss, and an AdamW training run that
saves ``checkpoint-N/`` folders with ``save_pretrained``.

The text is procedural token sequences (nothing downloaded): a sparse random Markov chain over the vocabulary (three
successors per token), 10% of the tokens replaced at random so that samples differ in how typical they are, and every
third sequence cut to a random length between half and all of the context, so batches are padded and the attention
mask matters. The classifier's label is a function of the first eight tokens, 10% of the labels flipped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import gradindex

FAMILIES = ("gpt2", "bert", "llama")
# the benchmark's models: name -> (family, changes to the run's shape); gpt2-wide is the same GPT-2 at width 128 and 4
# layers (~0.8M parameters: k = 1024 keeps about 1/800 of each checkpoint's gradient), on 384 training rows (its exact
# reference, one autograd call per sample and checkpoint, is the slowest part of the run)
MODELS = {
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "llama": ("llama", {}),
    "gpt2-wide": ("gpt2", {"width": 128, "layers": 4, "heads": 4, "n_train": 384}),
}
PAD = 0  # the padding token id; real tokens are 3..vocab-1
N_CLASSES = 3


@dataclass(frozen=True)
class Shape:
    """The size of a workload: the model's, the data's and the training run's."""

    vocab: int = 97
    length: int = 32  # the context, in tokens
    width: int = 32
    layers: int = 2
    heads: int = 2
    n_train: int = 512
    n_test: int = 32
    steps: int = 120  # optimizer steps of the training run (batches drawn at random)
    n_checkpoints: int = 3
    batch_size: int = 32
    lr: float = 3e-3


FULL = Shape()
QUICK = Shape(n_train=192, n_test=12, steps=45)
TINY = Shape(vocab=23, length=8, width=8, layers=1, heads=2, n_train=24, n_test=4, steps=6, batch_size=8)


def config(family: str, shape: Shape) -> Any:
    """The transformers config of a family at a shape (no dropout, so that training and featurizing see one model)."""
    import transformers

    if family == "gpt2":  # tied input embedding and LM head (GPT-2's default), HF Conv1D blocks
        return transformers.GPT2Config(
            vocab_size=shape.vocab,
            n_embd=shape.width,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_positions=shape.length,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    if family == "bert":  # a sequence classifier: token, position and token-type embeddings, a pooler
        return transformers.BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.width,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=2 * shape.width,
            max_position_embeddings=shape.length,
            type_vocab_size=2,
            num_labels=N_CLASSES,
            pad_token_id=PAD,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    if family == "llama":  # RMSNorm, rotary positions, SiLU-gated MLP, grouped key/value heads, untied head
        return transformers.LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.width,
            intermediate_size=2 * shape.width,
            num_hidden_layers=shape.layers,
            num_attention_heads=2 * shape.heads,
            num_key_value_heads=shape.heads,
            max_position_embeddings=shape.length,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def sequences(n: int, shape: Shape, seed: int) -> list[torch.Tensor]:
    """``n`` token sequences of the Markov text (see the module docstring), every third one shorter."""
    chain = torch.randint(3, shape.vocab, (shape.vocab, 3), generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, shape.length, dtype=torch.int64)
    ids[:, 0] = torch.randint(3, shape.vocab, (n,), generator=generator)
    for position in range(1, shape.length):
        ids[:, position] = chain[ids[:, position - 1], torch.randint(0, 3, (n,), generator=generator)]
    noise = torch.rand(n, shape.length, generator=generator) < 0.1
    ids[noise] = torch.randint(3, shape.vocab, (int(noise.sum()),), generator=generator)
    lengths = torch.randint(shape.length // 2, shape.length + 1, (n,), generator=generator)
    return [ids[row, : int(lengths[row])] if row % 3 == 0 else ids[row] for row in range(n)]


def rows(family: str, shape: Shape, n: int, seed: int) -> list[dict]:
    """The dataset of a split: a list of dict rows, as a tokenized HF dataset yields them."""
    tokens = sequences(n, shape, seed)
    if family != "bert":
        return [{"input_ids": ids} for ids in tokens]
    flip = torch.rand(n, generator=torch.Generator().manual_seed(seed + 100)) < 0.1
    out = []
    for row, ids in enumerate(tokens):
        label = int((ids[:8] % 3 == 0).sum()) % N_CLASSES
        label = (label + 1) % N_CLASSES if flip[row] else label
        token_types = (torch.arange(len(ids)) >= shape.length // 2).long()
        out.append({"input_ids": ids, "token_type_ids": token_types, "labels": torch.tensor(label)})
    return out


@dataclass
class Workload:
    """A model's folder, data, Task and (after ``train``) checkpoints."""

    name: str
    family: str
    shape: Shape
    folder: Path
    task: gradindex.Task
    checkpoints: list[str] = field(default_factory=list)  # "checkpoint-N/:LR" specs, in training order
    n_parameters: int = 0
    final_loss: float | None = None


def workload(name: str, shape: Shape, folder: Path) -> Workload:
    """Save the model's config to ``folder/NAME/model`` and make its Task from that folder, as a user would.

    Args:
        name: a key of ``MODELS``.
        shape: the run's shape (the model's own changes applied on top).
        folder: where the model's folder, checkpoints and stores go.
    """
    family, changes = MODELS[name]
    shape = dataclasses.replace(shape, **changes)
    model_dir = Path(folder) / name / "model"
    config(family, shape).save_pretrained(model_dir)
    train, test = rows(family, shape, shape.n_train, 1), rows(family, shape, shape.n_test, 2)
    if family == "bert":
        task = gradindex.Task.sequence_classification(model_dir, train, test, name=f"{name}-benchmark")
    else:
        task = gradindex.Task.causal_lm(model_dir, train, test, name=f"{name}-benchmark")
    return Workload(name=name, family=family, shape=shape, folder=Path(folder) / name, task=task)


def _auto(work: Workload) -> Any:
    import transformers

    return (
        transformers.AutoModelForSequenceClassification if work.family == "bert" else transformers.AutoModelForCausalLM
    )


def user_model(work: Workload) -> torch.nn.Module:
    """The model as a user trains it: built from the saved config with transformers' own (default) attention."""
    import transformers

    return _auto(work).from_config(
        transformers.AutoConfig.from_pretrained(work.folder / "model", local_files_only=True)
    )


def load_user_model(work: Workload, folder: str | Path) -> torch.nn.Module:
    """A checkpoint folder loaded by transformers itself (``from_pretrained``, its own attention)."""
    return _auto(work).from_pretrained(str(folder), local_files_only=True)


def _batch(work: Workload, indices: list[int]) -> dict:
    batch = gradindex.collate_samples([work.task.train[int(row)] for row in indices], pad_value=PAD)
    if work.family != "bert":  # HF's causal-LM labels: the ids, padding ignored
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def train(work: Workload, seed: int = 0) -> Workload:
    """The short training run: AdamW at a constant learning rate on random batches, HF's own loss
    (``model(**batch).loss``), a ``save_pretrained`` folder ``checkpoint-STEP/`` at evenly spaced steps; the
    learning rate is each checkpoint's TracIn weight."""
    shape = work.shape
    torch.manual_seed(seed)
    model = user_model(work)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=shape.lr)
    generator = torch.Generator().manual_seed(seed)
    every = max(1, shape.steps // shape.n_checkpoints)
    work.checkpoints = []
    for step in range(1, shape.steps + 1):
        indices = torch.randint(0, shape.n_train, (shape.batch_size,), generator=generator).tolist()
        optimizer.zero_grad()
        loss = model(**_batch(work, indices)).loss
        loss.backward()
        optimizer.step()
        if step % every == 0 and len(work.checkpoints) < shape.n_checkpoints:
            path = work.folder / f"checkpoint-{step}"
            model.save_pretrained(path)
            work.checkpoints.append(f"{path}:{shape.lr}")
    work.n_parameters = sum(parameter.numel() for parameter in model.parameters())
    work.final_loss = float(loss.detach())
    return work


def training_epoch_seconds(work: Workload, checkpoint: str) -> float:
    """Seconds of one training epoch over the training set from ``checkpoint``: batches of ``shape.batch_size`` in
    order, each an HF forward with loss, a backward and an AdamW step (the model built and loaded untimed)."""
    model = load_user_model(work, checkpoint.rsplit(":", 1)[0])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=work.shape.lr)
    size = work.shape.batch_size
    started = time.perf_counter()
    for start in range(0, work.shape.n_train, size):
        optimizer.zero_grad()
        model(**_batch(work, list(range(start, min(start + size, work.shape.n_train))))).loss.backward()
        optimizer.step()
    return time.perf_counter() - started
