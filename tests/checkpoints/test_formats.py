"""Checkpoints the way people save them, each built for real and loaded into the task's model: Hugging Face
``save_pretrained`` folders (safetensors, sharded safetensors, pytorch_model.bin, sharded bin), Trainer and Accelerate
checkpoint folders, a folder holding one weight file, Lightning ``{"state_dict": ...}`` files, DDP and torch.compile
prefixes; tied weights restored; the folder's sha256; and the mistakes, each one sentence."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tied_models
import torch
import torch.distributed as dist
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from gradindex import CheckpointError, CheckpointSpec, GradIndexWarning
from gradindex.checkpoints import checkpoint_files, checkpoint_sha256, load_into, load_state_dict


def _assert_holds(model: torch.nn.Module, saved: torch.nn.Module) -> None:
    """Every tensor of ``saved``'s state dict (tied names included) equals ``model``'s, and ties are still ties."""
    loaded = model.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded[name], value), name
    if isinstance(model, GPT2LMHeadModel):
        assert model.lm_head.weight is model.transformer.wte.weight


def _fresh_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(999)  # other weights than any saved model's
    return tied_models.gpt2()


def _fresh_shared() -> tied_models.SharedLinear:
    torch.manual_seed(999)
    return tied_models.SharedLinear()


def _sha256sum_listing(folder, names) -> str:
    """What ``cd folder && sha256sum NAMES | sha256sum`` prints (names sorted), computed independently."""
    lines = "".join(f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n" for name in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()


def _save_bin_shards(model: torch.nn.Module, folder) -> list[str]:
    """A sharded pytorch_model.bin the way transformers 4 wrote one (huggingface_hub's splitter; tied names once)."""
    state = {name: value for name, value in model.state_dict().items() if name != "lm_head.weight"}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=1500)
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: state[name].clone() for name in names}, folder / filename)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    )
    return sorted(split.filename_to_tensors)


