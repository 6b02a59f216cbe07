"""schedule=wsd_search: one warmup-stable-decay trunk with a cooldown branch per candidate length.

Real tiny-model training on CPU: the branches become trials of the study, the LR of every logged step
follows each branch's own WSD schedule, a stalled search stops its trunk, a killed trunk resumes.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from sweeper.config import validate
from sweeper.report import attrs
from sweeper.reporter import NullReporter
from sweeper.wsd import STATE_FILE, cooldown_best, search, should_stop_trunk

from .conftest import run_cli
from .helpers import fast
from .helpers.cli import run_in_process
from .helpers.shared import once

TrialState = optuna.trial.TrialState
LR, WARMUP, FRACTION = 1e-3, 2, 0.25  # lr=tiny; p_s = s - round(0.25 s): 8 -> 6, 16 -> 12, 24 -> 18
POINTS = {8: 6, 16: 12, 24: 18}
WSD = ["schedule=wsd_search", "schedule.wsd.candidates=[8,16,24]", f"schedule.wsd.decay_fraction={FRACTION}",
       "schedule.wsd.stop_after_worse=null", "schedule.wsd.no_win_patience=null", f"lr.warmup_steps={WARMUP}",
       *fast("schedule.max_steps"), "eval.logging_steps=1"]  # FAST without schedule.max_steps: the search sets it


def _paths(tmp_path, cache_dir):
    return [f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _expected_lr(step: int, s: int) -> float:
    """The LR logged at global step ``step`` of the WSD run of length ``s``: the LR that step used,
    lr * factor(step - 1) (transformers logs it before the scheduler steps). Written out here, not
    imported, so that a wrong formula in sweeper.wsd cannot agree with itself."""
    k, p = step - 1, POINTS[s]
    if k < WARMUP:
        return LR * k / WARMUP
    if k < p:
        return LR
    return LR * (1.0 - math.sqrt((k - p) / (s - p)))


# --------------------------------------------------------------------------- (a), (b): one real multirun


@pytest.fixture(scope="module")
def wsd_sweep(tmp_path_factory, cache_dir):
    """The WSD search's multirun, run once for the whole run (``helpers.shared.once``): (what the command
    printed, its study), both read-only here."""

    def sweep(tmp):
        proc = _ok(run_in_process("-m", *WSD, *_paths(tmp, cache_dir), f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
                                  f"hydra.sweep.dir={tmp}/sweep"))
        return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    tmp, proc = once(tmp_path_factory, "wsd_sweep", sweep)
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp}/optuna.db")
    return subprocess.CompletedProcess(**proc), study


@pytest.mark.slow
def test_each_candidate_is_a_complete_trial_of_the_study(wsd_sweep):
    proc, study = wsd_sweep
    trials = study.trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    by_steps = {t.params["max_steps"]: t for t in trials}
    assert sorted(by_steps) == [8, 16, 24] and {t.params["method"] for t in trials} == {"wsd"}
    trunk = by_steps[24]
    assert trunk.number == 0 and "wsd_branch_of" not in trunk.system_attrs  # the sweeper's own trial: the longest
    assert trunk.user_attrs["choices"]["schedule"] == "wsd_search"
    assert sorted(trunk.intermediate_values) == [4, 8, 12, 16, 20, 24]
    for s in (8, 16):
        t = by_steps[s]
        a = attrs(t)  # user attrs, and the sft_config/plan kept as system attrs
        assert a["method"] == "wsd" and a["branch_of"] == trunk.number and a["max_steps"] == s
        assert a["optimizer_steps"] == s - POINTS[s] and a["steps_trained"] == s
        assert a["sft_config"]["lr_scheduler_type"] == "warmup_stable_decay"
        assert a["sft_config"]["lr_scheduler_kwargs"] == {"num_decay_steps": s - POINTS[s], "decay_type": "1-sqrt"}
        assert a["tokens_seen"] > 0 and a["train_runtime_s"] >= 0 and "plan" in a and a["run_dir"].endswith(f"branch-{s}")
        iv = t.intermediate_values
        assert sorted(iv) == list(range(4, s + 1, 4))  # trunk evaluations up to p_s, then the cooldown's
        assert "curve" not in a and t.system_attrs["train_curve"]  # curves kept off the dashboard's attr table
        # the trunk part is the trunk's own curve, value for value
        assert {k: v for k, v in iv.items() if k <= POINTS[s]} == \
            {k: v for k, v in trunk.intermediate_values.items() if k <= POINTS[s]}
        assert iv[s] != trunk.intermediate_values[s]  # after p_s it is a different run (cooled down)
    for t in trials:  # best over its cooldown: the evaluations after its branch point, the end included
        s = t.params["max_steps"]
        cooldown = {k: v for k, v in t.intermediate_values.items() if k > POINTS[s]}
        assert s in cooldown and t.value == min(cooldown.values())
        assert t.user_attrs["best_step"] > POINTS[s] and t.user_attrs["best_value"] == t.value
    a = attrs(trunk)
    assert a["method"] == "wsd" and a["max_steps"] == 24
    assert a["wsd_optimizer_steps"] == 24 + 2 + 4  # trunk + cooldowns, vs 48 for the cosine grid
    assert [b["max_steps"] for b in a["branches"]] == [8, 16, 24]
    assert [b["trial"] for b in a["branches"]] == [by_steps[8].number, by_steps[16].number, trunk.number]
    assert a["sft_config"]["lr_scheduler_kwargs"] == {"num_decay_steps": 6, "decay_type": "1-sqrt"}
    constant = {k: v for k, v in trunk.intermediate_values.items() if k <= POINTS[24]}  # before its own cooldown
    best = min(constant, key=constant.get)
    assert (a["trunk_best"]["step"], a["trunk_best"]["value"]) == (best, constant[best])
    # the report puts the method beside each trial and recommends one of them
    assert "| method |" in proc.stdout and proc.stdout.count("| wsd |") == 3
    assert "**Recommended for demo: max_steps=" in proc.stdout
    assert "lr.lr_scheduler_type=cosine`): how close cosine comes to WSD" in proc.stdout  # how to confirm it


@pytest.mark.slow
def test_the_lr_of_every_step_follows_each_branch_schedule(wsd_sweep):
    _, study = wsd_sweep
    for t in study.trials:
        s = t.params["max_steps"]
        run_dir = Path(t.user_attrs["run_dir"])
        history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        lrs = {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}
        assert sorted(lrs) == list(range(1, s + 1))  # every step, the trunk's part included
        for step, lr in lrs.items():
            assert lr == pytest.approx(_expected_lr(step, s), rel=1e-6, abs=1e-12), (s, step)
        assert lrs[POINTS[s] + 1] == pytest.approx(LR) and lrs[s] < 0.5 * LR  # cooled down by the end


# --------------------------------------------------------------------------- (c): stopping the trunk


@pytest.mark.parametrize("curve, point, maximize, expected", [
    ([[4, 0.5], [8, 0.9], [12, 0.8], [16, 0.7]], 12, False, (0.7, 16)),  # the trunk's 0.5 at 4 is not the branch's
    ([[4, 0.5], [8, 0.9], [12, 0.8], [16, 0.7]], 4, False, (0.7, 16)),
    ([[4, 0.9], [8, 0.6], [12, 0.6], [16, 0.7]], 6, False, (0.6, 8)),   # mid-cooldown best; the first of equals
    ([[4, 0.9], [8, 0.2], [12, 0.6]], 8, True, (0.6, 12)),              # eval_accuracy: the highest
])
def test_a_branch_value_is_the_best_of_its_cooldown(curve, point, maximize, expected):
    assert cooldown_best(curve, point, maximize) == expected


def test_a_branch_without_an_evaluation_after_its_branch_point_is_an_error():
    with pytest.raises(RuntimeError, match="no evaluation after the branch point 16"):
        cooldown_best([[4, 0.5], [16, 0.4]], 16)


@pytest.mark.parametrize("values, after, stop", [
    ([1.0], 1, False),                   # one branch: nothing to compare
    ([1.0, 2.0], 1, True),               # worse than the best
    ([1.0, 2.0], 2, False),              # one worse, two needed
    ([1.0, 2.0, 3.0], 2, True),
    ([2.0, 1.0, 3.0], 2, False),         # the best is among the last two
    ([1.0, 3.0, 0.5, 0.7], 2, False),
    ([1.0, 1.0, 1.0], 2, False),         # equal is not worse
    ([1.0, 2.0, 3.0], None, False),      # null: never stop
])
def test_trunk_stop_rule(values, after, stop):
    assert should_stop_trunk(values, after) is stop


def test_trunk_stop_rule_maximize():
    assert should_stop_trunk([0.9, 0.8], 1, maximize=True) and not should_stop_trunk([0.8, 0.9], 1, maximize=True)


class _Pruned(Exception):
    pass


class _Reporter(NullReporter):
    """The job side of a trial, in memory: records branches, stops by raising."""

    number = 0

    def __init__(self):
        self.reports, self.attrs, self.branches = [], {}, {}

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return False

    def set_attrs(self, attrs):
        self.attrs.update(attrs)

    def resume_checkpoint(self):
        return None

    def record_branch(self, *, key, max_steps, low, high, value, curve, user_attrs):
        self.branches[max_steps] = value
        return 100 + max_steps

    def stop(self, reason):
        self.attrs["stopped_reason"] = reason
        raise _Pruned(reason)


@pytest.mark.slow
def test_trunk_stops_when_a_longer_branch_is_worse(compose_cfg, tmp_path, monkeypatch):
    import sweeper.wsd as wsd

    real = wsd._branch
    crafted = {8: 1.0, 16: 2.0}  # 16 worse than 8: with stop_after_worse=1 the trunk must not go on

    def branch(cfg, s, *args):
        out = real(cfg, s, *args)
        return {**out, "value": crafted[s]}

    monkeypatch.setattr(wsd, "_branch", branch)
    cfg = compose_cfg(*WSD, "schedule.wsd.candidates=[8,16,24,32]", "schedule.wsd.stop_after_worse=1")
    rep = _Reporter()
    with pytest.raises(_Pruned, match="trunk stopped before step 18"):
        search(cfg, rep, job_dir=tmp_path / "trunk")
    assert rep.branches == {8: 1.0, 16: 2.0}  # 24 and 32 never ran
    state = json.loads((tmp_path / "trunk" / STATE_FILE).read_text())
    assert state["branches"]["24"]["status"].startswith("not run: trunk stopped")
    assert state["branches"]["32"]["status"].startswith("not run: trunk stopped")
    assert max(s for s, _ in rep.reports) == 12  # the trunk trained to the last branch point, no further
    assert [p.name for p in (tmp_path / "trunk").glob("checkpoint-*")] == ["checkpoint-12"]
    assert rep.attrs["wsd_optimizer_steps"] == 12 + 2 + 4 and rep.attrs["stopped_reason"]


def test_trunk_stops_mid_segment_once_no_later_branch_can_win(compose_cfg, tmp_path, monkeypatch):
    """The no-win rule inside a real trunk segment: the trunk stops at an evaluation between branch points,
    records why (``stopped_reason`` and the rule's facts in ``trunk_stop``) and runs no later branch."""
    import sweeper.trunk_stop as trunk_stop
    import sweeper.wsd as wsd

    real = wsd._branch
    monkeypatch.setattr(wsd, "_branch", lambda cfg, s, *args: {**real(cfg, s, *args), "value": 0.0})
    monkeypatch.setattr(trunk_stop, "gain", lambda *a, **k: 0.0)  # no cooldown gain: the trunk is far above 0.0
    cfg = compose_cfg(*WSD, "schedule.wsd.no_win_patience=1")
    rep = _Reporter()
    with pytest.raises(_Pruned, match="trunk stopped at step 8: no later branch can win"):
        search(cfg, rep, job_dir=tmp_path / "trunk")
    assert rep.branches == {8: 0.0}  # 16 and 24 never ran
    assert max(s for s, _ in rep.reports) == 8  # the first trunk evaluation after the branch point 6
    state = json.loads((tmp_path / "trunk" / STATE_FILE).read_text())
    assert [(x["from"], x["to"]) for x in state["trunk_segments"]] == [(0, 6), (6, 8)]
    assert state["branches"]["16"]["status"].startswith("not run: trunk stopped at step 8")
    assert rep.attrs["wsd_optimizer_steps"] == 8 + 2 and rep.attrs["stopped_reason"].startswith("trunk stopped at")
    stop = rep.attrs["trunk_stop"]
    assert stop["rule"] == "no_win" and stop["step"] == 8 and stop["best_steps"] == 8 and stop["patience"] == 1
    # a stopped trunk's own states are recorded too: its best evaluation up to its stop
    step, value = min(rep.reports, key=lambda r: r[1])
    assert rep.attrs["trunk_best"] == {"step": step, "value": value, "warmup_steps": WARMUP,
                                       "lr_scheduler_type": "constant_with_warmup"}
    assert state["trunk_curve"] == [list(r) for r in rep.reports]


@pytest.mark.slow
def test_each_trunk_of_a_joint_search_stops_once_no_later_branch_can_win(compose_cfg, tmp_path, monkeypatch, capsys):
    """The same crafted set-up with two learning rates and no study (``run_joint``: both trunks in this process,
    every rate past every rung): each rate's trunk stops at the same evaluation as the single-rate search, with
    the same ``stopped_reason`` and ``trunk_stop`` record, and runs no later branch."""
    import sweeper.halving as halving
    import sweeper.trunk_stop as trunk_stop
    import sweeper.wsd as wsd

    rates = [1e-3, 3e-3]
    real, ran = wsd._branch, []

    def branch(spec, s, *args):
        ran.append((spec.learning_rate, s))
        return {**real(spec, s, *args), "value": 0.0}

    real_table, records = halving.joint_table, {}

    def joint_table(trunks, *args):
        records.update(trunks)
        return real_table(trunks, *args)

    monkeypatch.setattr(wsd, "_branch", branch)
    monkeypatch.setattr(trunk_stop, "gain", lambda *a, **k: 0.0)  # no cooldown gain: each trunk is far above 0.0
    monkeypatch.setattr(halving, "joint_table", joint_table)
    cfg = compose_cfg(*WSD, "schedule.wsd.no_win_patience=1", "schedule.wsd.learning_rates=[1e-3,3e-3]",
                      "schedule.wsd.halving.rule=none")  # halving stops no trunk: each goes on to the no-win rule
    assert search(cfg, job_dir=tmp_path / "joint") == 0.0  # run_joint: no study
    assert ran == [(r, 8) for r in rates]  # each trunk's 8-step branch, no later one
    assert sorted(records) == rates
    for r in rates:
        run_dir = tmp_path / "joint" / f"lr-{r:g}"
        state = json.loads((run_dir / STATE_FILE).read_text())
        assert [(x["from"], x["to"]) for x in state["trunk_segments"]] == [(0, 6), (6, 8)], r
        assert max(s for s, _ in state["trunk_curve"]) == 8  # the first trunk evaluation after the branch point 6
        for s in (16, 24):
            assert state["branches"][str(s)]["status"].startswith("not run: trunk stopped at step 8"), (r, s)
            assert not (run_dir / f"branch-{s}").exists()
        a = records[r]
        assert a["stopped_reason"].startswith("trunk stopped at step 8: no later branch can win"), r
        assert a["wsd_optimizer_steps"] == 8 + 2 and a["wsd_trunk"]["rungs"] == {"8": 0.0}
        stop = a["trunk_stop"]
        assert stop == state["trunk_stop"]
        assert stop["rule"] == "no_win" and stop["step"] == 8 and stop["best_steps"] == 8 and stop["patience"] == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.00")]
    assert len(rows) == 2 and all("stopped after its 8-step branch" in row for row in rows)


def test_the_trunks_best_state_is_the_constant_lr_run_of_that_length(compose_cfg, tmp_path):
    """What the report tells the user to run for the trunk's best state (``trunk_best``): a plain run of that
    many steps at constant LR after the search's warmup reaches the same eval loss; the trunk was saved and
    resumed at the branch point 6 on its way."""
    from sweeper import trial

    rep = _Reporter()
    search(compose_cfg(*WSD, "schedule.wsd.candidates=[8,16]"), rep, job_dir=tmp_path / "trunk")
    tb = rep.attrs["trunk_best"]
    before_cooldown = [(s, v) for s, v in rep.reports if s <= 12]  # the 16-step trunk cools down from step 12
    assert (tb["step"], tb["value"]) == min(before_cooldown, key=lambda r: r[1])
    plain = _Reporter()
    trial.run(compose_cfg(*fast("schedule.max_steps"), "eval.logging_steps=1", f"schedule.max_steps={max(tb['step'], 8)}",
                          f"lr.lr_scheduler_type={tb['lr_scheduler_type']}", f"lr.warmup_steps={tb['warmup_steps']}"),
              plain)
    same = dict(plain.reports)
    assert [s for s, _ in before_cooldown if s <= max(tb["step"], 8)] == sorted(same)
    for s, v in before_cooldown:
        if s in same:
            assert same[s] == pytest.approx(v, rel=1e-4), (s, same[s], v)


# --------------------------------------------------------------------------- (d): a killed trunk resumes


@pytest.mark.slow
def test_killed_trunk_resumes_from_its_checkpoint_and_records_each_candidate_once(tmp_path, cache_dir):
    url = f"sqlite:///{tmp_path}/optuna.db"
    args = ["-m", *WSD, *_paths(tmp_path, cache_dir), f"hydra.sweeper.storage={url}",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    # kill -9 at trunk step 10: after branch 8 was recorded (cooldown 7..8), between checkpoints 6 and 12
    killed = run_cli(*args, env={"SFT_SWEEP_INJECT_KILL_AT_STEP": "10"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    study = optuna.load_study(study_name="demo-tiny", storage=url)
    assert [(t.state, t.params.get("max_steps")) for t in study.trials] == \
        [(TrialState.RUNNING, 24), (TrialState.COMPLETE, 8)]
    time.sleep(4)  # past the grace period

    _ok(run_cli(*args))  # the same command again
    trials = optuna.load_study(study_name="demo-tiny", storage=url).trials
    assert trials[0].state == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["max_steps"] for t in complete) == [8, 16, 24]  # each candidate exactly once
    assert len(trials) == 4
    trunk = next(t for t in complete if t.params["max_steps"] == 24)
    a = attrs(trunk)
    assert trunk.system_attrs["failed_trial"] == 0
    assert Path(a["resumed_from_checkpoint"]).name == "checkpoint-6"  # continued, not from step 0
    assert a["wsd_optimizer_steps"] == 24 + 2 + 4  # each step once: the trunk was not trained twice
    assert [b["trial"] for b in a["branches"]] == [1, trials[3].number, trunk.number]
    state = json.loads((Path(a["run_dir"]) / STATE_FILE).read_text())
    assert [(x["from"], x["to"]) for x in state["trunk_segments"]] == [(0, 6), (6, 12), (12, 24)]
    assert sorted(trunk.intermediate_values) == [4, 8, 12, 16, 20, 24]
    assert trunk.value == min(trunk.intermediate_values.values())


# --------------------------------------------------------------------------- (e): config errors


@pytest.mark.parametrize("override, message", [
    ("schedule.wsd.candidates=[8,0,16]", "schedule.wsd.candidates must be a non-empty list of positive integers"),
    ("schedule.wsd.candidates=[]", "schedule.wsd.candidates must be a non-empty list of positive integers"),
    ("schedule.wsd.candidates=[16,8,16]", "schedule.wsd.candidates must not repeat a step count, but got [16, 8, 16]"),
    ("schedule.wsd.decay_fraction=1.0", "schedule.wsd.decay_fraction must be between 0 and 1"),
    ("schedule.wsd.decay_fraction=0", "schedule.wsd.decay_fraction must be between 0 and 1"),
    ("schedule.wsd.decay_type=exp", "schedule.wsd.decay_type must be one of ['linear', 'cosine', '1-sqrt']"),
    ("schedule.wsd.stop_after_worse=0", "schedule.wsd.stop_after_worse must be >= 1 or null"),
    ("schedule.wsd.no_win_patience=0", "schedule.wsd.no_win_patience must be an integer >= 1"),
    ("schedule.wsd.gain_margin=-0.5", "schedule.wsd.gain_margin must be a number from 0 to 10"),
    ("lr.warmup_steps=6", "lr.warmup_steps (6 steps) must be shorter than the first WSD branch point (6"),
    ("schedule.wsd.candidates=[10,11]", "branch at steps 8 and 8"),
    ("schedule.max_steps=100", "schedule.max_steps and schedule.num_train_epochs must be null"),
])
def test_wsd_config_errors_name_the_key(compose_cfg, override, message):
    cfg = compose_cfg(*WSD, override)
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("more, got", [
    ([], "max_steps=12 (from +debug=fast), num_train_epochs=None"),  # the preset's value, not the user's
    (["schedule.max_steps=12"], "max_steps=12, num_train_epochs=None"),  # the user's own: said as it is
])
def test_a_length_a_preset_sets_for_a_wsd_search_is_named_with_its_preset(compose_cfg, more, got):
    cfg = compose_cfg("+debug=fast", "schedule=wsd_search", "schedule.wsd.candidates=[4,8,12]", *more)
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert str(e.value) == ("schedule.wsd searches the length itself, so schedule.max_steps and "
                            f"schedule.num_train_epochs must be null, but got {got}; set schedule.max_steps=null "
                            "and give the lengths in schedule.wsd.candidates=[...]")


def test_wsd_defaults_compose_and_validate(compose_cfg):
    cfg = compose_cfg("schedule=wsd_search")
    w = cfg.schedule.wsd
    assert list(w.candidates) == [500, 1500, 3000] and w.decay_fraction == 0.2 and w.decay_type == "1-sqrt"
    assert w.stop_after_worse == 2 and cfg.schedule.max_steps is None
    assert w.no_win_patience == 3 and w.gain_margin == 0.1
    validate(cfg)


@pytest.mark.slow
def test_a_trunk_segment_may_end_before_the_first_evaluation(compose_cfg, tmp_path):
    # candidates 4 and 8 branch at steps 3 and 6, before and between evaluations every 4 steps
    cfg = compose_cfg(*WSD, "schedule.wsd.candidates=[4,8]")
    rep = _Reporter()
    value = search(cfg, rep, job_dir=tmp_path / "trunk")
    assert sorted(rep.branches) == [4] and math.isfinite(value)
    assert [s for s, _ in rep.reports] == [4, 8]  # the trunk's own evaluations, none at the branch points
    assert rep.attrs["wsd_optimizer_steps"] == 8 + 1


@pytest.mark.slow
def test_the_search_trains_lora_adapters_and_branches_load_their_optimizer(compose_cfg, tmp_path):
    """peft=lora: the trunk's checkpoints hold the adapter and its optimizer state, and the branch
    follows its own schedule at LoRA's learning rate."""
    lora_lr = 2e-4
    cfg = compose_cfg(*WSD, "schedule.wsd.candidates=[8,16]", "peft=lora", "lr=lora", f"lr.warmup_steps={WARMUP}")
    assert cfg.lr.learning_rate == lora_lr
    rep = _Reporter()
    value = search(cfg, rep, job_dir=tmp_path / "trunk")
    assert sorted(rep.branches) == [8] and math.isfinite(value)
    ckpts = list((tmp_path / "trunk").glob("checkpoint-*"))
    assert ckpts, "the trunk kept no checkpoint"
    for c in ckpts:
        assert (c / "adapter_model.safetensors").is_file() and (c / "optimizer.pt").is_file()
        assert not (c / "model.safetensors").exists()  # adapters only, not the base weights
    history = json.loads((tmp_path / "trunk" / "branch-8" / "trainer_state.json").read_text())["log_history"]
    lrs = {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}
    assert sorted(lrs) == list(range(1, 9))
    for step, lr in lrs.items():
        assert lr == pytest.approx(_expected_lr(step, 8) * lora_lr / LR, rel=1e-6, abs=1e-12), step


def _has_qlora() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not _has_qlora(), reason="QLoRA needs a CUDA GPU and bitsandbytes (extra .[qlora])")
@pytest.mark.slow
def test_the_search_trains_qlora_adapters_on_the_4bit_base(compose_cfg, tmp_path):
    """precision=qlora4: every segment reloads the 4-bit base, the checkpoints hold only the adapters and
    their optimizer, and trunk and branch follow their schedules, as with LoRA."""
    lora_lr = 2e-4
    cfg = compose_cfg(*WSD, "schedule.wsd.candidates=[8,16]", "precision=qlora4", "peft=lora", "lr=lora",
                      f"lr.warmup_steps={WARMUP}")
    assert cfg.precision.load_in_4bit and cfg.peft.name == "lora"
    rep = _Reporter()
    value = search(cfg, rep, job_dir=tmp_path / "trunk")
    assert sorted(rep.branches) == [8] and math.isfinite(value) and math.isfinite(rep.branches[8])
    assert rep.attrs["wsd_optimizer_steps"] == 16 + 2  # trunk + the 8-branch's cooldown
    ckpts = list((tmp_path / "trunk").glob("checkpoint-*"))
    assert ckpts, "the trunk kept no checkpoint"
    for c in ckpts:
        assert (c / "adapter_model.safetensors").is_file() and (c / "optimizer.pt").is_file()
        assert not (c / "model.safetensors").exists()
    for run_dir, s in ((tmp_path / "trunk" / "branch-8", 8), (tmp_path / "trunk", 16)):
        history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        lrs = {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}
        assert max(lrs) == s
        for step, lr in lrs.items():
            assert lr == pytest.approx(_expected_lr(step, s) * lora_lr / LR, rel=1e-6, abs=1e-12), (s, step)


@pytest.mark.slow
def test_every_segment_runs_the_micro_batch_of_the_first(compose_cfg, tmp_path):
    """batch=auto (the default) fits once, in the first trunk segment; the search then pins that
    micro-batch, so resumed segments skip to the right rows and probe nothing again."""
    cfg = compose_cfg(*WSD, "schedule.wsd.candidates=[8,16]")
    assert cfg.batch.auto is not None
    rep = _Reporter()
    search(cfg, rep, job_dir=tmp_path / "trunk")
    state = json.loads((tmp_path / "trunk" / STATE_FILE).read_text())
    assert state["batch"] == {"micro_batch": 4, "grad_accum": 1, "eval_batch": None}  # FAST's 4 x 1 (no GPU)
    branch_attrs = state["branches"]["8"]
    assert branch_attrs["status"] == "done"
    assert rep.attrs["batch_auto"] is None and rep.attrs["micro_batch"] == 4  # the last trunk segment: pinned


@pytest.mark.slow
def test_a_wsd_search_over_another_swept_key_gives_each_branch_its_trunks_value(tmp_path, cache_dir):
    """``schedule=wsd_search seed=1,2``: one trunk per seed, and each branch carries its trunk's seed (a param, as
    the trunk's), so the report compares each seed's lengths with each other, the branches included."""
    proc = _ok(run_in_process("-m", *WSD, "schedule.wsd.candidates=[8,16]", "seed=1,2", *_paths(tmp_path, cache_dir)))
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = {t.number: t for t in study.trials}
    branches = [t for t in trials.values() if "wsd_branch_of" in t.system_attrs]
    assert len(trials) == 4 and len(branches) == 2
    for b in branches:
        assert b.params["seed"] == trials[b.system_attrs["wsd_branch_of"]].params["seed"]
        assert b.params["max_steps"] == 8
    assert "the only length tried" not in proc.stdout + proc.stderr
