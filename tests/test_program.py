"""How the commands sft-sweep prints start (``sweeper.program``): as the user started the sweep."""

from __future__ import annotations

import shlex

from omegaconf import OmegaConf

from sweeper import program
from sweeper.paths import IN_CHECKOUT


def test_the_program_is_named_as_a_user_types_it(tmp_path, monkeypatch):
    default = "python train.py" if IN_CHECKOUT else "sft-sweep"
    script = tmp_path / "train.py"
    script.write_text("")
    monkeypatch.chdir(tmp_path)
    assert program._prog("/home/me/venv/bin/sft-sweep") == "sft-sweep"
    assert program._prog("C:/venv/Scripts/sft-sweep.exe") == "sft-sweep"
    assert program._prog("train.py") == "python train.py"
    assert program._prog(str(script)) == "python train.py"  # a worker's absolute path to the same script
    other = tmp_path / "a b"
    other.mkdir()
    monkeypatch.chdir(other)
    assert shlex.split(program._prog("../train.py")) == ["python", str(script)]  # elsewhere: its full path
    for argv0 in ("-c", "", "/x/site-packages/sweeper/__main__.py", "/usr/bin/pytest", "missing.py"):
        assert program._prog(argv0) == default, argv0


def test_a_sweep_keeps_its_config_folder_and_the_record_reads_back(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/sft-sweep", "--config-dir", "conf", "-m"])
    sources = [{"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
               {"path": "/home/me/proj/conf", "schema": "file", "provider": "command-line"},
               {"path": "/x/sweeper/conf", "schema": "file", "provider": "main"}]
    config = OmegaConf.create({"hydra": {"runtime": {"config_sources": sources}}})
    got = program.of_sweep(config)
    assert got == program.Program("sft-sweep", "/home/me/proj/conf")
    assert got.prefix() == "sft-sweep --config-dir /home/me/proj/conf"
    assert program.Program.from_record(got.record()) == got
    assert program.of_sweep(OmegaConf.create({"hydra": {"runtime": {"config_sources": sources[:1]}}})).config_dir is None
    assert program.of_sweep(OmegaConf.create({})) == program.Program("sft-sweep")  # no Hydra node: no folder
    for bad in (None, "sft-sweep", {"config_dir": "/x"}, {"prog": 3}):
        assert program.Program.from_record(bad) is None
