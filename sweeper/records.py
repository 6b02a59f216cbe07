"""What a study records about its trials: every attr the sweeper and the job exchange, by name and shape,
with typed read/write helpers, and the few Optuna storage calls that have no public form.

    python -m sweeper status --storage sqlite:///outputs/optuna.db      # prints what these attrs hold

Trial system attrs (kept out of optuna-dashboard's attribute table, or Optuna's own):

- :data:`CONFIG` ``dict``: the settings the trial ran (``sweeper.identity.result_config``), set at the claim.
- :data:`OVERRIDES` ``list[str]``: the overrides a follow-up command repeats to run the same settings.
- :data:`COMMAND` ``{"prog", "config_dir"}``: how the sweep was started (``sweeper.program.Program``), which a
  follow-up command starts with.
- :data:`SWEEP_ID` ``str``: the sweep (command run) that claimed the trial.
- :data:`WORKER_PROCESS` ``str``: ``host:pid:start`` of the worker running it.
- :data:`FAILED_TRIAL` ``int``: on a retry, the number of the failed trial it repeats (Optuna's retry callback).
- :data:`FIXED_PARAMS` ``dict``: a queued trial's params (Optuna's ``enqueue_trial``).
- :data:`WSD_TRUNK` ``dict``: a joint WSD search's trunk record (``group``, ``lr``, ``learning_rates``, the
  halving rule's ``rule``/``eta``/``maximize``/``metric``, ``rungs`` {step: branch value}, and
  :data:`PARKED_AT`, the rung where it waits in the queue, or None).
- :data:`WSD_BRANCH_KEY` ``str`` and :data:`WSD_BRANCH_OF` ``int``: a WSD branch trial and its trunk's number.
- :data:`EVAL_CURVE` ``[[step, value], ...]``: a two-objective trial's evaluations (Optuna cannot report them).
- :data:`SYSTEM_ATTRS`: the job's long results (curves, the SFTConfig, the plan, the speed settings, the trunk
  record).

Trial user attrs: :data:`ERROR` ``str`` (why it failed), :data:`RETRY_OF` ``{"trial", "error"}`` (the failed run
a retry repeats), :data:`RUN_DIR` ``str``, :data:`STOPPED_REASON` ``str``, :data:`TRACKING_RUN`
``{"backend", "run_id", "parent", "name"}`` (its run in MLflow or W&B, ``sweeper.tracking``) and the job's results.
Study attrs: :data:`METRIC`, :data:`COST`, :data:`DATA`, :data:`MODEL`, :data:`SLURM_JOBS` (user) and the
abandoned learning rates of a joint search (system, :func:`abandoned_rates`).

Optuna's trial and study ids, its storage behind a study and ``Trial._suggest`` are private; within the
sweeper they are reached only here (:func:`storage`, :func:`trial_id`, :func:`new_trial`, :func:`suggest`,
:func:`draw`, :func:`fix`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: the job side reads these names without importing Optuna
    import optuna

__all__ = [
    "ABANDONED", "COMMAND", "CONFIG", "COST", "DATA", "ERROR", "EVAL_CURVE", "FAILED_TRIAL", "FIXED_PARAMS", "METRIC", "MODEL", "OVERRIDES",
    "PARKED_AT", "RETRY_OF", "RUN_DIR", "SLURM_JOBS", "STOPPED_REASON", "SWEEP_ID", "SYSTEM_ATTRS", "TRACKING_RUN", "WORKER_PROCESS",
    "WSD_BRANCH_KEY", "WSD_BRANCH_OF", "WSD_TRUNK",
    "abandoned_rates", "add_slurm_jobs", "config_of", "draw", "drawn_params", "error_of", "failed_trial_of", "fix",
    "frozen", "is_branch", "is_parked", "new_trial", "parked_at", "queued_params", "retried_config",
    "set_abandoned_rates", "set_state", "set_system",
    "set_user", "slurm_jobs", "stopped_reason_of", "storage", "suggest", "tracking_run_of", "trial_by_number",
    "trial_id", "trunk_of", "worker_process_of",
]

# trial system attrs
CONFIG = "config"
OVERRIDES = "overrides"
COMMAND = "command"
SWEEP_ID = "sweep_id"
WORKER_PROCESS = "worker_process"
FAILED_TRIAL = "failed_trial"  # written by optuna.storages.RetryHeartbeatStaleTrialCallback
FIXED_PARAMS = "fixed_params"  # written by optuna.Study.enqueue_trial
WSD_TRUNK = "wsd_trunk"
PARKED_AT = "parked_at"  # a key of the WSD_TRUNK record
WSD_BRANCH_KEY = "wsd_branch_key"
WSD_BRANCH_OF = "wsd_branch_of"
EVAL_CURVE = "eval_curve"  # a multi-objective trial's evaluations [[step, value], ...] (sweeper.objectives)
# results kept in system attrs, not user attrs: long values (curves, the SFTConfig, the plan, the speed dict) would make
# optuna-dashboard's attribute table thousands of pixels wide (see sweeper.sweep.handle.TrialReporter.set_attrs)
SYSTEM_ATTRS = ("train_curve", "accuracy_curve", "loss_curve", "token_accuracy_curve", "sft_config", "plan", "speed",
                WSD_TRUNK)

# trial user attrs
ERROR = "error"
RETRY_OF = "retry_of"
RUN_DIR = "run_dir"
STOPPED_REASON = "stopped_reason"
TRACKING_RUN = "tracking_run"

# study attrs: user (METRIC ... SLURM_JOBS) and system (ABANDONED + group)
METRIC = "metric"
COST = "cost"
DATA = "data"
MODEL = "model"
SLURM_JOBS = "slurm_jobs"
ABANDONED = "wsd_abandoned:"


# --------------------------------------------------------------------------- Optuna's storage, in one place


def storage(study: optuna.Study, fresh: bool = False) -> Any:
    """The storage behind ``study``; ``fresh``: past Optuna's cache, which does not see a trial another
    process changed."""
    s = study._storage
    return getattr(s, "_backend", s) if fresh else s


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (its number counts within the study, the id across the storage)."""
    return trial._trial_id


