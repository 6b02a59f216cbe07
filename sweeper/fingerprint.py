"""The content of a study's data files, as part of its identity: a file changed in place between two
commands into one study (same name, same size even) must not have its new trials ranked with the old.

:func:`data_content` gives ``data.train_content`` / ``data.eval_content`` entries (``sha256:<16 hex>,
<size> bytes``) that :func:`sweeper.identity.result_config` adds to a run's settings, so the study's
same-settings rule refuses (or, with ``hydra.sweeper.allow_config_change``, records) a changed file.
Hashing streams the file once; the digest is cached by (path, size, mtime) in memory and in
``<paths.cache_dir>/data/fingerprints.json``, so an unchanged multi-GB file is not read again.
A hub id and the generated demo have no file here: their identity is their name and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["data_content", "file_digest"]

_MEMO: dict[str, str] = {}
_CHUNK = 1 << 20


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _cache_file(cache_dir: Path | None) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / "data" / "fingerprints.json"


def _read_cache(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(cache: Path | None, entries: dict) -> None:
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache)  # atomic: parallel workers read the old cache or the new one
    except OSError:
        pass  # a cache only: hashing again is correct, just slower


def file_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """``sha256:<16 hex> (<size> bytes)`` of a file, or of a folder's files (names and contents, in name
    order: a ``save_to_disk`` folder). Cached by (path, size, mtime): a changed file gets a new stamp."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = ";".join(_stamp(p) for p in files)
    if stamp in _MEMO:
        return _MEMO[stamp]
    cache = _cache_file(Path(cache_dir) if cache_dir is not None else None)
    entries = _read_cache(cache)
    if stamp not in entries:
        h, size = hashlib.sha256(), 0
        for p in files:
            if path.is_dir():
                h.update(str(p.relative_to(path)).encode() + b"\0")
            with p.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        entries = {**_read_cache(cache), stamp: f"sha256:{h.hexdigest()[:16]} ({size} bytes)"}
        _write_cache(cache, entries)
    _MEMO[stamp] = entries[stamp]
    return entries[stamp]


def data_content(data: Any, cache_dir: str | Path | None = None) -> dict[str, str]:
    """``{"data.train_content": ..., "data.eval_content": ...}`` for the local files (or save_to_disk
    folders) that ``data`` (the ``data`` group) reads; a hub id, the demo or a missing path adds nothing."""
    from sweeper.data import _resolve_local

    out = {}
    for key, value in (("data.train_content", data.get("train_path")), ("data.eval_content", data.get("eval_path"))):
        if value is None or value == "demo":
            continue
        local = _resolve_local(str(value))
        if local.exists():
            out[key] = file_digest(local, cache_dir)
    return out