def _trainer_checkpoint(folder, seed: int) -> GPT2LMHeadModel:
    """What transformers.Trainer leaves in ``checkpoint-N``: save_pretrained files and the training state."""
    torch.manual_seed(seed)
    model = tied_models.gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               folder / "rng_state.pth")  # fmt: skip
    torch.save({"learning_rate": 1e-3, "output_dir": str(folder.parent)}, folder / "training_args.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    return model


# ---- Hugging Face folders ------------------------------------------------------------------------------------------


def test_save_pretrained_safetensors_folder_restores_the_tied_head(tmp_path):
    saved = tied_models.save_gpt2(tmp_path / "gpt2", seed=1)
    assert "lm_head.weight" not in load_file(tmp_path / "gpt2" / "model.safetensors")  # what save_pretrained drops
    assert checkpoint_files(tmp_path / "gpt2") == [tmp_path / "gpt2" / "model.safetensors"]
    _assert_holds(load_into(_fresh_gpt2(), tmp_path / "gpt2"), saved)
    # the file alone loads too, and a copy of the head under its own name (equal values) is fine
    _assert_holds(load_into(_fresh_gpt2(), tmp_path / "gpt2" / "model.safetensors"), saved)
    save_file({name: value.clone() for name, value in saved.state_dict().items()}, tmp_path / "both.safetensors")
    _assert_holds(load_into(_fresh_gpt2(), tmp_path / "both.safetensors"), saved)


def test_sharded_safetensors_folder(tmp_path):
    saved = tied_models.gpt2()
    saved.save_pretrained(tmp_path / "gpt2", max_shard_size="2KB")
    shards = sorted(path.name for path in (tmp_path / "gpt2").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "gpt2" / "model.safetensors").exists()
    files = checkpoint_files(tmp_path / "gpt2")
    assert [path.name for path in files] == ["model.safetensors.index.json", *shards]
    _assert_holds(load_into(_fresh_gpt2(), tmp_path / "gpt2"), saved)
    assert len(load_state_dict(tmp_path / "gpt2")) == len(saved.state_dict()) - 1  # every shard merged, no head


def test_pytorch_model_bin_folders_single_and_sharded(tmp_path):
    torch.manual_seed(2)
    saved = tied_models.gpt2()
    single, sharded = tmp_path / "bin", tmp_path / "sharded-bin"
    for folder in (single, sharded):
        saved.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
    torch.save(saved.state_dict(), single / "pytorch_model.bin")  # transformers 4: every name, the tied ones too
    shards = _save_bin_shards(saved, sharded)
    assert len(shards) > 1
    for folder in (single, sharded):
        _assert_holds(load_into(_fresh_gpt2(), folder), saved)
        # the fixtures are what transformers itself reads
        _assert_holds(GPT2LMHeadModel.from_pretrained(folder), saved)
    assert [path.name for path in checkpoint_files(sharded)] == ["pytorch_model.bin.index.json", *shards]


def test_safetensors_is_preferred_over_bin_like_from_pretrained(tmp_path):
    saved = tied_models.save_gpt2(tmp_path / "both", seed=3)
    torch.manual_seed(4)
    torch.save(tied_models.gpt2().state_dict(), tmp_path / "both" / "pytorch_model.bin")
    assert checkpoint_files(tmp_path / "both") == [tmp_path / "both" / "model.safetensors"]
    _assert_holds(load_into(_fresh_gpt2(), tmp_path / "both"), saved)


def test_trainer_and_accelerate_folders_read_only_the_weights(tmp_path):
    trainer = tmp_path / "out" / "checkpoint-4"
    trainer.mkdir(parents=True)
    saved = _trainer_checkpoint(trainer, seed=5)
    assert checkpoint_files(trainer) == [trainer / "model.safetensors"]
    _assert_holds(load_into(_fresh_gpt2(), trainer), saved)
    # Accelerate's save_state: model.safetensors beside optimizer.bin, scheduler.bin, random_states_0.pkl, scaler.pt
    accelerate = tmp_path / "accelerate" / "checkpoint_0"
    accelerate.mkdir(parents=True)
    torch.manual_seed(6)
    model = tied_models.SharedLinear()
    save_file({name: value for name, value in model.state_dict().items() if not name.startswith("again.")},
              accelerate / "model.safetensors")  # fmt: skip
    torch.save(torch.optim.SGD(model.parameters(), lr=0.1).state_dict(), accelerate / "optimizer.bin")
    torch.save({"step": 3}, accelerate / "scheduler.bin")
    torch.save({"scale": 1.0}, accelerate / "scaler.pt")
    (accelerate / "random_states_0.pkl").write_bytes(b"\x80\x04N.")
    _assert_holds(load_into(_fresh_shared(), accelerate), model)


def test_a_folder_holding_one_weight_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    saved = tied_models.save_shared(folder / "final.pt", seed=7)
    (folder / "notes.txt").write_text("lr 0.1")
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")  # training state never counts
    assert checkpoint_files(folder) == [folder / "final.pt"]
    _assert_holds(load_into(_fresh_shared(), folder), saved)


# ---- wrapped and prefixed state dicts ------------------------------------------------------------------------------


def test_lightning_checkpoint_with_its_attribute_prefix(tmp_path):
    torch.manual_seed(8)
    saved = tied_models.gpt2()
    optimizer = torch.optim.Adam(saved.parameters())
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        # a LightningModule holding the network as self.model: every name under "model.", the tied head too
        "state_dict": {f"model.{name}": value for name, value in saved.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "best_model_path": ""}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.001, "n_embd": 8},
    }
    torch.save(lightning, tmp_path / "epoch=3-step=120.ckpt")
    _assert_holds(load_into(_fresh_gpt2(), tmp_path / "epoch=3-step=120.ckpt"), saved)
    # another module beside the network (a weighted loss's buffer): read the network, say what was left out
    lightning["state_dict"]["criterion.weight"] = torch.ones(3)
    torch.save(lightning, tmp_path / "with-criterion.ckpt")
    with pytest.warns(
        GradIndexWarning, match="names under 'model.'; 1 other tensors \\(criterion.weight\\) were left out"
    ):
        _assert_holds(load_into(_fresh_gpt2(), tmp_path / "with-criterion.ckpt"), saved)


