"""Steps <-> epochs <-> samples <-> tokens, the peak-memory estimate of a run and the micro-batch that
fits a budget: plain arithmetic, no torch.

Every job logs a :class:`Plan` before training, computed on the prepared dataset (the rows or
packed sequences the trainer will really iterate), and stores it on its trial. Its warnings advise
lengths; the presets they name are read from ``conf/schedule/*.yaml``, never repeated here.
:func:`estimate_memory` applies :func:`sweeper.memory.estimate` to a run's :class:`Training`
(:func:`training_of` of its config groups).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sweeper.paths import CONF_DIR

__all__ = ["MAX_EPOCHS", "MIN_EPOCHS", "Plan", "SchedulePreset", "Training", "estimate_memory", "finetune_method",
           "fit_micro_batch", "make_plan", "memory_estimate", "preset_max_steps", "schedule_presets", "training_of"]

MAX_EPOCHS = 5  # more passes than this: the plan warns of over-fitting (common SFT practice)
MIN_EPOCHS = 0.3  # less of the data than this: the plan warns that the run is likely too short


@dataclass(frozen=True)
class SchedulePreset:
    """A ``schedule`` group option with a fixed length: ``max_steps`` or ``num_train_epochs`` (the other None)."""

    name: str
    max_steps: int | None
    num_train_epochs: float | None


@functools.lru_cache(maxsize=None)
def schedule_presets(schedule_dir: Path = CONF_DIR / "schedule") -> tuple[SchedulePreset, ...]:
    """The fixed-length options of the ``schedule`` group, read from its YAML files (``under`` 500 steps,
    ``epochs3`` 3 epochs, ...), so the plan's advice names the lengths the presets really have. Options
    that search the length (``wsd_search``) or set neither key are left out; a missing folder gives ()."""
    from omegaconf import OmegaConf

    out = []
    for path in sorted(schedule_dir.glob("*.yaml")):
        try:
            node = OmegaConf.load(path)
            steps, epochs, wsd = node.get("max_steps"), node.get("num_train_epochs"), node.get("wsd")
        except Exception:  # an interpolation or a broken file: not a preset the advice can name
            continue
        if wsd is None and (steps is None) != (epochs is None):
            out.append(SchedulePreset(path.stem, None if steps is None else int(steps),
                                      None if epochs is None else float(epochs)))
    return tuple(out)


def preset_max_steps(choice: str) -> int | None:
    """``max_steps`` of the ``schedule`` option ``choice`` (:func:`schedule_presets`); None for an option
    without one (``epochs3``, ``wsd_search``) or one that does not exist."""
    return next((p.max_steps for p in schedule_presets() if p.name == choice), None)


def _fmt_epochs(epochs: float) -> str:
    return f"{epochs:.2f}" if epochs < 1 else f"{epochs:.1f}"


def _fmt_beyond(epochs: float, bound: float) -> str:
    """``epochs`` (not equal to ``bound``) as :func:`_fmt_epochs` writes it, with more digits where that rounds it
    onto ``bound`` or past it (0.296 against 0.3: ``0.296``, not ``0.30``), so that a line comparing them reads
    true."""
    text = _fmt_epochs(epochs)
    digits = len(text.split(".")[1])
    while not (float(text) < bound if epochs < bound else float(text) > bound):
        if digits >= 12:
            return repr(epochs)
        digits += 1
        text = f"{epochs:.{digits}f}"
    return text


@dataclass(frozen=True)
class Plan:
    effective_batch: int  # rows (or packed sequences) per optimizer step, all GPUs
    steps_per_epoch: int  # optimizer steps for one pass over the prepared train set
    max_steps: int  # optimizer steps the run will take (unless stopped early)
    epochs: float  # passes over the data that max_steps amounts to
    samples: int  # rows (or packed sequences) seen over max_steps
    tokens_per_step: float  # mean tokens per optimizer step (padding excluded)
    tokens: float  # tokens seen over max_steps
    warmup_steps: int  # optimizer steps of LR warmup

    def as_dict(self) -> dict:
        return asdict(self)

    def warnings(self, presets: Sequence[SchedulePreset] | None = None) -> list[str]:
        """Signs that the schedule does not fit the data, each with advice that points the right way:
        only presets strictly shorter (too many epochs) or longer (too few) than this run whose length
        lies within MIN_EPOCHS..MAX_EPOCHS of this data, and always a concrete ``schedule.max_steps=N``
        (the step count of the epoch preset, e.g. ``epochs3``). ``presets``: default, the
        ``conf/schedule`` options (:func:`schedule_presets`)."""
        presets = schedule_presets() if presets is None else presets
        out = []
        if self.epochs > MAX_EPOCHS:
            out.append(f"{_fmt_beyond(self.epochs, MAX_EPOCHS)} epochs is more than ~{MAX_EPOCHS} passes over the data: expect "
                       f"over-fitting; consider fewer steps: {self._advice(presets, shorter=True)}; or more data")
        if self.epochs < MIN_EPOCHS:
            out.append(f"{_fmt_beyond(self.epochs, MIN_EPOCHS)} epochs sees less than ~{MIN_EPOCHS} of the data: the run is likely too "
                       f"short; consider more steps: {self._advice(presets, shorter=False)}")
        if self.warmup_steps >= self.max_steps:
            out.append(f"warmup ({self.warmup_steps} steps) is not shorter than the run ({self.max_steps} steps)")
        return out

    def _advice(self, presets: Sequence[SchedulePreset], shorter: bool) -> str:
        """Step-count presets on the advised side of this run that fit the data, then ``schedule.max_steps=N``."""
        spe = self.steps_per_epoch
        fitting = [p for p in sorted(presets, key=lambda p: p.max_steps or 0) if p.max_steps is not None
                   and (p.max_steps < self.max_steps if shorter else p.max_steps > self.max_steps)
                   and MIN_EPOCHS <= p.max_steps / spe <= MAX_EPOCHS]
        options = [f"schedule={p.name} ({p.max_steps} steps = {_fmt_epochs(p.max_steps / spe)} epochs)"
                   for p in fitting]
        by_epochs = [p for p in presets if p.num_train_epochs is not None
                     and MIN_EPOCHS <= p.num_train_epochs <= MAX_EPOCHS]
        if by_epochs:  # e.g. epochs3: 3 passes; always on the advised side, since 3 is within the bounds
            target = by_epochs[0].num_train_epochs
            steps = math.ceil(target * spe)
            why = f"{target:g} epochs, as schedule={by_epochs[0].name}"
        elif shorter:
            steps = max(math.floor(MAX_EPOCHS * spe), 1)
            why = f"{MAX_EPOCHS:g} epochs, the most that does not warn"
        else:
            steps = math.ceil(MIN_EPOCHS * spe)
            why = f"{MIN_EPOCHS:g} epoch, the least that does not warn"
        options.append(f"schedule.max_steps={steps} ({why})")
        return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]

    def describe(self) -> str:
        return (
            f"{self.max_steps} steps x {self.effective_batch} rows/step = {self.samples:,} rows "
            f"= {self.epochs:.2f} epochs ({self.steps_per_epoch} steps/epoch); "
            f"~{self.tokens_per_step:,.0f} tokens/step, ~{self.tokens:,.0f} tokens in all; "
            f"warmup {self.warmup_steps} steps"
        )


def make_plan(
    *,
    train_rows: int,
    micro_batch: int,
    grad_accum: int,
    n_gpus: int = 1,
    max_steps: int | None = None,
    num_train_epochs: float | None = None,
    mean_tokens_per_row: float = 0.0,
    warmup: float = 0.0,
) -> Plan:
    """Plan a run.

    Args:
        train_rows: rows (packed sequences with packing) in the prepared train set, >= 1.
        micro_batch, grad_accum, n_gpus: per-device micro-batch, accumulation steps, data-parallel GPUs.
        max_steps: optimizer steps; None means derive from ``num_train_epochs``.
        warmup: < 1 is a fraction of the run (rounded up, as transformers does); >= 1 is steps.

    Example: 10,000 rows, 4 x 8 accumulation x 2 GPUs -> 64 rows/step, 157 steps/epoch,
    471 steps for 3 epochs; max_steps=1000 -> 6.4 epochs.
    """
    if train_rows < 1:
        raise ValueError(f"train_rows must be >= 1, but got {train_rows}")
    eff = micro_batch * grad_accum * max(n_gpus, 1)
    steps_per_epoch = max(math.ceil(train_rows / eff), 1)
    if max_steps is None:
        if num_train_epochs is None:
            raise ValueError("give max_steps or num_train_epochs")
        max_steps = math.ceil(steps_per_epoch * num_train_epochs)
    epochs = max_steps / steps_per_epoch
    samples = max_steps * eff
    warmup_steps = math.ceil(warmup * max_steps) if warmup < 1 else int(warmup)
    return Plan(
        effective_batch=eff,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        epochs=epochs,
        samples=samples,
        tokens_per_step=mean_tokens_per_row * eff,
        tokens=mean_tokens_per_row * samples,
        warmup_steps=warmup_steps,
    )


def fit_micro_batch(target_effective_batch: int, max_micro_batch: int, budget_gib: float,
                    estimate_gib: Callable[[int], float]) -> tuple[int, int, float] | None:
    """The largest micro-batch whose estimated peak fits ``budget_gib`` and divides the target
    effective batch exactly (so the effective batch never changes), with its accumulation steps.

    Returns ``(micro_batch, grad_accum, estimate_gib)``, or None when even micro-batch 1 does not fit.
    Example: target 16, budget fits 6 rows -> (4, 4, ...): 6 and 5 do not divide 16.
    """
    for micro in range(min(max_micro_batch, target_effective_batch), 0, -1):
        if target_effective_batch % micro:
            continue
        est = estimate_gib(micro)
        if est <= budget_gib:
            return micro, target_effective_batch // micro, est
    return None


def finetune_method(load_in_4bit: bool, peft: str) -> str:
    """qlora | lora | full, from the precision's 4-bit loading and the ``peft`` choice (lora | none)."""
    if load_in_4bit:
        return "qlora"
    return "lora" if peft == "lora" else "full"


