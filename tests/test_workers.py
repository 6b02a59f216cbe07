"""Workers: how many, on which GPU, and the one-GPU-per-trial rule.

The decisions are table-tested (``sweeper.workers`` is pure). The CLI tests run real sweeps on this
GPU-less machine with a stand-in ``nvidia-smi`` on PATH that lists GPUs with chosen free memory: the
sweeper reads GPUs through it (nvidia-ml-py finds no driver here), so its worker plan and each worker's
``CUDA_VISIBLE_DEVICES`` are the real code's, while torch (a CPU build) trains on the CPU. The same
paths ran on real GPUs (2×H200, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import optuna
import pytest

from sweeper import gpu, workers
from sweeper.gpu import GpuMemory

from .conftest import FAST, run_cli


def _g(index, free, total=24.0):
    return GpuMemory(index, f"GPU{index}", free, total, (8, 9))


VISIBLE = [_g(2, 20.0), _g(0, 12.0), _g(1, 3.0)]  # most free first, as visible_gpus() orders them


@pytest.mark.parametrize("req,gpus,visible,need,left,expect_gpus,skipped", [
    ("auto", None, VISIBLE, 5.0, 10, ["2", "0"], 1),  # GPU 1 lacks room (0.9 * 3 < 5)
    ("auto", None, VISIBLE, None, 10, ["2", "0", "1"], 0),  # unknown need: every GPU
    ("auto", None, VISIBLE, 5.0, 1, ["2"], 1),  # one trial left: one worker
    ("auto", None, VISIBLE, 5.0, 0, ["2"], 1),  # nothing left: still one (it prints the report)
    ("auto", None, [], 5.0, 4, [None], 0),  # CPU: one worker
    (3, None, [], None, 4, [None, None, None], 0),  # CPU workers on request
    (2, None, VISIBLE, 5.0, 4, ["2", "0"], 1),
    (3, None, VISIBLE, 5.0, 4, ["2", "0", "1"], 1),  # asked for: the GPU without room comes last
    ("auto", ["3", "1"], VISIBLE, 99.0, 4, ["3", "1"], 0),  # the user's list wins, no memory check
    ("auto", ["3", "1"], VISIBLE, 99.0, 1, ["3"], 0),
    (1, ["3", "1"], VISIBLE, 99.0, 4, ["3"], 0),
    # asked for more workers than trials left: no idle worker (it would find nothing to run)
    (3, None, [], None, 1, [None], 0),
    (3, None, VISIBLE, 5.0, 2, ["2", "0"], 1),
    (2, ["3", "1"], VISIBLE, 99.0, 1, ["3"], 0),
])
def test_plan_local(req, gpus, visible, need, left, expect_gpus, skipped):
    plan = workers.plan_local(req, gpus, visible, need, 0.9, left)
    assert plan.gpus == expect_gpus
    assert len(plan.skipped) == skipped
    if skipped:
        assert "GPU 1 (GPU1) skipped: 3.0 GiB free, the planned trial needs ~5.0 GiB" in plan.skipped[0]


@pytest.mark.parametrize("req,gpus,visible,need,needle", [
    ("auto", None, [_g(0, 2.0), _g(1, 1.0)], 5.0, "no visible GPU has room for the planned trial (~5.0 GiB"),
    (3, None, VISIBLE[:2], 1.0, "hydra.sweeper.workers=3 needs one GPU each, but 2 are visible (2,0)"),
    (3, ["0", "1"], VISIBLE, 1.0, "hydra.sweeper.gpus lists 2 (0,1)"),
])
def test_plan_local_errors_name_the_fix(req, gpus, visible, need, needle):
    with pytest.raises(ValueError, match=None) as e:
        workers.plan_local(req, gpus, visible, need, 0.9, 8)
    assert needle in str(e.value)


@pytest.mark.parametrize("value,expect", [("auto", "auto"), ("AUTO", "auto"), (1, 1), ("3", 3), (4, 4)])
def test_parse_workers(value, expect):
    assert workers.parse_workers(value) == expect


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, "", None, True])
def test_parse_workers_refuses(value):
    with pytest.raises(ValueError, match="hydra.sweeper.workers must be auto or a whole number >= 1"):
        workers.parse_workers(value)


def test_parse_gpus_one_id_per_worker():
    assert workers.parse_gpus([0, 2]) == ["0", "2"]
    assert workers.parse_gpus(None) is None
    for bad in (["0,1"], [[0, 1]], []):
        with pytest.raises(ValueError, match="hydra.sweeper.gpus"):
            workers.parse_gpus(bad)
    with pytest.raises(ValueError, match="one trial runs on one GPU"):
        workers.parse_gpus(["0,1"])


def test_plan_slurm_auto_is_one_job_per_trial_left_up_to_the_cap():
    assert workers.plan_slurm("auto", 3, 8).n == 3
    assert workers.plan_slurm("auto", 20, 8).n == 8
    assert workers.plan_slurm("auto", 0, 8).n == 1
    assert workers.plan_slurm(2, 20, 8).n == 2


def test_compute_for_gpus_without_cuda():
    assert gpu.compute_for([_g(0, 1.0)], "auto") == "bf16"
    assert gpu.compute_for([GpuMemory(0, "T4", 1.0, 16.0, (7, 5))], "auto") == "fp16"
    assert gpu.compute_for([], "auto") == "fp32"
    assert gpu.compute_for([], "bf16") == "bf16"


def test_world_size_above_one_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one trial runs on one GPU \(for now\), but this run was launched as 2"):
        gpu.pin_one()


# --------------------------------------------------------------------------- CLI with a stand-in nvidia-smi


def fake_nvidia_smi(folder: Path, free_mib: list[int], total_mib: int = 24564) -> dict:
    """A PATH entry whose `nvidia-smi --query-gpu=...` lists GPUs 0..n-1 with these free MiB."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{i}, Fake GPU {i}, {free}, {total_mib}, 8.9, GPU-fake-{i}" for i, free in enumerate(free_mib))
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow
def test_workers_auto_one_per_gpu_with_room_each_trial_sees_one_gpu(tmp_path, cache_dir):
    env = fake_nvidia_smi(tmp_path / "bin", [20000, 1, 16000])  # GPU 1 has 1 MiB free: no room
    proc = run_cli("-m", "seed=1,2,3,4", *FAST, "batch=balanced", "batch.per_device_train_batch_size=4",
                   "batch.gradient_accumulation_steps=1", f"paths.output_dir={tmp_path}",
                   f"paths.cache_dir={cache_dir}", env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "workers: 2 worker(s) on GPU 0, GPU 2" in out
    assert "GPU 1 (Fake GPU 1) skipped: 0.0 GiB free" in out
    trials = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert sorted(t.params["seed"] for t in trials if t.state.name == "COMPLETE") == [1, 2, 3, 4]
    seen = {t.user_attrs["cuda_visible_devices"] for t in trials}
    assert seen == {"0", "2"}, seen  # every trial saw exactly one GPU, and both workers worked
    by_gpu = {g: {t.user_attrs["worker"] for t in trials if t.user_attrs["cuda_visible_devices"] == g} for g in seen}
    assert all(len(w) == 1 for w in by_gpu.values()) and by_gpu["0"] != by_gpu["2"]  # one process per GPU


@pytest.mark.slow
def test_fewer_points_than_gpus_start_only_as_many_workers(tmp_path, cache_dir):
    env = fake_nvidia_smi(tmp_path / "bin", [20000, 20000, 20000])
    proc = run_cli("-m", "seed=1", *FAST, "batch=balanced", "batch.per_device_train_batch_size=4",
                   "batch.gradient_accumulation_steps=1", f"paths.output_dir={tmp_path}",
                   f"paths.cache_dir={cache_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workers: 1 worker(s) on GPU 0" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_single_run_on_a_many_gpu_box_pins_one_gpu(tmp_path, cache_dir):
    env = fake_nvidia_smi(tmp_path / "bin", [5000, 20000])
    proc = run_cli(*FAST, "batch=balanced", "batch.per_device_train_batch_size=4",
                   "batch.gradient_accumulation_steps=1", f"paths.output_dir={tmp_path}",
                   f"paths.cache_dir={cache_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this run uses GPU 1 (Fake GPU 1, 19.5 GiB free, the most of 2 visible)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_torchrun_style_launch_is_one_line(tmp_path, cache_dir):
    proc = run_cli(*FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", env={"WORLD_SIZE": "2"})
    assert proc.returncode != 0
    assert "one trial runs on one GPU (for now)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_command_whose_trials_all_fail_exits_non_zero(tmp_path, cache_dir):
    proc = run_cli("-m", "seed=1,2", *FAST, "eval.logging_steps=1", f"paths.output_dir={tmp_path}",
                   f"paths.cache_dir={cache_dir}", env={"SFT_SWEEP_INJECT_NAN_AT_STEP": "3"})
    assert proc.returncode != 0
    assert "no trial of this command completed: 2 of 2 failed (last: trial 1: DivergedError" in proc.stderr
    ok = run_cli("-m", "seed=1,2", *FAST, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert ok.returncode == 0, ok.stderr[-2000:]  # the same command, fixed: the failed points run again


@pytest.mark.slow
def test_the_data_check_before_a_gpu_sweep_leaves_cuda_alone(tmp_path, cache_dir):
    """With a GPU visible, the sweeper checks TRL's preparation in a child process that sees no GPU (building
    a trainer would initialise CUDA before the sweeper pins its own GPU); bad data is still refused in one
    line before any trial."""
    import json

    env = fake_nvidia_smi(tmp_path / "bin", [20000])
    chat = [{"role": "user", "content": "x " * 3000}, {"role": "assistant", "content": "y"}]
    (tmp_path / "eval.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    proc = run_cli("-m", "seed=1", *FAST, f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.max_length=64",
                   f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "0 of 1 eval rows keep a token to score after truncation at data.max_length=64" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "optuna.db").exists()


def _data_check_children(tmp: Path) -> list[int]:
    """Running processes of the data check's child (``python -m sweeper.sft``) started with TMPDIR=``tmp``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sweeper.sft" in cmd and f"TMPDIR={tmp}".encode() in env:
            found.append(int(proc.name))
    return found


def _wait_for_children(tmp: Path, n: int) -> list[int]:
    """:func:`_data_check_children` once there are ``n`` (a process just started shows its command line and
    environment in /proc a moment after ``Popen`` returns)."""
    deadline = time.time() + 60
    while len(found := _data_check_children(tmp)) < n and time.time() < deadline:
        time.sleep(0.05)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("refused", ["by a check", "by Hydra"])
def test_a_refusal_while_the_data_check_runs_stops_its_child(tmp_path, cache_dir, refused):
    """With a GPU visible, the command starts the data check's child first thing (it imports while the command
    composes its config); when a check or Hydra itself refuses the command, the refusal is one line and the
    child is stopped."""
    env = fake_nvidia_smi(tmp_path / "bin", [20000])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    bad = f"model.path={tmp_path / 'no-such-model'}" if refused == "by a check" else "schedule=no-such-schedule"
    proc = run_cli("-m", "seed=1", *FAST, bad, f"paths.output_dir={tmp_path}",
                   f"paths.cache_dir={cache_dir}", env={**env, "TMPDIR": str(tmp)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert ("no-such-model" if refused == "by a check" else "no-such-schedule") in \
        proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert _data_check_children(tmp) == []  # no child left running
    assert not (tmp_path / "optuna.db").exists()


@pytest.mark.slow
def test_the_data_check_child_started_first_checks_the_first_config(compose_cfg, tmp_path, monkeypatch):
    """The child the command's entry starts (:func:`sweeper.datacheck.prestart`) imports before it has a config;
    the first check hands it its config and reads its verdict, a second check starts a child of its own, and
    a child no check took is ended."""
    import json

    from sweeper import datacheck

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    chat = [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]
    (tmp_path / "eval.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    datacheck.prestart()
    first = datacheck._ready.proc.pid
    assert _wait_for_children(tmp_path, 1) == [first]
    check = datacheck.DataCheck(compose_cfg(f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.max_length=64"))
    assert check.child.proc.pid == first and datacheck._ready is None
    with pytest.raises(ValueError, match="0 of 1 eval rows keep a token to score after truncation at "
                                         "data.max_length=64"):
        check.wait()
    second = datacheck.DataCheck(compose_cfg())
    assert second.child.proc.pid != first
    second.wait()  # the demo data trains
    datacheck.prestart()
    assert _wait_for_children(tmp_path, 1) == [datacheck._ready.proc.pid]
    datacheck.drop()
    assert _data_check_children(tmp_path) == []


@pytest.mark.slow
def test_a_data_check_child_that_gets_no_config_passes_nothing(compose_cfg, tmp_path, caplog):
    """A pre-started child whose stdin ends with no config exits 3 with its line; a check handed to a child
    that is gone does not count as passed: a warning says so and each trial checks its data itself."""
    import logging

    from sweeper import datacheck

    datacheck.prestart()
    child = datacheck._ready
    child.proc.stdin.close()
    assert child.proc.wait(timeout=120) == 3
    check = datacheck.DataCheck(compose_cfg())  # takes the child that is gone
    with caplog.at_level(logging.INFO, logger="sweeper.datacheck"):
        check.wait()
    assert [r.getMessage() for r in caplog.records] == [
        "the data check before the sweep failed (no config reached the data check's child); each trial checks "
        "its data itself"]


@pytest.mark.slow
def test_the_data_checks_of_several_datasets_refuse_the_one_that_cannot_train(tmp_path, cache_dir):
    """Three points whose data differ (data.max_length): their checks run in children, at most two at once,
    and the one whose eval rows all lose their loss tokens refuses the command in one line, before any study."""
    import json

    env = fake_nvidia_smi(tmp_path / "bin", [20000])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    chat = [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]
    (tmp_path / "eval.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    proc = run_cli("-m", "seed=1", "data.max_length=2048,1024,64", *FAST, f"data.eval_path={tmp_path / 'eval.jsonl'}",
                   f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", env={**env, "TMPDIR": str(tmp)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "0 of 1 eval rows keep a token to score after truncation at data.max_length=64" in proc.stderr, \
        proc.stderr[-2000:]
    assert _data_check_children(tmp) == [] and not (tmp_path / "optuna.db").exists()


def test_gpu_ids_must_be_visible():
    workers.check_gpus_visible(["0", "2"], VISIBLE)
    with pytest.raises(ValueError, match=r"hydra.sweeper.gpus=\[0,3\]: GPU 3 is not visible here; the visible GPUs "
                                         r"are 0, 1, 2"):
        workers.check_gpus_visible(["0", "3"], VISIBLE)
    with pytest.raises(ValueError, match=r"hydra.sweeper.gpus=\[0,3\] names GPUs, but no GPU is visible here"):
        workers.check_gpus_visible(["0", "3"], [])


@pytest.mark.parametrize("worker", [False, True], ids=["the command", "its worker"])
def test_a_worker_leaves_the_search_spaces_ends_to_the_command(tmp_path, cache_dir, monkeypatch, worker):
    """The command checks each end of a sampled range before it starts its workers; a worker does not check
    them again before it claims a trial (each check composes configs, some load the data), so the trials go to
    the workers as they start. The test stops both at the workers' plan, after every other check."""
    from sweeper.config import SWEEP_ID_ENV
    from sweeper.sweep import launchers

    from .helpers import run_in_process

    def stop(*args, **kwargs):
        raise ValueError("every check passed (a test's stop before any trial)")

    monkeypatch.setattr(launchers, "plan", stop)
    if worker:
        monkeypatch.setenv(SWEEP_ID_ENV, "a-test-sweep")
    proc = run_in_process("-m", *FAST, "lr.learning_rate=interval(-1,1)", "hydra.sweeper.n_trials=2",
                          f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    said = "every check passed" if worker else "samples -1.0 (its low end), refused as lr.learning_rate=-1.0 would be"
    assert proc.returncode == 1 and said in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_the_first_trial_takes_the_weights_read_while_the_data_check_ran(tmp_path, cache_dir):
    """With a GPU visible, the command reads the first point's model weights while it waits for the data check's
    child; its first trial takes them (and says so), a later trial reads its own, and a point learns exactly the
    same either way (the two commands run the same points in the opposite order)."""
    env = fake_nvidia_smi(tmp_path / "bin", [20000])
    runs = {}
    for order in ("1,2", "2,1"):
        out = tmp_path / order.replace(",", "-")
        proc = run_cli("-m", f"seed={order}", *FAST, "precision=fp32", f"paths.cache_dir={cache_dir}",
                       f"paths.output_dir={out}", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "its weights read ahead during the sweep's checks" in proc.stdout + proc.stderr
        trials = sorted(optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{out}/optuna.db").trials,
                        key=lambda t: t.number)
        ahead = [t.user_attrs["timing"].get("model_read_ahead_s") for t in trials]
        assert ahead[0] is not None and ahead[1:] == [None], ahead
        runs[order] = {t.params["seed"]: t.intermediate_values for t in trials}
    assert runs["1,2"] == runs["2,1"] and len(runs["1,2"][1]) >= 2
