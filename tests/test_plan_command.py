"""`python -m sweeper plan`: computed on the prepared dataset, equal to what a trial then records."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sweeper.plan_command import _expand, plan_rows
from sweeper.trial import run

from .conftest import FAST, ROOT, SHARED_DATA
from .test_trial import Recorder


def test_expansion_matches_the_sweep_grammar():
    assert _expand(["schedule=under,over", "seed=1"]) == [["schedule=under", "seed=1"], ["schedule=over", "seed=1"]]
    assert _expand(["schedule.max_steps=range(100,300,100)"]) == [["schedule.max_steps=100"], ["schedule.max_steps=200"]]
    assert _expand(["lr.learning_rate=tag(log,interval(1e-5,1e-3))"]) == [
        ["lr.learning_rate=1e-05"], ["lr.learning_rate=0.001"]]


def test_plan_equals_what_the_trial_records(compose_cfg, tmp_path, cache_dir):
    paths = [f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    [row] = plan_rows([*FAST, *paths])
    rec = Recorder()
    run(compose_cfg(*FAST), reporter=rec)
    assert row["plan"].as_dict() == rec.attrs["plan"]
    assert row["prepared_rows"] == rec.attrs["prepared_train_rows"]


def test_packing_counts_packed_sequences_on_real_data(tmp_path, cache_dir):
    path = SHARED_DATA / "banking77" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    rows = plan_rows(["data=banking77_sample", f"data.train_path={path}", "data.max_length=256",
                      "data.packing=true,false", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    packed, padded = rows
    assert packed["prepared_rows"] < padded["prepared_rows"] <= 400
    assert packed["plan"].steps_per_epoch < padded["plan"].steps_per_epoch
    # a packed step carries several rows' worth of tokens at the same micro-batch
    assert packed["plan"].tokens_per_step > 2 * padded["plan"].tokens_per_step


def test_cli_prints_one_row_per_run_and_warns(tmp_path, cache_dir):
    out = subprocess.run(
        [sys.executable, "-m", "sweeper", "plan", "schedule=under,sweet,over", "data.demo_rows=120",
         f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| schedule=")]
    assert [line.split("|")[4].strip() for line in table] == ["500", "1500", "3000"]
    assert "more than ~5 passes over the data" in out.stdout  # 500 steps x 16 rows on 108 rows


def test_cli_bad_input_is_one_line(tmp_path, cache_dir):
    out = subprocess.run([sys.executable, "-m", "sweeper", "plan", "schedule=forever",
                          f"paths.cache_dir={cache_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "forever" in out.stderr
    assert "Traceback" not in out.stderr
