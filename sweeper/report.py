"""Read a study back from storage and summarise it. Imports Optuna, never TRL.

    python train.py -m schedule=under,sweet,over   # prints this table at the end of the sweep
"""

from __future__ import annotations

import math
from typing import Any

import optuna


def _fmt(x: Any, spec: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec or ".4f") if math.isfinite(x) else str(x)
    return str(x)


def _params(params: dict) -> str:
    """Swept params other than the schedule, compactly (floats to 3 significant digits)."""
    shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in params.items() if k != "schedule"}
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "–"


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        choices = a.get("choices", {})
        rows.append({
            "trial": t.number,
            "schedule": choices.get("schedule", t.params.get("schedule")),
            "max_steps": a.get("max_steps"),
            "epochs": a.get("epochs_trained"),
            "best": t.value if t.state == optuna.trial.TrialState.COMPLETE else a.get("best_value"),
            "best_step": a.get("best_step"),
            "stopped_early": a.get("stopped_early_step"),
            "state": t.state.name,
            "params": dict(t.params),
            "error": a.get("error"),
        })
    return rows


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


def summary_markdown(study: optuna.Study) -> str:
    """A Markdown table of the study's trials and the step count that won."""
    metric = study.user_attrs.get("metric", "value")
    lines = [
        f"## Study {study.study_name} ({study.direction.name.lower()} {metric})",
        "",
        f"| trial | schedule | params | max_steps | epochs | best {metric} | best step | stopped early | state |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in trial_rows(study):
        lines.append(
            f"| {r['trial']} | {_fmt(r['schedule'])} | {_params(r['params'])} | {_fmt(r['max_steps'])} | {_fmt(r['epochs'], '.2f')} | "
            f"{_fmt(r['best'])} | {_fmt(r['best_step'])} | {_fmt(r['stopped_early'])} | {r['state']} |"
        )
    for r in trial_rows(study):
        if r["error"]:
            lines.append(f"\ntrial {r['trial']} failed: {r['error']}")
    best = best_trial(study)
    lines.append("")
    if best is None:
        lines.append("No trial completed, so no step count can be recommended yet.")
    else:
        a = best.user_attrs
        sched = a.get("choices", {}).get("schedule", "?")
        lines.append(
            f"**Winner for {study.user_attrs.get('data', study.study_name)}: max_steps={a.get('max_steps')} "
            f"(schedule={sched}, trial {best.number})**: best {metric} {best.value:.4f} at step "
            f"{a.get('best_step')} of {a.get('steps_trained')}"
            + (f", stopped early at step {a['stopped_early_step']}" if a.get("stopped_early_step") else "")
            + "."
        )
    return "\n".join(lines)
