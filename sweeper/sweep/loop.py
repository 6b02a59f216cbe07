"""One worker's loop (:func:`run`): claim a trial, launch its job under a heartbeat and the stop signals,
record how it ended; until the queue is empty or a failure limit is reached.

    python train.py -m schedule=under,sweet,over      # this process's loop runs the three trials in turn

Ask, run, tell, as in Optuna's ``study.optimize``: the trial comes from ``sweeper.sweep.queue``; its job is
Hydra's launcher's (``launch([overrides])``, in this process for the basic launcher) with the overrides of its
params, ``study.name`` and ``study.trial_number``; Optuna's heartbeat is beaten meanwhile
(``sweeper.storage.Heartbeat``); ``sweeper.sweep.tell`` records the end. Ctrl-C, SIGTERM and SIGUSR2
and SIGHUP (:func:`stop_signals`) fail the trial, queue its retry and end the sweep with one line. A trial that
another worker failed as stale while this one was stopped (SIGSTOP, a suspended laptop) is left to that worker. A failing trial never
stops the sweep, unless ``max_failures`` or ``max_failure_rate`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import optuna
import sqlalchemy.exc
from hydra.core.utils import JobReturn, JobStatus
from tqdm.auto import tqdm

from sweeper import config as config_mod
from sweeper import disk, hos, interrupt, program, records, tracking
from sweeper.space import quote, value_text
from sweeper.storage import Heartbeat
from sweeper.sweep import tell
from sweeper.sweep.command import Sweep
from sweeper.sweep.queue import Queue
from sweeper.sweep.settings import Settings

__all__ = ["PARKED_POLL_S", "job_overrides", "run", "settings_of", "signals_ignored", "stop_signals"]

log = logging.getLogger(__name__)

PARKED_POLL_S = 2.0  # a worker with nothing to start while joint-search trunks are parked looks again this often
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)
# the exit code of a sweep a stop signal ended: 128 + the signal's number, as a shell reports it; 130 (Ctrl-C) else
EXIT_CODES = {"SIGTERM": 143, "SIGHUP": 129}
PARKED, NOT_STARTED, RAN, TAKEN_OVER = tell.PARKED, "not started", "ran", tell.TAKEN_OVER  # how a claimed trial went


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While a trial runs: Ctrl-C, SIGTERM (what scancel, docker and systemd send), SIGUSR2 (SLURM's
    warning before a time limit) and SIGHUP (the terminal closed) raise KeyboardInterrupt, so the trial's retry
    is queued before the process ends. The first one turns the others off for good: a second Ctrl-C, 50 ms later, cannot cut
    the queuing short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        interrupt.note(signum)  # kept even if a finalizer swallows the KeyboardInterrupt below
        for s in STOPS:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt("" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}")

    old = {s: signal.signal(s, stop) for s in STOPS}
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        for s in STOPS:  # from here on every stop signal is ignored, until the process exits
            signal.signal(s, signal.SIG_IGN)
        raise
    finally:
        if not interrupted:
            for s, handler in old.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """No stop signal while the enclosed block records a stopped trial."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in STOPS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def settings_of(overrides: Sequence[str]) -> list[str]:
    """The overrides a follow-up command repeats to run in the same study with the same settings: all but
    the schedule (what a follow-up changes) and the sweeper's, paths' and study's own (a storage URL may
    hold a password)."""
    own = ("schedule", "hydra.", "hydra/", "paths.", "study.")
    return [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(own)]


def job_overrides(sw: Sweep, trial: optuna.Trial, extra: Sequence[str] = ()) -> list[str]:
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


