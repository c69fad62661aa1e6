"""Curation: which training samples to keep, as a table a pandas / polars / Arrow pipeline joins on.

Two ways to choose:

* **drop the most suspicious** — ``curate(store, drop_top="5%")`` drops the samples with the highest
  self-influence (mislabeled, duplicated or atypical first) and keeps the rest;
* **keep the most helpful for a target set** (LESS-style) — ``curate(store, select="10%", samples="0-99")``
  scores every training sample by its summed influence Σ_q ⟨φ(q), φ(z)⟩ on the target queries and keeps the
  top ones. The scores come from the very path ``gradindex.query`` uses (k = every row), so whatever a
  method does on the query side applies here too.

Either way the result has one row per training sample, in store-row order::

    row  sample_id  label  score  rank  keep

``rank`` 1 is the highest score; ``keep`` is False for dropped (or not selected) samples. The table's
schema metadata ``gradindex.curate`` records the mode, the amount and the resulting counts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from gradindex.apps._catalog import CURATE_BY
from gradindex.errors import ArgumentError, IncompleteStoreError
from gradindex.pipeline import parse_samples, query, task_for_store
from gradindex.store import GradientStore, open_store

if TYPE_CHECKING:
    from gradindex.task import Task

__all__ = ["CURATE_BY", "curate", "parse_amount", "summary"]

# summed-influence selection holds at most this many query×row scores at once (12 bytes each)
_SCORES_PER_CHUNK = 16_000_000


def parse_amount(value: int | float | str, n_samples: int, *, option: str = "drop_top") -> int:
    """How many samples an amount means: ``"5%"`` (rounded to the nearest count), ``"20"`` or ``20`` (a count),
    or a float fraction in ``[0, 1]`` (Python API only)."""
    if isinstance(value, bool):
        raise ArgumentError(option, f"{option} must be a count such as 20 or a percentage such as 5%, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%", text)
        if match:
            percent = float(match.group(1))
            if percent > 100:
                raise ArgumentError(
                    option, f"{option} {value} is more than 100%; give a percentage between 0% and 100%"
                )
            return int(math.floor(percent / 100.0 * n_samples + 0.5))
        if re.fullmatch(r"\d+", text):
            value = int(text)
        else:
            raise ArgumentError(option, f"{option} {value!r} must be a count such as 20 or a percentage such as 5%")
    if isinstance(value, (int, np.integer)):
        count = int(value)
        if count < 0:
            raise ArgumentError(option, f"{option} must not be negative, got {count}")
        if count > n_samples:
            raise ValueError(
                f"{option} {count} is more than the store's {n_samples} samples; give at most {n_samples} or a "
                "percentage"
            )
        return count
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{option} as a float is a fraction in [0, 1], got {value}; give a count as an int or a percentage as "
                "'5%'"
            )
        return int(math.floor(value * n_samples + 0.5))
    raise ArgumentError(option, f"{option} must be a count such as 20 or a percentage such as 5%, got {value!r}")


def curate(
    store: GradientStore | str | Path,
    *,
    drop_top: int | float | str | None = None,
    by: Literal["self-influence"] = "self-influence",
    select: int | float | str | None = None,
    task: Task | str | None = None,
    split: str = "test",
    samples: Sequence[int] | str | None = None,
    checkpoints: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    memory_budget: int | None = None,
    progress: bool | None = None,
    task_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Which training samples to keep: a table ``row, sample_id, [label,] score, rank, keep``, one row per training
    sample in row order, to join on ``sample_id``. Give exactly one of ``drop_top`` and ``select``.

    Args:
        store: a complete store: a path, an fsspec URL or an opened ``GradientStore``.
        drop_top: drop the N (``20``) or P% (``"5%"``) highest-scoring samples by ``by``; a float in [0, 1] is a
            fraction.
        by: the score ``drop_top`` ranks by (``"self-influence"``).
        select: keep the N or P% training samples with the highest summed influence on the target queries
            (LESS-style data selection).
        task: for ``select``: the task (default: the one the store records).
        split: for ``select``: the split of the target queries.
        samples: for ``select``: the target queries in ``split`` (``"0-99"``, a list; default: the whole split).
        checkpoints: for ``select``: the checkpoint paths, if they moved since the build.
        device: for ``select``: ``auto``, ``cpu`` or ``cuda[:N]``.
        batch_size: for ``select``: query samples featurized per batch.
        memory_budget: for ``select``: bytes in-memory search may use.
        progress: show progress bars (default: when stderr is a terminal).
        task_options: for ``select``: keyword arguments of the task factory (with ``task``), or updates of the
            options the store recorded (without).

    Returns:
        The table; its schema metadata ``gradindex.curate`` records the mode, the amount and the counts (``summary``).
    """
    store = store if isinstance(store, GradientStore) else open_store(store)
    if (drop_top is None) == (select is None):
        raise ValueError(
            "give exactly one of drop_top (drop the most suspicious) or select (keep the most helpful for queries)"
        )
    if not store.complete:
        raise IncompleteStoreError(
            f"store {store.path} is incomplete ({store.progress()} written); finish it with `gradindex build ... "
            "--resume` before curating"
        )
    n_samples = store.n_samples
    if drop_top is not None:
        if by not in CURATE_BY:
            raise ArgumentError("by", f"by must be one of {', '.join(CURATE_BY)}, got {by!r}")
        count = parse_amount(drop_top, n_samples, option="drop_top")
        rows, stored = store.self_influence()
        scores = np.empty(n_samples, dtype=np.float64)
        scores[rows] = stored
        ranks = _ranks(scores)
        keep = ranks > count
        meta = {
            "mode": "drop-top",
            "by": by,
            "amount": str(drop_top),
            "dropped": int(count),
            "kept": int(n_samples - count),
        }
    else:
        count = parse_amount(select, n_samples, option="select")
        scores, picked, split_name = _summed_influence(
            store, task, split, samples, checkpoints, device, batch_size, memory_budget, progress, task_options
        )
        ranks = _ranks(scores)
        keep = ranks <= count
        meta = {
            "mode": "select",
            "by": "summed influence",
            "amount": str(select),
            "split": split_name,
            "n_queries": len(picked),
            "kept": int(count),
            "dropped": int(n_samples - count),
        }
    if 0 < count < n_samples:  # the score of the last sample dropped (drop-top) or kept (select)
        meta["threshold"] = float(np.sort(scores)[::-1][count - 1])
    table = store.samples()
    columns = {"row": table.column("row"), "sample_id": table.column("sample_id")}
    if "label" in table.column_names:
        columns["label"] = table.column("label")
    positions = table.column("row").to_numpy()
    columns["score"] = pa.array(scores[positions])
    columns["rank"] = pa.array(ranks[positions])
    columns["keep"] = pa.array(keep[positions])
    result = pa.table(columns)
    return result.replace_schema_metadata({"gradindex.curate": json.dumps(meta)})


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 = highest score; ties broken by row, as in ``gradindex self-influence``."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def _summed_influence(
    store, task, split, samples, checkpoints, device, batch_size, memory_budget, progress, task_options
) -> tuple[np.ndarray, list[int], str]:
    """Σ_q ⟨φ(q), φ(z)⟩ for every training row z, float64 ``[N]``, through ``gradindex.query`` with k = N."""
    task = task_for_store(store, task, task_options)
    dataset = task.split(split)
    picked = parse_samples(samples, len(dataset))
    n_samples = store.n_samples
    totals = np.zeros(n_samples, dtype=np.float64)
    per_chunk = max(1, _SCORES_PER_CHUNK // n_samples)
    for start in range(0, len(picked), per_chunk):
        chunk = picked[start : start + per_chunk]
        table = query(
            store,
            task,
            split=split,
            samples=chunk,
            k=n_samples,
            checkpoints=checkpoints,
            device=device,
            batch_size=batch_size,
            memory_budget=memory_budget,
            progress=progress,
        )
        rows = table.column("row").to_numpy()
        if len(rows) != len(chunk) * n_samples:
            raise RuntimeError(f"query returned {len(rows)} scores for {len(chunk)} queries over {n_samples} rows")
        np.add.at(totals, rows, table.column("score").to_numpy().astype(np.float64))
    return totals, picked, split


def summary(table: pa.Table) -> dict[str, Any]:
    """The ``gradindex.curate`` metadata of a curate() table, as a dict."""
    metadata = table.schema.metadata or {}
    return json.loads(metadata.get(b"gradindex.curate", b"{}"))
