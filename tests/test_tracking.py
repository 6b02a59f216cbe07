"""tracking=mlflow / tracking=wandb: trials in the team's tracker, grouped by study.

MLflow: a real ``mlflow server`` (SQLite backend, artifacts proxied, a free localhost port) started by a
fixture; what the sweeps left there is read back with MLflow's own client. W&B: offline mode
(``WANDB_MODE=offline``), its run files read back as ``wandb sync`` reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from .conftest import run_cli
from .helpers import fast
from .helpers.cli import run_in_process
from .helpers.ports import free_port

TrialState = optuna.trial.TrialState
PLANTED = "planted-pw-7Qx9"  # MLFLOW_TRACKING_PASSWORD: must be written nowhere
BASE = [*fast("schedule.max_steps"), "lr.warmup_steps=2"]  # the grid and the WSD search share every setting
WSD = ["schedule=wsd_search", "schedule.wsd.decay_fraction=0.25", "schedule.wsd.stop_after_worse=null",
       "schedule.wsd.no_win_patience=null"]
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_DISABLE_CODE": "true"}


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# the tracking server is a service beside the project, as PostgreSQL is: .ci/run installs the full `mlflow` (its web
# UI included) into a venv of its own and names its Python here; without it, this environment's mlflow serves
SERVER_PYTHON = os.environ.get("SFT_SWEEP_TEST_MLFLOW_PYTHON") or sys.executable


def _server_has_ui() -> bool:
    """Whether the server's mlflow ships the web UI (the full package does, mlflow-skinny does not)."""
    found = subprocess.run([SERVER_PYTHON, "-c", "import mlflow, pathlib; print(pathlib.Path(mlflow.__file__).parent)"],
                           capture_output=True, text=True)
    return found.returncode == 0 and (Path(found.stdout.strip()) / "server" / "js" / "build" / "index.html").is_file()


def _start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend, artifacts under ``tmp``), up and answering."""
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [SERVER_PYTHON, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
         "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **QUIET}, cwd=tmp)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
        time.sleep(1)


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module's MLflow tests."""
    pytest.importorskip("mlflow")
    proc, uri = _start_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    _stop_server(proc)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client, experiment: str) -> dict[str, object]:
    e = client.get_experiment_by_name(experiment)
    assert e is not None, f"no experiment {experiment!r}"
    return {r.info.run_name: r for r in client.search_runs([e.experiment_id], max_results=1000)}


