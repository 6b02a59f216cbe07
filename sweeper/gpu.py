"""Free memory of the visible NVIDIA GPUs, via nvidia-ml-py (no CUDA context is created)."""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GpuMemory:
    index: int  # the physical index (what CUDA_VISIBLE_DEVICES takes)
    name: str
    free_gib: float  # free now: other processes on a shared box hold the rest
    total_gib: float


def visible_gpus() -> list[GpuMemory]:
    """GPUs this process may use (respecting CUDA_VISIBLE_DEVICES), most free memory first.
    Empty when there is no NVIDIA driver or nvidia-ml-py is not installed (``pip install -e '.[gpu]'``)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    allowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    indices = range(pynvml.nvmlDeviceGetCount())
    if allowed is not None:
        wanted = [int(x) for x in allowed.split(",") if x.strip().isdigit()]
        indices = [i for i in indices if i in wanted]
    out = []
    for i in indices:
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        out.append(GpuMemory(i, name.decode() if isinstance(name, bytes) else name, mem.free / GIB, mem.total / GIB))
    return sorted(out, key=lambda g: -g.free_gib)
