"""Hydra multirun <-> Optuna study: the sweeper (:class:`StudySweeper`), its workers, and the job's handle
on its trial (:class:`TrialReporter`).

    python train.py -m schedule=under,sweet,over                      # a 3-point grid
    python train.py -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra.sweeper.n_trials=6

The overrides become a search space through ``sweeper.space`` (Hydra's sweep grammar, translated exactly);
studies are opened, locked and kept alive through ``sweeper.storage``. What the sweeper does with them:

- A grid (comma lists; with ``sampler.name=grid`` also choice and range): a command runs its own points
  that have no COMPLETE, PRUNED, RUNNING or WAITING trial of the same settings (``sweeper.identity``),
  whatever else the study holds (FAILED points run again when the command is re-run); ``n_trials`` only
  caps how many of its points it runs.
- Distributions (choice, range, interval) are sampled by ``sampler`` (``sweeper.samplers``: by name or
  ``_target_``); a sampled value that does not fit its key (``sweeper.typefit``) or two points that are one
  run (``sweeper.points``) are refused before any trial. With distributions
  ``n_trials`` is the study's total (COMPLETE, PRUNED, RUNNING and WAITING trials count), never
  "additional"; it defaults to 10.
- A command whose unswept settings differ from every earlier trial's is refused before any trial
  (``allow_config_change`` adds it anyway).
- Points of several datasets or models (``data=a,b``: anything that changes ``<data.name>-<model.name>``)
  go to one study each, named as a single-dataset command names it; the studies share the workers, and a
  free worker takes the next trial of any of them (:meth:`StudySweeper._claim_next`). ``n_trials`` and
  every check apply per study; at the end the report prints a table of datasets.

Workers (``sweeper.workers``): this process is worker 0 and runs its trials in-process; workers
1..N-1 are copies of the command, each seeing one GPU; with ``launcher=slurm`` every worker is a
SLURM job (``sweeper.slurm``) and this process watches the study and replaces dead workers.

Each job gets ``study.name`` and ``study.trial_number`` overrides and reports into its own trial
through :class:`TrialReporter` (every evaluation -> ``trial.report``; ``should_prune`` honoured).
The sweeper then tells the trial its value (the job's return: the best metric of the run), or
FAIL with the error as the ``error`` user attr, or PRUNED; a failing trial never stops the sweep.
A joint WSD search's trunk that must wait at a rung for trunks no worker trains is *parked*: its trial
goes back to WAITING, and :meth:`StudySweeper._claim` hands it out again only once the halving rule
(``sweeper.halving``, on the study's view in ``sweeper.trunks``) has decided it; a worker with nothing
else to start waits for that instead of ending.

Two objectives (``hydra.sweeper.direction``, ``sweeper.objectives``): the job's value and its recorded cost are
told together; its evaluations are kept as an attr, since Optuna cannot report or prune there.
hydra-optuna-sweeper's fields map through ``sweeper.hos``.

Within ``sweeper/``, Optuna is imported here, in ``sweeper.space``, ``sweeper.storage``, ``sweeper.trunks``,
``sweeper.samplers``, ``sweeper.objectives``, ``sweeper.points``, ``sweeper.typefit``, ``sweeper.report``,
``sweeper.report_front`` and the commands
that read studies back; never in ``sweeper.trial``. Public: ``__all__``. ``open_storage``, ``mask_url``,
``SYSTEM_ATTRS`` and ``is_branch`` (``sweeper.storage``) stay importable from here for older callers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import optuna
import sqlalchemy.exc
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sweeper import config as config_mod
from sweeper import disk, fingerprint, folders, halving, hos, identity, objectives, passwords, samplers, typefit
from sweeper import gpu as gpu_mod
from sweeper import points as points_mod
from sweeper import tracking as tracking_mod
from sweeper import trunks as trunks_mod
from sweeper import workers as workers_mod
from sweeper.reporter import Parked
from sweeper.space import SweepSpace, build_space, exhaust_finite, quote, value_text
from sweeper.storage import (
    SYSTEM_ATTRS,
    Heartbeat,
    claim_lock,
    fail_and_requeue,
    heartbeat_age_s,
    is_branch,
    mask_url,
    open_storage,
    sqlite_path,
)

__all__ = ["StudySweeper", "TrialReporter", "make_pruner", "make_sampler"]

log = logging.getLogger(__name__)

_COVERED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)
DEFAULT_N_TRIALS_WITH_DISTRIBUTIONS = 10
PARKED_POLL_S = 2.0  # a worker with nothing to start while joint-search trunks are parked looks again this often
_SWEEP_ID_ENV = "SFT_SWEEP_SWEEP_ID"


# --------------------------------------------------------------------------- worker processes


def _settings(overrides: Sequence[str]) -> list[str]:
    """The overrides a follow-up command repeats to run in the same study with the same settings: all but
    the schedule (what a follow-up changes) and the sweeper's, paths' and study's own (a storage URL may
    hold a password)."""
    own = ("schedule", "hydra.", "hydra/", "paths.", "study.")
    return [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(own)]


def _threads_per_worker(n: int) -> int:
    """CPU threads for each of ``n`` workers on this host: the cores shared out (as torchrun does), so that
    N processes of a machine-wide thread pool each do not slow every trial down."""
    return max(1, (os.cpu_count() or 1) // max(1, n))


def _share_cpu_threads(n: int) -> None:
    """This process's share of the CPU threads when it is one of ``n`` > 1 local workers (unless the
    user set OMP_NUM_THREADS)."""
    if n <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker(n))
    if "torch" in sys.modules:  # already imported (e.g. to build the tiny model): set its pool directly
        sys.modules["torch"].set_num_threads(_threads_per_worker(n))


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """While a trial runs: Ctrl-C, SIGTERM (what scancel, docker and systemd send) and SIGUSR2 (SLURM's
    warning before a time limit) raise KeyboardInterrupt, so the trial's retry is queued before the
    process ends. The first one turns the others off for good: a second Ctrl-C, 50 ms later, cannot cut
    the queuing short."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def stop(signum: int, frame: Any) -> None:
        for s in stops:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt("" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}")

    old = {s: signal.signal(s, stop) for s in stops}
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        for s in stops:  # from here on every stop signal is ignored, until the process exits
            signal.signal(s, signal.SIG_IGN)
        raise
    finally:
        if not interrupted:
            for s, handler in old.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def make_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner:
    return samplers.make_pruner(pruner_cfg)


def make_sampler(sampler_cfg: Any, n_objectives: int = 1) -> optuna.samplers.BaseSampler:
    return samplers.make_sampler(sampler_cfg, n_objectives)


# --------------------------------------------------------------------------- the job side


