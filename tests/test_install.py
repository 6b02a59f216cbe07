"""The installable tool: where the configs are, a user's --config-dir, `sft-sweep cp`, the command's
dispatch and its start-up version check. The installed wheel itself is run by `.ci/installed` (make
installed): a fresh venv, a sweep and a report from an empty folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose

from sweeper import cli, userconf
from sweeper.paths import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_conf_dir_is_the_checkout_conf_here():
    assert CONF_DIR == ROOT / "conf" and (CONF_DIR / "config.yaml").is_file()


def _folder(tmp_path: Path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize("files, expected", [
    (None, "does not exist"),
    ({}, "no .yaml file"),
    ({"data/mine.yml": "name: mine\n"}, "Hydra reads .yaml only; rename data/mine.yml"),
    ({"config.yaml": "a: 1\n"}, "config.yaml has the name of sft-sweep's primary config, which wins over it"),
    ({"data/mine.yaml": "name: mine\n", "data/demo.yaml": "name: demo\n"},
     "data/demo.yaml has the name of the shipped data=demo, which wins over it"),
    ({"hydra/sweeper/sft_sweep.yaml": "n_trials: 3\n"}, "shipped hydra/sweeper=sft_sweep"),
    ({"hydra/job_logging/default.yaml": "{}\n"}, "shipped hydra/job_logging=default"),  # Hydra's own files win too
    ({"data/mine.yaml": "name: mine\n", "schedule/long.yaml": "max_steps: 9000\n"}, None),
])
def test_config_dir_problems(tmp_path, files, expected):
    folder = str(tmp_path / "nope") if files is None else _folder(tmp_path, files)
    why = userconf.problem(folder)
    if expected is None:
        assert why is None
    else:
        assert expected in why and "\n" not in why and folder in why


def test_config_dir_that_is_a_file(tmp_path):
    (tmp_path / "conf").write_text("x")
    assert "is a file, not a folder" in userconf.problem(str(tmp_path / "conf"))


def test_user_groups_compose_beside_the_shipped_ones(tmp_path):
    folder = _folder(tmp_path, {"data/mydata.yaml": (CONF_DIR / "data/jsonl.yaml").read_text()
                                .replace("train_path: ???", "train_path: mine.jsonl"),
                                "schedule/long.yaml": (CONF_DIR / "schedule/over.yaml").read_text()
                                .replace("3000", "4500")})
    with userconf.initialize(folder):
        cfg = compose(config_name="config", overrides=["data=mydata", "schedule=long", "model=tiny"])
        assert cfg.data.train_path == "mine.jsonl" and cfg.data.name == "mine"
        assert cfg.schedule.max_steps == 4500
        assert compose(config_name="config").data.name == "demo"  # the shipped groups are all still there
    with pytest.raises(ValueError, match="does not exist"):
        with userconf.initialize(str(tmp_path / "nope")):
            pass


def test_cp_writes_an_editable_copy_named_after_the_file(tmp_path):
    dest = tmp_path / "conf" / "data" / "mydata.yaml"
    said = userconf.copy_option("data/jsonl", str(dest))
    text = dest.read_text()
    assert "name: mydata  # file name without extension" in text  # the comment is kept
    assert text.replace("name: mydata", "") == (CONF_DIR / "data/jsonl.yaml").read_text().replace(
        "name: ${stem:${data.train_path}}", "")
    assert f"--config-dir {tmp_path / 'conf'}" in said and "data=mydata" in said
    assert userconf.problem(str(tmp_path / "conf")) is None
    for source, target, message in [
        ("data/jsonl", dest, "already exists"),
        ("data/nope", tmp_path / "x.yaml", "options of data: banking77"),
        ("nogroup/x", tmp_path / "x.yaml", "shipped: batch/{"),
        ("data/jsonl", tmp_path / "conf/data/demo.yaml", "name of a shipped data option"),
        ("data/jsonl", tmp_path / "mydata.yml", "must end in .yaml"),
    ]:
        with pytest.raises(ValueError, match=message):
            userconf.copy_option(source, str(target))
    assert sorted(p.name for p in tmp_path.rglob("*.yaml")) == ["mydata.yaml"]  # nothing else written


@pytest.mark.parametrize("argv, expected", [
    (["plann", "x=1"], "unknown command 'plann': did you mean `sft-sweep plan`?"),
    (["train"], "unknown command 'train'"),
    (["--config-dir", "nope", "-m", "schedule=under"], "--config-dir nope:"),
    (["-cd", "nope"], "--config-dir nope:"),
    (["--config-dir=nope"], "--config-dir nope:"),
])
def test_the_command_refuses_in_one_line_and_writes_nothing(tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/sft-sweep"])  # as the installed command (its suggestions name it)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


def test_a_checkouts_train_py_suggests_itself(tmp_path, monkeypatch):
    """Started as ``python train.py``, the suggestions name ``python train.py``, not the installed command."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as e:
        cli.main(["plann"])
    assert "did you mean `python train.py plan`?" in str(e.value) and "e.g. python train.py -m schedule=" in str(e.value)
    assert "sft-sweep" not in str(e.value)


def test_helper_commands_refuse_a_bad_config_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["plan", "--config-dir", "nope"], ["report", "--config-dir", "nope"], ["status", "-cd", "nope"]):
        assert cli.run_command(argv) == 2
        assert capsys.readouterr().err.startswith("error: --config-dir nope:")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_help_names_the_commands(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sft-sweep", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "sft-sweep plan [overrides]" in out and "data: banking77" in out


def test_version_check():
    assert cli.check_versions() is None  # this environment satisfies the declared ranges
    assert cli.check_versions(["hydra-core>=1.3,<1.4", "bitsandbytes>=999; extra == 'qlora'"], ">=3.11") is None
    why = cli.check_versions(["hydra-core>=99"], ">=3.11")
    assert why.startswith("sft-sweep needs hydra-core>=99, but hydra-core 1.3") and "pip install 'hydra-core>=99'" in why
    assert "which is not installed" in cli.check_versions(["no-such-package-sft>=1"], None)
    assert "sft-sweep needs Python >=3.99, but this is Python 3." in cli.check_versions([], ">=3.99")


@pytest.mark.slow
def test_the_wheel_ships_every_config(tmp_path):
    """Every YAML of conf/ (not conf/local/) is in the wheel under sweeper/conf/, and the plugin and the
    command are there: a group added to conf/ ships without touching the packaging."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("sft_sweep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sweeper/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")
                if p.relative_to(ROOT / "conf").parts[0] != "local"}
    assert expected and expected <= names
    assert not any(n.startswith("sweeper/conf/local/") for n in names)
    assert "hydra_plugins/sft_sweep/sft_sweep_sweeper.py" in names and "hydra_plugins/__init__.py" not in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sft-sweep = sweeper.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
