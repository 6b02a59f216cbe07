"""Where studies live: open an Optuna RDB storage, print its URL safely, lock it, read and write heartbeats.

    python -m sweeper status --storage sqlite:///outputs/optuna.db      # reads a storage through this module

Used by the sweeper (``sweeper.sweep``) and by the commands that read studies back (``report``, ``status``,
``plan``). Imports Optuna and SQLAlchemy, never TRL or Hydra.

- :func:`open_storage`: an ``RDBStorage`` for an SQLAlchemy URL (SQLite or PostgreSQL), optionally with
  Optuna's heartbeat and its retry of stale trials; two workers creating a fresh database's schema at once
  is retried; a failure is one :class:`StorageError` line naming the URL without its password: an SQLite
  file that is not a readable database (checked read-only first, so it is never modified), a PostgreSQL
  server that does not answer, a wrong database or role, a role or database at its connection limit.
- :func:`check_connections`: before a sweep creates its study, that an SQLite file can be written, and that
  the PostgreSQL role and database allow the connections its workers will open (:data:`CONNECTIONS_PER_WORKER`
  each); :func:`describe_error`: one line for a storage error met later.
- :func:`opened_urls`: the storages this process opened (what a Ctrl-C must tidy, see ``sweeper.interrupt``).
- :func:`mask_url` (password -> ``***``), :func:`check_url` (a URL that cannot be read, said without its
  password) and :func:`sqlite_path` (the one parser of ``sqlite:///`` URLs).
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

from sweeper import passwords
from sweeper.records import SYSTEM_ATTRS, is_branch  # declared with every other attr of a trial

__all__ = [
    "CONNECTIONS_PER_WORKER",
    "SYSTEM_ATTRS",
    "Heartbeat",
    "StorageError",
    "check_connections",
    "describe_error",
    "claim_lock",
    "fail_and_requeue",
    "heartbeat_age_s",
    "is_branch",
    "check_url",
    "mask_url",
    "open_storage",
    "opened_urls",
    "sqlite_path",
]

log = logging.getLogger(__name__)
# Optuna's notes that the user can do nothing about: its experimental-API warnings (heartbeat, retry,
# metric names) and the heartbeat being used outside Study.optimize (this sweeper beats itself).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say which study and what runs

# PostgreSQL connections one worker holds at once: its storage's pool (the sweeper's calls and the heartbeat
# thread), the cross-worker lock while it claims a trial, and the in-process job's own storage; 4 at the peak
# of a one-worker sweep, counted in pg_stat_activity every 0.2 s
CONNECTIONS_PER_WORKER = 4
_OPENED: list[str] = []  # the URLs open_storage opened in this process, in order


def mask_url(url: str) -> str:
    """The storage URL with any password replaced by ***, for printing and logs: the one after ``user:`` (an
    ``@`` or ``:`` left unencoded in it included) and a ``?password=`` query parameter's
    (:func:`sweeper.passwords.mask_passwords`)."""
    return passwords.mask_passwords(str(url))


def check_url(url: str) -> None:
    """Raise :class:`StorageError` (one line naming ``hydra.sweeper.storage``, the password masked) when ``url``
    cannot be read as an SQLAlchemy URL, mostly a password with an ``@`` not percent-encoded
    (``postgresql://bob:p@ss:w0rd@db/x`` reads as the host ``ss`` on the port ``w0rd@db``)."""
    scheme, sep, rest = url.partition("://")
    if sqlite_path(url) is not None or not sep:
        return  # no scheme: opening it says it is no database URL
    authority = rest.split("?", 1)[0].split("#", 1)[0]
    user_info = authority.rpartition("@")[0]
    problem = None
    if "@" in user_info:
        problem = "its user or password holds an @ that is not percent-encoded"
    else:
        try:
            from sqlalchemy.engine import make_url

            parsed = make_url(url)
            parsed.port  # noqa: B018 (read: a port that is not a number fails here)
        except Exception:
            problem = "it cannot be read as a URL (an @, :, / or ? in the password not percent-encoded?)"
    if problem:
        raise StorageError(
            f"hydra.sweeper.storage={mask_url(url)}: {problem}; write a password's special characters "
            "percent-encoded (@ as %40, : as %3A, / as %2F, ? as %3F, % as %25; python -c \"import urllib.parse; "
            "print(urllib.parse.quote(input(), safe=''))\" prints it so), or leave the password out of the URL and "
            "set PGPASSWORD")


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (``~`` expanded), or None for any other URL."""
    return Path(url[len("sqlite:///"):]).expanduser() if url.startswith("sqlite:///") else None


class StorageError(ValueError):
    """A study storage that cannot be opened or used: one line naming it (never with its password)."""


def opened_urls() -> list[str]:
    """The storage URLs :func:`open_storage` opened in this process (each once)."""
    return list(_OPENED)


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for an SQLAlchemy URL; creates the SQLite file's folder if needed.

    With ``heartbeat_interval`` (seconds) a trial whose worker stops beating for ``grace_period``
    (default twice the interval) is failed by the next worker that claims a trial, and re-queued
    with the same params up to ``max_retry`` times. Raises :class:`StorageError` (one line) when the
    storage cannot be opened; an existing SQLite file that is not a readable database is left as it is.
    """
    engine_kwargs: dict[str, Any] = {}
    db = sqlite_path(url)
    if db is not None:
        check_sqlite_file(db)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"hydra.sweeper.storage={mask_url(url)}: the folder {db.parent} cannot be made "
                               f"({e.strerror or e}); point hydra.sweeper.storage at a folder this user can write") from None
        engine_kwargs["connect_args"] = {"timeout": 60}  # several workers share one file
    elif url.startswith("postgres"):
        _connect(url).close()  # a clear line for a server down, a wrong database or role, a full role
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
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
                if url not in _OPENED:
                    _OPENED.append(url)
                return storage
            except Exception as e:  # two workers creating the schema of a fresh database at once
                if attempt == 4 or not any(s in str(e) for s in ("already exists", "duplicate key")):
                    raise
                time.sleep(0.2 * (attempt + 1))  # the other one finished it: open it again
        raise AssertionError("unreachable")
    except ImportError as e:
        hint = "pip install -e '.[postgres]'" if url.startswith("postgres") else f"install its driver ({e.name or e})"
        raise StorageError(f"hydra.sweeper.storage={mask_url(url)} needs a database driver that is not installed: "
                           f"{hint}") from None
    except Exception as e:  # SQLAlchemy/driver errors: say which storage, never with its password
        known = _server_problem(url, e)
        if known:
            raise StorageError(known) from None
        if db is not None:
            raise StorageError(f"hydra.sweeper.storage={mask_url(url)} could not be opened: {type(e).__name__}: "
                               f"{_first_line(url, e)}; check that this user can write {db} and its folder") from None
        raise StorageError(
            f"hydra.sweeper.storage={mask_url(url)} could not be opened: {type(e).__name__}: {_first_line(url, e)}; "
            "check the URL, that the server runs, and the driver (pip install -e '.[postgres]')"
        ) from None