def _env(uri: str) -> dict:
    return {**QUIET, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": PLANTED}


def _paths(tmp: Path, cache_dir: Path, study: str = "demo-tiny") -> list[str]:
    return [f"paths.output_dir={tmp}/outputs", f"paths.cache_dir={cache_dir}",
            f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db", f"hydra.sweeper.study_name={study}"]


def _no_secret_under(*places: Path) -> None:
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        for path in files:
            assert PLANTED.encode() not in path.read_bytes(), f"the planted password is in {path}"


# --------------------------------------------------------------------------- fast: configs and bad input


def test_nothing_of_mlflow_or_wandb_is_imported_unless_chosen():
    code = ("import sys; from sweeper import study, runner, tracking, trial; from sweeper.train import main; "
            "bad = [m for m in ('mlflow', 'wandb') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("tracking,precision,left_out,extra", [
    ("none", "fp32", ["wandb", "bitsandbytes"], []), ("wandb", "fp32", ["bitsandbytes"], []),
    ("none", "qlora4", ["wandb"], []), ("none", "fp32", ["wandb"], ["lr.optim=paged_adamw_8bit"]),
    ("none", "fp32", ["wandb"], ["lr.optim=adamw_bnb_8bit"]),
    ("none", "fp32", ["wandb", "bitsandbytes"], ["lr.optim=adamw_torch_fused"]),
])
def test_a_command_leaves_out_the_extras_none_of_its_runs_uses(compose_cfg, monkeypatch, tracking, precision, left_out,
                                                               extra):
    from sweeper import extras

    monkeypatch.setattr(sys, "modules", {k: v for k, v in sys.modules.items() if k not in ("transformers", "wandb",
                                                                                            "bitsandbytes")})
    monkeypatch.setattr(extras, "_decided", False)
    monkeypatch.setattr(extras, "_allowed", False)
    cfgs = [compose_cfg(), compose_cfg(f"tracking={tracking}", f"precision={precision}", *extra)]
    assert extras.leave_out_unused(cfgs) == []  # not a command's own process (a test, a notebook): nothing
    monkeypatch.setattr(extras, "_decided", False)
    monkeypatch.setattr(extras, "_allowed", True)
    assert extras.leave_out_unused(None) == [] and extras.leave_out_unused(cfgs) == []  # unknown points: the
    monkeypatch.setattr(extras, "_decided", False)  # first decision holds, and keeps everything
    assert extras.leave_out_unused(cfgs) == left_out
    assert all(sys.modules[name] is None for name in left_out) and extras.leave_out_unused([compose_cfg()]) == []


@pytest.mark.parametrize("option", ["none", "mlflow", "wandb"])
def test_every_tracking_option_composes_and_validates(compose_cfg, option):
    from sweeper import config as config_mod
    from sweeper import identity

    if option != "none":
        pytest.importorskip(option)
    cfg = compose_cfg(f"tracking={option}")
    assert cfg.hydra.runtime.choices["tracking"] == option and cfg.tracking.backend == option
    config_mod.validate(cfg)
    assert not any(k.startswith("tracking.") for k in identity.result_config(cfg))  # never a changed setting
    assert compose_cfg(hydra=False).tracking.backend == "none"  # the default


def test_tracking_uri_with_a_password_is_refused_in_one_line(tmp_path):
    pytest.importorskip("mlflow")
    proc = run_in_process("-m", *fast(), "tracking=mlflow", f"tracking.uri=http://bob:{PLANTED}@127.0.0.1:9",
                          f"paths.output_dir={tmp_path}", f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    assert len(lines) == 1 and "tracking.uri=http://bob:***@127.0.0.1:9 carries a password" in lines[0], proc.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert PLANTED not in proc.stdout + proc.stderr
    _no_secret_under(tmp_path)


@pytest.mark.parametrize("uri", ["file:///{tmp}/mlruns", "{tmp}/mlruns"])
def test_an_mlflow_file_store_that_mlflow_will_not_open_is_refused_before_any_trial(compose_cfg, monkeypatch, tmp_path,
                                                                                    uri):
    from sweeper import config as config_mod

    pytest.importorskip("mlflow")
    pytest.importorskip("mlflow.environment_variables").MLFLOW_ALLOW_FILE_STORE  # an MLflow that refuses file stores
    uri = uri.format(tmp=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=r"tracking=mlflow: MLFLOW_TRACKING_URI=.*mlruns is MLflow's file store") as e:
        config_mod.validate(compose_cfg("tracking=mlflow"))
    assert "sqlite:///mlflow.db" in str(e.value) and "MLFLOW_ALLOW_FILE_STORE=true" in str(e.value)
    with pytest.raises(ValueError, match=r"tracking.uri=.*mlruns is MLflow's file store"):
        config_mod.validate(compose_cfg("tracking=mlflow", f"tracking.uri={uri}"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own way to keep a file store
    config_mod.validate(compose_cfg("tracking=mlflow"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    for ok in (f"sqlite:///{tmp_path}/mlflow.db", "http://127.0.0.1:9"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", ok)
        config_mod.validate(compose_cfg("tracking=mlflow"))
    assert not list(tmp_path.iterdir())  # the check opens no store


# --------------------------------------------------------------------------- MLflow, a real server


@pytest.mark.slow
def test_grid_and_wsd_search_land_in_one_experiment(tmp_path, cache_dir, mlflow_server):
    env = _env(mlflow_server)
    grid = _ok(run_in_process("-m", *BASE, "schedule.max_steps=8,12", "tracking=mlflow", *_paths(tmp_path, cache_dir),
                       env=env))
    wsd = _ok(run_in_process("-m", *BASE, *WSD, "schedule.wsd.candidates=[8,16]", "tracking=mlflow",
                      *_paths(tmp_path, cache_dir), env=env))
    assert "tracking:" not in grid.stdout + grid.stderr + wsd.stdout + wsd.stderr  # nothing went wrong with the tracker
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = {t.number: t for t in study.trials}
    assert [t.state for t in trials.values()] == [TrialState.COMPLETE] * 4  # 2 grid, the trunk, its branch
    trunk = next(t for t in trials.values() if t.params.get("method") == "wsd" and "wsd_branch_of" not in t.system_attrs)
    branch = next(t for t in trials.values() if t.system_attrs.get("wsd_branch_of") == trunk.number)

    client = _client(mlflow_server)
    runs = _runs(client, "demo-tiny")
    study_run = runs["study demo-tiny"]
    assert sorted(runs) == ["study demo-tiny", "trial_0", "trial_1", f"trial_{trunk.number}",
                            f"trial_{trunk.number}/branch-8"]
    for t in trials.values():  # one run per trial, its id kept on the trial, its state and number on the run
        name = f"trial_{trunk.number}/branch-8" if t is branch else f"trial_{t.number}"
        run = runs[name]
        assert t.user_attrs["tracking_run"]["run_id"] == run.info.run_id
        tags = run.data.tags
        assert tags["sft_sweep.state"] == "COMPLETE" and tags["optuna.trial_number"] == str(t.number)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["objective"] == pytest.approx(t.value)
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")}
        curve = dict(t.intermediate_values)  # the eval curve as the study holds it; a branch's run has its cooldown's
        if t is branch:
            curve = {s: v for s, v in curve.items() if s > t.user_attrs["wsd"]["branch_point"]}
        assert sorted(history) == sorted(curve) and list(history.values()) == pytest.approx([curve[s] for s in history])
        assert client.get_metric_history(run.info.run_id, "loss")  # the train curve
    # grouped: the trials under the study's run, the branch under its trunk's
    for n in (0, 1, trunk.number):
        assert runs[f"trial_{n}"].data.tags["mlflow.parentRunId"] == study_run.info.run_id
    assert runs[f"trial_{trunk.number}/branch-8"].data.tags["mlflow.parentRunId"] == runs[f"trial_{trunk.number}"].info.run_id
    # params: the trial's settings
    assert runs["trial_0"].data.params["schedule.max_steps"] == "8"
    assert runs["trial_1"].data.params["schedule.max_steps"] == "12"
    assert runs[f"trial_{trunk.number}"].data.params["schedule.wsd.candidates"] == "[8, 16]"
    # the study's run: the recommendation, the report and its figures
    best = study.best_trial
    assert study_run.data.tags["sft_sweep.best_trial"] == str(best.number)
    assert study_run.data.metrics["recommended.max_steps"] == best.user_attrs["max_steps"]
    assert "reached the lowest eval_loss" in study_run.data.tags["mlflow.note.content"]
    artifacts = {Path(a.path).name for a in client.list_artifacts(study_run.info.run_id, "report")}
    assert {"report.html", "summary.md", "demo-tiny.png"} <= artifacts
    # no secret in the outputs, the study or the command's output
    assert PLANTED not in grid.stdout + grid.stderr + wsd.stdout + wsd.stderr
    _no_secret_under(tmp_path / "outputs", tmp_path / "optuna.db")


@pytest.mark.slow
def test_killed_trunk_resumes_into_the_same_run(tmp_path, cache_dir, mlflow_server):
    env = _env(mlflow_server)
    args = ["-m", *BASE, *WSD, "schedule.wsd.candidates=[8,16,24]", "tracking=mlflow",
            *_paths(tmp_path, cache_dir, "killed"), "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    # kill -9 at trunk step 10: after branch 8 was recorded, between the trunk's checkpoints 6 and 12
    killed = run_cli(*args, env={**env, "SFT_SWEEP_INJECT_KILL_AT_STEP": "10"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    client = _client(mlflow_server)
    first = _runs(client, "killed")["trial_0"]
    assert first.info.status == "RUNNING"
    time.sleep(4)  # past the grace period
    _ok(run_cli(*args, env=env))  # the same command again resumes the trunk from its checkpoint

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path}/optuna.db")
    trunk = next(t for t in study.trials if t.state == TrialState.COMPLETE and t.params["max_steps"] == 24)
    assert trunk.system_attrs["failed_trial"] == 0 and trunk.number != 0
    runs = _runs(client, "killed")
    assert sorted(runs) == ["study killed", "trial_0", "trial_0/branch-16", "trial_0/branch-8"]  # one trunk run
    run = runs["trial_0"]
    assert run.info.run_id == first.info.run_id == trunk.user_attrs["tracking_run"]["run_id"]
    assert run.info.status == "FINISHED" and run.data.tags["sft_sweep.state"] == "COMPLETE"
    assert run.data.tags["optuna.trial_number"] == str(trunk.number) and run.data.tags["sft_sweep.retry_of"] == "0"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")})
    assert steps == [4, 8, 12, 16, 20, 24]  # before the kill and after the resume, in one run
    for name in ("trial_0/branch-8", "trial_0/branch-16"):
        b = runs[name]
        assert b.info.status == "FINISHED" and b.data.tags["sft_sweep.state"] == "COMPLETE"
        assert b.data.tags["mlflow.parentRunId"] == run.info.run_id


@pytest.mark.slow
def test_a_tracker_that_is_down_costs_one_line_and_no_trial(tmp_path, cache_dir):
    pytest.importorskip("mlflow")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _ok(run_cli("-m", *BASE, "schedule.max_steps=8,12", "tracking=mlflow", *_paths(tmp_path, cache_dir),
                       env={**_env(down), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}))
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "tracking:" in line]
    for n in (0, 1):  # one line per trial, naming the server and what goes on
        mine = [line for line in lines if f"for trial {n} " in line]
        assert len(mine) == 1 and f"MLflow at {down} failed" in mine[0] and "goes on without tracking" in mine[0]
    assert len(lines) == 3 and "the summary of study 'demo-tiny'" in lines[-1], lines
    assert "Traceback" not in proc.stderr
    assert all("tracking_run" not in t.user_attrs for t in study.trials)
    assert PLANTED not in proc.stdout + proc.stderr
    _no_secret_under(tmp_path / "outputs", tmp_path / "optuna.db")


class _Front:
    """What the sweep takes for the tracking server: a front on a port of its own that passes every request on to
    the real server, until the first request that logs ``eval_loss`` has been answered; from then on it is down
    (each connection is closed unanswered, the port stops listening). So the server stops at a known point of
    trial 0, after its first evaluation and before its later ones, however fast the machine trains."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import http.server

        front = self
        self.down = threading.Event()
        host, port = upstream.removeprefix("http://").split(":")

        class Handler(http.server.BaseHTTPRequestHandler):
            def _pass_on(self) -> None:
                if front.down.is_set():
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                if "log-batch" in self.path and any(m.get("key") == "eval_loss"
                                                    for m in json.loads(body or b"{}").get("metrics", [])):
                    front.down.set()  # before the answer goes out: the trial's next call finds the server down
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                if front.down.is_set():
                    threading.Thread(target=front.server.server_close, daemon=True).start()

            do_GET = do_POST = do_PATCH = do_DELETE = _pass_on

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_server_stopped_mid_sweep_loses_no_trial(tmp_path, cache_dir):
    """The tracking server goes down after trial 0's first evaluation reached it: trial 0 trains on to its end
    and trial 1 trains too, each with one warning line, and the study keeps both."""
    pytest.importorskip("mlflow")
    (tmp_path / "server").mkdir()
    server, uri = _start_server(tmp_path / "server")
    front = _Front(uri)
    try:
        # a process of its own, as for the tracker down from the start: the per-trial warning is a log line, and
        # an earlier in-process run of this test process can leave that logger's output elsewhere
        proc = _ok(run_cli("-m", *BASE, "schedule.max_steps=12,16", "tracking=mlflow", *_paths(tmp_path, cache_dir),
                           env={**_env(front.uri), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}))
        client = _client(uri)  # the real server behind the front: what reached it before it went down
        runs = client.search_runs([client.get_experiment_by_name("demo-tiny").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["study demo-tiny", "trial_0"]  # trial 1 found it down
        trial_0 = next(r for r in runs if r.info.run_name == "trial_0")
        assert len(client.get_metric_history(trial_0.info.run_id, "eval_loss")) == 1
    finally:
        front.close()
        _stop_server(server)
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert len(study.trials[0].intermediate_values) == 3  # trial 0 trained on to its end
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "tracking:" in line]
    for n in (0, 1):
        assert len([line for line in lines if f"for trial {n} " in line]) == 1, lines
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_experiment_page_in_the_mlflow_ui(tmp_path, cache_dir, request):
    """The experiment's runs page of the tests' MLflow server, in headless Chromium: the study's run and its
    trials by name; the full-page screenshot goes to the test artifacts."""
    from .test_report import ARTIFACTS, CHROMIUM_ARGS, _chromium

    chromium = _chromium()
    pytest.importorskip("mlflow")
    if not _server_has_ui():
        if os.environ.get("SFT_SWEEP_TEST_MLFLOW_PYTHON"):
            pytest.fail(f"{SERVER_PYTHON} has no MLflow UI: .ci/run installs the full mlflow there")
        pytest.skip("the MLflow UI is not installed: mlflow-skinny has none; set SFT_SWEEP_TEST_MLFLOW_PYTHON to the "
                    "Python of a venv holding the full `mlflow` (as .ci/run does)")
    from playwright.sync_api import sync_playwright

    mlflow_server = request.getfixturevalue("mlflow_server")  # started only when the page can be shown
    _ok(run_in_process("-m", *BASE, "schedule.max_steps=8,12", "tracking=mlflow", *_paths(tmp_path, cache_dir, "ui-tiny"),
                env=_env(mlflow_server)))
    experiment = _client(mlflow_server).get_experiment_by_name("ui-tiny")
    assert experiment is not None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mlflow-experiment.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1000})
        page.goto(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs")
        page.wait_for_selector("text=study ui-tiny", timeout=90_000)
        # the trials are nested under the study's run, collapsed: its row's expander shows them
        page.locator('[role="gridcell"]', has_text="study ui-tiny").locator("button").first.click()
        page.wait_for_selector("text=trial_1", timeout=60_000)
        body = page.inner_text("body")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert "ui-tiny" in body and "study ui-tiny" in body  # the experiment and the study's run
    assert "trial_0" in body and "trial_1" in body and "3 matching runs" in body  # its trials, nothing else
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


# --------------------------------------------------------------------------- W&B, offline


@pytest.mark.slow
def test_wandb_offline_runs_hold_the_group_names_states_and_curves(tmp_path, cache_dir):
    pytest.importorskip("wandb")
    from .helpers.wandb_files import read_run

    env = {**QUIET, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": PLANTED * 3}
    grid = _ok(run_cli("-m", *BASE, "schedule.max_steps=8,12", "tracking=wandb", "tracking.project=sweeps",
                       *_paths(tmp_path, cache_dir), env=env))
    wsd = _ok(run_cli("-m", *BASE, *WSD, "schedule.wsd.candidates=[8,16]", "tracking=wandb", "tracking.project=sweeps",
                      *_paths(tmp_path, cache_dir), env=env))
    assert "tracking:" not in grid.stdout + grid.stderr + wsd.stdout + wsd.stderr
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # 2 grid, the trunk, its branch
    trunk = next(t for t in trials if t.params.get("method") == "wsd" and "wsd_branch_of" not in t.system_attrs)
    branch = next(t for t in trials if t.system_attrs.get("wsd_branch_of") == trunk.number)
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    runs = {}
    for r in map(read_run, files):  # the study's summary run is resumed by each command: keep its last file
        runs[r["run"]["name"]] = r
    assert sorted(runs) == ["study demo-tiny", "trial_0", "trial_1", f"trial_{trunk.number}",
                            f"trial_{trunk.number}/branch-8"]
    assert {r["run"]["group"] for r in runs.values()} == {"demo-tiny"}
    assert runs["study demo-tiny"]["run"]["job_type"] == "summary"
    for t in trials:
        name = f"trial_{trunk.number}/branch-8" if t is branch else f"trial_{t.number}"
        r = runs[name]
        assert r["run"]["job_type"] == ("branch" if t is branch else "trial")
        assert r["run"]["id"] == t.user_attrs["tracking_run"]["run_id"]
        assert r["summary"]["state"] == "COMPLETE" and r["summary"]["optuna.trial_number"] == str(t.number)
        assert r["summary"]["objective"] == pytest.approx(t.value)
        assert r["exit_code"] == 0
        evals = {h["train/global_step"]: h["eval/loss"] for h in r["history"] if "eval/loss" in h}
        curve = dict(t.intermediate_values)
        if t is branch:  # its run holds its cooldown; the trunk's evaluations before are the trunk run's
            curve = {s: v for s, v in curve.items() if s > t.user_attrs["wsd"]["branch_point"]}
        assert evals == pytest.approx(curve, rel=1e-6)
        assert any("train/loss" in h for h in r["history"])
    for t in trials[:2]:
        assert runs[f"trial_{t.number}"]["config"]["schedule.max_steps"] == t.params["schedule.max_steps"]
    assert runs[f"trial_{trunk.number}/branch-8"]["config"]["trunk_run"] == trunk.user_attrs["tracking_run"]["run_id"]
    assert runs["study demo-tiny"]["summary"]["sft_sweep.best_trial"] == str(study.best_trial.number)
    _no_secret_under(tmp_path / "outputs", tmp_path / "optuna.db")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "qlora4"])
def test_the_data_checks_child_leaves_out_what_its_run_does_not_use(compose_cfg, tmp_path, precision):
    """A GPU sweep's data check runs in a child of the command (``python -m sweeper.sft -``; here given a config
    file): that child is the command's own too, and its check tracks nothing and loads no 4-bit base (TRL prepares
    the data with a stand-in model), so bitsandbytes stays out of it whatever the run, a QLoRA run's included."""
    pytest.importorskip("bitsandbytes")
    from omegaconf import OmegaConf

    cfg = compose_cfg(f"precision={precision}", *(["peft=lora"] if precision == "qlora4" else []))
    path = tmp_path / "run.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))
    code = ("import sys; from sweeper import sft; rc = sft._check_in_child(sys.argv[1]); "
            "print(rc, sys.modules.get('bitsandbytes', 'never imported') is not None)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.stdout.split()[-2:] == ["0", "False"], proc.stdout + proc.stderr[-2000:]
