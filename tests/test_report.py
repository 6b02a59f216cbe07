"""Report: diagnosis on crafted curves and on a real run that over-fits; PNG/HTML; report.html and the
dashboard in a real headless Chromium."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from sweeper.report import diagnose, noise_estimate

from .conftest import ROOT
from .helpers import fast, sweeper_in_process
from .helpers.cli import run_in_process
from .helpers.ports import free_port, wait_for_port
from .helpers.shared import once

ARTIFACTS = Path(os.environ.get("SFT_SWEEP_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.mark.parametrize("curve,train,verdict,needle", [
    ([[10, 3.0], [20, 2.0], [30, 1.5], [40, 1.2]], [], "under-trained", "still falling at the end"),
    ([[10, 3.0], [20, 1.0], [30, 0.9], [40, 1.1], [50, 1.3]], [[10, 3.0], [30, 0.8], [50, 0.2]],
     "over-trained", "turned up after step 30 (best 0.9000, end 1.3000, +44.4%) while train loss kept falling"),
    ([[10, 2.0], [20, 2.005], [30, 1.998], [40, 2.001]], [], "plateau", "try learning rates on both sides of it"),
    ([[10, 3.0], [20, 1.0], [30, 0.901], [40, 0.900], [50, 0.9005]], [], "good", "flattened"),
    ([[10, 3.0]], [], "no curve", "fewer than two evaluations"),
])
def test_diagnosis_on_crafted_curves(curve, train, verdict, needle):
    d = diagnose(curve, train)
    assert d.verdict == verdict and needle in d.reason


@pytest.fixture(scope="module")
def overfit_sweep(tmp_path_factory, cache_dir):
    """A real sweep: 20 steps (too short) and 300 steps of 24 rows at a high constant LR (over-fits clearly
    above its evaluations' noise). Trained once for the whole run (``helpers.shared.once``): its folder is
    read-only here, each test writes its report into its own ``tmp_path``."""

    def train(out):
        proc = run_in_process("-m", "schedule.max_steps=20,300", *fast("schedule.max_steps"), "eval.eval_steps=10",
                              "eval.logging_steps=10", "eval.early_stopping_patience=null", "lr.learning_rate=3e-3",
                              "lr.lr_scheduler_type=constant_with_warmup", "batch.per_device_train_batch_size=8",
                              "data.demo_rows=200", "data.max_train_rows=24", f"paths.output_dir={out}",
                              f"paths.cache_dir={cache_dir}")
        assert proc.returncode == 0, proc.stderr[-3000:]

    return once(tmp_path_factory, "overfit", train)[0]


@pytest.mark.slow
def test_report_names_a_step_count_and_diagnoses_the_real_overfit(overfit_sweep, tmp_path):
    out = tmp_path
    proc = subprocess.run([sys.executable, "-m", "sweeper", "report", "--storage", f"sqlite:///{overfit_sweep}/optuna.db",
                           "--out", str(out / "report")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report" / "summary.md").read_text()
    assert "**Recommended for demo: max_steps=" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "COMPLETE" in line}
    assert rows["0"].rstrip(" |").endswith("under-trained")  # 20 steps: still falling
    assert rows["1"].rstrip(" |").endswith("over-trained")  # 300 steps on 24 rows: turned up
    assert "while train loss kept falling" in md
    # labelled by the length they were run with (schedule.max_steps=...), not by the default preset "sweet"
    assert "| 0 | max_steps=20 |" in rows["0"] and "| 1 | max_steps=300 |" in rows["1"] and "sweet" not in md
    # the longest length won but peaked well inside its run: no next grid, the way to that model instead
    assert "**Recommended for demo: max_steps=300.**" in md and _agrees(md)
    assert "- Not an edge of the grid: the best length is the longest tried (20/300), but its best came at step" in md
    assert "- Best step inside the run: step " in md and "that model is the best checkpoint kept, `" in md
    assert "- Noise ±" in md
    assert "SFTConfig(\n    max_steps=" in md and "learning_rate=0.003" in md
    png = out / "report" / "demo-tiny.png"
    assert png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "over-trained" in html
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, ARTIFACTS / "report-curves.png")


def test_report_unknown_study_is_one_clear_error(tmp_path):
    optuna.create_study(study_name="a", storage=f"sqlite:///{tmp_path}/s.db")
    proc = sweeper_in_process("report", "--storage", f"sqlite:///{tmp_path}/s.db", "--study", "nope",
                              "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "--study 'nope' is not in the storage; studies there: ['a']" in proc.stderr
    proc = sweeper_in_process("status", "--storage", f"sqlite:///{tmp_path}/s.db", "--study", "nope")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip() == "error: --study 'nope' is not in the storage; studies there: ['a']"


def test_a_study_named_twice_is_shown_once(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="a", storage=url)
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 1.0}, user_attrs={"max_steps": 1}))
    proc = sweeper_in_process("status", "--storage", url, "--study", "a", "--study", "a")
    assert proc.returncode == 0 and proc.stdout.count("study a:") == 1, proc.stdout
    proc = sweeper_in_process("report", "--storage", url, "--study", "a", "--study", "a", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0 and proc.stdout.count("\n## a\n") == 1, proc.stdout[-2000:]


def _chromium() -> str:
    """Debian's chromium, for Playwright to drive (no browser download); skips without it, fails in CI."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return chromium


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def overfit_report(overfit_sweep, tmp_path_factory):
    """``summary.md``, the PNG and ``report.html`` of the real over-fitting sweep."""
    from sweeper.report import write_report

    paths = write_report(f"sqlite:///{overfit_sweep}/optuna.db", tmp_path_factory.mktemp("report-html"))
    return paths["html"]


def _outside_code(page: str) -> str:
    return re.sub(r"<pre>.*?</pre>|<code>.*?</code>", "", page, flags=re.S)


@pytest.mark.slow
def test_report_html_renders_the_markdown(overfit_report):
    page = overfit_report.read_text()
    table = re.search(r"<table>.*?</table>", page, re.S).group(0)
    rows = re.findall(r"<tr>\s*<td[^>]*>(\d+)</td>", table)
    assert rows == ["0", "1"] and "<th>schedule</th>" in table and "max_steps=300" in table
    assert "<td>over-trained</td>" in table and "<td>under-trained</td>" in table
    assert "<strong>Recommended for demo: max_steps=300.</strong>" in page
    snippet = re.search(r'<pre><code class="language-python">(.*?)</code></pre>', page, re.S).group(1)
    assert snippet.startswith("from trl import SFTConfig\n\nargs = SFTConfig(\n    max_steps=") and "learning_rate=0.003" in snippet
    # as the trial ran: evaluated every 10 steps, no early stopping (eval.early_stopping_patience=null)
    assert "load_best_model_at_end=True" in snippet and "eval_strategy='steps'" in snippet
    assert "callbacks = []  # the trial ran without early stopping" in snippet
    assert "<li>Noise ±" in page and "<h2>demo-tiny</h2>" in page
    # the curves right after the study's text, embedded; nothing else is loaded
    section = re.search(r"<section>.*?</section>", page, re.S).group(0)
    assert section.index("</pre>") < section.index('<img alt="demo-tiny curves" src="data:image/png;base64,iVBOR')
    assert not re.search(r"""(src|href)=(?!["']?data:)""", page) and "<script" not in page
    # no markdown left unrendered outside code
    prose = _outside_code(page)
    assert "|---" not in prose and not re.search(r"^\s*\|", prose, re.M) and "**" not in prose and "```" not in prose


def test_report_html_escapes_user_text(tmp_path):
    """A study name and an error holding markup come out as text; links and images in user text stay text."""
    from sweeper.report import report_html, study_report

    name = "<script>alert(1)</script>"
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path}/s.db")
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={
        "error": "<img src=x onerror=alert(2)> [x](javascript:alert(3)) ![y](http://example.com/y.png) done"}))
    page = report_html([(name, study_report(study), b"\x89PNG\r\n\x1a\n")])
    assert "<h2>&lt;script&gt;alert(1)&lt;/script&gt;</h2>" in page
    assert 'alt="&lt;script&gt;alert(1)&lt;/script&gt; curves"' in page
    assert "&lt;img src=x onerror=alert(2)&gt; [x](javascript:alert(3)) ![y](http://example.com/y.png) done" in page
    assert "<script" not in page and "<img src=x" not in page and "<a " not in page
    assert page.count("<img ") == 1 and "http://example.com" not in re.findall(r"<img [^>]*>", page)[0]


