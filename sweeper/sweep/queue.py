"""Which trial a worker runs next, under the cross-worker lock (:class:`Queue`): claim, take, park, abandon.

    python train.py -m schedule=under,sweet,over hydra.sweeper.workers=2   # two workers share this queue

- A grid: a command runs its own points that have no COMPLETE, PRUNED, RUNNING or WAITING trial of the same
  settings (``sweeper.identity``), whatever else the study holds; a point that FAILed in this sweep is not
  run again until the command is re-run. Sampled: ``n_trials`` is the study's total; in a space of finite points
  (choice, range) a draw of a point already trained moves to one not yet trained. A trial that drew a point counts
  as that point of a later grid over the same space, and back (:func:`matches`).
- :meth:`Queue.claim_next`: with several studies, a study's re-queued trial (WAITING) comes first, then grid
  points in the command's order, or the study this worker claimed fewest trials of.
- :meth:`Queue.claim`: under ``sweeper.storage.claim_lock``, fail stale trials (Optuna's heartbeat; their
  retries become WAITING), take a WAITING trial (a joint WSD search's trunk *parked* at a rung only once the
  halving rule has decided it, ``sweeper.trunks``), else start the next point; records the trial's settings,
  its sweep and its worker process (``sweeper.records``).
- :meth:`Queue.abandon`: trunks parked for learning rates no worker will start are ranked without them.
- :meth:`Queue.reclaim_dead_local`: RUNNING trials whose worker process on this host is gone are failed and
  re-queued at once; :meth:`Queue.counts`: what the command still has to do (its start line, its progress).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna

from sweeper import config as config_mod
from sweeper import identity, records, samplers
from sweeper import points as points_mod
from sweeper import trunks as trunks_mod
from sweeper.interrupt import deferred
from sweeper.space import finite_values, same_value, untried, value_text
from sweeper.storage import claim_lock, fail_and_requeue, heartbeat_age_s, mask_url
from sweeper.sweep import tell
from sweeper.sweep.command import Command, Sweep
from sweeper.sweep.settings import Settings

__all__ = ["COVERED", "Counts", "Queue", "dead_here", "matches", "this_process"]

log = logging.getLogger(__name__)

State = optuna.trial.TrialState
COVERED = (State.COMPLETE, State.PRUNED, State.RUNNING, State.WAITING)
DONE = (State.COMPLETE, State.PRUNED)


@dataclass(frozen=True)
class Counts:
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


def matches(trial: optuna.trial.FrozenTrial, point: dict[str, tuple[Any, str]], config: dict | None = None,
            sampled: Iterable[str] = ()) -> bool:
    """Whether ``trial`` ran grid ``point`` (its params) with ``config`` (the point's result config;
    None: params alone). A key the trial has no param for is judged by its recorded config: ``max_steps=10`` run as
    a fixed value is the point ``10`` of a later ``max_steps=10,15``. A param the trial drew
    (``sweeper.records.drawn_params``), and a key of ``sampled`` (the command's distributions, which the point
    leaves to the sampler), is left out of the configs' comparison, as they hold the command's value from before the
    draw: the trial's params decide it, so a point of ``choice(a,b,c)`` run as a grid is the trial that drew it when
    the same space was sampled, and back."""
    params = {**trial.params, **records.queued_params(trial)}
    recorded = records.config_of(trial) is not None and config is not None
    # a key the trial has no param for (run as a fixed value): its recorded config decides
    if not all(same_value(params[k], v) if k in params else recorded for k, (v, _) in point.items()):
        return False
    skip = records.drawn_params(trial) | {k for k in sampled if k not in point}
    return config is None or identity.same_run(records.config_of(trial), config, skip)


def this_process() -> str:
    """``host:pid:start`` of this process (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def dead_here(proc: str) -> bool:
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


class Queue:
    """The trials of one command's studies as one worker sees them; ``tried``: the points it claimed, per study."""

    def __init__(self, settings: Settings, command: Command) -> None:
        self.settings, self.command = settings, command
        self.tried: dict[str, set[int]] = {sw.name: set() for sw in command.sweeps}

    # -- what is left

    def next_point(self, sw: Sweep, peek: bool = False) -> int | None:
        """The index of the next grid point to run, or None when the sweep is done. A point that
        failed in this sweep (any of its workers) is not retried until the command is run again.
        ``peek``: only say which, without counting it as tried."""
        tried = self.tried[sw.name]
        trials = [t for t in sw.study.get_trials(deepcopy=False) if not records.is_branch(t)]
        covered = [t for t in trials if t.state in COVERED]
        failed_here = [t for t in trials if t.state == State.FAIL
                       and t.system_attrs.get(records.SWEEP_ID) == self.settings.sweep_id]
        if sw.pure_grid:  # this command's own points, whatever else the study holds
            for i, point in enumerate(sw.points):
                if i in tried or any(matches(t, point, sw.configs[i]) for t in covered + failed_here):
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
        sampled = set(sw.space.distributions)  # the points' configs hold these at the command's value
        counts = [sum(matches(t, p, c, sampled) for t in covered) for p, c in zip(sw.points, sw.configs)]
        return counts.index(min(counts))

    def counts(self, sw: Sweep) -> Counts:
        """What this command still has to do: its grid points (or, sampled, the study's total) that
        have no COMPLETE/PRUNED trial, split into running elsewhere and to run."""
        trials = [t for t in sw.study.get_trials(deepcopy=False) if not records.is_branch(t)]
        running = [t for t in trials if t.state == State.RUNNING]
        if sw.pure_grid:
            pc = list(zip(sw.points, sw.configs))
            done = sum(any(t.state in DONE and matches(t, p, c) for t in trials) for p, c in pc)
            busy = sum(not any(t.state in DONE and matches(t, p, c) for t in trials)
                       and any(matches(t, p, c) for t in running) for p, c in pc)
            to_run = len(sw.points) - done - busy
        else:
            done = sum(t.state in DONE for t in trials)
            busy = len(running)
            to_run = max(0, sw.total - done - busy)
        return Counts(to_run=to_run, done=done, running=busy, stale_after=self._stale_after(sw.study, running))

    def _stale_after(self, study: optuna.Study, running: list) -> str | None:
        """When the last of the running trials would count as stale (its worker dead), as HH:MM:SS."""
        if not running or not self.settings.heartbeat_interval:
            return None
        ages = [a for a in (heartbeat_age_s(records.storage(study), records.trial_id(t)) for t in running)
                if a is not None]
        if not ages:
            return None
        grace = self.settings.grace_s
        until = datetime.datetime.now() + datetime.timedelta(seconds=grace - min(ages))
        return f"{until:%H:%M:%S} (grace period {grace} s)"

    def has_work(self) -> bool:
        """Whether this worker would claim a trial now: a queued retry (or a decided parked trunk), or a point
        it has not run."""
        return any(_ready(sw.study, sw.study.get_trials(deepcopy=False)) or self.next_point(sw, peek=True) is not None
                   for sw in self.command.sweeps)

    def total(self) -> int:
        """Trials the command's progress bar counts: done, running elsewhere and to run, over its studies."""
        return sum(c.done + c.running + c.to_run for c in map(self.counts, self.command.sweeps))

    def done(self) -> int:
        return sum(self.counts(sw).done for sw in self.command.sweeps)

    # -- claiming

    def claim_next(self) -> tuple[Sweep, optuna.Trial] | None:
        """The next trial of any of the command's studies, or None when all are done: no barrier between
        studies. A study's re-queued trial (WAITING) comes first; then grid points in the command's order
        (``schedule=a,b data=x,y``: a-x, a-y, b-x, ...), or with distributions the study this worker has
        claimed fewest trials of."""
        def rank(sw: Sweep) -> tuple:
            if sw.study.get_trials(deepcopy=False, states=(State.WAITING,)):
                return (0, 0)
            if not sw.pure_grid:
                return (1, len(self.tried[sw.name]))
            i = self.next_point(sw, peek=True)
            return (1, sw.order[i]) if i is not None else (2, 0)

        sweeps = self.command.sweeps
        order = sweeps if len(sweeps) == 1 else [sw for _, _, sw in sorted((rank(sw), n, sw) for n, sw in enumerate(sweeps))]
        for sw in order:
            trial = self.claim(sw)
            if trial is not None:
                return sw, trial
        return None

    def claim(self, sw: Sweep) -> optuna.Trial | None:
        """Under the cross-worker lock: fail stale trials (their retries become WAITING), then
        take a WAITING trial if there is one (a joint search's parked trunk only once the halving rule has
        decided it), else start the next point. Records the trial's result config (``config`` system attr;
        a retry inherits its failed trial's)."""
        study = sw.study
        with claim_lock(self.settings.storage_url, study.study_name), deferred():  # a Ctrl-C waits for the claim
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            waiting = [t for t in trials if t.state == State.WAITING]
            ready = _ready(study, trials)
            config, created, place = None, False, None
            if ready:
                tid = records.trial_id(ready[0])
            else:
                i = self.next_point(sw)
                if i is None:
                    return None
                tid, created = self._new(study, sw.points[i], waiting)
                config, place = sw.configs[i], _unrepeated(sw, trials, i)
            trial = self._take_or_fail(study, tid, sw.dists, created, place)
            if config is None:  # a queued retry: the config of the trial it repeats
                config = records.retried_config(study, records.frozen(study, tid))
            if created and not sw.dists and config is not None:  # a command sweeping nothing: the study's params
                for pname, (value, dist) in points_mod.fixed_params(config, trials).items():
                    records.set_param(study, tid, pname, value, dist)
            records.set_system(study, tid, records.SWEEP_ID, self.settings.sweep_id)
            records.set_system(study, tid, records.WORKER_PROCESS, this_process())
            if config is not None:
                records.set_system(study, tid, records.CONFIG, config)
            return trial

    @staticmethod
    def _new(study: optuna.Study, point: dict, waiting: list) -> tuple[int, bool]:
        """A trial for grid ``point``, queued with its params (WAITING); sampled (no point): a new trial, as
        ``study.ask`` makes one (RUNNING, so created). Returns its id and whether it was created RUNNING."""
        if not point:
            return records.new_trial(study), True
        study.enqueue_trial({k: v for k, (v, _) in point.items()})
        known = {records.trial_id(t) for t in waiting}
        return max(records.trial_id(t) for t in study.get_trials(deepcopy=False, states=(State.WAITING,))
                   if records.trial_id(t) not in known), False

    def _take_or_fail(self, study: optuna.Study, tid: int, dists: dict, created: bool,
                      place: Callable[[dict], dict] | None = None) -> optuna.Trial:
        """:func:`take`; a sampler that could not suggest (a package it needs, say) FAILs the trial, not RUNNING,
        and stops the sweep in one line."""
        try:
            return take(study, tid, dists, created, self.settings.sampler, place)
        except Exception as e:
            records.set_user(study, tid, records.ERROR, f"{type(e).__name__}: {e}")
            records.set_state(study, tid, State.FAIL)
            raise config_mod.InputError(f"stopping the sweep: the sampler could not suggest a trial's params "
                                        f"({type(e).__name__}: {e})") from None

    # -- parked trunks of a joint WSD search

    def parked(self) -> list[tuple[Sweep, optuna.trial.FrozenTrial]]:
        """The joint-search trunks parked in the command's studies (WAITING for the halving rule)."""
        return [(sw, t) for sw in self.command.sweeps
                for t in sw.study.get_trials(deepcopy=False, states=(State.WAITING,)) if records.is_parked(t)]

    def abandon(self) -> None:
        """Nothing left to start, nothing RUNNING, yet trunks stay parked: the learning rates they wait for
        have no trial and no worker of this command will start one (``n_trials`` cut them, say). Record them
        as abandoned, so that the halving rule ranks the parked trunks without them."""
        for sw, t in self.parked():
            if sw.study.get_trials(deepcopy=False, states=(State.RUNNING,)):
                continue
            rec = records.trunk_of(t)
            mine = [records.trunk_of(x) for x in sw.study.get_trials(deepcopy=False)]
            started = {float(r["lr"]) for r in mine if r.get("group") == rec["group"]}
            missing = sorted(set(map(float, rec["learning_rates"])) - started)
            known = set(records.abandoned_rates(sw.study, rec["group"]))
            if set(missing) - known:
                records.set_abandoned_rates(sw.study, rec["group"], sorted(set(missing) | known))
                log.warning("WSD joint search: no trial of lr=%s will run in this command; ranking the other "
                            "learning rates without it", ",".join(f"{r:g}" for r in missing))

    # -- dead workers

    def reclaim_dead_local(self, study: optuna.Study) -> None:
        """RUNNING trials whose worker process ran on this host and is gone (``kill -9``, a crash): fail
        them now and queue their retries, which resume from their checkpoints, instead of waiting for
        their heartbeats to go stale. Trials of other hosts keep the heartbeat's grace period."""
        with claim_lock(self.settings.storage_url, study.study_name), deferred():  # a Ctrl-C waits for the claim
            for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
                proc = t.system_attrs.get(records.WORKER_PROCESS)
                if not proc or not dead_here(proc):
                    continue
                queued = fail_and_requeue(study, records.trial_id(t), f"worker {proc} is gone (its process ended)")
                log.warning("trial %d: its worker %s is gone; recorded FAIL%s", t.number, proc,
                            tell.queued_text(study, records.trial_id(t)) if queued else "")

    def start_lines(self) -> int:
        """Reclaim this host's dead workers' trials, then log each study's start line (what it will run, what
        is done, what runs elsewhere) and, with several studies, their total. Returns the trials to run."""
        to_run, url = 0, mask_url(self.settings.storage_url)
        for sw in self.command.sweeps:
            self.reclaim_dead_local(sw.study)
            counts = self.counts(sw)
            to_run += counts.to_run
            log.info("study %r in %s: %d grid point(s) x %s; %s", sw.name, url, len(sw.points),
                     sorted(sw.space.distributions) or "no distributions", counts.describe(sw.pure_grid, sw.total))
        if len(self.command.sweeps) > 1:
            log.info("%d studies, one per dataset and model (%s): %d trial(s) to run in all, on shared workers",
                     len(self.command.sweeps), self.command.names, to_run)
        return to_run


def take(study: optuna.Study, tid: int, dists: dict, created: bool, sampler_cfg: Any = None,
         place: Callable[[dict], dict] | None = None) -> optuna.Trial:
    """The trial ``tid`` as ``study.ask`` hands one out: RUNNING (from WAITING, unless ``created`` so), its
    fixed params suggested, the others drawn by the sampler of ``sampler_cfg`` seeded for this trial
    (:func:`sweeper.samplers.for_trial`: a resumed study, or another worker, draws anew). ``ask`` itself would
    take the oldest WAITING trial, which may be a parked trunk the halving rule has not decided yet. ``place``:
    the params the trial takes given the sampler's draw (``{name: value}``, recorded nowhere until then; a finite
    space's draw moved off the points already trained, :func:`_unrepeated`)."""
    if not created and not records.set_state(study, tid, State.RUNNING):
        raise RuntimeError(f"trial id {tid} was taken by another worker under the claim lock")
    if dists and sampler_cfg is not None:
        number = study._storage.get_trial_number_from_id(tid)
        study.sampler = samplers.for_trial(sampler_cfg, len(study.directions), number) or study.sampler
    trial = optuna.Trial(study, tid)
    if dists and place is not None:
        records.fix(trial, place(records.draw(trial, dists)))
    for name, dist in dists.items():
        records.suggest(trial, name, dist)
    return trial


def _unrepeated(sw: Sweep, trials: list[optuna.trial.FrozenTrial], i: int) -> Callable[[dict], dict] | None:
    """For a sampled space of finite points (choice, range: a sampler draws them with replacement), what a new
    trial at grid point ``i`` takes given the sampler's draw: the draw, or when a trial of the study trained it,
    runs it or is queued for it (by any command, sampled or grid), the next point not yet trained
    (:func:`sweeper.space.untried`), so that no point trains twice while another has not. None for a pure grid
    or a space with a continuous distribution (whose draws do not repeat)."""
    dists = sw.space.distributions
    if sw.pure_grid or not dists or any(finite_values(d) is None for d in dists.values()):
        return None
    point, config, keys = sw.points[i], sw.configs[i], set(dists)
    tried = [{**t.params, **records.queued_params(t)} for t in trials
             if t.state in COVERED and matches(t, point, config, keys)]
    tried = [p for p in tried if keys <= set(p)]

    def place(drawn: dict) -> dict:
        moved = untried(dists, drawn, tried)
        if moved != drawn:
            said = " ".join(f"{k}={value_text(drawn[k])}" for k in dists)
            log.info("the sampler drew %s, which a trial of this study has trained (or runs); this trial trains %s, "
                     "a point not yet trained (a finite space trains no point twice while others wait)", said,
                     " ".join(f"{k}={value_text(moved[k])}" for k in dists))
        return moved

    return place


def _ready(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The WAITING trials a worker may take now: queued ones, and parked trunks the halving rule has decided."""
    return [t for t in trials if t.state == State.WAITING
            and trunks_mod.parked_decision(t, trials, _abandoned_rates(study, t)) != "pending"]


def _abandoned_rates(study: optuna.Study, t: optuna.trial.FrozenTrial) -> list[float]:
    return records.abandoned_rates(study, records.trunk_of(t)["group"]) if records.is_parked(t) else []
