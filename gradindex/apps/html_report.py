"""``gradindex report``: one self-contained HTML page to *look* at a store.

The page holds, with no network needed to view it (inline CSS and JS, images as ``data:`` URIs,
plots as inline SVG, and a Content-Security-Policy that forbids every fetch):

* the self-influence histogram (as in the GEX paper), split into samples whose given label the
  model at the last checkpoint disagrees with (or, when known, the truly mislabeled ones);
* the top suspected mislabeled samples: thumbnails for image-like inputs (``[H, W]``, ``[C, H, W]``,
  ``[H, W, C]`` or flat vectors of a perfect-square length such as 8x8 digits), sparklines for 1-D
  signals, text for token ids (decoded by the task's tokenizer, else compact ids), with their given and
  predicted labels — found in tuple and dict batches alike (``Task.labels_of``, ``Task.logits_of``) — or, for
  a language model, the sample's loss;
* the proponents and opponents of chosen query samples with their scores;
* quality figures (a ``results.json`` beside the store, as ``gradindex demo`` writes) and the manifest.

    gradindex.report("digits.gradindex", queries=[0, 1, 2], output="report.html")
"""

from __future__ import annotations

import base64
import html
import inspect
import json
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.checkpoints import checkpoint_sha256, load_into, parse_checkpoints
from gradindex.errors import ArgumentError, GradIndexError, TaskSpecError
from gradindex.featurize import resolve_device
from gradindex.pipeline import parse_samples, query, task_for_store
from gradindex.store import GradientStore, open_store
from gradindex.task import Task, iter_batches, to_device
from gradindex.utils import check_positive_int
from gradindex.version import __version__

__all__ = ["PREDICT_ALL_LIMIT", "histogram_counts", "png_bytes", "report", "to_pixels"]

log = logging.getLogger("gradindex.report")

# Predict every training sample (for the histogram's split) up to this many; beyond, only the shown ones.
PREDICT_ALL_LIMIT = 50_000
_MAX_THUMB_SIDE = 96
_DEFAULT_QUERIES = 3


# ---- images -------------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG file of ``uint8 [H, W]`` (grey), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA) pixels."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"png_bytes needs uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        color_type = 0
    elif pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        color_type = 2 if pixels.shape[2] == 3 else 6
    else:
        raise ValueError(f"png_bytes needs [H, W], [H, W, 3] or [H, W, 4] pixels, got shape {list(pixels.shape)}")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"png_bytes needs a non-empty image, got shape {list(pixels.shape)}")
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))  # filter type 0 on every line

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    return None


def _image_layout(array: np.ndarray) -> np.ndarray | None:
    """``[H, W]`` or ``[H, W, C]`` view of an image-like array, or None when it does not look like an image."""
    if array.ndim == 1:
        side = math.isqrt(array.size)
        if array.size >= 16 and side * side == array.size and array.dtype.kind in "fu":
            return array.reshape(side, side)
        return None
    if array.ndim == 2 and min(array.shape) >= 4:
        return array
    if array.ndim == 3:
        if array.shape[0] in (1, 3, 4) and min(array.shape[1:]) >= 4:
            array = np.moveaxis(array, 0, -1)
        if array.shape[2] in (1, 3, 4) and min(array.shape[:2]) >= 4:
            return array[:, :, 0] if array.shape[2] == 1 else array
    return None