def check_sqlite_file(db: Path) -> None:
    """Raise :class:`StorageError` unless ``db`` is absent, empty (both become a new database) or a whole
    SQLite database: SQLite's header, then its own integrity check (``PRAGMA quick_check``), read-only,
    so that a damaged file is never written to."""
    import sqlite3
    from urllib.parse import quote

    if not db.is_file() or db.stat().st_size == 0:
        return
    what = "restore it from a backup, or use another file (a new file starts new studies)"
    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except OSError as e:
        raise StorageError(f"{db} cannot be read ({e.strerror or e}): it was left as it is; give this user read "
                           "access, or use another file") from None
    if header != b"SQLite format 3\x00":
        raise StorageError(f"{db} is not a readable Optuna SQLite database (it does not start with SQLite's "
                           f"header; something overwrote it?): it was left as it is; {what}")
    problem = None
    try:
        con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=60)  # workers may be writing
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
        if rows != [("ok",)]:
            problem = "; ".join(str(r[0]) for r in rows[:2])
    except sqlite3.OperationalError:  # locked, a hot journal to roll back, no read access: no verdict here
        return  # (opening the storage says what it is)
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        problem = str(e)
    if problem:
        raise StorageError(f"{db} is not a readable Optuna SQLite database (SQLite says: {problem}; cut short, or "
                           f"overwritten?): it was left as it is; {what}")


def _first_line(url: str, e: BaseException) -> str:
    detail = (str(e).splitlines() or [""])[0]
    return passwords.mask_secrets(detail, passwords.secret_values({}, url))


