"""Bad input: one clear line naming the key, file or option, no traceback, nothing written to a study.
A table of real CLI runs (`python train.py -m ...`, `python -m sweeper ...`) and their expected messages."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from .conftest import FAST, ROOT, run_cli


def _non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
    path.write_bytes(good.encode() * 2 + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"))
    return ["data=jsonl", f"data.train_path={path}"]


CASES = [
    # (id, overrides or a function of tmp_path giving them, the line expected on stderr)
    ("reversed interval", ["lr.learning_rate=interval(3e-4,1e-5)"],
     "lr.learning_rate=interval(0.0003,1e-05): the low end must not exceed the high end"),
    ("log interval from 0", ["lr.learning_rate=tag(log,interval(0,1e-3))"], "needs a low end above 0"),
    ("non-UTF-8 data", _non_utf8, "line 3 is not UTF-8 text (byte 0xe9"),
    ("mysql without its driver", ["hydra.sweeper.storage=mysql://root@127.0.0.1:3306/test"],
     "hydra.sweeper.storage=mysql://root@127.0.0.1:3306/test needs a database driver that is not installed"),
    ("misspelt key added with +", ["+eval.eval_step=5"], "did you mean eval.eval_steps?"),
    ("fp16 on a CPU machine", ["precision=fp16"], "needs a CUDA GPU, and none is visible"),
    ("workers zero", ["hydra.sweeper.workers=0"], "hydra.sweeper.workers must be auto or a whole number >= 1"),
    ("workers not a number", ["hydra.sweeper.workers=zero"], "but got 'zero'"),
    ("several GPUs for one worker", ["hydra.sweeper.gpus=['0,1']"],
     "one trial runs on one GPU (for now), so each entry is one GPU id"),
    ("unknown launcher", ["hydra.sweeper.launcher=k8s"], "hydra.sweeper.launcher must be one of local, slurm, but got 'k8s'"),
    ("SLURM on SQLite", ["hydra.sweeper.launcher=slurm"], "SQLite"),
    ("SLURM with two GPUs a trial", ["hydra.sweeper.launcher=slurm", "hydra.sweeper.storage=postgresql://x@h/db",
                                     "hydra.sweeper.slurm.gpus_per_worker=2"], "one trial runs on one GPU (for now)"),
    ("hub model without its name", ["model=hub", "model.path=Qwen/Qwen2.5-0.5B-Instruct"], "model.name must be set"),
    ("study name with a slash", ["hydra.sweeper.study_name=runs/a"],
     "hydra.sweeper.study_name='runs/a' cannot name a study and its folder: it holds '/'"),
    ("study name '..'", ["hydra.sweeper.study_name=.."], "it is a relative folder name"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_sweep_input_is_one_clear_line(tmp_path, cache_dir, case):
    _, overrides, needle = case
    args = overrides(tmp_path) if callable(overrides) else overrides
    proc = run_cli("-m", "seed=1,2", *FAST, *args, f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "optuna.db").exists()  # no study, no trial


def _sweeper(*args):
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_dashboard_on_a_busy_or_impossible_port(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(storage=url, study_name="s")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = _sweeper("dashboard", "--storage", url, "--port", str(port))
        assert proc.returncode == 2 and f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in proc.stderr
    proc = _sweeper("dashboard", "--storage", url, "--port", "99999")
    assert proc.returncode == 2 and "error: --port 99999: a TCP port is 1..65535" in proc.stderr
    assert "Listening" not in proc.stdout + proc.stderr


def test_report_out_where_nothing_can_be_written(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s")
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 1.0}, user_attrs={"max_steps": 1}))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = _sweeper("report", "--storage", url, "--out", str(blocker / "report"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --out {blocker / 'report'}: cannot write the report there" in proc.stderr


@pytest.mark.slow
def test_a_study_name_that_needs_quoting_runs_and_resumes(tmp_path, cache_dir):
    import optuna

    name = "my study ü 日本 'v2'"
    args = ["-m", "seed=1", *FAST, f"hydra.sweeper.study_name={name!r}".replace("\\'", "\\\\'"),
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    for _ in range(2):  # the second run resumes: nothing new, no orphan RUNNING trial
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"]
    assert (tmp_path / "sweeps" / name / "trial_0").is_dir()