class TrialReporter:
    """The job's handle on its own trial: report, prune, store attrs. Used by ``sweeper.trial``."""

    def __init__(self, trial: optuna.Trial, storage: Any = None, stale_after_s: float | None = None) -> None:
        self.trial = trial
        self._storage = storage
        self.stale_after_s = stale_after_s  # a RUNNING trial whose heartbeat is older has lost its worker

    @classmethod
    def from_job(cls, cfg: DictConfig) -> "TrialReporter":
        from hydra.core.hydra_config import HydraConfig

        sweeper_cfg = HydraConfig.get().sweeper
        storage = open_storage(sweeper_cfg.storage)
        study = optuna.load_study(study_name=cfg.study.name, storage=storage, pruner=make_pruner(sweeper_cfg.pruner))
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(cfg.study.trial_number))
        frozen = study._storage.get_trial(trial_id)
        if frozen.system_attrs.get("failed_trial") is not None and frozen.user_attrs.get("error"):
            # a retry inherits its failed run's attrs: keep why that one failed, not as this trial's error
            study._storage.set_trial_user_attr(trial_id, "retry_of", {
                "trial": frozen.system_attrs["failed_trial"], "error": frozen.user_attrs["error"]})
            study._storage.set_trial_user_attr(trial_id, "error", None)
        beat = sweeper_cfg.get("heartbeat_interval")
        stale = sweeper_cfg.get("grace_period") or (2 * beat if beat else None)
        return cls(optuna.Trial(study, trial_id), storage, stale)

    def close(self) -> None:
        """Drop the job's database connections, so that an interrupted write (Ctrl-C in the middle of
        a report) cannot keep SQLite locked against the sweeper, which records the trial's end."""
        if self._storage is not None:
            self._storage.engine.dispose()

    def resume_checkpoint(self) -> str | None:
        """For a trial re-queued after its worker died, or a joint search's trunk parked at a rung: the
        newest whole checkpoint its run left (:func:`sweeper.checkpoints.newest_resumable`)."""
        frozen = self.trial.study._storage.get_trial(self.trial._trial_id)
        parked = (frozen.system_attrs.get("wsd_trunk") or {}).get("parked_at") is not None
        if frozen.system_attrs.get("failed_trial") is None and not parked:
            return None
        run_dir = frozen.user_attrs.get("run_dir")
        if not run_dir or not Path(run_dir).is_dir():
            return None
        from sweeper import checkpoints  # whole ones only: a kill can cut a save short

        return checkpoints.newest_resumable(run_dir, f"trial {self.trial.number}'s retry")

    def report(self, value: float, step: int) -> None:
        from sweeper import inject

        inject.in_report(self.trial.study._storage, self.trial._trial_id, step)
        with warnings.catch_warnings():  # a retry re-reports steps its failed run reported (same values)
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            if len(self.trial.study.directions) == 1:
                self.trial.report(value, step)
            else:  # Optuna cannot report into a multi-objective trial: its curve is kept as an attr
                objectives.record_curve(self.trial, value, step)

    def should_prune(self) -> bool:
        return len(self.trial.study.directions) == 1 and self.trial.should_prune()

    def prune(self, step: int) -> None:
        raise optuna.TrialPruned(f"pruned at step {step}")

    # -- schedule=wsd_search (sweeper.wsd): the job's trial is the trunk; each branch a trial of its own

    @property
    def number(self) -> int:
        return self.trial.number

    def stop(self, reason: str) -> None:
        """End the trial PRUNED (the sweeper records it so) with ``reason`` in ``stopped_reason``."""
        self.trial.set_user_attr("stopped_reason", reason)
        raise optuna.TrialPruned(reason)

    def set_wsd_params(self, max_steps: int, low: int, high: int) -> None:
        """Record the trunk's own params (max_steps, method=wsd), so the dashboard lines it up with its
        branches and with cosine trials; kept as they are on a retried trial, which inherits them."""
        storage = self.trial.study._storage
        storage = getattr(storage, "_backend", storage)  # the cache does not know a trial asked by another process
        frozen = storage.get_trial(self.trial._trial_id)
        for name, value, dist in _wsd_params(max_steps, low, high):
            if name not in frozen.params:
                storage.set_trial_param(self.trial._trial_id, name, dist.to_internal_repr(value), dist)

    def record_branch(self, *, key: str, max_steps: int, low: int, high: int, value: float,
                      curve: list, user_attrs: dict) -> int:
        """Add one finished WSD branch as a COMPLETE trial in one write (params max_steps, method=wsd;
        ``curve`` [[step, value], ...] as its intermediate values) and return its number. Idempotent:
        a branch already recorded under ``key`` (a resumed search) is not added twice."""
        study = self.trial.study

        def existing() -> int | None:
            return next((t.number for t in study.get_trials(deepcopy=False)
                         if t.system_attrs.get("wsd_branch_key") == key), None)

        number = existing()
        if number is not None:
            return number
        params = _wsd_params(max_steps, low, high)
        if "learning_rate" in user_attrs:  # a joint search's branch: the trunk's learning rate (and grid params)
            frozen = study._storage.get_trial(self.trial._trial_id)
            params += [(n, v, frozen.distributions[n]) for n, v in frozen.params.items()
                       if n not in ("max_steps", "method")]
        curves = {k: user_attrs[k] for k in SYSTEM_ATTRS if k in user_attrs}  # where set_attrs keeps them
        study.add_trial(optuna.trial.create_trial(
            params={n: v for n, v, _ in params}, distributions={n: d for n, _, d in params},
            value=float(value), intermediate_values={int(s): float(v) for s, v in curve},
            user_attrs={k: v for k, v in user_attrs.items() if k not in curves and k != "curve"},
            system_attrs={"wsd_branch_key": key, "wsd_branch_of": self.trial.number, **curves},
        ))
        return existing()

    def trunks(self, trunk: dict) -> list[halving.Trunk]:
        """A joint search: every learning rate's trunk as the study holds it now (``sweeper.trunks.trunk_table``)."""
        study = self.trial.study
        storage = getattr(study._storage, "_backend", study._storage)
        trials = storage.get_all_trials(study._study_id, deepcopy=False)
        return trunks_mod.trunk_table(trials, trunk, trunks_mod.abandoned(study, trunk["group"]),
                                      lambda t: trunks_mod.fresh(storage, t, self.stale_after_s))

    def park(self, reason: str) -> None:
        """Raise :class:`sweeper.reporter.Parked`: the sweeper puts the trial back in the queue (WAITING)."""
        raise Parked(reason)

    def set_attrs(self, attrs: dict) -> None:
        """Store the job's results on its trial: ``SYSTEM_ATTRS`` as system attrs (long values would make
        optuna-dashboard's attribute table thousands of pixels wide), the rest as user attrs."""
        for k, v in attrs.items():
            if k in SYSTEM_ATTRS:
                self.trial.storage.set_trial_system_attr(self.trial._trial_id, k, v)
            else:
                self.trial.set_user_attr(k, v)


def _not_started(e: Exception) -> Any:
    """A job that Hydra could not start (its sampled overrides do not compose) as a failed JobReturn whose
    error is one line: the innermost cause, e.g. a float for an int key."""
    from hydra.core.utils import JobReturn, JobStatus

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    first = (str(root).strip().splitlines() or [type(root).__name__])[0]
    outer = (str(e).strip().splitlines() or [""])[0]
    text = f"{outer}: {first}" if outer and root is not e and first not in outer else first
    return JobReturn(status=JobStatus.FAILED, _return_value=ValueError(f"the job could not start: {text}"))


def _wsd_params(max_steps: int, low: int, high: int) -> list[tuple[str, Any, Any]]:
    return [("max_steps", int(max_steps), optuna.distributions.IntDistribution(int(low), int(high))),
            ("method", "wsd", optuna.distributions.CategoricalDistribution(["cosine", "wsd"]))]


# --------------------------------------------------------------------------- the sweeper side


@dataclass
class _Sweep:
    """One study of a command, as prepared: the study, its part of the search space and its points."""

    study: optuna.Study
    name: str
    space: SweepSpace  # its own: keys that pick the study (``data=demo``) are fixed overrides here
    points: list  # grid points this command runs ([{}] with distributions only)
    pure_grid: bool
    total: int  # a grid: its own points; sampled: the study's n_trials
    dists: dict
    configs: list = field(default_factory=list)  # each point's result config (sweeper.identity)
    cfgs: list = field(default_factory=list)  # each point's composed config
    order: list = field(default_factory=list)  # each point's place in the command's grid (claim order)

    @property
    def folder(self) -> Path:
        """The study's folder (``hydra.sweep.dir`` of its runs): its trials and summary.md."""
        return Path(str(self.cfgs[0].hydra.sweep.dir))


@dataclass
class _Command:
    """One command's sweep: a study per dataset and model it covers, and the workers they share."""

    sweeps: list[_Sweep]
    plan: workers_mod.WorkerPlan | None = None

    @property
    def folder(self) -> Path:
        """Where the command's own files go (worker logs, SLURM logs, the table of datasets): the study's
        folder, or with several studies the folder that holds theirs (``outputs/sweeps``)."""
        if len(self.sweeps) == 1:
            return self.sweeps[0].folder
        return Path(os.path.commonpath([str(sw.folder.resolve()) for sw in self.sweeps]))

    @property
    def names(self) -> str:
        return ", ".join(sw.name for sw in self.sweeps)