def _server_problem(url: str, e: BaseException) -> str | None:
    """One line for a database server's refusal that the user can act on (None: not one of those)."""
    text = str(e)
    shown = f"hydra.sweeper.storage={mask_url(url)}"
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
        role, database, where = u.username, u.database, f"{u.host or 'localhost'}:{u.port or 5432}"
    except Exception:
        role, database, where = None, None, "its host"
    if "too many connections for role" in text:
        return (f"{shown}: role {role!r} is at its connection limit (the server refused one more connection: too "
                f"many connections for role {role!r}); close its other sessions, or raise the limit: ALTER ROLE "
                f"{role} CONNECTION LIMIT -1")
    if "too many connections for database" in text:
        return (f"{shown}: database {database!r} is at its connection limit; close its other sessions, or raise "
                f"it: ALTER DATABASE {database} CONNECTION LIMIT -1")
    if "too many clients already" in text or "remaining connection slots are reserved" in text:
        return (f"{shown}: the server at {where} has no connection left (max_connections reached); close other "
                "sessions or raise max_connections")
    if "does not exist" in text and database and f'database "{database}" does not exist' in text:
        return (f"{shown}: the server at {where} has no database {database!r}; create it (createdb {database}) "
                "or fix the URL's database")
    if role and f'role "{role}" does not exist' in text:
        return f"{shown}: the server at {where} has no role {role!r}; create it (createuser {role}) or fix the URL's user"
    if "password authentication failed" in text:
        return f"{shown}: the server at {where} refused role {role!r}'s password; fix the password (or PGPASSWORD)"
    if "Connection refused" in text or "could not connect" in text or "timeout expired" in text:
        return (f"{shown}: no PostgreSQL server answers at {where} ({_first_line(url, e).split(': ')[-1].strip()}); "
                "start it, or fix the URL's host and port")
    return None


def _connect(url: str) -> Any:
    """One plain connection to a PostgreSQL URL, or :class:`StorageError` saying why not."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10})
    try:
        return engine.connect()
    except ImportError as e:
        raise StorageError(f"hydra.sweeper.storage={mask_url(url)} needs a database driver that is not installed: "
                           f"pip install -e '.[postgres]' ({e.name or e})") from None
    except Exception as e:
        raise StorageError(_server_problem(url, e) or (
            f"hydra.sweeper.storage={mask_url(url)} could not be opened: {type(e).__name__}: {_first_line(url, e)}; "
            "check the URL, that the server runs, and the driver (pip install -e '.[postgres]')")) from None


def describe_error(url: str, e: BaseException) -> str:
    """One line for a storage error met while a sweep runs: the storage (password masked) and the error's
    first line (the server's reason when it is one the user can act on)."""
    return _server_problem(url, e) or (f"hydra.sweeper.storage={mask_url(url)}: {type(e).__name__}: "
                                       f"{_first_line(url, e)}")


def check_connections(url: str, workers: int) -> None:
    """Before a sweep creates its study, raise :class:`StorageError` when the storage cannot take its writes:
    an SQLite file this user cannot write (read-only, immutable); a PostgreSQL role or database that allows
    fewer new connections than ``workers`` workers hold at once (:data:`CONNECTIONS_PER_WORKER` each), or a
    server that cannot be reached."""
    import os

    db = sqlite_path(url)
    if db is not None:
        if db.exists() and not os.access(db, os.W_OK):
            raise StorageError(f"hydra.sweeper.storage={mask_url(url)}: {db} cannot be written (read-only file); a sweep "
                               "records its trials there: make it writable, or use another file (the report and "
                               "status commands read it as it is)")
        return
    if not url.startswith("postgres"):
        return
    import sqlalchemy

    need = CONNECTIONS_PER_WORKER * max(1, int(workers))
    with _connect(url) as conn:  # counted below; it is closed before the sweep opens its own
        rows = conn.execute(sqlalchemy.text(
            "SELECT 'role', r.rolname, r.rolconnlimit, (SELECT count(*) FROM pg_stat_activity a "
            "WHERE a.usename = r.rolname) FROM pg_roles r WHERE r.rolname = current_user "
            "UNION ALL SELECT 'database', d.datname, d.datconnlimit, (SELECT count(*) FROM pg_stat_activity a "
            "WHERE a.datname = d.datname) FROM pg_database d WHERE d.datname = current_database()")).fetchall()
    for kind, name, limit, used in rows:
        free = limit - (used - 1)  # this check's own connection is closed by now
        if limit >= 0 and free < need:
            sql = f"ALTER {kind.upper()} {name} CONNECTION LIMIT {limit - free + need}"
            raise StorageError(
                f"hydra.sweeper.storage={mask_url(url)}: {kind} {name!r} allows {limit} connection(s) (CONNECTION "
                f"LIMIT {limit}) and {used - 1} are in use, but this sweep's {workers} worker(s) hold up to {need} "
                f"({CONNECTIONS_PER_WORKER} each); raise it ({sql}, or -1 for no limit) or lower hydra.sweeper.workers")


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
        try:
            conn = engine.connect()
        except sqlalchemy.exc.SQLAlchemyError as e:
            why = _server_problem(url, e) or f"hydra.sweeper.storage={mask_url(url)}: {_first_line(url, e)}"
            raise StorageError(f"{why} (while locking study {study_name!r} to claim a trial; finished trials are "
                               "kept: run the same command again to resume)") from None
        with conn:
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
