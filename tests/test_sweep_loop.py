"""The sweep's queue and one worker's loop, in this process, over a real SQLite study file.

The jobs are run by :class:`Jobs`, a launcher with Hydra's ``launch([overrides], initial_job_idx)`` form that calls a
plain function of the job's overrides and returns a ``JobReturn`` as Hydra's basic launcher does (COMPLETED with the
value, FAILED with the exception). Everything else is the sweeper's own code: ``sweeper.sweep.queue`` picks and claims
trials under the SQLite lock, ``sweeper.sweep.loop`` launches them under the heartbeat, ``sweeper.sweep.tell``
records them.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any, Callable

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus

from sweeper import records
from sweeper.config import InputError
from sweeper.reporter import Parked
from sweeper.space import SweepSpace, exhaust_finite
from sweeper.storage import fail_and_requeue, open_storage
from sweeper.sweep import loop, summary, tell
from sweeper.sweep.command import Command, Sweep
from sweeper.sweep.queue import Queue
from sweeper.sweep.settings import Settings

State = optuna.trial.TrialState


class Jobs:
    """Runs each job as ``job(params)`` (its overrides as a dict) and keeps every call's overrides."""

    def __init__(self, job: Callable[[dict], Any]) -> None:
        self.job, self.calls = job, []

    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        [overrides] = job_overrides
        self.calls.append(dict(o.split("=", 1) for o in overrides))
        try:
            return [JobReturn(status=JobStatus.COMPLETED, _return_value=self.job(self.calls[-1]))]
        except Exception as e:  # as Hydra's run_job: the job's exception is its return
            return [JobReturn(status=JobStatus.FAILED, _return_value=e)]

    def ran(self, key: str) -> list[str]:
        return [c[key] for c in self.calls]


def _settings(tmp_path, sweep_id: str = "sweep-1", **kw: Any) -> Settings:
    return Settings(storage_url=f"sqlite:///{tmp_path}/optuna.db", sweep_id=sweep_id, **kw)


def _study(settings: Settings, name: str = "s") -> optuna.Study:
    storage = open_storage(settings.storage_url, settings.heartbeat_interval, settings.grace_period, settings.max_retry)
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                               sampler=optuna.samplers.RandomSampler(seed=0))


def _grid(settings: Settings, key: str, values: list, name: str = "s", order: list[int] | None = None) -> Sweep:
    """A study's grid over ``key``, as ``sweeper.sweep.command.prepare`` makes one (configs: the settings run)."""
    space = SweepSpace(fixed=["seed=1"], grid=[(key, [(v, str(v)) for v in values])])
    points = space.grid_points()
    configs = [{key: v, "seed": 1} for v in values]
    return Sweep(_study(settings, name), name, space, points, True, len(points), space.grid_distributions(), configs,
                 [], order if order is not None else list(range(len(points))))


def _run(settings: Settings, sweeps: list[Sweep], job: Callable[[dict], Any]) -> Jobs:
    jobs = Jobs(job)
    queue = Queue(settings, Command(sweeps))
    queue.start_lines()
    loop.run(settings, queue, jobs, app_config=None)
    return jobs


def _states(study: optuna.Study, key: str) -> dict:
    return {t.params[key]: t.state for t in study.get_trials(deepcopy=False) if not records.is_branch(t)}


def test_a_grid_runs_its_points_once_and_a_rerun_only_the_new_ones(tmp_path):
    s = _settings(tmp_path)
    jobs = _run(s, [_grid(s, "schedule.max_steps", [10, 20])], lambda p: int(p["schedule.max_steps"]) / 100)
    assert jobs.ran("schedule.max_steps") == ["10", "20"]
    assert [c["study.trial_number"] for c in jobs.calls] == ["0", "1"]

    again = _settings(tmp_path, sweep_id="sweep-2")  # the same command again, extended by one point
    sw = _grid(again, "schedule.max_steps", [10, 20, 30])
    jobs = _run(again, [sw], lambda p: 0.5)
    assert jobs.ran("schedule.max_steps") == ["30"]
    assert _states(sw.study, "schedule.max_steps") == {10: State.COMPLETE, 20: State.COMPLETE, 30: State.COMPLETE}
    assert records.config_of(sw.study.trials[2]) == {"schedule.max_steps": 30, "seed": 1}
    assert sw.study.trials[2].system_attrs[records.SWEEP_ID] == "sweep-2"
    assert _run(again, [sw], lambda p: 0.5).calls == []  # nothing left: resumed, nothing run twice


