"""Fixtures of the reliability suite: checkpoints and reference stores, built once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability import harness, rel_tasks

import gradindex


@dataclass
class Env:
    root: Path  # scratch space for the sweeps (tmpfs when there is one: faults, not the disk, are tested)
    checkpoints: list[str]  # one checkpoint of rel_tasks.mlp
    big: Path  # an uninterrupted build of harness.BIG
    big_bytes: dict
    small: Path  # an uninterrupted build of harness.SMALL
    small_bytes: dict

    def fresh(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


@pytest.fixture(scope="session")
def env():
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="gi-reliability-", dir=base))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the forked children agree
    try:
        (root / "ckpt").mkdir()
        checkpoints = rel_tasks.save_checkpoints(root / "ckpt", count=1)
        big = gradindex.build(harness.BIG, checkpoints, root / "reference-big.gradindex", **harness.BIG_OPTIONS)
        small = gradindex.build(harness.SMALL, checkpoints, root / "reference-small.gradindex", **harness.SMALL_OPTIONS)
        yield Env(root, checkpoints, big.path, harness.snapshot(big.path), small.path, harness.snapshot(small.path))
    finally:
        torch.set_num_threads(threads)
        harness.stop_children()
        shutil.rmtree(root, ignore_errors=True)
