"""The joint (learning rate, steps) search: ``schedule=wsd_search`` with ``schedule.wsd.learning_rates``.

(a) the halving rule (:func:`sweeper.halving.decide`) on crafted branch values, in every arrival order;
(b) a real multirun: one trunk trial per rate, the losers PRUNED with the reason, branches as trials with
    their rate, the report's winner and cost; several workers; a sweep over ``lr.learning_rate``;
(c) kill -9 in the middle: the re-run resumes each trunk from its checkpoint and runs no branch twice;
(d) config errors as one line naming the key; (e) the same search without a study, in one process.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import optuna
import pytest

from sweeper.config import validate
from sweeper.halving import Trunk, decide, keep
from sweeper.report import attrs, study_report
from sweeper.storage import is_branch

from .conftest import load_study, run_cli
from .helpers import Hold, fast, run_in_process

TrialState = optuna.trial.TrialState
RATES = [1e-3, 3e-3, 1e-2]
# tiny model, 64 rows: candidates 8/16/24 branch at 6/12/18 (decay_fraction 0.25); an evaluation every 2 steps
JOINT = ["schedule=wsd_search", "schedule.wsd.candidates=[8,16,24]", "schedule.wsd.decay_fraction=0.25",
         "schedule.wsd.stop_after_worse=null", "lr.warmup_steps=2", "schedule.wsd.learning_rates=[1e-3,3e-3,1e-2]",
         "data.max_train_rows=64", "data.max_eval_rows=16", "eval.eval_steps=2", "eval.logging_steps=1",
         "eval.accuracy=off", *fast("schedule.max_steps", "eval.")]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# --------------------------------------------------------------------------- (a) the rule


def _sync_survivors(values: dict[float, list[float]], eta: int) -> dict[float, int]:
    """Synchronous successive halving written out: every rate's rung count (how many rungs it reached)."""
    alive, reached = list(values), {r: 0 for r in values}
    for k in range(len(next(iter(values.values())))):
        for r in alive:
            reached[r] = k + 1
        ranked = sorted(alive, key=lambda r: (values[r][k], r))
        alive = ranked[:max(1, -(-len(alive) // eta))]
    return reached


def _async_run(values: dict[float, list[float]], eta: int, order: list[float]) -> dict[float, int]:
    """Trunks taking turns in ``order`` (cycled): a trunk records its next rung when the rule lets it past
    its last one, ends when the rule stops it (or at the last rung), and waits its next turn while the
    rule is pending. Returns each rate's rung count."""
    n = len(next(iter(values.values())))
    got: dict[float, dict[int, float]] = {r: {} for r in values}
    ended: set[float] = set()
    moved = True
    while moved:
        moved = False
        for r in order:
            k = len(got[r])
            if r in ended:
                continue
            verdict = "continue" if k == 0 else _verdict(r, k - 1, got, ended, eta)
            if verdict == "continue" and k < n:
                got[r][k] = values[r][k]
                moved = True
            elif verdict == "stop" or verdict == "continue":
                ended.add(r)
                moved = True
    return {r: len(v) for r, v in got.items()}


def _verdict(r: float, k: int, got: dict, ended: set, eta: int) -> str:
    trunks = [Trunk(x, dict(v), live=x not in ended) for x, v in got.items()]
    return decide(r, k, trunks, eta, maximize=False).verdict


@pytest.mark.parametrize("eta", [2, 3])
def test_any_arrival_order_gives_synchronous_successive_halving(eta):
    values = {1e-4: [3.0, 2.5, 2.2], 2e-4: [2.9, 2.4, 2.0], 3e-4: [2.8, 2.6, 2.1], 4e-4: [3.5, 3.0, 2.9],
              5e-4: [3.1, 2.3, 1.9]}
    want = _sync_survivors(values, eta)
    # by hand: eta=3 keeps 2 of 5 (3e-4, 2e-4), then 1 of 2 (2e-4); eta=2 keeps 3 (3e-4, 2e-4, 1e-4), then 2
    assert want == ({1e-4: 1, 2e-4: 3, 3e-4: 2, 4e-4: 1, 5e-4: 1} if eta == 3 else
                    {1e-4: 3, 2e-4: 3, 3e-4: 2, 4e-4: 1, 5e-4: 1})
    for order in itertools.permutations(values):
        assert _async_run(values, eta, list(order)) == want, order


def test_stop_only_when_provably_out_and_continue_only_when_provably_in():
    t = [Trunk(1.0, {8: 2.0}), Trunk(2.0, {8: 1.0}), Trunk(3.0, {})]
    # 3 rates, eta=3: one goes on. lr=1 is beaten by lr=2 already: out, whatever lr=3 does
    d = decide(1.0, 8, t, eta=3, maximize=False)
    assert d.verdict == "stop" and "ranks 2 of 3" in d.reason and "best: lr=2" in d.reason
    # lr=2 leads, but lr=3 may still beat it: pending, and lr=3 is not training (park, not wait)
    d = decide(2.0, 8, t, eta=3, maximize=False)
    assert (d.verdict, d.waiting_for, d.running) == ("pending", (3.0,), False)
    running = [t[0], t[1], Trunk(3.0, {}, running=True)]
    assert decide(2.0, 8, running, eta=3, maximize=False).running is True  # wait for it instead
    # lr=3 stopped before this rung (dead): lr=2 is in
    assert decide(2.0, 8, [t[0], t[1], Trunk(3.0, {}, live=False)], eta=3, maximize=False).verdict == "continue"
    # maximize: the larger value ranks first
    assert decide(1.0, 8, [t[0], t[1], Trunk(3.0, {}, live=False)], eta=3, maximize=True).verdict == "continue"
    # a tie ranks the smaller learning rate first
    tie = [Trunk(1.0, {8: 1.0}), Trunk(2.0, {8: 1.0})]
    assert [decide(r, 8, tie, eta=2, maximize=False).verdict for r in (1.0, 2.0)] == ["continue", "stop"]
    assert decide(1.0, 8, t, eta=3, maximize=False, rule="none").verdict == "continue"
    assert [keep(n, 3) for n in (1, 2, 3, 4, 9, 10)] == [1, 1, 1, 2, 3, 4]


# --------------------------------------------------------------------------- (b) a real multirun


def _joint_study(url: str, name: str = "demo-tiny"):
    study = load_study(url, name)
    trials = study.get_trials(deepcopy=False)
    trunks = [t for t in trials if not is_branch(t) and t.state != TrialState.FAIL]
    branches = [t for t in trials if is_branch(t)]
    return study, trunks, branches


def _check_records(url: str, name: str = "demo-tiny") -> dict:
    """What every finished joint search must hold, whatever the branch values: one trunk per rate; at the
    8-step rung the best rate goes on (3 rates, eta=3) and the two others are PRUNED there with the reason;
    each branch recorded once as a COMPLETE trial with its rate; the report names the winner and the cost."""
    study, trunks, branches = _joint_study(url, name)
    by_lr = {t.params["lr.learning_rate"]: t for t in trunks}
    assert sorted(by_lr) == RATES
    at8 = {b.params["lr.learning_rate"]: b.value for b in branches if b.params["max_steps"] == 8}
    assert sorted(at8) == RATES  # every rate branched at the first rung, once
    winner = min(at8, key=at8.get)
    for r, t in by_lr.items():
        if r == winner:
            assert t.state == TrialState.COMPLETE and t.params["max_steps"] == 24
        else:
            assert t.state == TrialState.PRUNED
            reason = t.user_attrs["stopped_reason"]
            # its rank when it was stopped: 2 of 3, or 3 of 3 when the other two had branched there before it
            assert "8-step rung by successive halving (eta=3)" in reason and re.search(r"ranks [23] of 3", reason)
            assert attrs(t)["wsd_optimizer_steps"] == 8  # trunk to 6 + its 2-step cooldown, nothing more
    mine = sorted(b.params["max_steps"] for b in branches if b.params["lr.learning_rate"] == winner)
    assert mine == [8, 16]  # 24 is the trunk itself
    assert all(b.state == TrialState.COMPLETE and b.user_attrs["learning_rate"] == b.params["lr.learning_rate"]
               for b in branches)
    spent = sum(attrs(t)["wsd_optimizer_steps"] for t in trunks)
    assert spent == 8 + 8 + (24 + 2 + 4)
    report = study_report(study)
    best = min([(b.value, b.params["lr.learning_rate"], b.params["max_steps"]) for b in branches]
               + [(by_lr[winner].value, winner, 24)])
    assert f"Recommended for demo: lr.learning_rate={best[1]:g}, max_steps={best[2]}." in report
    assert f"Best: lr={best[1]:g}, max_steps={best[2]} " in report
    assert f"Cost: {spent} optimizer steps" in report and f"{100 * spent / 144:.0f}% of the 144" in report
    assert report.count("stopped after its 8-step branch") == 2
    return {"winner": winner, "trunks": by_lr, "branches": branches}


@pytest.fixture(scope="module")
def joint_sweep(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("joint")
    url = f"sqlite:///{tmp}/optuna.db"
    proc = _ok(run_in_process("-m", *JOINT, f"paths.output_dir={tmp}", f"paths.cache_dir={cache_dir}",
                       f"hydra.sweeper.storage={url}", f"hydra.sweep.dir={tmp}/sweep"))
    return url, proc


@pytest.mark.slow
def test_one_worker_runs_every_trunk_and_halves_them(joint_sweep):
    url, proc = joint_sweep
    got = _check_records(url)
    # one worker: the first trunks park at the 8-step rung until the last rate has branched there
    assert (proc.stdout + proc.stderr).count("parked at the 8-step rung") >= 1
    trunk = got["trunks"][got["winner"]]
    state = json.loads((Path(attrs(trunk)["run_dir"]) / "wsd_branches.json").read_text())
    steps = [(x["from"], x["to"]) for x in state["trunk_segments"]]
    assert steps[0] == (0, 6) and steps[-1][1] == 24 and sum(b - a for a, b in steps) == 24  # no step twice


@pytest.mark.slow
def test_three_workers_train_the_trunks_at_once(tmp_path, cache_dir, storage):
    url, name = storage
    # the first trunk waits at step 1 until a second worker's trunk has started too, however late the workers start
    _ok(run_cli("-m", *JOINT, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}", f"hydra.sweep.dir={tmp_path}/sweep",
                "hydra.sweeper.workers=3", env=Hold(tmp_path / "hold", 1, until=2).env))
    got = _check_records(url, name)
    workers = {t.system_attrs["worker_process"] for t in got["trunks"].values()}
    assert len(workers) >= 2  # the trunks were spread over the workers


@pytest.mark.slow
def test_a_sweep_over_the_learning_rate_is_a_joint_search(tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path}/optuna.db"
    args = [a for a in JOINT if not a.startswith("schedule.wsd.learning_rates")]
    _ok(run_in_process("-m", *args, "lr.learning_rate=1e-3,3e-3,1e-2", f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={cache_dir}", f"hydra.sweeper.storage={url}", f"hydra.sweep.dir={tmp_path}/sweep"))
    _check_records(url)


# --------------------------------------------------------------------------- (c) kill -9 and resume


@pytest.mark.slow
def test_killed_joint_search_resumes_each_trunk_and_runs_no_branch_twice(tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path}/optuna.db"
    args = ["-m", *JOINT, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
            f"hydra.sweeper.storage={url}", f"hydra.sweep.dir={tmp_path}/sweep",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    # one worker: every trunk trains to 6 and branches at 8; the winner alone trains on, 6 -> 12, and is
    # killed at step 10; a loser is PRUNED once the rule has stopped it, or still waits parked
    killed = run_cli(*args, env={"SFT_SWEEP_INJECT_KILL_AT_STEP": "10"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    study, trunks, branches = _joint_study(url)
    states = sorted(t.state.name for t in trunks)
    assert states.count("RUNNING") == 1 and set(states) - {"RUNNING"} <= {"PRUNED", "WAITING"} and len(states) == 3
    assert sorted(b.params["max_steps"] for b in branches) == [8, 8, 8]
    time.sleep(4)  # past the grace period

    _ok(run_cli(*args))  # the same command again
    got = _check_records(url)
    trunk = got["trunks"][got["winner"]]
    a = attrs(trunk)
    assert trunk.system_attrs["failed_trial"] is not None  # the retry of the killed trunk
    assert Path(a["resumed_from_checkpoint"]).name == "checkpoint-6"  # went on from its checkpoint
    assert a["wsd_optimizer_steps"] == 24 + 2 + 4  # each step once
    assert len(got["branches"]) == 4  # 3 at 8 steps + the winner's 16: none twice


# --------------------------------------------------------------------------- (d) config errors


@pytest.mark.parametrize("override, message", [
    ("schedule.wsd.learning_rates=[]", "schedule.wsd.learning_rates must be null or a non-empty list of positive"),
    ("schedule.wsd.learning_rates=[1e-4,2e-4,1e-4]", "schedule.wsd.learning_rates must not repeat a rate"),
    ("schedule.wsd.learning_rates=[1e-4,0]", "schedule.wsd.learning_rates must be null or a non-empty list of positive"),
    ("schedule.wsd.learning_rates=[1e-4,-2e-4]", "schedule.wsd.learning_rates must be null or a non-empty list"),
    ("schedule.wsd.halving.eta=1", "schedule.wsd.halving.eta must be an integer >= 2"),
    ("schedule.wsd.halving.rule=hyperband", "schedule.wsd.halving.rule must be one of ['successive_halving', 'none']"),
])
def test_joint_config_errors_name_the_key(compose_cfg, override, message):
    cfg = compose_cfg(*JOINT, override)
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("schedule.wsd.learning_rates=[1e-4,1e-4]", "schedule.wsd.learning_rates must not repeat a rate"),
    ("lr.learning_rate=1e-3,1e-2", "lr.learning_rate must not be swept as well"),
])
def test_a_bad_joint_sweep_is_one_line_and_no_trial(tmp_path, cache_dir, override, message):
    url = f"sqlite:///{tmp_path}/optuna.db"
    proc = run_in_process("-m", *JOINT, override, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                          f"hydra.sweeper.storage={url}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "optuna.db").exists()  # no study, no trial


# --------------------------------------------------------------------------- (e) without a study


@pytest.mark.slow
def test_without_a_study_every_trunk_runs_in_one_process(tmp_path, cache_dir):
    proc = _ok(run_in_process(*JOINT, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                       f"hydra.run.dir={tmp_path}/run"))
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| 0.0")]
    assert len(rows) == 3 and sum("ran every length" in r for r in rows) == 1
    assert sum("stopped after its 8-step branch" in r for r in rows) == 2
    best = next(line for line in lines if line.startswith("Best: lr="))
    assert "Cost: 46 optimizer steps" in best and "32% of the 144" in best
    assert sorted(p.name for p in (tmp_path / "run").glob("lr-*")) == ["lr-0.001", "lr-0.003", "lr-0.01"]


# --------------------------------------------------------------------------- the sweeper's side


def test_status_names_a_parked_trunk_and_hyperband_takes_its_settings():
    from omegaconf import OmegaConf

    from sweeper.status_command import study_status
    from sweeper.study import make_pruner

    study = optuna.create_study(study_name="s")
    rec = {"group": "g", "lr": 1e-4, "learning_rates": RATES, "rule": "successive_halving", "eta": 3,
           "maximize": False, "metric": "eval_loss", "parked_at": 500, "rungs": {"500": 1.0}}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"wsd_trunk": rec}))
    assert "parked at its 500-step branch" in study_status(study)

    cfg = OmegaConf.create({"name": "hyperband", "min_resource": 100, "max_resource": 3000, "reduction_factor": 2})
    pruner = make_pruner(cfg)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (100, 3000, 2)
    with pytest.raises(ValueError, match="hydra.sweeper.pruner.max_resource must be auto or a whole number"):
        make_pruner(OmegaConf.create({"name": "hyperband", "min_resource": 100, "max_resource": 50}))


def test_the_study_view_of_the_trunks():
    """``study.trunk_table`` from crafted trials: a failed trunk is dead unless retried, a trunk parked where
    the rule stops it is dead, one claimed before its job recorded anything counts (from its config), and a
    rate nobody will start is live until abandoned."""
    from sweeper.identity import joint_group
    from sweeper.trunks import trunk_table

    config = {"schedule.wsd.learning_rates": RATES, "data.name": "x"}
    group = joint_group(config)

    def rec(lr, rungs, parked=None):
        return {"group": group, "lr": lr, "learning_rates": RATES, "rule": "successive_halving", "eta": 3,
                "maximize": False, "metric": "eval_loss", "parked_at": parked, "rungs": rungs}

    def trial(n, state, **system):
        t = optuna.trial.create_trial(state=state, system_attrs=system)
        t.number = n
        return t

    me = rec(1e-3, {"8": 1.0})
    failed = trial(0, TrialState.FAIL, wsd_trunk=rec(3e-3, {"8": 0.5}))
    t = {x.lr: x for x in trunk_table([failed], me)}
    assert t[3e-3].live is False and t[3e-3].values == {8: 0.5}  # failed, no retry: the rule goes on without it
    assert t[1e-2].live is True and t[1e-2].values == {} and t[1e-2].running is False  # not started yet
    assert trunk_table([failed], me, abandoned=[1e-2])[2].live is False
    retry = trial(1, TrialState.WAITING, wsd_trunk=rec(3e-3, {"8": 0.5}), failed_trial=0)
    assert {x.lr: x for x in trunk_table([failed, retry], me)}[3e-3].live is True
    claimed = trial(2, TrialState.RUNNING, config={**config, "lr.learning_rate": 1e-2})
    t = {x.lr: x for x in trunk_table([failed, claimed], me)}
    assert t[1e-2].running is True and t[1e-2].live is True
    assert {x.lr: x for x in trunk_table([failed, claimed], me, running=lambda _: False)}[1e-2].running is False
    # parked at 8 with 2.0, beaten there by lr=1e-3 (1.0): out whatever lr=1e-2 does, so not live
    parked = trial(3, TrialState.WAITING, wsd_trunk=rec(3e-3, {"8": 2.0}, parked=8))
    assert {x.lr: x for x in trunk_table([parked], me)}[3e-3].live is False
    ahead = trial(3, TrialState.WAITING, wsd_trunk=rec(3e-3, {"8": 0.5}, parked=8))
    assert {x.lr: x for x in trunk_table([ahead], me)}[3e-3].live is True  # leads: may go on