def test_n_trials_is_the_study_total_with_distributions(tmp_path):
    def sampled(total: int) -> Sweep:
        space = SweepSpace(distributions={"lr.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3,
                                                                                                     log=True)})
        return Sweep(_study(s), "s", space, [{}], False, total, dict(space.distributions), [{"seed": 1}], [], [0])

    s = _settings(tmp_path)
    jobs = _run(s, [sampled(3)], lambda p: float(p["lr.learning_rate"]))
    assert len(jobs.calls) == 3 and len(set(jobs.ran("lr.learning_rate"))) == 3
    assert _run(_settings(tmp_path, "sweep-2"), [sampled(3)], lambda p: 0.1).calls == []  # a total, not "3 more"
    more = _run(_settings(tmp_path, "sweep-3"), [sampled(5)], lambda p: 0.1)
    assert len(more.calls) == 2
    assert [t.state for t in sampled(5).study.trials] == [State.COMPLETE] * 5


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler
def test_a_finite_sampled_space_trains_no_point_twice_and_its_grid_counts_the_draws(tmp_path):
    dist = optuna.distributions.CategoricalDistribution(["a", "b", "c"])
    sampled = SweepSpace(fixed=["seed=1"], distributions={"k": dist})
    s = _settings(tmp_path)
    sw = Sweep(_study(s), "s", sampled, [{}], False, 2, {"k": dist}, [{"k": "z", "seed": 1}], [], [0])
    # a sampler that always draws "a" (TPE's random start draws with replacement, a 3-point space soon repeats)
    sw.study.sampler = optuna.samplers.PartialFixedSampler({"k": "a"}, optuna.samplers.RandomSampler(seed=0))
    assert _run(s, [sw], lambda p: 0.5).ran("k") == ["a", "b"]  # the second "a" moved to a point not yet trained

    grid, _ = exhaust_finite(sampled, 3)  # n_trials=3 covers the space: each point once, as a grid
    points = grid.grid_points()
    again = _settings(tmp_path, sweep_id="sweep-2")
    sw = Sweep(_study(again), "s", grid, points, True, len(points), grid.grid_distributions(),
               [{"k": v, "seed": 1} for v in "abc"], [], [0, 1, 2])
    assert sw.dists == {"k": dist}  # recorded as the sampled trials were: the same study takes it
    assert _run(again, [sw], lambda p: 0.5).ran("k") == ["c"]  # the drawn "a" and "b" count as done
    assert sorted(t.params["k"] for t in sw.study.trials) == ["a", "b", "c"]


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    def job(p: dict) -> float:
        if p["schedule.max_steps"] == "20":
            raise RuntimeError("boom")
        return 0.5

    s = _settings(tmp_path)
    sw = _grid(s, "schedule.max_steps", [10, 20, 30])
    jobs = _run(s, [sw], job)
    assert jobs.ran("schedule.max_steps") == ["10", "20", "30"]
    assert _states(sw.study, "schedule.max_steps") == {10: State.COMPLETE, 20: State.FAIL, 30: State.COMPLETE}
    assert records.error_of(sw.study.trials[1]) == "RuntimeError: boom"
    summary.fail_if_nothing_completed(Command([sw]), s.sweep_id)  # two completed: exit code 0

    rerun = _settings(tmp_path, sweep_id="sweep-2")  # the failed point runs again when the command is re-run
    assert _run(rerun, [_grid(rerun, "schedule.max_steps", [10, 20, 30])], lambda p: 0.5).ran(
        "schedule.max_steps") == ["20"]


def test_max_failures_stops_the_sweep_in_one_line(tmp_path):
    def job(p: dict) -> float:
        raise ValueError(f"bad {p['schedule.max_steps']}")

    s = _settings(tmp_path, max_failures=2)
    sw = _grid(s, "schedule.max_steps", [10, 20, 30, 40])
    jobs = Jobs(job)
    with pytest.raises(InputError) as e:
        loop.run(s, Queue(s, Command([sw])), jobs, app_config=None)
    assert str(e.value) == ("stopping the sweep: 2 trial(s) failed, reaching hydra.sweeper.max_failures=2; last: "
                            "trial 1: ValueError: bad 20. Finished trials are kept; fix the cause and re-run the "
                            "same command to resume")
    assert jobs.ran("schedule.max_steps") == ["10", "20"]
    assert [t.state for t in sw.study.trials] == [State.FAIL, State.FAIL]  # nothing left RUNNING, 30 and 40 not begun
    with pytest.raises(InputError, match="no trial of this command completed: 2 of 2 failed"):
        summary.fail_if_nothing_completed(Command([sw]), s.sweep_id)
    # a worker of the command that ends while another of its workers still runs a trial judges nothing yet
    tid = records.new_trial(sw.study)
    records.set_system(sw.study, tid, records.SWEEP_ID, s.sweep_id)
    summary.fail_if_nothing_completed(Command([sw]), s.sweep_id)
    records.set_state(sw.study, tid, State.FAIL)
    with pytest.raises(InputError, match="no trial of this command completed: 3 of 3 failed"):
        summary.fail_if_nothing_completed(Command([sw]), s.sweep_id)


