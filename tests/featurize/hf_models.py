"""Tiny Hugging Face transformers for the kron tests: a tied GPT-2 LM, a BERT classifier and a Llama LM (RMSNorm,
rotary positions, SiLU MLP), built from configs (nothing downloaded), on procedural token data with padding.

Batches are tuples ``(input_ids, attention_mask, labels)`` (BERT also ``token_type_ids`` before the labels); the losses
are written out here (per-sequence mean next-token loss over the tokens the mask keeps, per-sample cross-entropy).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import gradindex

VOCAB = 61
LENGTH = 16


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)  # tie_word_embeddings: wte is also lm_head


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        type_vocab_size=2,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def lm_loss(model, batch):
    """Mean next-token cross-entropy per sequence over the target tokens the attention mask keeps."""
    ids, mask = batch[0], batch[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    kept = mask[:, 1:].float()
    tokens = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (tokens * kept).sum(1) / kept.sum(1).clamp(min=1)


def classifier_loss(model, batch):
    ids, mask, token_types, labels = batch
    logits = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
    return F.cross_entropy(logits, labels, reduction="none")


def sequences(n_samples: int, seed: int, length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids from a sparse Markov chain (something to learn) and their attention masks: a third of the sequences
    end in padding (id 0, mask 0)."""
    chain = torch.randint(3, VOCAB, (VOCAB, 3), generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(n_samples, length, dtype=torch.int64)
    ids[:, 0] = torch.randint(3, VOCAB, (n_samples,), generator=generator)
    for position in range(1, length):
        ids[:, position] = chain[ids[:, position - 1], torch.randint(0, 3, (n_samples,), generator=generator)]
    mask = torch.ones_like(ids)
    kept = torch.randint(length // 2, length, (n_samples,), generator=generator)
    padded = torch.arange(n_samples) % 3 == 0
    for row in torch.nonzero(padded).flatten().tolist():
        mask[row, kept[row] :] = 0
        ids[row, kept[row] :] = 0
    return ids, mask


def task(name: str, n_train: int = 24, n_test: int = 6, length: int = LENGTH) -> gradindex.Task:
    """``gpt2``, ``llama`` (causal LMs) or ``bert`` (3-class classifier: the label is the first token's bucket, the
    second segment starts halfway)."""
    train_ids, train_mask = sequences(n_train, seed=1, length=length)
    test_ids, test_mask = sequences(n_test, seed=2, length=length)
    if name == "bert":

        def dataset(ids, mask):
            token_types = (torch.arange(ids.shape[1]) >= ids.shape[1] // 2).long().expand_as(ids) * mask
            return TensorDataset(ids, mask, token_types.contiguous(), ids[:, 0] % 3)

        return gradindex.Task(
            model=bert,
            train=dataset(train_ids, train_mask),
            test=dataset(test_ids, test_mask),
            loss=classifier_loss,
            name="tiny-bert",
        )
    zeros = torch.zeros
    return gradindex.Task(
        model={"gpt2": gpt2, "llama": llama}[name],
        train=TensorDataset(train_ids, train_mask, zeros(n_train, dtype=torch.int64)),
        test=TensorDataset(test_ids, test_mask, zeros(n_test, dtype=torch.int64)),
        loss=lm_loss,
        name=f"tiny-{name}",
    )


def trained_checkpoint(task_: gradindex.Task, path, steps: int = 30, seed: int = 0, lr: float = 3e-3) -> str:
    """A briefly trained model (Adam, batches of 32), saved as a state dict: ``path:1.0``."""
    torch.manual_seed(seed)
    model = task_.model()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    tensors = task_.train.tensors
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(tensors[0]), (32,), generator=generator)
        optimizer.zero_grad()
        task_.loss(model, tuple(tensor[rows] for tensor in tensors)).mean().backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    return f"{path}:1.0"


def looped_gradients(task_: gradindex.Task, checkpoint: str, batch: tuple) -> dict[str, torch.Tensor]:
    """The trusted slow path: per-sample gradients ``{name: [B, *shape]}`` of every parameter (a tied weight under its
    first name, the sum over its uses), one ``backward()`` per sample on the full model in eval mode."""
    model = task_.model()
    model.load_state_dict(torch.load(checkpoint.rsplit(":", 1)[0]), strict=False)
    model.eval()
    names = [name for name, _ in model.named_parameters()]
    per_sample: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for row in range(len(batch[0])):
        model.zero_grad()
        task_.loss(model, tuple(tensor[row : row + 1] for tensor in batch)).sum().backward()
        for name, param in model.named_parameters():
            per_sample[name].append(torch.zeros_like(param) if param.grad is None else param.grad.detach().clone())
    return {name: torch.stack(grads) for name, grads in per_sample.items()}
