"""Where a training step leaves the GPU idle: a ``torch.profiler`` timeline read back.

    # the trial path writes the timeline when asked (sweeper/speed.py, measurement_callbacks):
    SFT_SWEEP_PROFILE=/tmp/prof SFT_SWEEP_PROFILE_START=20 SFT_SWEEP_PROFILE_STEPS=3 SFT_SWEEP_PROFILE_STACK=1 \\
        python train.py <overrides>
    python benchmarks/profile_gaps.py /tmp/prof/trace.json.gz [--top 40]

Printed: the window's wall time; the GPU's busy share (the union of its kernels, copies and sets);
the host's time blocked on the GPU (synchronising calls) and its kernel launches; then, when the
timeline holds Python functions (``SFT_SWEEP_PROFILE_STACK=1``), the functions inside which the GPU sat
idle longest (idle time inside each call, summed over its calls; nested functions count in their
callers too, so read the list as a drill-down).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
              "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class Busy:
    """Busy time of merged intervals inside any [a, b], by bisection over prefix sums."""

    def __init__(self, intervals: list[tuple[float, float]]) -> None:
        self.iv = merged(intervals)
        self.starts = [a for a, _ in self.iv]
        self.prefix = [0.0]
        for a, b in self.iv:
            self.prefix.append(self.prefix[-1] + b - a)

    def within(self, a: float, b: float) -> float:
        def upto(t: float) -> float:  # busy time in (-inf, t]
            i = bisect.bisect_right(self.starts, t)
            if i == 0:
                return 0.0
            s, e = self.iv[i - 1]
            return self.prefix[i - 1] + min(e, t) - s
        return upto(b) - upto(a) if b > a else 0.0


def analyse(events: list[dict], top: int = 40) -> str:
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATS]
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation", "cuda_runtime",
                                                 "cuda_driver")]
    if not cpu:
        return "no host events in the trace"
    lo = min(e["ts"] for e in cpu)
    hi = max(max(e["ts"] + e["dur"] for e in cpu), max((b for _, b in gpu), default=lo))
    busy = Busy(gpu)
    wall = hi - lo
    on = busy.within(lo, hi)
    lines = [f"window {wall / 1e3:.1f} ms; GPU busy {on / 1e3:.1f} ms = {100 * on / wall:.1f}%; "
             f"{len(gpu)} GPU kernels/copies, mean {on / max(len(gpu), 1):.1f} us each"]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    sync = sum(e["dur"] for e in runtime if e["name"] in SYNC_CALLS)
    launches = [e for e in runtime if e["name"] in LAUNCHES]
    lines.append(f"host blocked in synchronising calls {sync / 1e3:.1f} ms "
                 f"({sum(1 for e in runtime if e['name'] in SYNC_CALLS)} calls); {len(launches)} launches, "
                 f"{sum(e['dur'] for e in launches) / 1e3:.1f} ms inside the launch calls")
    syncs = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if e["name"] in SYNC_CALLS:
            syncs[e["name"]][0] += 1
            syncs[e["name"]][1] += e["dur"]
    for name, (n, d) in sorted(syncs.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {name}: {n} calls, {d / 1e3:.1f} ms")
    # the main thread: the one that runs the most aten ops (tqdm's and telemetry's threads only wait)
    per_tid: dict = defaultdict(int)
    for e in events:
        if e.get("cat") == "cpu_op":
            per_tid[(e.get("pid"), e.get("tid"))] += 1
    main_tid = max(per_tid, key=per_tid.get) if per_tid else None
    py = [e for e in events if e.get("cat") == "python_function" and (e.get("pid"), e.get("tid")) == main_tid]
    if py:
        idle: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        for e in py:
            a, b = e["ts"], e["ts"] + e["dur"]
            rec = idle[e["name"]]
            rec[0] += 1
            rec[1] += e["dur"]
            rec[2] += (b - a) - busy.within(a, b)
        lines.append(f"Python functions by GPU-idle time inside them (calls, wall ms, idle ms), top {top}:")
        for name, (n, d, i) in sorted(idle.items(), key=lambda kv: -kv[1][2])[:top]:
            lines.append(f"  {i / 1e3:9.1f} idle {d / 1e3:9.1f} wall {n:6d}x  {name[:140]}")
    ops = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "cpu_op":
            ops[e["name"]][0] += 1
            ops[e["name"]][1] += (e["dur"]) - busy.within(e["ts"], e["ts"] + e["dur"])
    lines.append("aten ops by GPU-idle time inside them (calls, idle ms), top 15:")
    for name, (n, i) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:15]:
        lines.append(f"  {i / 1e3:9.1f} idle {n:6d}x  {name[:120]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    for path in args.traces:
        print(f"== {path}")
        print(analyse(load(path), args.top))


if __name__ == "__main__":
    main()
