"""``gradindex demo``: the embedded default, end to end on sklearn's digits with 10% flipped labels, on an MLP that
memorises them (where attribution beats the training loss, and cosine proponents look right); and
``gradindex demo gpt2``: a tiny GPT-2 trained on procedural text with 10% corrupted sentences, indexed through the
``hf-causal-lm`` built-in task exactly as a user without Python would (no download: the text, the tokenizer and the
model are all made here)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gradindex.apps._catalog import DEMOS
from gradindex.checkpoints import load_into
from gradindex.errors import ArgumentError, TaskSpecError
from gradindex.pipeline import build, query, self_influence
from gradindex.task import Task, iter_batches, load_task
from gradindex.tasks import CORRUPTIONS, digits_with_info, procedural_corpus, word_tokenizer
from gradindex.training import TrainConfig, train

__all__ = ["DEMOS", "detection_metrics", "run_demo", "run_gpt2_demo"]


_TASK_FILE = '''"""The demo's task: sklearn digits, 10% of the training labels flipped (seed {seed}), an MLP
64-{hidden}-10."""

import gradindex.tasks


def task():
    return gradindex.tasks.digits(flip_fraction=0.1, seed={seed}, hidden={hidden})
'''


def detection_metrics(scores: np.ndarray, flipped: np.ndarray) -> dict:
    """How well ``scores`` (higher = more suspicious) find the flipped rows: AUC, AP, recall in the top 10%/20%."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    order = np.argsort(-scores, kind="stable")
    n_samples = len(scores)
    found = {}
    for fraction in (0.1, 0.2):
        top = order[: int(round(fraction * n_samples))]
        found[f"found_top{int(fraction * 100)}"] = float(flipped[top].sum() / max(1, flipped.sum()))
    return {
        "auc": float(roc_auc_score(flipped, scores)),
        "ap": float(average_precision_score(flipped, scores)),
        **found,
    }


def _training_losses(task: Task, checkpoint: Path) -> np.ndarray:
    """Every training sample's loss at ``checkpoint``, float64 ``[N]`` (the ranking self-influence is compared with)."""
    model = load_into(task.model(), checkpoint).eval()
    losses = []
    with torch.no_grad():
        for batch in iter_batches(task.train, range(len(task.train)), 512, task.collate):
            losses.append(task.loss(model, batch).double().numpy())
    return np.concatenate(losses)


def _detection_table(results: dict, echo: Callable[[str], None]) -> None:
    width = max(16, *(len(name) + 2 for name in results))
    echo(f"  {'ranking':<{width}}{'AUC':>7}{'AP':>7}{'top 10%':>9}{'top 20%':>9}")
    for name, figures in results.items():
        echo(
            f"  {name:<{width}}{figures['auc']:>7.3f}{figures['ap']:>7.3f}"
            f"{figures['found_top10']:>9.1%}{figures['found_top20']:>9.1%}"
        )


