"""Inputs that could pass silently or fail with a misleading error: data identity and row shapes, damaged
checkpoints and reused trial folders, secrets in what the tool writes, absurd config values, several files in
one command. In-process, on real files in tmp_path and real SQLite studies, through the functions the CLI
calls; two slow cases train (a seed sweep, the CLI)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from sweeper import data as data_mod
from sweeper import fingerprint, identity
from sweeper import spec as spec_mod
from sweeper.config import InputError

from .conftest import FAST
from .helpers.cli import run_in_process


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat(i, answer=None):
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}" if answer is None else answer}]}


def _load(compose_cfg, *overrides):
    cfg = compose_cfg("data=jsonl", *overrides)
    return data_mod.load(cfg.data, cfg.paths.cache_dir)


def _error(compose_cfg, *overrides) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        _load(compose_cfg, *overrides)
    assert "\n" not in str(e.value)  # one line
    return str(e.value)


# --------------------------------------------------------------------------- data identity


def test_a_file_changed_in_place_is_another_setting_of_the_study(compose_cfg, tmp_path):
    """Same path, same size, other rows: the study refuses the command (content digest in its settings)."""
    import optuna

    from sweeper.space import SweepSpace
    from sweeper.sweep.preflight import check_same_settings

    path = _write(tmp_path / "rows.jsonl", [_chat(i) for i in range(40)])
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}")
    before = identity.result_config(cfg, fingerprint.data_content(cfg.data, cfg.paths.cache_dir))
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    trial = study.ask()
    study._storage.set_trial_system_attr(trial._trial_id, "config", before)
    study.tell(trial, 1.0)
    space = SweepSpace(fixed=[], grid=[], distributions={})
    same = dict(storage_url=f"sqlite:///{tmp_path}/optuna.db", allow_change=False)
    check_same_settings(study, space, [before], **same)  # the same file: accepted

    size = path.stat().st_size
    rows = [_chat(i) for i in range(40)]
    rows[7] = _chat(7, "answer X")  # same length as "answer 7": the size does not change
    _write(path, rows)
    assert path.stat().st_size == size
    after = identity.result_config(cfg, fingerprint.data_content(cfg.data, cfg.paths.cache_dir))
    assert after["data.train_content"] != before["data.train_content"]
    with pytest.raises(ValueError) as e:
        check_same_settings(study, space, [after], **same)
    assert "data.train_content" in str(e.value) and "whose content changed" in str(e.value)
    assert "hydra.sweeper.study_name" in str(e.value)
    assert not identity.same_run(before, after)  # a grid point of the new content is not done
    older = {k: v for k, v in before.items() if k not in identity.CONTENT}  # recorded before contents were
    assert identity.same_run(older, after)


def test_a_follow_up_may_fix_a_key_the_study_searched(compose_cfg, tmp_path):
    """A study that sampled the learning rate; the report's follow-up grid runs at its best rate, a fixed
    override: accepted, since the rate is what the study searched. Another changed setting is still refused."""
    import optuna

    from sweeper.space import SweepSpace
    from sweeper.sweep.preflight import check_same_settings

    ran = identity.result_config(compose_cfg())
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    trial = study.ask({"lr.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study._storage.set_trial_system_attr(trial._trial_id, "config", ran)
    study.tell(trial, 1.0)
    space = SweepSpace(fixed=["lr.learning_rate=0.0079"], grid=[], distributions={})
    same = dict(storage_url=f"sqlite:///{tmp_path}/optuna.db", allow_change=False)
    check_same_settings(study, space, [identity.result_config(compose_cfg("lr.learning_rate=0.0079"))], **same)
    with pytest.raises(ValueError, match="lr.weight_decay"):
        check_same_settings(study, space, [identity.result_config(
            compose_cfg("lr.learning_rate=0.0079", "lr.weight_decay=0.5"))], **same)


def test_fingerprint_is_cached_by_path_size_and_mtime(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("abc\n")
    first = fingerprint.file_digest(path, tmp_path / "cache")
    assert first.startswith("sha256:") and "(4 bytes)" in first
    cache = json.loads((tmp_path / "cache" / "data" / "fingerprints.json").read_text())
    assert list(cache.values()) == [first]
    path.write_text("abd\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert fingerprint.file_digest(path, tmp_path / "cache") != first


@pytest.mark.parametrize("how", ["copied eval file", "repeated train rows"])
def test_eval_rows_that_are_train_rows_are_counted_and_warned(compose_cfg, tmp_path, caplog, how):
    rows = [_chat(i) for i in range(40)]
    if how == "copied eval file":
        overrides = [f"data.train_path={_write(tmp_path / 't.jsonl', rows)}",
                     f"data.eval_path={_write(tmp_path / 'e.jsonl', rows[:10])}"]
    else:
        overrides = [f"data.train_path={_write(tmp_path / 't.jsonl', rows[:10] * 4)}", "data.eval_fraction=0.25"]
    with caplog.at_level(logging.WARNING, logger="sweeper.data"):
        splits = _load(compose_cfg, *overrides)
    assert splits.overlap == 10
    assert "10 of 10 eval rows are also train rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sweeper.data"):
        again = _load(compose_cfg, *overrides)  # a sweep's trial loads the data its pre-flight loaded: said once
    assert again.overlap == 10 and again.notes == splits.notes and "eval rows are also train rows" not in caplog.text
    clean = _load(compose_cfg, f"data.train_path={_write(tmp_path / 'c.jsonl', rows)}")
    assert clean.overlap == 0


def test_glob_characters_in_a_path_are_read_literally(compose_cfg, tmp_path):
    _write(tmp_path / "rows1.jsonl", [_chat(i, "wrong file") for i in range(20)])  # what "rows[1]" globs to
    literal = _write(tmp_path / "rows[1].jsonl", [_chat(i) for i in range(20)])
    splits = _load(compose_cfg, f"data.train_path='{literal}'")
    assert splits.source == str(literal)
    assert {m[1]["content"] for m in splits.train["messages"]} != {"wrong file"}
    (tmp_path / "**").mkdir()
    star = _write(tmp_path / "**" / "x*.jsonl", [_chat(i, "star") for i in range(20)])
    assert {m[1]["content"] for m in _load(compose_cfg, f"data.train_path='{star}'").train["messages"]} == {"star"}


def test_a_folder_is_refused_and_a_save_to_disk_folder_is_loaded(compose_cfg, tmp_path):
    import datasets

    (tmp_path / "plain").mkdir()
    msg = _error(compose_cfg, f"data.train_path={tmp_path / 'plain'}")
    assert msg.startswith("data.train_path:") and "is a folder, not a data file" in msg and "save_to_disk" in msg
    datasets.Dataset.from_list([_chat(i) for i in range(30)]).save_to_disk(str(tmp_path / "saved"))
    splits = _load(compose_cfg, f"data.train_path={tmp_path / 'saved'}", "data.name=saved")
    assert (len(splits.train) + len(splits.eval), splits.format) == (30, "messages")


@pytest.mark.parametrize("rows,detected,fmt", [
    ([{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": f"q{i}"},
                         {"from": "gpt", "value": f"a{i}"}]} for i in range(20)], "sharegpt", "messages"),
    ([{"instruction": f"classify {i}", "input": "" if i % 2 else f"text {i}", "output": f"label{i % 3}"}
      for i in range(20)], "alpaca", "messages"),
    ([{"text": f"plain text number {i}"} for i in range(20)], "text", "prompt_completion"),
])
def test_common_formats_are_converted_and_prepared_by_trl(compose_cfg, tmp_path, caplog, rows, detected, fmt):
    from sweeper.sft import check_prepared_data

    path = _write(tmp_path / f"{detected}.jsonl", rows)
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}", "data.eval_fraction=0.2", "model=tiny")
    with caplog.at_level(logging.INFO, logger="sweeper.data"):
        splits = data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert (splits.detected, splits.format) == (detected, fmt)
    assert data_mod.CONVERSIONS[detected][2] in caplog.text  # the log says what was converted
    first = splits.train[0]
    if fmt == "messages":
        assert [m["role"] for m in first["messages"]][-2:] == ["user", "assistant"]
    else:
        assert first["prompt"] == "" and first["completion"].startswith("plain text number")
    check_prepared_data(cfg, splits)  # TRL tokenises them with the tiny model's tokenizer


@pytest.mark.parametrize("row,needle", [
    ({"messages": [{"role": "user", "content": "weather?"},
                   {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                       "name": "get_weather", "arguments": "{}"}}]},
                   {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "sunny"}]},
     "line 21: messages[1] is a tool call: tool calls are not supported"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"},
                   {"role": "assistant", "content": "a"}]}, "line 21: messages[1] is a tool result"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
     "line 21: messages[1].content must be text, but is a number (5)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     "line 21: messages[1].content must be text, but is a list"),
    ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "line 21: messages[0].role must be one of system, user, assistant, but is 'human'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "line 21: conversations[1] is a tool turn"),
    ({"instruction": "i", "output": 3}, "line 21: 'output' must be text, but is a number (3)"),
    ({"text": 12}, "line 21: 'text' must be text, but is a number (12)"),
])
def test_bad_rows_are_named_by_row_and_field_before_any_trial(compose_cfg, tmp_path, row, needle):
    fmt = next(iter(row))
    good = {"messages": _chat(0), "conversations": {"conversations": [{"from": "human", "value": "q"},
                                                                      {"from": "gpt", "value": "a"}]},
            "instruction": {"instruction": "i", "input": "", "output": "o"}, "text": {"text": "t"}}[fmt]
    good = good if fmt != "messages" else _chat(0)
    rows = [good] * 30
    rows[20] = row  # row 21: after the first rows, where a type guess from the first rows would miss it
    msg = _error(compose_cfg, f"data.train_path={_write(tmp_path / 'rows.jsonl', rows)}")
    assert msg.startswith("data.train_path: 1 of 30 rows of") and needle in msg, msg


def test_a_train_set_smaller_than_one_step_is_refused(compose_cfg, tmp_path):
    path = _write(tmp_path / "two.jsonl", [_chat(i) for i in range(3)])
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}", "data.eval_fraction=0.34", "batch=balanced")
    with pytest.raises(InputError) as e:
        spec_mod.prepare(cfg)
    msg = str(e.value)
    assert "2 train row(s), fewer than the effective batch of 16 rows" in msg
    assert "batch.per_device_train_batch_size=2 batch.gradient_accumulation_steps=1" in msg
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}", "data.eval_fraction=0.34", "batch=auto")
    with pytest.raises(InputError, match=r"batch.auto.target_effective_batch=2"):
        spec_mod.prepare(cfg)


# --------------------------------------------------------------------------- the README's own forms


def test_a_missing_shipped_dataset_names_the_environment_variable(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_SWEEP_SHARED_DATA", str(tmp_path / "nowhere"))
    cfg = compose_cfg("data=banking77_sample")
    with pytest.raises(FileNotFoundError) as e:
        data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert "SFT_SWEEP_SHARED_DATA" in str(e.value) and str(tmp_path / "nowhere") in str(e.value)


# --------------------------------------------------------------------------- checkpoints and folders


def _checkpoint(run_dir, step, drop=()):
    """A checkpoint as the Trainer writes one (weights, optimizer, scheduler, RNG, state), real files."""
    import torch
    from safetensors.torch import save_file

    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64)}, str(ckpt / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.randn(64, 64)}}}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    torch.save({"python": 1}, ckpt / "rng_state.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    for name in drop:
        (ckpt / name).unlink()
    return ckpt


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage,needle", [
    (lambda c: _cut(c / "model.safetensors", 0.6), "model.safetensors is cut short"),
    (lambda c: _cut(c / "trainer_state.json", 0.5), "trainer_state.json is cut short or damaged"),
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing (resuming without it would train another"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda c: _cut(c / "optimizer.pt", 0.5), "optimizer.pt is cut short or damaged"),
    (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    (lambda c: (c / "model.safetensors").unlink(), "it holds no weights"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, needle):
    from sweeper import checkpoints

    _checkpoint(tmp_path, 8)
    newest = _checkpoint(tmp_path, 12)
    assert checkpoints.newest_resumable(tmp_path) == str(newest)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="sweeper.checkpoints"):
        assert checkpoints.newest_resumable(tmp_path, "trial 3's retry") == str(tmp_path / "checkpoint-8")
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("trial 3's retry resumes from checkpoint-8:") and str(newest) in line and needle in line


def test_no_whole_checkpoint_starts_from_step_0_and_says_so(tmp_path, caplog):
    from sweeper import checkpoints

    _checkpoint(tmp_path, 4, drop=("optimizer.pt",))
    with caplog.at_level(logging.WARNING, logger="sweeper.checkpoints"):
        assert checkpoints.newest_resumable(tmp_path) is None
    assert "the retry starts from step 0:" in caplog.text and "optimizer.pt is missing" in caplog.text
    assert checkpoints.newest_resumable(tmp_path / "nothing") is None


def test_a_new_study_of_an_old_name_moves_the_old_trial_folders_aside(tmp_path, caplog):
    """optuna.db deleted and the same command run again: the new trial 0 must not write into the old one's
    folder (its best checkpoint, its train.log)."""
    import optuna

    from sweeper import folders

    url = f"sqlite:///{tmp_path}/optuna.db"
    sweep = tmp_path / "sweeps" / "demo-tiny"
    first = optuna.create_study(study_name="demo-tiny", storage=url)
    assert folders.claim(sweep, first, url) is None
    (sweep / "trial_0" / "checkpoint-50").mkdir(parents=True)
    (sweep / "trial_0" / "train.log").write_text("first run\n")
    (sweep / "summary.md").write_text("first summary\n")
    first.enqueue_trial({})
    assert folders.claim(sweep, optuna.load_study(study_name="demo-tiny", storage=url), url) is None  # same study
    assert (sweep / "trial_0" / "train.log").read_text() == "first run\n"

    (tmp_path / "optuna.db").unlink()
    second = optuna.create_study(study_name="demo-tiny", storage=url)
    with caplog.at_level(logging.WARNING, logger="sweeper.folders"):
        moved = folders.claim(sweep, second, url)
    assert moved is not None and moved.parent == sweep and moved.name.startswith("previous-")
    assert (moved / "trial_0" / "train.log").read_text() == "first run\n"
    assert (moved / "trial_0" / "checkpoint-50").is_dir() and (moved / "summary.md").is_file()
    assert not (sweep / "trial_0").exists()
    assert "moved them, whole, to" in caplog.text and "nothing was deleted" in caplog.text

    # folders left by a study that was never marked (an older version) and is gone: moved too
    (sweep / folders.MARKER).unlink()
    (sweep / "trial_0").mkdir()
    third_url = f"sqlite:///{tmp_path}/other.db"
    third = optuna.create_study(study_name="demo-tiny", storage=third_url)
    assert folders.claim(sweep, third, third_url) is not None

    # another command started the same new study a moment earlier (its trial 0 runs): its folder stays
    third.enqueue_trial({})
    (sweep / "trial_0").mkdir()
    (sweep / folders.MARKER).write_text(json.dumps({folders.INCARNATION: "another"}))
    assert folders.claim(sweep, third, third_url) is None and (sweep / "trial_0").is_dir()


# --------------------------------------------------------------------------- secrets


SECRET = "hf_SeCrEt0123456789"


@pytest.mark.parametrize("text,masked", [
    ("- +hydra.job.env_set.HF_TOKEN=hf_SeCrEt0123456789", "- +hydra.job.env_set.HF_TOKEN=***"),
    ("      HF_TOKEN: hf_SeCrEt0123456789", "      HF_TOKEN: ***"),
    ("    WANDB_API_KEY: 'a''b'", "    WANDB_API_KEY: ***"),
    ("AWS_SECRET_ACCESS_KEY=\"x y\"", "AWS_SECRET_ACCESS_KEY=***"),
    ("storage: postgresql://bob:pa'ss@db/x", "storage: postgresql://bob:***@db/x"),
    ("- hydra.sweeper.storage=\"postgresql://bob:p%40s'%22s@db:5432/x\"", "- hydra.sweeper.storage=\"postgresql://bob:***@db:5432/x\""),
    ("storage: 'postgresql+psycopg://bob:p''w@db/x'", "storage: 'postgresql+psycopg://bob:***@db/x'"),
    ("tokens_seen: 1200, max_tokens: 5, pad_token: <pad>", "tokens_seen: 1200, max_tokens: 5, pad_token: <pad>"),
    # only names that hold secrets: not a config's key, a tokenizer's special token or the current folder
    ("full_key: schedul, sort_key: x, add_eos_token: true", "full_key: schedul, sort_key: x, add_eos_token: true"),
    ("PWD=/home/me monkey: 1", "PWD=/home/me monkey: 1"),
    ("api_key: abcd, password: abcd, GITHUB_TOKEN=abcd, DB_PASS=abcd, SSH_PRIVATE_KEY=abcd",
     "api_key: ***, password: ***, GITHUB_TOKEN=***, DB_PASS=***, SSH_PRIVATE_KEY=***"),
])
def test_secrets_are_masked_in_any_quoting(text, masked):
    from sweeper.passwords import mask_secrets

    assert mask_secrets(text) == masked


def test_hydra_saved_config_and_logs_hold_no_secret(compose_cfg, tmp_path):
    """What Hydra saves for a job (hydra.yaml with env_set and the command line, overrides.yaml), scrubbed the
    way a job does it as it starts; a log line through the filter."""
    from omegaconf import OmegaConf

    from sweeper import passwords

    url = "postgresql://bob:pa'ss%40w0rd@127.0.0.1:5432/test"
    cfg = compose_cfg(f"+hydra.job.env_set.HF_TOKEN={SECRET}", f"hydra.sweeper.storage=\"{url}\"")
    saved = tmp_path / "job" / ".hydra"
    saved.mkdir(parents=True)
    OmegaConf.save(cfg.hydra, saved / "hydra.yaml")
    (saved / "overrides.yaml").write_text(OmegaConf.to_yaml(list(cfg.hydra.overrides.hydra)))
    raw = (saved / "hydra.yaml").read_text()
    assert SECRET in raw and "pa'ss" in raw  # what Hydra writes
    values = passwords.secret_values(dict(cfg.hydra.job.env_set), url)
    passwords.scrub_saved_config(tmp_path / "job", values)
    for path in saved.iterdir():
        text = path.read_text()
        assert SECRET not in text and "pa'ss" not in text and "w0rd" not in text, path
    assert "HF_TOKEN: '***'" in (saved / "hydra.yaml").read_text() or "HF_TOKEN: ***" in (saved / "hydra.yaml").read_text()

    logger = logging.getLogger("sweeper.test_secret")
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        passwords.install_log_filter(values)
        logger.warning("token is %s and the URL %s", SECRET, url)
        logger.warning("decoded password pa'ss@w0rd in an error")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    log_text = (tmp_path / "train.log").read_text()
    assert SECRET not in log_text and "pa'ss" not in log_text and "***" in log_text


def test_workers_get_secret_env_set_values_in_their_environment(monkeypatch):
    from sweeper.sweep.launchers import Workers
    from sweeper.sweep.settings import Settings

    monkeypatch.setattr("sys.argv", ["train.py", "-m", "schedule=under,sweet", f"+hydra.job.env_set.HF_TOKEN={SECRET}",
                                     "hydra.job.env_set.OMP_NUM_THREADS=2"])

    class _One:
        sweeps = [object()]

        class folder:
            @staticmethod
            def resolve():
                return "/tmp/sweep"

    workers = Workers(Settings(storage_url="postgresql://bob:pw0rd@db/x"), _One(), queue=None)
    command = workers.worker_command()
    assert not any(SECRET in a or "pw0rd" in a for a in command)
    assert "hydra.job.env_set.OMP_NUM_THREADS=2" in command
    env = workers.worker_env()
    assert env["HF_TOKEN"] == SECRET and env["PGPASSWORD"] == "pw0rd"


# --------------------------------------------------------------------------- config edge values


@pytest.mark.parametrize("override,needle", [
    ("schedule.max_steps=1000000000000", "schedule.max_steps must be at most 10,000,000"),
    ("schedule.max_steps=10000001", "schedule.max_steps must be at most 10,000,000"),
    ("seed=-1", "seed must be between 0 and 4294967295"),
    ("seed=4294967296", "seed must be between 0 and 4294967295"),
    ("data.seed=-3", "data.seed must be between 0 and 4294967295"),
])
def test_absurd_values_are_refused(compose_cfg, override, needle):
    from sweeper import config as config_mod

    with pytest.raises(ValueError, match=needle):
        config_mod.validate(compose_cfg(override))
    config_mod.validate(compose_cfg("schedule.max_steps=10000000", "seed=4294967295"))


def test_seed_sets_the_batch_order_and_data_seed_the_rows(compose_cfg):
    from sweeper import sft

    cfg = compose_cfg("seed=7", "data.seed=3")
    spec = spec_mod.resolve(cfg)
    args = sft.build_sft_config(spec, output_dir=cfg.paths.output_dir, data_format="messages")
    assert (args.seed, args.data_seed) == (7, None)  # the Trainer's sampler follows seed



@pytest.mark.slow
def test_a_sweep_over_seed_alone_gives_different_curves(compose_cfg):
    """Real trainings of the tiny model (its weights do not depend on seed): only the batch order moves."""
    from sweeper import trial

    def value(seed):
        return trial.run(compose_cfg(*FAST, "schedule.max_steps=8", f"seed={seed}"))

    assert value(2) != value(1)  # another seed, another order, another curve (one seed, one curve: test_chaos)


# --------------------------------------------------------------------------- the CLI, end to end


@pytest.mark.slow
def test_several_files_one_command_no_secret_written_and_a_new_study_moves_old_folders(tmp_path, cache_dir):
    """`data=jsonl data.train_path=a.jsonl,b.parquet` runs a study per file; a token given with env_set is in
    no file and no output line; the same command after optuna.db is deleted moves the old trial folders aside."""
    import datasets
    import optuna

    rows = [_chat(i, f"label{i % 3}") for i in range(60)]
    a = _write(tmp_path / "a.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    out = tmp_path / "out"
    base = [*FAST, "schedule.max_steps=4", f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}",
            f"+hydra.job.env_set.HF_TOKEN={SECRET}", "data=jsonl"]
    proc = run_in_process("-m", f"data.train_path={a},{tmp_path / 'b.parquet'}", *base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = f"sqlite:///{out}/optuna.db"
    for name in ("a-tiny", "b-tiny"):
        [t] = optuna.load_study(study_name=name, storage=url).trials
        assert t.state == optuna.trial.TrialState.COMPLETE
    assert SECRET not in proc.stdout + proc.stderr
    written = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not written, written

    old_log = (out / "sweeps" / "a-tiny" / "trial_0" / "train.log").read_text()
    (out / "optuna.db").unlink()
    proc = run_in_process("-m", f"data.train_path={a}", *base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moved them, whole, to" in proc.stdout + proc.stderr
    [previous] = (out / "sweeps" / "a-tiny").glob("previous-*")
    assert (previous / "trial_0" / "train.log").read_text() == old_log  # nothing appended, nothing lost
    assert list((previous / "trial_0").glob("checkpoint-*"))
    new_log = (out / "sweeps" / "a-tiny" / "trial_0" / "train.log").read_text()
    assert old_log not in new_log


def test_cfg_hydra_prints_no_secret(capsys):
    """``--cfg hydra`` (Hydra's own print of the config) masks the storage password, in the URL and as
    ``?password=``, and a secret env_set value."""
    from sweeper.cli import main

    main(["hydra.sweeper.storage='postgresql://bob:pa55w0rd@db/x?password=pa55w0rd2'",
          f"+hydra.job.env_set.HF_TOKEN={SECRET}", "--cfg", "hydra"])
    out = capsys.readouterr().out
    assert "storage: postgresql://bob:***@db/x?password=***" in out and "HF_TOKEN: ***" in out
    assert "pa55w0rd" not in out and SECRET not in out
