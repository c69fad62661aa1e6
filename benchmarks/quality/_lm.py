"""Attribution quality on language-model-shaped tasks: LDS on a tiny GPT-2, mislabel detection on a tiny BERT.

    nice -n 10 python -m benchmarks.quality._lm [--fast] [--methods tracin-1,trak,...] [--peers bergson,kronfluence]

1. LDS on a causal LM. A GPT-2 built from a ``transformers`` config (2 layers, width 32, word-level vocabulary of the
   procedural grammar in ``gradindex.tasks.procedural_corpus``) is pretrained on sentences of half the grammar's
   subjects, then fine-tuned with Adam on ``LM["n_train"]`` sentences of every subject. Ground truth: ``LM["subsets"]``
   random half-size subsets of the fine-tuning set, each fine-tuned again from the same pretrained weights with the
   same recipe and batch order seed; the per-sequence loss (mean next-token cross-entropy) of ``LM["n_queries"]``
   held-out query sentences under each retrained model. LDS: Spearman over subsets of the summed scores against
   −loss (and against the sequence margin, TRAK's output function), mean over queries.
2. Mislabel detection on a sequence classifier. A BERT built from a config (2 layers, width 32) classifies a sentence
   by its subject (6 classes); 10% of the training labels are flipped and the model is trained until it fits them;
   training rows ranked by self-influence; AUC, AP and the share of flips in the top 10% / 20%, beside the training
   loss and random rankings.

Methods are picked by name from ``benchmarks.quality._methods.METHOD_CONFIGS`` (rows other modules register, as
``_ekfac_rows`` does for ``ekfac``, run here too when that module is importable); their checkpoint kinds here:
``final`` (the fine-tuned model), ``trajectory`` (the end of each fine-tuning epoch, weight = the learning rate),
``independent`` (fine-tunes from the same pretrained weights with other batch-order seeds: TRAK's models), ``gex`` /
``ensemble`` (geometric-ensemble members around the final model, ``gradindex.ensemble``). TRAK is projected to
``TRAK_DIM`` (a quarter of the training set, fixed before any run).

Peers on the same models, data and query points: Bergson (``bergson.collect_gradients``, its build path on the
``PreTrainedModel``: per-module gradients of every Linear / Conv1D of the base model, no projection, per-sequence mean
loss, scores = inner products of its query and training gradients; on the classifier, self-influence = its gradient's
squared norm) and kronfluence (EK-FAC, ``Analyzer`` on CPU; it supports ``nn.Linear`` / ``nn.Conv2d`` only, so GPT-2's
``Conv1D`` layers are handed to it as ``nn.Linear`` with the transposed weight: the same function).

Results: ``benchmarks/results/quality_lm.json``, ``quality_lm.png`` and the ``quality-lm`` section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

import gradindex
from benchmarks.quality._methods import METHOD_CONFIGS, MethodConfig, NotRun, check_runnable, method_scores, self_scores
from benchmarks.quality._settings import Setting
from gradindex.apps.demo import detection_metrics

__all__ = ["CLASSIFIER", "LM", "main", "run"]

log = logging.getLogger("benchmarks.quality")

# the LM task (full run; --fast shrinks it)
LM = dict(
    n_pretrain=300,
    n_train=256,
    n_queries=50,
    subsets=100,
    width=32,
    layers=2,
    heads=2,
    pretrain_epochs=12,
    epochs=6,
    lr=3e-3,
    batch_size=16,
    independent=5,
)
CLASSIFIER = dict(n_train=400, n_test=60, width=32, layers=2, heads=2, epochs=40, lr=3e-3, batch_size=16)
FAST_LM = dict(n_pretrain=120, n_train=64, n_queries=8, subsets=12, pretrain_epochs=6, epochs=3, independent=2)
FAST_CLASSIFIER = dict(n_train=80, n_test=10, epochs=25)
PRETRAIN_SUBJECTS = ("cat", "dog", "farmer")  # pretraining sees half the grammar; fine-tuning teaches the rest
TRAK_DIM_FRACTION = 4  # TRAK's k = n_train / 4
LM_METHODS = (
    "tracin-1",
    "tracin-cp",
    "trak",
    "trak-5",
    "gex",
    "ekfac",
    "kfac",
    "tracin-1-blocks",
    "tracin-1-unit",
    "trackstar-adam",
    "trackstar-adam-blocks",
    "trackstar",
    "trackstar-mix",
)
CLASSIFIER_METHODS = ("tracin-1", "tracin-cp", "trak", "gex", "ekfac", "kfac")
PEERS = ("bergson", "kronfluence")
ENSEMBLE = dict(members=5, steps=40, lr=0.05, schedule="cosine")
# gradindex on Bergson's parameter scope (the Conv1D / Linear modules of GPT-2's blocks: no embeddings, norms or head)
LM_CONFIGS = {
    "tracin-1-blocks": MethodConfig(
        "tracin",
        "final",
        layers=("*.c_attn", "*.c_proj", "*.c_fc"),
        note="TracIn at the fine-tuned model on the blocks' Conv1D layers only (Bergson's scope)",
    ),
    # TrackStar (Chang et al. 2024) from the fine-tune's own Adam state, and the control without Adam's normaliser
    "tracin-1-unit": MethodConfig(
        "tracin", "final", normalize=True, note="TracIn at the fine-tuned model, unit-normalised (cosine)"
    ),
    "trackstar-adam": MethodConfig(
        "tracin",
        "final",
        build={"adam_normalize": True},
        normalize=True,
        note="TrackStar without curvature: gradients divided by √v̂ + ε of the fine-tune's Adam state, unit-normalised",
    ),
    "trackstar-adam-blocks": MethodConfig(
        "tracin",
        "final",
        build={"adam_normalize": True},
        normalize=True,
        layers=("*.c_attn", "*.c_proj", "*.c_fc"),
        note="trackstar-adam on Bergson's parameter scope (the blocks' Conv1D layers): the row to hold beside "
        "bergson-adam",
    ),
    "trackstar": MethodConfig(
        "tracin",
        "final",
        build={"adam_normalize": True, "precondition": "ekfac", "precondition_side": "both"},
        normalize=True,
        projection=("kron", None),
        note="TrackStar: Adam-normalised gradients (Adafactor factors per layer), EK-FAC^-1/2 on both sides, "
        "unit-normalised",
    ),
    "trackstar-mix": MethodConfig(
        "tracin",
        "final",
        build={
            "adam_normalize": True,
            "precondition": "ekfac",
            "precondition_side": "both",
            "precondition_mix": 0.9,
        },
        normalize=True,
        projection=("kron", None),
        note="trackstar with the query curvature mixed in: 0.9·H_query + 0.1·H_train (the query sentences)",
    ),
}


def _register_other_rows() -> None:
    """Rows other modules add to METHOD_CONFIGS (e.g. ``ekfac``), when they are there to import."""
    try:
        import benchmarks.quality._ekfac_rows  # noqa: F401
    except ImportError as error:
        log.info("no EK-FAC rows: %s", error)


# ---- data and models ---------------------------------------------------------------------------------------------


def _tokenized(tokenizer, sentences: list[str]) -> list[dict]:
    return [{"input_ids": torch.tensor(tokenizer(s)["input_ids"], dtype=torch.long)} for s in sentences]


def _collate(task, items: list):
    """A batch of ``items`` as the library collates it (the task's collate, else ``collate_samples``)."""
    from gradindex.task import collate_samples

    return (task.collate or collate_samples)(items)


def _train(task, items: list, init: dict, *, epochs: int, lr: float, batch_size: int, seed: int, save=None) -> dict:
    """Adam on the mean of the task's per-sample loss, from ``init``; ``save(epoch, state, optimizer_state)`` after
    each epoch."""
    model = task.model()
    model.load_state_dict(init)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = _collate(task, [items[i] for i in order[start : start + batch_size]])
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, batch).mean().backward()
            optimizer.step()
        if save is not None:
            save(epoch, model.state_dict(), optimizer.state_dict())
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _evaluate(task, state: dict, items: list, function) -> np.ndarray:
    model = task.model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return function(model, _collate(task, items)).double().numpy()


