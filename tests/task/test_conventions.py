"""The default loss and margin follow the ecosystem's conventions: on tiny HF models built from configs (GPT-2 tied,
Llama, BERT) they equal HF's own ``outputs.loss`` computed one unpadded sample at a time, under ``vmap`` as in a batch,
and their per-sample gradients equal autograd on HF's loss; what they cannot handle is one sentence naming the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    LlamaConfig,
)

import gradindex
from gradindex import TaskSpecError, causal_lm_loss, collate_samples, cross_entropy_loss, default_loss, default_margin
from gradindex.task import VMAP_SAFE_ATTENTION, logits_of, model_outputs

VOCAB = 61


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def bert_config(**overrides) -> BertConfig:
    settings = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return BertConfig(**{**settings, **overrides})


def lm_items(prompt: int = 2) -> list[dict]:
    """Sequences of different lengths whose first ``prompt`` tokens are not scored (labels -100)."""
    generator = torch.Generator().manual_seed(0)
    items = []
    for length in (7, 11, 5, 9):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "text": "not a tensor"})
    return items


def classifier_items(labels=(0, 2, 1, 1)) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    items = []
    for length, label in zip((6, 9, 4, 8), labels):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        items.append({"input_ids": ids, "token_type_ids": [0] * length, "label": label, "idx": len(items)})
    return items


def _one(model: nn.Module, item: dict, **keys) -> torch.Tensor:
    """HF's own loss of one unpadded sample."""
    tensors = {key: torch.tensor([item[name]]) for key, name in keys.items()}
    return model(**tensors).loss


