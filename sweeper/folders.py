"""One study incarnation per sweep folder: a study's ``outputs/sweeps/<study>/trial_<n>`` folders are
named by trial number, so a study created anew under an old name (``optuna.db`` deleted, another storage)
would write its trial 0 into the old trial 0's folder: the old best checkpoint replaced by the new run's
rotation, two runs' lines appended into one ``train.log``.

So each study carries an id of its own (the ``incarnation`` study attr, set once when it is first
created here) and its sweep folder a ``.study`` file naming it. :func:`claim` runs before any trial of a
command: when the folder's ``trial_*`` folders belong to another incarnation (or to a study that no longer
exists: no ``.study`` file while the study has no trial), they are moved, whole, into
``previous-<date>_<time>/`` beside them, with one line saying so. Nothing is deleted or written into.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["INCARNATION", "MARKER", "claim"]

log = logging.getLogger(__name__)

INCARNATION = "incarnation"  # the study attr: this study's id, set when it is first created
MARKER = ".study"  # in the sweep folder: the study (name, storage, incarnation) its trial folders belong to
_MOVED = ("trial_*", "summary.md", "worker*.log")


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def claim(folder: str | Path, study: Any, storage: str) -> Path | None:
    """Make ``folder`` the sweep folder of ``study`` (an ``optuna.Study``; ``storage`` its URL, masked):
    move another incarnation's trial folders aside first. Returns where they went (None: nothing moved).
    Call it under the study's claim lock (:func:`sweeper.storage.claim_lock`): two commands starting one new
    study at once then agree on its id. A ``trial_<n>`` folder whose number is a trial of ``study`` is its own
    and never moved."""
    folder = Path(folder)
    mine = study.user_attrs.get(INCARNATION)
    if mine is None:
        mine = uuid.uuid4().hex[:12]
        study.set_user_attr(INCARNATION, mine)
    marker = _marker(folder)
    numbers = {f"trial_{t.number}" for t in study.get_trials(deepcopy=False)}
    old = sorted(p for pattern in _MOVED for p in folder.glob(pattern) if p.name not in numbers) \
        if folder.is_dir() else []
    trial_dirs = [p for p in old if p.name.startswith("trial_")]
    if marker is None:
        foreign = bool(trial_dirs) and not study.get_trials(deepcopy=False)  # folders of a study that is gone
    else:
        foreign = marker.get(INCARNATION) != mine
    moved_to = None
    if foreign and trial_dirs:
        moved_to = folder / time.strftime("previous-%Y-%m-%d_%H-%M-%S")
        while moved_to.exists():
            moved_to = moved_to.with_name(moved_to.name + "_")
        moved_to.mkdir(parents=True)
        for p in old:
            p.rename(moved_to / p.name)
        if marker is not None:
            (folder / MARKER).rename(moved_to / MARKER)
        was = f"study {marker.get('study')!r} in {marker.get('storage')}" if marker else "a study no longer in the storage"
        log.warning("%s holds %d trial folder(s) of another study of this name (%s, not the study %r in %s): moved "
                    "them, whole, to %s; nothing was deleted", folder, len(trial_dirs), was, study.study_name, storage,
                    moved_to)
    if marker is None or foreign:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(json.dumps({"study": study.study_name, "storage": storage, INCARNATION: mine}),
                                     encoding="utf-8")
    return moved_to
