"""`python -m sweeper status`: where each study stands, while or after its workers run.

    python -m sweeper status                                              # every study, default storage
    python -m sweeper status --storage postgresql://user@db/sweeps --study banking77-qwen2.5-1.5b

Per study: trials by state, each running trial's worker (host:pid, GPU), its last evaluation and
how long ago its worker last beat; each queued trial (a retry, or a joint WSD search's parked trunk); the best trial so far; and the SLURM worker jobs a
``hydra.sweeper.launcher=slurm`` sweep submitted, with their state from ``squeue``/``sacct``.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys
from typing import Any

from sweeper import records

__all__ = ["status"]


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of each job id (``squeue`` for live jobs, then ``sacct``); "ended" when neither
    knows it any more, "unknown (no squeue)" without SLURM's client."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return {j: "unknown (no squeue here)" for j in job_ids}
    states: dict[str, str] = {}
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%N"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        jid, state, node = (line.split("|") + ["", ""])[:3]
        states[jid.strip()] = state.strip() + (f" on {node.strip()}" if node.strip() else "")
    missing = [j for j in job_ids if j not in states]
    if missing and shutil.which("sacct"):
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State"],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid in missing:
                states[jid] = state.strip()
    return {j: states.get(j, "ended") for j in job_ids}


def study_status(study: Any) -> str:
    import optuna

    from sweeper.storage import heartbeat_age_s, is_branch

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    order = ["COMPLETE", "RUNNING", "WAITING", "PRUNED", "FAIL"]
    branches = sum(is_branch(t) for t in trials)
    head = ", ".join(f"{counts.get(s, 0)} {s}" for s in order)
    lines = [f"study {study.study_name}: {head}" + (f" ({branches} of them WSD branches)" if branches else "")]
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            a = t.user_attrs
            params = " ".join(f"{k}={v}" for k, v in t.params.items())
            last = max(t.intermediate_values) if t.intermediate_values else None
            age = heartbeat_age_s(records.storage(study), records.trial_id(t))
            where = a.get("worker", "a worker")
            if a.get("cuda_visible_devices"):
                where += f" (GPU {a['cuda_visible_devices']})"
            started = t.datetime_start.strftime("%H:%M:%S") if t.datetime_start else "?"
            lines.append(f"  running: trial {t.number} {params} on {where} since {started}"
                         + (f", last evaluation at step {last} ({t.intermediate_values[last]:.4f})" if last is not None
                            else ", no evaluation yet")
                         + (f", heartbeat {age:.0f} s ago" if age is not None else ""))
        elif t.state == optuna.trial.TrialState.WAITING:
            parked = records.parked_at(t)
            retry_of = records.failed_trial_of(t)
            lines.append(f"  waiting: trial {t.number} " + " ".join(f"{k}={v}" for k, v in t.params.items())
                         + (f" (re-run of trial {retry_of})" if records.FAILED_TRIAL in t.system_attrs else "")
                         + (f" (a joint WSD search's trunk, parked at its {parked}-step branch until the other "
                            "learning rates get there)" if parked is not None else ""))
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done and len(study.directions) > 1:  # two objectives: no single best, a front
        lines.append("  Pareto front so far: " + "; ".join(
            f"trial {t.number} " + ", ".join(f"{v:.4g}" for v in t.values)
            for t in sorted(study.best_trials, key=lambda t: t.values[1])))
    elif done:
        best = study.best_trial
        lines.append(f"  best so far: trial {best.number} {study.user_attrs.get(records.METRIC, 'value')} {best.value:.4f} "
                     + " ".join(f"{k}={v}" for k, v in best.params.items()))
    jobs = records.slurm_jobs(study)
    if jobs:
        states = slurm_states(jobs)
        lines.append("  SLURM worker jobs: " + "; ".join(f"{j} {s}" for j, s in states.items()))
    lines.append(f"  (as of {datetime.datetime.now():%H:%M:%S})")
    return "\n".join(lines)


def status(storage: str | None, studies: list[str] | None, config_dir: str | None = None) -> int:
    import optuna

    from sweeper.report_command import default_locations, open_store

    try:
        url, shown, store = open_store(storage or default_locations(config_dir)[0], given=storage is not None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    known = [s.study_name for s in optuna.get_all_study_summaries(store)]
    names = list(dict.fromkeys(studies)) if studies else known  # a --study given twice is shown once
    if not names:
        print(f"no studies in {shown}")
        return 0
    missing = [n for n in names if n not in known]
    if missing:  # as the report says it
        print(f"error: --study {missing[0]!r} is not in the storage; studies there: {sorted(known) or 'none'}",
              file=sys.stderr)
        return 2
    for name in names:
        print(study_status(optuna.load_study(study_name=name, storage=store)))
    return 0