def test_ddp_and_torch_compile_prefixes(tmp_path):
    torch.manual_seed(9)
    saved = tied_models.SharedLinear()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(saved)
        torch.save(ddp.state_dict(), tmp_path / "ddp.pt")
    finally:
        dist.destroy_process_group()
    assert all(name.startswith("module.") for name in torch.load(tmp_path / "ddp.pt"))
    _assert_holds(load_into(_fresh_shared(), tmp_path / "ddp.pt"), saved)
    torch.save(torch.compile(saved).state_dict(), tmp_path / "compiled.pt")
    assert all(name.startswith("_orig_mod.") for name in torch.load(tmp_path / "compiled.pt"))
    _assert_holds(load_into(_fresh_shared(), tmp_path / "compiled.pt"), saved)
    # both, and torch.compile on a submodule (its _orig_mod. inside the names)
    torch.save({f"module._orig_mod.{k}": v for k, v in saved.state_dict().items()}, tmp_path / "both.pt")
    _assert_holds(load_into(_fresh_shared(), tmp_path / "both.pt"), saved)
    inner = {k.replace("shared.", "shared._orig_mod.").replace("again.", "again._orig_mod."): v
             for k, v in saved.state_dict().items()}  # fmt: skip
    torch.save(inner, tmp_path / "inner.pt")
    _assert_holds(load_into(_fresh_shared(), tmp_path / "inner.pt"), saved)


def test_a_model_whose_own_names_start_with_the_prefix_is_read_as_saved(tmp_path):
    """Stripping is a last resort: names that fit as saved are never stripped."""
    torch.manual_seed(10)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = tied_models.SharedLinear()

    saved = Wrapper()
    torch.save(saved.state_dict(), tmp_path / "wrapper.pt")
    torch.manual_seed(999)
    _assert_holds(load_into(Wrapper(), tmp_path / "wrapper.pt"), saved)


# ---- the sha256 of a folder ----------------------------------------------------------------------------------------


def test_folder_sha256_is_the_listing_of_its_weight_files(tmp_path):
    folder = tmp_path / "gpt2"
    saved = tied_models.gpt2()
    saved.save_pretrained(folder, max_shard_size="2KB")
    weights = [path.name for path in checkpoint_files(folder)]
    digest = checkpoint_sha256(folder)
    assert digest == _sha256sum_listing(folder, weights)
    # other files of the folder do not count
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"edited": True}))
    assert checkpoint_sha256(folder) == digest
    # a process of its own computes the same digest (nothing random, nothing per process)
    code = f"from gradindex.checkpoints import checkpoint_sha256; print(checkpoint_sha256({str(folder)!r}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == (
        digest
    )
    # the weights count: one shard changed, another digest
    shard = folder / weights[1]
    state = load_file(shard)
    save_file({name: value + 1 for name, value in state.items()}, shard)
    assert checkpoint_sha256(folder) != digest
    # a file's digest is the file's own sha256, as before
    assert checkpoint_sha256(shard) == hashlib.sha256(shard.read_bytes()).hexdigest()


# ---- specs ---------------------------------------------------------------------------------------------------------


