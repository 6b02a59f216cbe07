"""Read studies back from storage and say which step count to train for, and why.
Imports Optuna and matplotlib, never TRL.

    python train.py -m schedule=under,sweet,over   # prints study_report() at the end of the sweep
    python -m sweeper report                       # every study: table, diagnosis, winner, PNG + HTML
    python -m sweeper report --storage postgresql://user@host/db --study banking77-qwen2.5-1.5b
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna


def _fmt(x: Any, spec: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec or ".4f") if math.isfinite(x) else str(x)
    return str(x)


def _params(params: dict) -> str:
    """Swept params other than the schedule (and a WSD search's own max_steps/method, which have their
    columns), compactly (floats to 3 significant digits)."""
    wsd = params.get("method") == "wsd"
    shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in params.items()
             if k != "schedule" and not (wsd and k in ("max_steps", "method"))}
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "–"


def method(t: optuna.trial.FrozenTrial) -> str | None:
    """How the trial's LR was scheduled: ``wsd`` for a WSD search's trunk and branches (``method``
    attr), else its scheduler (``sft_config.lr_scheduler_type``, e.g. cosine)."""
    a = t.user_attrs
    if a.get("method"):
        return str(a["method"])
    return (a.get("sft_config") or {}).get("lr_scheduler_type")


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        choices = a.get("choices", {})
        rows.append({
            "trial": t.number,
            "schedule": choices.get("schedule", t.params.get("schedule")),
            "method": method(t),
            "max_steps": a.get("max_steps"),
            "epochs": a.get("epochs_trained"),
            "best": t.value if t.state == optuna.trial.TrialState.COMPLETE else a.get("best_value"),
            "best_step": a.get("best_step"),
            "stopped_early": a.get("stopped_early_step"),
            "effective_batch": a.get("effective_batch"),
            "tokens_per_step": (a.get("plan") or {}).get("tokens_per_step"),
            "state": t.state.name,
            "params": dict(t.params),
            "error": a.get("error"),
        })
    return rows


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


# --------------------------------------------------------------------------- diagnosis


@dataclass(frozen=True)
class Diagnosis:
    verdict: str  # under-trained | over-trained | plateau | good | no curve
    reason: str


def diagnose(eval_curve: Sequence[Sequence[float]], train_curve: Sequence[Sequence[float]] = (),
             rel_tol: float = 0.01) -> Diagnosis:
    """Read an eval-loss curve ([step, loss] pairs, in step order) as a person would.

    - *under-trained*: the loss is still falling clearly at the end (the last quarter of the
      evaluations improved it by more than ``rel_tol``, and the last one is the best);
    - *over-trained*: the loss turned up after its best step (the end is more than ``2*rel_tol``
      above the best) while the train loss kept falling: the step where it turned is named;
    - *plateau*: the whole run moved the loss by less than ``2*rel_tol``: consider a lower learning
      rate (or a higher one, if the train loss is flat too);
    - *good*: it fell and then flattened near its best.
    """
    pts = [(int(s), float(v)) for s, v in eval_curve if math.isfinite(float(v))]
    if len(pts) < 2:
        return Diagnosis("no curve", "fewer than two evaluations; lower eval.eval_steps")
    steps, vals = [p[0] for p in pts], [p[1] for p in pts]
    best_i = min(range(len(vals)), key=vals.__getitem__)
    best, first, last = vals[best_i], vals[0], vals[-1]
    scale = max(abs(best), 1e-8)
    if (first - best) / max(abs(first), 1e-8) < 2 * rel_tol and (max(vals) - min(vals)) / scale < 2 * rel_tol:
        return Diagnosis("plateau", f"eval loss stayed within {2 * rel_tol:.0%} of {best:.4f} over the whole run: "
                                    "the model is not learning at this rate; consider a lower learning rate")
    if (last - best) / scale > 2 * rel_tol:
        turn = steps[best_i]
        train = [(int(s), float(v)) for s, v in train_curve]
        at_best = [v for s, v in train if s <= turn]
        after = [v for s, v in train if s > turn]
        falling = bool(at_best and after and min(after[-3:]) < at_best[-1])
        why = " while train loss kept falling" if falling else ""
        return Diagnosis("over-trained", f"eval loss turned up after step {turn} (best {best:.4f}, end {last:.4f}, "
                                         f"+{(last - best) / scale:.1%}){why}: fewer steps would do")
    quarter = max(1, len(vals) // 4)
    recent_gain = (vals[-1 - quarter] - last) / scale
    if best_i == len(vals) - 1 and recent_gain > rel_tol:
        return Diagnosis("under-trained", f"eval loss was still falling at the end ({recent_gain:.1%} over the last "
                                          f"{quarter} evaluation(s), best at the last step {steps[-1]}): "
                                          "more steps would help")
    return Diagnosis("good", f"eval loss fell from {first:.4f} to {best:.4f} at step {steps[best_i]} and flattened")


# --------------------------------------------------------------------------- recommendation


def _eval_curve(t: optuna.trial.FrozenTrial) -> list[list[float]]:
    return [[s, v] for s, v in sorted(t.intermediate_values.items())]


def recommend(study: optuna.Study) -> dict | None:
    """The step count to train this dataset for, with the reason in words."""
    best = best_trial(study)
    if best is None:
        return None
    metric = study.user_attrs.get("metric", "value")
    a = best.user_attrs
    d = diagnose(_eval_curve(best), a.get("train_curve", []))
    others = []
    for r in trial_rows(study):
        if r["trial"] != best.number and r["state"] == "COMPLETE" and r["best"] is not None:
            others.append(f"{r['schedule'] or 'trial ' + str(r['trial'])} ({r['max_steps']} steps): {r['best']:.4f}")
    steps = a.get("max_steps")
    reason = (f"max_steps={steps} (schedule={a.get('choices', {}).get('schedule', '?')}) reached the lowest {metric}, "
              f"{best.value:.4f}, at step {a.get('best_step')}")
    if a.get("stopped_early_step"):
        reason += f"; early stopping ended it at step {a['stopped_early_step']}"
    w = a.get("wsd") or {}
    if a.get("method") == "wsd" and "branch_point" in w:
        reason += (f"; it is a WSD cooldown branch (of trial {a.get('branch_of')}): warmup {w['warmup_steps']}, "
                   f"constant LR to step {w['branch_point']}, {w['decay_type']} decay over {w['decay_steps']} steps")
    elif a.get("method") == "wsd":
        reason += "; it is the trunk of a WSD search (the longest candidate, with its own cooldown)"
    if a.get("method") == "wsd":
        reason += (f"; to train with cosine instead, confirm it with one run (`python train.py schedule.max_steps={steps} "
                   "lr.lr_scheduler_type=cosine`): how close cosine comes to WSD at equal length depends on the LR")
    if others:
        reason += "; the others: " + ", ".join(others)
    reason += f". Its curve: {d.verdict} ({d.reason})."
    return {"trial": best.number, "max_steps": steps, "best_step": a.get("best_step"), "value": best.value,
            "diagnosis": d, "reason": reason}


def sftconfig_snippet(trial: optuna.trial.FrozenTrial) -> str:
    """A ready-to-paste SFTConfig for the winning trial (TRL's own names)."""
    a = trial.user_attrs
    cfg = a.get("sft_config")
    if not cfg:
        return f"# trial {trial.number} predates the sft_config attr; its run config is in {a.get('run_dir')}/.hydra"
    lines = ["SFTConfig("]
    if a.get("method") == "wsd":
        # The schedule that was measured: WSD with this run's cooldown (lr_scheduler_kwargs below).
        # Cosine at the same length comes close at a well-chosen LR (Hägele et al. 2024); our H100 runs
        # found its eval loss 21% below to 25% above WSD's, depending on the LR (benchmarks/RESULTS.md).
        lines = ["# warmup-stable-decay, as measured: constant LR, then the cooldown of lr_scheduler_kwargs",
                 *lines]
    for key, value in cfg.items():
        lines.append(f"    {key}={value!r},")
    lines.append(")")
    return "\n".join(lines)


# --------------------------------------------------------------------------- outputs


def plot_curves(study: optuna.Study, path: Path) -> Path:
    """Eval-loss curves of every trial of a study: against steps (left) and epochs (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for t in study.get_trials(deepcopy=False):
        curve = _eval_curve(t)
        if not curve:
            continue
        a = t.user_attrs
        label = f"#{t.number} {a.get('choices', {}).get('schedule', '')} {_params(t.params)}".replace(" –", "")
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
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _accuracy(t: optuna.trial.FrozenTrial) -> str:
    a = t.user_attrs
    if a.get("best_accuracy") is None:
        return "–"
    return f"{a['best_accuracy']:.1%} ({a.get('best_accuracy_step')})"


def accuracy_disagrees(t: optuna.trial.FrozenTrial) -> str | None:
    """Say so when the best step by eval loss and by accuracy differ: SFT eval loss often rises
    while the task still improves, so a run picked by loss alone can be too short."""
    a = t.user_attrs
    curve = a.get("accuracy_curve") or []
    loss_step, acc_step = a.get("best_step"), a.get("best_accuracy_step")
    if not curve or loss_step is None or acc_step is None or loss_step == acc_step:
        return None
    at_loss = next((v for s, v in curve if s == loss_step), None)
    if at_loss is None or at_loss >= a["best_accuracy"]:
        return None  # accuracy at the loss-best step is as good: no disagreement that matters
    return (f"best eval loss at step {loss_step} but best accuracy at step {acc_step} "
            f"({at_loss:.1%} -> {a['best_accuracy']:.1%}): eval loss and the task disagree; "
            "consider eval.metric=eval_accuracy")


def study_report(study: optuna.Study) -> str:
    """Markdown: the table (with diagnosis), the recommendation and the SFTConfig for it."""
    metric = study.user_attrs.get("metric", "value")
    lines = [
        f"## {study.study_name}",
        "",
        f"| trial | schedule | method | params | max_steps | epochs | eff. batch | tokens/step | best {metric} "
        "| best step | stopped early | accuracy (step) | state | diagnosis |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for r in trial_rows(study):
        t = by_number[r["trial"]]
        d = diagnose(_eval_curve(t), t.user_attrs.get("train_curve", []))
        lines.append(
            f"| {r['trial']} | {_fmt(r['schedule'])} | {_fmt(r['method'])} | {_params(r['params'])} "
            f"| {_fmt(r['max_steps'])} "
            f"| {_fmt(r['epochs'], '.2f')} | {_fmt(r['effective_batch'])} | {_fmt(r['tokens_per_step'], ',.0f')} "
            f"| {_fmt(r['best'])} "
            f"| {_fmt(r['best_step'])} | {_fmt(r['stopped_early'])} | {_accuracy(t)} | {r['state']} | {d.verdict} |")
    lines.append("")
    for r in trial_rows(study):
        t = by_number[r["trial"]]
        d = diagnose(_eval_curve(t), t.user_attrs.get("train_curve", []))
        lines.append(f"- trial {r['trial']}: {d.verdict}: {d.reason}" + (f" (error: {r['error']})" if r["error"] else ""))
        flag = accuracy_disagrees(t)
        if flag:
            lines.append(f"  - note: {flag}")
    rec = recommend(study)
    lines.append("")
    if rec is None:
        lines.append("No trial completed, so no step count can be recommended yet.")
    else:
        lines.append(f"**Recommended for {study.user_attrs.get('data', study.study_name)}: max_steps={rec['max_steps']}.** "
                     + rec["reason"])
        snippet = sftconfig_snippet(by_number[rec["trial"]])
        lines += ["", "```python", snippet, "```"]
    return "\n".join(lines)


def write_report(storage: Any, out_dir: Path, study_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``<study>.png`` and ``report.html`` (PNG embedded) under ``out_dir``."""
    summaries = optuna.get_all_study_summaries(storage=storage)
    names = list(study_names) if study_names else [s.study_name for s in summaries]
    known = {s.study_name for s in summaries}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"--study {missing[0]!r} is not in the storage; studies there: {sorted(known) or 'none'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    md_parts, html_parts = [], []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        text = study_report(study)
        png = plot_curves(study, out_dir / f"{name}.png")
        md_parts.append(text + f"\n\n![{name} curves]({png.name})\n")
        img = base64.b64encode(png.read_bytes()).decode()
        html_parts.append(f"<section><pre>{html.escape(text)}</pre>"
                          f"<img alt='{html.escape(name)} curves' src='data:image/png;base64,{img}'></section>")
    md = "# sft-sweep report\n\n" + "\n".join(md_parts)
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>sft-sweep report</title>"
            "<style>body{font-family:sans-serif;margin:2em}pre{white-space:pre-wrap}img{max-width:100%}</style>"
            "</head><body><h1>sft-sweep report</h1>" + "".join(html_parts) + "</body></html>")
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return {"markdown": out_dir / "summary.md", "html": out_dir / "report.html"}
