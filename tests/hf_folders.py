"""Model folders and data files as a Hugging Face user has them, made here with nothing downloaded: a tiny GPT-2
(tied embeddings) or BERT classifier saved with ``save_pretrained`` beside a word-level tokenizer trained on procedural
sentences, the sentences written as jsonl, parquet or csv (text, or pre-tokenized ``input_ids``), and checkpoint
folders ``checkpoint-N/`` from a short training run. The tests of the ``hf-causal-lm`` and ``hf-classifier`` tasks,
the CLI and the report share them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gradindex.task import load_task
from gradindex.tasks import procedural_corpus, word_tokenizer
from gradindex.training import TrainConfig, train

SUBJECTS = ("baker", "cat", "child", "dog", "farmer", "pilot")  # the classifier's classes, sorted


def write_rows(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a .jsonl, .parquet or .csv file (lists in a csv as JSON text)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        flat = [
            {key: json.dumps(value) if isinstance(value, list) else value for key, value in row.items()} for row in rows
        ]
        pacsv.write_csv(pa.Table.from_pylist(flat), path)
    else:
        raise ValueError(f"no writer for {path.suffix}")
    return path


def corpus(n_train: int = 24, n_test: int = 4, seed: int = 0):
    return procedural_corpus(n_train=n_train, n_test=n_test, corrupt_fraction=0.25, seed=seed)


def lm_folder(root: Path, n_train: int = 24, n_test: int = 4, seed: int = 0) -> dict:
    """A GPT-2 folder (config + tokenizer) and train/test jsonl files of text; returns their paths and the corpus."""
    from transformers import GPT2Config

    root = Path(root)
    text = corpus(n_train, n_test, seed)
    tokenizer = word_tokenizer(text.train, extra_words=text.vocabulary())
    folder = root / "gpt2"
    GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=24,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    train_file = write_rows(root / "train.jsonl", [{"id": f"s{row}", "text": s} for row, s in enumerate(text.train)])
    test_file = write_rows(root / "test.jsonl", [{"id": f"q{row}", "text": s} for row, s in enumerate(text.test)])
    return {"model": folder, "train": train_file, "test": test_file, "corpus": text, "tokenizer": tokenizer}


def classifier_folder(root: Path, n_train: int = 24, n_test: int = 4, seed: int = 0) -> dict:
    """A BERT classifier folder (6 classes: the sentence's subject) with its tokenizer, and parquet files of
    pre-tokenized rows whose labels are the subjects' names."""
    from transformers import BertConfig

    root = Path(root)
    text = corpus(n_train, n_test, seed)
    tokenizer = word_tokenizer(text.train, extra_words=text.vocabulary())
    folder = root / "bert"
    BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
        num_labels=len(SUBJECTS),
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    subjects = dict(enumerate(text.subjects))
    test_subjects = [next(word for word in sentence.split() if word in SUBJECTS) for sentence in text.test]
    files = {}
    for split, sentences, labels in (
        ("train", text.train, [subjects[row] for row in range(n_train)]),
        ("test", text.test, test_subjects),
    ):
        rows = [
            {"input_ids": tokenizer(sentence)["input_ids"], "label": label, "text": sentence}
            for sentence, label in zip(sentences, labels)
        ]
        files[split] = write_rows(root / f"{split}.parquet", rows)
    return {"model": folder, **files, "corpus": text, "tokenizer": tokenizer}


def llama_folder(root: Path, n_train: int = 24, n_test: int = 4, seed: int = 0) -> dict:
    """A Llama-style causal LM folder (RMSNorm, rotary positions, SiLU-gated MLP, grouped key/value heads, untied
    head) with its tokenizer, and train/test jsonl files of text."""
    from transformers import LlamaConfig

    root = Path(root)
    text = corpus(n_train, n_test, seed)
    tokenizer = word_tokenizer(text.train, extra_words=text.vocabulary())
    folder = root / "llama"
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=24,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    train_file = write_rows(root / "train.jsonl", [{"id": f"s{row}", "text": s} for row, s in enumerate(text.train)])
    test_file = write_rows(root / "test.jsonl", [{"id": f"q{row}", "text": s} for row, s in enumerate(text.test)])
    return {"model": folder, "train": train_file, "test": test_file, "corpus": text, "tokenizer": tokenizer}


def checkpoints(spec: str, options: dict, out: Path, epochs: int = 2, lr: float = 1e-2) -> list[str]:
    """Train the task a few steps (HF checkpoint folders) and return the ``PATH:LR`` specs."""
    task = load_task(spec, **options)
    config = TrainConfig(epochs=epochs, n_checkpoints=2, lr=lr, optimizer="adam", batch_size=8)
    return [saved.cli_spec() for saved in train(task, config, out)]