def run_demo(
    output_dir: str | Path,
    *,
    seed: int = 0,
    epochs: int = 150,
    hidden: int = 256,
    n_checkpoints: int = 5,
    proj_dim: int = 1024,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """The digits demo: an MLP that memorises its 10% flipped labels, TracIn-CP over its trajectory, honest figures.

    The model is trained until it fits nearly all of its noisy labels, so its final training loss barely tells the
    flipped labels apart; TracIn-CP's self-influence sums each sample's squared gradient over checkpoints along the
    trajectory, where the flipped labels were hard to fit, and finds them. The table prints the final training loss
    (and a random ranking) beside it. Proponents and opponents come from a second store of unit-normalized
    gradients (``normalize=True``: cosine scores per checkpoint): raw gradient products favour the samples with the
    largest gradients — the flipped ones — for every query.

    Args:
        output_dir: the folder for the task file, the checkpoints, the two stores and the results.
        seed: sets the split, the flipped labels, the initial weights and the shuffling.
        epochs: training epochs (SGD, lr 0.05, momentum 0.9); at 150 the MLP fits ~99% of its noisy labels.
        hidden: the MLP's hidden width (64-hidden-10).
        n_checkpoints: checkpoints saved evenly over the epochs, all indexed (TracIn-CP).
        proj_dim: projected dimension per checkpoint.
        progress: show progress bars (default: when stderr is a terminal).
        echo: where the summary lines go.

    Returns:
        The figures (also saved as ``results.json``): detection metrics per ranking, how well the model fits its
        labels, the proponents' labels, timings and paths.

    Raises:
        ArgumentError: fewer epochs than checkpoints, or a checkpoint count below 2 (one is not a trajectory).
    """
    if n_checkpoints < 2 or epochs < n_checkpoints:
        raise ArgumentError(
            "n_checkpoints", f"the demo needs 2 <= n_checkpoints <= epochs, got {n_checkpoints} and epochs={epochs}"
        )
    # An MLP this small gains nothing from intra-op threads, and on a busy machine their synchronisation costs
    # several times the work. One thread while the demo runs; the caller's setting comes back after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _digits_demo(output_dir, seed, epochs, hidden, n_checkpoints, proj_dim, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _digits_demo(
    output_dir: str | Path,
    seed: int,
    epochs: int,
    hidden: int,
    n_checkpoints: int,
    proj_dim: int,
    progress: bool | None,
    echo: Callable[[str], None],
) -> dict:
    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    task_file = output_dir / "demo_task.py"
    task_file.write_text(_TASK_FILE.format(seed=seed, hidden=hidden))
    task_spec = f"{task_file}:task"
    task, noise = digits_with_info(flip_fraction=0.1, seed=seed, hidden=hidden)
    echo(f"digits: {len(task.train)} training images ({noise.n_flipped} labels flipped), {len(task.test)} test images")

    config = TrainConfig(epochs=epochs, lr=0.05, batch_size=64, n_checkpoints=n_checkpoints, seed=seed)
    show_training = sys.stderr.isatty() if progress is None else progress
    checkpoints = train(task, config, output_dir / "checkpoints", progress=show_training)
    final_losses = _training_losses(task, checkpoints[-1].path)
    fitted = float((final_losses < math.log(2)).mean())  # the noisy label is the model's most likely class
    echo(
        f"trained an MLP 64-{hidden}-10 for {epochs} epochs until it fits its labels: {fitted:.1%} of the noisy "
        f"training labels fitted, mean training loss {final_losses.mean():.2g}; checkpoints at epochs "
        f"{', '.join(str(c.epoch) for c in checkpoints)}"
    )

    specs = [c.cli_spec() for c in checkpoints]
    store_path, cosine_path = output_dir / "digits.gradindex", output_dir / "digits-cosine.gradindex"
    build_started = time.perf_counter()
    common = {"proj_dim": proj_dim, "seed": seed, "overwrite": True, "progress": progress}
    store = build(task_spec, specs, store_path, **common)
    cosine = build(task_spec, specs, cosine_path, normalize=True, **common)
    build_seconds = time.perf_counter() - build_started
    echo(
        f"built {store_path.name} (TracIn-CP over the {len(specs)} checkpoints, for self-influence) and "
        f"{cosine_path.name} (the same, unit-normalized: cosine scores, for proponents), "
        f"{store.n_samples} x {store.dim} {store.dtype} each, in {build_seconds:.1f}s"
    )

    ranking = self_influence(store)
    self_scores = np.empty(store.n_samples, dtype=np.float64)
    self_scores[ranking.column("row").to_numpy()] = ranking.column("score").to_numpy()
    flipped = noise.flipped_mask
    rng = np.random.default_rng(seed)
    results = {
        "self_influence": detection_metrics(self_scores, flipped),
        "training_loss": detection_metrics(final_losses, flipped),
        "random": detection_metrics(rng.random(store.n_samples), flipped),
    }
    echo("\nmislabeled detection (10% flipped labels; higher is better):")
    _detection_table(
        {
            "self-influence (TracIn-CP)": results["self_influence"],
            "final training loss": results["training_loss"],
            "random": results["random"],
        },
        echo,
    )
    if results["self_influence"]["auc"] >= results["training_loss"]["auc"]:
        echo(
            "  self-influence beats the final training loss: "
            + ("the model memorised the flipped labels, so their final loss is small, but " if fitted >= 0.95 else "")
            + "their gradients were large all along the trajectory"
        )
    else:
        echo("  self-influence does not beat the final training loss on this draw (AUC above)")

    test_targets = task.test.tensors[1].numpy()
    train_labels = noise.noisy_labels
    query_samples = [0, 1, 2]
    proponents = query(cosine, split="test", samples=query_samples, k=3, progress=progress)
    opponents = query(cosine, split="test", samples=query_samples, k=3, opponents=True, progress=progress)
    echo(
        f"\ntop proponents (+) and opponents (-) of three test digits (cosine: each checkpoint's score in [-1, 1], "
        f"weighted by its learning rate, {sum(c.lr for c in checkpoints):g} at most):"
    )
    for query_id in query_samples:
        echo(f"  test #{query_id} (label {test_targets[query_id]}):")
        for sign, table in (("+", proponents), ("-", opponents)):
            picked = table.filter(np.asarray(table.column("query_id").to_numpy() == query_id))
            cells = [
                f"row {row} (label {train_labels[row]}{f', truly {noise.clean_labels[row]}' if flipped[row] else ''}) "
                f"{score:+.3g}"
                for row, score in zip(picked.column("row").to_pylist(), picked.column("score").to_pylist())
            ]
            echo(f"    {sign} " + "; ".join(cells))
    raw = query(store, split="test", samples=query_samples, k=3, progress=progress)
    shown = {
        "cosine": proponents.column("row").to_numpy(),
        "raw": raw.column("row").to_numpy(),
    }
    results["proponents_flipped"] = {name: float(flipped[rows].mean()) for name, rows in shown.items()}
    echo(
        f"  (flipped labels among these top proponents: {results['proponents_flipped']['cosine']:.0%} by cosine, "
        f"{results['proponents_flipped']['raw']:.0%} by raw gradient products, which favour large-gradient outliers)"
    )

    results["fitted_fraction"] = fitted
    results["final_training_loss"] = float(final_losses.mean())
    results["build_seconds"] = build_seconds
    results["total_seconds"] = time.perf_counter() - started
    results["store"] = str(store_path)
    results["cosine_store"] = str(cosine_path)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    pq.write_table(ranking, output_dir / "self_influence.parquet")
    pq.write_table(proponents, output_dir / "proponents.parquet")
    echo(
        f"\nstores: {store_path}, {cosine_path}\nresults: {output_dir / 'results.json'}, "
        f"{output_dir / 'self_influence.parquet'}, {output_dir / 'proponents.parquet'}"
    )
    echo(f"next: gradindex query {cosine_path} --samples 0-4 -k 5   |   gradindex self-influence {store_path} --top 20")
    echo(f"done in {results['total_seconds']:.0f}s")
    return results


