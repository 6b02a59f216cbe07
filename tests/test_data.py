"""Data loading: formats, splits, and one clear error per kind of bad input."""

from __future__ import annotations

import json

import pytest

from sweeper import data as data_mod

from .conftest import SHARED_DATA


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _msgs(n):
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def test_demo_is_deterministic_and_labelled():
    a, b = data_mod.demo_rows(50, seed=3), data_mod.demo_rows(50, seed=3)
    assert a == b and a != data_mod.demo_rows(50, seed=4)
    labels = {r["messages"][1]["content"] for r in data_mod.demo_rows(400, seed=0)}
    assert labels == set(data_mod._DEMO_INTENTS)


def test_eval_fraction_split_is_seeded_and_disjoint(compose_cfg, tmp_path):
    cfg = compose_cfg("data=jsonl", f"data.train_path={_write(tmp_path / 'rows.jsonl', _msgs(100))}",
                      "data.eval_fraction=0.2")
    s1 = data_mod.load(cfg.data, cfg.paths.cache_dir)
    s2 = data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert (len(s1.train), len(s1.eval), s1.format) == (80, 20, "messages")
    assert s1.eval["messages"] == s2.eval["messages"]
    key = lambda ds: {m[0]["content"] for m in ds["messages"]}  # noqa: E731
    assert not key(s1.train) & key(s1.eval)
    assert cfg.data.name == "rows"  # named after the file


def test_a_process_reads_unchanged_files_once_and_a_changed_file_again(compose_cfg, tmp_path, monkeypatch):
    path = _write(tmp_path / "rows.jsonl", _msgs(40))
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}", "data.eval_fraction=0.25")
    reads = []
    real = data_mod._load
    monkeypatch.setattr(data_mod, "_load", lambda *a: reads.append(1) or real(*a))
    first = data_mod.load(cfg.data, cfg.paths.cache_dir)
    again = data_mod.load(cfg.data, cfg.paths.cache_dir)  # a sweep's trial after its pre-flight
    assert len(reads) == 1 and again.train["messages"] == first.train["messages"]
    assert len(data_mod.load(compose_cfg("data=jsonl", f"data.train_path={path}", "data.eval_fraction=0.5").data,
                             cfg.paths.cache_dir).eval) == 20 and len(reads) == 2  # another config: read
    _write(path, _msgs(60))  # the file changed between two trials: read again
    assert (len(data_mod.load(cfg.data, cfg.paths.cache_dir).train), len(reads)) == (45, 3)


def test_prompt_completion_csv_and_parquet(compose_cfg, tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "extra": i} for i in range(20)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "rows.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    for name in ("rows.csv", "rows.parquet"):
        cfg = compose_cfg("data=jsonl", f"data.train_path={tmp_path / name}")
        s = data_mod.load(cfg.data, cfg.paths.cache_dir)
        assert s.format == "prompt_completion" and s.train.column_names == ["prompt", "completion"]


def test_explicit_eval_file_and_row_caps(compose_cfg, tmp_path):
    cfg = compose_cfg("data=jsonl", f"data.train_path={_write(tmp_path / 't.jsonl', _msgs(30))}",
                      f"data.eval_path={_write(tmp_path / 'e.jsonl', _msgs(12))}",
                      "data.max_train_rows=10", "data.max_eval_rows=5")
    s = data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert (len(s.train), len(s.eval)) == (10, 5)


def test_banking77_sample_reads_shared_data(compose_cfg):
    if not (SHARED_DATA / "banking77" / "train.jsonl").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    cfg = compose_cfg("data=banking77_sample", f"data.train_path={SHARED_DATA}/banking77/train.jsonl")
    s = data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert (len(s.train), len(s.eval), s.format) == (400, 80, "messages")
    labels = set(json.loads((SHARED_DATA / "banking77" / "labels.json").read_text()))
    assert {r[-1]["content"] for r in s.train["messages"]} <= labels