def to_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 pixels of an ``[H, W]`` / ``[H, W, C]`` image: kept if uint8, ``[0, 1]`` floats scaled by 255,
    ``[-1, 1]`` mapped to ``[0, 255]``, anything else stretched per image; large images downsampled by block means."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        values = image.astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if low >= 0.0 and high <= 1.0:
            scaled = values
        elif low >= -1.0 and high <= 1.0:
            scaled = (values + 1.0) / 2.0
        else:
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        image = np.round(np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 255.0).astype(np.uint8)
    factor = -(-max(image.shape[:2]) // _MAX_THUMB_SIDE)
    if factor > 1:
        height, width = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
        cropped = image[:height, :width].astype(np.float64)
        blocks = cropped.reshape(height // factor, factor, width // factor, factor, *image.shape[2:])
        image = np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)
    return image


def _sparkline(array: np.ndarray) -> str:
    lines = array.reshape(-1, array.shape[-1])[:4].astype(np.float64)
    finite = lines[np.isfinite(lines)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = high - low or 1.0
    width, height = 100.0, 40.0
    polylines = []
    for line in lines:
        xs = np.linspace(1.0, width - 1.0, num=line.size)
        ys = height - 2.0 - (np.nan_to_num(line, nan=low) - low) / span * (height - 4.0)
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
        polylines.append(f'<polyline points="{points}"/>')
    return (
        f'<svg class="thumb signal" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="signal of length {array.shape[-1]}">{"".join(polylines)}</svg>'
    )


def _model_input(item: Any) -> Any:
    if isinstance(item, (list, tuple)) and item:
        return item[0]
    if isinstance(item, dict):
        for key in ("input_ids", "input", "inputs", "x", "image", "text"):
            if key in item:
                return item[key]
    return item


# token ids shown without a tokenizer: the first and the last ones, with the count between
_HEAD_TOKENS, _TAIL_TOKENS = 32, 8


def _compact_ids(ids: list[int]) -> str:
    """``5 9 2``, or for a long sequence ``5 9 2 ... 7 1 (600 tokens)``."""
    if len(ids) <= _HEAD_TOKENS + _TAIL_TOKENS:
        return " ".join(map(str, ids))
    head = " ".join(map(str, ids[:_HEAD_TOKENS]))
    tail = " ".join(map(str, ids[-_TAIL_TOKENS:]))
    return f"{head} … {tail} ({len(ids)} tokens)"


def render_input(value: Any, decode: Callable | None) -> tuple[str, str]:
    """``(html, kind)``: an inline picture, a sparkline, or text; ``kind`` is image, signal, text or none.

    Args:
        value: a sample's input: a tensor or array (image, signal, token ids) or a string.
        decode: ``decode(ids) -> str`` for token ids (a tokenizer's); without it the ids are shown, compactly.
    """
    if isinstance(value, str):
        return f'<div class="text">{html.escape(value[:400])}</div>', "text"
    array = _as_array(value)
    if array is None:
        return f'<div class="text">{html.escape(repr(value)[:200])}</div>', "text"
    if (
        array.dtype.kind in "iu"
        and array.ndim == 1
        and not (array.dtype == np.uint8 and _image_layout(array) is not None)
    ):
        ids = [int(token) for token in array.tolist()]
        if decode is not None:
            try:
                text = str(decode(ids))
            except Exception as error:  # a user's tokenizer: show the ids and say why
                log.warning("decoding tokens failed (%s: %s); showing token ids", type(error).__name__, error)
                text = _compact_ids(ids)
        else:
            text = _compact_ids(ids)
        return f'<div class="text tokens" title="{len(ids)} tokens">{html.escape(text[:400])}</div>', "text"
    image = _image_layout(array)
    if image is not None:
        encoded = base64.b64encode(png_bytes(to_pixels(image))).decode("ascii")
        return (
            f'<img class="thumb" alt="input {"x".join(map(str, array.shape))}" src="data:image/png;base64,{encoded}">',
            "image",
        )
    if array.dtype.kind == "f" and array.ndim in (1, 2) and array.shape[-1] >= 2 and array.size <= 65536:
        return _sparkline(array), "signal"
    return f'<div class="text">tensor {html.escape(str(list(array.shape)))}</div>', "none"


def _decoder(task: Task | None, dataset: Any) -> Callable | None:
    """How token ids become text: the task's tokenizer (special tokens left out), else the dataset's ``decode`` or
    ``tokenizer``; None when there is none."""
    tokenizer = getattr(task, "tokenizer", None) if task is not None else None
    if tokenizer is None:
        decode = getattr(dataset, "decode", None)
        if callable(decode):
            return decode
        tokenizer = getattr(dataset, "tokenizer", None)
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        return None
    try:  # an HF tokenizer: <s>, </s> and padding are not text
        inspect.signature(decode).bind([0], skip_special_tokens=True)
    except (TypeError, ValueError):
        return decode
    return lambda ids: decode(ids, skip_special_tokens=True)


# ---- model predictions ----------------------------------------------------------------------------


class _Predictor:
    """The task's model at the store's last checkpoint: the class it predicts for chosen samples (argmax of
    ``[B, C]`` logits, read the way the default loss reads them) and their loss."""

    def __init__(self, task: Task, checkpoint: str, device: torch.device, batch_size: int):
        self.task = task
        self.model = load_into(task.model(), checkpoint).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    def predict(
        self, dataset: Any, rows: Sequence[int], *, with_losses: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(classes, losses)``: int64 ``[len(rows)]`` predicted classes (None when the outputs are not class scores,
        as a language model's) and float64 ``[len(rows)]`` losses (``task.loss``; None without ``with_losses``)."""
        rows = [int(row) for row in rows]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        classes: list[np.ndarray] | None = []
        losses = []
        with torch.no_grad():
            for batch in iter_batches(dataset, rows, self.batch_size, self.task.collate):
                batch = to_device(batch, self.device)
                if with_losses:
                    losses.append(self.task.loss(self.model, batch).double().cpu().numpy())
                elif classes is None:
                    break  # neither classes nor losses to find
                if classes is not None:
                    logits = self.task.logits_of(self.model, batch)
                    if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[1] >= 2:
                        classes.append(logits.argmax(dim=1).cpu().numpy())
                    else:
                        classes = None
        predicted = np.concatenate(classes).astype(np.int64) if classes is not None else None
        return predicted, np.concatenate(losses) if with_losses else None


def _given_labels(task: Task, dataset: Any, rows: Sequence[int], batch_size: int) -> list[Any] | None:
    """The per-sample labels of ``dataset[rows]`` where the default loss finds them (``Task.labels_of``: a tuple's
    last element, a ``labels``/``label`` key, ``Task.label``); None when the samples have none (a language model)."""
    rows = [int(row) for row in rows]
    found = []
    for batch in iter_batches(dataset, rows, batch_size, task.collate):
        labels = task.labels_of(batch)
        if labels is None:
            return None
        found += labels.tolist()
    return found


def _last_checkpoint(store: GradientStore, checkpoints: Sequence[str] | None) -> tuple[str | None, str | None]:
    """``(path, note)``: the checkpoint predictions come from (the last; θ* for gex), checked against its hash."""
    recorded = store.manifest.get("checkpoints") or []
    # gex stores list the trained model θ* first and its perturbed ensemble members after it
    position = 0 if store.fingerprint.get("method", {}).get("name") == "gex" else -1
    if checkpoints:
        path = parse_checkpoints(checkpoints)[position].path
    elif recorded:
        path = recorded[position]["path"]
    else:
        return None, "the store records no checkpoints, so there are no predicted labels"
    if not Path(path).exists():
        return (
            None,
            f"the checkpoint {path} is not there (pass --checkpoint if it moved), so there are no predicted labels",
        )
    expected = store.fingerprint["checkpoints"][position]["sha256"]
    if checkpoint_sha256(path) != expected:
        return None, f"{path} is not the file the store was built from, so there are no predicted labels"
    return path, None


def _resolve_task(
    store: GradientStore, task: Task | str | None, task_options: Mapping[str, Any] | None
) -> tuple[Task | None, str | None]:
    """The task the page shows samples of (``task_for_store``: the same rules as a query), or a note saying why
    there is none."""
    if task is not None:
        return task_for_store(store, task, task_options), None
    if not (store.manifest.get("task") or {}).get("spec"):
        return None, "the store does not record its task; pass --task SPEC to see inputs, predictions and queries"
    try:
        return task_for_store(store, None, task_options), None
    except GradIndexError as error:
        return (
            None,
            f"the store's task could not be loaded ({error}); pass --task SPEC to see inputs, predictions and queries",
        )


# ---- the page's parts ---------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def histogram_counts(
    scores: np.ndarray, groups: np.ndarray | None, bins: int = 40
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(edges, counts [n_groups, bins], log_scale)`` of the self-influence histogram the page draws.

    A log axis is used when every score is positive and they span at least two decades.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    log_scale = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() >= 100)
    values = np.log10(scores) if log_scale else scores
    keep = np.isfinite(values)
    edges = np.histogram_bin_edges(values[keep], bins=bins) if keep.any() else np.linspace(0, 1, bins + 1)
    group_ids = np.zeros(len(scores), dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    n_groups = 1 if groups is None else 2
    counts = np.stack([np.histogram(values[keep & (group_ids == group)], bins=edges)[0] for group in range(n_groups)])
    return edges, counts, log_scale


def _histogram_svg(
    scores: np.ndarray, groups: np.ndarray | None, group_names: Sequence[str], cutoff: float | None, cutoff_label: str
) -> str:
    edges, counts, log_scale = histogram_counts(scores, groups)
    width, height, left, right, top, bottom = 760.0, 280.0, 56.0, 16.0, 16.0, 48.0
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = counts.sum(axis=0)
    y_max = max(1, int(totals.max()))
    x_low, x_high = float(edges[0]), float(edges[-1])
    span = (x_high - x_low) or 1.0

    def x_of(value: float) -> float:
        return left + (value - x_low) / span * plot_w

    def y_of(count: float) -> float:
        return top + plot_h - count / y_max * plot_h

    parts = [
        f'<svg id="histogram" viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="self-influence histogram">'
    ]
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plotbg"/>')
    for tick in np.linspace(0, y_max, num=5):
        y = y_of(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{int(round(tick))}</text>')
    for bin_index in range(len(edges) - 1):
        x0, x1 = x_of(edges[bin_index]), x_of(edges[bin_index + 1])
        stacked = 0
        for group in range(counts.shape[0]):
            count = int(counts[group, bin_index])
            if count == 0:
                continue
            y_top = y_of(stacked + count)
            parts.append(
                f'<rect class="bar g{group}" data-group="{group}" data-count="{count}" x="{x0 + 0.5:.1f}" '
                f'y="{y_top:.1f}" '
                f'width="{max(0.5, x1 - x0 - 1):.1f}" height="{y_of(stacked) - y_top:.1f}">'
                f"<title>{html.escape(group_names[group])}: {count}</title></rect>"
            )
            stacked += count
    if log_scale:
        powers = list(range(math.ceil(x_low), math.floor(x_high) + 1))
        ticks = powers if len(powers) >= 2 else list(np.linspace(x_low, x_high, 5))

        def label(v):
            return f"1e{int(v)}" if float(v).is_integer() else _fmt(10**v)
    else:
        ticks = list(np.linspace(x_low, x_high, 5))
        label = _fmt
    for tick in ticks:
        x = x_of(float(tick))
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" class="axis"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" class="tick" text-anchor="middle">{label(tick)}</text>'
        )
    if cutoff is not None and (cutoff > 0 or not log_scale):
        value = math.log10(cutoff) if log_scale else cutoff
        if x_low <= value <= x_high:
            x = x_of(value)
            parts.append(f'<line id="cutoff" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" class="cutoff"/>')
            parts.append(
                f'<text x="{x - 4:.1f}" y="{top + 12}" class="tick" text-anchor="end">{html.escape(cutoff_label)} '
                "→</text>"
            )
    axis_name = "self-influence ⟨φ(z), φ(z)⟩" + (" (log scale)" if log_scale else "")
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" class="label" text-anchor="middle">{axis_name}</text>'
    )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" class="label" text-anchor="middle" transform="rotate(-90 14 '
        f'{top + plot_h / 2:.1f})">samples</text>'
    )
    for group, name in enumerate(group_names[: counts.shape[0]]):
        y = top + 8 + 16 * group
        parts.append(f'<rect x="{left + 12}" y="{y}" width="10" height="10" class="bar g{group}"/>')
        parts.append(
            f'<text x="{left + 28}" y="{y + 9}" class="legend">{html.escape(name)} ({int(counts[group].sum())})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _quality_html(results: Any) -> str:
    if not isinstance(results, dict):
        return f"<pre>{html.escape(json.dumps(results, indent=1, default=str))}</pre>"
    scalars = {
        key: value for key, value in results.items() if isinstance(value, (int, float, str, bool)) or value is None
    }
    tables = {
        key: value
        for key, value in results.items()
        if isinstance(value, dict) and all(isinstance(v, (int, float, str, bool)) or v is None for v in value.values())
    }
    rest = {key: value for key, value in results.items() if key not in scalars and key not in tables}

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return _fmt(value)
        return html.escape(str(value))

    out = []
    if tables:
        columns: list[str] = []
        for value in tables.values():
            columns += [key for key in value if key not in columns]
        out.append(
            '<table class="quality"><thead><tr><th></th>'
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            + "</tr></thead><tbody>"
        )
        for name, value in tables.items():
            out.append(
                f"<tr><th>{html.escape(str(name))}</th>"
                + "".join(f"<td>{cell(value[c]) if c in value else ''}</td>" for c in columns)
                + "</tr>"
            )
        out.append("</tbody></table>")
    if scalars:
        out.append(
            '<table class="kv">'
            + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{cell(v)}</td></tr>" for k, v in scalars.items())
            + "</table>"
        )
    if rest:
        out.append(f"<pre>{html.escape(json.dumps(rest, indent=1, default=str))}</pre>")
    return "".join(out)


def _label_text(value: Any, classes: Sequence[str] | None) -> str:
    if value is None:
        return "?"
    if classes is not None and isinstance(value, (int, np.integer)) and 0 <= int(value) < len(classes):
        return f"{int(value)} ({classes[int(value)]})"
    return str(value)


class _Cards:
    """Sample cards (input + labels + score) and a count of the pictures drawn."""

    def __init__(self, task: Task | None, predictor: _Predictor | None, notes: list[str]):
        self.task = task
        self.predictor = predictor
        self.notes = notes
        self.pictures = 0
        self.losses_only = False  # some card showed a loss for want of labels (a language model)

    def _predict(
        self, dataset: Any, rows: Sequence[int], *, with_losses: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self.predictor is None or dataset is None:
            return None, None
        try:
            return self.predictor.predict(dataset, rows, with_losses=with_losses)
        except Exception as error:  # the user's model on the user's data: go on without predictions, say why
            self.notes.append(
                f"the model at the last checkpoint failed on the data ({type(error).__name__}: {error}); no predicted "
                "labels"
            )
            self.predictor = None
            return None, None

    def _given(self, dataset: Any, rows: Sequence[int]) -> list[Any] | None:
        try:
            return _given_labels(self.task, dataset, rows, 256)
        except Exception as error:  # the user's data: go on without labels, say why
            self.notes.append(f"the samples' labels could not be read ({type(error).__name__}: {error})")
            return None

    def cards(
        self,
        split: str,
        rows: Sequence[int],
        *,
        scores: Sequence[float] | None,
        given: Sequence[Any] | None,
        extra: Sequence[str] | None = None,
        flagged: Sequence[bool] | None = None,
        caption: Callable[[int, int], str],
    ) -> list[str]:
        dataset = self.task.split(split) if self.task is not None else None
        decode = _decoder(self.task, dataset) if dataset is not None else None
        classes = getattr(dataset, "classes", None) if dataset is not None else None
        predicted, losses = self._predict(dataset, rows)
        if given is None and dataset is not None and len(rows):
            given = self._given(dataset, rows)
        out = []
        for position, row in enumerate(rows):
            picture, kind = ("", "none")
            if dataset is not None:
                picture, kind = render_input(_model_input(dataset[int(row)]), decode)
            if kind in ("image", "signal"):
                self.pictures += 1
            given_value = given[position] if given is not None else None
            predicted_value = int(predicted[position]) if predicted is not None else None
            mismatch = predicted_value is not None and given_value is not None and predicted_value != given_value
            if given is None and predicted is None:  # no per-sample labels (a language model): its loss instead
                self.losses_only = self.losses_only or losses is not None
                labels = (
                    f'<div class="labels">loss <b>{_fmt(float(losses[position]))}</b></div>'
                    if losses is not None
                    else ""
                )
            else:
                labels = f'<div class="labels">given <b>{html.escape(_label_text(given_value, classes))}</b>'
                if predicted_value is not None:
                    verdict = "mismatch" if mismatch else "match"
                    labels += (
                        f' · predicted <b class="{verdict}">{html.escape(_label_text(predicted_value, classes))}</b>'
                    )
                labels += "</div>"
            score = f'<div class="score">{_fmt(float(scores[position]))}</div>' if scores is not None else ""
            badge = (
                f'<div class="badge">{html.escape(extra[position])}</div>'
                if extra is not None and extra[position]
                else ""
            )
            attributes = (
                f'data-row="{int(row)}" data-given="{html.escape(str(given_value))}" '
                f'data-predicted="{"" if predicted_value is None else predicted_value}"'
                + (f' data-loss="{float(losses[position])!r}"' if losses is not None else "")
            )
            classes_attr = (
                "card"
                + (" flagged" if flagged is not None and flagged[position] else "")
                + (" mismatch" if mismatch else "")
            )
            out.append(
                f'<figure class="{classes_attr}" {attributes}>{picture}<figcaption>{caption(position, int(row))}'
                f"{score}{labels}{badge}</figcaption></figure>"
            )
        return out


class _Column:
    """One column of samples.parquet, addressed by store row."""

    def __init__(self, values: np.ndarray, position: np.ndarray):
        self.values = values
        self.position = position

    def get(self, row: int) -> Any:
        value = self.values[self.position[int(row)]]
        return value.item() if isinstance(value, np.generic) else value

    def take(self, rows: Sequence[int]) -> np.ndarray:
        return self.values[self.position[np.asarray(rows, dtype=np.int64)]]


class _RowLookup:
    def __init__(self, samples: Any, n_samples: int):
        self.samples = samples
        self.position = np.full(n_samples, -1, dtype=np.int64)
        self.position[samples.column("row").to_numpy()] = np.arange(samples.num_rows)

    def column(self, name: str) -> _Column | None:
        if name not in self.samples.column_names:
            return None
        column = self.samples.column(name)
        values = column.to_numpy(zero_copy_only=False)
        return _Column(np.asarray(values, dtype=object) if values.dtype.kind not in "iufb" else values, self.position)


def _parse_queries(queries: Sequence[int] | str | None, n_available: int) -> list[int]:
    if queries is None:
        return list(range(min(_DEFAULT_QUERIES, n_available)))
    if isinstance(queries, str) and queries.strip().lower() in ("", "none"):
        return []
    if not isinstance(queries, str) and len(queries) == 0:
        return []
    return parse_samples(queries, n_available)


_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--bg:#fff;--panel:#f4f6f9;--line:#d9dee7;
--accent:#2f6fdf;--warn:#d9480f;--ok:#2b8a3e}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:20px 28px;border-bottom:1px solid var(--line);background:var(--panel)}h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:var(--muted)}nav a{margin-right:14px;color:var(--accent);text-decoration:none}
main{padding:8px 28px 40px;max-width:1280px}
section{margin:26px 0}
h2{font-size:18px;margin:0 0 10px;border-bottom:1px solid var(--line);padding-bottom:4px}
.notes{background:#fff4e6;border:1px solid #ffd8a8;padding:8px 12px;border-radius:6px;margin:12px 0}
.grid{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.card{margin:0;width:128px;padding:6px;border:1px solid var(--line);border-radius:8px;background:#fff;text-align:center}
.card.mismatch{border-color:var(--warn)}.card.flagged{box-shadow:0 0 0 2px #fab005 inset}
.thumb{width:96px;height:96px;image-rendering:pixelated;background:#000;border-radius:4px;display:block;margin:0 auto
4px;cursor:zoom-in}
.thumb.big{width:224px;height:224px;cursor:zoom-out}
svg.thumb{background:#f8f9fb;fill:none;stroke:var(--accent);stroke-width:1.4}
figcaption{font-size:12px;color:var(--muted)}
figcaption .id{color:var(--fg);word-break:break-all}
.score{font-weight:600;color:var(--fg)}
b.mismatch{color:var(--warn)}
b.match{color:var(--ok)}
.badge{display:inline-block;margin-top:2px;padding:0 6px;border-radius:8px;background:#fab005;color:#000;font-size:11px}
.text{font:12px/1.3 ui-monospace,monospace;text-align:left;max-height:96px;overflow:auto;background:#f8f9fb;
padding:4px;border-radius:4px;margin-bottom:4px}
.query{display:grid;grid-template-columns:150px 1fr;gap:12px;padding:12px 0;border-bottom:1px dashed var(--line)}
.query h3{font-size:13px;margin:6px 0 4px;color:var(--muted);font-weight:600}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid var(--line);padding:3px 9px;text-align:right}
th{background:var(--panel);text-align:left}
pre{background:var(--panel);padding:10px;border-radius:6px;overflow:auto;max-height:480px;font-size:12px}
#histogram{width:100%;max-width:760px;height:auto}
.plotbg{fill:#fbfcfe}
.grid line,.grid{stroke:#e9ecf2}
.axis{stroke:#8a93a5}
.bar.g0{fill:#6c8ebf}.bar.g1{fill:#e8590c}.cutoff{stroke:#c92a2a;stroke-dasharray:5 4;stroke-width:1.5}
.tick{font-size:11px;fill:#5b6475}.label{font-size:12px;fill:#1d2330}.legend{font-size:12px;fill:#1d2330}
footer{padding:14px 28px;color:var(--muted);border-top:1px solid var(--line);font-size:12px}
"""

# Click a thumbnail to enlarge it; nothing else runs.
_JS = """
document.addEventListener('click', function (event) {
  var target = event.target.closest ? event.target.closest('img.thumb') : null;
  if (target) { target.classList.toggle('big'); }
});
document.documentElement.setAttribute('data-ready', '1');
"""

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def report(
    store: GradientStore | str | Path,
    task: Task | str | None = None,
    *,
    output: str | Path = "report.html",
    queries: Sequence[int] | str | None = None,
    split: str = "test",
    k: int = 5,
    top: int = 24,
    checkpoints: Sequence[str] | None = None,
    results: str | Path | dict | None = None,
    known_noisy: Sequence[int] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool | None = None,
    allow_incomplete: bool = False,
    task_options: Mapping[str, Any] | None = None,
) -> dict:
    """Write one self-contained HTML page about ``store`` to ``output`` (nothing is fetched when it is viewed).

    The page shows the self-influence histogram, the top suspected mislabeled samples (thumbnails for images,
    sparklines for signals, text for tokens) with given and predicted labels, the proponents and opponents of chosen
    queries, quality figures and the manifest. Without a loadable task it still has the histogram, the ranking and
    the manifest.

    Args:
        store: the store: a path or an opened ``GradientStore``.
        task: the task (or spec) the store was built from; default: the one its manifest records.
        output: the HTML file to write.
        queries: indices in ``split`` whose ``k`` proponents and opponents are shown (default: the first 3);
            ``[]`` or ``"none"`` for none; a string like ``"0,5,10-12"``.
        split: the split ``queries`` come from.
        k: proponents and opponents shown per query.
        top: how many of the highest self-influence samples are shown.
        checkpoints: the store's checkpoint paths, if they moved since the build.
        results: quality figures (a dict or a JSON file); default: ``results.json`` beside the store, if any.
        known_noisy: training rows known to be mislabeled (benchmarks): the histogram splits on them instead of on
            the model's disagreement with the given label.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for predictions and queries.
        batch_size: samples per batch for predictions and queries.
        progress: show progress bars (default: when stderr is a terminal).
        allow_incomplete: report on the finished shards of a store whose build has not completed.
        task_options: keyword arguments of the task factory (with ``task``), or updates of the options the store
            recorded (without).

    Returns:
        A summary: ``output, bytes, store, n_samples, suspects, queries, pictures, predictions, quality, notes``.
    """
    started = time.perf_counter()
    store = store if isinstance(store, GradientStore) else open_store(store)
    top = check_positive_int("top", top)
    k = check_positive_int("k", k)
    output = Path(output)
    if output.exists() and output.is_dir():
        raise ArgumentError(
            "output", f"output {output} is a directory; give a file name such as {output / 'report.html'}"
        )
    notes: list[str] = []
    rows, scores = store.self_influence(allow_incomplete=allow_incomplete)
    samples = _RowLookup(store.samples(allow_incomplete=allow_incomplete), store.n_samples)
    sample_ids = samples.column("sample_id")
    stored_labels = samples.column("label")

    explicit_queries = (
        queries is not None
        and not (isinstance(queries, str) and queries.strip().lower() in ("", "none"))
        and not (not isinstance(queries, str) and len(queries) == 0)
    )
    loaded_task, note = _resolve_task(store, task, task_options)
    if note:
        if explicit_queries:
            raise TaskSpecError(note.replace("to see inputs, predictions and queries", "to query"))
        notes.append(note)

    predictor = None
    if loaded_task is not None:
        checkpoint, note = _last_checkpoint(store, checkpoints)
        if note:
            notes.append(note)
        else:
            try:
                predictor = _Predictor(loaded_task, checkpoint, resolve_device(device), batch_size)
            except GradIndexError as error:
                notes.append(f"predicted labels are missing: {error}")

    order = np.lexsort((rows, -scores.astype(np.float64)))
    shown = rows[order[:top]]
    shown_scores = scores[order[:top]]

    # the histogram's split: known noise, else the model's disagreement with the given label
    groups, group_names = None, ["training samples"]
    noisy_rows = None if known_noisy is None else {int(row) for row in known_noisy}
    if noisy_rows is not None:
        groups = np.array([int(row) in noisy_rows for row in rows], dtype=np.int64)
        group_names = ["clean", "known mislabeled"]
    cards = _Cards(loaded_task, predictor, notes)
    if groups is None and predictor is not None and stored_labels is not None and len(rows) <= PREDICT_ALL_LIMIT:
        predicted_all, _ = cards._predict(loaded_task.train, rows, with_losses=False)
        if predicted_all is not None:
            given = stored_labels.take(rows)
            groups = (predicted_all != given).astype(np.int64)
            group_names = ["model agrees with the given label", "model disagrees with the given label"]
    suspect_given = stored_labels.take(shown) if stored_labels is not None else None
    suspect_cards = (
        cards.cards(
            "train",
            shown,
            scores=shown_scores,
            given=suspect_given,
            extra=["known mislabeled" if noisy_rows is not None and int(row) in noisy_rows else "" for row in shown],
            flagged=[noisy_rows is not None and int(row) in noisy_rows for row in shown],
            caption=lambda position, row: (
                f'#{position + 1} · row {row}<br><span class="id">{html.escape(str(sample_ids.get(row)))}</span>'
            ),
        )
        if len(shown)
        else []
    )

    query_html: list[str] = []
    picked: list[int] = []
    if loaded_task is not None:
        try:
            dataset = loaded_task.split(split)
        except TaskSpecError:
            if explicit_queries:
                raise
            dataset = None
            notes.append(f"the task has no split {split!r}, so no queries are shown")
        if dataset is not None:
            picked = _parse_queries(queries, len(dataset))
        if picked:
            k_found = min(k, store.n_samples)
            common = dict(
                split=split,
                samples=picked,
                k=k_found,
                checkpoints=checkpoints,
                device=device,
                batch_size=batch_size,
                progress=progress,
                allow_incomplete=allow_incomplete,
            )
            proponents = query(store, loaded_task, **common)
            opponents = query(store, loaded_task, opponents=True, **common)
            query_cards = cards.cards(
                split, picked, scores=None, given=None, caption=lambda position, row: f"{html.escape(split)} #{row}"
            )
            for position, query_id in enumerate(picked):
                section = [
                    f'<div class="query" data-query="{query_id}"><div class="grid '
                    f'query-sample">{query_cards[position]}</div><div>'
                ]
                for title, table in (
                    ("proponents (positive influence: training on them lowered this query's loss)", proponents),
                    ("opponents (negative influence: training on them raised it)", opponents),
                ):
                    mask = np.asarray(table.column("query").to_numpy() == position)
                    found_rows = table.column("row").to_numpy()[mask]
                    found_scores = table.column("score").to_numpy()[mask]
                    kind = "proponents" if title.startswith("proponents") else "opponents"
                    items = cards.cards(
                        "train",
                        found_rows,
                        scores=found_scores,
                        given=stored_labels.take(found_rows) if stored_labels is not None else None,
                        flagged=[noisy_rows is not None and int(row) in noisy_rows for row in found_rows],
                        extra=[
                            "known mislabeled" if noisy_rows is not None and int(row) in noisy_rows else ""
                            for row in found_rows
                        ],
                        caption=lambda p, row: (
                            f'row {row}<br><span class="id">{html.escape(str(sample_ids.get(row)))}</span>'
                        ),
                    )
                    section.append(f'<h3>{html.escape(title)}</h3><div class="grid {kind}">{"".join(items)}</div>')
                section.append("</div></div>")
                query_html.append("".join(section))

    quality, quality_source = None, None
    if isinstance(results, dict):
        quality, quality_source = results, "given"
    else:
        candidates = (
            [Path(results)]
            if results is not None
            else [store.path.parent / "results.json", store.path / "results.json"]
        )
        for candidate in candidates:
            if candidate.is_file():
                try:
                    quality, quality_source = json.loads(candidate.read_text()), str(candidate)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    notes.append(f"{candidate} is not valid JSON ({error}); no quality figures")
                break
        else:
            if results is not None:
                raise ArgumentError(
                    "results", f"results {results} does not exist; give the JSON file of quality figures"
                )

    details = store.describe()
    fingerprint = store.fingerprint
    method = fingerprint.get("method", {})
    projection = fingerprint.get("projection", {})
    title = f"gradindex report · {store.path.name}"
    cutoff = float(shown_scores[-1]) if len(shown_scores) else None
    histogram = _histogram_svg(scores, groups, group_names, cutoff, f"top {len(shown)} shown below")
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(str(store.path))} · method <b>{html.escape(str(method.get('name', '?')))}</b> · "
        f"projection {html.escape(str(projection.get('kind', '?')))} (dim "
        f"{html.escape(str(projection.get('dim', '?')))}) · "
        f"{store.n_samples} samples × {store.dim} ({html.escape(store.dtype)}) · "
        f"{html.escape(str(details.get('state')))}</p>",
        f"<p>task {html.escape(loaded_task.name if loaded_task is not None else 'not loaded')} · "
        f"{len(store.manifest.get('checkpoints') or [])} checkpoints · built "
        f"{html.escape(str(details.get('created_at', '?')))}</p>",
        '<nav><a href="#self-influence">self-influence</a><a href="#suspects">suspects</a>'
        + ('<a href="#queries">queries</a>' if query_html else "")
        + ('<a href="#quality">quality</a>' if quality is not None else "")
        + '<a href="#manifest">manifest</a></nav></header><main>',
    ]
    if notes:
        body.append('<div class="notes">' + "<br>".join(html.escape(note) for note in notes) + "</div>")
    body.append(
        '<section id="self-influence"><h2>Self-influence</h2>'
        "<p>Self-influence ⟨φ(z), φ(z)⟩ measures how much a training sample pulls the model towards itself. "
        "Mislabeled, duplicated and atypical samples sit in the long right tail.</p>"
        f"{histogram}</section>"
    )
    body.append(
        f'<section id="suspects"><h2>Top {len(shown)} suspected mislabeled or atypical samples</h2>'
        + (
            "<p>Highest self-influence first, with the sample's loss at the last checkpoint.</p>"
            if cards.losses_only
            else "<p>Highest self-influence first, with the label the sample was given and the class the model "
            "predicts at the last checkpoint (orange when they differ).</p>"
        )
        + f'<div class="grid suspects">{"".join(suspect_cards)}</div></section>'
    )
    if query_html:
        body.append(
            f'<section id="queries"><h2>Proponents and opponents of {len(picked)} {html.escape(split)} '
            f"sample{'s' if len(picked) != 1 else ''}</h2>"
            "<p>Score ⟨φ(q), φ(z)⟩: positive = proponent (training on z lowered the loss on q), negative = "
            "opponent.</p>" + "".join(query_html) + "</section>"
        )
    if quality is not None:
        source = "" if quality_source == "given" else f" (from {html.escape(quality_source)})"
        body.append(f'<section id="quality"><h2>Quality figures{source}</h2>{_quality_html(quality)}</section>')
    body.append(
        '<section id="manifest"><h2>Manifest</h2><details><summary>the store\'s manifest (format, fingerprint, '
        "checkpoints, layout)</summary>"
        f"<pre>{html.escape(json.dumps(details, indent=1, default=str))}</pre></details></section>"
    )
    body.append(
        f"</main><footer>gradindex {html.escape(__version__)} · generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
        f"</footer><script>{_JS}</script></body></html>"
    )
    text = "\n".join(body)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(output)
    summary = {
        "output": str(output),
        "bytes": len(text.encode("utf-8")),
        "store": str(store.path),
        "n_samples": int(len(rows)),
        "suspects": [int(row) for row in shown],
        "queries": picked,
        "pictures": cards.pictures,
        "predictions": predictor is not None,
        "quality": quality_source,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    log.info("wrote %s (%d bytes, %d pictures)", output, summary["bytes"], cards.pictures)
    return summary
