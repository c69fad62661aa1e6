"""Three transformer families end to end through the command line, as a Hugging Face user brings them: a tied GPT-2,
a BERT classifier and a Llama-style LM, each built from a config, trained a few steps, saved as ``checkpoint-N/``
folders with ``save_pretrained``, built with the default (kron) projection and queried in another process; the
projected scores must track exact TracIn (the same build with ``--projection none``) query by query."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hf_folders import checkpoints, classifier_folder, llama_folder, lm_folder
from scipy.stats import spearmanr

import gradindex
from gradindex.cli import cli

pytest.importorskip("transformers")

N_TRAIN = 40
MAIN = "from gradindex.cli import main; main()"
FAMILIES = {
    "gpt2": ("hf-causal-lm", lm_folder),
    "bert": ("hf-classifier", classifier_folder),
    "llama": ("hf-causal-lm", llama_folder),
}


@pytest.fixture
def one_thread():
    """kron's calibration runs small dense eigendecompositions, slow with two OpenMP threads on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(options: dict, specs: list[str], output, *extra: str) -> None:
    args = ["-q", "build", "--task", options.pop("_spec")]
    for key, value in options.items():
        args += ["--task-arg", f"{key}={value}"]
    for spec in specs:
        args += ["--checkpoint", spec]
    result = CliRunner().invoke(cli, [*args, "-o", str(output), *extra])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_saved_transformer_is_built_queried_and_tracks_exact_tracin(family, tmp_path, one_thread):
    spec, make_folder = FAMILIES[family]
    files = make_folder(tmp_path / "data", n_train=N_TRAIN, n_test=4)
    options = {"model": str(files["model"]), "train": str(files["train"]), "test": str(files["test"])}
    specs = checkpoints(spec, options, tmp_path / "run", epochs=3, lr=3e-3)
    for folder in (Path(spec.rsplit(":", 1)[0]) for spec in specs):  # save_pretrained folders
        assert folder.name.startswith("checkpoint-") and (folder / "config.json").is_file(), specs
        assert (folder / "model.safetensors").is_file()
    kron, exact = tmp_path / "kron.gradindex", tmp_path / "exact.gradindex"
    _build({"_spec": spec, **options}, specs, kron)
    _build({"_spec": spec, **options}, specs, exact, "--projection", "none")
    plan = gradindex.open_store(kron).fingerprint["projection"]
    assert plan["kind"] == "kron"
    # the query runs in a fresh process, from the store's recorded task and options alone
    result = subprocess.run(
        [sys.executable, "-c", MAIN, "query", str(kron), "-k", str(N_TRAIN), "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    truth = gradindex.query(exact, k=N_TRAIN).to_pylist()
    for query in range(4):
        found = {row["row"]: row["score"] for row in rows if row["query_id"] == query}
        true = {row["row"]: row["score"] for row in truth if row["query_id"] == query}
        assert sorted(found) == sorted(true) == list(range(N_TRAIN))
        order = sorted(true)
        rho = spearmanr([found[row] for row in order], [true[row] for row in order]).statistic
        assert rho >= 0.9, f"{family} query {query}: Spearman {rho:.3f} against exact TracIn"
    # self-influence of the stored column agrees too
    stored, true_self = (
        dict(zip(table.column("row").to_pylist(), table.column("score").to_pylist()))
        for table in (gradindex.self_influence(kron), gradindex.self_influence(exact))
    )
    assert sorted(stored) == list(range(N_TRAIN)) and np.all(np.isfinite(list(stored.values())))
    assert (
        spearmanr([stored[row] for row in range(N_TRAIN)], [true_self[row] for row in range(N_TRAIN)]).statistic >= 0.9
    )
