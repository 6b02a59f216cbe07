"""Checkpoints written beside training (``sweeper.saving``): the same files as the trainer's own save, its
errors raised by the run, and the trainer's clean-up of older checkpoints left to the written ones."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sweeper import saving
from sweeper.disk import DiskFullError
from sweeper.trial import run

from .conftest import FAST
from .helpers import Recorder

LORA = [*FAST, "peft=lora", "lr=lora", "seed=3", "eval.eval_steps=2"]  # a new best at most evaluations: many saves


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _untimed(state: dict) -> dict:
    """A trainer state less what differs between two runs of the same steps: its path and the clock's figures."""
    history = [{k: v for k, v in e.items() if not k.endswith(("_runtime", "_per_second"))} for e in state["log_history"]]
    return {**{k: v for k, v in state.items() if k != "best_model_checkpoint"}, "log_history": history}


def _run(compose_cfg, tmp_path: Path, name: str, *more: str) -> tuple[float, Recorder, Path]:
    rec = Recorder()
    value = run(compose_cfg(*LORA, *more), reporter=rec)
    ckpt = Path(rec.attrs["best_checkpoint"])
    kept = tmp_path / name
    shutil.copytree(ckpt.parent, kept)  # the job's folder, before the next run writes into it
    shutil.rmtree(ckpt.parent)
    return value, rec, kept / ckpt.name


@pytest.mark.slow
def test_a_checkpoint_written_beside_training_holds_what_the_trainers_own_save_writes(compose_cfg, tmp_path,
                                                                                      monkeypatch):
    installed = []
    real = saving.install
    monkeypatch.setattr(saving, "install", lambda trainer: installed.append(real(trainer)) or installed[-1])
    value, rec, ours = _run(compose_cfg, tmp_path, "beside")
    monkeypatch.setattr(saving, "install", lambda trainer: installed.append(False) or False)
    own_value, own_rec, own = _run(compose_cfg, tmp_path, "own")
    assert installed == [True, False]
    assert value == own_value and ours.name == own.name
    assert sorted(p.name for p in ours.parent.iterdir()) == sorted(p.name for p in own.parent.iterdir())  # rotated
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in own.iterdir())
    assert _tensors_equal(load_file(ours / "adapter_model.safetensors"), load_file(own / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert _tensors_equal(torch.load(ours / name, weights_only=False), torch.load(own / name, weights_only=False)), name
    state, own_state = (json.loads((p / "trainer_state.json").read_text()) for p in (ours, own))
    assert state["best_model_checkpoint"].endswith(ours.name) and state["global_step"] == own_state["global_step"]
    assert _untimed(state) == _untimed(own_state)
    # the run saved more than once (each save waits for the one before) and reports the written checkpoint
    assert len([e for e in state["log_history"] if "eval_loss" in e]) >= 3
    assert rec.attrs["best_checkpoint"].endswith(ours.name)


@pytest.mark.slow
def test_a_save_that_fails_beside_training_fails_the_run_with_its_cause(compose_cfg, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError, match="paths.output_dir"):
        run(compose_cfg(*LORA), reporter=Recorder())
