"""One run, resolved once: the one place below the entry points that reads the composed config.

:func:`resolve` checks the config and decides what it leaves open (compute precision, speed kernels,
metric direction, method, schedule, batch, WSD points); the result is a frozen :class:`RunSpec` that
:mod:`sweeper.runner`, :mod:`sweeper.wsd` and the leaves they call read instead of the config.
``with_batch`` / ``with_schedule`` return changed copies (an OOM retry, a WSD segment). The groups a
leaf takes whole (``model``, ``precision``, ``peft``, ``data``, ``eval``, ``lr``, ``paths``, the
``batch`` group as ``batch_config``) are instances of their schema dataclasses (:mod:`sweeper.config`).

Narrower readers serve the commands that plan rather than train: :func:`build` (the spec with the
compute and speed the caller chose), :func:`for_preparation` (the spec with which TRL prepares the
data on this machine), :func:`schedule_of`, :func:`batch_of`, :func:`wsd_of`; the memory estimate's
:class:`sweeper.plan.Training` of the config groups is :func:`sweeper.plan.training_of`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import disk, identity
from sweeper import gpu as gpu_mod
from sweeper import model as model_mod
from sweeper import plan as plan_mod
from sweeper import speed as speed_mod

__all__ = ["Batch", "RunSpec", "Schedule", "Wsd", "batch_of", "build", "check_folders", "for_preparation", "job_dir",
           "prepare", "resolve", "resolve_speed", "schedule_of", "wsd_of"]


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
    no_win_patience: int | None = None  # trunk evaluations without a possible winner before it stops (sweeper.trunk_stop)
    gain_margin: float = 0.0
    learning_rates: tuple[float, ...] = ()  # a joint search: one trunk per rate (sorted); (): lr.learning_rate only
    halving_rule: str = "successive_halving"
    eta: int = 3
    group: str = ""  # the joint search this trunk belongs to: its settings but the learning rate, hashed

    def branch_point(self, steps: int) -> int:
        return config_mod.wsd_branch_point(steps, self.decay_fraction)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run reads, resolved once. The config groups a leaf takes (``model``, ``precision``,
    ``peft``, ``data``, ``eval``, ``lr``, ``paths``, ``batch_config``) are instances of their schema
    dataclasses (:mod:`sweeper.config`); ``batch`` and ``schedule`` are what this run trains with (an OOM
    retry or a WSD segment changes them, the groups never)."""

    model: config_mod.ModelConfig
    precision: config_mod.PrecisionConfig
    peft: config_mod.PeftConfig
    data: config_mod.DataConfig
    eval: config_mod.EvalConfig
    lr: config_mod.LrConfig
    paths: config_mod.PathsConfig
    batch_config: config_mod.BatchConfig  # the ``batch`` group as configured (batch=auto's settings, eval batch)
    seed: int
    retry_on_oom: bool
    report_to: str  # none | tensorboard
    trial_number: int | None  # the study's trial of this job; None in a single run
    compute: str  # fp32 | bf16 | fp16
    speed: dict | None  # the ``speed`` group decided for this machine; None: not decided (the plan command)
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
        return float(s) if s is not None else float(self.lr.learning_rate)

    def with_schedule(self, schedule: Schedule, early_stopping: bool | None = None) -> "RunSpec":
        return dataclasses.replace(self, schedule=schedule, early_stopping=self.early_stopping
                                   if early_stopping is None else early_stopping)

    @property
    def training(self) -> plan_mod.Training:
        """What the memory estimate needs of this run besides the model's shape and the batch."""
        return plan_mod.training_of(self.precision, self.peft, self.lr, self.batch_config)


def schedule_of(cfg: DictConfig) -> Schedule:
    """The schedule of a composed config: its length (``schedule``) and LR schedule (``lr``)."""
    s, lr = cfg.schedule, cfg.lr
    return Schedule(max_steps=int(s.max_steps) if s.max_steps is not None else None,
                    num_train_epochs=float(s.num_train_epochs) if s.num_train_epochs is not None else None,
                    warmup_steps=float(lr.warmup_steps) if lr.warmup_steps < 1 else int(lr.warmup_steps),
                    lr_scheduler_type=str(lr.lr_scheduler_type))


def batch_of(cfg: DictConfig) -> Batch:
    """The ``batch`` group's micro-batch, accumulation and eval batch; ``auto`` when batch=auto."""
    b = cfg.batch
    return Batch(int(b.per_device_train_batch_size), int(b.gradient_accumulation_steps),
                 int(b.per_device_eval_batch_size), auto=b.get("auto") is not None)