@pytest.mark.slow
def test_report_html_in_headless_chromium(overfit_report):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    requests, errors = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(overfit_report.as_uri())
        table = page.locator("table").first
        assert table.is_visible()
        assert table.locator("tbody tr").count() == 2 and table.locator("th").count() == 14
        assert table.locator("td").first.evaluate("e => getComputedStyle(e).borderTopStyle") == "solid"
        assert page.locator("strong", has_text="Recommended for demo").is_visible()
        code = page.locator("pre code").first
        assert code.is_visible() and "SFTConfig(" in code.inner_text()
        assert "monospace" in code.evaluate("e => getComputedStyle(e).fontFamily").lower()
        img = page.locator("section img").first
        img.scroll_into_view_if_needed()
        assert img.evaluate("e => e.complete && e.naturalWidth") > 500
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert not errors, errors  # a Content-Security-Policy violation would be logged here
    assert shot.stat().st_size > 50_000


@pytest.mark.slow
def test_dashboard_in_headless_chromium(overfit_sweep):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sweeper", "dashboard", "--storage",
                               f"sqlite:///{overfit_sweep}/optuna.db", "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = server.stdout.readline()
        assert f"at http://127.0.0.1:{port}" in first
        wait_for_port(port)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/dashboard/")
            page.wait_for_selector("text=demo-tiny", timeout=60_000)
            page.click("text=demo-tiny")
            page.wait_for_selector("text=Hyperparameter Importance", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"))
            page.goto(page.url.rstrip("/") + "/trials")
            page.wait_for_selector("text=User Attributes", timeout=60_000)
            body = page.inner_text("body")
            width = page.evaluate("document.documentElement.scrollWidth")
            page.screenshot(path=str(ARTIFACTS / "dashboard-trials.png"), full_page=True)
            browser.close()
        assert "best_step" in body and "stopped_early_step" in body and "schedule.max_steps" in body
        # curves, sft_config and plan are system attrs: with train_curve as a user attr this page was
        # 7,307 px wide, with sft_config 3,885 px, with the speed dict 2,102 px
        assert width <= 2000, f"the trials page is {width} px wide: a long user attr widens it"
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


# --------------------------------------------------------------------------- a recommendation that reads the curves


def _noisy(n, level, sigma, seed, shape=lambda i, n: 0.0):
    r = random.Random(seed)
    return [[10 * (i + 1), level + shape(i, n) + r.gauss(0, sigma)] for i in range(n)]


def _decay(i, n):
    return 2.0 * math.exp(-i / (n / 5))


@pytest.mark.parametrize("curves,sigma", [
    ([_noisy(60, 1.0, 0.01, seed=0)], 0.01),                       # pure noise around a flat line
    ([_noisy(60, 3.0, 0.05, seed=1)], 0.05),
    ([_noisy(60, 0.5, 0.02, seed=2, shape=_decay)], 0.02),         # a falling curve: the trend is not noise
    ([_noisy(30, 1.0, 0.01, seed=s) for s in (3, 4, 5)], 0.01),    # pooled over three curves
])
def test_noise_estimate_recovers_a_known_sigma(curves, sigma):
    est = noise_estimate(curves)
    assert sigma / 1.5 < est.sigma < sigma * 1.5, est
    assert "second differences" in est.method


def test_noise_estimate_is_unbiased_over_seeds_and_robust_to_a_jump():
    ratios = sorted(noise_estimate([_noisy(60, 1.0, 0.01, seed=s)]).sigma / 0.01 for s in range(20))
    assert 0.85 < ratios[10] < 1.15
    spiked = _noisy(60, 1.0, 0.01, seed=0)
    spiked[30][1] += 0.5  # one evaluation far off (a loss spike) is not noise
    assert noise_estimate([spiked]).sigma < 1.5 * 0.01


@pytest.mark.parametrize("curves,method", [
    ([[[10 * (i + 1), 0.5 + _decay(i, 40)] for i in range(40)]], "raised to the floor of 0.5% of the best"),
    ([[[10, 3.0], [20, 2.0], [30, 1.5], [40, 1.2]]], "too few evaluations near the best"),
])
def test_noise_estimate_floor(curves, method):
    est = noise_estimate(curves)
    best = min(v for c in curves for _, v in c)
    assert est.sigma == pytest.approx(0.005 * best) and method in est.method


# a cosine run of 1000 steps: falls, then flat over its last quarter (the LR decaying to zero)
COSINE_FLAT_TAIL = [[100, 2.0], [200, 1.0], [300, 0.6], [400, 0.45], [500, 0.40], [600, 0.375], [700, 0.366],
                    [800, 0.3635], [900, 0.363], [1000, 0.3629]]
# a WSD branch: constant-LR trunk that had flattened (with its noise), branch point 600, cooldown to 750
WSD_BRANCH = [[50, 2.0], [100, 0.8], [150, 0.4], [200, 0.3], [250, 0.27], [300, 0.25], [350, 0.24], [400, 0.25],
              [450, 0.23], [500, 0.24], [550, 0.235], [600, 0.24], [650, 0.17], [700, 0.13], [750, 0.115]]
# the same branch cut from a trunk still falling at its branch point
WSD_EARLY = [[50, 2.0], [100, 1.6], [150, 1.3], [200, 1.1], [250, 0.95], [300, 0.85], [350, 0.77], [400, 0.70],
             [450, 0.55], [500, 0.50]]
# a +3% rise from 0.0096 to 0.0099 on a curve whose evaluations jitter by a few 0.0001 near its best
JITTER = [[50, 0.9], [100, 0.3], [150, 0.08], [200, 0.03], [250, 0.015], [300, 0.0112], [350, 0.0101], [400, 0.0098],
          [450, 0.0096], [500, 0.0100], [550, 0.0097], [600, 0.0099]]


@pytest.mark.parametrize("curve,kwargs,verdict,needle", [
    (COSINE_FLAT_TAIL, {"scheduler": "cosine", "max_steps": 1000}, "good",
     "its flat tail is the cosine LR decaying towards zero over the last quarter of the run, not convergence"),
    (COSINE_FLAT_TAIL, {}, "good", "and flattened"),  # no scheduler known: the old reading
    (WSD_BRANCH, {"branch_point": 600}, "good",
     "the constant-LR trunk had flattened by the branch point (median 0.2400 -> 0.2400 over its last 6 evaluations); "
     "the cooldown took it from 0.2400 at the branch point (step 600) to 0.1150 at step 750 (-52.1%)"),
    (WSD_EARLY, {"branch_point": 400}, "under-trained", "the constant-LR trunk was still falling at the branch point"),
    (JITTER, {}, "good", "the end, 0.0099 (+3.1%), is within the noise (±0.0004), not a turn"),
    (JITTER[:-1] + [[600, 0.0130]], {}, "over-trained", "turned up after step 450 (best 0.0096, end 0.0130, +35.4%)"),
])
def test_schedule_and_noise_aware_diagnosis(curve, kwargs, verdict, needle):
    d = diagnose(curve, **kwargs)
    assert (d.verdict, needle in d.reason) == (verdict, True), d


def _add(study, steps, curve, *, state=optuna.trial.TrialState.COMPLETE, choice="sweet", param=True,
         scheduler="cosine", system=None, value=None, **attrs):
    """A crafted trial of ``steps`` optimizer steps with this eval curve ([step, loss] pairs); its value: ``value``,
    else the curve's lowest."""
    values = {int(s): float(v) for s, v in curve}
    best_step = min(values, key=values.get) if values else None
    user_attrs = {"max_steps": steps, "best_step": best_step, "choices": {"schedule": choice},
                  "sft_config": {"lr_scheduler_type": scheduler, "eval_steps": 50, "max_steps": steps},
                  "tokens_seen": 1000 * steps, "train_runtime_s": steps / 10, **attrs}
    params, dists = {}, {}
    if param:
        params = {"schedule.max_steps": steps}
        dists = {"schedule.max_steps": optuna.distributions.IntDistribution(1, 10_000)}
    study.add_trial(optuna.trial.create_trial(
        state=state, value=(min(values.values()) if value is None else value)
        if state == optuna.trial.TrialState.COMPLETE else None,
        intermediate_values=values, params=params, distributions=dists, user_attrs=user_attrs,
        system_attrs=system or {}))


def _falling(steps, end, every=50):
    """A cosine-like curve of ``steps`` steps that is still falling clearly at its end, ending at ``end``."""
    n = steps // every
    return [[every * (i + 1), end + 2.0 * (1 - (i + 1) / n) ** 2 + 0.05 * (1 - (i + 1) / n)] for i in range(n)]


def _peaked(steps, best, at, every=50):
    """A curve that reaches ``best`` at step ``at`` and then turns up by 10%."""
    n = steps // every
    return [[every * (i + 1), best * (1 + (abs(every * (i + 1) - at) / at) ** 2 * (0.1 if every * (i + 1) > at else 3))]
            for i in range(n)]


def _study(tmp_path):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    study.set_user_attr("metric", "eval_loss")
    study.set_user_attr("data", "demo")
    return study


def _lines(md, prefix):
    return [line for line in md.splitlines() if line.startswith(prefix)]


def _agrees(md):
    """The headline never stands on an under-trained curve without a line that explains it."""
    curve = _lines(md, "- Its curve")[0]
    return "under-trained" not in curve or bool(_lines(md, "- Edge of the grid") or _lines(md, "- Between lengths"))


def test_the_longest_length_winning_is_an_edge_with_the_next_grid(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    for steps, end in ((500, 0.30), (1500, 0.22), (3000, 0.20)):
        _add(study, steps, _falling(steps, end))
    md = study_report(study)
    assert "**Recommended for demo: max_steps=3000.** max_steps=3000 reached the lowest eval_loss, 0.2000" in md
    assert ("- Edge of the grid: the best length is the longest tried (500/1500/3000) and its best came at the end of "
            "its run, so longer may be better still: run `python train.py -m schedule.max_steps=3000,4500,6000 hydra.sweeper.study_name=s`.") in md
    assert "under-trained" in _lines(md, "- Its curve")[0] and _agrees(md)


def test_the_longest_length_that_peaked_inside_its_run_is_no_edge(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    _add(study, 500, _falling(500, 0.30))
    _add(study, 3000, _peaked(1450, 0.20, 1200), stopped_early_step=1450, best_checkpoint="/runs/t1/checkpoint-1200")
    md = study_report(study)
    assert ("- Not an edge of the grid: the best length is the longest tried (500/3000), but its best came at step "
            "1200, well inside the run: longer runs will not help.") in md
    assert ("- Best step inside the run: step 1200 of 3000 (early stopping ended it at step 1450); that model is the "
            "best checkpoint kept, `/runs/t1/checkpoint-1200`; to train for that length, confirm it with one run: "
            "`python train.py schedule.max_steps=1200` (with its own LR decay it may end lower).") in md
    assert "4500" not in md and _agrees(md)


def test_the_shortest_length_winning_is_an_edge_and_an_under_trained_winner_has_a_gap(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    _add(study, 500, _peaked(500, 0.20, 300))
    _add(study, 1500, _peaked(1500, 0.24, 300))
    md = study_report(study)
    assert ("- Edge of the grid: the best length is the shortest tried (500/1500): a shorter run may do as well: run "
            "`python train.py -m schedule.max_steps=100,250,500 hydra.sweeper.study_name=s`.") in md
    study = _study(tmp_path / "gap") if (tmp_path / "gap").mkdir() is None else None
    _add(study, 500, _falling(500, 0.30))
    _add(study, 1500, _falling(1500, 0.20))
    _add(study, 3000, _peaked(3000, 0.25, 600))
    md = study_report(study)
    assert "under-trained" in _lines(md, "- Its curve")[0] and _agrees(md)
    assert ("- Between lengths: its curve was still falling at its end, but max_steps=3000 reached only 0.2500: the "
            "best length lies between 1500 and 3000: run `python train.py -m schedule.max_steps=2000,2500 hydra.sweeper.study_name=s`."
            ) in md  # neither end again: 1500 is measured, 3000 measured worse


def test_a_peak_inside_a_run_narrows_the_proposal_and_no_length_measured_worse_is_proposed(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    _add(study, 500, _falling(500, 0.30))
    _add(study, 1500, _falling(1500, 0.20))
    _add(study, 3000, _peaked(3000, 0.25, 2100))  # measured worse; its best at step 2100, well inside
    md = study_report(study)
    line = _lines(md, "- Between lengths")[0]
    assert "a curve of the study peaked at step 2100, so the grid is narrowed around it" in line
    assert line.endswith("run `python train.py -m schedule.max_steps=1800,2100,2550 hydra.sweeper.study_name=s`."), line
    assert "3000" not in line.split("run `")[1]


def test_the_shortest_length_within_noise_is_named_with_its_cost(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    _add(study, 1000, _falling(1000, 0.25))
    _add(study, 2000, _falling(2000, 0.2015), plan={"tokens_per_step": 1000}, tokens_seen=None,
         train_runtime_s=None, timing={"job_s": 210.0})
    _add(study, 3000, _falling(3000, 0.2000))
    md = study_report(study)
    assert ("- Within noise: max_steps=2000 reached 0.2015, within noise of the best 0.2000 at max_steps=3000 (+0.8%, "
            "noise ±0.0010), for 67% of the cost (2,000 vs 3,000 steps, 2.00M vs 3.00M tokens, 210 s vs 300 s of "
            "training).") in md
    noise = _lines(md, "- Noise ±")[0]
    assert noise.startswith("- Noise ±0.0010 near its best (0.5%; method: ") and "floor of 0.5% of the best" in noise


def test_within_noise_follows_the_measured_noise_of_the_curves(tmp_path):
    """The issue's case: 0.0730 at 2000 steps against 0.0706 at 3000, on curves that jitter by ~±0.002."""
    from sweeper.report import study_report

    study = _study(tmp_path)
    for steps, end, seed in ((1000, 0.0900, 1), (2000, 0.0730, 2), (3000, 0.0706, 3)):
        curve = [[s, v + random.Random(seed * 1000 + s).gauss(0, 0.002)] for s, v in _falling(steps, end)]
        curve[-1][1] = end
        _add(study, steps, curve)
    md = study_report(study)
    noise = _lines(md, "- Noise ±")[0]
    assert noise.startswith("- Noise ±0.0022 near its best (3.1%; method: scatter") and "floor 0.5%" in noise, noise
    assert ("- Within noise: max_steps=2000 reached 0.0730, within noise of the best 0.0706 at max_steps=3000 (+3.4%, "
            "noise ±0.0022), for 67% of the cost") in md


def test_a_length_set_by_hand_is_labelled_by_its_length(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    _add(study, 600, _falling(600, 0.2))                                 # schedule.max_steps=600 swept
    _add(study, 700, _falling(700, 0.3), choice="over", param=False)     # schedule=over schedule.max_steps=700
    _add(study, 500, _falling(500, 0.4), choice="under", param=False)    # the preset itself
    md = study_report(study)
    rows = [line.split("|")[2].strip() for line in _lines(md, "| ") if "COMPLETE" in line]
    assert rows == ["max_steps=600", "max_steps=700", "under"]
    assert "**Recommended for demo: max_steps=600.** max_steps=600 reached the lowest" in md and "sweet" not in md
    assert "the others: max_steps=700: 0.3000, under (500 steps): 0.4000." in md


def test_a_failed_trial_is_diagnosed_by_its_error(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"error": "RuntimeError: CUDA out of memory at step 12"}))
    _add(study, 500, _falling(500, 0.3))
    md = study_report(study)
    assert "- trial 0: failed: RuntimeError: CUDA out of memory at step 12" in md
    assert "eval_steps" not in _lines(md, "- trial 0")[0] and "| FAIL | failed |" in md


def test_a_wsd_study_reads_the_cooldowns_and_extends_its_candidates(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    trunk = [[50 * (i + 1), 0.3 - 0.002 * i + 0.01 * (-1) ** i] for i in range(48)]  # still falling, noisy
    cool = [[2400 + 50 * (i + 1), 0.2 - 0.01 * i] for i in range(12)]
    wsd = {"method": "wsd", "choice": "wsd_search", "param": False, "scheduler": "warmup_stable_decay"}
    _add(study, 3000, trunk + cool, branches=[{"max_steps": 1500, "branch_point": 1200},
                                              {"max_steps": 3000, "branch_point": 2400}], **wsd)
    _add(study, 1500, trunk[:24] + [[1250, 0.25], [1300, 0.24], [1500, 0.23]],
         wsd={"warmup_steps": 8, "branch_point": 1200, "decay_steps": 300, "decay_type": "1-sqrt"}, **wsd)
    md = study_report(study)
    assert "the cooldown took it from 0.1960 at the branch point (step 2400) to 0.0900 at step 3000 (-54.1%)" in md
    assert "over the last" not in md  # a cooldown's drop is not "still falling at the end"
    assert ("run `python train.py -m schedule=wsd_search 'schedule.wsd.candidates=[3000,4500,6000]' schedule.max_steps=null "
            "hydra.sweeper.study_name=s`" in md
            and _agrees(md))


def test_a_trunk_state_better_than_every_branch_is_named_with_the_constant_lr_run_that_trains_it(tmp_path):
    """The demo's shape: the trunk, stopped at 750, was lowest at step 500 at constant LR (0.2193); the 500-step
    branch cooled down from a noisy high at 400 to 0.2298. The report names the trunk's state and the run that
    trains it; a trunk state worse than the winner is not mentioned."""
    from sweeper import records
    from sweeper.report import recommend, study_report

    trunk = [[50, 2.66], [100, 1.35], [150, 0.99], [200, 0.56], [250, 0.337], [300, 0.2486], [350, 0.2255],
             [400, 0.2689], [450, 0.2393], [500, 0.2193], [550, 0.2511], [600, 0.2341], [650, 0.2479], [700, 0.2528],
             [750, 0.2616]]
    wsd = {"method": "wsd", "choice": "wsd_search", "param": False, "scheduler": "warmup_stable_decay"}
    study = _study(tmp_path)
    _add(study, 3000, trunk, state=optuna.trial.TrialState.PRUNED, stopped_reason="trunk stopped at step 750",
         branches=[{"max_steps": 500, "branch_point": 400}, {"max_steps": 1500, "branch_point": 1200},
                   {"max_steps": 3000, "branch_point": 2400}],
         wsd={"candidates": [500, 1500, 3000], "decay_fraction": 0.2, "decay_type": "1-sqrt", "warmup_steps": 15},
         system={records.OVERRIDES: ["data=demo", "lr.warmup_steps=0.03"]}, **wsd)
    # the branch: the trunk's states to its branch point 400, then its cooldown, whose best is its value
    _add(study, 500, trunk[:8] + [[450, 0.2353], [500, 0.2298]], value=0.2298, branch_of=0,
         wsd={"warmup_steps": 15, "branch_point": 400, "decay_steps": 100, "decay_type": "1-sqrt"},
         system={records.WSD_BRANCH_OF: 0, "train_curve": [[450, 0.14], [500, 0.10]],
                 "token_accuracy_curve": [[450, 0.95], [500, 0.962]]}, **wsd)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    rec = recommend(study)
    assert rec["max_steps"] == 500 and rec["trunk_state"]["step"] == 500 and rec["trunk_state"]["value"] == 0.2193
    command = ("python train.py schedule.max_steps=500 data=demo lr.lr_scheduler_type=constant_with_warmup "
               "lr.warmup_steps=15")
    assert rec["trunk_state"]["command"] == command and rec["trunk_state"]["within_noise"]
    md = study_report(study)
    line = _lines(md, "- The trunk's own state")[0]
    assert line.startswith("- The trunk's own state: the WSD trunk (trial 0) reached 0.2193 at step 500, at constant "
                           "LR before any cooldown, better than the winner's 0.2298 (-4.6%, within noise: at most twice ±"), line
    assert "the larger noise of the two curves). That model" in line
    assert line.endswith(f"That model is a 500-step run at constant LR after a 15-step warmup; the search keeps no "
                         f"checkpoint of it: to train it, run `{command}`.")
    assert f"a WSD trunk at constant LR did better at step 500 (0.2193), try `{command}`" in rec["verdict"]
    # the search's own verdict on longer runs: its trunk trained on to 750 and stopped, so no "longer may be better"
    assert _lines(md, "- Not an edge of the grid: the best length is the only length tried (500), but the WSD "
                      "search's trunk (trial 0) trained on to step 750 and stopped: trunk stopped at step 750; "
                      "longer runs will not help.")
    assert "Edge of the grid" not in md and "longer may be better" not in rec["verdict"]
    # the branch's gap and steps are those of its cooldown (its value), not the trunk's 0.2255 at step 350
    assert _lines(md, "- Train/eval gap: at the best step 500: train loss 0.1000, eval loss 0.2298")
    assert _lines(md, "- Loss and task metric: lowest eval_loss 0.2298 at step 500; best eval_mean_token_accuracy "
                      "96.2% at step 500 (the same step)")

    worse = _study(tmp_path / "worse") if (tmp_path / "worse").mkdir() is None else None
    _add(worse, 3000, [[s, v + 0.1] for s, v in trunk], state=optuna.trial.TrialState.PRUNED,
         branches=[{"max_steps": 3000, "branch_point": 2400}], **wsd)
    _add(worse, 500, [[400, 0.2689], [450, 0.2353], [500, 0.2298]], system={records.WSD_BRANCH_OF: 0},
         wsd={"warmup_steps": 15, "branch_point": 400, "decay_steps": 100, "decay_type": "1-sqrt"}, **wsd)
    rec = recommend(worse)
    assert rec["trunk_state"] is None and "trunk's own state" not in study_report(worse)


def test_report_says_why_accuracy_was_off():
    from sweeper.report import study_report

    study = optuna.create_study()
    why = "142 distinct answers in 400 train rows, more than a label set's 120 (30% of the rows, 500 at most)"
    study.add_trial(optuna.trial.create_trial(
        value=1.0, intermediate_values={10: 2.0, 20: 1.0},
        user_attrs={"max_steps": 20, "best_step": 20, "accuracy": {"on": False, "why": why}}))
    assert f"- accuracy off: {why}" in study_report(study)


def test_report_refuses_what_is_not_a_study_storage_and_leaves_it_alone(tmp_path):
    import sqlite3

    empty, text, other, schema = (tmp_path / n for n in ("empty.db", "text.db", "other.db", "schema.db"))
    empty.touch()
    text.write_text("hello\n")
    sqlite3.connect(other).execute("CREATE TABLE x(a)").connection.commit()
    optuna.storages.RDBStorage(f"sqlite:///{schema}")  # Optuna's tables, no study
    expect = {empty: "is an empty file, not a study storage", text: "is not an SQLite database",
              other: "holds no Optuna tables", schema: "no studies in sqlite:///"}
    for path, needle in expect.items():
        before = path.read_bytes()
        for cmd in ("report", "status"):
            proc = sweeper_in_process(cmd, "--storage", f"sqlite:///{path}")
            assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert path.read_bytes() == before  # not turned into an Optuna database


def test_the_report_states_the_train_eval_gap_and_says_when_the_model_memorises(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    curve = _peaked(1500, 0.80, 600)  # best at 600, then up 10%
    train = [[s, max(0.02, 2.0 - s / 500)] for s in range(10, 1510, 10)]  # train loss falls to 0.02
    _add(study, 1500, curve, train_curve=train, epochs_trained=11.0, steps_trained=1500)
    _add(study, 500, _falling(500, 1.0))
    line = _lines(study_report(study), "- Train/eval gap")[0]
    assert "at the best step 600: train loss" in line and "at the end, step 1500: train loss 0.0200" in line
    assert "The model is memorising the training rows" in line and "fewer epochs (stop near step 600 (4.4 epochs))" in line


def test_a_task_metric_objective_reports_the_loss_step_and_the_metric_step(tmp_path):
    from sweeper.report import study_report

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db", direction="maximize")
    study.set_user_attr("metric", "eval_mean_token_accuracy")
    study.set_user_attr("data", "gsm8k")
    acc = {50 * i: 0.30 + 0.02 * i for i in range(1, 21)}  # still rising at 1000
    loss = [[50 * i, 1.0 + (i - 8) ** 2 / 100] for i in range(1, 21)]  # lowest at 400
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=max(acc.values()), intermediate_values=acc,
        user_attrs={"max_steps": 1000, "best_step": 1000, "loss_curve": loss,
                    "sft_config": {"lr_scheduler_type": "cosine", "eval_steps": 50, "max_steps": 1000}}))
    line = _lines(study_report(study), "- Loss and task metric")[0]
    assert ("lowest eval_loss 1.0000 at step 400; best eval_mean_token_accuracy 70.0% at step 1000 (later than the "
            "loss's). The recommendation uses eval_mean_token_accuracy (eval.metric), so its step 1000.") in line


# --------------------------------------------------------------------------- answers a user copies


ODD = "my `data`_|*v[1]"  # every markdown special a name can hold: backticks, pipe, emphasis, brackets


def _codes(md: str) -> list[str]:
    """The code spans of ``md`` as a reader sees them (rendered by the report's own markdown-it)."""
    import html as html_mod

    from sweeper.report import markdown_html

    return [html_mod.unescape(c) for c in re.findall(r"<code>(.*?)</code>", markdown_html(md), re.S)]


def _hydra_value(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([override])[0].value()


def test_the_follow_up_command_names_its_study_and_storage_and_keeps_odd_names_and_paths(tmp_path):
    import html as html_mod
    import shlex

    from sweeper.report import datasets_table, markdown_html, study_report
    from sweeper.space import quote

    study = optuna.create_study(study_name=f"{ODD}-tiny", storage=f"sqlite:///{tmp_path}/s.db")
    study.set_user_attr("metric", "eval_loss")
    study.set_user_attr("data", ODD)
    path = f"/data/{ODD}.jsonl"
    for steps, end in ((500, 0.30), (1000, 0.20)):
        _add(study, steps, _falling(steps, end), system={"overrides": ["data=jsonl", f"data.train_path={quote(path)}"]})
    md = study_report(study, "postgresql://bob:s3cret@db.example:5432/sweeps")
    assert "s3cret" not in md
    page = markdown_html(md)
    assert html_mod.unescape(re.search(r"<h2>(.*?)</h2>", page).group(1)) == f"{ODD}-tiny"  # the heading is the name
    assert f"<strong>Recommended for {html_mod.escape(ODD, quote=False)}: max_steps=1000.</strong>" in page
    [command] = [c for c in _codes(md) if c.startswith("python train.py -m")]
    args = shlex.split(command)  # as a shell reads the pasted command
    values = dict(a.split("=", 1) for a in args[3:])
    assert _hydra_value(f"data.train_path={values['data.train_path']}") == path  # the same file
    assert _hydra_value(f"x={values['hydra.sweeper.study_name']}") == f"{ODD}-tiny"  # this study
    assert _hydra_value(f"x={values['hydra.sweeper.storage']}") == "postgresql://bob@db.example:5432/sweeps"  # no password
    assert "- The commands name the storage without its password: set PGPASSWORD" in md
    # the table of datasets: the row keeps its 14 cells, and its verdict the same command
    table = datasets_table([study], "postgresql://bob:s3cret@db.example:5432/sweeps")
    cells = re.findall(r"<td[^>]*>(.*?)</td>", markdown_html(table), re.S)
    assert len(cells) == 14 and html_mod.unescape(re.sub("<[^>]+>", "", cells[0])) == ODD
    assert command in _codes(table)
    # the default storage is not named; a failed trial's error with markup stays text
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"error": f"no file {path} (`x` | *y*)"}))
    md = study_report(study)
    assert "hydra.sweeper.storage" not in md
    assert shlex.quote(f"hydra.sweeper.study_name={quote(f'{ODD}-tiny')}") in md
    assert f"no file {path} (`x` | *y*)" in html_mod.unescape(markdown_html(md))


def test_the_follow_up_commands_start_as_the_sweep_did_installed_with_its_config_folder(tmp_path):
    """A sweep started as ``sft-sweep --config-dir <folder>`` (recorded on its trials): every command the report
    proposes starts the same way, the folder shell-quoted; trials recorded before get this process's start."""
    import shlex

    from sweeper.program import this_process
    from sweeper.report import study_report

    study = _study(tmp_path)
    folder = str(tmp_path / "my conf")  # a space: quoted for the shell
    started = {"command": {"prog": "sft-sweep", "config_dir": folder}, "overrides": ["data=mydata"]}
    _add(study, 500, _falling(500, 0.30), system=started)
    _add(study, 1000, _peaked(1000, 0.20, 300), system=started)  # best inside the run: a confirming run
    (tmp_path / "edge").mkdir()
    edge = _study(tmp_path / "edge")
    _add(edge, 500, _falling(500, 0.30), system=started)
    _add(edge, 1000, _falling(1000, 0.20), system=started)  # best at the longest, still falling: a longer grid
    md = study_report(study) + "\n\n" + study_report(edge)
    commands = [c for c in _codes(md) if "schedule.max_steps=" in c]
    assert any(" -m " in c for c in commands) and any(" -m " not in c for c in commands), md
    assert "python train.py" not in md
    for command in commands:
        args = shlex.split(command)
        assert args[:3] == ["sft-sweep", "--config-dir", folder] and "data=mydata" in args, command
    (tmp_path / "older").mkdir()
    older = _study(tmp_path / "older")
    _add(older, 500, _falling(500, 0.30))
    _add(older, 1000, _falling(1000, 0.20))
    [command] = [c for c in _codes(study_report(older)) if "-m schedule.max_steps=" in c]
    assert command.startswith(this_process().prefix() + " -m ")


def test_a_code_span_holding_backticks_uses_a_longer_fence():
    from sweeper.report.text import code, escape

    for text in ("plain", "a`b", "``x", "x`", "`", "a ``` b"):
        assert _codes(code(text)) == [text]
    assert escape("my_data") == "my_data" and escape("_x_") == r"\_x\_" and escape("a|b") == r"a\|b"


def test_a_running_trial_is_shown_as_running_never_diagnosed_or_recommended_from(tmp_path):
    from sweeper.report import datasets_table, study_report

    study = _study(tmp_path)
    _add(study, 500, _peaked(500, 0.30, 300))
    _add(study, 3000, _falling(1500, 0.10), state=optuna.trial.TrialState.RUNNING)  # half-way, still falling
    md = study_report(study)
    row = [line for line in _lines(md, "| 1 |")][0]
    assert row.endswith("| RUNNING | running |")
    assert "- trial 1: running: 30 evaluations so far, the last at step 1500 of 3000; diagnosed once it finishes" in md
    assert "under-trained" not in md.replace("trial 0", "")  # trial 0 peaked: nothing is under-trained
    assert "**Recommended for demo: max_steps=500.**" in md and "the others" not in md
    assert "max_steps=3000" not in md.split("**Recommended")[1] and "max_steps=3000" not in datasets_table([study])

    alone = optuna.create_study()
    alone.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,
                                              intermediate_values={10: 3.0, 20: 2.0, 30: 1.0}))
    md = study_report(alone)
    assert "No trial completed, so no step count can be recommended yet." in md and "under-trained" not in md


def test_a_trial_pruned_after_one_evaluation_is_said_to_be_pruned(tmp_path):
    from sweeper.report import study_report

    study = _study(tmp_path)
    _add(study, 500, _peaked(500, 0.30, 300))
    _add(study, 1500, [[50, 2.9]], state=optuna.trial.TrialState.PRUNED)
    md = study_report(study)
    assert "- trial 1: pruned: stopped by the pruner at step 50, after 1 evaluation(s)" in md
    assert "eval_steps" not in _lines(md, "- trial 1")[0]  # not the advice for a run that evaluated too rarely


def test_lengths_are_compared_like_with_like(tmp_path):
    from sweeper.report import recommend, study_report

    study = _study(tmp_path)
    base = {"schedule.max_steps": 0, "data.name": "demo"}
    for steps, end, lr in ((500, 0.30, 1e-3), (1500, 0.22, 1e-3), (1000, 0.10, 3e-3)):
        _add(study, steps, _falling(steps, end),
             system={"config": {**base, "schedule.max_steps": steps, "lr.learning_rate": lr}})
    md = study_report(study)
    assert ("- Like with like: lengths are compared only among the trials that ran the winner's settings "
            "(lr.learning_rate=0.003: trial(s) 2); trial(s) 0, 1 ran other settings and are left out of the "
            "comparison.") in md
    assert "the others" not in md and "the only length tried (1000)" in md  # not 500/1000/1500
    assert recommend(study)["within_noise"] is None
    # a swept learning rate: the same, by its param
    swept = _study(tmp_path / "b") if (tmp_path / "b").mkdir() is None else None
    for steps, end, lr in ((500, 0.30, 1e-3), (1500, 0.22, 1e-3), (1000, 0.10, 3e-3), (500, 0.12, 3e-3)):
        values = {int(s): float(v) for s, v in _falling(steps, end)}
        swept.add_trial(optuna.trial.create_trial(
            value=min(values.values()), intermediate_values=values,
            params={"schedule.max_steps": steps, "lr.learning_rate": lr},
            distributions={"schedule.max_steps": optuna.distributions.IntDistribution(1, 10_000),
                           "lr.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)},
            user_attrs={"max_steps": steps, "best_step": steps, "sft_config": {"eval_steps": 50}}))
    md = study_report(swept)
    assert "(lr.learning_rate=0.003: trial(s) 2, 3); trial(s) 0, 1 ran other settings" in md
    assert "the longest tried (500/1000)" in md and "max_steps=1500" not in md.split("**Recommended")[1]


@pytest.mark.parametrize("patience,metric,maximize,line", [
    (3, "eval_loss", False, "callbacks = [EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=0.01)]"),
    (None, "eval_mean_token_accuracy", True, "callbacks = []  # the trial ran without early stopping"),
])
def test_the_sftconfig_snippet_evaluates_stops_early_and_reloads_the_best_model_as_the_trial_did(
        tmp_path, patience, metric, maximize, line):
    from sweeper.report import sftconfig_snippet

    trial = optuna.trial.create_trial(
        value=1.0, intermediate_values={10: 2.0, 20: 1.0},
        user_attrs={"max_steps": 20, "best_step": 20},
        system_attrs={"sft_config": {"max_steps": 20, "learning_rate": 0.001, "bf16": False, "eval_steps": 10},
                      "config": {"eval.early_stopping_patience": patience, "eval.early_stopping_threshold": 0.01}})
    snippet = sftconfig_snippet(trial, metric, maximize)
    assert line in snippet
    scope: dict = {}
    exec(snippet, scope)  # pasted as it is: a real SFTConfig of TRL and the callbacks the trial ran with
    args = scope["args"]
    assert (args.max_steps, args.eval_steps, args.eval_strategy, args.save_strategy) == (20, 10, "steps", "best")
    assert args.load_best_model_at_end and args.metric_for_best_model == metric and args.greater_is_better is maximize
    stoppers = scope["callbacks"]
    assert [(s.early_stopping_patience, s.early_stopping_threshold) for s in stoppers] == (
        [(patience, 0.01)] if patience else [])


@pytest.mark.slow
def test_a_config_change_keeps_its_params_and_the_pasted_follow_up_continues_the_study(tmp_path, cache_dir):
    """Real CLI: a study on a file whose name holds markdown specials, a trial added at another learning rate with
    allow_config_change, then the report's follow-up command pasted into a shell in another folder."""
    import json
    import shlex

    from sweeper import data as data_mod
    from sweeper.space import quote

    name = "my `data`_|v1"  # no glob characters: the data loader reads the path as it is
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data_mod.demo_rows(120, seed=0)))
    url = f"sqlite:///{tmp_path}/optuna.db"
    base = [*fast("schedule.max_steps", "data."), "data=jsonl", f"data.train_path={quote(str(path))}",
            f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={cache_dir}", f"hydra.sweeper.storage={url}"]
    first = run_in_process("-m", "schedule.max_steps=4,8", *base)
    assert first.returncode == 0, first.stderr[-3000:]
    added = run_in_process("-m", "schedule.max_steps=8", "lr.learning_rate=3e-3", "hydra.sweeper.allow_config_change=true",
                    *base)
    assert added.returncode == 0, added.stderr[-3000:]
    study = optuna.load_study(study_name=f"{name}-tiny", storage=url)
    # the added trial has its params (the dashboard's "Params", status's best), beside the earlier ones
    assert [t.params for t in study.trials] == [{"schedule.max_steps": 4}, {"schedule.max_steps": 8},
                                                {"schedule.max_steps": 8}]
    status = sweeper_in_process("status", "--storage", url)
    best = [line for line in status.stdout.splitlines() if "best so far" in line][0]
    assert best.endswith(f"schedule.max_steps={study.best_trial.params['schedule.max_steps']}"), status.stdout

    report = sweeper_in_process("report", "--storage", url, "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    md = (tmp_path / "report" / "summary.md").read_text()
    best_lr = study.best_trial.system_attrs["sft_config"]["learning_rate"]
    assert "- Like with like: lengths are compared only among the trials that ran the winner's settings " in md
    [command] = [c for c in _codes(md) if c.startswith("python train.py -m")]
    pasted = command.replace("python train.py", f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'train.py'))}",
                             1) + f" paths.cache_dir={shlex.quote(str(cache_dir))}"
    paste_dir = tmp_path / "elsewhere"
    paste_dir.mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "TQDM_DISABLE": "1"}
    done = subprocess.run(pasted, shell=True, cwd=paste_dir, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == [f"{name}-tiny"]  # no other study
    new = optuna.load_study(study_name=f"{name}-tiny", storage=url).trials[3:]
    assert new and all(t.state == optuna.trial.TrialState.COMPLETE for t in new)
    assert all(t.system_attrs["config"]["data.train_path"] == str(path) for t in new)  # the same file
    assert all(t.system_attrs["sft_config"]["learning_rate"] == best_lr for t in new)  # the winner's settings


def test_each_study_gets_one_figure_file_in_the_report_folder_whatever_its_name(tmp_path):
    """A storage may hold studies that other tools named: a path separator, ``..``, a name longer than a file
    name may be, the name of the datasets' figure. Each PNG is one file in the report's folder, the markdown
    links it, and nothing is written outside."""
    from sweeper.report_command import write_whole

    url = f"sqlite:///{tmp_path}/s.db"
    names = ["my/data", "..", "../up", "datasets", "x" * 300, "a:b*c?", "plain"]
    for name in names:
        study = optuna.create_study(study_name=name, storage=url)
        for steps, end in ((100, 0.3), (200, 0.2)):
            _add(study, steps, _falling(steps, end))
    out = tmp_path / "deep" / "report"
    write_whole(optuna.storages.RDBStorage(url), out, None)
    pngs = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert all(p.is_file() for p in out.iterdir()) and len(pngs) == len(names) + 1  # + the datasets' figure
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["report"]  # nothing beside the folder
    md = (out / "summary.md").read_text()
    links = re.findall(r"!\[[^\n]*\]\(<?([^)>]+\.png)>?\)", md)
    assert sorted(links) == pngs, (links, pngs)
    assert "a:b*c?.png" in pngs and "plain.png" in pngs  # a name that is a file name stays as it is


def test_trials_another_tool_recorded_are_reported_without_missing_values_printed(tmp_path):
    """Trials with a value and a curve but none of the sweep's attrs (no best step, run folder or config)."""
    from sweeper.report import study_report

    study = _study(tmp_path)
    for i, steps in enumerate((10, 20)):
        study.add_trial(optuna.trial.create_trial(value=1.0 - 0.1 * i, intermediate_values={5: 2.0, steps: 1.0 - 0.1 * i},
                                                  user_attrs={"max_steps": steps}))
    md = study_report(study)
    assert "**Recommended for demo: max_steps=20.** max_steps=20 reached the lowest eval_loss, 0.9000;" in md
    assert "None" not in md, [line for line in md.splitlines() if "None" in line]
    assert "# trial 1 recorded no sft_config attr (it predates it, or another tool ran it)" in md


def test_a_relative_sqlite_storage_is_named_by_its_absolute_path_in_the_commands(tmp_path, monkeypatch):
    """Pasted from another folder, the follow-up still adds to the same study file."""
    import shlex

    from sweeper.report import study_report

    study = _study(tmp_path)
    _add(study, 500, _falling(500, 0.30))
    _add(study, 1000, _falling(1000, 0.20))
    monkeypatch.chdir(tmp_path)
    [command] = [c for c in _codes(study_report(study, "sqlite:///outputs/optuna.db?timeout=60")) if " -m " in c]
    [arg] = [a for a in shlex.split(command) if a.startswith("hydra.sweeper.storage=")]
    assert _hydra_value(arg) == f"sqlite:///{tmp_path}/outputs/optuna.db?timeout=60"


def test_the_curves_of_a_study_whose_trials_all_failed_draw_without_a_warning(tmp_path):
    """No trial reached an evaluation: the figure says so instead of an empty legend (matplotlib's UserWarning)."""
    import warnings

    from sweeper.report import plot_curves

    study = _study(tmp_path)
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                  user_attrs={"error": "ValueError: model.path: no such folder"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_curves(study, tmp_path / "curves.png")
    assert path.stat().st_size > 0