@dataclass(frozen=True)
class Training:
    """What the memory estimate needs of a run besides the model's shape and its batch."""

    method: str  # qlora | lora | full (:func:`finetune_method`)
    optim: str  # transformers optimizer name
    activation_checkpointing: bool
    lora_r: int
    lora_targets: str | list[str]  # module names, or "all-linear"


def estimate_memory(training: Training, shape: dict | None, micro_batch: int, seq_len: int, compute: str,
                    grad_accum: int = 1) -> Any:
    """Peak-VRAM estimate (``sweeper.memory.MemoryEstimate``) of a run at a micro-batch and sequence
    length; None when the model's shape is unknown."""
    if shape is None:
        return None
    from sweeper import memory

    return memory.estimate(
        shape, method=training.method, compute=compute, optim=training.optim,
        activation_checkpointing=training.activation_checkpointing, micro_batch=micro_batch,
        seq_len=seq_len, lora_r=training.lora_r, grad_accum=grad_accum, lora_targets=training.lora_targets,
    )


def memory_estimate(cfg: Any, shape: dict | None, micro_batch: int, seq_len: int, compute: str,
                    grad_accum: int = 1) -> Any:
    """:func:`estimate_memory` of a composed config, for the sweeper's worker planning
    (``sweeper.sweep.launchers``); code below the entry points passes a :class:`Training` instead."""
    return estimate_memory(training_of(cfg.precision, cfg.peft, cfg.lr, cfg.batch), shape, micro_batch, seq_len,
                           compute, grad_accum)


def training_of(precision: Any, peft: Any, lr: Any, batch: Any) -> Training:
    """The :class:`Training` of the ``precision``, ``peft``, ``lr`` and ``batch`` config groups (composed
    nodes or their schema dataclasses)."""
    target = peft.target_modules
    return Training(
        method=finetune_method(bool(precision.load_in_4bit), str(peft.name)), optim=str(lr.optim),
        activation_checkpointing=bool(batch.activation_checkpointing), lora_r=int(peft.r or 16),
        lora_targets=list(target) if target is not None and not isinstance(target, str) else (target or "all-linear"))
