"""The commands the report prints for a user to paste: one confirming run (:func:`one_run`) and the next
grid of lengths (:func:`grid_command`), each started as the sweep of the trial it follows was (``sft-sweep`` or
``python train.py``, and its ``--config-dir``: :mod:`sweeper.program`) and repeating the overrides that ran it. A grid
command also names the study it continues and, when it is not the default, the storage (:class:`Target`),
so that pasted anywhere it adds its trials to this study; a confirming run is a single run, outside any
study. Every override is a valid Hydra override (:func:`sweeper.space.quote`) and shell-quoted
(``shlex.quote``), so that the pasted command passes the same values, paths included."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sweeper.passwords import split_password
from sweeper.program import Program, this_process
from sweeper.space import quote
from sweeper.storage import mask_url

__all__ = ["Target", "grid_command", "one_run"]


@dataclass(frozen=True)
class Target:
    """Where a pasted sweep command adds its trials: the study and its storage URL as the command names it
    (an SQLite file by its absolute path; a PostgreSQL password left out: libpq reads ``PGPASSWORD`` or ``~/.pgpass``; any other masked), or None
    for the default storage, which the command leaves out."""

    study: str
    storage: str | None = None
    password_left_out: bool = False

    @classmethod
    def of(cls, study: str, storage_url: str | None) -> "Target":
        """The target of study ``study`` in ``storage_url`` (None: the default storage)."""
        if storage_url is None:
            return cls(study)
        url, password = split_password(_absolute(storage_url))
        return cls(study, mask_url(url), password is not None)

    def overrides(self) -> list[str]:
        """``hydra.sweeper.study_name=...`` and, unless default, ``hydra.sweeper.storage=...``."""
        out = [f"hydra.sweeper.study_name={quote(self.study)}"]
        if self.storage is not None:
            out.append(f"hydra.sweeper.storage={quote(self.storage)}")
        return out


def _absolute(url: str) -> str:
    """A ``sqlite:///`` URL with a relative file made absolute (against this process's folder, where it was
    opened), so that the pasted command finds the same study from any folder; any other URL as it is."""
    if not url.startswith("sqlite:///"):
        return url
    path, q, query = url[len("sqlite:///"):].partition("?")
    if not path or path == ":memory:" or Path(path).expanduser().is_absolute():
        return url if not path.startswith("~") else "sqlite:///" + str(Path(path).expanduser()) + q + query
    return "sqlite:///" + str(Path(path).resolve()) + q + query


def _args(overrides: Sequence[str]) -> str:
    return "".join(" " + shlex.quote(o) for o in overrides)


def one_run(steps: int, settings: Sequence[str], extra: str = "", program: Program | None = None) -> str:
    """One confirming run of ``steps`` steps with the trial's settings, then ``extra`` (which wins), started
    as ``program`` (None: as this process was, :func:`sweeper.program.this_process`)."""
    return f"{(program or this_process()).prefix()} schedule.max_steps={steps}" + _args(settings) + extra


def grid_command(lengths: Sequence[int], wsd: bool, settings: Sequence[str] = (), target: Target | None = None,
                 program: Program | None = None) -> str:
    """The follow-up command: the new lengths, the ``settings`` (overrides) of the trial it follows and its
    ``target``, so that it runs in the same study with the same data, model and settings, started as the sweep
    of that trial was (``program``; None: as this process was). A WSD search's command sets
    ``schedule.max_steps=null`` itself, so that it runs as pasted whatever the settings' presets set."""
    joined = ",".join(str(n) for n in lengths)
    rest = _args([*settings, *(target.overrides() if target is not None else [])])
    start = (program or this_process()).prefix()
    if wsd:  # max_steps null: a preset among the settings (+debug=fast) may set it, which a search refuses
        return f"{start} -m schedule=wsd_search 'schedule.wsd.candidates=[{joined}]' schedule.max_steps=null{rest}"
    return f"{start} -m schedule.max_steps={joined}{rest}"
