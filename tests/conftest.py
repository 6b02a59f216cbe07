"""Fixtures that compose the real app config from conf/, shrunk for CPU and pointed at tmp paths."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

import sweeper.config

from .helpers import fast


def _one_share_of_the_cores() -> None:
    """Each of several test processes (``make test``: pytest-xdist) and the commands it starts use its share of
    the CPU cores (the rule of a sweep's own workers, ``sweeper.sweep.launchers.threads_per_worker``): torch's
    default, a thread per core in every process, over-subscribes the machine, and its threads spin waiting for
    each other (a trial then costs ~25% more CPU time on the 2-core CI machine). A set OMP_NUM_THREADS wins."""
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if n > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        if "torch" in sys.modules:  # already imported: its pool is sized; size it again
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_one_share_of_the_cores()

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = Path(os.environ.get("SFT_SWEEP_SHARED_DATA", ROOT.parent / "shared" / "data"))

sweeper.config.register()

# Small, fast settings for CPU tests (conf/debug/fast.yaml, `+debug=fast` on the command line); every
# test that trains starts from these.
FAST = fast()


@pytest.fixture(autouse=True)
def no_hydra_run_left():
    """Each test starts without an earlier test's Hydra run in this process (Hydra's ``run_job`` and its
    ``--cfg``/``--info`` paths set the ``HydraConfig`` singleton and leave it set): a trial called directly then
    writes to ``paths.output_dir``, as outside ``@hydra.main``, whatever ran before it on this test process."""
    HydraConfig.instance().cfg = None
    yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (tiny model, generated data, datasets) for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def compose_cfg(tmp_path, cache_dir):
    """compose_cfg(*overrides) -> the composed app config (hydra node included), paths in tmp."""

    def _compose(*overrides: str, hydra: bool = True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *overrides],
                return_hydra_config=hydra,
            )

    yield _compose
    GlobalHydra.instance().clear()


PG_URL = os.environ.get("SFT_SWEEP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_unreachable() -> str | None:
    """None when the PostgreSQL server of the tests answers, else why not (for the skip line)."""
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG_URL).connect() as c:
            c.execute(sqlalchemy.text("SELECT 1"))
        return None
    except Exception as e:  # visible reason in the skip line
        return f"PostgreSQL not reachable at {PG_URL}: {type(e).__name__}: {e}"


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, which starts every service: a skip there would hide a
    broken set-up."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python train.py ...` in a subprocess; return the completed process (never raises)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


@functools.lru_cache(maxsize=None)
def _storage(url: str):
    import optuna

    return optuna.storages.RDBStorage(url)


def load_study(url: str, name: str):
    """The study ``name`` in ``url``, through one storage per URL: a poll loop that opened a new one each
    time would leave its connections open until garbage collection (PostgreSQL allows 100 clients)."""
    import optuna

    return optuna.load_study(study_name=name, storage=_storage(url))


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    """(url, study name) on a fresh SQLite file or a unique study on the PostgreSQL server."""
    name = f"study-{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/optuna.db", name
        return
    reason = postgres_unreachable()
    if reason:
        skip_or_fail(reason)
    yield PG_URL, name
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=PG_URL)
    except KeyError:
        pass


def mount_tmpfs(path: Path, options: str) -> Path:
    """Mount a tmpfs at ``path`` (created) with ``options`` (e.g. ``size=600k`` or ``size=1m,ro``): a full or
    read-only disk for real, which root's ignored file modes cannot give. Unmount with :func:`unmount`."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    return path


def unmount(path: Path) -> None:
    if path.is_mount():
        subprocess.run(["umount", str(path)], check=True)


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tier first: with several test processes (make test: pytest-xdist), the long tests start early
    and the short ones fill the gaps at the end, instead of one process finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
