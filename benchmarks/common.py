"""What every benchmark table records about the run that made it: device, date, versions, commit, command."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_header(script: str, argv: list[str], packages: tuple[str, ...] = ("torch", "transformers", "trl", "optuna")) -> str:
    """Two markdown lines: ``- device: ...; date: ...; <package versions>; commit ...`` and
    ``- command: `python <script> <argv>```. The commit is ``HEAD``, with `` + uncommitted changes`` when the
    tracked files differ from it (a copy of a working tree whose ``.git`` is older, say)."""
    import torch

    device = (f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} not installed")
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                         stderr=subprocess.DEVNULL).strip()
        if subprocess.call(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) == 1:
            commit += " + uncommitted changes"
    except Exception:  # not a git checkout
        commit = "?"
    return (f"- device: {device}; date: {datetime.date.today().isoformat()}; {'; '.join(versions)}; commit {commit}\n"
            f"- command: `python {shlex.join([script, *argv])}`")
