"""Built-in tasks for Hugging Face models and data files, so that a model folder and a data file need no Python:

    gradindex build --task hf-causal-lm --task-arg model=runs/gpt2 --task-arg train=train.jsonl \\
        --checkpoint runs/gpt2/checkpoint-10:0.1 -o lm.gradindex

``model`` is a ``save_pretrained`` (or config-only) folder: the architecture comes from its ``config.json``, the
weights from the checkpoints (which may be that same folder). ``train`` and ``test`` are parquet, jsonl (or json),
csv (or tsv) files, or folders written by ``datasets``' ``save_to_disk``; their rows are either pre-tokenized
(an ``input_ids`` column, optionally ``attention_mask``, ``token_type_ids`` and, for a causal LM, ``labels`` with -100
on the tokens not to score) or text (the ``text`` column, tokenized with the ``tokenizer`` folder: by default the
model folder when it holds tokenizer files). The Task carries the tokenizer, so reports show text.

``transformers`` (and ``datasets`` for ``save_to_disk`` folders) is an optional extra: ``pip install "gradindex[hf]"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gradindex.errors import TaskSpecError
from gradindex.task import TableDataset, Task
from gradindex.tasks._common import task_option
from gradindex.utils import check_positive_int

__all__ = ["DATA_FILE_TYPES", "hf_causal_lm", "hf_classifier", "read_rows"]

# the data files the HF tasks read, by suffix (a folder is a ``datasets`` save_to_disk folder)
DATA_FILE_TYPES: dict[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
}
# files that make a folder a tokenizer folder (what AutoTokenizer.from_pretrained reads)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
_INSTALL = 'pip install "gradindex[hf]"'


# ---- reading data files ---------------------------------------------------------------------------------------------


def read_rows(path: str | Path, split: str = "train", *, option: str = "train") -> pa.Table:
    """The rows of a data file as a pyarrow Table.

    Args:
        path: a ``.parquet``, ``.jsonl`` / ``.ndjson`` / ``.json``, ``.csv`` or ``.tsv`` file, or a ``datasets``
            ``save_to_disk`` folder (of one split, or of several: then ``split`` picks one).
        split: the split of a folder holding several (``DatasetDict``).
        option: the task option that named the file, for messages.

    Raises:
        TaskSpecError: the file is missing, of an unknown type, unreadable, or the folder has no such split.
    """
    path = Path(path)
    if not path.exists():
        raise TaskSpecError(f"{option} file {path} does not exist; check the task option {option}={path}")
    if path.is_dir():
        return _read_saved_dataset(path, split, option)
    kind = DATA_FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise TaskSpecError(
            f"{option} file {path} is of an unknown type ({path.suffix or 'no suffix'}); give a "
            f"{', '.join(sorted(set(DATA_FILE_TYPES)))} file or a datasets save_to_disk folder"
        )
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind in ("csv", "tsv"):
            import pyarrow.csv as pacsv

            delimiter = "\t" if kind == "tsv" else ","
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        return _read_json(path)
    except (pa.ArrowException, OSError, ValueError) as error:
        message = " ".join(str(error).split())[:200]
        raise TaskSpecError(f"cannot read {option} file {path} as {kind} ({message}); check its contents") from None


def _read_json(path: Path) -> pa.Table:
    """JSON lines (one object per line), or one JSON array of objects."""
    import pyarrow.json as pajson

    try:
        return pajson.read_json(path)
    except pa.ArrowInvalid:
        if path.suffix.lower() != ".json":
            raise
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("a .json file must hold one object per line, or one array of objects")
    return pa.Table.from_pylist(rows)


def _read_saved_dataset(path: Path, split: str, option: str) -> pa.Table:
    if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise TaskSpecError(
            f"{option} folder {path} is not a datasets save_to_disk folder (no dataset_dict.json or state.json); "
            "give a parquet, jsonl or csv file, or a folder written by Dataset.save_to_disk"
        )
    try:
        import datasets
    except ImportError:
        raise TaskSpecError(f"reading the datasets folder {path} needs the datasets library: {_INSTALL}") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise TaskSpecError(
                f"{option} folder {path} holds the splits {', '.join(loaded)}, not {split!r}; give the folder of one "
                f"split (e.g. {option}={path / next(iter(loaded))})"
            )
        loaded = loaded[split]
    return loaded.with_format("arrow")[:]


# ---- tokens ---------------------------------------------------------------------------------------------------------


def _load_tokenizer(tokenizer: str | None, model: Path, needed: bool) -> Any:
    """The tokenizer of the ``tokenizer`` folder, else of the model folder when it holds one; None when there is none
    and the data is pre-tokenized."""
    folder = Path(tokenizer) if tokenizer is not None else model
    if tokenizer is None and not any((model / name).is_file() for name in _TOKENIZER_FILES):
        if needed:
            raise TaskSpecError(
                f"the data has text but the model folder {model} holds no tokenizer; give the task option "
                "tokenizer=DIR (a tokenizer's save_pretrained folder), or pre-tokenized input_ids"
            )
        return None
    if not folder.is_dir():
        raise TaskSpecError(f"tokenizer folder {folder} does not exist; check the task option tokenizer={folder}")
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        message = " ".join(str(error).split())[:200]
        raise TaskSpecError(
            f"cannot load a tokenizer from {folder} ({message}); give the task option tokenizer=DIR naming a "
            "tokenizer's save_pretrained folder"
        ) from None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TaskSpecError(f"the hf-causal-lm and hf-classifier tasks need transformers: {_INSTALL}") from None
    return transformers


def _token_lists(column: pa.ChunkedArray, name: str, option: str) -> list[list[int]]:
    """A column of token id lists (a csv holds them as text: ``[1, 2, 3]`` or ``1 2 3``)."""
    values = column.to_pylist()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        parsed = []
        for row, text in enumerate(values):
            try:
                parsed.append(
                    json.loads(text) if text.strip().startswith("[") else [int(part) for part in text.split()]
                )
            except (ValueError, AttributeError):
                raise TaskSpecError(
                    f"row {row} of column {name!r} of the {option} file is {text!r}, not token ids; write them as "
                    "[1, 2, 3] or 1 2 3"
                ) from None
        values = parsed
    for row, ids in enumerate(values):
        if not isinstance(ids, list) or not all(
            isinstance(token, int) and not isinstance(token, bool) for token in ids
        ):
            raise TaskSpecError(f"row {row} of column {name!r} of the {option} file is not a list of integer token ids")
    return values


def _columns(
    table: pa.Table,
    option: str,
    *,
    text: str,
    tokenizer: Any,
    max_length: int | None,
    keep: Sequence[str],
    prompt: str | None = None,
) -> dict[str, list[list[int]]]:
    """The model's input columns (``input_ids`` and those of ``keep`` the rows have), tokenized from ``text`` when the
    rows are not pre-tokenized (after the ``prompt`` column's text, whose tokens get the label -100), cut to
    ``max_length`` tokens."""
    names = table.column_names
    if "input_ids" in names:
        columns = {
            name: _token_lists(table.column(name), name, option) for name in ("input_ids", *keep) if name in names
        }
    else:
        if text not in names:
            raise TaskSpecError(
                f"the {option} file has no column {text!r} and no input_ids (its columns: {', '.join(names)}); name "
                "the text column with the task option text=COLUMN, or give pre-tokenized input_ids"
            )
        if tokenizer is None:
            raise TaskSpecError(
                f"the {option} file has text but no tokenizer is known; give the task option tokenizer=DIR"
            )
        texts = _texts(table, text, option)
        prompts = _texts(table, prompt, option, what="prompt") if prompt is not None else None
        if prompts is not None:
            texts = [first + second for first, second in zip(prompts, texts)]
        encoded = tokenizer(
            texts,
            truncation=max_length is not None,
            max_length=max_length,
            return_offsets_mapping=prompts is not None,
        )
        columns = {name: [list(ids) for ids in encoded[name]] for name in ("input_ids", *keep) if name in encoded}
        if prompts is not None:
            columns["labels"] = [
                _completion_labels(ids, offsets, len(first))
                for ids, offsets, first in zip(columns["input_ids"], encoded["offset_mapping"], prompts)
            ]
    if max_length is not None:
        columns = {name: [ids[:max_length] for ids in values] for name, values in columns.items()}
    lengths = {name: [len(ids) for ids in values] for name, values in columns.items()}
    for name, values in lengths.items():
        if values != lengths["input_ids"]:
            row = next(row for row, (a, b) in enumerate(zip(values, lengths["input_ids"])) if a != b)
            raise TaskSpecError(
                f"row {row} of the {option} file has {values[row]} {name} but {lengths['input_ids'][row]} input_ids; "
                "give them one per token"
            )
    return columns


def _texts(table: pa.Table, column: str, option: str, what: str = "text") -> list[str]:
    if column not in table.column_names:
        raise TaskSpecError(
            f"the {option} file has no {what} column {column!r} (its columns: {', '.join(table.column_names)}); check "
            f"the task option {what}={column}"
        )
    texts = table.column(column).to_pylist()
    bad = next((row for row, value in enumerate(texts) if not isinstance(value, str)), None)
    if bad is not None:
        raise TaskSpecError(
            f"row {bad} of column {column!r} of the {option} file is {texts[bad]!r}, not text; fill or drop it"
        )
    return texts


def _completion_labels(ids: list[int], offsets: Sequence[tuple[int, int]], prompt_chars: int) -> list[int]:
    """The labels of a prompt + completion: -100 on every token before the first one that starts in the completion
    (the prompt's, and special tokens before it), the token ids from there on."""
    start = next(
        (position for position, (begin, end) in enumerate(offsets) if end > begin and begin >= prompt_chars),
        len(ids),
    )
    return [-100] * start + list(ids[start:])


def _positions(config: Any) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_lengths(columns: dict[str, list[list[int]]], config: Any, model: Path, option: str) -> None:
    """Every sequence fits the model's positions and its token ids its vocabulary (checked on one flat array)."""
    ids = pa.array(columns["input_ids"], pa.list_(pa.int64()))
    offsets = ids.offsets.to_numpy()
    lengths = np.diff(offsets)
    longest = _positions(config)
    if lengths.size and longest is not None and lengths.max() > longest:
        row = int(lengths.argmax())
        raise TaskSpecError(
            f"row {row} of the {option} file has {int(lengths[row])} tokens but the model in {model} takes at most "
            f"{longest}; give the task option max_length={longest} (or less)"
        )
    vocab = getattr(config, "vocab_size", None)
    values = ids.values.to_numpy()
    if isinstance(vocab, int) and values.size:
        bad = np.flatnonzero((values >= vocab) | (values < 0))
        if bad.size:
            row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
            raise TaskSpecError(
                f"row {row} of the {option} file has token id {int(values[bad[0]])} but the model in {model} has a "
                f"vocabulary of {vocab}; tokenize with the model's tokenizer"
            )


def _sample_ids(table: pa.Table, column: str | None, option: str) -> list | None:
    if column is None:
        return None
    if column not in table.column_names:
        raise TaskSpecError(
            f"the {option} file has no column {column!r} for sample ids (its columns: "
            f"{', '.join(table.column_names)}); check the task option sample_id={column}"
        )
    ids = table.column(column).to_pylist()
    if len(set(ids)) != len(ids):
        raise TaskSpecError(f"column {column!r} of the {option} file repeats sample ids; give one unique id per row")
    return ids


def _dataset(columns: dict[str, list[list[int]]], labels: list[int] | None = None) -> TableDataset:
    """Dict rows of token id lists (``labels`` among them: a causal LM's per-token labels), plus per-sample ``labels``
    when given (a classifier's)."""
    arrays = {name: pa.array(values, pa.list_(pa.int64())) for name, values in columns.items()}
    if labels is not None:
        arrays["labels"] = pa.array(labels, pa.int64())
    inputs = [name for name in arrays if name != "labels"]
    return TableDataset(pa.table(arrays), columns=inputs, label="labels" if "labels" in arrays else None)


def _common(model: str | None, train: str | None, max_length: int | None) -> tuple[Path, int | None]:
    if not isinstance(model, (str, Path)) or not str(model):
        raise TaskSpecError(
            "the task option model=DIR is required (--task-arg model=DIR): a save_pretrained folder, or one with "
            "config.json"
        )
    if not isinstance(train, (str, Path)) or not str(train):
        raise TaskSpecError(
            "the task option train=FILE is required (--task-arg train=FILE): the training rows, a parquet, jsonl or "
            "csv file or a datasets save_to_disk folder"
        )
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise TaskSpecError(
            f"model folder {folder} has no config.json; give the task option model=DIR naming a save_pretrained "
            "folder (its config.json gives the architecture)"
        )
    if max_length is not None:
        max_length = task_option(check_positive_int, "max_length", max_length)
    return folder, max_length


def _load_inputs(folder: Path, train: str, test: str | None, tokenizer: str | None) -> tuple[Any, dict, Any]:
    """The model folder's config, the ``train`` (and ``test``) rows as tables, and the tokenizer when a table has no
    ``input_ids`` column (else the folder's, if it holds one)."""
    config = _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
    tables = {"train": read_rows(train, "train", option="train")}
    if test is not None:
        tables["test"] = read_rows(test, "test", option="test")
    needs_tokenizer = any("input_ids" not in table.column_names for table in tables.values())
    return config, tables, _load_tokenizer(tokenizer, folder, needs_tokenizer)


# ---- the tasks ------------------------------------------------------------------------------------------------------


def hf_causal_lm(
    model: str | None = None,
    train: str | None = None,
    test: str | None = None,
    text: str = "text",
    tokenizer: str | None = None,
    max_length: int | None = None,
    sample_id: str | None = None,
    prompt: str | None = None,
    name: str = "hf-causal-lm",
) -> Task:
    """A causal language model (``AutoModelForCausalLM``) on data files: the per-sequence next-token loss.

    Args:
        model: the model folder: its ``config.json`` gives the architecture (a ``save_pretrained`` folder; the
            weights come from the checkpoints).
        train: the training rows: a parquet, jsonl/json, csv/tsv file or a ``datasets`` save_to_disk folder, either
            pre-tokenized (``input_ids``, optionally ``attention_mask`` and ``labels`` with -100 on tokens not to
            score, e.g. a prompt) or with a text column.
        test: the query rows (the ``test`` split), read like ``train``.
        text: the text column (for rows without ``input_ids``).
        tokenizer: the tokenizer folder; default the model folder when it holds tokenizer files.
        max_length: cut every sequence to this many tokens (default: none; longer than the model's positions is an
            error naming this option).
        sample_id: a column of unique sample ids (default: the row number).
        prompt: a column of prompts for text rows: each row is its prompt followed by its text (joined as they are),
            and only the text's tokens are scored (the prompt's get the label -100), so a query scores a completion.
        name: the task's display name.

    Returns:
        A ``Task.causal_lm`` whose ``tokenizer`` decodes its rows.

    Raises:
        TaskSpecError: a missing file, column or tokenizer, an unknown file type, sequences too long for the model
            (each message names the task option to fix).
    """
    folder, max_length = _common(model, train, max_length)
    config, tables, loaded = _load_inputs(folder, train, test, tokenizer)
    datasets = {}
    for split, table in tables.items():
        if prompt is not None and "input_ids" in table.column_names:
            raise TaskSpecError(
                f"the task option prompt={prompt} applies to text rows, but the {split} file is pre-tokenized; give "
                "its labels column with -100 on the prompt's tokens instead"
            )
        columns = _columns(
            table,
            split,
            text=text,
            tokenizer=loaded,
            max_length=max_length,
            keep=("attention_mask", "labels"),
            prompt=prompt,
        )
        _check_lengths(columns, config, folder, split)
        datasets[split] = _dataset(columns)
    return Task.causal_lm(
        str(folder),
        datasets["train"],
        datasets.get("test"),
        tokenizer=loaded,
        sample_ids=_sample_ids(tables["train"], sample_id, "train"),
        name=name,
    )


def hf_classifier(
    model: str | None = None,
    train: str | None = None,
    test: str | None = None,
    text: str = "text",
    label: str = "label",
    tokenizer: str | None = None,
    max_length: int | None = None,
    sample_id: str | None = None,
    name: str = "hf-classifier",
) -> Task:
    """A sequence classifier (``AutoModelForSequenceClassification``) on data files: per-sample cross-entropy.

    Labels are integers in ``0..num_labels-1`` of the model's config, or strings: the names of the config's
    ``id2label`` when it has them, else sorted and numbered in that order (the report shows the names).

    Args:
        model: the model folder: its ``config.json`` gives the architecture and ``num_labels``.
        train: the training rows (parquet, jsonl/json, csv/tsv, or a ``datasets`` save_to_disk folder), pre-tokenized
            (``input_ids``, optionally ``attention_mask`` and ``token_type_ids``) or with a text column.
        test: the query rows (the ``test`` split), read like ``train``.
        text: the text column (for rows without ``input_ids``).
        label: the label column (default ``label``, else ``labels`` when only that one is there).
        tokenizer: the tokenizer folder; default the model folder when it holds tokenizer files.
        max_length: cut every sequence to this many tokens.
        sample_id: a column of unique sample ids (default: the row number).
        name: the task's display name.

    Returns:
        A ``Task.sequence_classification`` whose ``tokenizer`` decodes its rows.

    Raises:
        TaskSpecError: a missing file, column or tokenizer, an unknown file type, labels the model cannot take (each
            message names the task option to fix).
    """
    folder, max_length = _common(model, train, max_length)
    config, tables, loaded = _load_inputs(folder, train, test, tokenizer)
    raw_labels = {split: _label_column(table, label, split) for split, table in tables.items()}
    classes = _classes(raw_labels, config)
    datasets = {}
    for split, table in tables.items():
        columns = _columns(
            table, split, text=text, tokenizer=loaded, max_length=max_length, keep=("attention_mask", "token_type_ids")
        )
        _check_lengths(columns, config, folder, split)
        labels = _label_ids(raw_labels[split], classes, config, folder, split, label)
        dataset = _dataset(columns, labels)
        dataset.classes = classes  # the report shows class names
        datasets[split] = dataset
    return Task.sequence_classification(
        str(folder),
        datasets["train"],
        datasets.get("test"),
        tokenizer=loaded,
        sample_ids=_sample_ids(tables["train"], sample_id, "train"),
        name=name,
    )


def _label_column(table: pa.Table, label: str, option: str) -> list:
    names = table.column_names
    column = label if label in names else "labels" if label == "label" and "labels" in names else None
    if column is None:
        raise TaskSpecError(
            f"the {option} file has no label column {label!r} (its columns: {', '.join(names)}); name it with the "
            "task option label=COLUMN"
        )
    values = table.column(column).to_pylist()
    bad = next(
        (row for row, value in enumerate(values) if value is None or isinstance(value, (bool, float, list))), None
    )
    if bad is not None and not (isinstance(values[bad], float) and float(values[bad]).is_integer()):
        raise TaskSpecError(
            f"row {bad} of label column {column!r} of the {option} file is {values[bad]!r}; give integer class ids "
            "or class names"
        )
    return [int(value) if isinstance(value, float) else value for value in values]


def _classes(raw_labels: dict[str, list], config: Any) -> list[str] | None:
    """Class names: the config's ``id2label`` when its labels are names, else the sorted string labels; None for
    integer labels without names."""
    id2label = {int(key): str(value) for key, value in (getattr(config, "id2label", None) or {}).items()}
    named = bool(id2label) and not all(value == f"LABEL_{key}" for key, value in id2label.items())
    strings = sorted({value for values in raw_labels.values() for value in values if isinstance(value, str)})
    if named:
        return [id2label[key] for key in sorted(id2label)]
    return strings or None


def _label_ids(values: list, classes: list[str] | None, config: Any, model: Path, option: str, label: str) -> list[int]:
    n_labels = int(getattr(config, "num_labels", 2))
    index = {name: position for position, name in enumerate(classes or [])}
    ids = []
    for row, value in enumerate(values):
        if isinstance(value, str):
            if value not in index:
                raise TaskSpecError(
                    f"row {row} of the {option} file has label {value!r}, which is not one of the model's classes "
                    f"({', '.join(classes or [])}); fix the label column {label!r}"
                )
            value = index[value]
        if not 0 <= value < n_labels:
            raise TaskSpecError(
                f"row {row} of the {option} file has label {value} but the model in {model} has num_labels="
                f"{n_labels}; labels must be 0..{n_labels - 1} (save the model's config with the right num_labels)"
            )
        ids.append(int(value))
    return ids
