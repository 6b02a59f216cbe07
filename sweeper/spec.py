"""One run, resolved once: :func:`resolve` checks the composed config and decides what the config leaves
open (compute precision, speed kernels, metric direction, method, schedule, batch, WSD points); the
result is a frozen :class:`RunSpec` that :mod:`sweeper.runner` and :mod:`sweeper.wsd` read instead of
the config. ``with_batch`` / ``with_schedule`` return changed copies (an OOM retry, a WSD segment).

The groups a leaf still takes whole (``model``, ``precision``, ``peft``, ``data``, ``eval``, ``lr``,
``paths``) are read from ``spec.cfg``; the schedule and the batch are read from the spec only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import disk, identity
from sweeper import gpu as gpu_mod
from sweeper import model as model_mod
from sweeper import speed as speed_mod

__all__ = ["Batch", "RunSpec", "Schedule", "Wsd", "check_folders", "job_dir", "prepare", "resolve", "resolve_speed", "schedule_of"]


@dataclass(frozen=True)
class Schedule:
    """Length and learning-rate schedule of one training (TRL's names)."""

    max_steps: int | None
    num_train_epochs: float | None
    warmup_steps: float  # a fraction of the run (< 1) or optimizer steps
    lr_scheduler_type: str
    lr_scheduler_kwargs: dict = field(default_factory=dict)
    learning_rate: float | None = None  # None: lr.learning_rate (a joint WSD search sets each trunk's)


@dataclass(frozen=True)
class Batch:
    """Micro-batch, accumulation and eval batch; ``auto``: fit the micro-batch on the GPU first."""

    micro: int
    accum: int
    eval_batch: int | None
    auto: bool = False


@dataclass(frozen=True)
class Wsd:
    """``schedule=wsd_search``: candidate lengths (ascending), one warmup, the cooldown's share and shape."""

    candidates: tuple[int, ...]
    decay_fraction: float
    decay_type: str
    warmup_steps: int
    stop_after_worse: int | None
    learning_rates: tuple[float, ...] = ()  # a joint search: one trunk per rate (sorted); (): lr.learning_rate only
    halving_rule: str = "successive_halving"
    eta: int = 3
    group: str = ""  # the joint search this trunk belongs to: its settings but the learning rate, hashed

    def branch_point(self, steps: int) -> int:
        return config_mod.wsd_branch_point(steps, self.decay_fraction)


@dataclass(frozen=True)
class RunSpec:
    cfg: DictConfig
    compute: str  # fp32 | bf16 | fp16
    speed: dict
    metric: str
    maximize: bool
    method: str  # lora | none (peft.name)
    schedule: Schedule
    batch: Batch
    wsd: Wsd | None = None
    early_stopping: bool = True

    def with_batch(self, micro: int, accum: int, eval_batch: int | None = None) -> "RunSpec":
        """The same run at another micro-batch (the effective batch is the caller's to keep)."""
        return dataclasses.replace(self, batch=Batch(int(micro), int(accum),
                                                     eval_batch if eval_batch is not None else self.batch.eval_batch))

    @property
    def learning_rate(self) -> float:
        s = self.schedule.learning_rate
        return float(s) if s is not None else float(self.cfg.lr.learning_rate)

    def with_schedule(self, schedule: Schedule, early_stopping: bool | None = None) -> "RunSpec":
        return dataclasses.replace(self, schedule=schedule, early_stopping=self.early_stopping
                                   if early_stopping is None else early_stopping)


def schedule_of(cfg: DictConfig) -> Schedule:
    """The schedule of a composed config: its length (``schedule``) and LR schedule (``lr``)."""
    s, lr = cfg.schedule, cfg.lr
    return Schedule(max_steps=int(s.max_steps) if s.max_steps is not None else None,
                    num_train_epochs=float(s.num_train_epochs) if s.num_train_epochs is not None else None,
                    warmup_steps=float(lr.warmup_steps) if lr.warmup_steps < 1 else int(lr.warmup_steps),
                    lr_scheduler_type=str(lr.lr_scheduler_type))


def resolve_speed(cfg: DictConfig, compute: str) -> dict:
    """The ``speed`` group decided for this machine (see ``sweeper/speed.py``)."""
    import torch

    return speed_mod.resolve(cfg.speed, cuda=torch.cuda.is_available(), compute=compute, optim=str(cfg.lr.optim))


def check_folders(cfg: DictConfig) -> None:
    """The output and cache folders can be written (one line naming the key if not)."""
    disk.check_writable(cfg.paths.output_dir, "paths.output_dir")
    disk.check_writable(cfg.paths.cache_dir, "paths.cache_dir")


def resolve(cfg: DictConfig) -> RunSpec:
    """Check ``cfg`` (every rule that needs no model or data) and resolve it; ValueError on bad input."""
    config_mod.validate(cfg)
    gpu_mod.check_precision(str(cfg.precision.compute), str(cfg.precision.name))
    compute = model_mod.resolve_compute(cfg.precision.compute)
    speed = resolve_speed(cfg, compute)  # e.g. varlen without a GPU is refused here
    check_folders(cfg)
    metric = str(cfg.eval.metric)
    s, b = cfg.schedule, cfg.batch
    wsd = None
    if s.get("wsd") is not None:
        w = s.wsd
        rates = w.get("learning_rates")
        h = w.get("halving")
        wsd = Wsd(candidates=tuple(sorted(int(c) for c in w.candidates)), decay_fraction=float(w.decay_fraction),
                  decay_type=str(w.decay_type), warmup_steps=config_mod.wsd_warmup_steps(cfg),
                  stop_after_worse=None if w.stop_after_worse is None else int(w.stop_after_worse),
                  learning_rates=tuple(sorted(float(r) for r in rates)) if rates is not None else (),
                  halving_rule=str(h.rule) if h is not None else "successive_halving",
                  eta=int(h.eta) if h is not None else 3, group=identity.joint_group(identity.result_config(cfg)) if rates is not None else "")
    return RunSpec(
        cfg=cfg, compute=compute, speed=speed, metric=metric,
        maximize=config_mod.metric_direction(metric) == "maximize", method=str(cfg.peft.name),
        schedule=schedule_of(cfg), wsd=wsd,
        batch=Batch(int(b.per_device_train_batch_size), int(b.gradient_accumulation_steps),
                    int(b.per_device_eval_batch_size), auto=b.get("auto") is not None),
        early_stopping=cfg.eval.early_stopping_patience is not None)


def prepare(cfg: DictConfig) -> tuple[RunSpec, data_mod.Splits]:
    """The spec and the data of a run: every check that needs no model, once, before any GPU time;
    bad input raises :class:`sweeper.config.InputError` (one line, no traceback)."""
    try:
        spec = resolve(cfg)
        return spec, data_mod.load(cfg.data, cfg.paths.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        raise config_mod.InputError.wrap(e) from e


def job_dir(cfg: DictConfig) -> Path:
    """The job's folder: Hydra's output dir of this job (``outputs/sweeps/<study>/trial_<n>`` in a
    multirun), or ``<paths.output_dir>/runs/direct`` when called outside ``@hydra.main`` (tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        path = Path(cfg.paths.output_dir) / "runs" / "direct"
        path.mkdir(parents=True, exist_ok=True)
        return path
