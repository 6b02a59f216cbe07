"""Hydra Sweeper plugin that runs a multirun as an Optuna study (see ``sweeper.sweep``).

Hydra imports this module at start-up of every app, so it stays import-light: the schema, its
ConfigStore registration, and a thin Sweeper that imports the Optuna implementation lazily.

    python train.py -m schedule=under,sweet,over
"""


from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


class Cost(Enum):
    """The second objective of ``direction: [minimize, minimize]`` (sweeper.objectives.COSTS)."""

    steps = 1  # optimizer steps trained
    tokens = 2  # input tokens seen
    gpu_seconds = 3  # seconds of training on its one GPU


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
    # Hydra instantiates the sweeper; sampler/pruner blocks with their own _target_ (hydra-optuna-sweeper's form)
    # reach it as config and are built by sweeper.samplers, which knows which of their keys are options
    _recursive_: bool = False
    storage: Optional[str] = MISSING  # null: hydra-optuna-sweeper's in-memory study -> a file in paths.output_dir
    study_name: Optional[str] = None
    n_trials: Optional[int] = None
    # name | _target_, seed and the sampler's options (sweeper.samplers): open, as a sampler class takes any
    sampler: Dict[str, Any] = field(default_factory=dict)
    # name (none | median | hyperband) with its keys, or _target_ with a pruner's options; null: none
    pruner: Optional[Dict[str, Any]] = field(default_factory=dict)
    direction: Any = None  # null: eval.metric's; minimize | maximize | [metric's, minimize] (metric vs cost)
    cost: Cost = MISSING  # the second objective of a two-objective direction
    # params and search_space are Any: OmegaConf cannot merge a dict into a typed dict node that is null, so
    # hydra.sweeper.params={...} on the command line would fail inside OmegaConf (sweeper.sweep.settings checks them)
    params: Any = None  # {key: override}
    custom_search_space: Optional[str] = None  # import path of a function (cfg, trial) that adds params
    n_jobs: Optional[int] = None  # hydra-optuna-sweeper's parallel trials -> workers
    max_failure_rate: Optional[float] = None  # stop once this share of finished trials failed (null: never)
    search_space: Any = None  # hydra-optuna-sweeper's deprecated form: refused, naming params
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
        from sweeper.sweep.plugin import StudySweeper

        self._impl = StudySweeper(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        """The study's sweep. A Ctrl-C outside a running trial (which the sweeper handles itself) ends it
        with one line and exit code 130; a storage that fails mid-sweep (a PostgreSQL role at its connection
        limit, a server gone, a database error) with one line and exit code 1."""
        from sweeper.config import InputError
        from sweeper.storage import StorageError

        try:
            return self._impl.sweep(arguments)
        except KeyboardInterrupt:
            from sweeper.interrupt import sweep_stopped

            raise sweep_stopped() from None
        except StorageError as e:
            raise InputError(str(e)) from None
        except Exception as e:  # a database error no check foresaw (the file or server changed meanwhile)
            import sqlalchemy.exc
            from optuna.exceptions import StorageInternalError

            from sweeper.storage import describe_error

            if not isinstance(e, (sqlalchemy.exc.SQLAlchemyError, StorageInternalError)):
                raise
            cause = e.__cause__ if isinstance(e, StorageInternalError) and e.__cause__ is not None else e
            raise InputError(f"{describe_error(str(self._impl.storage_url), cause)}; finished trials are kept: fix "
                             "it and run the same command again to resume") from None