class _Worker:
    """The state of one worker's loop: its queue, Hydra's launcher, the job index, returns and failures."""

    def __init__(self, settings: Settings, queue: Queue, launcher: Any, app_config: Any,
                 stop_others: Callable[[], None]) -> None:
        self.settings, self.queue, self.launcher, self.app_config = settings, queue, launcher, app_config
        self.stop_others = stop_others
        self.program = program.of_sweep(app_config)  # how this sweep was started: the report's commands start so
        self.label_studies = len(queue.command.sweeps) > 1
        self.job_idx = 0
        self.returns: list[Any] = []
        self.failures: list[str] = []

    def label(self, sw: Sweep) -> str:
        return f"{sw.name}: " if self.label_studies else ""

    def run_one(self, sw: Sweep, trial: optuna.Trial) -> str:
        """Launch ``trial``'s job and record it: :data:`PARKED` (a trunk back in the queue), :data:`NOT_STARTED`
        (the custom search space failed: no job ran), :data:`TAKEN_OVER` (another worker failed it as stale while
        this one was stopped: nothing recorded) or :data:`RAN`."""
        study = sw.study
        before = set(trial.params)
        try:  # hydra.sweeper.custom_search_space: more params, suggested on this trial
            hos.extend(self.settings.custom_search_space, self.app_config, trial)
        except Exception as e:
            tell.record(study, trial, tell.not_started(e), self.failures, self.label(sw))
            return NOT_STARTED
        overrides = job_overrides(sw, trial, [k for k in trial.params if k not in before])
        if not self.settings.storage_given:  # storage: null -> the job opens the study file this sweep chose
            overrides.insert(len(overrides) - 2, f"hydra.sweeper.storage={quote(self.settings.storage_url)}")
        log.info("%strial %d: %s", self.label(sw), trial.number, " ".join(overrides[:-2]))
        records.set_system(study, records.trial_id(trial), records.OVERRIDES, settings_of(overrides[:-2]))
        records.set_system(study, records.trial_id(trial), records.COMMAND, self.program.record())
        tracking.open_trial(self.app_config, study, trial)  # tracking=mlflow|wandb: the trial's run, opened or continued
        ret = self.launch(study, trial, overrides)
        self.job_idx += 1
        self.returns.append(ret)
        try:
            told = tell.record(study, trial, ret, self.failures, self.label(sw))
        except (disk.DiskFullError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
            self.stop_others()
            raise config_mod.InputError(tell.unrecorded(trial, e, self.settings.storage_url)) from None
        if told != TAKEN_OVER:  # the other worker's retry continues the run
            tracking.close_trial(study, trial)  # its run gets the state, the trial number and the value
        return told if told in (PARKED, TAKEN_OVER) else RAN

    def launch(self, study: optuna.Study, trial: optuna.Trial, overrides: list[str]) -> Any:
        """The job's return, run under the heartbeat and the stop signals; a stop records the trial and ends
        the sweep (:data:`EXIT_CODES`). A launcher that raises is the job's failure (Hydra could not compose
        it, say); so is a ``SystemExit`` from the job, which Hydra's launcher passes on."""
        try:
            with stop_signals(), Heartbeat(records.storage(study), records.trial_id(trial),
                                           self.settings.heartbeat_interval):
                [ret] = self.launcher.launch([overrides], initial_job_idx=self.job_idx)
            return ret
        except KeyboardInterrupt as e:
            with signals_ignored():  # a second Ctrl-C must not cut the retry short
                tell.interrupted(study, trial, str(e) or "interrupted by the user")
                self.stop_others()
            raise SystemExit(next((c for name, c in EXIT_CODES.items() if name in str(e)), 130)) from None
        except Exception as e:  # the job never started (Hydra could not compose it): this trial FAILs
            return tell.not_started(e)
        except SystemExit as e:  # the job called sys.exit: this trial FAILs with it, the sweep goes on
            return JobReturn(status=JobStatus.FAILED, _return_value=e)

    def check_limits(self) -> None:
        """Stop the sweep once ``max_failure_rate`` or ``max_failures`` is reached (one line)."""
        stop = hos.failure_rate_exceeded(self.settings.max_failure_rate, len(self.failures), len(self.returns))
        if stop:
            self.stop_others()
            raise config_mod.InputError(f"{stop}; last: {self.failures[-1]}. Finished trials are kept; fix the "
                                        "cause and re-run the same command to resume")
        limit = self.settings.max_failures
        if limit is not None and len(self.failures) >= limit:
            self.stop_others()
            raise config_mod.InputError(
                f"stopping the sweep: {len(self.failures)} trial(s) failed, reaching "
                f"hydra.sweeper.max_failures={limit}; last: {self.failures[-1]}. Finished trials "
                "are kept; fix the cause and re-run the same command to resume"
            )


def run(settings: Settings, queue: Queue, launcher: Any, app_config: Any,
        stop_others: Callable[[], None] = lambda: None) -> list[Any]:
    """This worker's loop over ``queue`` until nothing is left to start: each trial's job launched through
    Hydra's ``launcher`` (``launch([overrides], initial_job_idx)``) and recorded; the jobs' returns.
    ``app_config`` is the app's config (for a custom search space); ``stop_others`` stops the other workers
    when this one stops the sweep."""
    worker = _Worker(settings, queue, launcher, app_config, stop_others)
    progress = tqdm(total=queue.total(), initial=queue.done(), desc=f"sweep {queue.command.names}", unit="trial",
                    position=0)
    while True:
        interrupt.honour()  # a Ctrl-C that a finalizer swallowed still ends the sweep before its next trial
        claimed = queue.claim_next()
        if claimed is None:
            if not queue.parked():
                break
            # a joint search's trunks wait at a rung for trunks other workers train: the halving rule
            # needs their branches before it can hand the parked ones out again
            queue.abandon()
            time.sleep(PARKED_POLL_S)
            continue
        outcome = worker.run_one(*claimed)
        if outcome in (PARKED, TAKEN_OVER):
            continue
        progress.update(1)
        if outcome == RAN:
            worker.check_limits()
    progress.close()
    return worker.returns
