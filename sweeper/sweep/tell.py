"""How a trial's job ended, told to its study (:func:`record`), and the lines for a trial that could not be.

    python train.py -m schedule=under,sweet,over     # each job's return is told here: COMPLETE, PRUNED or FAIL

The job's return value (the run's best metric; with two objectives also its cost, ``sweeper.objectives``) makes
the trial COMPLETE; ``optuna.TrialPruned`` PRUNED; any other error FAIL with the ``error`` user attr, and the sweep
goes on. A joint WSD search's trunk that raised ``sweeper.reporter.Parked`` goes back to the queue (WAITING). A
full disk queues the trial to resume and stops the sweep (every later trial would fail the same way).
:func:`interrupted` records a trial stopped by Ctrl-C or SIGTERM; :func:`not_started` is the return of a job
Hydra could not start.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus

from sweeper import checkpoints, disk, objectives, records
from sweeper.reporter import Parked
from sweeper.storage import fail_and_requeue, mask_url

__all__ = ["PARKED", "STOPPED", "TAKEN_OVER", "interrupted", "not_started", "record", "taken_over", "unrecorded"]

log = logging.getLogger(__name__)

PARKED = "parked"
TAKEN_OVER = "taken over"
STOPPED = "KeyboardInterrupt: "  # how the error of a trial a stop signal ended begins
State = optuna.trial.TrialState


def record(study: optuna.Study, trial: optuna.Trial, ret: Any, failures: list[str], label: str = "") -> str | None:
    """Tell the study how a trial's job ended; :data:`PARKED` for a joint search's trunk put back in the queue,
    :data:`TAKEN_OVER` for a trial that is no longer RUNNING (:func:`taken_over`). A failure's line is added to
    ``failures``. A full disk queues the trial to resume from its checkpoint and raises
    :class:`disk.DiskFullError`. ``label`` names the study in failure lines when a command runs several."""
    if taken_over(study, trial, label):
        return TAKEN_OVER
    try:
        return _record(study, trial, ret, failures, label)
    except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale between the check and the write
        taken_over(study, trial, label)
        return TAKEN_OVER


def taken_over(study: optuna.Study, trial: optuna.Trial, label: str = "") -> bool:
    """Whether another worker ended ``trial`` while its job ran here: it failed it as stale (this process was
    stopped longer than the heartbeat's grace period) and runs its retry. Says so in one line; the trial's
    record is that worker's, so nothing is written."""
    frozen = records.frozen(study, records.trial_id(trial), fresh=True)
    if frozen.state == State.RUNNING:
        return False
    log.warning("%strial %d was recorded %s by another worker while this one was stopped (its heartbeat went "
                "stale; its retry runs there); this worker's run of it is not recorded", label, trial.number,
                frozen.state.name)
    return True


def _record(study: optuna.Study, trial: optuna.Trial, ret: Any, failures: list[str], label: str) -> str | None:
    if ret.status == JobStatus.COMPLETED:
        _complete(study, trial, ret.return_value, failures, label)
        return None
    exc = ret._return_value  # JobReturn keeps the job's exception here; return_value would raise it
    if isinstance(exc, Parked):  # a joint search's trunk: back in the queue until the halving rule decides
        records.set_state(study, records.trial_id(trial), State.WAITING)
        log.info("%strial %d %s", label, trial.number, exc)
        return PARKED
    if isinstance(exc, optuna.TrialPruned):
        study.tell(trial, state=State.PRUNED)
        log.info("trial %d pruned: %s", trial.number, exc)
    elif isinstance(exc, disk.DiskFullError):
        fail_and_requeue(study, records.trial_id(trial), f"{type(exc).__name__}: {exc}")
        raise exc
    else:
        trial.set_user_attr(records.ERROR, f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=State.FAIL)
        log.error("%strial %d failed: %s: %s", label, trial.number, type(exc).__name__, exc)
        failures.append(f"{label}trial {trial.number}: {type(exc).__name__}: {exc}")
    return None


def _complete(study: optuna.Study, trial: optuna.Trial, value: Any, failures: list[str], label: str) -> None:
    """A job that returned: its value (and cost) told, or FAIL when it is not a finite number."""
    if value is None or not math.isfinite(float(value)):
        trial.set_user_attr(records.ERROR, f"objective is {value}")
        study.tell(trial, state=State.FAIL)
        failures.append(f"{label}trial {trial.number}: objective is {value}")
        return
    try:  # two objectives: the run's cost as well (sweeper.objectives)
        attrs = records.frozen(study, records.trial_id(trial), fresh=True).user_attrs
        told = objectives.values(study, attrs, float(value), study.user_attrs.get(records.COST, "steps"))
    except ValueError as e:
        trial.set_user_attr(records.ERROR, str(e))
        study.tell(trial, state=State.FAIL)
        failures.append(f"{label}trial {trial.number}: {e}")
        return
    study.tell(trial, told)


def interrupted(study: optuna.Study, trial: optuna.Trial, why: str) -> None:
    """Ctrl-C or SIGTERM (scancel, docker stop, systemd): fail the running trial now and queue its
    retry (same params), which resumes from its checkpoint when the command is run again (or at
    once by another worker), instead of waiting for the heartbeat. A trial another worker took over is left alone."""
    if taken_over(study, trial):
        return
    queued = fail_and_requeue(study, records.trial_id(trial), f"{STOPPED}{why}")
    log.warning("%s: trial %d recorded FAIL%s; re-run the same command to continue", why, trial.number,
                queued_text(study, records.trial_id(trial)) if queued else "")


def queued_text(study: optuna.Study, trial_id: int) -> str:
    """How a failed trial's queued retry will start: from its newest whole checkpoint, or over again."""
    step = checkpoints.resumable_step(records.frozen(study, trial_id).user_attrs.get(records.RUN_DIR))
    return (f" and queued to resume from its checkpoint at step {step}" if step is not None
            else " and queued to run again (it saved no checkpoint to resume from)")


def unrecorded(trial: optuna.Trial, e: BaseException, storage_url: str) -> str:
    """The one line for a sweep stopped by a full disk or a study it cannot write."""
    if isinstance(e, disk.DiskFullError):
        return (f"stopping the sweep: trial {trial.number}: {e}; it is queued to resume from its last "
                "checkpoint: re-run the same command once there is room")
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    detail = (str(root).strip().splitlines() or [type(root).__name__])[0]
    return (f"stopping the sweep: could not record trial {trial.number} in hydra.sweeper.storage="
            f"{mask_url(storage_url)} ({type(root).__name__}: {detail}); it stays RUNNING and is "
            "re-run from its checkpoint when the same command runs again once the database can be written "
            "(a full disk: free space there)")


def not_started(e: Exception) -> Any:
    """A job that Hydra could not start (its sampled overrides do not compose) as a failed JobReturn whose
    error is one line: the innermost cause, e.g. a float for an int key."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    first = (str(root).strip().splitlines() or [type(root).__name__])[0]
    outer = (str(e).strip().splitlines() or [""])[0]
    text = f"{outer}: {first}" if outer and root is not e and first not in outer else first
    return JobReturn(status=JobStatus.FAILED, _return_value=ValueError(f"the job could not start: {text}"))
