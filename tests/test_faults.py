"""Faults: divergence, OOM retry, failure cap, killed workers (real kill -9), parallel workers,
on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from sweeper.trial import DivergedError, run

from .conftest import FAST, PG_URL, ROOT, load_study, postgres_unreachable, run_cli, skip_or_fail
from .helpers import Hold, Recorder, fast

TrialState = optuna.trial.TrialState
def _load(url, name):
    return load_study(url, name)


# --------------------------------------------------------------------------- in-process


@pytest.mark.slow
def test_nan_loss_fails_as_diverged_at_its_step(compose_cfg, monkeypatch):
    monkeypatch.setenv("SFT_SWEEP_INJECT_NAN_AT_STEP", "6")
    with pytest.raises(DivergedError, match="diverged at step 7: train loss is nan"):
        run(compose_cfg(*FAST, "eval.logging_steps=1", "eval.accuracy=off"), reporter=Recorder())


@pytest.mark.slow
def test_oom_retry_halves_micro_batch_and_keeps_the_effective_batch(compose_cfg, monkeypatch):
    monkeypatch.setenv("SFT_SWEEP_INJECT_OOM_AT_STEP", "3")
    monkeypatch.setenv("SFT_SWEEP_INJECT_OOM_ABOVE", "2")  # micro-batches above 2 "do not fit"
    rec = Recorder()
    value = run(compose_cfg(*FAST, "batch.per_device_train_batch_size=8", "batch.gradient_accumulation_steps=2",
                            "eval.accuracy=off"),  # generation plays no part here: a quarter of its time
                reporter=rec)
    a = rec.attrs
    assert a["oom_retries"] == [{"at_step": 3, "micro_batch": 4, "grad_accum": 4},
                                {"at_step": 3, "micro_batch": 2, "grad_accum": 8}]
    assert (a["micro_batch"], a["grad_accum"], a["effective_batch"]) == (2, 8, 16)
    assert a["steps_trained"] == 12 and value == a["best_value"]


@pytest.mark.slow
def test_oom_at_micro_batch_one_is_a_clear_failure(compose_cfg, monkeypatch):
    monkeypatch.setenv("SFT_SWEEP_INJECT_OOM_AT_STEP", "2")
    with pytest.raises(RuntimeError, match="out of memory at step 2 with micro-batch 1 x accumulation 4"):
        run(compose_cfg(*FAST, "batch.per_device_train_batch_size=2", "batch.gradient_accumulation_steps=2",
                        "eval.accuracy=off"),
            reporter=Recorder())


# --------------------------------------------------------------------------- CLI, real processes


@pytest.mark.slow
def test_failure_cap_stops_the_sweep_with_a_clear_message(tmp_path, cache_dir):
    env_nan = {"SFT_SWEEP_INJECT_NAN_AT_STEP": "6"}
    proc = run_cli("-m", "seed=1,2,3", "hydra.sweeper.max_failures=2", *FAST, "eval.logging_steps=1",
                   f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", env=env_nan)
    assert proc.returncode != 0
    assert "stopping the sweep: 2 trial(s) failed, reaching hydra.sweeper.max_failures=2" in proc.stderr
    trials = _load(f"sqlite:///{tmp_path}/optuna.db", "demo-tiny").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]  # the third never started
    assert all("DivergedError: diverged at step 7" in t.user_attrs["error"] for t in trials)


def _cli_cmd(*args):
    return [sys.executable, str(ROOT / "train.py"), *args]


@pytest.mark.slow
def test_killed_worker_trial_is_rerun_from_its_checkpoint(tmp_path, cache_dir, storage):
    url, name = storage
    args = ["-m", "seed=1,2", *FAST, "schedule.max_steps=60", "eval.eval_steps=5",
            f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    hold = Hold(tmp_path / "hold", 12)  # step 12: two evaluations (5, 10) and a checkpoint behind it
    victim = subprocess.Popen(_cli_cmd(*args), cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", **hold.env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hold.wait(1, victim)
    t = _load(url, name).trials
    assert t[0].state == TrialState.RUNNING and _checkpointed(t[0])
    victim.send_signal(signal.SIGKILL)  # kill -9 mid-trial
    victim.wait()
    assert _load(url, name).trials[0].state == TrialState.RUNNING  # a dead worker cannot say so itself
    study = _load(url, name)  # as if it had run on another host (a lost node): only the heartbeat can tell
    study._storage.set_trial_system_attr(study.trials[0]._trial_id, "worker_process", "lost-node:1:1")

    proc = run_cli(*args)  # the same command again, at once: it says what it waits for, runs seed 2, then
    assert proc.returncode == 0, proc.stderr[-3000:]  # the dead trial's retry once its heartbeat is stale
    out = proc.stdout + proc.stderr
    assert "1 to run, 0 already done, 1 running elsewhere of this grid" in out, out[-3000:]
    assert "re-run after its heartbeat goes stale, at " in out and "(grace period 3 s)" in out
    trials = _load(url, name).trials
    assert trials[0].state == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["seed"] for t in complete) == [1, 2]  # nothing lost, nothing twice
    retry = next(t for t in complete if t.params["seed"] == 1)
    assert retry.system_attrs["failed_trial"] == 0
    resumed = retry.user_attrs["resumed_from_checkpoint"]
    assert resumed and int(resumed.rsplit("-", 1)[1]) > 0  # continued, not from step 0
    assert retry.user_attrs["steps_trained"] == 60
    assert len(trials) == 3


@pytest.mark.slow
def test_parallel_workers_share_one_study_without_duplicates(tmp_path, cache_dir, storage):
    url, name = storage
    workers, points = (4, 6) if url.startswith("postgresql") else (2, 6)  # enough points for a late worker
    seeds = ",".join(str(i) for i in range(1, points + 1))
    # the first trial waits at step 1 until a second worker's has started too: the work is shared however late
    # the other workers start
    proc = run_cli("-m", f"seed={seeds}", f"hydra.sweeper.workers={workers}", *FAST,
                   f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}",
                   f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                   env=Hold(tmp_path / "hold", 1, until=2).env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _load(url, name).trials
    assert len(trials) == points and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.params["seed"] for t in trials) == list(range(1, points + 1))
    ran_by = {t.user_attrs["worker"] for t in trials}
    assert len(ran_by) >= 2, ran_by  # the work really was shared
    assert "s3cret" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_storage_password_never_printed(tmp_path, cache_dir):
    proc = run_cli("-m", "schedule=under", "hydra.sweeper.storage=postgresql://bob:s3cret@127.0.0.1:1/none",
                   *fast("schedule.max_steps"), f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode != 0
    assert "s3cret" not in proc.stdout + proc.stderr
    assert "bob:***@127.0.0.1" in proc.stderr


def _start_until_checkpointed(args: list, url: str, name: str, hold: Hold) -> subprocess.Popen:
    """Start the CLI and return once its first trial is held at ``hold``'s step, mid-trial with two evaluations
    and a checkpoint behind it (the hold is the CLI's only: a later command's trials run through)."""
    proc = subprocess.Popen(_cli_cmd(*args), cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", **hold.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hold.wait(1, proc)
    t = _load(url, name).trials
    assert t[0].state == TrialState.RUNNING and _checkpointed(t[0])
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("signals,rc,why", [
    ([signal.SIGINT, signal.SIGINT], 130, "interrupted by the user"),  # an impatient second Ctrl-C 50 ms later
    ([signal.SIGTERM], 143, "stopped by SIGTERM"),  # what docker stop, systemd and scancel send
    ([signal.SIGHUP], 129, "stopped by SIGHUP"),  # the terminal closed
], ids=["ctrl-c twice", "sigterm", "sighup"])
def test_a_stop_signal_queues_the_trial_to_resume(tmp_path, cache_dir, signals, rc, why):
    url, name = f"sqlite:///{tmp_path}/optuna.db", "demo-tiny"
    args = ["-m", "seed=1", *FAST, "schedule.max_steps=60", "eval.eval_steps=5",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    proc = _start_until_checkpointed(args, url, name, Hold(tmp_path / "hold", 12))
    for i, sig in enumerate(signals):
        time.sleep(0.05 if i else 0)
        proc.send_signal(sig)
    assert proc.wait(timeout=120) == rc
    trials = _load(url, name).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # the retry was not lost
    assert why in trials[0].user_attrs["error"]
    assert _ok_run(run_cli(*args))
    retry = _load(url, name).trials[1]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_checkpoint"]
    assert len(_load(url, name).trials) == 2


def _worker_pid(t) -> int | None:
    proc = t.system_attrs.get("worker_process") or ""
    return int(proc.split(":")[1]) if proc.count(":") == 2 else None


def _checkpointed(t) -> bool:
    run_dir = t.user_attrs.get("run_dir")
    return bool(run_dir) and len(t.intermediate_values) >= 2 and bool(list(Path(run_dir).glob("checkpoint-*")))


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,why", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                          (signal.SIGKILL, -9, "is gone (its process ended)")],
                         ids=["SIGTERM", "kill -9"])
def test_a_stopped_or_killed_worker_its_retry_runs_before_the_sweep_ends(tmp_path, cache_dir, sig, code, why):
    """Worker 0 has finished its own trial and waits; worker 1 is stopped mid-trial (its trial queued to resume) or
    killed (its trial left RUNNING, failed by worker 0 once worker 1 has ended): the retry runs on worker 0, and
    the sweep ends with every point done and exit code 0."""
    url, name = f"sqlite:///{tmp_path}/optuna.db", "demo-tiny"
    args = ["-m", "seed=1,2", *FAST, "schedule.max_steps=150", "eval.eval_steps=5", "hydra.sweeper.workers=2",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    out_path = tmp_path / "out.log"
    hold = Hold(tmp_path / "hold", 12)  # both workers' trials stop at step 12 (two evaluations and a checkpoint)
    with open(out_path, "w") as out:
        sweep = subprocess.Popen(_cli_cmd(*args), cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", **hold.env},
                                 stdout=out, stderr=subprocess.STDOUT)
    other = next(pid for pid in hold.wait(2, sweep) if pid != sweep.pid)  # worker 1 (its own process)
    hold.release(sweep.pid)  # worker 0 finishes its trial (and would go through the step again: a retry)
    deadline, stopped = time.time() + 400, None
    while time.time() < deadline and sweep.poll() is None and stopped is None:
        trials = _load(url, name).trials
        if any(t.state == TrialState.COMPLETE and _worker_pid(t) == sweep.pid for t in trials):
            running = [t for t in trials if t.state == TrialState.RUNNING and _worker_pid(t) == other]
            assert running and _checkpointed(running[0]), [(t.number, t.state) for t in trials]
            stopped = running[0].number
            os.kill(other, sig)  # worker 1, still held mid-trial
        time.sleep(0.2)
    assert stopped is not None, "worker 0 did not finish its trial"
    assert sweep.wait(timeout=400) == 0, out_path.read_text()[-3000:]
    text = out_path.read_text()
    assert f"worker 1 exited with code {code}" in text
    assert "the other workers ended with trials left in the queue; running them here" in text
    trials = _load(url, name).trials
    assert trials[stopped].state == TrialState.FAIL and why in trials[stopped].user_attrs["error"]
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == stopped)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_checkpoint"]
    assert sorted(t.params["seed"] for t in trials if t.state == TrialState.COMPLETE) == [1, 2]


@pytest.mark.slow
def test_a_stopped_worker_whose_trial_was_taken_over_leaves_it_alone(tmp_path, cache_dir):
    """SIGSTOP past the heartbeat's grace period: another command fails the trial as stale and completes its
    retry; resumed (SIGCONT), the first command says so in one line, writes nothing and exits 0."""
    url, name = f"sqlite:///{tmp_path}/optuna.db", "demo-tiny"
    args = ["-m", "seed=1", *FAST, "schedule.max_steps=60", "eval.eval_steps=5", "hydra.sweeper.heartbeat_interval=1",
            "hydra.sweeper.grace_period=3", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    out_path = tmp_path / "out.log"
    hold = Hold(tmp_path / "hold", 12)  # the first command's trial, mid-trial with a checkpoint behind it
    with open(out_path, "w") as out:
        first = subprocess.Popen(_cli_cmd(*args), cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", **hold.env},
                                 stdout=out, stderr=subprocess.STDOUT)
    hold.wait(1, first)
    assert _checkpointed(_load(url, name).trials[0])
    # stopped while this test holds the study file's write lock: the first command cannot be stopped mid-write
    # (its heartbeat writes every second), which would leave the file locked for the second command
    db = sqlite3.connect(tmp_path / "optuna.db", timeout=60, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    first.send_signal(signal.SIGSTOP)
    db.execute("COMMIT")
    db.close()
    try:
        time.sleep(5)  # past the grace period
        assert _ok_run(run_cli(*args))  # fails trial 0 as stale and runs its retry to the end
    finally:
        hold.release()
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, out_path.read_text()[-3000:]
    text = out_path.read_text()
    assert "Traceback" not in text and "UpdateFinishedTrialError" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "by another worker while this one was stopped" in line]
    assert len(lines) == 1 and "trial 0 was recorded FAIL" in lines[0], text[-3000:]
    trials = _load(url, name).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].user_attrs["steps_trained"] == 60


def _ok_run(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return True


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_storage_password_is_written_nowhere(tmp_path, cache_dir):
    """The server trusts local connections, so a made-up password works: it must appear in no file under the
    output folder (saved Hydra configs, logs, checkpoints), no worker's command line and no console line."""
    reason = postgres_unreachable()
    if reason:
        skip_or_fail(reason)
    name = f"secret-{uuid.uuid4().hex[:8]}"
    url = PG_URL.replace("postgresql://postgres@", "postgresql://postgres:s3cretPW@")
    assert "s3cretPW" in url
    try:
        # each worker's first trial waits at step 1 until the other's has started too: both run trials
        proc = run_cli("-m", "seed=1,2,3,4", "hydra.sweeper.workers=2", *FAST, "schedule.max_steps=40",
                       f"hydra.sweeper.storage={url}",
                       f"hydra.sweeper.study_name={name}", f"paths.output_dir={tmp_path}",
                       f"paths.cache_dir={cache_dir}", env=Hold(tmp_path / "hold", 1, until=2).env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        trials = _load(PG_URL, name).trials
        assert len({t.user_attrs["worker"] for t in trials}) == 2  # a second worker process ran too
        assert "s3cretPW" not in proc.stdout + proc.stderr
        assert _files_holding(tmp_path, "s3cretPW") == []
        worker1 = next(tmp_path.rglob("worker1.log")).read_text()  # its command had no password to mask
        saved = "".join(p.read_text() for p in tmp_path.rglob("hydra.yaml"))
        assert "hydra.sweeper.storage='postgresql://postgres@127.0.0.1:5432/test'" in saved, saved[-2000:]
        assert "s3cretPW" not in worker1
    finally:
        try:
            optuna.delete_study(study_name=name, storage=PG_URL)
        except KeyError:
            pass


@pytest.mark.slow
def test_a_dead_worker_of_this_host_is_reclaimed_at_once(tmp_path, cache_dir):
    url, name = f"sqlite:///{tmp_path}/optuna.db", "demo-tiny"
    args = ["-m", "seed=1", *FAST, "schedule.max_steps=60", "eval.eval_steps=5",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]  # default 60 s heartbeat
    victim = _start_until_checkpointed(args, url, name, Hold(tmp_path / "hold", 12))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    proc = run_cli(*args)  # at once: no waiting for the 120 s grace period
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "trial 0: its worker " in out and "is gone; recorded FAIL and queued to resume from its checkpoint at step " in out
    assert "1 to run, 0 already done, 0 running elsewhere of this grid" in out
    trials = _load(url, name).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["resumed_from_checkpoint"] and trials[1].user_attrs["steps_trained"] == 60


@pytest.mark.slow
def test_workers_opening_a_fresh_postgres_database_at_once(tmp_path):
    """Optuna creates its schema on first use; several workers doing so at once on a new database must
    all open it (the 'same command on every array task' recipe)."""
    reason = postgres_unreachable()
    if reason:
        skip_or_fail(reason)
    import sqlalchemy

    db = f"sftsweep_fresh_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
    url = PG_URL.rsplit("/", 1)[0] + f"/{db}"
    code = f"from sweeper.storage import open_storage; open_storage({url!r}, heartbeat_interval=60); print('ok')"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 and o.strip() == "ok" for p, (o, _) in zip(procs, outs)), [e[-500:] for _, e in outs]
    finally:
        admin.dispose()
        with sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT").connect() as c:
            c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))


@pytest.mark.slow
def test_a_ctrl_c_a_finalizer_swallows_mid_trial_stops_the_trial_within_a_step(tmp_path, cache_dir):
    """The Ctrl-C lands in a finalizer at step 8 (Python drops its KeyboardInterrupt there): the trial stops at
    once, as after any Ctrl-C (recorded FAIL, queued to resume; exit 130, one line), rather than training to its
    end and stopping the sweep only before the next trial."""
    url, name = f"sqlite:///{tmp_path}/optuna.db", "demo-tiny"
    args = ["-m", "seed=1,2", *FAST, "schedule.max_steps=60", "eval.eval_steps=5",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    proc = subprocess.run(_cli_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "SFT_SWEEP_INJECT_SWALLOW_CTRL_C_AT_STEP": "8"})
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    trials = _load(url, name).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # trial 0's retry, queued
    assert "interrupted by the user" in trials[0].user_attrs["error"]
    assert max(trials[0].intermediate_values) < 60  # stopped mid-trial, not after its 60 steps
