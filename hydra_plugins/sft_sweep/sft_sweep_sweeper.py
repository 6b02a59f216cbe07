"""Hydra Sweeper plugin that runs a multirun as an Optuna study (see ``sweeper.study``).

Hydra imports this module at start-up of every app, so it stays import-light: the schema, its
ConfigStore registration, and a thin Sweeper that imports the Optuna implementation lazily.

    python train.py -m schedule=under,sweet,over
"""


from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class SamplerConf:
    name: str = MISSING  # tpe | random | grid
    seed: Optional[int] = None


@dataclass
class PrunerConf:
    name: str = MISSING  # none | median | hyperband
    n_warmup_steps: int = MISSING
    n_startup_trials: int = MISSING
    min_resource: int = 1  # hyperband: the smallest step count a bracket judges at
    max_resource: Any = "auto"  # hyperband: the longest run in steps, or auto (the first finished trial's)
    reduction_factor: int = 3  # hyperband: keep 1/reduction_factor at each rung


@dataclass
class SlurmConf:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = MISSING
    gpus_per_worker: int = MISSING
    cpus_per_worker: int = MISSING
    mem_gb: Optional[float] = None
    additional: Dict[str, Any] = field(default_factory=dict)
    setup: List[str] = field(default_factory=list)
    max_workers: int = MISSING
    wait: bool = MISSING
    poll_s: float = MISSING


@dataclass
class SftSweepSweeperConf:
    _target_: str = "hydra_plugins.sft_sweep.sft_sweep_sweeper.SftSweepSweeper"
    storage: str = MISSING
    study_name: Optional[str] = None
    n_trials: Optional[int] = None
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    params: Optional[Dict[str, str]] = None
    heartbeat_interval: Optional[int] = None
    grace_period: Optional[int] = None
    max_retry: Optional[int] = None
    max_failures: Optional[int] = None
    workers: Any = MISSING  # auto | N
    gpus: Optional[List[Any]] = None
    allow_config_change: bool = MISSING
    launcher: str = MISSING  # local | slurm
    slurm: SlurmConf = field(default_factory=SlurmConf)


ConfigStore.instance().store(
    group="hydra/sweeper", name="sft_sweep_schema", node=SftSweepSweeperConf, provider="sft_sweep"
)


class SftSweepSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        from sweeper.study import StudySweeper

        self._impl = StudySweeper(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self._impl.sweep(arguments)
