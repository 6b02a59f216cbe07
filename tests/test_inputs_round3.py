"""Inputs that once went through silently or with a misleading error: data identity and shapes, checkpoints,
secrets in what the tool writes, absurd config values, several files in one command. In-process, on real
files in tmp_path and real SQLite studies, through the functions the CLI calls."""

from __future__ import annotations

import json
import logging
import os

import pytest

from sweeper import data as data_mod
from sweeper import fingerprint, identity
from sweeper import spec as spec_mod
from sweeper.config import InputError


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
    from sweeper.study import StudySweeper

    path = _write(tmp_path / "rows.jsonl", [_chat(i) for i in range(40)])
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}")
    before = identity.result_config(cfg, fingerprint.data_content(cfg.data, cfg.paths.cache_dir))
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    trial = study.ask()
    study._storage.set_trial_system_attr(trial._trial_id, "config", before)
    study.tell(trial, 1.0)
    sweeper = StudySweeper(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s", n_trials=None,
                           sampler=None, pruner=None)
    space = SweepSpace(fixed=[], grid=[], distributions={})
    sweeper._check_same_settings(study, space, [before])  # the same file: accepted

    size = path.stat().st_size
    rows = [_chat(i) for i in range(40)]
    rows[7] = _chat(7, "answer X")  # same length as "answer 7": the size does not change
    _write(path, rows)
    assert path.stat().st_size == size
    after = identity.result_config(cfg, fingerprint.data_content(cfg.data, cfg.paths.cache_dir))
    assert after["data.train_content"] != before["data.train_content"]
    with pytest.raises(ValueError) as e:
        sweeper._check_same_settings(study, space, [after])
    assert "data.train_content" in str(e.value) and "whose content changed" in str(e.value)
    assert "hydra.sweeper.study_name" in str(e.value)


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
     "row 21: messages[1] is a tool call: tool calls are not supported"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"},
                   {"role": "assistant", "content": "a"}]}, "row 21: messages[1] is a tool result"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
     "row 21: messages[1].content must be text, but is a number (5)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     "row 21: messages[1].content must be text, but is a list"),
    ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "row 21: messages[0].role must be one of system, user, assistant, but is 'human'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "row 21: conversations[1] is a tool turn"),
    ({"instruction": "i", "output": 3}, "row 21: 'output' must be text, but is a number (3)"),
    ({"text": 12}, "row 21: 'text' must be text, but is a number (12)"),
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
