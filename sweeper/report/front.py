"""The report of a two-objective study (eval metric vs cost): its trials, the Pareto front, and which point to pick.

    python train.py -m schedule.max_steps=20,40 'hydra.sweeper.direction=[minimize,minimize]' hydra.sweeper.cost=steps
    python -m sweeper report

The front is Optuna's (``study.best_trials``: no other trial is better on one objective without being worse on
the other), listed from the cheapest. The recommendation is the cheapest front point whose metric is within
noise of the front's best metric (at most twice the larger eval noise of the two runs, ``sweeper.report.curves``'
estimate from each run's evaluations), so that paying more buys a difference larger than the noise; when no
cheaper point is that close, the best-metric point. Reads the study only.
"""

from __future__ import annotations

import optuna

from sweeper import objectives
from sweeper.report.curves import noise_estimate
from sweeper.report.text import cell, escape

__all__ = ["front_report", "pick"]


def _noise(t: optuna.trial.FrozenTrial, maximize: bool) -> float:
    return noise_estimate([objectives.eval_curve(t)], maximize=maximize).sigma


def pick(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial, float] | None:
    """``(picked, best, noise)``: the front point recommended, the front's best-metric point and the noise
    the two were compared at; None before any trial completed."""
    front = study.best_trials
    if not front:
        return None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    sign = -1.0 if maximize else 1.0
    best = min(front, key=lambda t: (sign * t.values[0], t.values[1]))
    for t in sorted(front, key=lambda t: t.values[1]):
        noise = max(_noise(t, maximize), _noise(best, maximize))
        if sign * (t.values[0] - best.values[0]) <= 2 * noise:
            return t, best, noise
    return best, best, _noise(best, maximize)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"


def front_report(study: optuna.Study) -> str:
    """Markdown: every trial with both objectives (``*`` on the front), the front from the cheapest, and the
    recommendation with its reason."""
    metric = study.user_attrs.get("metric", "value")
    cost = study.user_attrs.get("cost", "steps")
    unit = objectives.COSTS.get(cost, (cost, cost))[1]
    front = {t.number for t in study.best_trials}
    lines = [f"## {escape(study.study_name)}", "",
             f"Two objectives: {metric} ({study.directions[0].name.lower()}) and the cost in {unit} (minimize).", "",
             f"| trial | params | {metric} | {unit} | on the front | state |", "|---:|---|---:|---:|---|---|"]
    for t in study.get_trials(deepcopy=False):
        vals = t.values or [None, None]
        shown = [_fmt(v) if v is not None else "–" for v in vals]
        params = cell(escape(", ".join(f"{k}={v}" for k, v in t.params.items())))
        lines.append(f"| {t.number} | {params} | {shown[0]} | {shown[1]} | {'*' if t.number in front else ''} "
                     f"| {t.state.name} |")
    chosen = pick(study)
    lines.append("")
    if chosen is None:
        lines.append("No trial completed, so there is no Pareto front yet.")
        return "\n".join(lines)
    picked, best, noise = chosen
    ordered = sorted(study.best_trials, key=lambda t: t.values[1])
    lines.append("Pareto front (cheapest first): " + "; ".join(
        f"trial {t.number}: {metric} {t.values[0]:.4f} for {_fmt(t.values[1])} {unit}" for t in ordered) + ".")
    lines.append("")
    params = escape(", ".join(f"{k}={v}" for k, v in picked.params.items()) or f"trial {picked.number}")
    if picked.number == best.number:
        why = (f"it has the best {metric} on the front ({best.values[0]:.4f}) and no cheaper front point is within "
               f"noise of it (±{noise:.4f}, twice that allowed)")
    else:
        why = (f"the cheapest front point within noise of the best {metric}: {picked.values[0]:.4f} vs "
               f"{best.values[0]:.4f} (trial {best.number}), within twice the noise ±{noise:.4f}, for "
               f"{picked.values[1] / best.values[1]:.0%} of its cost ({_fmt(picked.values[1])} vs "
               f"{_fmt(best.values[1])} {unit})")
    lines.append(f"**Recommended for {escape(study.user_attrs.get('data', study.study_name))}: trial {picked.number} "
                 f"({params}).** Picked as {why}.")
    return "\n".join(lines)
