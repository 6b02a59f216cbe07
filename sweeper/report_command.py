"""`python -m sweeper report` and `python -m sweeper dashboard`.

    python -m sweeper report                    # every study in the default storage
    python -m sweeper dashboard --port 8080     # http://127.0.0.1:8080
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["dashboard", "default_locations", "open_store", "report", "write_whole"]


def default_locations(config_dir: str | None = None) -> tuple[str, str]:
    """The sweeper's storage URL and the output folder, from the config (their one home), with the
    user's ``--config-dir`` (e.g. its ``local/default.yaml``) as the sweep reads it."""
    from hydra import compose

    from sweeper import config as config_mod
    from sweeper import userconf

    config_mod.register()
    with userconf.initialize(config_dir):
        cfg = compose(config_name="config", return_hydra_config=True)
    return str(cfg.hydra.sweeper.storage), str(cfg.paths.output_dir)


def open_store(storage: str, need_studies: bool = True, given: bool = True):
    """``(url, url masked, storage)`` for the commands that read a storage; bad input as one ``ValueError`` line,
    naming ``--storage`` when ``given`` (the user's option), else the config's ``hydra.sweeper.storage``."""
    from sweeper.storage import StorageError

    try:
        return _open_store(storage, need_studies)
    except StorageError as e:  # its lines name the sweep's option
        if not given:
            raise
        raise StorageError(str(e).replace("hydra.sweeper.storage=", "--storage ")
                           .replace("hydra.sweeper.storage", "--storage")) from None


def _open_store(storage: str, need_studies: bool):
    from sweeper.program import this_process
    from sweeper.storage import check_sqlite_file, check_url, mask_url, open_storage, sqlite_path

    url = storage
    check_url(url)  # a password with an unencoded @ or :: one line, without it
    path = sqlite_path(url)
    if path is not None:
        db = url[len("sqlite:///"):]  # as the user wrote it, for the messages
        if not path.is_file():
            raise ValueError(f"no study storage at {db}: run a sweep first ({this_process().prog} -m ...) or pass "
                             "--storage")
        with open(path, "rb") as f:  # never let opening it turn another file into an Optuna database
            header = f.read(16)
        if header != b"SQLite format 3\x00":
            what = "an empty file" if not header else "not an SQLite database"
            raise ValueError(f"{db} is {what}, not a study storage; pass the sweep's --storage "
                             "(sqlite:///outputs/optuna.db by default)")
        check_sqlite_file(path)  # a damaged file: one line, and it is not touched
        if not _has_optuna_tables(path):
            raise ValueError(f"no studies in {mask_url(url)}: this SQLite database holds no Optuna tables")
    store = open_storage(url)
    import optuna

    if need_studies and not optuna.get_all_study_summaries(store):
        raise ValueError(f"no studies in {mask_url(url)}: run a sweep first ({this_process().prog} -m ...)")
    return url, mask_url(url), store


def _default_storage(config_dir: str | None) -> str | None:
    """The storage a command uses when it names none (:func:`default_locations`), for the report's commands to
    leave it out; None when the config cannot be composed here (then they name the storage)."""
    try:
        return default_locations(config_dir)[0]
    except Exception:  # e.g. run from a folder where the sweeper's Hydra plugin is not on the path
        return None


def _has_optuna_tables(path: Path) -> bool:
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    return {"studies", "trials"} <= names


def write_whole(store, out_dir: Path, studies: list[str] | None, url: str | None = None) -> dict[str, Path]:
    """``sweeper.report.write_report`` into a scratch folder inside ``out_dir``, then each file moved into
    place: a report cut short (Ctrl-C, an error such as an unknown ``--study``) leaves the last whole report, no
    scratch folder, and none of the folders it made for ``out_dir``."""
    import shutil
    import tempfile

    from sweeper.interrupt import deferred, honour
    from sweeper.report import write_report

    made = []  # the folders mkdir makes, deepest first
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            break
        made.append(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        paths = write_report(store, scratch, studies, url=url)
        honour()  # a Ctrl-C that a finalizer swallowed while it was written: nothing moves
        with deferred():  # every file moves, or (Ctrl-C before this) none does
            for f in sorted(scratch.iterdir()):
                f.replace(out_dir / f.name)
        return {k: out_dir / p.name for k, p in paths.items()}
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        for folder in made:  # still empty: nothing was written
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(storage: str | None, studies: list[str] | None, out: str | None, config_dir: str | None = None) -> int:
    out_dir = out
    try:
        # conf/ is composed for what was not given and for the default storage, which the commands leave out
        default_storage, output_dir = default_locations(config_dir) if storage is None or out is None else (None, out)
        url, shown, store = open_store(storage or default_storage, given=storage is not None)
        out_dir = Path(out) if out else Path(output_dir) / "report"
        default = default_storage if default_storage is not None else _default_storage(config_dir)
        paths = write_whole(store, out_dir, studies, url=None if url == default else url)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out not writable, disk full
        print(f"error: --out {out_dir}: cannot write the report there ({e.strerror or e})", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"\nwritten: {paths['markdown']}, {paths['html']} and one PNG per study in {out_dir} (storage {shown})")
    return 0


def _port_problem(host: str, port: int) -> str | None:
    """Why the dashboard cannot listen on ``host:port`` (None: it can)."""
    import socket

    if not 1 <= port <= 65535:
        return "a TCP port is 1..65535"
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as e:
        return f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port"


def dashboard(storage: str | None, host: str, port: int, config_dir: str | None = None) -> int:
    from optuna_dashboard import run_server

    try:
        url, shown, store = open_store(storage or default_locations(config_dir)[0], need_studies=False,  # a sweep may
                                       given=storage is not None)  # start later
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    busy = _port_problem(host, port)
    if busy:
        print(f"error: --port {port}: {busy}", file=sys.stderr)
        return 2
    print(f"optuna-dashboard for {shown} at http://{host}:{port}  (Ctrl-C to stop)", flush=True)
    run_server(store, host=host, port=port)
    return 0
