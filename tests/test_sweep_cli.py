"""The real CLI: `python train.py -m ...` in a subprocess, a real SQLite study, real trials."""

from __future__ import annotations

import json
import math

import optuna
import pytest

from sweeper.report import attrs

from .conftest import FAST, run_cli
from .helpers import fast, run_in_process

pytestmark = pytest.mark.slow
TrialState = optuna.trial.TrialState
ATTRS = {"max_steps", "epochs_trained", "effective_batch", "samples_seen", "tokens_seen", "best_step",
         "stopped_early_step", "run_dir", "best_checkpoint", "plan", "best_value"}


def _paths(tmp_path, cache_dir):
    return [f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]


def _study(tmp_path, name="demo-tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_core_grid_runs_each_point_once_and_resumes(tmp_path, cache_dir):
    base = [*FAST, *_paths(tmp_path, cache_dir)]
    _ok(run_in_process("-m", "lr=tiny,full", *base))  # two learning-rate presets, each its own run
    assert [t.params["lr"] for t in _study(tmp_path).trials] == ["tiny", "full"]

    out = _ok(run_in_process("-m", "lr=tiny,full,lora", *base))  # resumes: only "lora" is missing
    study = _study(tmp_path)
    assert [t.params["lr"] for t in study.trials] == ["tiny", "full", "lora"]
    for t in study.trials:
        assert t.state == TrialState.COMPLETE and math.isfinite(t.value)
        assert sorted(t.intermediate_values) == [4, 8, 12]  # every evaluation reported: the curve
        assert t.value == min(t.intermediate_values.values())  # the best, not the last
        assert ATTRS <= set(attrs(t)) and "plan" not in t.user_attrs  # the plan: a system attr
        assert t.user_attrs["choices"]["lr"] == t.params["lr"]
    row = "| 2 | max_steps=12 | cosine | lr=lora | 12 |"  # the resumed trial, its group choice in params
    assert "**Recommended for demo: max_steps=" in out.stdout and row in out.stdout
    summaries = list(tmp_path.glob("sweeps/demo-tiny/summary.md"))  # one folder per study, every re-run
    assert len(summaries) == 1 and row in summaries[0].read_text()
    job_dirs = {t.user_attrs["run_dir"] for t in study.trials}
    assert job_dirs == {str(tmp_path / "sweeps" / "demo-tiny" / f"trial_{n}") for n in range(3)}

    _ok(run_in_process("-m", "lr=tiny,full,lora", *base))  # nothing missing: no new trial
    assert len(_study(tmp_path).trials) == 3

    # the plan now knows this study's measured throughput and estimates wall time from it
    from sweeper.plan_command import plan_rows

    [row] = plan_rows([*base])
    assert row["tokens_per_s"] > 0 and row["wall_s"] == pytest.approx(row["plan"].tokens / row["tokens_per_s"])


def test_range_and_log_interval_stay_inside_hydra_bounds_and_n_trials_is_the_total(tmp_path, cache_dir):
    args = ["-m", "schedule.max_steps=range(4,12,4)", "lr.learning_rate=tag(log,interval(1e-4,1e-3))",
            "hydra.sweeper.sampler.name=random", "hydra.sweeper.n_trials=3", *fast("schedule.max_steps"), *_paths(tmp_path, cache_dir)]
    out = _ok(run_in_process(*args))
    said = out.stdout + out.stderr
    assert said.count("] trial 0: ") == 1 and "Launching 1 jobs locally" not in said  # each trial said once
    study = _study(tmp_path)
    assert len(study.trials) == 3
    for t in study.trials:
        assert t.params["schedule.max_steps"] in (4, 8)  # range stop 12 is excluded
        assert 1e-4 <= t.params["lr.learning_rate"] <= 1e-3
        assert t.distributions["lr.learning_rate"].log
        assert t.user_attrs["max_steps"] == t.params["schedule.max_steps"]
    _ok(run_in_process(*args[:-4], "hydra.sweeper.n_trials=4", *args[-3:]))
    assert len(_study(tmp_path).trials) == 4  # the total, not 4 more


def _trained(study, key):
    """Each trained value of ``key`` in the study, sorted (a value trained twice is listed twice)."""
    return sorted(t.params[key] for t in study.trials if t.state == TrialState.COMPLETE)


def test_a_finite_choice_continues_its_study_as_n_trials_grows_or_shrinks(tmp_path, cache_dir):
    rates = [1e-4, 3e-4, 1e-3]
    # seed=2: the sampler's first two draws differ, so this pins the re-runs (seed=42 draws 1e-3 twice)
    args = ["-m", "lr.learning_rate=choice(1e-4,3e-4,1e-3)", "seed=2", *FAST, *_paths(tmp_path, cache_dir)]
    _ok(run_in_process(*args, "hydra.sweeper.n_trials=2"))  # 2 of 3 points: sampled
    first = _trained(_study(tmp_path), "lr.learning_rate")
    assert len(first) == 2 and len(set(first)) == 2 and set(first) <= set(rates)

    out = _ok(run_in_process(*args, "hydra.sweeper.n_trials=5"))  # covers the 3 points: a grid, the same study
    study = _study(tmp_path)
    assert _trained(study, "lr.learning_rate") == rates  # the missing point trained, none twice
    assert "1 to run, 2 already done" in out.stdout + out.stderr
    assert {repr(t.distributions["lr.learning_rate"]) for t in study.trials} == {
        repr(optuna.distributions.CategoricalDistribution(rates))}  # recorded alike, sampled or grid

    _ok(run_in_process(*args, "hydra.sweeper.n_trials=2"))  # fewer again: the study's total is reached
    assert _trained(_study(tmp_path), "lr.learning_rate") == rates


def _range_args(tmp_path, cache_dir, seed):
    return ["-m", "schedule.max_steps=range(4,10,2)", f"seed={seed}", "eval.eval_steps=2", "eval.logging_steps=2",
            *fast("schedule.max_steps", "eval."), *_paths(tmp_path, cache_dir)]


def test_a_grid_re_run_of_a_finite_range_counts_the_points_sampled_before(tmp_path, cache_dir):
    args = _range_args(tmp_path, cache_dir, seed=10)  # the sampler draws 4 and 8
    _ok(run_in_process(*args, "hydra.sweeper.n_trials=2"))
    assert _trained(_study(tmp_path), "schedule.max_steps") == [4, 8]

    out = _ok(run_in_process(*args, "hydra.sweeper.n_trials=5"))  # a grid now: the sampled points count as done
    assert _trained(_study(tmp_path), "schedule.max_steps") == [4, 6, 8]
    assert "1 to run, 2 already done" in out.stdout + out.stderr


def test_a_finite_sampled_space_trains_no_point_twice(tmp_path, cache_dir):
    # seed=8: TPE's first two draws of range(4,10,2) are both 6 (its random start draws with replacement)
    out = _ok(run_in_process(*_range_args(tmp_path, cache_dir, seed=8), "hydra.sweeper.n_trials=2"))
    first = _trained(_study(tmp_path), "schedule.max_steps")
    assert len(first) == 2 and len(set(first)) == 2 and 6 in first  # the second 6 moved to a point not yet trained
    assert "the sampler drew schedule.max_steps=6, which a trial of this study has trained" in out.stdout + out.stderr


def test_a_choice_over_a_comma_lists_points_runs_as_its_grid_or_names_the_n_trials_that_does(tmp_path, cache_dir):
    study = optuna.create_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    for rate in (1e-4, 3e-4):  # lr.learning_rate=1e-4,3e-4 ran: numbers on a float range
        study.add_trial(optuna.trial.create_trial(
            value=1.0, params={"lr.learning_rate": rate},
            distributions={"lr.learning_rate": optuna.distributions.FloatDistribution(1e-4, 3e-4)}))
    args = ["-m", "lr.learning_rate=choice(1e-4,3e-4,1e-3)", *FAST, *_paths(tmp_path, cache_dir)]
    proc = run_in_process(*args, "hydra.sweeper.n_trials=2")  # sampled, it would record a categorical
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]  # one line, naming the key and the n_trials that runs it
    assert line.startswith("lr.learning_rate: study 'demo-tiny' already samples it as FloatDistribution") and line.endswith(
        "; set hydra.sweeper.n_trials=3 (or more) to run its 3 point(s) once each, as a grid, which this study takes, "
        "or start a new study with hydra.sweeper.study_name=...")
    _ok(run_in_process(*args, "hydra.sweeper.n_trials=3"))
    assert sorted(t.params["lr.learning_rate"] for t in _study(tmp_path).trials) == [1e-4, 3e-4, 1e-3]


