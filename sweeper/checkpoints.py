"""Which checkpoint a retried trial resumes from: the newest one that is whole.

A kill during a save, a full disk or a copy cut short can leave the newest ``checkpoint-<step>`` of a run
unusable, and resuming from it fails with a raw error naming no file (a cut ``model.safetensors``, a cut
``trainer_state.json``) or, worse, resumes silently on another curve (no ``optimizer.pt``: fresh Adam
moments; no ``scheduler.pt``: the learning rate restarts). :func:`newest_resumable` checks each
checkpoint, newest first, and returns the first whole one with one line per skipped checkpoint naming the
bad file; no whole one means the retry starts from step 0, and the line says so. Checks read headers and
directories only (a safetensors header and its data size, a zip's central directory), never tensors.
"""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from pathlib import Path

__all__ = ["newest_resumable", "problem"]

log = logging.getLogger(__name__)

_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "adapter_model.bin")
_STATE = ("optimizer.pt", "scheduler.pt")  # without them a resume runs another curve


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is cut short ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is cut short (its header needs {n + 8} bytes, the file has {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} cannot be read ({type(e).__name__}: {e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is cut short ({size} of {8 + n + end} bytes)"
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip: a cut file has no central directory."""
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"{path.name} is cut short or damaged ({e})"
    return None


def problem(ckpt: str | Path) -> str | None:
    """Why ``ckpt`` cannot be resumed as the run that wrote it would go on (None: it can)."""
    ckpt = Path(ckpt)
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing"
    try:
        step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
        int(step)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json is cut short or damaged ({type(e).__name__}: {e})"
    weights = [ckpt / w for w in _WEIGHTS if (ckpt / w).is_file()]
    if not weights:
        return f"it holds no weights (none of {', '.join(_WEIGHTS[:2])})"
    for w in weights:
        why = _safetensors_problem(w) if w.suffix == ".safetensors" else _zip_problem(w) if w.suffix == ".bin" else None
        if why:
            return why
    for name in _STATE:
        if not (ckpt / name).is_file():
            return f"{name} is missing (resuming without it would train another curve)"
        why = _zip_problem(ckpt / name)
        if why:
            return why
    if not any(ckpt.glob("rng_state*.pth")):
        return "rng_state.pth is missing (resuming without it would see the data in another order)"
    return None


def _newest(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint of ``run_dir`` and why each newer one cannot be resumed."""
    ckpts = sorted((p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    skipped = []
    for ckpt in ckpts:
        why = problem(ckpt)
        if why is None:
            return ckpt, skipped
        skipped.append(f"{ckpt} cannot be resumed ({why})")
    return None, skipped


def newest_resumable(run_dir: str | Path, what: str = "the retry") -> str | None:
    """The newest whole ``checkpoint-<step>`` in ``run_dir`` (None: none, start from step 0). Each newer
    checkpoint skipped is named in one warning line with the file that makes it unusable."""
    ckpt, skipped = _newest(run_dir)
    if skipped:
        log.warning("%s %s: %s", what, f"resumes from {ckpt.name}" if ckpt else "starts from step 0",
                    "; ".join(skipped))
    return str(ckpt) if ckpt else None


def resumable_step(run_dir: str | Path | None) -> int | None:
    """The step of the newest whole checkpoint in ``run_dir`` (None: no folder or no whole checkpoint), quietly:
    for a line that says where a queued retry will start."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    ckpt, _ = _newest(run_dir)
    return int(ckpt.name.split("-")[-1]) if ckpt else None