# ---- the GPT-2 demo -------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, prefix: str, sentences: list[str]) -> None:
    with path.open("w", encoding="utf-8") as sink:
        for row, sentence in enumerate(sentences):
            sink.write(json.dumps({"id": f"{prefix}-{row:04d}", "text": sentence}) + "\n")


def _gpt2_folder(folder: Path, tokenizer, n_positions: int, width: int, layers: int) -> None:
    """A model folder as ``save_pretrained`` leaves it before training: the config (a tiny GPT-2 with tied input and
    output embeddings, no dropout) and the tokenizer."""
    try:
        from transformers import GPT2Config
    except ImportError:
        raise TaskSpecError('the gpt2 demo needs transformers: pip install "gradindex[hf]"') from None
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _decoded(task: Task, split: str, row: int) -> str:
    """A sample's text as the task's tokenizer decodes its token ids (the round trip a report makes)."""
    ids = task.split(split)[row]["input_ids"].tolist()
    return task.tokenizer.decode(ids, skip_special_tokens=True)


def run_gpt2_demo(
    output_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 800,
    n_test: int = 100,
    epochs: int = 8,
    proj_dim: int = 1024,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """The text demo: procedural sentences (10% corrupted: shuffled or noise words) written as jsonl files, a
    word-level tokenizer and a tiny GPT-2 trained here (``save_pretrained`` checkpoint folders), the store built by the
    ``hf-causal-lm`` built-in task from those files and folders (the command it amounts to is printed), the
    corrupted sentences ranked by self-influence against the training loss and a random ranking, and the
    proponents and opponents of three test sentences as decoded text.

    Args:
        output_dir: the folder for the data, the model folder with its checkpoints, the store and the results.
        seed: sets the sentences, the corruption, the initial weights and the projection.
        n_train: training sentences.
        n_test: test sentences.
        epochs: training epochs (3 checkpoints, evenly spaced).
        proj_dim: projected dimension per checkpoint.
        progress: show progress bars (default: when stderr is a terminal).
        echo: where the summary lines go.

    Returns:
        The figures (also saved as ``results.json``): detection metrics per ranking, timings, paths.

    Raises:
        TaskSpecError: transformers or tokenizers is not installed (``pip install "gradindex[hf]"``).
        ArgumentError: fewer than 3 epochs.
    """
    if epochs < 3:
        raise ArgumentError("epochs", f"epochs must be at least 3 (one per checkpoint), got {epochs}")
    # A model this small gains nothing from intra-op threads; on a busy machine their synchronisation made the demo
    # several times slower. One thread while it runs; the caller's setting comes back after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gpt2_demo(output_dir, seed, n_train, n_test, epochs, proj_dim, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _gpt2_demo(
    output_dir: str | Path,
    seed: int,
    n_train: int,
    n_test: int,
    epochs: int,
    proj_dim: int,
    progress: bool | None,
    echo: Callable[[str], None],
) -> dict:
    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    data_dir, model_dir = output_dir / "data", output_dir / "gpt2"
    data_dir.mkdir(parents=True, exist_ok=True)
    corpus = procedural_corpus(n_train=n_train, n_test=n_test, corrupt_fraction=0.1, seed=seed)
    _write_jsonl(data_dir / "train.jsonl", "train", corpus.train)
    _write_jsonl(data_dir / "test.jsonl", "test", corpus.test)
    tokenizer = word_tokenizer(corpus.train, extra_words=corpus.vocabulary())
    longest = max(len(sentence.split()) for sentence in corpus.train + corpus.test) + 2  # with <s> and </s>
    _gpt2_folder(model_dir, tokenizer, n_positions=max(32, longest), width=32, layers=2)
    kinds = ", ".join(f"{corpus.corruption.count(kind)} {kind}" for kind in CORRUPTIONS)
    echo(
        f"gpt2: {n_train} training sentences ({len(corpus.corrupted_rows)} corrupted: {kinds}), {n_test} test "
        f"sentences, a vocabulary of {len(tokenizer)} words"
    )

    # the task a user without Python gets: --task hf-causal-lm with these --task-arg options
    options = {
        "model": str(model_dir),
        "train": str(data_dir / "train.jsonl"),
        "test": str(data_dir / "test.jsonl"),
        "sample_id": "id",
    }
    task = load_task("hf-causal-lm", **options)
    config = TrainConfig(
        epochs=epochs, lr=3e-3, batch_size=32, optimizer="adam", momentum=0.9, n_checkpoints=3, seed=seed
    )
    show_training = sys.stderr.isatty() if progress is None else progress
    checkpoints = train(task, config, model_dir, progress=show_training)
    n_parameters = sum(parameter.numel() for parameter in task.model().parameters())
    echo(
        f"trained a GPT-2 (2 layers, width 32, tied embeddings, {n_parameters:,} parameters) for {epochs} epochs; "
        f"checkpoints {', '.join(c.path.name for c in checkpoints)}"
    )

    store_path = output_dir / "gpt2.gradindex"
    specs = [c.cli_spec() for c in checkpoints]
    build_started = time.perf_counter()
    store = build(
        "hf-causal-lm", specs, store_path, task_options=options, proj_dim=proj_dim, seed=seed, overwrite=True,
        progress=progress,
    )  # fmt: skip
    build_seconds = time.perf_counter() - build_started
    command = " ".join(
        ["gradindex build --task hf-causal-lm"]
        + [f"--task-arg {key}={value}" for key, value in options.items()]
        + [f"--checkpoint {spec}" for spec in specs]
        + [f"-o {store_path} --proj-dim {proj_dim}"]
    )
    echo(f"built {store_path} ({store.n_samples} x {store.dim} {store.dtype}) in {build_seconds:.1f}s, as")
    echo(f"  {command}")

    ranking = self_influence(store)
    self_scores = np.empty(store.n_samples, dtype=np.float64)
    self_scores[ranking.column("row").to_numpy()] = ranking.column("score").to_numpy()
    corrupted = corpus.corrupted_mask
    rng = np.random.default_rng(seed)
    results = {
        "self_influence": detection_metrics(self_scores, corrupted),
        "training_loss": detection_metrics(_training_losses(task, checkpoints[-1].path), corrupted),
        "random": detection_metrics(rng.random(store.n_samples), corrupted),
    }
    echo("\ncorrupted-sentence detection (10% shuffled or noise words; higher is better):")
    _detection_table(results, echo)

    query_samples = list(range(min(3, n_test)))
    proponents = query(store, split="test", samples=query_samples, k=3, progress=progress)
    opponents = query(store, split="test", samples=query_samples, k=2, opponents=True, progress=progress)
    echo("\ntop proponents (+) and opponents (-) of three test sentences, decoded by the task's tokenizer:")
    for query_id in query_samples:
        echo(f'  test #{query_id}: "{_decoded(task, "test", query_id)}"')
        for sign, table in (("+", proponents), ("-", opponents)):
            picked = table.filter(np.asarray(table.column("query_id").to_numpy() == query_id))
            for row, score in zip(picked.column("row").to_pylist(), picked.column("score").to_pylist()):
                kind = f" [{corpus.corruption[row]}]" if corrupted[row] else ""
                echo(f'    {sign} row {row:<4} {score:+.3g}  "{_decoded(task, "train", row)}"{kind}')

    results["build_seconds"] = build_seconds
    results["total_seconds"] = time.perf_counter() - started
    results["store"] = str(store_path)
    results["task"] = {"spec": "hf-causal-lm", "options": options}
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    pq.write_table(ranking, output_dir / "self_influence.parquet")
    pq.write_table(proponents, output_dir / "proponents.parquet")
    echo(f"\nstore: {store_path}\nresults: {output_dir / 'results.json'}, {output_dir / 'self_influence.parquet'}")
    echo(f"next: gradindex query {store_path} --samples 0-4 -k 5   |   gradindex report {store_path} -o report.html")
    echo(f"done in {results['total_seconds']:.0f}s")
    return results
