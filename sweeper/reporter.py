"""How a run talks to its study without importing Optuna.

:class:`Reporter` is what :mod:`sweeper.runner` and :mod:`sweeper.wsd` call; ``sweeper.sweep.handle.TrialReporter``
implements it on an Optuna trial, :class:`NullReporter` is a run without a study (``python train.py``),
and :class:`Collect` keeps one segment's attrs inside a WSD search. Tests subclass :class:`NullReporter`.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Collect", "NullReporter", "Parked", "Reporter"]


class Parked(Exception):
    """A joint WSD search's trunk waits at a rung for trunks that no worker is training: its job ends, its
    trial goes back to the queue (WAITING) with its checkpoint, and a worker resumes it once the halving
    rule has decided (``sweeper.halving``)."""


class Reporter(Protocol):
    number: int | None  # the trial's number in its study (None: no study)

    def report(self, value: float, step: int) -> None:
        """One evaluation of the objective at optimizer step ``step``."""

    def should_prune(self) -> bool:
        """True when the study's pruner stops this run after its latest report."""

    def prune(self, step: int) -> None:
        """Stop the run as pruned (raises)."""

    def set_attrs(self, attrs: dict) -> None:
        """Results and settings of the run, stored on the trial."""

    def resume_checkpoint(self) -> str | None:
        """For a retried trial: the newest whole checkpoint its failed run left, else None."""

    def set_wsd_params(self, max_steps: int, low: int, high: int) -> None:
        """A WSD search: record the trunk's length as the trial's ``max_steps`` param."""

    def record_branch(self, *, key: str, max_steps: int, low: int, high: int, value: float, curve: list,
                      user_attrs: dict) -> int | None:
        """A WSD search: record one cooldown branch as a COMPLETE trial; its number (None: no study)."""

    def stop(self, reason: str) -> None:
        """A WSD search whose trunk stopped early: end the trial PRUNED with ``reason`` (raises)."""

    def trunks(self, trunk: dict) -> list:
        """A joint WSD search: every learning rate's trunk (``sweeper.halving.Trunk``) as the study knows
        it now, ``trunk`` (this one's ``wsd_trunk`` record) standing for this one."""

    def park(self, reason: str) -> None:
        """A joint WSD search's trunk waits for trunks no worker trains: raise :class:`Parked`."""


class NullReporter:
    """A run without a study: nothing is recorded, nothing is pruned."""

    number: int | None = None

    def report(self, value: float, step: int) -> None:
        pass

    def should_prune(self) -> bool:
        return False

    def prune(self, step: int) -> None:
        raise AssertionError("a run without a study is never pruned")

    def set_attrs(self, attrs: dict) -> None:
        pass

    def resume_checkpoint(self) -> str | None:
        return None

    def set_wsd_params(self, max_steps: int, low: int, high: int) -> None:
        pass

    def record_branch(self, **kwargs: Any) -> int | None:
        return None

    def stop(self, reason: str) -> None:
        pass

    def trunks(self, trunk: dict) -> list:
        from sweeper.halving import Trunk

        return [Trunk(float(trunk["lr"]), {int(k): float(v) for k, v in trunk["rungs"].items()})]

    def park(self, reason: str) -> None:
        raise Parked(reason)


class Collect(NullReporter):
    """Reporter of one segment of a WSD search: keeps its attrs; the trunk's forwards evaluations (and
    pruning) to the job's reporter, a branch's never (its curve becomes a trial of its own)."""

    def __init__(self, parent: Reporter | None = None) -> None:
        self.parent, self.attrs = parent, {}

    def report(self, value: float, step: int) -> None:
        if self.parent is not None:
            self.parent.report(value, step)

    def should_prune(self) -> bool:
        return self.parent is not None and self.parent.should_prune()

    def prune(self, step: int) -> None:
        self.parent.prune(step)

    def set_attrs(self, attrs: dict) -> None:
        self.attrs.update(attrs)
        if self.parent is not None:  # run_dir first of all: a re-queued trunk finds its checkpoints by it
            self.parent.set_attrs(attrs)