def test_failing_trial_is_recorded_and_the_sweep_continues(tmp_path, cache_dir):
    out = _ok(run_in_process("-m", "model.attn_implementation=no_such_attention,eager", *FAST, *_paths(tmp_path, cache_dir)))
    failed, done = _study(tmp_path).trials
    assert failed.state == TrialState.FAIL and "no_such_attention" in failed.user_attrs["error"]
    assert done.state == TrialState.COMPLETE
    assert "trial 0 failed" in out.stdout + out.stderr


def test_median_pruner_stops_a_lagging_trial(tmp_path, cache_dir):
    # two healthy learning rates finish; a 1000x smaller one lags the median at its first report
    out = _ok(run_in_process("-m", "lr.learning_rate=1e-3,2e-3,1e-6", "hydra.sweeper.pruner.name=median",
                      "hydra.sweeper.pruner.n_startup_trials=2", *FAST, *_paths(tmp_path, cache_dir)))
    states = [t.state for t in _study(tmp_path).trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = _study(tmp_path).trials[2]
    assert list(pruned.intermediate_values) == [4]  # stopped at its first evaluation
    assert "lr.learning_rate=1e-06" in out.stdout


def _bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": []}\n{"messages": [\n')
    return p


def _two_datasets_named_alike(tmp_path):
    """Two datasets laid out as <folder>/data/train.jsonl, given one data.name: one study would mix them."""
    paths = []
    for name, rows in (("a", 40), ("b", 50)):
        p = tmp_path / name / "data" / "train.jsonl"
        p.parent.mkdir(parents=True)
        p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{name} question {i}"},
                                                      {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                             for i in range(rows)))
        paths.append(str(p))
    return ["data=jsonl", f"data.train_path={','.join(paths)}", "data.name=same"]


