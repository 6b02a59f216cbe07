"""The commands run in this process: ``python train.py ...`` and ``python -m sweeper ...`` without a new
interpreter.

:func:`run_in_process` calls the same task function through ``hydra.main`` with the given arguments,
so Hydra parses the command line, composes the config, starts the sweeper plugin and reports an error
exactly as the command does (one line on stderr, through the command's own filter of Hydra's report,
``sweeper.cli._OneLineRefusals``; exit code 1); only the interpreter start-up and the
imports (seconds per command) are saved. A sweep that trains runs here too (its trials run in this process,
as Hydra's basic launcher runs them in the command's); what needs a process of its own stays in a real
subprocess (``tests.conftest.run_cli``): a kill or a signal, the process's exit, several workers, SLURM.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["run_in_process", "sweeper_in_process"]


def run_in_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``train.py *args`` here (``env``: variables set while it runs); return its exit code and what it
    wrote, as :func:`subprocess.run` would."""
    from sweeper import train
    from sweeper.cli import _OneLineRefusals
    from sweeper.paths import CONF_DIR

    # the Hydra app that train.py (through sweeper.cli) runs, wrapped again so that Hydra starts afresh
    main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(train.main.__wrapped__)
    out, err = io.StringIO(), io.StringIO()
    refusals = _OneLineRefusals(err)
    env = {"HYDRA_FULL_ERROR": "0", "TQDM_DISABLE": "1", **(env or {})}
    GlobalHydra.instance().clear()
    code = 0
    try:
        # Hydra re-raises instead of reporting when a tracer is set (a debugger, or coverage): the command has none
        with (mock.patch.object(sys, "argv", [str(ROOT / "train.py"), *args]), mock.patch.dict(os.environ, env),
              mock.patch("hydra._internal.utils.is_under_debugger", return_value=False),
              contextlib.redirect_stdout(out), contextlib.redirect_stderr(refusals)):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        refusals.end()
        # the command's process ends here; this one goes on, so nothing of Hydra's run may outlive it
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return subprocess.CompletedProcess([sys.executable, "train.py", *args], code, out.getvalue(), err.getvalue())


def sweeper_in_process(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m sweeper *args`` here (its ``main``, argparse's exits included); return its exit code and
    what it wrote, as :func:`subprocess.run` would."""
    from sweeper.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with mock.patch.dict(os.environ), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([sys.executable, "-m", "sweeper", *args], code, out.getvalue(), err.getvalue())
