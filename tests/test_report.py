"""Report: diagnosis on crafted curves and on a real run that over-fits; PNG/HTML; dashboard in a
real headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from sweeper.report import diagnose

from .conftest import FAST, ROOT, run_cli

ARTIFACTS = Path(os.environ.get("SFT_SWEEP_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.mark.parametrize("curve,train,verdict,needle", [
    ([[10, 3.0], [20, 2.0], [30, 1.5], [40, 1.2]], [], "under-trained", "still falling at the end"),
    ([[10, 3.0], [20, 1.0], [30, 0.9], [40, 1.1], [50, 1.3]], [[10, 3.0], [30, 0.8], [50, 0.2]],
     "over-trained", "turned up after step 30 (best 0.9000, end 1.3000, +44.4%) while train loss kept falling"),
    ([[10, 2.0], [20, 2.005], [30, 1.998], [40, 2.001]], [], "plateau", "consider a lower learning rate"),
    ([[10, 3.0], [20, 1.0], [30, 0.901], [40, 0.900], [50, 0.9005]], [], "good", "flattened"),
    ([[10, 3.0]], [], "no curve", "fewer than two evaluations"),
])
def test_diagnosis_on_crafted_curves(curve, train, verdict, needle):
    d = diagnose(curve, train)
    assert d.verdict == verdict and needle in d.reason


@pytest.fixture(scope="module")
def overfit_sweep(tmp_path_factory, cache_dir):
    """A real sweep: 20 steps (too short) and 150 steps of 24 rows at a high constant LR (over-fits)."""
    out = tmp_path_factory.mktemp("overfit")
    proc = run_cli("-m", "schedule.max_steps=20,150", *FAST[1:], "eval.eval_steps=10", "eval.logging_steps=10",
                   "eval.early_stopping_patience=null", "lr.learning_rate=3e-3",
                   "lr.lr_scheduler_type=constant_with_warmup", "batch.per_device_train_batch_size=8",
                   "data.demo_rows=200", "data.max_train_rows=24", f"paths.output_dir={out}",
                   f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_report_names_a_step_count_and_diagnoses_the_real_overfit(overfit_sweep):
    out = overfit_sweep
    proc = subprocess.run([sys.executable, "-m", "sweeper", "report", "--storage", f"sqlite:///{out}/optuna.db",
                           "--out", str(out / "report")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report" / "summary.md").read_text()
    assert "**Recommended for demo: max_steps=" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "COMPLETE" in line}
    assert rows["0"].rstrip(" |").endswith("under-trained")  # 20 steps: still falling
    assert rows["1"].rstrip(" |").endswith("over-trained")  # 150 steps on 24 rows: turned up
    assert "while train loss kept falling" in md
    assert "SFTConfig(\n    max_steps=" in md and "learning_rate=0.003" in md
    png = out / "report" / "demo-tiny.png"
    assert png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "over-trained" in html
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, ARTIFACTS / "report-curves.png")


def test_report_unknown_study_is_one_clear_error(tmp_path):
    optuna.create_study(study_name="a", storage=f"sqlite:///{tmp_path}/s.db")
    proc = subprocess.run([sys.executable, "-m", "sweeper", "report", "--storage", f"sqlite:///{tmp_path}/s.db",
                           "--study", "nope", "--out", str(tmp_path / "r")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--study 'nope' is not in the storage; studies there: ['a']" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dashboard_in_headless_chromium(overfit_sweep):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sweeper", "dashboard", "--storage",
                               f"sqlite:///{overfit_sweep}/optuna.db", "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = server.stdout.readline()
        assert f"at http://127.0.0.1:{port}" in first
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/dashboard/")
            page.wait_for_selector("text=demo-tiny", timeout=60_000)
            page.click("text=demo-tiny")
            page.wait_for_selector("text=Hyperparameter Importance", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"))
            page.goto(page.url.rstrip("/") + "/trials")
            page.wait_for_selector("text=User Attributes", timeout=60_000)
            body = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "dashboard-trials.png"), full_page=True)
            browser.close()
        assert "best_step" in body and "stopped_early_step" in body and "schedule.max_steps" in body
        assert (ARTIFACTS / "dashboard-study.png").stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)


def _crafted_trial(study, steps_losses, acc_curve, best_step):
    values = dict(steps_losses)
    best_acc_step, best_acc = max(acc_curve, key=lambda p: (p[1], -p[0]))
    study.add_trial(optuna.trial.create_trial(
        value=min(values.values()), intermediate_values=values,
        user_attrs={"best_step": best_step, "accuracy_curve": acc_curve, "best_accuracy": best_acc,
                    "best_accuracy_step": best_acc_step, "max_steps": max(values), "choices": {"schedule": "over"}},
    ))


def test_report_flags_when_loss_and_accuracy_disagree(tmp_path):
    from sweeper.report import accuracy_disagrees, study_report

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    study.set_user_attr("metric", "eval_loss")
    # eval loss is best at step 200 and rises after; accuracy keeps improving to step 400
    _crafted_trial(study, [(100, 1.0), (200, 0.8), (300, 0.85), (400, 0.9)],
                   [[100, 0.5], [200, 0.6], [300, 0.7], [400, 0.75]], best_step=200)
    _crafted_trial(study, [(100, 1.0), (200, 0.9)], [[100, 0.5], [200, 0.6]], best_step=200)
    t0, t1 = study.trials
    assert "best eval loss at step 200 but best accuracy at step 400 (60.0% -> 75.0%)" in accuracy_disagrees(t0)
    assert accuracy_disagrees(t1) is None
    md = study_report(study)
    assert "75.0% (400)" in md and "consider eval.metric=eval_accuracy" in md
