"""The job's handle on its own trial: :class:`TrialReporter`, the ``sweeper.reporter.Reporter`` of a job in a study.

    python train.py -m schedule=under,sweet,over      # each job opens its trial through TrialReporter.from_job

``sweeper.trial`` opens it from the job's config (``study.name``, ``study.trial_number``); ``sweeper.runner``
and ``sweeper.wsd`` report every evaluation through it (``trial.report``; the pruner is asked after each),
store their results (``sweeper.records``: long ones as system attrs), find a retry's checkpoint, and, in a WSD
search, record each branch as a trial of its own and read the joint search's trunks (``sweeper.trunks``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sweeper import checkpoints, halving, inject, objectives, records, samplers
from sweeper import trunks as trunks_mod
from sweeper.reporter import Parked
from sweeper.storage import open_storage

__all__ = ["TrialReporter", "wsd_params"]


def wsd_params(max_steps: int, low: int, high: int) -> list[tuple[str, Any, Any]]:
    """A WSD trunk's or branch's params: ``max_steps`` in [low, high] and ``method=wsd``."""
    return [("max_steps", int(max_steps), optuna.distributions.IntDistribution(int(low), int(high))),
            ("method", "wsd", optuna.distributions.CategoricalDistribution(["cosine", "wsd"]))]


class TrialReporter:
    """The job's handle on its own trial: report, prune, store attrs. Used by ``sweeper.trial``."""

    def __init__(self, trial: optuna.Trial, storage: Any = None, stale_after_s: float | None = None) -> None:
        self.trial = trial
        self.storage = storage
        self.stale_after_s = stale_after_s  # a RUNNING trial whose heartbeat is older has lost its worker

    @classmethod
    def from_job(cls, cfg: DictConfig) -> "TrialReporter":
        sweeper_cfg = HydraConfig.get().sweeper
        storage = open_storage(sweeper_cfg.storage)
        study = optuna.load_study(study_name=cfg.study.name, storage=storage,
                                  pruner=samplers.make_pruner(sweeper_cfg.pruner))
        tid = records.trial_by_number(study, int(cfg.study.trial_number))
        frozen = records.frozen(study, tid)
        failed = records.failed_trial_of(frozen)
        if failed is not None and records.error_of(frozen):
            # a retry inherits its failed run's attrs: keep why that one failed, not as this trial's error
            records.set_user(study, tid, records.RETRY_OF, {"trial": failed, "error": records.error_of(frozen)})
            records.set_user(study, tid, records.ERROR, None)
        beat = sweeper_cfg.get("heartbeat_interval")
        stale = sweeper_cfg.get("grace_period") or (2 * beat if beat else None)
        return cls(optuna.Trial(study, tid), storage, stale)

    @property
    def _id(self) -> int:
        return records.trial_id(self.trial)

    def close(self) -> None:
        """Drop the job's database connections, so that an interrupted write (Ctrl-C in the middle of
        a report) cannot keep SQLite locked against the sweeper, which records the trial's end."""
        if self.storage is not None:
            self.storage.engine.dispose()

    def resume_checkpoint(self) -> str | None:
        """For a trial re-queued after its worker died, or a joint search's trunk parked at a rung: the
        newest whole checkpoint its run left (:func:`sweeper.checkpoints.newest_resumable`; whole ones only:
        a kill can cut a save short)."""
        frozen = records.frozen(self.trial.study, self._id)
        if records.failed_trial_of(frozen) is None and not records.is_parked(frozen):
            return None
        run_dir = frozen.user_attrs.get(records.RUN_DIR)
        if not run_dir or not Path(run_dir).is_dir():
            return None
        return checkpoints.newest_resumable(run_dir, f"trial {self.trial.number}'s retry")

    def report(self, value: float, step: int) -> None:
        inject.in_report(records.storage(self.trial.study), self._id, step)
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
        self.trial.set_user_attr(records.STOPPED_REASON, reason)
        raise optuna.TrialPruned(reason)

    def set_wsd_params(self, max_steps: int, low: int, high: int) -> None:
        """Record the trunk's own params (max_steps, method=wsd), so the dashboard lines it up with its
        branches and with cosine trials; kept as they are on a retried trial, which inherits them. Read past
        the cache, which does not know a trial asked by another process."""
        frozen = records.frozen(self.trial.study, self._id, fresh=True)
        for name, value, dist in wsd_params(max_steps, low, high):
            if name not in frozen.params:
                records.set_param(self.trial.study, self._id, name, value, dist)

    def record_branch(self, *, key: str, max_steps: int, low: int, high: int, value: float,
                      curve: list, user_attrs: dict) -> int:
        """Add one finished WSD branch as a COMPLETE trial in one write (params max_steps, method=wsd and the
        trunk's others;
        ``curve`` [[step, value], ...] as its intermediate values) and return its number. Idempotent:
        a branch already recorded under ``key`` (a resumed search) is not added twice."""
        study = self.trial.study

        def existing() -> int | None:
            return next((t.number for t in study.get_trials(deepcopy=False)
                         if t.system_attrs.get(records.WSD_BRANCH_KEY) == key), None)

        number = existing()
        if number is not None:
            return number
        # the trunk's other params (a seed or learning rate the command swept or sampled, a joint search's rate): a
        # branch ran them too, and the report compares like with like by them
        frozen = records.frozen(study, self._id)
        params = wsd_params(max_steps, low, high) + [(n, v, frozen.distributions[n]) for n, v in frozen.params.items()
                                                     if n not in ("max_steps", "method")]
        curves = {k: user_attrs[k] for k in records.SYSTEM_ATTRS if k in user_attrs}  # where set_attrs keeps them
        study.add_trial(optuna.trial.create_trial(
            params={n: v for n, v, _ in params}, distributions={n: d for n, _, d in params},
            value=float(value), intermediate_values={int(s): float(v) for s, v in curve},
            user_attrs={k: v for k, v in user_attrs.items() if k not in curves and k != "curve"},
            system_attrs={records.WSD_BRANCH_KEY: key, records.WSD_BRANCH_OF: self.trial.number, **curves},
        ))
        return existing()

    def trunks(self, trunk: dict) -> list[halving.Trunk]:
        """A joint search: every learning rate's trunk as the study holds it now (``sweeper.trunks.trunk_table``)."""
        study = self.trial.study
        fresh = records.storage(study, fresh=True)
        return trunks_mod.trunk_table(records.all_trials(study, fresh=True), trunk,
                                      records.abandoned_rates(study, trunk["group"]),
                                      lambda t: trunks_mod.fresh(fresh, t, self.stale_after_s))

    def park(self, reason: str) -> None:
        """Raise :class:`sweeper.reporter.Parked`: the sweeper puts the trial back in the queue (WAITING)."""
        raise Parked(reason)

    def set_attrs(self, attrs: dict) -> None:
        """Store the job's results on its trial: ``SYSTEM_ATTRS`` as system attrs (long values would make
        optuna-dashboard's attribute table thousands of pixels wide), the rest as user attrs."""
        for k, v in attrs.items():
            if k in records.SYSTEM_ATTRS:
                records.set_system(self.trial.study, self._id, k, v)
            else:
                self.trial.set_user_attr(k, v)
