"""The study's view of a joint WSD search's trunks (one per learning rate), for :mod:`sweeper.halving`.

Each trunk trial carries a ``wsd_trunk`` system attr (its group, learning rate, the rates of the search, the
halving rule and its branch value at each rung reached; ``parked_at`` while it waits in the queue), written
by :mod:`sweeper.wsd` through ``sweeper.sweep.handle.TrialReporter`` (its shape: ``sweeper.records``). :func:`trunk_table` turns a study's trials into the
:class:`sweeper.halving.Trunk` list that :func:`sweeper.halving.decide` ranks: the job calls it before it
trains past a rung (``TrialReporter.trunks``), the sweeper when it hands out a parked trunk
(:func:`parked_decision`). A retried trial inherits ``wsd_trunk`` with its other system attrs.
"""

from __future__ import annotations

from typing import Any, Sequence

import optuna

from sweeper import halving, identity, records
from sweeper.storage import heartbeat_age_s

__all__ = ["claimed_trunk", "fresh", "parked_decision", "parked_verdict", "trunk_table"]


def trunk_table(trials: Sequence[optuna.trial.FrozenTrial], trunk: dict, abandoned: Sequence[float] = (),
                running: Any = None, _seen: frozenset = frozenset(), _callers: tuple = ()) -> list[halving.Trunk]:
    """The trunks of ``trunk``'s joint search (its ``group``), one per learning rate, from the study's trials:
    each rate's newest trunk trial (a retry replaces its failed run) with the branch values of its
    ``wsd_trunk`` record; ``live`` while RUNNING or WAITING (queued, or parked at a rung where the halving
    rule does not stop it); a rate with no trial yet is live unless ``abandoned`` (no worker of the command
    will start it). ``running(t)``: whether a RUNNING trial's worker is alive (default: yes). ``trunk``
    itself counts as running (so do the trunks a parked trunk's verdict is asked for, in the recursion)."""
    def rungs(rec: dict) -> dict[int, float]:
        return {int(k): float(v) for k, v in (rec.get("rungs") or {}).items()}

    latest: dict[float, tuple[optuna.trial.FrozenTrial, dict]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        rec = records.trunk_of(t) or claimed_trunk(t)
        if rec and rec.get("group") == trunk["group"] and not records.is_branch(t):
            latest[float(rec["lr"])] = (t, rec)
    out = []
    callers = {float(c["lr"]): c for c in _callers}
    for lr in map(float, trunk["learning_rates"]):
        if lr == float(trunk["lr"]) or lr in callers:
            out.append(halving.Trunk(lr, rungs(trunk if lr == float(trunk["lr"]) else callers[lr]), live=True,
                                     running=True))
        elif lr in latest:
            t, rec = latest[lr]
            state = t.state
            live = state == optuna.trial.TrialState.RUNNING
            if state == optuna.trial.TrialState.WAITING:  # queued; parked: unless the rule stops it there
                live = rec.get(records.PARKED_AT) is None or t.number in _seen or parked_verdict(
                    rec, [x for x in trials if x.number != t.number], abandoned, _seen | {t.number},
                    (*_callers, trunk)) != "stop"
            is_running = state == optuna.trial.TrialState.RUNNING and (running is None or running(t))
            out.append(halving.Trunk(lr, rungs(rec), live=live, running=is_running))
        else:
            out.append(halving.Trunk(lr, {}, live=lr not in abandoned, running=False))
    return out


def claimed_trunk(t: optuna.trial.FrozenTrial) -> dict | None:
    """A joint search's trunk claimed by a worker whose job has not yet recorded its ``wsd_trunk``: known
    from the settings the sweeper recorded at the claim (``config``), with no rung reached."""
    config = records.config_of(t) or {}
    if config.get("schedule.wsd.learning_rates") is None or config.get("lr.learning_rate") is None:
        return None
    return {"group": identity.joint_group(config), "lr": float(config["lr.learning_rate"]), "rungs": {}}


def parked_verdict(rec: dict, others: Sequence[optuna.trial.FrozenTrial], abandoned: Sequence[float],
                    seen: frozenset = frozenset(), callers: tuple = ()) -> str:
    """The halving rule's verdict on a trunk parked at rung ``rec[records.PARKED_AT]``: continue, stop or pending."""
    trunks = trunk_table(others, rec, abandoned, _seen=seen, _callers=callers)
    return halving.decide(float(rec["lr"]), int(rec[records.PARKED_AT]), trunks, int(rec["eta"]), bool(rec["maximize"]),
                          str(rec["rule"]), str(rec.get("metric", "eval_loss"))).verdict


def fresh(storage: Any, t: optuna.trial.FrozenTrial, stale_after_s: float | None) -> bool:
    """A RUNNING trial's worker still beats (or the storage keeps no heartbeats)."""
    age = heartbeat_age_s(storage, records.trial_id(t))
    return age is None or stale_after_s is None or age < stale_after_s


def parked_decision(trial: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial],
                     abandoned: Sequence[float]) -> str | None:
    """For a joint search's trunk parked at a rung (WAITING): the halving rule's verdict now; None for any
    other trial."""
    if not records.is_parked(trial):
        return None
    rec = records.trunk_of(trial)
    return parked_verdict(rec, [t for t in trials if t.number != trial.number], abandoned, frozenset({trial.number}))
