"""The end of a sweep: each study's report printed and written (:func:`write`), and the exit code's check
(:func:`fail_if_nothing_completed`).

    python train.py -m schedule=under,sweet,over     # ends with the table; outputs/sweeps/<study>/summary.md

Each study's ``summary.md`` and ``optimization_results.yaml`` (hydra-optuna-sweeper's) go to its folder; with
several studies the table of datasets (``sweeper.report.datasets_section``) goes to the command's folder.
"""

from __future__ import annotations

import logging

import optuna

from sweeper import config as config_mod
from sweeper import objectives, records
from sweeper.report import datasets_section, study_report
from sweeper.sweep.command import Command

__all__ = ["fail_if_nothing_completed", "write"]

log = logging.getLogger(__name__)


def write(command: Command) -> None:
    """Print each study's report and write it to its folder's summary.md; with several studies, then
    the table of datasets (a row per study) and its figure, written to the command's folder."""
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


def fail_if_nothing_completed(command: Command, sweep_id: str) -> None:
    """A command none of whose trials completed (every one FAILed, in all its studies) ends with a
    non-zero exit code and one line saying so; trials it did not run (all done before) do not count."""
    mine = [t for sw in command.sweeps for t in sw.study.get_trials(deepcopy=False)
            if t.system_attrs.get(records.SWEEP_ID) == sweep_id and not records.is_branch(t)]
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if mine and not any(t.state in finished for t in mine):
        failed = [t for t in mine if t.state == optuna.trial.TrialState.FAIL]
        last = records.error_of(failed[-1], "?") if failed else "?"
        raise config_mod.InputError(
            f"no trial of this command completed: {len(failed)} of {len(mine)} failed (last: trial "
            f"{failed[-1].number if failed else '?'}: {last}); fix the cause and re-run the same command")
