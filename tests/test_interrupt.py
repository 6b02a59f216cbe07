"""Ctrl-C while the sweeper claims a trial: held until the claim is recorded; a Ctrl-C that a finalizer swallowed
is still honoured; a claimed trial that never started goes back to WAITING (real SIGINT to this process, a real
SQLite study)."""

from __future__ import annotations

import os
import signal
import socket

import optuna
import pytest

from sweeper import interrupt
from sweeper.storage import open_storage


def test_ctrl_c_waits_for_the_end_of_a_deferred_block():
    # Python's own handler, as a command starts with (an earlier test in this process may have left another)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the rest of the block")
        assert done == ["the rest of the block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


class _SwallowsCtrlC:
    """An object whose finalizer receives the Ctrl-C: Python prints "Exception ignored in ..." and drops it."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)
        sum(range(1000))  # bytecodes after the signal: its handler runs here, inside the finalizer


def test_a_ctrl_c_a_finalizer_swallowed_is_honoured_later():
    """... and, while remembered, Python's "Exception ignored in ..." report of it (a traceback) is not printed."""
    import sys

    before, hook = signal.signal(signal.SIGINT, signal.default_int_handler), sys.unraisablehook
    reported = []
    sys.unraisablehook = lambda u: reported.append(type(u.exc_value).__name__)  # what Python would print
    try:
        _SwallowsCtrlC()  # Python's own handler: the KeyboardInterrupt is lost, nothing remembers it
        interrupt.honour()
        assert reported == ["KeyboardInterrupt"]
        with interrupt.remembered():
            _SwallowsCtrlC()  # lost again on its way, and not reported ...
            assert reported == ["KeyboardInterrupt"]
            with pytest.raises(KeyboardInterrupt):
                interrupt.honour()  # ... but the sweep's next check raises it
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        interrupt.honour()  # the block is over: nothing left pending for a later command in this process
        _SwallowsCtrlC()
        assert reported == ["KeyboardInterrupt"] * 2  # Python's own report is back
    finally:
        signal.signal(signal.SIGINT, before)
        sys.unraisablehook = hook


def test_a_claimed_trial_that_never_started_goes_back_to_waiting(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s")
    storage = open_storage(url)
    mine, theirs, done = study.ask(), study.ask(), study.ask()
    storage.set_trial_system_attr(mine._trial_id, "worker_process", f"{socket.gethostname()}:{os.getpid()}:7")
    storage.set_trial_system_attr(theirs._trial_id, "worker_process", "another-host:1:7")
    storage.set_trial_system_attr(done._trial_id, "worker_process", f"{socket.gethostname()}:{os.getpid()}:7")
    study.tell(done, 1.0)
    assert interrupt.release_claimed([url]) == ["s: trial 0"]
    assert [t.state.name for t in study.trials] == ["WAITING", "RUNNING", "COMPLETE"]


@pytest.mark.parametrize("entry", ["python -m sweeper", "train.py"])
def test_a_ctrl_c_in_the_interpreters_teardown_prints_no_traceback(entry):
    """A Ctrl-C that arrives after the command is done, while the interpreter shuts down (here: a real SIGINT
    sent from an atexit hook, where Python would print "Exception ignored in atexit callback" and a traceback),
    is ignored: the command's own exit code, nothing on stderr."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = ("runpy.run_module('sweeper', run_name='__main__')" if entry == "python -m sweeper"
           else f"runpy.run_path({str(root / 'train.py')!r}, run_name='__main__')")
    code = ("import atexit, os, runpy, signal, sys, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))\n"
            "sys.argv = ['x', 'cp', '--help']\n" + run)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-2000:]


_SWALLOWED_WHILE_IMPORTING = """
import importlib.abc, runpy, signal, sys

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)


class Swallows:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
        sum(range(1000))  # the handler runs here, inside the finalizer: Python drops the KeyboardInterrupt


class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            Swallows()  # as a garbage-collected object's finalizer would, while Python imports the module
        return None


sys.meta_path.insert(0, Finder())
sys.argv = ['x', *{argv!r}]
{run}
"""


@pytest.mark.parametrize("entry, module", [("python -m sweeper", "sweeper.cli"),
                                           ("python -m sweeper", "sweeper.report.write"),
                                           ("train.py", "sweeper.report.write")])
def test_a_ctrl_c_a_finalizer_swallows_while_a_command_imports_stops_it_with_one_line(tmp_path, entry, module):
    """The Ctrl-C lands in a finalizer (Python would print "Exception ignored in ..." with a traceback and go
    on) while the command's process imports ``module``: the command stops with its one line and 130, prints
    no traceback, and the report writes nothing."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s")
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"max_steps": 1}))
    out = tmp_path / "report"
    run = ("runpy.run_module('sweeper', run_name='__main__')" if entry == "python -m sweeper"
           else f"runpy.run_path({str(root / 'train.py')!r}, run_name='__main__')")
    code = _SWALLOWED_WHILE_IMPORTING.format(module=module, argv=["report", "--storage", url, "--out", str(out)],
                                             run=run)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("interrupted (Ctrl-C): "), proc.stderr[-2000:]
    assert not out.exists() or not any(p.name in ("summary.md", "report.html") for p in out.iterdir())


def test_a_ctrl_c_a_finalizer_swallows_while_the_plan_prepares_its_data_stops_it_with_one_line(
        monkeypatch, capsys, tmp_path, cache_dir):
    """``sweeper plan``: a Ctrl-C lost in a finalizer while TRL prepares the data (the press remembered) ends the
    command with its one line and exit code 130 before it prints a plan, not with the whole plan and 0."""
    from sweeper import cli, plan_command

    prepare = plan_command.plan_rows

    def swallowed_then_prepared(*args, **kwargs):
        _SwallowsCtrlC()
        return prepare(*args, **kwargs)

    monkeypatch.setattr(plan_command, "plan_rows", swallowed_then_prepared)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main(["plan", "data.demo_rows=60", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    finally:
        signal.signal(signal.SIGINT, before)
    out = capsys.readouterr()
    assert ended.value.code == interrupt.EXIT_CODE
    assert "| model=" not in out.out  # no plan printed
    assert out.err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C): the plan stopped")