def _vmapped(loss, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Per-sample losses and gradients under vmap, each sample a batch of one (as PerSampleGradients runs them)."""
    params = {name: value.detach() for name, value in model.named_parameters()}
    module = _LossModule(model, loss)

    def sample_loss(params, sample):
        one = {key: value.unsqueeze(0) for key, value in sample.items()}
        return functional_call(module, {f"model.{key}": value for key, value in params.items()}, (one,)).sum()

    losses = vmap(lambda sample: sample_loss(params, sample))(batch)
    grads = vmap(grad(sample_loss), in_dims=(None, 0))(params, batch)
    return losses, grads


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


def _autograd(model: nn.Module, item: dict, **keys) -> dict:
    model.zero_grad()
    _one(model, item, **keys).backward()
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}


def _check_grads(vmapped: dict, model: nn.Module, items: list[dict], **keys) -> None:
    for row, item in enumerate(items):
        expected = _autograd(model, item, **keys)
        for name, value in expected.items():
            torch.testing.assert_close(vmapped[name][row], value, atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("config", [gpt2_config, llama_config], ids=["gpt2-tied", "llama"])
def test_the_causal_lm_loss_is_hf_loss_one_sample_at_a_time_batched_and_under_vmap(config):
    torch.manual_seed(0)
    items = lm_items()
    task = gradindex.Task.causal_lm(config(), train=items)
    model = task.model().eval()
    assert model.config._attn_implementation == VMAP_SAFE_ATTENTION
    batch = collate_samples(items, pad_value=task.pad_value)
    expected = torch.stack([_one(model, item, input_ids="input_ids", labels="labels") for item in items])
    losses = task.loss(model, batch)
    torch.testing.assert_close(losses, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default_loss(model, batch), losses)  # the class name says causal LM
    vmapped, grads = _vmapped(task.loss, model, batch)
    torch.testing.assert_close(vmapped, losses.detach(), atol=1e-5, rtol=1e-5)
    _check_grads(grads, model, items, input_ids="input_ids", labels="labels")


def test_without_labels_every_real_token_is_scored():
    torch.manual_seed(0)
    items = [{"input_ids": item["input_ids"]} for item in lm_items()]
    task = gradindex.Task.causal_lm(gpt2_config(), train=items)
    model = task.model().eval()
    batch = collate_samples(items)
    assert "attention_mask" in batch  # added by the collate: the padding is not scored
    expected = torch.stack([_one(model, item, input_ids="input_ids", labels="input_ids") for item in items])
    torch.testing.assert_close(task.loss(model, batch), expected.detach(), atol=1e-5, rtol=1e-5)
    tuples = (batch["input_ids"][:1, :7],)  # a tuple batch of input ids alone: labels are the inputs
    torch.testing.assert_close(causal_lm_loss(model, tuples)[0], expected[0].detach(), atol=1e-5, rtol=1e-5)


def test_the_sequence_classifier_loss_is_hf_loss_and_its_gradients_autograd():
    torch.manual_seed(0)
    items = classifier_items()
    task = gradindex.Task.sequence_classification(bert_config(), train=items)
    model = task.model().eval()
    batch = collate_samples(items)
    assert set(batch) == {"input_ids", "token_type_ids", "label", "idx", "attention_mask"}
    expected = torch.stack(
        [_one(model, item, input_ids="input_ids", token_type_ids="token_type_ids", labels="label") for item in items]
    )
    losses = default_loss(model, batch)  # 'idx' is not an argument of forward: left out, as HF's Trainer does
    torch.testing.assert_close(losses, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cross_entropy_loss(model, batch), losses)
    vmapped, grads = _vmapped(default_loss, model, batch)
    torch.testing.assert_close(vmapped, losses.detach(), atol=1e-5, rtol=1e-5)
    _check_grads(grads, model, items, input_ids="input_ids", token_type_ids="token_type_ids", labels="label")
    logits = logits_of(model, batch)
    margins = default_margin(model, batch)
    for row, label in enumerate(batch["label"].tolist()):
        others = torch.cat([logits[row, :label], logits[row, label + 1 :]])
        torch.testing.assert_close(margins[row], logits[row, label] - torch.logsumexp(others, 0))


def test_regression_and_token_classification_follow_hf():
    torch.manual_seed(0)
    regression = BertForSequenceClassification(bert_config(num_labels=1)).eval()
    items = [{**item, "label": float(item["label"]) / 2} for item in classifier_items()]
    batch = collate_samples(items)
    assert batch["label"].dtype == torch.float32
    expected = torch.stack([_one(regression, item, input_ids="input_ids", labels="label") for item in items])
    torch.testing.assert_close(
        default_loss(regression, {key: batch[key] for key in ("input_ids", "attention_mask", "label")}),
        expected.detach(),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(TaskSpecError, match=r"default margin has no rule.*Task\(margin=...\)"):
        default_margin(regression, batch)

    tokens = BertForTokenClassification(bert_config(num_labels=4)).eval()
    items = [
        {"input_ids": item["input_ids"], "labels": [-100] + [i % 4 for i in item["input_ids"][1:]]}
        for item in classifier_items()
    ]
    batch = collate_samples(items)
    expected = torch.stack([_one(tokens, item, input_ids="input_ids", labels="labels") for item in items])
    torch.testing.assert_close(default_loss(tokens, batch), expected.detach(), atol=1e-5, rtol=1e-5)


def test_the_sequence_margin_is_the_per_token_margin_averaged_over_labeled_tokens():
    torch.manual_seed(0)
    items = lm_items(prompt=3)
    task = gradindex.Task.causal_lm(gpt2_config(), train=items)
    model = task.model().eval()
    batch = collate_samples(items)
    margins = task.margin(model, batch)
    torch.testing.assert_close(default_margin(model, batch), margins)
    logits = logits_of(model, batch)
    for row, item in enumerate(items):
        values = []
        for position in range(len(item["input_ids"]) - 1):
            target = item["labels"][position + 1]
            if target == -100:
                continue
            row_logits = logits[row, position]
            others = torch.cat([row_logits[:target], row_logits[target + 1 :]])
            values.append(row_logits[target] - torch.logsumexp(others, 0))
        torch.testing.assert_close(margins[row], torch.stack(values).mean(), atol=1e-5, rtol=1e-5)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x1, x2):
        return self.linear(torch.cat([x1, x2], dim=-1))


class _NeedsLabels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, features, target):  # uses its labels: they are passed
        return self.linear(features) + 0.0 * target[:, None]


def test_the_model_is_called_by_the_batch_conventions():
    torch.manual_seed(0)
    x1, x2, y = torch.randn(4, 2), torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    model = _TwoInputs()
    expected = nn.functional.cross_entropy(model(x1, x2), y, reduction="none")
    for batch in ((x1, x2, y), ((x1, x2), y), {"x1": x1, "x2": x2, "labels": y}, {"x2": x2, "x1": x1, "label": y}):
        torch.testing.assert_close(default_loss(model, batch), expected)
    pairs = lambda inputs: model(*inputs)  # noqa: E731  a callable taking the tuple of inputs: not unpacked
    torch.testing.assert_close(default_loss(pairs, ((x1, x2), y)), expected)
    mlp = nn.Linear(2, 3)
    torch.testing.assert_close(  # one input whose key forward does not name: passed positionally
        default_loss(mlp, {"features": x1, "label": y}), nn.functional.cross_entropy(mlp(x1), y, reduction="none")
    )
    needs = _NeedsLabels()
    task = gradindex.Task(model=_NeedsLabels, train=[{"features": x1[0], "target": y[0]}], label="target")
    torch.testing.assert_close(
        task.loss(needs, {"features": x1, "target": y}),
        nn.functional.cross_entropy(needs.linear(x1), y, reduction="none"),
    )
    assert model_outputs(needs, {"features": x1, "target": y}, label="target").shape == (4, 3)


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(x), x


def test_what_the_default_loss_cannot_handle_is_one_sentence_naming_the_fix():
    x, y = torch.randn(4, 2), torch.tensor([0, 2, 1, 0])
    with pytest.raises(TaskSpecError, match=r"returned a tuple.*give Task\(loss=...\)"):
        default_loss(_TupleOut(), (x, y))
    with pytest.raises(TaskSpecError, match=r"found no labels.*Task\(label=...\) or give Task\(loss=...\)"):
        default_loss(nn.Linear(2, 3), {"input": x})
    with pytest.raises(TaskSpecError, match=r"forward takes \(x1, x2\) but the batch has the keys \(a, b\)"):
        default_loss(_TwoInputs(), {"a": x, "b": x, "labels": y})
    with pytest.raises(TaskSpecError, match=r"a batch is a str.*Task\(loss=...\)"):
        default_loss(nn.Linear(2, 3), "text")
    with pytest.raises(TaskSpecError, match=r"no rule for labels that are not the logits' shape.*Task\(loss=...\)"):
        default_loss(nn.Linear(2, 3), (x, torch.zeros(4, 5, dtype=torch.long)))
    with pytest.raises(TaskSpecError, match=r"regression targets of another shape.*Task\(loss=...\)"):
        default_loss(nn.Linear(2, 3), (x, torch.zeros(4, 2)))


def test_constructors_take_a_config_a_folder_or_a_callable(tmp_path):
    from transformers import GPT2LMHeadModel

    config = gpt2_config()
    config.save_pretrained(tmp_path / "gpt2")
    from_folder = gradindex.Task.causal_lm(tmp_path / "gpt2", train=lm_items(), pad_value=5)
    model = from_folder.model()
    assert type(model) is GPT2LMHeadModel and model.lm_head.weight is model.transformer.wte.weight
    assert from_folder.pad_value == 5 and from_folder.collate is not None and from_folder.name == "causal-lm"
    assert from_folder.collate(lm_items()[:2])["input_ids"][0, -1].item() == 5
    from_callable = gradindex.Task.causal_lm(lambda: GPT2LMHeadModel(config), train=lm_items())
    assert type(from_callable.model()) is GPT2LMHeadModel and from_callable.pad_value == 0

    classifier = gradindex.Task.sequence_classification(
        config, train=classifier_items(), num_labels=3, tokenizer=_Tokenizer()
    )
    built = classifier.model()
    assert type(built).__name__ == "GPT2ForSequenceClassification" and built.config.num_labels == 3
    assert built.config.pad_token_id == 7 and config.pad_token_id is None  # the caller's config is not changed
    assert classifier.tokenizer.decode([1, 2]) == "1 2"

    with pytest.raises(TaskSpecError, match="is not a folder with a config.json"):
        gradindex.Task.causal_lm(tmp_path, train=lm_items())
    with pytest.raises(TaskSpecError, match="num_labels applies to a config or a folder"):
        gradindex.Task.sequence_classification(lambda: None, train=classifier_items(), num_labels=3)
    with pytest.raises(TaskSpecError, match=r"Task.tokenizer must have a decode\(ids\) -> str method"):
        gradindex.Task(model=lambda: None, train=[], tokenizer=object())


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.lm = GPT2LMHeadModel(gpt2_config())

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def test_an_hf_model_inside_your_own_module_gets_the_vmap_safe_attention_too():
    torch.manual_seed(0)
    task = gradindex.Task(model=_Wrapper, train=lm_items(), loss=causal_lm_loss)
    model = task.model().eval()
    assert model.lm.config._attn_implementation == VMAP_SAFE_ATTENTION
    batch = collate_samples(lm_items())
    vmapped, _ = _vmapped(task.loss, model, {key: batch[key] for key in ("input_ids", "attention_mask", "labels")})
    torch.testing.assert_close(vmapped, task.loss(model, batch).detach(), atol=1e-5, rtol=1e-5)


class _Tokenizer:
    pad_token_id = 7

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))