def test_folder_specs_with_a_weight_and_folders_named_with_a_colon(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    assert CheckpointSpec.parse(f"{folder}:0.1") == CheckpointSpec(path=str(folder), weight=0.1)
    assert CheckpointSpec.parse(str(folder)) == CheckpointSpec(path=str(folder), weight=1.0)
    colon = tmp_path / "step:20"
    colon.mkdir()
    assert CheckpointSpec.parse(str(colon)) == CheckpointSpec(path=str(colon), weight=1.0)  # never split
    assert CheckpointSpec.parse(f"{colon}:0.5") == CheckpointSpec(path=str(colon), weight=0.5)


# ---- mistakes ------------------------------------------------------------------------------------------------------


def test_folder_mistakes_are_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is a folder holding no model weights; give a save_pretrained"):
        load_into(_fresh_shared(), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist; check its path"):
        checkpoint_sha256(tmp_path / "nope")
    out = tmp_path / "out"
    for step in (10, 2):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        tied_models.save_gpt2(out / f"checkpoint-{step}", seed=step)
    with pytest.raises(
        CheckpointError,
        match=r"out is a Trainer output folder holding checkpoint-2, checkpoint-10 and no weights of its own; give one "
        r"of them, e.g. .*out/checkpoint-10$",
    ):
        checkpoint_sha256(out)
    several = tmp_path / "several"
    several.mkdir()
    tied_models.save_shared(several / "a.pt", seed=1)
    tied_models.save_shared(several / "b.pt", seed=2)
    with pytest.raises(CheckpointError, match=r"several weight files \(a.pt, b.pt\); give the one to load"):
        load_into(_fresh_shared(), several)


def test_a_missing_shard_and_a_broken_index(tmp_path):
    folder = tmp_path / "gpt2"
    tied_models.gpt2().save_pretrained(folder, max_shard_size="2KB")
    index = folder / "model.safetensors.index.json"
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names the shard {shard.name}, which is not there; copy the whole"):
        load_into(_fresh_gpt2(), folder)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="is not readable JSON with a weight_map"):
        checkpoint_sha256(folder)


def test_tied_names_saved_with_different_values(tmp_path):
    torch.manual_seed(11)
    state = tied_models.gpt2().state_dict()
    state = {name: value.clone() for name, value in state.items()}
    state["lm_head.weight"] += 1.0  # an untied model's head, loaded into the tied model
    torch.save(state, tmp_path / "untied.pt")
    with pytest.raises(
        CheckpointError,
        match="holds different values for transformer.wte.weight and lm_head.weight, which the task's model ties",
    ):
        load_into(_fresh_gpt2(), tmp_path / "untied.pt")


def test_mismatches_name_the_prefix_they_were_read_with(tmp_path):
    torch.manual_seed(12)
    other = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    torch.save({f"module.{k}": v for k, v in tied_models.SharedLinear().state_dict().items() if k != "out.bias"},
               tmp_path / "ddp.pt")  # fmt: skip
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the task's model \(missing out.bias\) \(read with 'module.' removed from its names\)",
    ):
        load_into(_fresh_shared(), tmp_path / "ddp.pt")
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"does not fit the task's model \(missing inp.weight"):
        load_into(_fresh_shared(), tmp_path / "other.pt")
    two = {
        f"{prefix}.{k}": v for prefix in ("model", "ema") for k, v in tied_models.SharedLinear().state_dict().items()
    }
    torch.save({"state_dict": two, "epoch": 1}, tmp_path / "two.ckpt")
    with pytest.raises(CheckpointError, match=r"holds the model under several prefixes \('ema.', 'model.'\)"):
        load_into(_fresh_shared(), tmp_path / "two.ckpt")


def test_nan_weights_in_a_folder_are_refused(tmp_path):
    model = tied_models.save_gpt2(tmp_path / "gpt2", seed=13)
    state = {name: value.clone() for name, value in model.state_dict().items() if name != "lm_head.weight"}
    state["transformer.wte.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "gpt2" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"NaN or infinite values in transformer.wte.weight \(1 of 104\)"):
            load_into(_fresh_gpt2(), tmp_path / "gpt2")


def test_a_file_pickling_objects_is_refused_with_the_way_out(tmp_path):
    """weights_only loading never runs code from a file: a Lightning file with Namespace hyper-parameters says how to
    save its weights alone."""
    torch.save({"state_dict": tied_models.SharedLinear().state_dict(), "hyper_parameters": argparse.Namespace(lr=1)},
               tmp_path / "namespace.ckpt")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"it pickles a argparse.Namespace beside its tensors, .* if you trust"):
        load_into(_fresh_shared(), tmp_path / "namespace.ckpt")
    torch.save(torch.load(tmp_path / "namespace.ckpt", weights_only=False)["state_dict"], tmp_path / "weights.pt")
    load_into(_fresh_shared(), tmp_path / "weights.pt")