def test_a_pruned_trial_is_no_failure_and_is_not_run_again(tmp_path):
    def job(p: dict) -> float:
        if p["schedule.max_steps"] == "10":
            raise optuna.TrialPruned("pruned at step 5")
        return 0.5

    s = _settings(tmp_path, max_failures=1)  # a pruned trial counted as a failure would stop the sweep here
    sw = _grid(s, "schedule.max_steps", [10, 20])
    assert _run(s, [sw], job).ran("schedule.max_steps") == ["10", "20"]
    assert _states(sw.study, "schedule.max_steps") == {10: State.PRUNED, 20: State.COMPLETE}
    again = _settings(tmp_path, sweep_id="sweep-2")
    assert _run(again, [_grid(again, "schedule.max_steps", [10, 20])], job).calls == []


def _parked_trunk(study: optuna.Study) -> int:
    """A joint search's trunk of lr=1e-3, parked at its 500-step rung for lr=1e-4, which has no trial."""
    rec = {"group": "g", "lr": 1e-3, "learning_rates": [1e-3, 1e-4], "rule": "successive_halving", "eta": 2,
           "maximize": False, "metric": "eval_loss", records.PARKED_AT: 500, "rungs": {"500": 1.0}}
    study.add_trial(optuna.trial.create_trial(
        state=State.WAITING, params={"lr.learning_rate": 1e-3},
        distributions={"lr.learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-3)},
        system_attrs={records.WSD_TRUNK: rec}))
    return study.trials[-1].number


def test_a_parked_trunk_is_handed_out_once_the_halving_rule_decides(tmp_path, monkeypatch):
    polls = []

    def poll(seconds: float) -> None:  # the loop's wait for parked trunks: never more than a few rounds here
        polls.append(seconds)
        assert len(polls) < 5, "the parked trunk was never handed out"

    monkeypatch.setattr(loop.time, "sleep", poll)
    s = _settings(tmp_path)
    sw = _grid(s, "lr.learning_rate", [1e-3])
    number = _parked_trunk(sw.study)
    queue = Queue(s, Command([sw]))
    assert queue.claim(sw) is None  # pending: lr=1e-4 has not reached the rung
    assert sw.study.trials[number].state == State.WAITING

    parks = []

    def job(p: dict) -> float:  # parks once more at its first run, then finishes
        if not parks:
            parks.append(p)
            raise Parked("parked at the 500-step rung")
        return 0.7

    jobs = Jobs(job)
    loop.run(s, queue, jobs, app_config=None)  # nothing RUNNING, nothing to start: lr=1e-4 is abandoned
    assert records.abandoned_rates(sw.study, "g") == [1e-4]
    assert [c["study.trial_number"] for c in jobs.calls] == [str(number), str(number)]
    assert [t.state for t in sw.study.trials] == [State.COMPLETE]
    assert sw.study.trials[number].value == 0.7
    assert polls == [loop.PARKED_POLL_S]  # one wait, then lr=1e-4 was abandoned and the trunk went on


def test_a_parked_trunk_waits_while_the_rung_is_undecided_and_goes_once_it_is(tmp_path):
    s = _settings(tmp_path)
    sw = _grid(s, "lr.learning_rate", [1e-3])
    number = _parked_trunk(sw.study)
    queue = Queue(s, Command([sw]))
    assert queue.claim(sw) is None
    other = {"group": "g", "lr": 1e-4, "learning_rates": [1e-3, 1e-4], "rule": "successive_halving", "eta": 2,
             "maximize": False, "metric": "eval_loss", records.PARKED_AT: None, "rungs": {"500": 2.0}}
    sw.study.add_trial(optuna.trial.create_trial(value=2.0, system_attrs={records.WSD_TRUNK: other}))
    trial = queue.claim(sw)  # lr=1e-3 is better at the rung: it goes on
    assert trial is not None and trial.number == number
    assert sw.study.trials[number].state == State.RUNNING
    assert sw.study.trials[number].system_attrs[records.SWEEP_ID] == "sweep-1"


def test_a_dead_workers_trial_is_reclaimed_and_run_first(tmp_path):
    s = _settings(tmp_path, heartbeat_interval=60, max_retry=3)
    sw = _grid(s, "schedule.max_steps", [10, 20])
    lost = Queue(_settings(tmp_path, sweep_id="sweep-0", heartbeat_interval=60, max_retry=3), Command([sw]))
    trial = lost.claim(sw)  # claimed by a worker of an earlier sweep, then killed
    gone = subprocess.Popen(["true"])
    gone.wait()
    proc = f"{socket.gethostname()}:{gone.pid}:1"
    records.set_system(sw.study, records.trial_id(trial), records.WORKER_PROCESS, proc)

    jobs = _run(s, [sw], lambda p: 0.5)
    trials = sw.study.trials
    assert records.error_of(trials[0]) == f"worker {proc} is gone (its process ended)"
    assert [t.state for t in trials] == [State.FAIL, State.COMPLETE, State.COMPLETE]
    assert jobs.ran("schedule.max_steps") == ["10", "20"]  # the retry first, then the next point
    assert jobs.calls[0]["study.trial_number"] == "1" and records.failed_trial_of(trials[1]) == 0
    assert records.config_of(trials[1]) == {"schedule.max_steps": 10, "seed": 1}  # the retry's settings


def test_claims_follow_the_commands_order_across_studies_and_a_queued_retry_comes_first(tmp_path):
    s = _settings(tmp_path)
    a = _grid(s, "schedule", ["under", "sweet"], name="a", order=[0, 2])  # schedule=under,sweet data=a,b
    b = _grid(s, "schedule", ["under", "sweet"], name="b", order=[1, 3])
    jobs = _run(s, [a, b], lambda p: 0.5)
    assert [(c["study.name"], c["schedule"]) for c in jobs.calls] == [
        ("a", "under"), ("b", "under"), ("a", "sweet"), ("b", "sweet")]

    s2 = _settings(tmp_path / "two")
    a = _grid(s2, "schedule", ["under", "sweet"], name="a", order=[0, 2])
    b = _grid(s2, "schedule", ["under", "sweet"], name="b", order=[1, 3])
    b.study.enqueue_trial({"schedule": "sweet"})  # a queued retry of study b
    jobs = _run(s2, [a, b], lambda p: 0.5)
    assert [(c["study.name"], c["schedule"]) for c in jobs.calls] == [
        ("b", "sweet"), ("a", "under"), ("b", "under"), ("a", "sweet")]


def test_the_older_import_path_gives_the_same_objects():
    from sweeper import samplers, storage, study
    from sweeper.sweep import handle, plugin

    assert study.StudySweeper is plugin.StudySweeper and study.TrialReporter is handle.TrialReporter
    assert study.open_storage is storage.open_storage and study.mask_url is storage.mask_url
    assert study.SYSTEM_ATTRS is records.SYSTEM_ATTRS is storage.SYSTEM_ATTRS and study.is_branch is records.is_branch
    assert study.make_pruner is samplers.make_pruner and study.make_sampler is samplers.make_sampler


# --------------------------------------------------------------------------- nothing left RUNNING, nothing silent


class _Broken(Jobs):
    """A launcher that raises for ``max_steps=20`` before any job runs (as a launcher plugin can)."""

    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        if "schedule.max_steps=20" in job_overrides[0]:
            self.calls.append({})
            raise RuntimeError("launcher broke")
        return super().launch(job_overrides, initial_job_idx)


def test_a_launcher_that_raises_fails_its_trial_and_the_sweep_goes_on(tmp_path):
    s = _settings(tmp_path)
    sw = _grid(s, "schedule.max_steps", [10, 20, 30])
    jobs = _Broken(lambda p: 0.5)
    queue = Queue(s, Command([sw]))
    loop.run(s, queue, jobs, app_config=None)
    assert _states(sw.study, "schedule.max_steps") == {10: State.COMPLETE, 20: State.FAIL, 30: State.COMPLETE}
    assert records.error_of(sw.study.trials[1]) == "ValueError: the job could not start: launcher broke"


def test_a_job_that_calls_sys_exit_fails_its_trial_and_the_sweep_goes_on(tmp_path):
    def job(p: dict) -> float:
        if p["schedule.max_steps"] == "10":
            raise SystemExit(3)  # Hydra's launcher lets a SystemExit through
        return 0.5

    class Exits(Jobs):
        def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
            self.calls.append(dict(o.split("=", 1) for o in job_overrides[0]))
            return [JobReturn(status=JobStatus.COMPLETED, _return_value=self.job(self.calls[-1]))]

    s = _settings(tmp_path)
    sw = _grid(s, "schedule.max_steps", [10, 20])
    loop.run(s, Queue(s, Command([sw])), Exits(job), app_config=None)
    assert _states(sw.study, "schedule.max_steps") == {10: State.FAIL, 20: State.COMPLETE}
    assert records.error_of(sw.study.trials[0]) == "SystemExit: 3"


def test_a_trial_taken_over_while_its_worker_was_stopped_is_left_to_the_other_worker(tmp_path, caplog):
    s = _settings(tmp_path, heartbeat_interval=60, max_retry=2)
    sw = _grid(s, "schedule.max_steps", [10, 20])
    other = Queue(_settings(tmp_path, sweep_id="sweep-0", heartbeat_interval=60, max_retry=2), Command([sw]))

    def job(p: dict) -> float:
        if p["schedule.max_steps"] == "10":  # stopped for longer than the grace period: another worker takes over
            fail_and_requeue(sw.study, records.trial_by_number(sw.study, int(p["study.trial_number"])),
                             "its heartbeat went stale")
            assert other.claim(sw) is not None  # the retry, now RUNNING on the other worker
        return 0.5

    jobs = Jobs(job)
    loop.run(s, Queue(s, Command([sw])), jobs, app_config=None)  # no UpdateFinishedTrialError
    first, retry = sw.study.trials[:2]
    assert first.state == State.FAIL and records.error_of(first) == "its heartbeat went stale"  # left as it was
    assert retry.state == State.RUNNING and retry.system_attrs[records.SWEEP_ID] == "sweep-0" and retry.value is None
    assert jobs.ran("schedule.max_steps") == ["10", "20"]  # then this worker went on
    lines = [r.getMessage() for r in caplog.records if "another worker while this one was stopped" in r.getMessage()]
    assert lines == ["trial 0 was recorded FAIL by another worker while this one was stopped (its heartbeat went "
                     "stale; its retry runs there); this worker's run of it is not recorded"]
    summary.fail_if_nothing_completed(Command([sw]), s.sweep_id)  # trial 2 completed here: exit code 0


def test_a_worker_stopped_mid_trial_leaves_work_that_the_command_names(tmp_path):
    s = _settings(tmp_path)
    sw = _grid(s, "schedule.max_steps", [10, 20])
    _run(s, [sw], lambda p: 0.5)
    summary.fail_if_work_left(Command([sw]), s.sweep_id)  # all done: nothing said

    stopped = _settings(tmp_path / "stopped")
    sw = _grid(stopped, "schedule.max_steps", [10])
    trial = Queue(stopped, Command([sw])).claim(sw)
    tell.interrupted(sw.study, trial, "stopped by SIGTERM")  # on a worker without heartbeats: no retry queued
    with pytest.raises(InputError) as e:
        summary.fail_if_work_left(Command([sw]), stopped.sweep_id)
    assert str(e.value) == ("this command's workers ended with trials of study 's' not run: trial 0 was stopped by "
                            "SIGTERM and has no retry; re-run the same command to run them")
    sw.study.enqueue_trial({"schedule.max_steps": 10})
    with pytest.raises(InputError, match="trial 1 is queued; re-run the same command"):
        summary.fail_if_work_left(Command([sw]), "another sweep")


def test_a_queued_retry_is_said_to_resume_only_from_a_checkpoint_that_exists(tmp_path):
    """The line after a stop names where the retry starts: the newest whole checkpoint, or over again when
    the run saved none (or only a cut-short one)."""
    study = optuna.create_study(study_name="q", storage=f"sqlite:///{tmp_path}/q.db")
    trial = study.ask()
    tid = trial._trial_id
    assert tell.queued_text(study, tid) == " and queued to run again (it saved no checkpoint to resume from)"
    run_dir = tmp_path / "trial_0"
    (run_dir / "checkpoint-5").mkdir(parents=True)  # a save cut short: no weights, no state
    trial.set_user_attr("run_dir", str(run_dir))
    assert "queued to run again" in tell.queued_text(study, tid)