def _lm_setting(seed: int, root: Path, spec: dict):
    """The fine-tuned GPT-2, its checkpoints and the LDS ground truth."""
    from transformers import GPT2Config

    corpus = gradindex.tasks.procedural_corpus(
        n_train=spec["n_pretrain"] * 3 + spec["n_train"], n_test=spec["n_queries"], corrupt_fraction=0.0, seed=seed
    )
    tokenizer = gradindex.tasks.word_tokenizer(corpus.train, extra_words=corpus.vocabulary())
    pretrain = [s for s, subject in zip(corpus.train, corpus.subjects) if subject in PRETRAIN_SUBJECTS]
    pretrain = pretrain[: spec["n_pretrain"]]
    used = set(pretrain)
    finetune = [s for s in corpus.train if s not in used][: spec["n_train"]]
    longest = max(len(tokenizer(s)["input_ids"]) for s in [*corpus.train, *corpus.test])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(16, longest),
        n_embd=spec["width"],
        n_layer=spec["layers"],
        n_head=spec["heads"],
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    train_items, query_items = _tokenized(tokenizer, finetune), _tokenized(tokenizer, corpus.test)
    task = gradindex.Task.causal_lm(config, train_items, query_items, tokenizer=tokenizer, name="tiny-gpt2")
    workdir = root / f"tiny-gpt2-seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    init = task.model().state_dict()
    started = time.perf_counter()
    base = _train(
        task,
        _tokenized(tokenizer, pretrain),
        init,
        epochs=spec["pretrain_epochs"],
        lr=spec["lr"],
        batch_size=spec["batch_size"],
        seed=seed,
    )
    trajectory = []

    def save(epoch, state, optimizer_state):
        # the optimizer state beside the weights, as training loops save it: TrackStar's rows read Adam's moments
        path = workdir / f"finetune-{epoch + 1:02d}.pt"
        torch.save({"model": state, "optimizer": optimizer_state}, path)
        trajectory.append(f"{path}:{spec['lr']!r}")

    recipe = dict(epochs=spec["epochs"], lr=spec["lr"], batch_size=spec["batch_size"])
    final = _train(task, train_items, base, seed=seed + 1, save=save, **recipe)
    timings = {"pretrain+finetune_s": round(time.perf_counter() - started, 1)}
    setting = Setting(name="tiny-gpt2", seed=seed, task=task, workdir=workdir, train_config=None, make_model=task.model)
    setting.n_params = sum(p.numel() for p in task.model().parameters())
    setting.checkpoints["final"] = [trajectory[-1].rsplit(":", 1)[0] + ":1.0"]
    setting.checkpoints["trajectory"] = trajectory

    def independent() -> list[str]:
        paths = [setting.checkpoints["final"][0]]  # the fine-tune itself is run 0
        for run_ in range(1, spec["independent"]):
            state = _train(task, train_items, base, seed=seed + 1 + 1000 * run_, **recipe)
            path = workdir / f"independent-{run_}.pt"
            torch.save(state, path)
            paths.append(f"{path}:1.0")
        return paths

    setting.lazy = {"independent": independent, **_ensemble_kinds(setting, workdir, spec["batch_size"])}
    # ground truth: fine-tune on each half subset from the same pretrained weights, same recipe and batch-order seed
    rng = np.random.default_rng([seed, 31])
    n = len(train_items)
    subsets = np.stack([np.sort(rng.choice(n, size=n // 2, replace=False)) for _ in range(spec["subsets"])])
    masks = np.zeros((len(subsets), n))
    masks[np.arange(len(subsets))[:, None], subsets] = 1.0
    started = time.perf_counter()
    losses, margins = [], []
    for rows in subsets:
        state = _train(task, [train_items[i] for i in rows], base, seed=seed + 1, **recipe)
        losses.append(_evaluate(task, state, query_items, task.loss))
        margins.append(_evaluate(task, state, query_items, task.margin))
    timings["retrain_s"] = round(time.perf_counter() - started, 1)
    truth = {
        "masks": masks,
        "loss": np.stack(losses),
        "margin": np.stack(margins),
        "tests": np.arange(len(query_items)),
        "full_loss": _evaluate(task, final, query_items, task.loss),
        "base_loss": _evaluate(task, base, query_items, task.loss),
    }
    optimizer = torch.load(trajectory[-1].rsplit(":", 1)[0], weights_only=True)["optimizer"]
    return setting, truth, timings, {"base": base, "final": final, "config": config, "optimizer": optimizer}


def _ensemble_kinds(setting, workdir: Path, batch_size: int) -> dict:
    def ensemble(kind: str) -> list[str]:
        from gradindex.ensemble import make_ensemble

        members = make_ensemble(
            setting.task,
            setting.checkpoints["final"][0].rsplit(":", 1)[0],
            workdir / "ge",
            overwrite=True,
            seed=setting.seed,
            batch_size=batch_size,
            **ENSEMBLE,
        )
        setting.checkpoints["ensemble"] = members.tracin_checkpoints()
        setting.checkpoints["gex"] = members.gex_checkpoints()
        return setting.checkpoints[kind]

    return {"ensemble": lambda: ensemble("ensemble"), "gex": lambda: ensemble("gex")}


def _classifier_setting(seed: int, root: Path, spec: dict):
    """The BERT-like subject classifier trained to fit 10% flipped labels."""
    from transformers import BertConfig

    corpus = gradindex.tasks.procedural_corpus(
        n_train=spec["n_train"], n_test=spec["n_test"], corrupt_fraction=0.0, seed=seed + 100
    )
    tokenizer = gradindex.tasks.word_tokenizer(corpus.train, extra_words=corpus.vocabulary())
    subjects = sorted(set(corpus.subjects))
    labels = np.array([subjects.index(s) for s in corpus.subjects])
    noise = gradindex.tasks.flip_labels(labels, 0.1, len(subjects), seed)
    test_labels = [subjects.index(next(w for w in s.split() if w in subjects)) for s in corpus.test]
    longest = max(len(tokenizer(s)["input_ids"]) for s in [*corpus.train, *corpus.test])
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["width"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=2 * spec["width"],
        max_position_embeddings=max(16, longest),
        num_labels=len(subjects),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    items = [
        {**item, "labels": torch.tensor(int(label))}
        for item, label in zip(_tokenized(tokenizer, corpus.train), noise.noisy_labels)
    ]
    tests = [
        {**item, "labels": torch.tensor(int(label))}
        for item, label in zip(_tokenized(tokenizer, corpus.test), test_labels)
    ]
    task = gradindex.Task.sequence_classification(config, items, tests, tokenizer=tokenizer, name="tiny-bert")
    workdir = root / f"tiny-bert-seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    init = task.model().state_dict()
    trajectory = []
    checkpoint_epochs = set(np.linspace(spec["epochs"] / 4, spec["epochs"], 4).round().astype(int) - 1)

    def save(epoch, state, optimizer_state):
        if epoch in checkpoint_epochs:
            path = workdir / f"epoch-{epoch + 1:03d}.pt"
            torch.save(state, path)
            trajectory.append(f"{path}:{spec['lr']!r}")

    started = time.perf_counter()
    final = _train(
        task, items, init, epochs=spec["epochs"], lr=spec["lr"], batch_size=spec["batch_size"], seed=seed, save=save
    )
    setting = Setting(
        name="tiny-bert-noisy", seed=seed, task=task, workdir=workdir, train_config=None, make_model=task.model
    )
    setting.noise = noise
    setting.n_params = sum(p.numel() for p in task.model().parameters())
    setting.checkpoints["final"] = [trajectory[-1].rsplit(":", 1)[0] + ":1.0"]
    setting.checkpoints["trajectory"] = trajectory
    setting.lazy = _ensemble_kinds(setting, workdir, spec["batch_size"])
    train_loss = _evaluate(task, final, items, task.loss)
    logits_model = task.model()
    logits_model.load_state_dict(final)
    logits_model.eval()
    with torch.no_grad():
        test_batch = _collate(task, tests)
        predicted = logits_model(input_ids=test_batch["input_ids"], attention_mask=test_batch["attention_mask"]).logits
    setting.accuracy = float((predicted.argmax(1).numpy() == np.array(test_labels)).mean())
    extra = {
        "train_s": round(time.perf_counter() - started, 1),
        "test_accuracy": setting.accuracy,
        "train_loss": train_loss,
        "fits_flips": float((train_loss[noise.flipped_mask] < np.log(2)).mean()),
    }
    return setting, extra, {"final": final, "config": config}


# ---- scores ------------------------------------------------------------------------------------------------------


def lds(scores: np.ndarray, truth: dict) -> dict:
    """Spearman over subsets of the summed scores against −loss and against the margin, mean over queries."""
    summed = scores @ truth["masks"].T
    by_loss = [spearmanr(summed[q], -truth["loss"][:, q])[0] for q in range(len(summed))]
    by_margin = [spearmanr(summed[q], truth["margin"][:, q])[0] for q in range(len(summed))]
    return {"lds_loss": float(np.nanmean(by_loss)), "lds_margin": float(np.nanmean(by_margin))}


def _lm_config(name: str, setting):
    """The configuration as these models take it: TRAK at k = n / TRAK_DIM_FRACTION, unprojected gradients for the
    other gradient methods without a projection of their own (tens of thousands of parameters, a few hundred rows),
    GEX unprojected (its vectors are losses)."""
    from dataclasses import replace

    config = {**METHOD_CONFIGS, **LM_CONFIGS}[name]
    if config.method == "trak":
        n = len(setting.task.train)
        return replace(config, projection=("rademacher", max(16, n // TRAK_DIM_FRACTION)))
    if config.projection is None:
        return replace(config, projection=("none", setting.n_params))
    return config


def _attempt(records: list, base: dict, work) -> None:
    started = time.perf_counter()
    try:
        metrics = work()
    except NotRun as reason:
        records.append({**base, "status": str(reason)})
        return
    except Exception as error:  # one failing method must not hide the others
        log.warning("%s failed: %s", base, error)
        records.append(
            {
                **base,
                "status": f"failed: {type(error).__name__}: {str(error)[:300]}",
                "traceback": traceback.format_exc()[-2000:],
            }
        )
        return
    records.append({**base, "status": "ok", **metrics, "seconds": round(time.perf_counter() - started, 2)})


def _bergson_adam_normalizers(model: nn.Module, optimizer_state: dict) -> dict:
    """Bergson's ``AdamNormalizer`` of every Conv1D / Linear of GPT-2's blocks from the fine-tune's Adam state (one
    parameter group over ``model.parameters()``): the raw ``exp_avg_sq`` oriented ``[out, in]``, as its Trainer
    callback reads it."""
    from bergson.gradients import AdamNormalizer
    from transformers.pytorch_utils import Conv1D

    names = [name for name, _ in model.named_parameters()]
    moments = {names[int(index)]: entry["exp_avg_sq"] for index, entry in optimizer_state["state"].items()}
    prefix = "transformer."
    normalizers = {}
    for name, module in model.named_modules():
        if isinstance(module, (Conv1D, nn.Linear)) and name.startswith(prefix) and f"{name}.weight" in moments:
            weight = moments[f"{name}.weight"]
            normalizers[name[len(prefix) :]] = AdamNormalizer(
                weight.T.contiguous() if isinstance(module, Conv1D) else weight, moments.get(f"{name}.bias")
            )
    return normalizers


def _peer_vectors_bergson(model: nn.Module, items: list, pad: int, normalizers: dict | None = None) -> torch.Tensor:
    """Bergson's per-sample gradients of every Linear / Conv1D of the base model (its build path), ``[N, D]``; with
    ``normalizers``, divided by Adam's second moments first (its TrackStar normaliser)."""
    from bergson import GradientProcessor, IndexConfig, collect_gradients, load_gradients
    from datasets import Dataset

    rows = [item["input_ids"].tolist() for item in items]
    data = Dataset.from_dict({"input_ids": rows, "length": [len(row) for row in rows]})
    if "labels" in items[0] and items[0]["labels"].ndim == 0:
        raise NotRun("not run (bergson's collect_gradients scores causal-LM token losses; see the classifier note)")
    folder = tempfile.mkdtemp(prefix="bergson-")
    try:
        cfg = IndexConfig(run_path=f"{folder}/run", projection_dim=0, loss_reduction="mean", include_bias=True)
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        processor = GradientProcessor(projection_dim=None, include_bias=True)
        if normalizers:
            processor.normalizers = dict(normalizers)
        batches = [[i] for i in range(len(rows))]
        collect_gradients(model, data, processor, cfg, batches=batches)
        found = load_gradients(cfg.partial_run_path)
        if found.dtype.names:  # a structured array: one field per module
            return torch.cat(
                [torch.from_numpy(np.asarray(found[name], dtype=np.float32)) for name in found.dtype.names], 1
            )
        return torch.from_numpy(np.asarray(found, dtype=np.float32))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bergson_lm(setting, models: dict, adam: bool = False) -> dict:
    """Bergson's scores: raw gradient inner products, or (``adam``) cosines of Adam-normalised gradients (TrackStar
    without its curvature: its AdamNormalizer from the fine-tune's optimizer state, then unit normalisation)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(models["config"])
    model.load_state_dict(models["final"])
    model.eval()
    normalizers = _bergson_adam_normalizers(model, models["optimizer"]) if adam else None
    train = _peer_vectors_bergson(model, list(setting.task.train), 0, normalizers).double()
    queries = _peer_vectors_bergson(model, list(setting.task.test), 0, normalizers).double()
    if adam:
        train, queries = nn.functional.normalize(train, dim=1), nn.functional.normalize(queries, dim=1)
    return {"scores": (queries @ train.T).numpy(), "dims": int(train.shape[1])}


def _conv1d_as_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every HF ``Conv1D`` replaced by the ``nn.Linear`` computing the same function."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data.copy_(child.weight.data.T)
                linear.bias.data.copy_(child.bias.data)
                setattr(module, child_name, linear)
    return model


def _kronfluence(setting, state: dict, *, pairwise: bool) -> np.ndarray:
    """kronfluence's EK-FAC (its defaults: true Fisher, damping 0.1 x mean eigenvalue) on the same model: pairwise
    scores ``[queries, train]`` of the query losses, or self-influence ``[train]``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask
    from kronfluence.utils.dataset import DataLoaderKwargs

    task = setting.task
    model = task.model()
    model.load_state_dict(state)
    model = _conv1d_as_linear(model).eval()

    class Wrapped(KTask):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            if not sample:
                return task.loss(model, batch).sum()
            # the true Fisher: labels drawn from the model's own predictions
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
            with torch.no_grad():
                probabilities = torch.softmax(logits.detach().flatten(0, -2).float(), -1)
                drawn = torch.multinomial(probabilities, 1).reshape(logits.shape[:-1])
                if logits.ndim == 3:  # causal LM: the logits at t predict token t + 1, the loss shifts labels
                    labels = torch.full_like(drawn, -100)
                    labels[:, 1:] = drawn[:, :-1]
                    if batch.get("attention_mask") is not None:
                        labels[batch["attention_mask"] == 0] = -100
                else:
                    labels = drawn
            return task.loss(model, {**batch, "labels": labels}).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return task.loss(model, batch).sum()

        def get_attention_mask(self, batch):
            return batch.get("attention_mask")

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = list(rows)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, index):
            return self.rows[index]

    ktask = Wrapped()
    model = prepare_model(model, ktask)
    folder = tempfile.mkdtemp(prefix="kronfluence-")
    try:
        analyzer = Analyzer(analysis_name="lm", model=model, task=ktask, output_dir=folder, disable_tqdm=True, cpu=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=lambda rows: _collate(task, rows)))
        train = Rows(task.train)
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=16,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        if pairwise:
            analyzer.compute_pairwise_scores(
                scores_name="pairwise",
                factors_name="ekfac",
                query_dataset=Rows(task.test),
                train_dataset=train,
                per_device_query_batch_size=16,
                per_device_train_batch_size=16,
                score_args=ScoreArguments(),
                overwrite_output_dir=True,
            )
            scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
        else:
            analyzer.compute_self_scores(
                scores_name="self",
                factors_name="ekfac",
                train_dataset=train,
                per_device_train_batch_size=16,
                score_args=ScoreArguments(),
                overwrite_output_dir=True,
            )
            scores = analyzer.load_self_scores("self")["all_modules"]
        return scores.double().numpy()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the experiments -----------------------------------------------------------------------------------------------


def run_lm_lds(seed: int, root: Path, spec: dict, methods, peers) -> tuple[list[dict], dict]:
    setting, truth, timings, models = _lm_setting(seed, root, spec)
    base = {
        "experiment": "lm-lds",
        "setting": setting.name,
        "seed": seed,
        "n_params": setting.n_params,
        "n_train": len(setting.task.train),
        "n_queries": len(setting.task.test),
        "subsets": len(truth["masks"]),
    }
    records: list[dict] = []
    for name in methods:
        if name not in METHOD_CONFIGS and name not in LM_CONFIGS:
            records.append({**base, "method": name, "status": "not run (no such configuration here)"})
            continue

        def work(name=name):
            config = _lm_config(name, setting)
            check_runnable(name, config, setting, "lds")
            scores, timing = method_scores(name, config, setting, truth["tests"])
            return {**lds(scores, truth), **timing}

        _attempt(records, {**base, "method": name}, work)
    if "bergson" in peers:
        _attempt(records, {**base, "method": "bergson"}, lambda: _peer_lds(_bergson_lm(setting, models), truth))
        _attempt(
            records,
            {**base, "method": "bergson-adam"},
            lambda: _peer_lds(_bergson_lm(setting, models, adam=True), truth),
        )
    if "kronfluence" in peers:
        _attempt(
            records,
            {**base, "method": "kronfluence-ekfac"},
            lambda: lds(_kronfluence(setting, models["final"], pairwise=True), truth),
        )
    rng = np.random.default_rng([seed, 4])
    shape = (len(truth["tests"]), truth["masks"].shape[1])
    _attempt(records, {**base, "method": "random"}, lambda: lds(rng.standard_normal(shape), truth))
    info = {
        **timings,
        "query_loss_base": float(truth["base_loss"].mean()),
        "query_loss_finetuned": float(truth["full_loss"].mean()),
        "query_loss_retrained_mean": float(truth["loss"].mean()),
        "n_params": setting.n_params,
    }
    return records, info


def _peer_lds(found: dict, truth: dict) -> dict:
    return {**lds(found["scores"], truth), "dims": found["dims"]}


def run_classifier_detection(seed: int, root: Path, spec: dict, methods, peers) -> tuple[list[dict], dict]:
    setting, extra, models = _classifier_setting(seed, root, spec)
    flipped = setting.noise.flipped_mask
    base = {
        "experiment": "lm-mislabel",
        "setting": setting.name,
        "seed": seed,
        "n_params": setting.n_params,
        "n_train": len(flipped),
        "n_flipped": int(flipped.sum()),
        "test_accuracy": extra["test_accuracy"],
        "fits_flips": extra["fits_flips"],
    }
    records: list[dict] = []
    for name in methods:
        if name not in METHOD_CONFIGS:
            records.append({**base, "method": name, "status": "not run (no such configuration here)"})
            continue

        def work(name=name):
            config = _lm_config(name, setting)
            check_runnable(name, config, setting, "mislabel")
            scores, timing = self_scores(name, config, setting)
            return {**detection_metrics(scores, flipped), **timing}

        _attempt(records, {**base, "method": name}, work)
    if "kronfluence" in peers:
        _attempt(
            records,
            {**base, "method": "kronfluence-ekfac"},
            lambda: detection_metrics(_kronfluence(setting, models["final"], pairwise=False), flipped),
        )
    if "bergson" in peers:
        records.append(
            {
                **base,
                "method": "bergson",
                "status": "not run (bergson's collect_gradients takes causal-LM token losses on a PreTrainedModel; "
                "a sequence classifier's loss is not among its loss_fn choices ce / kl / log_odds over next tokens)",
            }
        )
    _attempt(records, {**base, "method": "train-loss"}, lambda: detection_metrics(extra["train_loss"], flipped))
    rng = np.random.default_rng([seed, 5])
    _attempt(records, {**base, "method": "random"}, lambda: detection_metrics(rng.random(len(flipped)), flipped))
    return records, {
        "train_s": extra["train_s"],
        "test_accuracy": extra["test_accuracy"],
        "fits_flips": extra["fits_flips"],
    }


def run(
    *,
    fast: bool = False,
    seeds: list[int] | None = None,
    experiments: list[str] | None = None,
    methods: list[str] | None = None,
    peers: list[str] | None = None,
    workdir: str | Path | None = None,
) -> dict:
    """Run the LM experiments and return the JSON payload (records, summary, machine, timings)."""
    from benchmarks._report import machine
    from benchmarks.quality._output import aggregate

    _register_other_rows()
    seeds = seeds if seeds is not None else [0]
    experiments = experiments or ["lm-lds", "lm-mislabel"]
    peers = PEERS if peers is None else peers
    lm_spec = {**LM, **(FAST_LM if fast else {})}
    classifier_spec = {**CLASSIFIER, **(FAST_CLASSIFIER if fast else {})}
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gi-quality-lm-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny steps: one thread, no spin-waiting on a shared machine
    started, cpu_started = time.perf_counter(), time.process_time()
    records: list[dict] = []
    info: dict = {}
    try:
        for seed in seeds:
            if "lm-lds" in experiments:
                tick = time.perf_counter()
                found, details = run_lm_lds(seed, root, lm_spec, list(methods or LM_METHODS), peers)
                records += found
                info[f"lm-lds seed {seed}"] = {**details, "wall_s": round(time.perf_counter() - tick, 1)}
            if "lm-mislabel" in experiments:
                tick = time.perf_counter()
                found, details = run_classifier_detection(
                    seed, root, classifier_spec, list(methods or CLASSIFIER_METHODS), peers
                )
                records += found
                info[f"lm-mislabel seed {seed}"] = {**details, "wall_s": round(time.perf_counter() - tick, 1)}
    finally:
        torch.set_num_threads(threads)
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    versions = {}
    for package in ("bergson", "kronfluence", "transformers", "torch"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = None
    return {
        "benchmark": "quality-lm",
        "mode": "fast" if fast else "full",
        "seeds": seeds,
        "experiments": experiments,
        "lm": lm_spec,
        "classifier": classifier_spec,
        "method_configs": {
            name: {"method": c.method, "checkpoints": c.checkpoints, "build": c.build, "note": c.note}
            for name, c in {**METHOD_CONFIGS, **LM_CONFIGS}.items()
            if name in (methods or set(LM_METHODS) | set(CLASSIFIER_METHODS))
        },
        "versions": versions,
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "details": info,
        "summary": aggregate(records),
        "records": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality._lm", description=__doc__)
    parser.add_argument("--fast", action="store_true", help="tiny settings (the smoke test's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--experiments", help="lm-lds,lm-mislabel (default both)")
    parser.add_argument("--methods", help="method configurations by name (default: LM_METHODS / CLASSIFIER_METHODS)")
    parser.add_argument("--peers", help="bergson,kronfluence (default both; 'none' for neither)")
    parser.add_argument("--workdir", help="keep models and stores here")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/quality_lm.json)")
    parser.add_argument("--no-markdown", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--note", help="a sentence for the section's header (how the run was made)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from benchmarks._report import RESULTS_DIR, update_section

    names = lambda text: [part.strip() for part in text.split(",") if part.strip()] if text else None  # noqa: E731
    peers = names(args.peers)
    payload = run(
        fast=args.fast,
        seeds=[int(s) for s in names(args.seeds)],
        experiments=names(args.experiments),
        methods=names(args.methods),
        peers=[] if peers == ["none"] else peers,
        workdir=args.workdir,
    )
    if args.note:
        payload["note"] = args.note
    path = Path(args.output) if args.output else RESULTS_DIR / "quality_lm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    text = markdown(payload)
    written = plot(payload, path.parent)
    print(text + f"\n\nwrote {path}" + "".join(f", {p}" for p in written))
    if not args.no_markdown and not args.fast:
        update_section("quality-lm", text)
    return 0


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _value(row: dict, metric: str) -> str:
    if metric not in row:
        return "—"
    return f"{row[metric]:.3f} ± {row.get(metric + '_std', 0.0):.3f}"


def markdown(payload: dict) -> str:
    """The ``quality-lm`` section of RESULTS.md: the two tables, how they were made, and what did not run."""
    lm, classifier = payload["lm"], payload["classifier"]
    seeds = payload["seeds"]
    versions = ", ".join(f"{name} {version}" for name, version in payload["versions"].items() if version)
    lines = [
        "## Attribution quality on language-model tasks (`python -m benchmarks.quality._lm`)",
        "",
        f"{payload['mode']} run, seeds {', '.join(map(str, seeds))} (mean ± std over seeds), "
        f"{payload['wall_seconds'] / 60:.1f} min wall on {payload['machine']['cores']} shared cores "
        f"({payload['machine']['cpu']}); {versions}. " + (payload.get("note") or ""),
        "",
    ]
    tables = {
        "lm-lds": (
            f"### LDS on a tiny GPT-2 ({lm['n_train']} fine-tuning sentences, {lm['subsets']} half-size subsets "
            f"retrained, {lm['n_queries']} query sentences)",
            ["lds_loss", "lds_margin"],
        ),
        "lm-mislabel": (
            f"### Mislabel detection on a tiny BERT classifier ({classifier['n_train']} sentences, 10% labels flipped)",
            ["auc", "ap", "found_top10", "found_top20"],
        ),
    }
    for experiment, (title, metrics) in tables.items():
        rows = [row for row in payload["summary"] if row["experiment"] == experiment]
        if not rows:
            continue
        lines += [title, "", "| method | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for row in rows:
            if row["status"] != "ok":
                lines.append(f"| {row['method']} | 0 | {row['status']} |" + " |" * (len(metrics) - 1))
                continue
            lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(_value(row, m) for m in metrics) + " |")
        lines.append("")
    details = payload.get("details", {})
    for name, info in details.items():
        lines.append(
            f"* {name}: "
            + ", ".join(f"{key} {value:.4g}" for key, value in info.items() if isinstance(value, (int, float)))
        )
    lines += [
        "",
        "LDS: the GPT-2 (config: 2 layers, width 32, word-level vocabulary) is pretrained on sentences of three of the "
        "grammar's six subjects, then fine-tuned with Adam (lr 3e-3, batch 16) on sentences of all six; each random "
        "half of the fine-tuning set is fine-tuned again from the same pretrained weights with the same recipe and "
        "batch-order seed. lds_loss: Spearman over subsets of the summed scores against −(query loss), the "
        "per-sequence mean "
        "next-token cross-entropy; lds_margin: against the sequence margin (TRAK's output function). Methods by name "
        "from METHOD_CONFIGS: `tracin-1` the fine-tuned model, `tracin-cp` the end of each fine-tuning epoch "
        "(weight = lr), `trak` TRAK-1 and `trak-5` TRAK over 5 fine-tunes with other batch orders (k = n/4 "
        "Rademacher, damping auto), `gex` GEX over 5 geometric-ensemble members, `ekfac` / `kfac` preconditioned "
        "TracIn (the EK-FAC helper's rows) when registered. TrackStar (Chang et al. 2024) from the fine-tune's own "
        "Adam state (each checkpoint file holds the optimizer's state dict beside the weights): `tracin-1-unit` "
        "unit-normalised TracIn (the control), `trackstar-adam` gradients divided by Adam's √v̂ + ε, then "
        "unit-normalised (exact gradients), `trackstar` the same with Adafactor's rank-1 factors of v̂ folded into "
        "the kron sides (k = 4096) and EK-FAC^-1/2 on both sides before the unit normalisation, `trackstar-mix` with "
        "the curvature 0.9·H_query + 0.1·H_train (`--precondition-mix 0.9`, H_query from the query sentences); "
        "`trackstar-adam-blocks` is `trackstar-adam` on Bergson's scope, beside "
        "`bergson-adam`: Bergson's own AdamNormalizer (the raw exp_avg_sq of the same optimizer state, [out, in]) "
        "in `collect_gradients`, then unit-normalised — its TrackStar without the curvature step. "
        "Bergson: `collect_gradients` on the same "
        "`GPT2LMHeadModel` (every Conv1D / Linear of the base model, unprojected, mean loss per sequence), scores = "
        "inner products of query and training gradients (its raw-gradient attribution; its own EK-FAC / TrackStar "
        "preconditioners, a multi-stage pipeline of its own, were not wired up here). kronfluence: EK-FAC with its "
        "defaults (true Fisher, damping 0.1 × mean "
        "eigenvalue) on the same weights, GPT-2's Conv1D layers handed to it as nn.Linear (the same function); its "
        "scores ∇ℓ(q)ᵀ(G + λ)⁻¹∇ℓ(z) have gradindex's sign (positive = training on z lowers the query loss).",
        "",
        f"Mislabel detection: a BERT (config: 2 layers, width 32) classifies a sentence by its subject (6 classes); "
        f"10% of the training labels are flipped; trained with Adam (lr 3e-3, batch 16) for {classifier['epochs']} "
        "epochs. The subject word decides the label, so the model mostly does not fit its flipped labels (fits_flips "
        "above: the share of flipped rows whose training loss is below log 2; 15% after 120 epochs and 45% after "
        "250 on seed 0): "
        "the regime where the training loss itself separates them. Rows ranked by self-influence. Bergson has no row "
        "here: its collect_gradients scores next-token losses of a causal LM (loss_fn ce / kl / log_odds).",
        "",
        "`tracin-1-blocks` is gradindex's TracIn on Bergson's parameter scope (GPT-2's Conv1D layers; no embeddings, "
        "norms or head): it equals Bergson's row to the digit, so Bergson's lower LDS is its scope, not its numerics; "
        "the embeddings carry much of a word-level LM's attribution signal.",
        "",
        "Plot: `benchmarks/results/quality_lm.png`. Raw per-seed records: `benchmarks/results/quality_lm.json`.",
    ]
    return "\n".join(lines)


def plot(payload: dict, directory: Path) -> list[Path]:
    """``quality_lm.png``: LDS per method (LM) and AUC per method (classifier), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("lm-lds", "lds_loss", "LDS (−loss), tiny GPT-2"), ("lm-mislabel", "auc", "mislabel AUC, tiny BERT")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (experiment, metric, title) in zip(axes, panels):
        rows = [r for r in payload["summary"] if r["experiment"] == experiment and metric in r]
        axis.barh(
            [r["method"] for r in rows], [r[metric] for r in rows], xerr=[r.get(metric + "_std", 0) for r in rows]
        )
        axis.set_title(title)
        axis.invert_yaxis()
    fig.tight_layout()
    path = directory / f"quality_lm{'_fast' if payload['mode'] == 'fast' else ''}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    sys.exit(main())
