"""Where studies live: open an Optuna RDB storage, print its URL safely, lock it, read and write heartbeats.

    python -m sweeper status --storage sqlite:///outputs/optuna.db      # reads a storage through this module

Used by the sweeper (``sweeper.sweep``) and by the commands that read studies back (``report``, ``status``,
``plan``). Imports Optuna and SQLAlchemy, never TRL or Hydra.

- :func:`open_storage`: an ``RDBStorage`` for an SQLAlchemy URL (SQLite or PostgreSQL), optionally with
  Optuna's heartbeat and its retry of stale trials; two workers creating a fresh database's schema at once
  is retried; a failure is one ``ValueError`` line naming the URL without its password.
- :func:`mask_url` (password -> ``***``) and :func:`sqlite_path` (the one parser of ``sqlite:///`` URLs).
- :func:`claim_lock`: the cross-worker lock around "pick the next trial" (a file lock beside SQLite, an
  advisory lock on PostgreSQL).
- :class:`Heartbeat` (beats for a running trial from the sweeper), :func:`heartbeat_age_s` (reads one back)
  and :func:`fail_and_requeue` (FAIL now, retry queued through the storage's stale-trial callback).
- :data:`SYSTEM_ATTRS` and :func:`is_branch` stay importable from here; they are declared in ``sweeper.records``
  with every other attr of a trial.

Importing it also quiets Optuna's notes the user can do nothing about (see below).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import optuna

from sweeper.records import SYSTEM_ATTRS, is_branch  # declared with every other attr of a trial

__all__ = [
    "SYSTEM_ATTRS",
    "Heartbeat",
    "claim_lock",
    "fail_and_requeue",
    "heartbeat_age_s",
    "is_branch",
    "mask_url",
    "open_storage",
    "sqlite_path",
]

log = logging.getLogger(__name__)
# Optuna's notes that the user can do nothing about: its experimental-API warnings (heartbeat, retry,
# metric names) and the heartbeat being used outside Study.optimize (this sweeper beats itself).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say which study and what runs



def mask_url(url: str) -> str:
    """The storage URL with any password replaced by ***, for printing and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (``~`` expanded), or None for any other URL."""
    return Path(url[len("sqlite:///"):]).expanduser() if url.startswith("sqlite:///") else None


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for an SQLAlchemy URL; creates the SQLite file's folder if needed.

    With ``heartbeat_interval`` (seconds) a trial whose worker stops beating for ``grace_period``
    (default twice the interval) is failed by the next worker that claims a trial, and re-queued
    with the same params up to ``max_retry`` times.
    """
    engine_kwargs: dict[str, Any] = {}
    db = sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}  # several workers share one file
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs = {
            "heartbeat_interval": int(heartbeat_interval),
            "grace_period": int(grace_period) if grace_period else None,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=max_retry, inherit_intermediate_values=True),
        }
    try:
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
            except Exception as e:  # two workers creating the schema of a fresh database at once
                if attempt == 4 or not any(s in str(e) for s in ("already exists", "duplicate key")):
                    raise
                time.sleep(0.2 * (attempt + 1))  # the other one finished it: open it again
        raise AssertionError("unreachable")
    except ImportError as e:
        hint = "pip install -e '.[postgres]'" if url.startswith("postgres") else f"install its driver ({e.name or e})"
        raise ValueError(f"hydra.sweeper.storage={mask_url(url)} needs a database driver that is not installed: "
                         f"{hint}") from None
    except Exception as e:  # SQLAlchemy/driver errors: say which storage, never with its password
        detail = str(e).splitlines()[0]
        password = _password(url)
        if password:
            detail = detail.replace(password, "***")
        raise ValueError(
            f"hydra.sweeper.storage={mask_url(url)} could not be opened: {type(e).__name__}: {detail}; "
            "check the URL, that the server runs, and the driver (pip install -e '.[postgres]')"
        ) from None


def _password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:
        return None


@contextlib.contextmanager
def claim_lock(url: str, study_name: str) -> Iterator[None]:
    """Serialise 'pick the next trial' across workers sharing a study, so that no grid point runs
    twice and ``n_trials`` is never overshot: a file lock beside a SQLite file, an advisory lock
    on PostgreSQL; other databases run unlocked (a warning says so)."""
    db = sqlite_path(url)
    if db is not None:
        import fcntl

        with open(str(db) + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        key = int(hashlib.sha256(study_name.encode()).hexdigest()[:15], 16)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    log.warning("no cross-worker lock for %s: parallel workers may run a grid point twice", mask_url(url))
    yield


def heartbeat_age_s(storage: Any, trial_id: int) -> float | None:
    """Seconds since a trial's worker last beat, by the database's clock (None: no heartbeat, or a
    storage without them). Reads Optuna's heartbeat table, which has no public reader."""
    try:
        import sqlalchemy
        from optuna.storages._rdb import models

        backend = getattr(storage, "_backend", storage)
        with backend.scoped_session() as session:
            beat = models.TrialHeartbeatModel.where_trial_id(trial_id, session)
            if beat is None:
                return None
            now = session.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
            return (now.replace(tzinfo=None) - beat.heartbeat.replace(tzinfo=None)).total_seconds()
    except Exception:  # informational only
        return None


def fail_and_requeue(study: optuna.Study, trial_id: int, error: str) -> bool:
    """Record a running trial FAIL with ``error`` and queue its retry (same params, resumed from its
    checkpoint) through the storage's stale-trial callback; False when the storage has none."""
    storage = study._storage
    storage.set_trial_user_attr(trial_id, "error", error)
    storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
    retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    if retry is not None:
        retry(study, storage.get_trial(trial_id))
    return retry is not None


class Heartbeat:
    """Records the running trial's heartbeat from the sweeper while its job runs."""

    def __init__(self, storage: Any, trial_id: int, interval: int | None) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a missed beat is not worth killing the trial
                log.warning("heartbeat for trial id %d failed: %s", self.trial_id, e)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