def trial_by_number(study: optuna.Study, number: int) -> int:
    """The storage id of trial ``number`` of ``study``."""
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(number))


def frozen(study: optuna.Study, tid: int, fresh: bool = False) -> optuna.trial.FrozenTrial:
    return storage(study, fresh).get_trial(tid)


def all_trials(study: optuna.Study, fresh: bool = False) -> list[optuna.trial.FrozenTrial]:
    return storage(study, fresh).get_all_trials(study._study_id, deepcopy=False)


def new_trial(study: optuna.Study) -> int:
    """A new RUNNING trial, as ``study.ask`` makes one (without taking a WAITING one); its id."""
    return study._storage.create_new_trial(study._study_id)


def set_state(study: optuna.Study, tid: int, state: optuna.trial.TrialState) -> bool:
    """Move a trial to ``state``; False when another process moved it first (RUNNING is taken once)."""
    return study._storage.set_trial_state_values(tid, state)


def set_system(study: optuna.Study, tid: int, key: str, value: Any, fresh: bool = False) -> None:
    storage(study, fresh).set_trial_system_attr(tid, key, value)


def set_user(study: optuna.Study, tid: int, key: str, value: Any, fresh: bool = False) -> None:
    storage(study, fresh).set_trial_user_attr(tid, key, value)


def set_param(study: optuna.Study, tid: int, name: str, value: Any, dist: Any) -> None:
    """Record a param the trial already ran with (past the cache: another process asked the trial)."""
    storage(study, fresh=True).set_trial_param(tid, name, dist.to_internal_repr(value), dist)


def suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    """``trial``'s value of ``name``: its fixed param (queued, or set by :func:`fix`), else the sampler's suggestion."""
    return trial._suggest(name, dist)