def wsd_of(cfg: DictConfig) -> Wsd | None:
    """``schedule=wsd_search``'s candidates, cooldown and (a joint search) learning rates and halving rule;
    None for a run of one length."""
    w = cfg.schedule.get("wsd")
    if w is None:
        return None
    rates, h = w.get("learning_rates"), w.get("halving")
    return Wsd(candidates=tuple(sorted(int(c) for c in w.candidates)), decay_fraction=float(w.decay_fraction),
               decay_type=str(w.decay_type), warmup_steps=config_mod.wsd_warmup_steps(cfg),
               stop_after_worse=None if w.stop_after_worse is None else int(w.stop_after_worse),
               no_win_patience=None if w.get("no_win_patience") is None else int(w.no_win_patience),
               gain_margin=float(w.get("gain_margin") or 0.0),
               learning_rates=tuple(sorted(float(r) for r in rates)) if rates is not None else (),
               halving_rule=str(h.rule) if h is not None else "successive_halving",
               eta=int(h.eta) if h is not None else 3,
               group=identity.joint_group(identity.result_config(cfg)) if rates is not None else "")


def resolve_speed(cfg: DictConfig, compute: str, strict: bool = True, cuda: bool | None = None) -> dict:
    """The ``speed`` group decided for this machine (see ``sweeper/speed.py``); ``strict=False``: GPU-only
    choices are kept on a machine without a GPU rather than refused; ``cuda``: whether the run has a CUDA GPU
    (None: ask torch, which initialises CUDA's driver)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return speed_mod.resolve(_typed(cfg.speed), cuda=cuda, compute=compute, optim=str(cfg.lr.optim), strict=strict,
                             lora=str(cfg.peft.name) == "lora", quantized=bool(cfg.precision.get("load_in_4bit")))


def check_folders(cfg: DictConfig) -> None:
    """The output and cache folders can be written (one line naming the key if not)."""
    disk.check_writable(cfg.paths.output_dir, "paths.output_dir")
    disk.check_writable(cfg.paths.cache_dir, "paths.cache_dir")


def _typed(node: Any) -> Any:
    """A config group as an instance of its schema dataclass (a plain container when it has none)."""
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def build(cfg: DictConfig, *, compute: str, speed: dict | None) -> RunSpec:
    """The spec of a checked ``cfg`` with the compute precision and speed settings the caller decided
    (:func:`resolve` decides them for this machine; the plan command for the GPU a run will get)."""
    metric = str(cfg.eval.metric)
    return RunSpec(
        model=_typed(cfg.model), precision=_typed(cfg.precision), peft=_typed(cfg.peft), data=_typed(cfg.data),
        eval=_typed(cfg.eval), lr=_typed(cfg.lr), paths=_typed(cfg.paths), batch_config=_typed(cfg.batch),
        seed=int(cfg.seed), retry_on_oom=bool(cfg.retry_on_oom), report_to=str(cfg.report_to),
        trial_number=None if cfg.study.trial_number is None else int(cfg.study.trial_number),
        compute=compute, speed=speed, metric=metric,
        maximize=config_mod.metric_direction(metric) == "maximize", method=str(cfg.peft.name),
        schedule=schedule_of(cfg), batch=batch_of(cfg), wsd=wsd_of(cfg),
        early_stopping=cfg.eval.early_stopping_patience is not None)


def resolve(cfg: DictConfig) -> RunSpec:
    """Check ``cfg`` (every rule that needs no model or data) and resolve it; ValueError on bad input."""
    config_mod.validate(cfg)
    gpu_mod.check_precision(str(cfg.precision.compute), str(cfg.precision.name))
    compute = model_mod.resolve_compute(cfg.precision.compute)
    speed = resolve_speed(cfg, compute)  # e.g. varlen without a GPU is refused here
    check_folders(cfg)
    model_mod.check_path(cfg.model)
    return build(cfg, compute=compute, speed=speed)


def for_preparation(cfg: DictConfig) -> RunSpec:
    """The spec with which TRL prepares the data of ``cfg`` on this machine, as a trial would (CPU: fp32),
    without the checks of :func:`resolve` (the plan command and the sweep's data check, which runs in a child
    that sees no GPU: a GPU-only speed choice such as ``speed.attention=varlen`` is kept, not refused)."""
    import torch

    compute = model_mod.resolve_compute(cfg.precision.compute) if torch.cuda.is_available() else "fp32"
    return build(cfg, compute=compute, speed=resolve_speed(cfg, compute, strict=False))


def prepare(cfg: DictConfig) -> tuple[RunSpec, data_mod.Splits]:
    """The spec and the data of a run: every check that needs no model, once, before any GPU time;
    bad input raises :class:`sweeper.config.InputError` (one line, no traceback)."""
    try:
        spec = resolve(cfg)
        splits = data_mod.load(spec.data, spec.paths.cache_dir)
        data_mod.check_train_size(splits, spec.batch_config, gpu=bool(gpu_mod.visible_gpus()))
        return spec, splits
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
