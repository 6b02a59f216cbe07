"""The sweeper's settings (``hydra.sweeper.*``), checked once and frozen: :class:`Settings`.

    python train.py -m schedule=under,sweet,over hydra.sweeper.workers=2 hydra.sweeper.max_failures=3

:func:`parse` turns the plugin's fields (``hydra_plugins.sft_sweep``'s schema) into one :class:`Settings`,
refusing a bad value in one line before any study exists: counts and intervals, hydra-optuna-sweeper's fields
(``sweeper.hos``), the objectives (``sweeper.objectives``), sampler and pruner (``sweeper.samplers``), workers,
GPUs and launcher (``sweeper.workers``), SLURM's settings (``sweeper.slurm``). Every other module of the
sweep reads this object, never the raw fields.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import DictConfig

from sweeper import config as config_mod
from sweeper import hos, objectives, samplers, slurm
from sweeper import storage as storage_mod
from sweeper import workers as workers_mod

__all__ = ["DEFAULT_N_TRIALS_WITH_DISTRIBUTIONS", "SWEEP_ID_ENV", "Settings", "new_sweep_id", "parse"]

log = logging.getLogger(__name__)

DEFAULT_N_TRIALS_WITH_DISTRIBUTIONS = 10
SWEEP_ID_ENV = config_mod.SWEEP_ID_ENV  # the sweep id a worker process inherits from the command that started it


def new_sweep_id() -> str:
    """One id per sweep, shared by the workers it starts: a point that failed in this sweep is not run again
    until the command is re-run."""
    return os.environ.get(SWEEP_ID_ENV) or uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Settings:
    """``hydra.sweeper.*`` as checked; defaults are the schema's (``conf/hydra/sweeper/sft_sweep.yaml``)."""

    storage_url: str
    storage_given: bool = True  # False: ``storage: null``, the study file in paths.output_dir
    study_name: str | None = None
    n_trials: int | None = None
    sampler: Any = None
    pruner: Any = None
    params: dict = field(default_factory=dict)
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    max_retry: int | None = None
    max_failures: int | None = None
    max_failure_rate: float | None = None
    workers: Any = "auto"
    gpus: Any = None
    launcher: str = "local"
    slurm: Any = None
    allow_config_change: bool = False
    direction: Any = None
    cost: str = "steps"
    directions: tuple = ("minimize",)
    custom_search_space: Callable[[Any, Any], None] | None = None
    sweep_id: str = dataclasses.field(default_factory=new_sweep_id)

    @property
    def leads(self) -> bool:
        """Whether this process is the command's first, not a worker another process started."""
        return SWEEP_ID_ENV not in os.environ

    @property
    def sampled_total(self) -> int:
        """With distributions: the study's total of trials."""
        return self.n_trials or DEFAULT_N_TRIALS_WITH_DISTRIBUTIONS

    @property
    def grace_s(self) -> int:
        """Seconds after which a RUNNING trial without a heartbeat counts as stale (with heartbeats on)."""
        return int(self.grace_period or 2 * self.heartbeat_interval)


def _check_numbers(fields: dict) -> None:
    """The sweeper's counts and intervals: whole numbers >= 1 (>= 0 for max_retry), or null."""
    for key, least in (("n_trials", 1), ("max_failures", 1), ("heartbeat_interval", 1), ("grace_period", 1),
                       ("max_retry", 0)):
        value = fields.get(key)
        if value is not None and value < least:
            raise ValueError(f"hydra.sweeper.{key} must be >= {least} or null, but got {value}")


def parse(fields: dict, config: DictConfig, sweep_id: str) -> Settings:
    """The plugin's ``fields`` as :class:`Settings`, checked in the order a user meets them; ``config`` is the
    app's (``paths.output_dir`` for ``storage: null``, ``eval.metric`` for the direction)."""
    f = dict(fields)
    _check_numbers(f)
    hos.refuse_search_space(f.get("search_space"))
    hos.check_failure_rate(f.get("max_failure_rate"))
    storage = f.get("storage")
    url = hos.storage(storage, config.paths.output_dir)
    storage_mod.check_url(url)  # a password with an unencoded @ or :: one line naming the option, without it
    custom = hos.custom_search_space(f.get("custom_search_space"))
    workers_arg = hos.workers(f.get("n_jobs"), f.get("workers", "auto"))
    cost = str(getattr(f.get("cost", "steps"), "name", f.get("cost", "steps")))
    metric = str(config.eval.metric)
    directions = objectives.directions(f.get("direction"), metric, config_mod.metric_direction(metric), cost)
    config_mod.check_seeds(config)  # the sampler's seed is ${seed}: the single run's line, not the sampler's
    samplers.make_sampler(f.get("sampler"), len(directions)), samplers.make_pruner(f.get("pruner"))  # refused now
    if len(directions) > 1:
        pruner = f.get("pruner") or {}
        log.info(objectives.pruning_note(pruner.get("_target_") or pruner.get("name")))
    workers = workers_mod.parse_workers(workers_arg)
    gpus = workers_mod.parse_gpus(f.get("gpus"))
    launcher = workers_mod.parse_launcher(f.get("launcher", "local"))
    if gpus is not None and launcher == "local" and SWEEP_ID_ENV not in os.environ:  # a worker sees its own GPU only
        from sweeper import gpu as gpu_mod

        workers_mod.check_gpus_visible(gpus, gpu_mod.visible_gpus())
    if launcher == "slurm":
        slurm.check(f.get("slurm"), url, gpus)
    return Settings(
        storage_url=url, storage_given=storage is not None, study_name=f.get("study_name"),
        n_trials=f.get("n_trials"), sampler=f.get("sampler"), pruner=f.get("pruner"), params=hos.params(f.get("params")),
        heartbeat_interval=f.get("heartbeat_interval"), grace_period=f.get("grace_period"),
        max_retry=f.get("max_retry"), max_failures=f.get("max_failures"), max_failure_rate=f.get("max_failure_rate"),
        workers=workers, gpus=gpus, launcher=launcher, slurm=f.get("slurm"),
        allow_config_change=bool(f.get("allow_config_change", False)), direction=f.get("direction"), cost=cost,
        directions=tuple(directions), custom_search_space=custom, sweep_id=sweep_id)