class _Unrecorded:
    """A storage that reads through to ``backend`` but records no param (:func:`draw`)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def set_trial_param(self, *args: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def draw(trial: optuna.Trial, dists: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
    """What :func:`suggest` would give ``trial`` for each of ``dists`` (fixed params, else the sampler's draws),
    recorded nowhere: the sweep may move the draw (:func:`fix`) before the trial takes its params."""
    recording = trial.storage
    trial.storage = _Unrecorded(recording)
    try:
        return {name: trial._suggest(name, dist) for name, dist in dists.items()}
    finally:
        trial.storage = recording
        trial._cached_frozen_trial = recording.get_trial(trial._trial_id)  # without the draws


def fix(trial: optuna.Trial, params: dict[str, Any]) -> None:
    """The values ``trial`` takes for ``params`` when they are suggested, instead of the sampler's; unlike a queued
    trial's (:data:`FIXED_PARAMS`) they count as drawn (:func:`drawn_params`)."""
    trial._fixed_params = {**trial._fixed_params, **params}


def study_system_attrs(study: optuna.Study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


# --------------------------------------------------------------------------- typed attrs


def error_of(t: optuna.trial.FrozenTrial, default: Any = None) -> Any:
    return t.user_attrs.get(ERROR, default)


def stopped_reason_of(t: optuna.trial.FrozenTrial) -> str | None:
    """Why a run stopped before its length (a WSD trunk's rule, early stopping), when it says."""
    return t.user_attrs.get(STOPPED_REASON)


def worker_process_of(t: optuna.trial.FrozenTrial) -> str:
    """``host:pid:start`` of the worker that claimed the trial ('' before a claim)."""
    return str(t.system_attrs.get(WORKER_PROCESS, ""))


def tracking_run_of(t: optuna.trial.FrozenTrial) -> dict:
    """The trial's run in a tracker (:data:`TRACKING_RUN`); {} when it has none."""
    return t.user_attrs.get(TRACKING_RUN) or {}


def config_of(t: optuna.trial.FrozenTrial) -> dict | None:
    return t.system_attrs.get(CONFIG)


def queued_params(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The params ``t`` was queued with (:data:`FIXED_PARAMS`: a grid point's), also before it took them."""
    return dict(t.system_attrs.get(FIXED_PARAMS) or {})


def drawn_params(t: optuna.trial.FrozenTrial) -> set[str]:
    """The names of ``t``'s params it was not queued with (a sampler drew them, or a custom search space): its
    :data:`CONFIG`, the command's before the draw, does not hold their values."""
    return set(t.params) - set(queued_params(t))


def failed_trial_of(t: optuna.trial.FrozenTrial) -> int | None:
    """On a retry: the number of the failed trial it repeats."""
    return t.system_attrs.get(FAILED_TRIAL)


def retried_config(study: optuna.Study, t: optuna.trial.FrozenTrial) -> dict | None:
    """A queued retry's settings: those of the failed trial it repeats (None for any other trial)."""
    failed = failed_trial_of(t)
    if failed is None:
        return None
    return config_of(study._storage.get_trial(trial_by_number(study, failed)))


def trunk_of(t: optuna.trial.FrozenTrial) -> dict:
    """A joint WSD search's trunk record (:data:`WSD_TRUNK`); {} for any other trial."""
    return t.system_attrs.get(WSD_TRUNK) or {}


def parked_at(t: optuna.trial.FrozenTrial) -> int | None:
    """The rung where a joint search's trunk waits in the queue for the halving rule, or None."""
    return trunk_of(t).get(PARKED_AT)


def is_parked(t: optuna.trial.FrozenTrial) -> bool:
    return parked_at(t) is not None


def is_branch(t: optuna.trial.FrozenTrial) -> bool:
    """A WSD branch recorded by its trunk's job: extra to the sweep's n_trials and grid points."""
    return WSD_BRANCH_OF in t.system_attrs


def abandoned_rates(study: optuna.Study, group: str) -> list[float]:
    """Learning rates of the joint search ``group`` that no worker will start."""
    return list(study_system_attrs(study).get(ABANDONED + group) or [])


def set_abandoned_rates(study: optuna.Study, group: str, rates: list[float]) -> None:
    study._storage.set_study_system_attr(study._study_id, ABANDONED + group, rates)


def slurm_jobs(study: optuna.Study) -> list[str]:
    """The SLURM worker jobs that served ``study``."""
    return list(study.user_attrs.get(SLURM_JOBS, []))


def add_slurm_jobs(study: optuna.Study, jobs: list[str]) -> None:
    study.set_user_attr(SLURM_JOBS, sorted(set(slurm_jobs(study)) | set(jobs)))