@pytest.mark.parametrize("make_args,needle", [
    (lambda t: ["data=jsonl", f"data.train_path={t}/missing.jsonl"], "data.train_path: file not found"),
    (_two_datasets_named_alike, "study 'same-tiny' would mix 2 datasets"),
    (lambda t: ["data=jsonl", f"data.train_path={_bad_jsonl(t)}"], "line 2 is not valid JSON"),
    (lambda t: ["schedule=under,forever"], "forever"),
    (lambda t: ["schedule.max_steps=10", "lr.warmup_steps=20"], "must be shorter than schedule.max_steps"),
    (lambda t: ["data.eval_fraction=0.999"], "both need at least one"),
])
def test_bad_input_is_one_clear_error_and_no_trial(tmp_path, cache_dir, make_args, needle):
    proc = run_in_process("-m", "schedule=under,sweet", *make_args(tmp_path), *fast("schedule.max_steps"),
                          *_paths(tmp_path, cache_dir))
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    db = tmp_path / "optuna.db"
    if db.exists():
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        assert all(not storage.get_all_trials(s._study_id) for s in storage.get_all_studies())


def test_single_run_without_multirun(tmp_path, cache_dir):
    proc = _ok(run_cli(*FAST, *_paths(tmp_path, cache_dir)))
    assert "best eval_loss" in proc.stdout + proc.stderr
    assert not (tmp_path / "optuna.db").exists()
    logs = list(tmp_path.glob("runs/*/train.log"))
    assert logs and "plan:" in logs[0].read_text()
