"""The end of a sweep: each study's report printed and written (:func:`write`), and the exit code's check
(:func:`fail_if_nothing_completed`).

    python train.py -m schedule=under,sweet,over     # ends with the table; outputs/sweeps/<study>/summary.md

Each study's ``summary.md`` and ``optimization_results.yaml`` (hydra-optuna-sweeper's) go to its folder; with
several studies the table of datasets (``sweeper.report.datasets_section``) goes to the command's folder. A command that ends with work left (a worker
stopped mid-trial whose retry did not run) or with nothing completed exits non-zero with one line.
"""

from __future__ import annotations

import logging

import optuna

from sweeper import config as config_mod
from sweeper import objectives, records
from sweeper.report import datasets_section, study_report
from sweeper.sweep.command import Command
from sweeper.sweep.tell import STOPPED

__all__ = ["fail_if_nothing_completed", "fail_if_work_left", "write"]

log = logging.getLogger(__name__)


def write(command: Command, storage_url: str) -> None:
    """Print each study's report and write it to its folder's summary.md; with several studies, then
    the table of datasets (a row per study) and its figure, written to the command's folder. The commands
    they propose name ``storage_url`` (password left out), so that pasted they add to the same study."""
    for sw in command.sweeps:
        text = study_report(sw.study, storage_url)
        print(text)
        sw.folder.mkdir(parents=True, exist_ok=True)
        (sw.folder / "summary.md").write_text(text + "\n", encoding="utf-8")
        objectives.write_results(sw.study, sw.folder)  # hydra-optuna-sweeper's optimization_results.yaml
    if len(command.sweeps) > 1 and any(objectives.is_multi(sw.study) for sw in command.sweeps):
        log.info("two objectives: each study's Pareto front is in its summary.md; the table of datasets "
                 "compares one best trial per study, which a front does not have")
    elif len(command.sweeps) > 1:
        command.folder.mkdir(parents=True, exist_ok=True)
        text = datasets_section([sw.study for sw in command.sweeps], command.folder / "datasets.png", storage_url)
        print(text)
        (command.folder / "summary.md").write_text(text + "\n", encoding="utf-8")


def fail_if_nothing_completed(command: Command, sweep_id: str) -> None:
    """A command none of whose trials completed (every one FAILed, in all its studies) ends with a
    non-zero exit code and one line saying so; trials it did not run (all done before) do not count, a
    trial whose retry completed elsewhere (another worker took it over) counts as completed, and while any of its
    trials still runs (on another of its workers) nothing is judged yet."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = [t for sw in command.sweeps for t in sw.study.get_trials(deepcopy=False) if not records.is_branch(t)]
    mine = [t for t in trials if t.system_attrs.get(records.SWEEP_ID) == sweep_id]
    if any(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING) for t in mine):
        return  # another worker of the command still runs them: the command's first process judges at its end
    retried = {records.failed_trial_of(t) for t in trials if t.state in finished}
    if mine and not any(t.state in finished or t.number in retried for t in mine):
        failed = [t for t in mine if t.state == optuna.trial.TrialState.FAIL]
        last = records.error_of(failed[-1], "?") if failed else "?"
        raise config_mod.InputError(
            f"no trial of this command completed: {len(failed)} of {len(mine)} failed (last: trial "
            f"{failed[-1].number if failed else '?'}: {last}); fix the cause and re-run the same command")


def fail_if_work_left(command: Command, sweep_id: str) -> None:
    """A command whose workers all ended with trials of it not run: a retry still queued, or a trial a stop
    signal ended on a worker (SIGTERM to one worker) with no retry queued (no heartbeat). One line naming
    them, and a non-zero exit code."""
    left = []
    for sw in command.sweeps:
        trials = sw.study.get_trials(deepcopy=False)
        retried = {records.failed_trial_of(t) for t in trials}
        for t in trials:
            if t.state == optuna.trial.TrialState.WAITING and not records.is_parked(t):
                left.append(f"trial {t.number} is queued" + (f" (the retry of trial {records.failed_trial_of(t)})"
                                                             if records.failed_trial_of(t) is not None else ""))
            elif (t.state == optuna.trial.TrialState.FAIL and t.system_attrs.get(records.SWEEP_ID) == sweep_id
                  and str(records.error_of(t, "")).startswith(STOPPED) and t.number not in retried):
                left.append(f"trial {t.number} was {records.error_of(t)[len(STOPPED):]} and has no retry")
    if left:
        names = f" of study {command.sweeps[0].name!r}" if len(command.sweeps) == 1 else ""
        raise config_mod.InputError(f"this command's workers ended with trials{names} not run: {'; '.join(left)}; "
                                    "re-run the same command to run them")
