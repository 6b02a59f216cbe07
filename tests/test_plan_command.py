"""`python -m sweeper plan`: computed on the prepared dataset, equal to what a trial then records."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sweeper.plan_command import _expand, plan_rows
from sweeper.trial import run

from .conftest import FAST, ROOT, SHARED_DATA
from .helpers import Recorder, sweeper_in_process


def test_expansion_matches_the_sweep_grammar():
    assert _expand(["schedule=under,over", "seed=1"]) == [["schedule=under", "seed=1"], ["schedule=over", "seed=1"]]
    assert _expand(["schedule.max_steps=range(100,300,100)"]) == [["schedule.max_steps=100"], ["schedule.max_steps=200"]]
    assert _expand(["lr.learning_rate=tag(log,interval(1e-5,1e-3))"]) == [
        ["lr.learning_rate=1e-05"], ["lr.learning_rate=0.001"]]


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_prints_one_row_per_run_and_warns(tmp_path, cache_dir):
    out = subprocess.run(
        [sys.executable, "-m", "sweeper", "plan", "schedule=under,sweet,over", "data.demo_rows=120",
         f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| schedule=")]
    assert [line.split("|")[4].strip() for line in table] == ["500", "1500", "3000"]
    assert "more than ~5 passes over the data" in out.stdout  # 500 steps x 16 rows on 108 rows
    # one dataset, prepared once for the three rows, said on stderr while it happens
    assert out.stderr.count("preparing demo with the model's tokenizer (108 train rows, 12 eval rows)…") == 1
    assert "prepared demo in " in out.stderr


def test_plan_prints_no_secret_of_its_overrides(tmp_path, cache_dir):
    """A storage password and a secret-named env_set value in the overrides: masked in the table, the run
    lines and an error."""
    secrets = ["hydra.sweeper.storage=postgresql://bob:s3cr3tPW@127.0.0.1:1/x", "+hydra.job.env_set.HF_TOKEN=hf_SECRET"]
    out = sweeper_in_process("plan", "schedule.max_steps=10", "data.demo_rows=120", *secrets,
                             f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert out.returncode == 0, out.stderr
    assert "postgresql://bob:***@127.0.0.1:1/x" in out.stdout and "HF_TOKEN=***" in out.stdout
    bad = sweeper_in_process("plan", "schedule=forever", *secrets, f"paths.cache_dir={cache_dir}")
    assert bad.returncode == 2
    for text in (out.stdout, out.stderr, bad.stdout, bad.stderr):
        assert "s3cr3tPW" not in text and "hf_SECRET" not in text


def test_cli_bad_input_is_one_line(tmp_path, cache_dir):
    out = sweeper_in_process("plan", "schedule=forever", f"paths.cache_dir={cache_dir}")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "forever" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_offline_hub_model_plans_rows_without_retrying_the_hub(tmp_path, cache_dir):
    # a hub id that is not cached, and a hub that refuses connections: no retries (huggingface_hub's own took
    # ~55 s), one line, tokens "–"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), TQDM_DISABLE="1")
    out = subprocess.run(
        [sys.executable, "-m", "sweeper", "plan", "model=qwen2.5-0.5b", "data.demo_rows=120",
         f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Retrying" not in out.stderr and "Traceback" not in out.stderr
    [row] = [line for line in out.stdout.splitlines() if line.startswith("| model=")]
    assert [c.strip() for c in row.split("|")[7:9]] == ["–", "–"]  # tokens/step, tokens: unknown, not 0
    [note] = [line for line in out.stdout.splitlines() if "could not be loaded offline" in line]
    assert "model.path='Qwen/Qwen2.5-0.5B-Instruct': the tokenizer could not be loaded offline" in note
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in note and "point model.path at a local copy" in note


def test_tokenizer_with_the_hub_switched_off_is_one_clear_error(monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import constants

    from sweeper.model import load_tokenizer, model_shape

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = SimpleNamespace(path="sft-sweep-tests/not-a-model", trust_remote_code=False, tiny=None, shape=None)
    with pytest.raises(ValueError) as e:
        load_tokenizer(cfg, "unused")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.path='sft-sweep-tests/not-a-model': the tokenizer could not be loaded offline")
    assert "the hub is switched off (HF_HUB_OFFLINE=1)" in msg and "point model.path at a local copy" in msg
    assert model_shape(cfg, "unused") is None
    with pytest.raises(ValueError, match="no such folder"):
        load_tokenizer(SimpleNamespace(**{**vars(cfg), "path": "./no/such/model"}), "unused")


def test_hub_model_option_is_named_after_the_model(compose_cfg):
    cfg = compose_cfg("model=hub", "model.path=/models/my-7b", "model.name=my-7b")
    assert "demo-my-7b" in cfg.hydra.sweep.dir  # the study and its folder: <data.name>-<model.name>
    with pytest.raises(ValueError, match=r"model\.name must be set, but is \?\?\? \(model.name names the study"):
        plan_rows(["model=hub", "model.path=/models/my-7b"])


def test_plan_shows_progress_bars_on_a_terminal(monkeypatch, capsys):
    import io

    from sweeper import plan_command

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TQDM_DISABLE", "1")  # what `python -m sweeper` sets for every command
    monkeypatch.setattr(sys, "stderr", Tty())
    assert plan_command.main(["schedule=forever"]) == 2
    assert "TQDM_DISABLE" not in os.environ


def test_plan_says_why_rows_were_dropped(tmp_path, cache_dir):
    """Rows whose answer lies wholly past data.max_length lose every loss token and TRL drops them: the plan
    names how many and the setting, as the trial does."""
    import json

    long_prompt = " ".join(["word"] * 400)
    rows = [{"messages": [{"role": "user", "content": f"q{i}" if i % 10 else long_prompt},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(60)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [row] = plan_rows(["data=jsonl", f"data.train_path={path}", "data.eval_fraction=0.1", "data.max_length=64",
                       f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    dropped = row["rows"] - row["prepared_rows"]
    assert dropped > 0
    assert (f"{dropped} of {row['rows']} train rows lost all their loss tokens to truncation at "
            "data.max_length=64 and were dropped; raise data.max_length to keep them") in row["warnings"]
