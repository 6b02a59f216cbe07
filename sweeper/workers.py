"""How many workers a sweep starts and which GPU each one gets. Pure decisions: no Optuna, no CUDA.

    python train.py -m schedule=under,sweet,over                           # workers=auto: every GPU with room
    python train.py -m schedule=under,sweet,over hydra.sweeper.gpus=[0,2]  # these GPUs, one worker each
    python train.py -m schedule=under,sweet,over hydra.sweeper.workers=1   # one worker, one GPU

One trial runs on one GPU. ``hydra.sweeper.workers=auto`` (the default) starts one worker per
visible GPU whose free memory holds the planned trial (the plan's peak estimate at the smallest
micro-batch the trial may use), skips and names the others, and never starts more workers than
the sweep has trials left to run; without a GPU it starts one CPU worker. ``hydra.sweeper.gpus``
names the GPUs itself (one worker each, no memory check); ``workers=N`` asks for N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from sweeper.gpu import GpuMemory

__all__ = ["WorkerPlan", "check_gpus_visible", "describe", "parse_gpus", "parse_launcher", "parse_workers", "plan_local", "plan_slurm"]

LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class WorkerPlan:
    """``gpus[i]`` is worker i's GPU id (None: a CPU worker); ``skipped`` explains GPUs left out."""

    gpus: list[str | None]
    skipped: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def n(self) -> int:
        return len(self.gpus)


