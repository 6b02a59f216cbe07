"""Work done once for the whole test run, whichever test process (pytest-xdist) asks first.

A module fixture runs once per test process, so with ``make test``'s two processes a fixture that trains a
sweep would train it twice when its tests land on both. :func:`once` keeps the result in a folder beside the
processes' own temporary folders (pytest-xdist's pattern for session data): the first process to ask takes a
file lock, does the work into that folder and marks it done; the others wait on the lock and read it. Without
xdist the folder is under the run's own temporary folder and the work runs once as before.

The folder is shared: its users read it and write only into their own ``tmp_path``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = ["once"]


def once(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> tuple[Path, Any]:
    """``(folder, value)``: ``make(folder)`` run into an empty ``folder`` once for the whole run; its value
    (JSON) is kept in the folder for the other processes. A ``make`` that raised leaves nothing behind, so
    the next process to ask runs it again (and fails the same way, in its own test)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each process's own (popen-gw0, popen-gw1, ...)
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            value = make(folder)
            done.write_text(json.dumps(value))
        return folder, json.loads(done.read_text())
