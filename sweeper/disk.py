"""The folders a sweep writes to: each checked up front (one line naming its key when it cannot be
written), and a full disk named as such when a trial runs out of space."""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

__all__ = ["DiskFullError", "check_writable", "disk_full"]

# Free space below this after a failed write means the disk filled up (a failed save leaves its partial
# file behind, so the disk stays full), even when the library's own error does not say so: torch's
# checkpoint writer reports "unexpected pos 64 vs 0".
FULL_BELOW_BYTES = 4 * 2**20


class DiskFullError(OSError):
    """A trial ran out of disk space; the sweep stops and queues it to resume once space is freed."""


def check_writable(path: str | Path, key: str) -> None:
    """Create ``path`` if needed and write a scratch file in it; ValueError naming ``key`` if that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{key}={path} cannot be written ({e.strerror or e}); point {key} at a folder this "
                         "user can write") from None


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def disk_full(exc: BaseException, path: str | Path, key: str) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``key`` when ``exc`` came from a full disk under ``path``
    (ENOSPC anywhere in its chain, or almost no space left there), else None."""
    chain, e = [], exc
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    enospc = any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in chain) or any(
        "No space left on device" in str(c) or "disk is full" in str(c) for c in chain)
    free = _free_bytes(Path(path))
    if not enospc and (free is None or free >= FULL_BELOW_BYTES):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DiskFullError(f"no space left on the disk of {key}={path} ({free or 0} bytes free; "
                         f"{type(exc).__name__}: {first[:200]}); free space there or point {key} at a larger disk")