@pytest.mark.parametrize("content,needle", [
    (None, "file not found"),
    ("", "has no rows (an empty file); it needs at least one row"),
    ("\n\n", "has no rows"),
    ('{"messages": []}\n{"messages": [}\n', "line 2 is not valid JSON"),
    ('[1, 2]\n', "line 1 is a JSON list, not an object"),
    ('{"body": "hello"}\n', "need a 'messages' column"),
    ('{"prompt": "hello"}\n', "but found columns ['prompt']"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: no assistant message to learn from"),
    # cut short: json's column on the line without its newline (column 1 of the next line, with it)
    ('{"messages": []}\n{"messages": [\n', "line 2 is not valid JSON (Expecting value at column 15)"),
    ('{"messages": []}\n{"messages": []\n', "line 2 is not valid JSON (Expecting ',' delimiter at column 16)"),
    # blank lines (skipped by the loader) before a bad row: named by its line, as the JSON check names lines
    ('\n  \n{"messages": [{"role": "user", "content": "hi"}]}\n', "line 3: no assistant message to learn from"),
])
def test_bad_files_give_one_clear_error(compose_cfg, tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert needle in str(e.value)
    assert "data.train_path" in str(e.value)


def test_eval_split_larger_than_data(compose_cfg, tmp_path):
    cfg = compose_cfg("data=jsonl", f"data.train_path={_write(tmp_path / 'few.jsonl', _msgs(3))}",
                      "data.eval_fraction=0.9")
    with pytest.raises(ValueError, match=r"leaves 3 eval and 0 train rows"):
        data_mod.load(cfg.data, cfg.paths.cache_dir)


def test_every_row_is_checked_and_the_bad_ones_are_named(compose_cfg, tmp_path):
    import json

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good] * 120
    rows[60] = {"messages": [{"role": "user", "content": "no answer"}]}  # row 61
    rows[99] = {"messages": [{"role": "system", "content": "only a system prompt"}]}  # row 100
    rows[110] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}  # row 111
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}")
    with pytest.raises(ValueError) as e:
        data_mod.load(cfg.data, cfg.paths.cache_dir)
    msg = str(e.value)
    assert msg.startswith("data.train_path: 3 of 120 rows of") and "cannot be trained on" in msg
    assert "line 61: no assistant message to learn from (roles: user)" in msg
    assert "line 100: no assistant message to learn from (roles: system)" in msg
    assert "line 111: its assistant messages are empty" in msg

    pc = [{"prompt": "p", "completion": "c"}] * 130 + [{"prompt": "p", "completion": ""}]  # row 131
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pc), encoding="utf-8")
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}")
    with pytest.raises(ValueError, match=r"1 of 131 rows of .* line 131: an empty 'completion'"):
        data_mod.load(cfg.data, cfg.paths.cache_dir)


def test_a_jsonl_file_saved_with_a_byte_order_mark_loads(compose_cfg, tmp_path):
    """Windows editors save UTF-8 with a BOM; datasets reads such a file, so the row check must too (a BOM
    inside a later line is still refused: it is not where an editor puts one)."""
    path = _write(tmp_path / "bom.jsonl", _msgs(30))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}")
    s = data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert len(s.train) + len(s.eval) == 30
    assert s.train[0]["messages"][0]["role"] == "user"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + [b"\xef\xbb\xbf" + lines[2]] + lines[3:]))
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        data_mod.load(cfg.data, cfg.paths.cache_dir)


@pytest.mark.parametrize("content,needle", [
    ('prompt,completion\n"hi, there,yo\nq,a\n', "is not valid CSV (unexpected end of data)"),
    ("prompt,completion\nq1,a1\nq2,a2, with a comma\n", "line 3 has 3 fields but the header has 2"),
    (b"prompt,completion\nq1,caf\xe9\n", "is not UTF-8 text (byte 0xe9)"),
])
def test_a_malformed_csv_is_one_line_naming_the_line(compose_cfg, tmp_path, content, needle):
    path = tmp_path / "bad.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}")
    with pytest.raises(ValueError) as e:
        data_mod.load(cfg.data, cfg.paths.cache_dir)
    assert needle in str(e.value) and str(e.value).startswith("data.train_path: ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path,name", [
    ("/data/shared/clinc150/train.jsonl", "clinc150"),  # named after its split: the dataset is its folder
    ("/data/shared/snips/Validation.parquet", "snips"),
    ("/work/x/data/train.jsonl", "x"),  # a folder named after a split too: the next one up
    ("my_rows.jsonl", "my_rows"),
    ("train.jsonl", "train"),  # no folder given: the file's own name
    ("HuggingFaceH4/ultrachat_200k", "ultrachat_200k"),
])
def test_a_data_file_names_its_dataset_after_its_folder_when_the_file_is_a_split(compose_cfg, path, name):
    """data=jsonl names a dataset (and so its study, <data.name>-<model.name>) after its file, or after the folder
    of a file named after a split, so that clinc150/train.jsonl and snips/train.jsonl are two studies."""
    assert compose_cfg("data=jsonl", f"data.train_path={path}").data.name == name
