"""The visible NVIDIA GPUs and their free memory, read without creating a CUDA context, and the
one-GPU-per-trial rule.

SFTTrainer refuses to train with more than one visible GPU (it would wrap the model in
``nn.DataParallel``), and ``CUDA_VISIBLE_DEVICES`` only takes effect before the process initialises
CUDA (any ``torch.cuda`` call does). So every process that trains calls :func:`pin_one` first: it
leaves exactly one GPU visible. The sweeper pins its workers itself (``sweeper.sweep.launchers``); a single run
(``python train.py``) pins to the GPU with the most free memory. A worker's next trial first gives the
CUDA blocks its last one cached back (:func:`free_cuda_cache`).

Free memory comes from nvidia-ml-py (``pip install -e '.[gpu]'``), or from ``nvidia-smi`` where
that is not installed. Indices are PCI bus order (NVML's), and pinning sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers the GPUs the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["GpuMemory", "all_gpus", "check_precision", "compute_for", "cuda_initialised", "free_cuda_cache", "pin",
           "pin_one", "visible_gpus"]

log = logging.getLogger(__name__)
GIB = 2**30


@dataclass(frozen=True)
class GpuMemory:
    index: int  # the physical index, PCI bus order (what CUDA_VISIBLE_DEVICES takes)
    name: str
    free_gib: float  # free now: other processes on a shared box hold the rest
    total_gib: float
    compute_capability: tuple[int, int] = (0, 0)  # (8, 0) and up: bf16
    uuid: str = ""


def _nvml() -> list[GpuMemory] | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        uuid = pynvml.nvmlDeviceGetUUID(h)
        try:
            cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
        except Exception:
            cc = (0, 0)
        out.append(GpuMemory(i, name.decode() if isinstance(name, bytes) else name, mem.free / GIB, mem.total / GIB,
                             cc, uuid.decode() if isinstance(uuid, bytes) else uuid))
    return out


def _nvidia_smi() -> list[GpuMemory] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.free,memory.total,compute_cap,uuid",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    out = []
    for line in text.strip().splitlines():
        idx, name, free, total, cc, uuid = (x.strip() for x in line.split(","))
        major, _, minor = cc.partition(".")
        out.append(GpuMemory(int(idx), name, float(free) / 1024, float(total) / 1024,
                             (int(major), int(minor or 0)) if major.isdigit() else (0, 0), uuid))
    return out


def all_gpus() -> list[GpuMemory]:
    """Every GPU of this machine, in index order; empty without an NVIDIA driver."""
    found = _nvml()
    return found if found is not None else (_nvidia_smi() or [])


def visible_gpus() -> list[GpuMemory]:
    """GPUs this process may use (respecting CUDA_VISIBLE_DEVICES: indices or GPU UUIDs), most free
    memory first. Empty when there is no NVIDIA driver."""
    gpus = all_gpus()
    allowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if allowed is not None:
        wanted = [x.strip() for x in allowed.split(",") if x.strip()]
        gpus = [g for g in gpus if str(g.index) in wanted or any(w and g.uuid.startswith(w) for w in wanted)]
    return sorted(gpus, key=lambda g: -g.free_gib)


def compute_for(gpus: list[GpuMemory], name: str) -> str:
    """``precision.compute`` resolved for these GPUs without touching CUDA (``auto``: bf16 where every
    one supports it, i.e. compute capability 8.0 and up, else fp16; fp32 with no GPU)."""
    if name != "auto":
        return name
    if not gpus:
        return "fp32"
    return "bf16" if all(g.compute_capability >= (8, 0) for g in gpus) else "fp16"


def cuda_initialised() -> bool:
    """Whether this process has already initialised CUDA (then CUDA_VISIBLE_DEVICES no longer applies)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def free_cuda_cache() -> None:
    """A worker's earlier trial: give its cached blocks back, so that NVML's free memory (batch=auto's
    budget) does not count them as taken."""
    if cuda_initialised():
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def pin(index: int | str) -> None:
    """Make only GPU ``index`` visible to this process (before CUDA is initialised)."""
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's numbering = NVML's
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)


def pin_one() -> GpuMemory | None:
    """Leave exactly one GPU visible to this process: one trial runs on one GPU.

    With several visible, pins the one with the most free memory and logs it; with one, pins it by
    index; with none, does nothing (CPU). Raises ``ValueError`` when launched as several processes of
    one run (``torchrun``/``accelerate launch``: ``WORLD_SIZE`` > 1), or when CUDA was initialised
    before with several GPUs visible (too late to pin).
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        from sweeper.program import this_process

        prog = this_process().prog
        raise ValueError(
            f"one trial runs on one GPU (for now), but this run was launched as {world} processes "
            f"(WORLD_SIZE); start it with plain `{prog}` and sweep with "
            f"`{prog} -m ... hydra.sweeper.workers=auto` to use every GPU, one trial each")
    gpus = visible_gpus()
    if not gpus:
        return None
    if cuda_initialised():
        import torch

        if torch.cuda.device_count() > 1:
            raise ValueError(
                f"CUDA was initialised with {torch.cuda.device_count()} GPUs visible, too late to pin one; "
                "set CUDA_VISIBLE_DEVICES to one GPU before starting")
        return gpus[0]
    best = gpus[0]
    if len(gpus) > 1:
        log.info("one trial runs on one GPU: this run uses GPU %d (%s, %.1f GiB free, the most of %d visible)",
                 best.index, best.name, best.free_gib, len(gpus))
    pin(best.index)
    return best


def check_precision(compute: str, name: str) -> None:
    """fp16 mixed precision needs a CUDA GPU: raise ValueError before any model loads when none is visible."""
    if compute == "fp16" and not visible_gpus():
        raise ValueError(f"precision={name} (fp16 mixed precision) needs a CUDA GPU, and none is visible; "
                         "pick precision=auto (fp32 on CPU) or precision=fp32")
