"""The commands the report prints for a user to paste: one confirming run (:func:`one_run`) and the next
grid of lengths (:func:`grid_command`), each repeating the overrides that ran the trial it follows."""

from __future__ import annotations

import shlex
from typing import Sequence

__all__ = ["grid_command", "one_run"]


def one_run(steps: int, settings: Sequence[str], extra: str = "") -> str:
    """One confirming run of ``steps`` steps with the trial's settings, then ``extra`` (which wins)."""
    return f"python train.py schedule.max_steps={steps}" + "".join(" " + shlex.quote(o) for o in settings) + extra


def grid_command(lengths: Sequence[int], wsd: bool, settings: Sequence[str] = ()) -> str:
    """The follow-up command: the new lengths, and the ``settings`` (overrides) of the trial it follows, so
    that it runs in the same study with the same data, model and settings."""
    joined = ",".join(str(n) for n in lengths)
    rest = "".join(" " + shlex.quote(o) for o in settings)
    if wsd:
        return f"python train.py -m schedule=wsd_search 'schedule.wsd.candidates=[{joined}]'{rest}"
    return f"python train.py -m schedule.max_steps={joined}{rest}"
