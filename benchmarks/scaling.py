"""Scaling of one sweep over N workers sharing one study: trials/hour with 1 worker vs N workers.

    python benchmarks/scaling.py --out /tmp/scaling --workers 1 2                 # CPU workers (this box)
    python benchmarks/scaling.py --out /tmp/scaling --workers 1 auto --gpus 0 --trials 6 --steps 500 \
        --build-model /tmp/m15 --warm \
        --overrides 'model=qwen2.5-1.5b model.path=/tmp/m15 data=gsm8k eval.accuracy=off report_to=none'

For each worker spec (a number N, or ``auto``: the sweeper's default, one worker per GPU with room)
it runs the same grid (``--trials`` points: ``seed=1..T`` at ``schedule.max_steps=--steps``) through
the real CLI, ``python train.py -m ... hydra.sweeper.workers=N`` (with ``hydra.sweeper.gpus`` = the
first N of ``--gpus`` when given; ``auto`` never gets ``--gpus``), into its own SQLite study, and
reports the wall time, trials/hour, the ratio to the 1-worker rate against the 0.9·N target, the
study's integrity (every grid point COMPLETE exactly once: no duplicate, none lost), which GPUs the
trials ran on, and the start cost: seconds from the command's start to each worker's first trial, and
a worker's first trial's wall time (imports, model load, data preparation and batch probe
included) against its later trials'. ``--build-model DIR`` first
builds a Qwen2.5-1.5B-shaped random-init model there (on the GPU); ``--warm`` runs one 1-step trial
first (data preparation into the cache, model file read once) so that no arm pays what the other reuses.
Results are printed as markdown and appended to ``--results``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import run_header  # noqa: E402

CPU_OVERRIDES = ["eval.eval_steps=10", "eval.logging_steps=10", "eval.accuracy=off", "eval.save_best=false",
                 "report_to=none", "data.demo_rows=400"]


def run_sweep(out: Path, workers: str, gpus: list[str], trials: int, steps: int, overrides: list[str]) -> dict:
    import optuna

    db = out / f"workers{workers}.db"
    db.unlink(missing_ok=True)
    study = f"scaling-w{workers}"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"seed={','.join(str(i) for i in range(1, trials + 1))}",
           f"schedule.max_steps={steps}", f"hydra.sweeper.workers={workers}", f"hydra.sweeper.storage=sqlite:///{db}",
           f"hydra.sweeper.study_name={study}", f"hydra.sweep.dir={out}/sweeps/w{workers}",
           f"paths.output_dir={out}/runs", f"paths.cache_dir={out}/cache", *overrides]
    if gpus and workers != "auto":
        cmd.append(f"hydra.sweeper.gpus=[{','.join(gpus[:int(workers)])}]")
    log = out / f"workers{workers}.log"
    start = time.time()
    started_at = datetime.datetime.now(datetime.timezone.utc)
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        # CPU workers: one core each (OMP_NUM_THREADS=1), so N workers use N cores and 1 worker one
        env = {**os.environ, "TQDM_DISABLE": "1", **({} if gpus else {"OMP_NUM_THREADS": "1"})}
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - start
    if rc != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {rc}; see {log}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = [t for t in optuna.load_study(study_name=study, storage=f"sqlite:///{db}").trials]
    complete = [t for t in done if t.state.name == "COMPLETE"]
    seeds = collections.Counter(t.params.get("seed") for t in complete)
    by_worker: dict[str, list] = collections.defaultdict(list)
    for t in sorted(complete, key=lambda t: t.datetime_start):
        by_worker[t.user_attrs.get("worker", "?")].append(t)
    first_start = [(ts[0].datetime_start.astimezone(datetime.timezone.utc) - started_at).total_seconds()
                   for ts in by_worker.values()]
    def wall_s(t):  # the trial's own wall time, imports and model/data/probe set-up included
        return (t.datetime_complete - t.datetime_start).total_seconds()

    first_job = [wall_s(ts[0]) for ts in by_worker.values()]
    later_job = [wall_s(t) for ts in by_worker.values() for t in ts[1:]]
    return {
        "workers": workers, "n": len(by_worker), "wall_s": wall, "trials_per_hour": len(complete) / wall * 3600,
        "complete": len(complete), "all_trials": len(done),
        "duplicates": sum(c - 1 for c in seeds.values() if c > 1),
        "lost": sum(1 for s in range(1, trials + 1) if seeds.get(s, 0) == 0),
        "per_worker": collections.Counter(t.user_attrs.get("worker", "?") for t in complete),
        "gpus_used": sorted({str(t.user_attrs.get("cuda_visible_devices")) for t in complete}),
        "first_trial_start_s": first_start,
        "first_job_s": [x for x in first_job if x is not None],
        "later_job_s": [x for x in later_job if x is not None],
    }


def _mean(xs: list) -> str:
    return f"{sum(xs) / len(xs):.0f}" if xs else "–"


def render(rows: list[dict], argv: list[str], trials: int, steps: int, overrides: list[str]) -> str:
    base = next((r for r in rows if r["workers"] == "1"), None)
    lines = [
        "## Scaling: N workers sharing one study",
        "",
        run_header("benchmarks/scaling.py", argv),
        f"- sweep: {trials} grid points (seed=1..{trials}), {steps} steps each; overrides `{' '.join(overrides)}`"
        + ("" if rows and rows[0]["gpus_used"] != ["None"] else "; CPU workers get one core each (OMP_NUM_THREADS=1)"),
        "",
        "| workers | GPUs used | wall s | trials/hour | vs 1 worker | target 0.9·N | COMPLETE | duplicates | lost "
        "| trials per worker | first trial starts at s | first / later trial wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        ratio = r["trials_per_hour"] / base["trials_per_hour"] if base else None
        target = 0.9 * r["n"]
        used = ",".join(r["gpus_used"]) if r["gpus_used"] != ["None"] else "none (CPU)"
        label = f"{r['workers']} ({r['n']} started)" if r["workers"] == "auto" else str(r["workers"])
        lines.append(
            f"| {label} | {used} | {r['wall_s']:.0f} "
            f"| {r['trials_per_hour']:.0f} | {'–' if ratio is None else f'{ratio:.2f}×'} | {target:.1f}× "
            f"{'(met)' if ratio is not None and ratio >= target else '(not met)' if ratio is not None else ''} "
            f"| {r['complete']}/{trials} | {r['duplicates']} | {r['lost']} | {sorted(r['per_worker'].values())} "
            f"| {', '.join(f'{x:.0f}' for x in sorted(r['first_trial_start_s']))} "
            f"| {_mean(r['first_job_s'])} / {_mean(r['later_job_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", nargs="+", default=["1", "2"], help="worker counts, or auto")
    p.add_argument("--build-model", type=Path, default=None,
                   help="build a Qwen2.5-1.5B-shaped random-init model here first (needs a GPU)")
    p.add_argument("--warm", action="store_true", help="prepare the data once before timing any arm")
    p.add_argument("--gpus", default="", help="comma list of GPU ids, one per worker (empty: CPU workers)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--overrides", default=None, help="extra train.py overrides (default: small CPU settings)")
    p.add_argument("--results", type=Path, default=None, help="markdown file to append the section to")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    overrides = shlex.split(a.overrides) if a.overrides is not None else CPU_OVERRIDES
    gpus = [g for g in a.gpus.split(",") if g.strip()]
    if a.build_model is not None and not (a.build_model / "config.json").is_file():
        from benchmarks.batch_auto import build_model

        print(f"[{datetime.datetime.now():%H:%M:%S}] building the model in {a.build_model}", flush=True)
        build_model(a.build_model, a.out / "cache")
    if a.warm:
        cmd = [sys.executable, str(ROOT / "train.py"), "schedule.max_steps=1", "eval.eval_steps=1",
               f"paths.output_dir={a.out}/warm", f"paths.cache_dir={a.out}/cache", *overrides]
        print(f"[{datetime.datetime.now():%H:%M:%S}] warming the data cache: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = []
    for n in a.workers:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {n} worker(s)", flush=True)
        rows.append(run_sweep(a.out, n, gpus, a.trials, a.steps, overrides))
        print(f"  {rows[-1]['wall_s']:.0f} s, {rows[-1]['trials_per_hour']:.0f} trials/hour", flush=True)
    text = render(rows, argv, a.trials, a.steps, overrides)
    print(text)
    if a.results:
        with a.results.open("a") as f:
            f.write("\n" + text)
    return 0 if all(r["duplicates"] == 0 and r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
