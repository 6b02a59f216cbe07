"""The chaos suite: faults injected into real sweeps (tiny model, real SFTTrainer, real SQLite and
PostgreSQL), each followed by the same command run again. Pass: no trial lost, none duplicated, and the
resumed trial's eval curve equal to an uninterrupted run's within 1e-3 at every evaluation.

Each test appends its counts (faults injected, survived, lost, duplicated) to
``test-artifacts/chaos.jsonl``; ``benchmarks/RESULTS.md`` keeps a run's table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from .conftest import FAST, ROOT, load_study, mount_tmpfs, run_cli, unmount
from .helpers.shared import once

pytestmark = pytest.mark.slow

RUN = ["seed=1", *FAST, "schedule.max_steps=24", "eval.eval_steps=4", "eval.logging_steps=4"]
ARTIFACTS = ROOT / "test-artifacts"


def _args(out: Path, cache: Path, url: str | None = None, name: str = "chaos", *more: str) -> list[str]:
    url = url or f"sqlite:///{out}/optuna.db"
    return ["-m", *RUN, *more, f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}",
            f"paths.output_dir={out}", f"paths.cache_dir={cache}"]


def _trials(url: str, name: str) -> list:
    return load_study(url, name).trials


def _record(fault: str, injected: int, survived: int, lost: int, duplicated: int) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "chaos.jsonl", "a") as f:
        f.write(json.dumps({"fault": fault, "injected": injected, "survived": survived, "lost": lost,
                            "duplicated": duplicated}) + "\n")


def _lost_and_duplicated(trials, expected: set) -> tuple[int, int]:
    done = [t.params.get("seed", 1) for t in trials if t.state == TrialState.COMPLETE]
    return len(expected - set(done)), len(done) - len(set(done))


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory, cache_dir) -> dict[int, float]:
    """The uninterrupted run's eval curve (same seed, same data order), run once for the whole run
    (``helpers.shared.once``)."""

    def uninterrupted(out):
        proc = run_cli(*_args(out, cache_dir))
        assert proc.returncode == 0, proc.stderr[-3000:]
        [trial] = _trials(f"sqlite:///{out}/optuna.db", "chaos")
        return sorted(trial.intermediate_values.items())  # JSON: [step, value] pairs

    return {int(step): value for step, value in once(tmp_path_factory, "chaos-reference", uninterrupted)[1]}


def _assert_same_curve(trial, reference: dict[int, float]) -> None:
    assert sorted(trial.intermediate_values) == sorted(reference)
    worst = max(abs(trial.intermediate_values[s] - reference[s]) for s in reference)
    assert worst <= 1e-3, (trial.intermediate_values, reference)


def _killed(args: list[str], **inject: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", **{f"SFT_SWEEP_INJECT_{k}": v for k, v in inject.items()}}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def test_kill_during_a_checkpoint_save(tmp_path, cache_dir, reference_curve):
    url, args = f"sqlite:///{tmp_path}/optuna.db", _args(tmp_path, cache_dir)
    _killed(args, KILL_IN_SAVE="12")
    run_dir = Path(_trials(url, "chaos")[0].user_attrs["run_dir"])
    cut = run_dir / "checkpoint-12"
    assert cut.is_dir() and not (cut / "trainer_state.json").exists()  # the save really was cut short

    proc = run_cli(*args)  # the same command: the dead worker's trial is reclaimed at once
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _trials(url, "chaos")
    retry = next(t for t in trials if t.state == TrialState.COMPLETE)
    assert retry.user_attrs["resumed_from_checkpoint"].endswith("checkpoint-8")  # the last whole checkpoint
    assert retry.user_attrs["retry_of"]["trial"] == 0 and retry.user_attrs["error"] is None
    _assert_same_curve(retry, reference_curve)
    lost, dup = _lost_and_duplicated(trials, {1})
    assert (lost, dup) == (0, 0)
    _record("kill -9 during a checkpoint save", 1, 1, lost, dup)


def test_kill_during_a_study_write(tmp_path, cache_dir, reference_curve, storage):
    url, name = storage
    args = _args(tmp_path, cache_dir, url, name)
    _killed(args, KILL_IN_REPORT="8")
    [dead] = _trials(url, name)
    assert dead.state == TrialState.RUNNING  # the COMPLETE it was writing never committed
    assert sorted(dead.intermediate_values) == [4]

    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _trials(url, name)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    _assert_same_curve(trials[1], reference_curve)
    lost, dup = _lost_and_duplicated(trials, {1})
    assert (lost, dup) == (0, 0)
    _record(f"kill -9 during a study write ({url.split(':', 1)[0]})", 1, 1, lost, dup)


def test_full_disk_for_the_output_folder(tmp_path, cache_dir, reference_curve):
    out = mount_tmpfs(tmp_path / "small", "size=600k")
    try:
        url = f"sqlite:///{tmp_path}/optuna.db"  # the study lives elsewhere: only the output folder is full
        args = _args(out, cache_dir, url)
        proc = run_cli(*args)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "stopping the sweep: trial 0: no space left on the disk of paths.output_dir=" in proc.stderr
        assert "it is queued to resume from its last checkpoint" in proc.stderr
        assert [t.state for t in _trials(url, "chaos")] == [TrialState.FAIL, TrialState.WAITING]

        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)  # room again
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        unmount(out)
    trials = _trials(url, "chaos")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "DiskFullError" in trials[1].user_attrs["retry_of"]["error"]
    _assert_same_curve(trials[1], reference_curve)
    lost, dup = _lost_and_duplicated(trials, {1})
    assert (lost, dup) == (0, 0)
    _record("full disk for the output folder", 1, 1, lost, dup)


def test_eight_workers_on_one_study(tmp_path, cache_dir, storage):
    """A lock storm: 8 worker processes claim, report and finish trials of one study at once (trials of 4 steps,
    one evaluation each: the storm is in the claims, reports and finishes, not in the training)."""
    url, name = storage
    seeds = list(range(1, 9))
    proc = run_cli("-m", f"seed={','.join(map(str, seeds))}", *FAST, "schedule.max_steps=4", "eval.accuracy=off",
                   "hydra.sweeper.workers=8", f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}",
                   f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _trials(url, name)
    lost, dup = _lost_and_duplicated(trials, set(seeds))
    assert (lost, dup) == (0, 0) and len(trials) == 8
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the work really was shared
    _record(f"8 workers on one study ({url.split(':', 1)[0]})", 8, 8 - lost, lost, dup)
