"""Checkpoint saves written beside training: the GPU trains on while a LoRA run's checkpoint is written.

A best-checkpoint save (``eval.save_best``) comes after most evaluations of a run whose loss still falls, and the
trainer's own save (``Trainer._save_checkpoint``: weights, tokenizer, optimizer, scheduler, RNG, trainer state,
then the older checkpoints rotated away) keeps the GPU idle while the host copies each tensor back and writes
the files. :func:`install` replaces it on a trainer: at the save the state the files hold is taken at once (the
adapters' weights and the optimizer's state copied to host memory in one pass, one wait on the GPU; the RNG
state (and an fp16 loss scaler) written as the trainer writes them; the scheduler, the trainer's state and its
callbacks' states copied), then the trainer's own save runs in a background thread on that snapshot, writing
the same files in the same order, so a checkpoint cut short is still told apart by ``sweeper.checkpoints``.
The next save, the end of training (before the trainer's own clean-up of older checkpoints) and any way out of
``trainer.train`` wait for it; an error of the writer (a full disk) is raised there.

Only PEFT runs on one process take this path, and only while the snapshot stays small (at most
:data:`MAX_SNAPSHOT_GIB`); full fine-tuning keeps the trainer's own save (its snapshot would be the whole
model and its optimizer state). ``SFT_SWEEP_SAVE_SYNC=1`` keeps the trainer's own save everywhere (the
benchmarks' side-by-side twin).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import types
from typing import Any

__all__ = ["MAX_SNAPSHOT_GIB", "install"]

log = logging.getLogger(__name__)

MAX_SNAPSHOT_GIB = 2.0  # the state copied to host memory per save; above it the save stays the trainer's own


class _Frozen:
    """An optimizer or scheduler as it was at the save: ``state_dict()`` returns the snapshot."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _to_host(tree: Any) -> Any:
    """``tree`` with every tensor copied to host memory (CUDA tensors without waiting, into pinned memory:
    the caller waits once for all of them)."""
    import torch

    if isinstance(tree, torch.Tensor):
        t = tree.detach()
        return t.to("cpu", non_blocking=True) if t.device.type != "cpu" else t.clone()
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_host(v) for v in tree)
    return copy.deepcopy(tree)


def _bytes(tree: Any) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_bytes(v) for v in tree)
    return 0


class _Writer:
    """The one checkpoint save in flight of a trainer, and its error."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.best: str | None = None  # the written checkpoint's best_model_checkpoint, for the live trainer
        self.keys: list[str] | None = None  # the model's state-dict keys PEFT's save reads (found at the first save)

    def wait(self) -> None:
        """Until the save in flight is written; its error raised here (once)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            if self.best is not None:
                self.trainer.state.best_model_checkpoint = self.best
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _model_keys(self, model: Any, state: dict) -> list[str] | None:
        """The keys of ``state`` (the model's state dict) PEFT's save keeps: its trainable parameters, when
        PEFT's adapter state dict is the same from them as from the whole state dict; None otherwise."""
        if self.keys is None:
            from peft import get_peft_model_state_dict

            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            keys = [k for k in state if k in trainable]
            same = set(get_peft_model_state_dict(model, state_dict={k: state[k] for k in keys})) == \
                set(get_peft_model_state_dict(model))
            self.keys = keys if same else []
        return self.keys or None

    def save(self, model: Any, trial: Any = None) -> None:
        """``Trainer._save_checkpoint``, its files written beside training (see the module's docstring)."""
        import torch

        trainer = self.trainer
        self.wait()
        full = trainer.model.state_dict()
        keys = self._model_keys(trainer.model, full)
        optim = trainer.optimizer.state_dict()
        if keys is None or _bytes([full[k] for k in keys]) + _bytes(optim) > MAX_SNAPSHOT_GIB * 2**30:
            type(trainer)._save_checkpoint(trainer, model, trial)  # the trainer's own save, as it is
            return
        # what the trainer's save changes on itself, done here as it does (flos, then small files at once)
        if trainer.hp_search_backend is None and trial is None:
            trainer.store_flos()
        folder = f"checkpoint-{trainer.state.global_step}"
        output_dir = f"{trainer._get_output_dir(trial=trial)}/{folder}"
        if not trainer.args.save_only_model:
            trainer._save_rng_state(output_dir)  # the RNG as it is now, not when the thread runs
            trainer._save_scaler(output_dir)
        view = copy.copy(trainer)  # the trainer as it is now, its changing parts copied
        for name in ("save_model", "_save", "_save_optimizer_and_scheduler", "_save_rng_state", "_save_scaler"):
            view.__dict__.pop(name, None)  # methods replaced on the live trainer (fault injection) act on it
        view.state = copy.deepcopy(trainer.state)
        view.control = copy.deepcopy(trainer.control)
        view.callback_handler = types.SimpleNamespace(callbacks=[
            copy.deepcopy(cb) for cb in trainer.callback_handler.callbacks if _exportable(cb)])
        weights = _to_host({k: full[k] for k in keys})
        view.optimizer = _Frozen(_to_host(optim))
        view.lr_scheduler = _Frozen(copy.deepcopy(trainer.lr_scheduler.state_dict()))
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the copies above are whole
        view.save_model = lambda output_dir=None, _internal_call=False: view._save(output_dir, state_dict=weights)
        view._save_optimizer_and_scheduler = types.MethodType(_save_rest, view)
        view._save_rng_state = view._save_scaler = lambda output_dir: None  # written above
        self.best = None

        def write() -> None:
            try:
                type(trainer)._save_checkpoint(view, model, trial)
                self.best = view.state.best_model_checkpoint
            except BaseException as e:  # raised in the training thread at the next wait
                self.error = e

        self.thread = threading.Thread(target=write, name=f"save {folder}", daemon=True)
        self.thread.start()


def _save_rest(view: Any, output_dir: str) -> None:
    """The optimizer and scheduler of the snapshot, as the trainer writes them (a fault injected between the
    weights and the rest fires here)."""
    from sweeper import inject

    inject.in_save(view.state.global_step)
    type(view)._save_optimizer_and_scheduler(view, output_dir)


def _exportable(cb: Any) -> bool:
    from transformers.trainer_callback import ExportableState

    return isinstance(cb, ExportableState)


def install(trainer: Any) -> bool:
    """Write ``trainer``'s checkpoints beside training (a PEFT model, one process, checkpoints saved); returns
    whether it did. ``trainer.train`` waits for the last save however it ends."""
    from peft import PeftModel

    args = trainer.args
    if os.environ.get("SFT_SWEEP_SAVE_SYNC") == "1" or args.save_strategy == "no" or args.world_size > 1 or \
            not isinstance(trainer.model, PeftModel) or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return False
    writer = _Writer(trainer)
    trainer._save_checkpoint = writer.save
    finalize, train = trainer._finalize_training, trainer.train

    def finalize_training(*a: Any, **kw: Any) -> Any:
        writer.wait()  # before the trainer removes the checkpoints other than the best
        return finalize(*a, **kw)

    def train_then_wait(*a: Any, **kw: Any) -> Any:
        try:
            out = train(*a, **kw)
        except BaseException:
            try:
                writer.wait()
            except BaseException as e:  # the training's own error is the one to raise
                log.warning("the checkpoint save in flight failed too: %s", e)
            raise
        writer.wait()
        return out

    trainer._finalize_training = finalize_training
    trainer.train = train_then_wait
    return True
