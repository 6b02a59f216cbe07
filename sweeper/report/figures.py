"""The report's figures (PNG, matplotlib's Agg backend): a study's curves by step and by epoch
(:func:`plot_curves`) and each dataset's best curve by epoch and by tokens (:func:`plot_datasets`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import optuna

from sweeper.report.stored import attrs, best_trial, eval_curve, trial_name

__all__ = ["plot_curves", "plot_datasets"]


def plot_curves(study: optuna.Study, path: Path) -> Path:
    """Eval-loss curves of every trial of a study: against steps (left) and epochs (right); a note instead when
    no trial recorded an evaluation (all failed before their first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for t in study.get_trials(deepcopy=False):
        curve = eval_curve(t)
        if not curve:
            continue
        a = attrs(t)
        label = f"#{t.number} {trial_name(t)}"
        steps, vals = [c[0] for c in curve], [c[1] for c in curve]
        spe = (a.get("plan") or {}).get("steps_per_epoch") or 0
        line, = ax_s.plot(steps, vals, marker=".", label=f"{label} [{t.state.name.lower()}]")
        if spe:
            ax_e.plot([s / spe for s in steps], vals, marker=".", color=line.get_color())
        if a.get("best_step") in steps:
            ax_s.scatter([a["best_step"]], [vals[steps.index(a["best_step"])]], color=line.get_color(), s=60,
                         zorder=3, edgecolor="black")
    metric = study.user_attrs.get("metric", "value")
    ax_s.set(xlabel="optimizer step", ylabel=metric, title=f"{study.study_name}: {metric} by step")
    ax_e.set(xlabel="epoch", title="by epoch")
    ax_s.set_yscale("log")  # the tail, where the schedules differ, stays readable
    for ax in (ax_s, ax_e):
        ax.grid(alpha=0.3)
    if ax_s.get_legend_handles_labels()[0]:
        ax_s.legend(fontsize=8)
    else:  # every trial failed (or was pruned) before its first evaluation
        ax_s.text(0.5, 0.5, "no trial recorded an evaluation", ha="center", transform=ax_s.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_datasets(studies: Sequence[optuna.Study], path: Path) -> Path:
    """Each study's best trial's curve against epochs (left) and tokens seen (right), one line per
    dataset: whether "the same number of epochs" (or of tokens) holds across the datasets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_k) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for study in studies:
        best = best_trial(study)
        if best is None:
            continue
        plan, curve = attrs(best).get("plan") or {}, eval_curve(best)
        spe, tps = plan.get("steps_per_epoch"), plan.get("tokens_per_step")
        steps, vals = [c[0] for c in curve], [c[1] for c in curve]
        label = (f"{study.user_attrs.get('data', study.study_name)} ({study.user_attrs.get('model', '?')}), "
                 f"max_steps={best.user_attrs.get('max_steps')}")
        line = None
        if spe:
            line, = ax_e.plot([x / spe for x in steps], vals, marker=".", label=label)
        if tps:
            ax_k.plot([x * tps for x in steps], vals, marker=".", label=None if line else label,
                      color=line.get_color() if line else None)
    metrics = {s.user_attrs.get("metric", "value") for s in studies}
    metric = metrics.pop() if len(metrics) == 1 else "value"
    ax_e.set(xlabel="epoch", ylabel=metric, title=f"best run of each dataset: {metric} by epoch")
    ax_k.set(xlabel="tokens seen", title="by tokens")
    ax_e.set_yscale("log")
    for ax in (ax_e, ax_k):
        ax.grid(alpha=0.3)
    if ax_e.get_legend_handles_labels()[0] or ax_k.get_legend_handles_labels()[0]:
        fig.legend(loc="lower center", ncol=min(3, max(1, len(studies))), fontsize=8)
    else:  # no best trial recorded its steps per epoch or tokens per step (a study of another tool, say)
        ax_e.text(0.5, 0.5, "no best trial recorded epochs or tokens", ha="center", transform=ax_e.transAxes)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
