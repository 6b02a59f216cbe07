"""Read a W&B offline run file (``wandb/offline-run-*/run-<id>.wandb``) back, as ``wandb sync`` would.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
records, each a 7-byte head (CRC32C, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and its
data; a whole record is one ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

__all__ = ["read_run"]

_BLOCK = 32768


def _records(data: bytes):
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # padding
            continue
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def read_run(path: Path) -> dict:
    """The run of one offline file: ``run`` (id, name, group, job_type), ``config`` and ``summary`` (dicts)
    and ``history`` (a list of {key: value} rows)."""
    from wandb.proto import wandb_internal_pb2

    out = {"run": {}, "config": {}, "summary": {}, "history": [], "exit_code": None}
    for raw in _records(Path(path).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"id": r.run_id, "name": r.display_name, "group": r.run_group, "job_type": r.job_type,
                          "tags": list(r.tags)}
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out