@dataclass(frozen=True)
class _Counts:
    to_run: int
    done: int
    running: int  # running elsewhere (a live worker, or a dead one whose heartbeat has not gone stale yet)
    stale_after: str | None = None

    def describe(self, pure_grid: bool, total: int) -> str:
        what = "of this grid" if pure_grid else f"of n_trials={total} (the study's total)"
        text = f"{self.to_run} to run, {self.done} already done, {self.running} running elsewhere {what}"
        if self.running and self.stale_after:
            text += f"; a running trial whose worker died is re-run after its heartbeat goes stale, at {self.stale_after}"
        return text


def _check_study_name(name: str) -> str:
    """A study name also names its folder (``outputs/sweeps/<study>``): any letters, digits, spaces and
    punctuation, but no path separator, control character or ``.``/``..``, at most 200 characters."""
    bad = next((c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    if not name.strip() or name in (".", "..") or bad is not None or len(name) > 200:
        why = (f"it holds {bad!r}" if bad is not None else "it is empty" if not name.strip()
               else "it is longer than 200 characters" if len(name) > 200 else "it is a relative folder name")
        raise ValueError(f"hydra.sweeper.study_name={name!r} cannot name a study and its folder: {why}; use letters, "
                         "digits, spaces and punctuation other than / and \\ (e.g. hydra.sweeper.study_name=intents-v2)")
    return name


def _this_process() -> str:
    """``host:pid:start`` of this process (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _dead_here(proc: str) -> bool:
    """Whether ``host:pid:start`` names a process of this host that no longer runs."""
    host, _, rest = proc.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return True  # killed, not yet reaped by its parent
    except (OSError, IndexError):
        pass
    return start not in ("", "?") and _start_ticks(int(pid)) not in (start, "?")  # the pid was reused


class StudySweeper:
    """Implementation behind ``hydra_plugins.sft_sweep.SftSweepSweeper``."""

    def __init__(self, storage: str, study_name: str | None, n_trials: int | None, sampler: Any,
                 pruner: Any, params: Any = None, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, max_retry: int | None = None,
                 max_failures: int | None = None, workers: Any = "auto", gpus: Any = None,
                 launcher: str = "local", slurm: Any = None, allow_config_change: bool = False,
                 direction: Any = None, cost: Any = "steps", custom_search_space: str | None = None,
                 n_jobs: int | None = None, max_failure_rate: float | None = None, search_space: Any = None) -> None:
        self.storage_url = storage
        # hydra-optuna-sweeper's fields (sweeper.hos, sweeper.objectives): checked in sweep()
        self.direction, self.cost = direction, str(getattr(cost, "name", cost))
        self.custom_search_space_arg, self.n_jobs, self.max_failure_rate = custom_search_space, n_jobs, max_failure_rate
        self.search_space = search_space
        self.study_name = study_name
        self.n_trials = n_trials
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.params = params or {}
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self.max_failures = max_failures
        self.workers_arg, self.gpus_arg, self.launcher_arg = workers, gpus, launcher  # checked in sweep()
        self.slurm_cfg = slurm
        self.allow_config_change = bool(allow_config_change)
        self.job_idx = 0
        # one id per sweep, shared by the workers it starts: a point that failed in this sweep is
        # not run again until the command is re-run
        self.sweep_id = os.environ.get(_SWEEP_ID_ENV) or uuid.uuid4().hex[:12]

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        passwords.install_log_filter(passwords.secret_values(  # the command's log lines and worker logs
            dict(config.hydra.job.get("env_set") or {}), self.storage_url))
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- helpers

    def _split_by_study(self, space: SweepSpace, cfgs: list[DictConfig]) -> list[tuple[str, SweepSpace, list, list]]:
        """The command's grid points grouped by the study each belongs to, ``<data.name>-<model.name>`` of
        its composed config (whatever changed them: ``data=a,b``, ``model=...``, ``data.train_path=...``),
        in the command's order: ``[(name, space, points, indices)]``. In each study's own space the keys
        that are constant within it (``data=demo``) are fixed overrides, so its trials record the params a
        single-dataset command would, and either command resumes the other's."""
        points = space.grid_points()
        names = [identity.default_study_name(c) for c in cfgs]
        distinct = list(dict.fromkeys(names))
        if self.study_name is not None:
            name = _check_study_name(str(self.study_name))
            if len(distinct) > 1:
                raise ValueError(
                    f"hydra.sweeper.study_name={name!r} names one study, but this sweep covers {len(distinct)} "
                    f"datasets/models ({', '.join(distinct)}) and a study holds one; drop hydra.sweeper.study_name "
                    "to run one study per dataset and model (each named <data.name>-<model.name>)")
            return [(name, space, points, list(range(len(points))))]
        self._check_sampled_names(space, cfgs[0])
        if len(distinct) == 1:
            return [(distinct[0], space, points, list(range(len(points))))]
        out = []
        for name in distinct:
            idx = [i for i, n in enumerate(names) if n == name]
            mine = [points[i] for i in idx]
            constant = [k for k, _ in space.grid if len({p[k][1] for p in mine}) == 1]
            sub = SweepSpace(
                fixed=space.fixed + [f"{k}={mine[0][k][1]}" for k in constant],
                grid=[(k, [vt for vt in vals if any(p[k][1] == vt[1] for p in mine)])
                      for k, vals in space.grid if k not in constant],
                distributions=dict(space.distributions))
            out.append((name, sub, [{k: v for k, v in p.items() if k not in constant} for p in mine], idx))
        folders = {}
        for name, _, _, idx in out:
            folder = str(cfgs[idx[0]].hydra.sweep.dir)
            if folder in folders:
                raise ValueError(
                    f"hydra.sweep.dir={folder} is one folder for the studies {folders[folder]!r} and {name!r}, whose "
                    "trial_<n> folders would collide; leave hydra.sweep.dir at its default (a folder per study) or "
                    "put ${data.name}-${model.name} in it")
            folders[folder] = name
        return out

    def _check_sampled_names(self, space: SweepSpace, cfg: DictConfig) -> None:
        """Refuse a distribution that would pick the study (``data=choice(a,b)``): a sampled value is known
        only once its trial exists, but each dataset and model has its own study."""
        for key, dist in space.distributions.items():
            if not isinstance(dist, optuna.distributions.CategoricalDistribution):
                continue
            for value in dist.choices:
                try:
                    other = self.hydra_context.config_loader.load_sweep_config(
                        self.config, space.fixed + [f"{key}={value_text(value)}"])
                except Exception:  # a choice that does not compose fails its own trial, as before
                    continue
                if identity.default_study_name(other) != identity.default_study_name(cfg):
                    choices = ",".join(value_text(v) for v in dist.choices)
                    raise ValueError(
                        f"{key}=choice({choices}) samples the dataset or model, but each has its own study "
                        f"(<data.name>-<model.name>); list them as a grid, {key}={choices}")

    def _check_sampled_names_early(self, space: SweepSpace) -> None:
        """:meth:`_check_sampled_names` on the first grid point's config, before a small finite space becomes a
        grid (a point that does not compose is left to the pre-flight, which names it)."""
        if not space.distributions or self.study_name is not None:
            return
        first = space.fixed + [f"{k}={t}" for k, (_, t) in space.grid_points()[0].items()]
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, first)
        except Exception:
            return
        self._check_sampled_names(space, cfg)

    def _joint_rates(self, space: SweepSpace) -> SweepSpace:
        """``schedule=wsd_search`` with several learning rates is one trunk, so one trial, per rate: the rates
        of ``schedule.wsd.learning_rates`` become a grid over ``lr.learning_rate``; a grid over
        ``lr.learning_rate`` alone (``lr.learning_rate=1e-4,2e-4``) sets ``schedule.wsd.learning_rates``, so
        each trunk knows the others. Left as it is when a point is not a WSD search or does not compose (the
        pre-flight names that)."""
        loader = self.hydra_context.config_loader
        points = space.grid_points()
        if not any(k == "schedule" or k.startswith("schedule.wsd") for k, _ in space.grid):
            points = points[:1]  # the schedule is the same at every point: one composed config tells
        try:
            cfgs = [loader.load_sweep_config(self.config, space.fixed + [f"{k}={t}" for k, (_, t) in p.items()])
                    for p in points]
        except Exception:
            return space
        wsd = [c.schedule.get("wsd") for c in cfgs]
        if any(w is None for w in wsd):
            return space
        lists = {None if w.get("learning_rates") is None else tuple(float(r) for r in w.learning_rates) for w in wsd}
        swept = dict(space.grid).get("lr.learning_rate")
        if lists == {None}:
            if swept and len(swept) > 1:
                rates = ",".join(value_text(float(v)) for v, _ in swept)
                return dataclasses.replace(space, fixed=space.fixed + [f"schedule.wsd.learning_rates=[{rates}]"])
            return space
        if len(lists) > 1:
            return space
        if swept or "lr.learning_rate" in space.distributions:
            raise ValueError("schedule.wsd.learning_rates lists the learning rates of the joint search, so "
                             "lr.learning_rate must not be swept as well; give the rates once, as "
                             "schedule.wsd.learning_rates=[...] or as lr.learning_rate=a,b,c")
        [rates] = lists
        return dataclasses.replace(space, grid=space.grid + [("lr.learning_rate", [(r, value_text(r)) for r in rates])])

    def _preflight(self, space: SweepSpace) -> list[DictConfig]:
        """Compose and check every grid point (and the data each one names) before any trial;
        returns the composed configs."""
        from sweeper import data as data_mod
        from sweeper.spec import check_folders

        seen_data: set[str] = set()
        cfgs = []
        for point in space.grid_points():
            overrides = space.fixed + [f"{k}={t}" for k, (_, t) in point.items()]
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            config_mod.validate(cfg)
            check_folders(cfg)
            if self.launcher_name == "local":  # SLURM jobs run where the GPUs are, not here
                gpu_mod.check_precision(str(cfg.precision.compute), str(cfg.precision.name))
            key = OmegaConf.to_yaml(cfg.data) + OmegaConf.to_yaml(cfg.model)
            if key not in seen_data:
                seen_data.add(key)
                splits = data_mod.load(cfg.data, cfg.paths.cache_dir)
                data_mod.check_train_size(splits, cfg.batch)
                # tokenised as the trials will (then a cache hit for them); a worker's leader did it already
                if self.launcher_name == "local" and _SWEEP_ID_ENV not in os.environ:
                    from sweeper.sft import check_prepared_data

                    check_prepared_data(cfg, splits)
            cfgs.append(cfg)
        db = sqlite_path(self.storage_url)
        if db is not None:
            disk.check_writable(db.parent, "hydra.sweeper.storage")
        return cfgs

    def _create_study(self, name: str, cfg: DictConfig) -> optuna.Study:
        """Create (or load) the study ``name`` for the runs of ``cfg``, one composed config of it."""
        metric = str(cfg.eval.metric)
        wanted = objectives.directions(self.direction, metric, config_mod.metric_direction(metric), self.cost)
        multi = len(wanted) > 1
        study = optuna.create_study(
            study_name=name,
            storage=open_storage(self.storage_url, self.heartbeat_interval, self.grace_period, self.max_retry),
            sampler=make_sampler(self.sampler_cfg, len(wanted)),
            pruner=optuna.pruners.NopPruner() if multi else make_pruner(self.pruner_cfg), directions=wanted,
            load_if_exists=True,
        )
        had = [d.name.lower() for d in study.directions]
        if had != wanted:
            raise ValueError(
                f"study {name!r} in {mask_url(self.storage_url)} was created to {', '.join(had)}, but this command "
                f"needs {', '.join(wanted)} (eval.metric={metric}, hydra.sweeper.direction={self.direction}); use "
                "another hydra.sweeper.study_name")
        study.set_user_attr("metric", metric)
        if multi:
            study.set_user_attr("cost", self.cost)
        # the dashboard's axis labels
        study.set_metric_names([metric, objectives.COSTS[self.cost][1]] if multi else [metric])
        study.set_user_attr("data", str(cfg.data.name))
        study.set_user_attr("model", str(cfg.model.name))
        return study

    def _group_options(self, key: str) -> list[str] | None:
        from hydra.core.object_type import ObjectType

        if "." in key or key.startswith(("+", "~")):
            return None
        options = self.hydra_context.config_loader.get_group_options(key, results_filter=ObjectType.CONFIG)
        return sorted(options) or None

    @staticmethod
    def _check_compatible(study: optuna.Study, dists: dict[str, optuna.distributions.BaseDistribution]) -> None:
        """Refuse, before any trial is created, a param whose distribution the study cannot take."""
        seen: dict[str, optuna.distributions.BaseDistribution] = {}
        for t in study.get_trials(deepcopy=False):
            seen.update({k: d for k, d in t.distributions.items() if k in dists and k not in seen})
        for key, old in seen.items():
            try:
                optuna.distributions.check_distribution_compatibility(old, dists[key])
            except ValueError as e:
                raise ValueError(
                    f"{key}: study {study.study_name!r} already samples it as {old}, which cannot change to "
                    f"{dists[key]} ({e}); keep the earlier values or start a new study with "
                    "hydra.sweeper.study_name=..."
                ) from None

    @staticmethod
    def _matches(trial: optuna.trial.FrozenTrial, point: dict[str, tuple[Any, str]], config: dict | None = None) -> bool:
        """Whether ``trial`` ran grid ``point`` (its params) with ``config`` (the point's result config;
        None: params alone). A key the trial has no param for is judged by its recorded config: ``max_steps=10`` run as
        a fixed value is the point ``10`` of a later ``max_steps=10,15``."""
        params = trial.system_attrs.get("fixed_params", trial.params)
        recorded = trial.system_attrs.get("config") is not None and config is not None
        # a key the trial has no param for (run as a fixed value): its recorded config decides
        if not all(params[k] == v if k in params else recorded for k, (v, _) in point.items()):
            return False
        return config is None or identity.same_run(trial.system_attrs.get("config"), config)

    def _next_point(self, sw: "_Sweep", tried: set[int], peek: bool = False) -> int | None:
        """The index of the next grid point to run, or None when the sweep is done. A point that
        failed in this sweep (any of its workers) is not retried until the command is run again.
        ``peek``: only say which, without counting it as tried."""
        trials = [t for t in sw.study.get_trials(deepcopy=False) if not is_branch(t)]
        covered = [t for t in trials if t.state in _COVERED]
        failed_here = [t for t in trials if t.state == optuna.trial.TrialState.FAIL
                       and t.system_attrs.get("sweep_id") == self.sweep_id]
        if sw.pure_grid:  # this command's own points, whatever else the study holds
            for i, point in enumerate(sw.points):
                if i in tried or any(self._matches(t, point, sw.configs[i]) for t in covered + failed_here):
                    continue
                if not peek:
                    tried.add(i)
                return i
            return None
        if len(covered) >= sw.total:  # sampled: n_trials is the study's total
            return None
        if len(tried) >= sw.total:  # every trial of this worker failed: never loop on failures
            return None
        if not peek:
            tried.add(len(tried))
        counts = [sum(self._matches(t, p, c) for t in covered) for p, c in zip(sw.points, sw.configs)]
        return counts.index(min(counts))

    def _claim_next(self, command: "_Command", tried: dict[str, set[int]]) -> tuple["_Sweep", optuna.Trial] | None:
        """The next trial of any of the command's studies, or None when all are done: no barrier between
        studies. A study's re-queued trial (WAITING) comes first; then grid points in the command's order
        (``schedule=a,b data=x,y``: a-x, a-y, b-x, ...), or with distributions the study this worker has
        claimed fewest trials of."""
        def rank(sw: "_Sweep") -> tuple:
            if sw.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                return (0, 0)
            if not sw.pure_grid:
                return (1, len(tried[sw.name]))
            i = self._next_point(sw, tried[sw.name], peek=True)
            return (1, sw.order[i]) if i is not None else (2, 0)

        if len(command.sweeps) == 1:
            order = command.sweeps
        else:
            order = [sw for _, _, sw in sorted((rank(sw), n, sw) for n, sw in enumerate(command.sweeps))]
        for sw in order:
            trial = self._claim(sw, tried[sw.name])
            if trial is not None:
                return sw, trial
        return None

    def _claim(self, sw: "_Sweep", tried: set[int]) -> optuna.Trial | None:
        """Under the cross-worker lock: fail stale trials (their retries become WAITING), then
        take a WAITING trial if there is one (a joint search's parked trunk only once the halving rule has
        decided it), else start the next point. Records the trial's result config (``config`` system attr;
        a retry inherits its failed trial's)."""
        study = sw.study
        with claim_lock(self.storage_url, study.study_name):
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
            ready = [t for t in waiting if trunks_mod.parked_decision(t, trials, self._abandoned_rates(study, t)) != "pending"]
            config, created = None, False
            if ready:
                trial_id = ready[0]._trial_id
            else:
                i = self._next_point(sw, tried)
                if i is None:
                    return None
                if sw.points[i]:
                    study.enqueue_trial({k: v for k, (v, _) in sw.points[i].items()})
                    known = {t._trial_id for t in waiting}
                    trial_id = max(t._trial_id for t in study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.WAITING,)) if t._trial_id not in known)
                else:  # sampled: a new trial, as study.ask makes one
                    trial_id, created = study._storage.create_new_trial(study._study_id), True
                config = sw.configs[i]
            try:
                trial = self._take(study, trial_id, sw.dists, created)
            except Exception as e:  # the sampler could not suggest (a package it needs, say): FAIL, not RUNNING
                study._storage.set_trial_user_attr(trial_id, "error", f"{type(e).__name__}: {e}")
                study._storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
                raise config_mod.InputError(f"stopping the sweep: the sampler could not suggest a trial's params "
                                            f"({type(e).__name__}: {e})") from None
            storage = trial.storage
            if config is None:  # a queued retry: the config of the trial it repeats
                frozen = storage.get_trial(trial._trial_id)
                failed = frozen.system_attrs.get("failed_trial")
                if failed is not None:
                    config = study._storage.get_trial(
                        study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(failed))
                    ).system_attrs.get("config")
            storage.set_trial_system_attr(trial._trial_id, "sweep_id", self.sweep_id)
            storage.set_trial_system_attr(trial._trial_id, "worker_process", _this_process())
            if config is not None:
                storage.set_trial_system_attr(trial._trial_id, "config", config)
            return trial

    @staticmethod
    def _take(study: optuna.Study, trial_id: int, dists: dict, created: bool) -> optuna.Trial:
        """The trial ``trial_id`` as ``study.ask`` hands one out: RUNNING (from WAITING, unless ``created``
        so), its fixed params suggested. ``ask`` itself would take the oldest WAITING trial, which may be a
        parked trunk the halving rule has not decided yet."""
        if not created and not study._storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING):
            raise RuntimeError(f"trial id {trial_id} was taken by another worker under the claim lock")
        trial = optuna.Trial(study, trial_id)
        for name, dist in dists.items():
            trial._suggest(name, dist)
        return trial

    @staticmethod
    def _abandoned_rates(study: optuna.Study, t: optuna.trial.FrozenTrial) -> list[float]:
        rec = t.system_attrs.get("wsd_trunk") or {}
        return trunks_mod.abandoned(study, rec["group"]) if rec.get("parked_at") is not None else []

    def _parked(self, command: "_Command") -> list[tuple["_Sweep", optuna.trial.FrozenTrial]]:
        """The joint-search trunks parked in the command's studies (WAITING for the halving rule)."""
        return [(sw, t) for sw in command.sweeps
                for t in sw.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
                if (t.system_attrs.get("wsd_trunk") or {}).get("parked_at") is not None]

    def _abandon(self, command: "_Command") -> None:
        """Nothing left to start, nothing RUNNING, yet trunks stay parked: the learning rates they wait for
        have no trial and no worker of this command will start one (``n_trials`` cut them, say). Record them
        as abandoned, so that the halving rule ranks the parked trunks without them."""
        for sw, t in self._parked(command):
            if sw.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                continue
            rec = t.system_attrs["wsd_trunk"]
            mine = [x.system_attrs.get("wsd_trunk") or {} for x in sw.study.get_trials(deepcopy=False)]
            started = {float(r["lr"]) for r in mine if r.get("group") == rec["group"]}
            missing = sorted(set(map(float, rec["learning_rates"])) - started)
            key = f"wsd_abandoned:{rec['group']}"
            known = set(trunks_mod.abandoned(sw.study, rec["group"]))
            if set(missing) - known:
                sw.study._storage.set_study_system_attr(sw.study._study_id, key, sorted(set(missing) | known))
                log.warning("WSD joint search: no trial of lr=%s will run in this command; ranking the other "
                            "learning rates without it", ",".join(f"{r:g}" for r in missing))

    # -- the sweep

    def sweep(self, arguments: list[str]) -> list[Any]:
        from omegaconf.errors import MissingMandatoryValue

        try:
            command = self._prepare(arguments)
        except (ValueError, FileNotFoundError) as e:  # bad input: one message, no trial created
            raise config_mod.InputError.wrap(e) from e
        except MissingMandatoryValue as e:
            key = e.full_key
            raise config_mod.InputError(f"{key} must be set, but is ??? (a required value of the option chosen); "
                                        f"add {key}=... to the command") from None
        if self.launcher_name == "slurm":
            return self._run_slurm(command)
        return self._run(command)

    def _check_numbers(self) -> None:
        """The sweeper's counts and intervals: whole numbers >= 1 (>= 0 for max_retry), or null."""
        for key, value, least in (("n_trials", self.n_trials, 1), ("max_failures", self.max_failures, 1),
                                  ("heartbeat_interval", self.heartbeat_interval, 1),
                                  ("grace_period", self.grace_period, 1), ("max_retry", self.max_retry, 0)):
            if value is not None and value < least:
                raise ValueError(f"hydra.sweeper.{key} must be >= {least} or null, but got {value}")

    def _prepare(self, arguments: list[str]) -> "_Command":
        import datasets
        from hydra.core.override_parser.overrides_parser import OverridesParser

        datasets.disable_progress_bars()  # one sweep bar and one bar per trial, nothing nested

        self._check_numbers()
        hos.refuse_search_space(self.search_space)
        hos.check_failure_rate(self.max_failure_rate)
        self.storage_given = self.storage_url is not None
        self.storage_url = hos.storage(self.storage_url, self.config.paths.output_dir)
        self.custom_search_space = hos.custom_search_space(self.custom_search_space_arg)
        self.workers_arg = hos.workers(self.n_jobs, self.workers_arg)
        metric = str(self.config.eval.metric)
        self.directions = objectives.directions(self.direction, metric, config_mod.metric_direction(metric), self.cost)
        make_sampler(self.sampler_cfg, len(self.directions)), make_pruner(self.pruner_cfg)  # refused before any study
        if len(self.directions) > 1:
            pruner = self.pruner_cfg or {}
            log.info(objectives.pruning_note(pruner.get("_target_") or pruner.get("name")))
        self.workers = workers_mod.parse_workers(self.workers_arg)
        self.gpus = workers_mod.parse_gpus(self.gpus_arg)
        self.launcher_name = workers_mod.parse_launcher(self.launcher_arg)
        if self.launcher_name == "slurm":
            from sweeper import slurm

            slurm.check(self.slurm_cfg, self.storage_url, self.gpus)
        params_args = [f"{k}={v}" for k, v in self.params.items()]
        cli_keys = {a.split("=", 1)[0].lstrip("+~") for a in arguments}
        all_args = [a for a in params_args if a.split("=", 1)[0] not in cli_keys] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides(all_args)
        space = self._joint_rates(build_space(parsed, grid_sampler=samplers.sampler_name(self.sampler_cfg) == "grid"))
        self._check_sampled_names_early(space)  # data=choice(a,b) is refused, not turned into a grid below
        space, _ = exhaust_finite(space, self.n_trials or DEFAULT_N_TRIALS_WITH_DISTRIBUTIONS)
        samplers.check_space(self.sampler_cfg, space.distributions)
        pure_grid = not space.distributions
        all_cfgs = self._preflight(space)  # raises before any trial exists
        typefit.check(space, all_cfgs[0])  # a sampled value Hydra could not merge: refused now, not at a trial
        same = points_mod.same_runs(space, [identity.result_config(c) for c in all_cfgs],
                                    lambda ovs: self.hydra_context.config_loader.load_sweep_config(self.config, ovs))
        if same:
            log.warning(same)
        for line in space.notes:
            log.info(line)
        sweeps = []
        for name, sub, points, idx in self._split_by_study(space, all_cfgs):  # every check before any trial
            cfgs = [all_cfgs[i] for i in idx]
            configs = [identity.result_config(c, fingerprint.data_content(c.data, c.paths.cache_dir)) for c in cfgs]
            if pure_grid:  # a grid runs its own points, whatever else the study holds
                total = min(self.n_trials, len(points)) if self.n_trials else len(points)
                points, cfgs, configs, idx = points[:total], cfgs[:total], configs[:total], idx[:total]
            else:  # sampled: n_trials is the study's total
                total = self.n_trials or DEFAULT_N_TRIALS_WITH_DISTRIBUTIONS
            study = self._create_study(name, cfgs[0])
            dists = {**sub.grid_distributions(self._group_options), **sub.distributions}
            self._check_compatible(study, dists)
            self._check_same_settings(study, sub, configs)
            sweeps.append(_Sweep(study, name, sub, points, pure_grid, total, dists, configs, cfgs, idx))
        for sw in sweeps:  # after every check: another study incarnation's trial folders moved aside
            with claim_lock(self.storage_url, sw.name):
                folders.claim(sw.folder, sw.study, mask_url(self.storage_url))
        command = _Command(sweeps)
        # Hydra's launcher makes the sweep folder of the unswept config, which may name no study (or not
        # resolve: data=jsonl data.train_path=a.jsonl,b.jsonl leaves data.train_path ??? there): the command's
        # folder instead, where its summary goes
        with read_write(self.config), open_dict(self.config):
            self.config.hydra.sweep.dir = str(command.folder)
        to_run = self._log_start(command)
        if self.launcher_name == "slurm":
            max_workers = int(self.slurm_cfg.max_workers)
            command.plan = workers_mod.plan_slurm(self.workers, to_run, max_workers)
        else:
            visible = gpu_mod.visible_gpus()
            need, fraction = self._planned_need_gib(all_cfgs, visible)
            command.plan = workers_mod.plan_local(self.workers, self.gpus, visible, need, fraction, to_run)
            for line in command.plan.skipped:
                log.warning("workers: %s", line)
        log.info("workers: %s", workers_mod.describe(command.plan))
        return command

    def _log_start(self, command: "_Command") -> int:
        """Reclaim this host's dead workers' trials, then log each study's start line (what it will run, what
        is done, what runs elsewhere) and, with several studies, their total. Returns the trials to run."""
        to_run = 0
        for sw in command.sweeps:
            self._reclaim_dead_local(sw.study)
            counts = self._counts(sw)
            to_run += counts.to_run
            log.info("study %r in %s: %d grid point(s) x %s; %s", sw.name, mask_url(self.storage_url), len(sw.points),
                     sorted(sw.space.distributions) or "no distributions", counts.describe(sw.pure_grid, sw.total))
        if len(command.sweeps) > 1:
            log.info("%d studies, one per dataset and model (%s): %d trial(s) to run in all, on shared workers",
                     len(command.sweeps), command.names, to_run)
        return to_run

    def _reclaim_dead_local(self, study: optuna.Study) -> None:
        """RUNNING trials whose worker process ran on this host and is gone (``kill -9``, a crash): fail
        them now and queue their retries, which resume from their checkpoints, instead of waiting for
        their heartbeats to go stale. Trials of other hosts keep the heartbeat's grace period."""
        with claim_lock(self.storage_url, study.study_name):
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                proc = t.system_attrs.get("worker_process")
                if not proc or not _dead_here(proc):
                    continue
                queued = fail_and_requeue(study, t._trial_id, f"worker {proc} is gone (its process ended)")
                log.warning("trial %d: its worker %s is gone; recorded FAIL%s", t.number, proc,
                            " and queued to resume from its checkpoint now" if queued else "")

    def _check_same_settings(self, study: optuna.Study, space: SweepSpace, configs: list[dict]) -> None:
        """Refuse a command whose unswept settings differ from what the study's trials ran (unless
        ``allow_config_change``): a re-run must never serve old results as this command's."""
        ran = [t.system_attrs["config"] for t in study.get_trials(deepcopy=False)
               if "config" in t.system_attrs and not is_branch(t)]
        if not ran or not configs:
            return
        swept = set(space.distributions) | {k for k, _ in space.grid}
        skip = identity.varying(configs) | {k for k in configs[0] if any(k == s or k.startswith(s + ".")
                                                                         for s in swept)}
        if any(not identity.differences([c], configs[0], skip) for c in ran):
            return  # some earlier trials ran these very settings
        diff = identity.differences(ran, configs[0], skip)
        text = identity.describe_differences(diff)
        if self.allow_config_change:
            log.warning("study %r: this command's settings differ from its earlier trials (%s); adding them "
                        "(hydra.sweeper.allow_config_change=true)", study.study_name, text)
            return
        raise ValueError(
            f"study {study.study_name!r} in {mask_url(self.storage_url)} ran other settings than this command: "
            f"{text}. Its results are not this command's: start a new study with "
            f"hydra.sweeper.study_name=<new name>, or add these runs to it with "
            "hydra.sweeper.allow_config_change=true")

    def _counts(self, sw: "_Sweep") -> "_Counts":
        """What this command still has to do: its grid points (or, sampled, the study's total) that
        have no COMPLETE/PRUNED trial, split into running elsewhere and to run."""
        trials = [t for t in sw.study.get_trials(deepcopy=False) if not is_branch(t)]
        done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        if sw.pure_grid:
            pc = list(zip(sw.points, sw.configs))
            done = sum(any(t.state in done_states and self._matches(t, p, c) for t in trials) for p, c in pc)
            busy = sum(not any(t.state in done_states and self._matches(t, p, c) for t in trials)
                       and any(self._matches(t, p, c) for t in running) for p, c in pc)
            to_run = len(sw.points) - done - busy
        else:
            done = sum(t.state in done_states for t in trials)
            busy = len(running)
            to_run = max(0, sw.total - done - busy)
        return _Counts(to_run=to_run, done=done, running=busy, stale_after=self._stale_after(sw.study, running))

    def _stale_after(self, study: optuna.Study, running: list) -> str | None:
        """When the last of the running trials would count as stale (its worker dead), as HH:MM:SS."""
        if not running or not self.heartbeat_interval:
            return None
        import datetime

        ages = [a for a in (heartbeat_age_s(study._storage, t._trial_id) for t in running) if a is not None]
        if not ages:
            return None
        grace = int(self.grace_period or 2 * self.heartbeat_interval)
        until = datetime.datetime.now() + datetime.timedelta(seconds=grace - min(ages))
        return f"{until:%H:%M:%S} (grace period {grace} s)"

    def _planned_need_gib(self, cfgs: list, visible: list) -> tuple[float | None, float]:
        """The largest estimated peak over the sweep's configs at the smallest micro-batch each may
        use (batch=auto: 1; a fixed batch: its own), and the share of free memory it may take."""
        if not visible:
            return None, 1.0
        from sweeper import model as model_mod
        from sweeper.plan import memory_estimate

        need, fraction = None, 1.0
        for cfg in cfgs:
            shape = model_mod.model_shape(cfg.model, cfg.paths.cache_dir)
            if shape is None:
                log.warning("workers: no shape for model.path=%s, so every GPU counts as having room", cfg.model.path)
                return None, 1.0
            auto = cfg.batch.get("auto")
            micro = 1 if auto is not None else int(cfg.batch.per_device_train_batch_size)
            accum = int(cfg.batch.gradient_accumulation_steps) if auto is None else int(auto.target_effective_batch)
            est = memory_estimate(cfg, shape, micro, int(cfg.data.max_length),
                                  gpu_mod.compute_for(visible, str(cfg.precision.compute)), accum)
            if est is not None and (need is None or est.total_gib > need):
                need = est.total_gib
                fraction = float(auto.memory_fraction) if auto is not None else 1.0
        return need, fraction

    def _run(self, command: "_Command") -> list[Any]:
        plan, several = command.plan, len(command.sweeps) > 1
        if plan.gpus[0] is not None:
            if gpu_mod.cuda_initialised():
                raise config_mod.InputError("CUDA was initialised before the sweep could pin this worker to one GPU; "
                                            "report this as a bug")
            gpu_mod.pin(plan.gpus[0])  # before this process touches CUDA: one trial, one GPU
        _share_cpu_threads(plan.n)
        children = self._start_workers(command)

        returns: list[Any] = []
        tried: dict[str, set[int]] = {sw.name: set() for sw in command.sweeps}
        failures: list[str] = []
        from tqdm.auto import tqdm

        progress = tqdm(total=self._total(command), initial=self._done(command),
                        desc=f"sweep {command.names}", unit="trial", position=0)
        while True:
            claimed = self._claim_next(command, tried)
            if claimed is None:
                if not self._parked(command):
                    break
                # a joint search's trunks wait at a rung for trunks other workers train: the halving rule
                # needs their branches before it can hand the parked ones out again
                self._abandon(command)
                time.sleep(PARKED_POLL_S)
                continue
            sw, trial = claimed
            study, name = sw.study, sw.name
            before = set(trial.params)
            try:  # hydra.sweeper.custom_search_space: more params, suggested on this trial
                hos.extend(self.custom_search_space, self.config, trial)
            except Exception as e:
                self._record(study, trial, _not_started(e), failures, f"{name}: " if several else "")
                progress.update(1)
                continue
            overrides = self._job_overrides(sw, trial, [k for k in trial.params if k not in before])
            if not self.storage_given:  # storage: null -> the job opens the study file this sweep chose
                overrides.insert(len(overrides) - 2, f"hydra.sweeper.storage={quote(self.storage_url)}")
            log.info("%strial %d: %s", f"{name}: " if several else "", trial.number, " ".join(overrides[:-2]))
            study._storage.set_trial_system_attr(trial._trial_id, "overrides", _settings(overrides[:-2]))
            tracking_mod.open_trial(self.config, study, trial)  # tracking=mlflow|wandb: the trial's run, opened or continued
            try:
                with _stop_signals(), Heartbeat(study._storage, trial._trial_id, self.heartbeat_interval):
                    [ret] = self.launcher.launch([overrides], initial_job_idx=self.job_idx)
            except KeyboardInterrupt as e:
                with _signals_ignored():  # a second Ctrl-C must not cut the retry short
                    self._interrupted(study, trial, str(e) or "interrupted by the user")
                    self._stop_workers(children)
                raise SystemExit(143 if "SIGTERM" in str(e) else 130) from None
            except Exception as e:  # the job never started (Hydra could not compose it): this trial FAILs
                ret = _not_started(e)
            self.job_idx += 1
            returns.append(ret)
            try:
                outcome = self._record(study, trial, ret, failures, f"{name}: " if several else "")
            except (disk.DiskFullError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
                self._stop_workers(children)
                raise config_mod.InputError(self._unrecorded(trial, e)) from None
            tracking_mod.close_trial(study, trial)  # its run gets the state, the trial number and the value
            if outcome == "parked":
                continue
            progress.update(1)
            stop = hos.failure_rate_exceeded(self.max_failure_rate, len(failures), len(returns))
            if stop:
                self._stop_workers(children)
                raise config_mod.InputError(f"{stop}; last: {failures[-1]}. Finished trials are kept; fix the cause "
                                            "and re-run the same command to resume")
            if self.max_failures is not None and len(failures) >= self.max_failures:
                self._stop_workers(children)
                raise config_mod.InputError(
                    f"stopping the sweep: {len(failures)} trial(s) failed, reaching "
                    f"hydra.sweeper.max_failures={self.max_failures}; last: {failures[-1]}. Finished trials "
                    "are kept; fix the cause and re-run the same command to resume"
                )
        progress.close()
        self._wait_workers(children)
        self._summary(command)
        self._fail_if_nothing_completed(command)
        return returns

    @staticmethod
    def _job_overrides(sw: "_Sweep", trial: optuna.Trial, extra: Sequence[str] = ()) -> list[str]:
        """The overrides of ``trial``'s job: the study's fixed ones, each param as the user wrote it (a
        grid value keeps its override text; ``extra``: params the custom search space suggested), then
        ``study.name`` and ``study.trial_number`` (last two)."""
        space = sw.space
        texts = {k: {v: t for v, t in vals} for k, vals in space.grid}
        overrides = list(space.fixed)
        keys = [k for k, _ in space.grid] + list(space.distributions)
        keys += [k for k in extra if k not in keys]
        for key in keys:
            value = trial.params[key]
            overrides.append(f"{key}={texts.get(key, {}).get(value, value_text(value))}")
        return overrides + [f"study.name={quote(sw.name)}", f"study.trial_number={trial.number}"]

    @staticmethod
    def _record(study: optuna.Study, trial: optuna.Trial, ret: Any, failures: list[str], label: str = "") -> str | None:
        """Tell the study how a trial's job ended; "parked" for a joint search's trunk put back in the queue. A full disk queues the trial to resume from its
        checkpoint and raises :class:`disk.DiskFullError` (every later trial would fail the same way).
        ``label`` names the study in failure lines when a command runs several."""
        from hydra.core.utils import JobStatus

        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            if value is None or not math.isfinite(float(value)):
                trial.set_user_attr("error", f"objective is {value}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                failures.append(f"{label}trial {trial.number}: objective is {value}")
            else:
                try:  # two objectives: the run's cost as well (sweeper.objectives)
                    told = objectives.values(study, getattr(study._storage, "_backend", study._storage).get_trial(trial._trial_id).user_attrs,
                                             float(value), study.user_attrs.get("cost", "steps"))
                except ValueError as e:
                    trial.set_user_attr("error", str(e))
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failures.append(f"{label}trial {trial.number}: {e}")
                    return
                study.tell(trial, told)
            return
        exc = ret._return_value
        if isinstance(exc, Parked):  # a joint search's trunk: back in the queue until the halving rule decides
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.WAITING)
            log.info("%strial %d %s", label, trial.number, exc)
            return "parked"
        if isinstance(exc, optuna.TrialPruned):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, exc)
        elif isinstance(exc, disk.DiskFullError):
            fail_and_requeue(study, trial._trial_id, f"{type(exc).__name__}: {exc}")
            raise exc
        else:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.error("%strial %d failed: %s: %s", label, trial.number, type(exc).__name__, exc)
            failures.append(f"{label}trial {trial.number}: {type(exc).__name__}: {exc}")

    def _unrecorded(self, trial: optuna.Trial, e: BaseException) -> str:
        """The one line for a sweep stopped by a full disk or a study it cannot write."""
        if isinstance(e, disk.DiskFullError):
            return (f"stopping the sweep: trial {trial.number}: {e}; it is queued to resume from its last "
                    "checkpoint: re-run the same command once there is room")
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        detail = (str(root).strip().splitlines() or [type(root).__name__])[0]
        return (f"stopping the sweep: could not record trial {trial.number} in hydra.sweeper.storage="
                f"{mask_url(self.storage_url)} ({type(root).__name__}: {detail}); it stays RUNNING and is "
                "re-run from its checkpoint when the same command runs again once the database can be written "
                "(a full disk: free space there)")

    def _total(self, command: "_Command") -> int:
        """Trials the command's progress bar counts: done, running elsewhere and to run, over its studies."""
        return sum(c.done + c.running + c.to_run for c in map(self._counts, command.sweeps))

    def _done(self, command: "_Command") -> int:
        return sum(self._counts(sw).done for sw in command.sweeps)

    def _fail_if_nothing_completed(self, command: "_Command") -> None:
        """A command none of whose trials completed (every one FAILed, in all its studies) ends with a
        non-zero exit code and one line saying so; trials it did not run (all done before) do not count."""
        mine = [t for sw in command.sweeps for t in sw.study.get_trials(deepcopy=False)
                if t.system_attrs.get("sweep_id") == self.sweep_id and not is_branch(t)]
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        if mine and not any(t.state in finished for t in mine):
            failed = [t for t in mine if t.state == optuna.trial.TrialState.FAIL]
            last = failed[-1].user_attrs.get("error", "?") if failed else "?"
            raise config_mod.InputError(
                f"no trial of this command completed: {len(failed)} of {len(mine)} failed (last: trial "
                f"{failed[-1].number if failed else '?'}: {last}); fix the cause and re-run the same command")

    def _summary(self, command: "_Command") -> None:
        """Print each study's report and write it to its folder's summary.md; with several studies, then
        the table of datasets (a row per study) and its figure, written to the command's folder."""
        from sweeper.report import datasets_section, study_report

        for sw in command.sweeps:
            text = study_report(sw.study)
            print(text)
            sw.folder.mkdir(parents=True, exist_ok=True)
            (sw.folder / "summary.md").write_text(text + "\n", encoding="utf-8")
            objectives.write_results(sw.study, sw.folder)  # hydra-optuna-sweeper's optimization_results.yaml
        if len(command.sweeps) > 1 and any(objectives.is_multi(sw.study) for sw in command.sweeps):
            log.info("two objectives: each study's Pareto front is in its summary.md; the table of datasets "
                     "compares one best trial per study, which a front does not have")
        elif len(command.sweeps) > 1:
            command.folder.mkdir(parents=True, exist_ok=True)
            text = datasets_section([sw.study for sw in command.sweeps], command.folder / "datasets.png")
            print(text)
            (command.folder / "summary.md").write_text(text + "\n", encoding="utf-8")
        tracking_mod.close_study(self.config, [sw.study for sw in command.sweeps], command.folder)  # the study runs

    # -- SLURM: the workers are SLURM jobs; this process submits, watches and replaces them

    def _worker_command(self, command: "_Command") -> list[str]:
        """This command as one more worker: same overrides, one worker, this sweep's folder (with several
        studies each job's own, from its config); the storage URL without its password (see
        :meth:`_worker_env`)."""
        script = str(Path(sys.argv[0]).resolve())
        url, _ = passwords.split_password(self.storage_url)
        args = [a for a in passwords.split_secret_overrides(sys.argv[1:])[0]
                if not a.startswith(("hydra.sweeper.storage=", "+hydra.sweeper.storage="))]
        folder = [f"hydra.sweep.dir={command.folder.resolve()}"] if len(command.sweeps) == 1 else []
        return [sys.executable, script, *args, f"hydra.sweeper.storage={quote(url)}", "hydra.sweeper.workers=1",
                "hydra.sweeper.n_jobs=null", "hydra.sweeper.gpus=null", "hydra.sweeper.launcher=local", *folder]

    def _worker_env(self) -> dict:
        """What a worker adds to this process's environment: the sweep id, the storage password as
        PGPASSWORD and secret ``hydra.job.env_set`` values as themselves (so that they are in no command
        line, log or saved config)."""
        env = {_SWEEP_ID_ENV: self.sweep_id, **passwords.split_secret_overrides(sys.argv[1:])[1]}
        _, password = passwords.split_password(self.storage_url)
        if password is not None:
            env["PGPASSWORD"] = password
        return env

    @staticmethod
    def _note_jobs(command: "_Command", jobs: list[str]) -> None:
        """Record SLURM worker jobs on every study they serve (``python -m sweeper status`` reads them)."""
        for sw in command.sweeps:
            sw.study.set_user_attr("slurm_jobs", sorted(set(sw.study.user_attrs.get("slurm_jobs", [])) | set(jobs)))

    def _run_slurm(self, command: "_Command") -> list[Any]:
        from sweeper import slurm

        sweep_dir = str(command.folder.resolve())
        env = self._worker_env()
        for key in [k for k in env if passwords.is_secret_name(k)]:  # PGPASSWORD, HF_TOKEN, ...: SLURM hands
            os.environ[key] = env.pop(key)  # the submitting environment to its jobs; never in a job's command
        submitter = slurm.Submitter(self.slurm_cfg, Path(sweep_dir) / "slurm", self._worker_command(command),
                                    env=env, cwd=os.getcwd())
        jobs = submitter.submit(command.plan.n)
        self._note_jobs(command, jobs)
        log.info("submitted %d SLURM worker job(s): %s; logs in %s", len(jobs), " ".join(jobs), submitter.folder)
        status = (f"python -m sweeper status --storage {shlex.quote(mask_url(self.storage_url))} "
                  + " ".join(f"--study {shlex.quote(sw.name)}" for sw in command.sweeps))
        if not self.slurm_cfg.wait:
            what = f"the study {command.sweeps[0].name!r}" if len(command.sweeps) == 1 else f"the studies {command.names}"
            print(f"SLURM jobs {' '.join(jobs)} run {what}; follow it with: {status}")
            return []
        from tqdm.auto import tqdm

        progress = tqdm(total=self._total(command), initial=self._done(command),
                        desc=f"sweep {command.names} (SLURM)", unit="trial", position=0)
        replacements = 0
        try:
            while True:
                time.sleep(float(self.slurm_cfg.poll_s))
                counts = [self._counts(sw) for sw in command.sweeps]
                progress.n = sum(c.done for c in counts)
                progress.refresh()
                if submitter.any_active():
                    continue
                # every worker job ended: trials left over (a worker was cancelled or lost its node) get
                # new workers, which fail the stale trials and re-run them from their checkpoints
                waiting = sum(len(sw.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
                              for sw in command.sweeps)
                running = sum(c.running for c in counts)
                left = sum(c.to_run for c in counts) + running + waiting
                if left == 0 or replacements >= max(1, int(self.max_retry or 0)):
                    break
                replacements += 1
                if running and self.heartbeat_interval:  # let the dead workers' trials go stale
                    time.sleep(int(self.grace_period or 2 * self.heartbeat_interval))
                more = submitter.submit(min(command.plan.n, left))
                self._note_jobs(command, more)
                log.warning("every SLURM worker ended with %d trial(s) left; submitted %s to finish them",
                            left, " ".join(more))
        except KeyboardInterrupt:
            progress.close()
            log.warning("stopped watching; the SLURM jobs %s keep running. Follow them with: %s "
                        "(scancel them to stop)", " ".join(submitter.job_ids), status)
            raise SystemExit(130) from None
        progress.close()
        for line in submitter.failures():
            log.error("%s", line)
        self._summary(command)
        self._fail_if_nothing_completed(command)
        return []

    @staticmethod
    def _interrupted(study: optuna.Study, trial: optuna.Trial, why: str) -> None:
        """Ctrl-C or SIGTERM (scancel, docker stop, systemd): fail the running trial now and queue its
        retry (same params), which resumes from its checkpoint when the command is run again (or at
        once by another worker), instead of waiting for the heartbeat."""
        queued = fail_and_requeue(study, trial._trial_id, f"KeyboardInterrupt: {why}")
        log.warning("%s: trial %d recorded FAIL%s; re-run the same command to continue", why, trial.number,
                    " and queued to resume from its checkpoint" if queued else "")

    # -- parallel workers

    def _start_workers(self, command: "_Command") -> list[subprocess.Popen]:
        """Start workers 1..N-1 of the command's plan as copies of this command, each seeing only its own
        GPU (this process is worker 0). Each claims trials of any of its studies as it frees up: no batch
        barrier."""
        plan, sweep_dir = command.plan, str(command.folder)
        children = []
        for i in range(1, plan.n):
            env = {**os.environ, **self._worker_env()}
            if plan.gpus[i] is not None:
                env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=plan.gpus[i])
            env.setdefault("OMP_NUM_THREADS", str(_threads_per_worker(plan.n)))
            log_path = Path(sweep_dir) / f"worker{i}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as out:
                children.append(subprocess.Popen(self._worker_command(command), env=env, stdout=out,
                                                 stderr=subprocess.STDOUT))
            log.info("worker %d started (pid %d, %s), log: %s", i, children[-1].pid,
                     "CPU" if plan.gpus[i] is None else f"GPU {plan.gpus[i]}", log_path)
        return children

    @staticmethod
    def _wait_workers(children: list[subprocess.Popen]) -> None:
        for i, child in enumerate(children, start=1):
            if child.wait() != 0:
                log.error("worker %d exited with code %d; see its worker%d.log", i, child.returncode, i)

    @staticmethod
    def _stop_workers(children: list[subprocess.Popen]) -> None:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
