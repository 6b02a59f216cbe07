"""Fault injection for the tests and the chaos suite: off unless the environment asks.

- ``SFT_SWEEP_INJECT_OOM_AT_STEP=N``: raise a CUDA OOM at step N whenever the micro-batch exceeds
  ``SFT_SWEEP_INJECT_OOM_ABOVE`` (default 0: always), like a batch too big for the GPU.
- ``SFT_SWEEP_INJECT_NAN_AT_STEP=N``: set the model's weights to NaN at step N, like a diverged run.
- ``SFT_SWEEP_INJECT_KILL_AT_STEP=N``: SIGKILL this process at step N, like a lost worker (kill -9).
- ``SFT_SWEEP_INJECT_KILL_IN_SAVE=N``: SIGKILL it in the middle of the checkpoint save of step N (the
  weights written, the optimizer and trainer state not yet).
- ``SFT_SWEEP_INJECT_KILL_IN_REPORT=N``: SIGKILL it in the middle of the study write that reports step
  N's evaluation (a transaction open that marks the trial COMPLETE, never committed).
- ``SFT_SWEEP_INJECT_HOLD_AT_STEP=N`` with ``SFT_SWEEP_INJECT_HOLD_DIR=D``: at step N the process writes
  ``D/held-<pid>`` and waits (signals are handled meanwhile) until ``D/release-<pid>`` or ``D/release`` exists,
  or, with ``SFT_SWEEP_INJECT_HOLD_FOR=K``, until K processes have reached the step (a start line for K
  workers); at most 300 s: a trial held mid-training, so that a test stops, kills or races it at a known point
  rather than when a poll happens to see it.
- ``SFT_SWEEP_INJECT_SWALLOW_CTRL_C_AT_STEP=N``: at step N a Ctrl-C lands inside a finalizer, where Python drops
  its KeyboardInterrupt (a ``__del__`` run by the garbage collector, say): only the sweeper's memory of the press
  is left to stop the run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

__all__ = ["attach", "callback", "in_report"]

_KEYS = ("OOM_AT_STEP", "NAN_AT_STEP", "KILL_AT_STEP", "KILL_IN_SAVE", "HOLD_AT_STEP", "SWALLOW_CTRL_C_AT_STEP")
HOLD_MOST_S = 300


def _step(name: str) -> int | None:
    value = os.environ.get(f"SFT_SWEEP_INJECT_{name}")
    return int(value) if value else None


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hold() -> None:
    folder = Path(os.environ["SFT_SWEEP_INJECT_HOLD_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"held-{os.getpid()}").touch()
    deadline = time.monotonic() + HOLD_MOST_S
    until = int(os.environ.get("SFT_SWEEP_INJECT_HOLD_FOR") or 0)

    def released() -> bool:
        return (any((folder / f).exists() for f in (f"release-{os.getpid()}", "release"))
                or bool(until) and len(list(folder.glob("held-*"))) >= until)

    while time.monotonic() < deadline and not released():
        time.sleep(0.05)


class _SwallowsCtrlC:
    """An object whose finalizer receives the Ctrl-C: Python drops the KeyboardInterrupt raised in there."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # its handler runs before this call returns, inside the finalizer


def callback() -> Any:
    """A TrainerCallback for the training faults asked for, or None; attach it to the trainer with
    :func:`attach` too (the save fault needs the trainer)."""
    if not any(_step(k) is not None for k in _KEYS):
        return None
    import torch
    from transformers import TrainerCallback

    oom_at, nan_at, kill_at, hold_at, swallow_at = (_step(k) for k in ("OOM_AT_STEP", "NAN_AT_STEP", "KILL_AT_STEP",
                                                                       "HOLD_AT_STEP", "SWALLOW_CTRL_C_AT_STEP"))
    above = int(os.environ.get("SFT_SWEEP_INJECT_OOM_ABOVE", "0"))

    class InjectFault(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if oom_at == state.global_step and args.per_device_train_batch_size > above:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (injected at step {oom_at}, micro-batch {args.per_device_train_batch_size})")
            if kill_at == state.global_step:
                _kill()
            if hold_at == state.global_step:
                _hold()
            if swallow_at == state.global_step:
                _SwallowsCtrlC()  # dropped at once: its finalizer runs here
            if nan_at == state.global_step:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

    return InjectFault()


def attach(trainer: Any) -> None:
    """The save fault: cut the checkpoint save of the asked step between the weights and the rest."""
    save_at = _step("KILL_IN_SAVE")
    if save_at is None:
        return
    save_rest = trainer._save_optimizer_and_scheduler

    def cut(output_dir: str) -> None:
        if trainer.state.global_step == save_at:
            _kill()
        save_rest(output_dir)

    trainer._save_optimizer_and_scheduler = cut


def in_report(storage: Any, trial_id: int, step: int) -> None:
    """The study-write fault: open a transaction that marks the trial COMPLETE, then die before commit."""
    if _step("KILL_IN_REPORT") != step:
        return
    import sqlalchemy

    backend = getattr(storage, "_backend", storage)
    connection = backend.engine.connect()
    connection.begin()
    connection.execute(sqlalchemy.text("UPDATE trials SET state = 'COMPLETE' WHERE trial_id = :id"), {"id": trial_id})
    _kill()
