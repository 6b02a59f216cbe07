"""A study never serves stale results: unswept settings that differ are refused (or added on request),
and a command runs its own grid points whatever else the study holds. Real CLI, real SQLite."""

from __future__ import annotations

import optuna
import pytest

from sweeper import identity

from .conftest import FAST, run_cli
from .helpers import fast
from .helpers.cli import run_in_process

TrialState = optuna.trial.TrialState


def _trials(tmp_path):
    return optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db").trials


def test_differences_ignore_swept_searched_and_bookkeeping_keys(compose_cfg):
    a = identity.result_config(compose_cfg(*FAST))
    b = identity.result_config(compose_cfg(*FAST, "lr.learning_rate=3e-4", "schedule.max_steps=99",
                                           "paths.output_dir=/elsewhere", "speed=plain", "eval.logging_steps=1"))
    assert identity.differences([a], b, set()) == {"lr.learning_rate": ([0.001], 0.0003)}
    assert identity.differences([a], b, {"lr.learning_rate"}) == {}  # swept by the command
    assert not identity.same_run(a, b) and identity.same_run(a, dict(a)) and identity.same_run(None, b)
    # a sampled trial records its command's config, before the draw: its params decide what it drew (lr: lr.*)
    drew = {**a, "lr.learning_rate": 3e-4}
    assert identity.same_run(a, drew, skip=["lr"]) and not identity.same_run(a, drew, skip=["lr.learning"])
    # the effective batch counts, not how it is split
    c = identity.result_config(compose_cfg(*fast("batch."), "batch.per_device_train_batch_size=2",
                                           "batch.gradient_accumulation_steps=2"))
    assert identity.differences([a], c, set()) == {}
    # the demo's size counts for the demo only: a banking77 study run with it is the same run without it
    bank = fast("data.") + ["data=banking77_sample"]
    with_rows = identity.result_config(compose_cfg(*bank, "data.demo_rows=120"))
    assert identity.differences([with_rows], identity.result_config(compose_cfg(*bank)), set()) == {}
    assert identity.differences([a], identity.result_config(compose_cfg(*fast("data.demo_rows"), "data.demo_rows=400")), set())


@pytest.mark.slow
def test_stale_settings_refused_follow_up_grids_run_their_own_points(tmp_path, cache_dir):
    base = [*FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]

    def cli(*args):
        return run_in_process("-m", *args, *base)

    first = cli("schedule.max_steps=8,12")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 to run, 0 already done, 0 running elsewhere of this grid" in first.stdout + first.stderr

    stale = cli("schedule.max_steps=8,12", "lr.learning_rate=3e-4", "data.max_train_rows=60")
    assert stale.returncode != 0
    err = stale.stderr
    assert "study 'demo-tiny'" in err and "ran other settings than this command" in err
    assert "lr.learning_rate: 0.001 in the study, 0.0003 now" in err
    assert "data.max_train_rows: None in the study, 60 now" in err
    assert "hydra.sweeper.study_name=" in err and "hydra.sweeper.allow_config_change=true" in err
    assert "Traceback" not in err and len(_trials(tmp_path)) == 2  # nothing half-written

    added = cli("schedule.max_steps=8,12", "lr.learning_rate=3e-4", "hydra.sweeper.allow_config_change=true")
    assert added.returncode == 0, added.stderr[-3000:]
    trials = _trials(tmp_path)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.system_attrs["sft_config"]["learning_rate"] for t in trials] == [1e-3, 1e-3, 3e-4, 3e-4]
    assert ("Settings differ between trials (added with hydra.sweeper.allow_config_change=true): "
            "lr.learning_rate=0.001 for trial(s) 0, 1; lr.learning_rate=0.0003 for trial(s) 2, 3") in added.stdout

    follow = cli("schedule.max_steps=16,20")  # a follow-up grid on the first settings
    assert follow.returncode == 0, follow.stderr[-3000:]
    assert "2 to run, 0 already done" in follow.stdout + follow.stderr
    assert [t.user_attrs["max_steps"] for t in _trials(tmp_path)][4:] == [16, 20]

    again = cli("schedule.max_steps=8,16")  # both done already, under these settings
    assert again.returncode == 0
    assert "0 to run, 2 already done" in again.stdout + again.stderr
    assert len(_trials(tmp_path)) == 6

    wsd = run_in_process("-m", "schedule=wsd_search", "schedule.wsd.candidates=[8,12]", *base[1:])  # into the cosine study
    assert wsd.returncode == 0, wsd.stderr[-3000:]
    new = _trials(tmp_path)[6:]
    assert new and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in new)
    assert {t.params.get("method") for t in new} == {"wsd"}


@pytest.mark.slow
def test_plan_names_the_settings_a_sweep_would_refuse(tmp_path, cache_dir):
    from sweeper.plan_command import plan_rows

    base = [*FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    assert run_cli("-m", "schedule.max_steps=8", *base).returncode == 0
    same = plan_rows(["schedule.max_steps=8,12", *base[1:]])
    assert not any("ran other settings" in w for r in same for w in r["warnings"])
    other = plan_rows(["schedule.max_steps=8,12", "lr.learning_rate=3e-4", *base[1:]])
    for r in other:
        assert any("study 'demo-tiny' ran other settings (lr.learning_rate: 0.001 in the study, 0.0003 now)" in w
                   for w in r["warnings"]), r["warnings"]
