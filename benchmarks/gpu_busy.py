"""How busy the GPU is over a whole sweep, and while its training steps run.

    # one GPU, from the repo root (wheels in /tmp/site, gsm8k copied to .data/gsm8k/), the 1.5B shape:
    python3 benchmarks/gpu_busy.py --out /tmp/busy --build-model /tmp/m15 --results $OUT/busy.md -- \
        schedule.max_steps=300,600,900 data=gsm8k data.train_path=.data/gsm8k/train.jsonl \
        model=qwen2.5-1.5b model.path=/tmp/m15 eval.accuracy=off

It runs ``python train.py -m <overrides>`` (one worker, its own SQLite study under ``--out``) while a thread
samples NVML's utilisation of every visible GPU every ``--interval`` seconds (the share of the last sample
period in which a kernel ran). The trial path's step timer (``SFT_SWEEP_STEP_TIMES``) stamps every
optimizer step, evaluation and checkpoint save with the same monotonic clock, so the samples split into
the whole command, the training spans (a trial's first to last step, its evaluations and saves included) and
the steps alone (from one step's stamp to the next where no evaluation or save came between). Printed and
appended to ``--results``: busy % of each, the seconds before the first step of the sweep, where the GPU's
idle seconds go (before the first step, between trials, after the last step, inside training), the median
seconds around an evaluation (the evaluation, the checkpoint save, on to the next step), each trial's own
timing attr (model load, the trainer's preparation, batch=auto's probe, evaluations, the job), and for every
trial its seconds from the job's start to its first step, its steady tokens/s, its peak GPU memory (allocated)
and its objective (the best eval loss).
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import run_header  # noqa: E402


def sample(stop: threading.Event, interval: float, out: list) -> None:
    """Append (monotonic time, [busy % per GPU]) every ``interval`` seconds until ``stop`` is set; nothing
    without NVML (a machine with no NVIDIA driver: the stamps' own figures still come out)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    while not stop.is_set():
        out.append((time.perf_counter(), [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]))
        stop.wait(interval)
    pynvml.nvmlShutdown()


def trials_of(steps: list[dict]) -> list[list[dict]]:
    """The step stamps split into trials: a step number that does not grow starts the next trial."""
    runs: list[list[dict]] = []
    for s in steps:
        if not runs or s["step"] <= runs[-1][-1]["step"]:
            runs.append([])
        runs[-1].append(s)
    return runs


def step_spans(runs: list[list[dict]], events: list[dict]) -> list[tuple[float, float]]:
    """The spans from one optimizer step's stamp to the next within a trial that hold no evaluation or
    checkpoint save: the time the training steps themselves take (data, forward, backward, optimizer)."""
    marks = sorted(e["t"] for e in events)
    spans = []
    for r in runs:
        for a, b in zip(r, r[1:]):
            i = bisect.bisect_right(marks, a["t"])
            if i == len(marks) or marks[i] > b["t"]:
                spans.append((a["t"], b["t"]))
    return spans


def busy(samples: list, spans: list[tuple[float, float]] | None = None) -> float | None:
    """Mean busy % of the busiest GPU over the samples (inside ``spans`` when given)."""
    vals = [max(u) for t, u in samples if spans is None or any(a <= t <= b for a, b in spans)]
    return round(statistics.fmean(vals), 1) if vals else None


def idle_budget(samples: list, t0: float, t1: float, runs: list[list[dict]]) -> dict:
    """Where the command's GPU-idle seconds go: before the first step, between trials (a trial's last step to
    the next one's first: its last evaluation and save, the next job's start), after the last step (the last
    evaluation, the study's end, the report) and inside the training spans; each window's seconds and its idle
    seconds (its length times the share of samples not busy; None without NVML samples)."""
    def window(a: float, b: float) -> list:
        if b <= a:
            return [0.0, 0.0]
        if not samples:
            return [round(b - a, 2), None]
        pct = busy([s for s in samples if a <= s[0] <= b])
        return [round(b - a, 2), round((b - a) * (1 - (pct or 0.0) / 100), 2)]

    if not runs:
        return {}
    spans = [window(r[0]["t"], r[-1]["t"]) for r in runs]
    return {"before_first_step": window(t0, runs[0][0]["t"]),
            "between_trials": [window(a[-1]["t"], b[0]["t"]) for a, b in zip(runs, runs[1:])],
            "after_last_step": window(runs[-1][-1]["t"], t1),
            "training": [round(sum(x[0] for x in spans), 2),
                         round(sum(x[1] for x in spans), 2) if samples else None]}


def evaluation_gaps(runs: list[list[dict]], events: list[dict]) -> dict:
    """The median seconds of what lies between two steps around an evaluation (each with the GPU mostly idle but
    for the evaluation's own forward passes): ``evaluate`` from the step before to the evaluation's stamp (its
    forward passes, its metrics, the study's report), ``save`` from that stamp to the checkpoint save's stamp (the
    trainer's save: model card, adapter, optimizer state) and ``to_next_step`` from the last of them to the next
    step's stamp (one step's own time included); with how many of each."""
    marks = sorted(events, key=lambda e: e["t"])
    ts = [e["t"] for e in marks]
    parts: dict[str, list[float]] = {"evaluate": [], "save": [], "to_next_step": []}
    for r in runs:
        for a, b in zip(r, r[1:]):
            inside = marks[bisect.bisect_right(ts, a["t"]):bisect.bisect_right(ts, b["t"])]
            ev = [e for e in inside if e["event"] == "evaluate"]
            if not ev:
                continue
            parts["evaluate"].append(ev[0]["t"] - a["t"])
            sv = [e for e in inside if e["event"] == "save" and e["t"] >= ev[0]["t"]]
            if sv:
                parts["save"].append(sv[0]["t"] - ev[0]["t"])
            parts["to_next_step"].append(b["t"] - inside[-1]["t"])
    return {k: {"n": len(v), "median_s": round(statistics.median(v), 3) if v else None} for k, v in parts.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder: study, logs, step stamps")
    ap.add_argument("--build-model", type=Path, default=None, help="build the 1.5B-shaped random-init model here first")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between NVML samples")
    ap.add_argument("--warmup-steps", type=int, default=5, help="first steps of each trial left out of tokens/s")
    ap.add_argument("--results", type=Path, default=None, help="append a markdown section to this file")
    ap.add_argument("overrides", nargs="*", help="overrides of the sweep (after --)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.build_model is not None and not (a.build_model / "config.json").is_file():
        from benchmarks.batch_auto import build_model

        build_model(a.build_model, a.out / "cache")
    stamps, db = a.out / "steps.jsonl", a.out / "busy.db"
    stamps.unlink(missing_ok=True)
    db.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *a.overrides, "hydra.sweeper.workers=1",
           f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=busy", f"hydra.sweep.dir={a.out}/sweep",
           f"paths.output_dir={a.out}/runs", f"paths.cache_dir={a.out}/cache", "report_to=none"]
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop, a.interval, samples), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with open(a.out / "sweep.log", "w") as log:
        log.write(f"# command started {datetime.datetime.now().isoformat(sep=' ', timespec='milliseconds')}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "SFT_SWEEP_STEP_TIMES": str(stamps), "PYTHONUNBUFFERED": "1"})
    t1 = time.perf_counter()
    stop.set()
    sampler.join()
    rows = [json.loads(line) for line in stamps.read_text().splitlines()] if stamps.is_file() else []
    steps, events = [x for x in rows if "step" in x], [x for x in rows if "event" in x]
    runs = trials_of(steps)
    spans = [(r[0]["t"], r[-1]["t"]) for r in runs if len(r) > 1]
    import optuna

    if "busy" not in optuna.get_all_study_names(storage=f"sqlite:///{db}"):
        tail = (a.out / "sweep.log").read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"the sweep (exit {rc}) made no study; the end of {a.out / 'sweep.log'}:\n" + "\n".join(tail))
    study = optuna.load_study(study_name="busy", storage=f"sqlite:///{db}")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.datetime_start or datetime.datetime.max)
    rows = []
    for i, r in enumerate(runs):
        t = trials[i] if i < len(trials) else None
        start = t.datetime_start.timestamp() if t and t.datetime_start else None
        steady = r[a.warmup_steps:] if len(r) > a.warmup_steps + 1 else r
        tok_s = ((steady[-1]["tokens"] - steady[0]["tokens"]) / (steady[-1]["t"] - steady[0]["t"])
                 if len(steady) > 1 and steady[-1]["t"] > steady[0]["t"] else None)
        rows.append({"trial": t.number if t else i, "state": t.state.name if t else "?", "steps": r[-1]["step"],
                     "job_to_first_step_s": round(r[0]["wall"] - start, 1) if start and "wall" in r[0] else None,
                     "busy_pct": busy(samples, [(r[0]["t"], r[-1]["t"])]), "tokens_per_s": round(tok_s) if tok_s else None,
                     "peak_gib": (t.user_attrs.get("peak_gpu_gib") if t else None),
                     "timing": (t.user_attrs.get("timing") if t else None),
                     "eval_loss": round(t.value, 4) if t and t.value is not None else None})
    report = {"rc": rc, "wall_s": round(t1 - t0, 1), "busy_sweep_pct": busy([s for s in samples if t0 <= s[0] <= t1]),
              "busy_training_pct": busy(samples, spans), "busy_steps_pct": busy(samples, step_spans(runs, events)),
              "evaluations": sum(e["event"] == "evaluate" for e in events), "first_step_s": round(runs[0][0]["t"] - t0, 1) if runs else None,
              "trials": rows, "samples": len(samples), "idle": idle_budget(samples, t0, t1, runs),
              "evaluation_gaps": evaluation_gaps(runs, events)}
    (a.out / "busy.json").write_text(json.dumps(report, indent=1))
    text = "\n".join([
        run_header("benchmarks/gpu_busy.py", sys.argv[1:] if argv is None else argv),
        f"- sweep: exit {rc}, {report['wall_s']} s, first optimizer step after {report['first_step_s']} s; "
        f"NVML samples every {a.interval} s: {len(samples)}",
        f"- **GPU busy over the whole sweep: {report['busy_sweep_pct']}%; while training steps run: "
        f"{report['busy_training_pct']}%**; between two steps with no evaluation or save: "
        f"{report['busy_steps_pct']}% ({report['evaluations']} evaluations)",
        "- where the GPU sat idle, [window s, idle s]: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                                     for k, v in report["idle"].items()),
        "- around an evaluation, median s (count): " + ", ".join(
            f"{k.replace('_', ' ')} {v['median_s']} ({v['n']})" for k, v in report["evaluation_gaps"].items()),
        "- each trial's own timing (s): " + "; ".join(f"trial {r['trial']} {r['timing']}" for r in rows), "",
        "| trial | state | steps | job start → first step s | busy % (its steps) | steady tokens/s | peak GiB | "
        "best eval loss |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['trial']} | {r['state']} | {r['steps']} | {r['job_to_first_step_s']} | {r['busy_pct']} | "
          f"{r['tokens_per_s']} | {r['peak_gib']} | {r['eval_loss']} |" for r in rows], ""])
    print(text, flush=True)
    if a.results:
        with open(a.results, "a") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
