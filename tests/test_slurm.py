"""Workers as SLURM jobs (``hydra.sweeper.launcher=slurm``) on a real one-node SLURM cluster
(`.ci/slurm-up.sh` starts it: Debian's slurmctld, slurmd, slurmdbd and munge) sharing a study on the
real PostgreSQL server. The node has no GPU, so the jobs are CPU jobs (``gpus_per_worker=0``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from .conftest import FAST, PG_URL, ROOT, load_study, postgres_unreachable, run_cli, skip_or_fail
from .helpers import Hold

pytestmark = pytest.mark.slow
TrialState = optuna.trial.TrialState


def _slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed here (no sbatch); run .ci/slurm-up.sh as root"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if out.returncode != 0 or not any(s.strip().rstrip("*") in ("idle", "mixed", "allocated", "completing")
                                      for s in out.stdout.split()):
        return f"no SLURM node up (sinfo: {out.stdout.strip() or out.stderr.strip()}); run .ci/slurm-up.sh"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed: pip install -e '.[slurm]'"
    return None


@pytest.fixture
def pg_study():
    for reason in (_slurm_unavailable(), postgres_unreachable()):
        if reason:
            skip_or_fail(reason)
    name = f"slurm-{uuid.uuid4().hex[:8]}"
    yield PG_URL, name
    try:
        optuna.delete_study(study_name=name, storage=PG_URL)
    except KeyError:
        pass


def _slurm_args(url, name, tmp_path, cache_dir, *extra):
    return ["-m", *extra, "hydra.sweeper.launcher=slurm", "hydra.sweeper.slurm.gpus_per_worker=0",
            "hydra.sweeper.slurm.cpus_per_worker=1", "hydra.sweeper.slurm.time_min=60",
            "hydra.sweeper.slurm.poll_s=1", f"hydra.sweeper.storage={url}", f"hydra.sweeper.study_name={name}",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]


def _load(url, name):
    return load_study(url, name)


def test_four_points_two_slurm_workers_no_duplicate_none_lost(tmp_path, cache_dir, pg_study):
    url, name = pg_study
    with_password = url.replace("postgresql://postgres@", "postgresql://postgres:s3cretPW@")  # trust auth
    # each job's first trial waits at step 1 until the other job's has started too (the jobs inherit this
    # environment), so both jobs run trials however late SLURM starts the second
    proc = run_cli(*_slurm_args(with_password, name, tmp_path, cache_dir, "seed=1,2,3,4", *FAST,
                                "hydra.sweeper.workers=2"),
                   env={"OMP_NUM_THREADS": "1", **Hold(tmp_path / "hold", 1, until=2).env})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # the password reached the jobs as PGPASSWORD: in no job script, pickled command, log or saved config
    assert "s3cretPW" not in proc.stdout + proc.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file() and b"s3cretPW" in p.read_bytes()] == []
    study = _load(url, name)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted(t.params["seed"] for t in trials) == [1, 2, 3, 4]  # each point once
    jobs = {t.user_attrs["slurm_job"] for t in trials}
    assert len(jobs) == 2 and jobs <= set(study.user_attrs["slurm_jobs"]), (jobs, study.user_attrs)
    out = proc.stdout + proc.stderr
    assert "submitted 2 SLURM worker job(s)" in out
    assert "**Recommended for demo" in proc.stdout  # the parent waited and printed the report


def test_scancel_of_a_worker_mid_trial_reruns_its_trial_from_its_checkpoint(tmp_path, cache_dir, pg_study):
    url, name = pg_study
    args = _slurm_args(url, name, tmp_path, cache_dir, "seed=1,2", *FAST, "schedule.max_steps=150",
                       "eval.eval_steps=5", "hydra.sweeper.workers=2", "hydra.sweeper.heartbeat_interval=1",
                       "hydra.sweeper.grace_period=3")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    parent = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, deadline = None, time.time() + 300
    while time.time() < deadline and parent.poll() is None and victim is None:
        try:
            trials = _load(url, name).trials
        except KeyError:
            trials = []
        for t in trials:
            run_dir = t.user_attrs.get("run_dir")
            if (t.state == TrialState.RUNNING and run_dir and len(t.intermediate_values) >= 2
                    and list(Path(run_dir).glob("checkpoint-*"))):
                victim = t
                break
        time.sleep(0.2)
    assert victim is not None, "no trial reached a checkpoint while running"
    subprocess.run(["scancel", victim.user_attrs["slurm_job"]], check=True)
    out, _ = parent.communicate(timeout=600)
    assert parent.returncode == 0, out[-3000:]

    trials = _load(url, name).trials
    cancelled = trials[victim.number]
    assert cancelled.state == TrialState.FAIL and "SIGTERM" in cancelled.user_attrs["error"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["seed"] for t in complete) == [1, 2]  # nothing lost, nothing twice
    retry = next(t for t in complete if t.params["seed"] == victim.params["seed"])
    assert retry.system_attrs["failed_trial"] == victim.number
    resumed = retry.user_attrs["resumed_from_checkpoint"]
    assert resumed and int(resumed.rsplit("-", 1)[1]) > 0  # continued, not from step 0
    assert retry.user_attrs["steps_trained"] == 150
    assert retry.user_attrs["slurm_job"] != victim.user_attrs["slurm_job"]


def test_detached_sweep_is_followed_with_status(tmp_path, cache_dir, pg_study):
    url, name = pg_study
    proc = run_cli(*_slurm_args(url, name, tmp_path, cache_dir, "seed=1", *FAST, "hydra.sweeper.slurm.wait=false"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "python -m sweeper status" in proc.stdout
    deadline, text = time.time() + 300, ""
    while time.time() < deadline:
        status = subprocess.run([sys.executable, "-m", "sweeper", "status", "--storage", url, "--study", name],
                                cwd=ROOT, capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        text = status.stdout
        if f"study {name}: 1 COMPLETE" in text and "COMPLETED" in text:
            break
        time.sleep(2)
    assert f"study {name}: 1 COMPLETE, 0 RUNNING" in text, text
    job = _load(url, name).trials[0].user_attrs["slurm_job"]
    assert f"SLURM worker jobs: {job} COMPLETED" in text, text
    assert "best so far: trial 0 eval_loss" in text