def parse_workers(value: Any) -> int | str:
    """``auto`` or a positive int; raises ValueError naming the key otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
        ok = n >= 1 and not isinstance(value, bool) and str(value).strip().lstrip("+").isdigit()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"hydra.sweeper.workers must be auto or a whole number >= 1, but got {value!r}; "
                         "e.g. hydra.sweeper.workers=auto (one per GPU with room) or hydra.sweeper.workers=2")
    return n


def parse_gpus(value: Any) -> list[str] | None:
    """``hydra.sweeper.gpus``: a list of single GPU ids (ints or GPU UUIDs), one per worker, or null."""
    if value is None:
        return None
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("hydra.sweeper.gpus is an empty list; give GPU ids (e.g. [0,1]) or null for every visible GPU")
    out = []
    for g in items:
        if isinstance(g, (list, tuple, dict)) or "," in str(g) or not str(g).strip():
            raise ValueError(
                f"hydra.sweeper.gpus: one trial runs on one GPU (for now), so each entry is one GPU id, but got "
                f"{g!r}; list one id per worker, e.g. hydra.sweeper.gpus=[0,1]")
        out.append(str(g).strip())
    return out


def check_gpus_visible(gpus: list[str], visible: Sequence[GpuMemory]) -> None:
    """``hydra.sweeper.gpus`` against the GPUs this process may use (a local launcher's, in the command's first
    process): each id an index or a GPU UUID (or its start) of a visible GPU; one ``ValueError`` line otherwise."""
    shown = f"hydra.sweeper.gpus=[{','.join(gpus)}]"
    if not visible:
        raise ValueError(f"{shown} names GPUs, but no GPU is visible here (no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
                         "hides them); drop hydra.sweeper.gpus to run on the CPU, or run where the GPUs are")
    missing = [g for g in gpus if not any(g == str(v.index) or (v.uuid and v.uuid.startswith(g)) for v in visible)]
    if missing:
        raise ValueError(f"{shown}: GPU {missing[0]} is not visible here; the visible GPUs are "
                         f"{', '.join(str(v.index) for v in sorted(visible, key=lambda v: v.index))}; list those, or "
                         "drop hydra.sweeper.gpus to use every visible GPU with room")


def parse_launcher(value: Any) -> str:
    name = str(value)
    if name not in LAUNCHERS:
        raise ValueError(f"hydra.sweeper.launcher must be one of {', '.join(LAUNCHERS)}, but got {name!r}")
    return name


def plan_local(workers: int | str, gpus: list[str] | None, visible: Sequence[GpuMemory],
               need_gib: float | None, fraction: float, trials_left: int) -> WorkerPlan:
    """Workers for this host.

    ``visible``: the GPUs this process may use (most free first); ``need_gib``: the planned trial's
    estimated peak (None: unknown, every GPU counts as having room); a GPU has room when
    ``need_gib <= fraction * free``. ``trials_left``: trials this sweep still has to run (no more workers are
    started than that, and at least one). Raises ValueError when the request cannot be met.
    """
    left = max(1, int(trials_left))
    if gpus is not None:  # the user's own list wins: one worker per id, no memory check
        n = len(gpus) if workers == "auto" else int(workers)
        if n > len(gpus):
            raise ValueError(f"hydra.sweeper.workers={workers} needs one GPU each, but hydra.sweeper.gpus lists "
                             f"{len(gpus)} ({','.join(gpus)}); list more GPUs or lower hydra.sweeper.workers")
        why = f"hydra.sweeper.gpus={','.join(gpus)}" + (f"; {left} trial(s) to run" if left < n else "")
        return WorkerPlan(list(gpus[:min(n, left)]), reason=why)
    if not visible:
        asked = 1 if workers == "auto" else int(workers)
        n = min(asked, left)
        return WorkerPlan([None] * n, reason="no GPU visible: CPU worker(s)"
                          + (f"; {left} trial(s) to run" if n < asked else ""))
    room, skipped = [], []
    for g in visible:
        if need_gib is None or need_gib <= fraction * g.free_gib:
            room.append(g)
        else:
            skipped.append(f"GPU {g.index} ({g.name}) skipped: {g.free_gib:.1f} GiB free, the planned trial needs "
                           f"~{need_gib:.1f} GiB ({fraction:.0%} of free memory is the budget)")
    if workers == "auto":
        if not room:
            raise ValueError(
                f"hydra.sweeper.workers=auto: no visible GPU has room for the planned trial (~{need_gib:.1f} GiB "
                f"estimated peak): {'; '.join(skipped)}. Free some memory, lower data.max_length or the batch, "
                "try precision=qlora4, or name GPUs with hydra.sweeper.gpus=[...]")
        n = min(len(room), left)
        why = (f"{len(room)} of {len(visible)} visible GPU(s) have room"
               + (f"; {left} trial(s) to run" if left < len(room) else ""))
        return WorkerPlan([str(g.index) for g in room[:n]], skipped, why)
    n = int(workers)
    if n > len(visible):
        raise ValueError(f"hydra.sweeper.workers={n} needs one GPU each, but {len(visible)} are visible "
                         f"({','.join(str(g.index) for g in visible)}); lower hydra.sweeper.workers, "
                         "use hydra.sweeper.workers=auto, or set hydra.sweeper.gpus")
    ordered = room + [g for g in visible if g not in room]  # GPUs with room first
    why = f"hydra.sweeper.workers={n}" + (f"; {left} trial(s) to run" if left < n else "")
    return WorkerPlan([str(g.index) for g in ordered[:min(n, left)]], skipped, why)


def plan_slurm(workers: int | str, trials_left: int, max_workers: int) -> WorkerPlan:
    """SLURM workers: ``auto`` = one job per trial left, at most ``max_workers``; N = N jobs.
    Their GPUs are SLURM's to assign (gres), so the plan names none."""
    if workers == "auto":
        n = max(1, min(int(trials_left), int(max_workers)))
        return WorkerPlan([None] * n, reason=f"{trials_left} trial(s) to run, hydra.sweeper.slurm.max_workers={max_workers}")
    return WorkerPlan([None] * int(workers), reason=f"hydra.sweeper.workers={workers}")


def describe(plan: WorkerPlan) -> str:
    where = ", ".join("CPU" if g is None else f"GPU {g}" for g in plan.gpus)
    return f"{plan.n} worker(s) on {where} ({plan.reason})"
