"""How a user starts sft-sweep, as the commands it prints name it: ``sft-sweep`` (installed) or
``python train.py`` (a checkout), with the ``--config-dir`` the sweep ran with.

    sft-sweep --config-dir ./conf -m schedule=under,sweet data=mydata
    # the report then proposes: sft-sweep --config-dir /home/me/proj/conf -m schedule.max_steps=... data=mydata

:func:`of_sweep` reads a sweep's own start (``sys.argv[0]``, and Hydra's config sources for ``--config-dir``);
the sweep records it on each trial (:data:`sweeper.records.COMMAND`), so that the report's commands, printed
later by ``sft-sweep report`` or on another machine, start the way the sweep did. Trials recorded without it
get :func:`this_process`'s.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.paths import IN_CHECKOUT

__all__ = ["Program", "of_sweep", "this_process"]

INSTALLED = "sft-sweep"  # the installed command (pyproject.toml's [project.scripts])
CHECKOUT = "python train.py"  # a checkout's form of the same command


@dataclass(frozen=True)
class Program:
    """The start of a command a user pastes: ``prog`` (``sft-sweep``, ``python train.py``, or ``python`` and a
    script's path) and the user's config folder, absolute, or None."""

    prog: str
    config_dir: str | None = None

    def prefix(self) -> str:
        """``prog`` and, when set, ``--config-dir <folder>`` (shell-quoted): what a pasted command starts with."""
        return self.prog + (f" --config-dir {shlex.quote(self.config_dir)}" if self.config_dir else "")

    def record(self) -> dict:
        return {"prog": self.prog, "config_dir": self.config_dir}

    @classmethod
    def from_record(cls, record: Any) -> "Program | None":
        """The program a trial recorded (:meth:`record`), or None when it holds none (recorded before)."""
        if not isinstance(record, dict) or not isinstance(record.get("prog"), str):
            return None
        folder = record.get("config_dir")
        return cls(record["prog"], folder if isinstance(folder, str) else None)


def _prog(argv0: str) -> str:
    """The program that ``argv0`` (a process's ``sys.argv[0]``) names, as a user types it: ``sft-sweep``;
    ``python train.py`` for a script in the working folder (else ``python`` and its path); otherwise (``python -m
    sweeper``, an embedding program) the default of this install: ``python train.py`` in a checkout, else
    ``sft-sweep``."""
    path = Path(argv0)
    if path.name == INSTALLED or path.stem == INSTALLED:  # sft-sweep, sft-sweep.exe, sft-sweep-script.py
        return INSTALLED
    if path.suffix == ".py" and path.name != "__main__.py" and path.is_file():
        here = path.resolve().parent == Path.cwd().resolve()
        return f"python {shlex.quote(path.name if here else str(path.resolve()))}"
    return CHECKOUT if IN_CHECKOUT else INSTALLED


def this_process() -> Program:
    """How this process was started (no config folder: only a sweep knows it, :func:`of_sweep`)."""
    return Program(_prog(sys.argv[0] if sys.argv and sys.argv[0] else ""))


def of_sweep(config: Any) -> Program:
    """How the sweep of ``config`` (its composed config, with the ``hydra`` node) was started: this process's
    program and the ``--config-dir`` folder among Hydra's config sources."""
    folder = None
    try:
        for source in config.hydra.runtime.config_sources:
            if source.provider == "command-line" and source.schema == "file":
                folder = str(source.path)
    except Exception:  # noqa: BLE001 - a config without Hydra's runtime node (a test's): no folder to repeat
        folder = None
    return Program(this_process().prog, folder)
