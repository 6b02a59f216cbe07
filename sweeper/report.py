"""Read studies back from storage and say which step count to train for, and why.
Imports Optuna and matplotlib, never TRL; how a trial is recorded comes from ``sweeper.storage``
(``SYSTEM_ATTRS``, ``is_branch``). The sweeper prints :func:`study_report` (and :func:`datasets_section`);
a study holding a joint (learning rate, steps) WSD search also gets :func:`joint_sections`, and its
recommendation names the learning rate with the step count.

    python train.py -m schedule=under,sweet,over   # prints study_report() at the end of the sweep
    python -m sweeper report                       # every study: table, diagnosis, winner, PNG + HTML
    python -m sweeper report --storage postgresql://user@host/db --study banking77-qwen2.5-1.5b
"""

from __future__ import annotations

import base64
import functools
import html
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import optuna

__all__ = ["NOISE_FLOOR", "Diagnosis", "Noise", "accuracy_disagrees", "accuracy_off", "attrs", "best_trial", "curve_attr",
           "dataset_row", "datasets_section", "datasets_table", "diagnose", "joint_sections", "markdown_html", "method",
           "noise_estimate", "plot_curves", "plot_datasets", "recommend", "report_html", "schedule_label",
           "settings_note", "sftconfig_snippet", "study_report", "trial_diagnosis", "trial_noise", "trial_rows",
           "write_report"]


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
    a = attrs(t)
    if a.get("method"):
        return str(a["method"])
    return (a.get("sft_config") or {}).get("lr_scheduler_type")


@functools.lru_cache(maxsize=None)
def _preset_max_steps(choice: str) -> int | None:
    """``max_steps`` of ``conf/schedule/<choice>.yaml`` (its one home); None for a preset without one
    (``epochs3``, ``wsd_search``) or a choice this checkout does not have."""
    from omegaconf import OmegaConf

    from sweeper.paths import CONF_DIR

    path = CONF_DIR / "schedule" / f"{choice}.yaml"
    return OmegaConf.load(path).get("max_steps") if path.is_file() else None


def schedule_label(t: optuna.trial.FrozenTrial) -> str | None:
    """What to call a trial's schedule: the ``schedule`` group choice (``sweet``), unless its length
    was set by hand, then ``max_steps=N``: a swept ``schedule.max_steps`` param, or a ``max_steps``
    other than the preset of a choice the sweep did not sweep (the default ``sweet`` under
    ``schedule.max_steps=600``). A swept choice (``schedule=under,over``) stays the label, being the
    grid's own coordinate; WSD trials keep ``wsd_search``. The length is always its own column."""
    a = attrs(t)
    choice = a.get("choices", {}).get("schedule", t.params.get("schedule"))
    steps = a.get("max_steps")
    if steps is None or method(t) == "wsd":
        return choice
    by_hand = "schedule.max_steps" in t.params or (
        choice is not None and "schedule" not in t.params and _preset_max_steps(choice) not in (None, steps))
    return f"max_steps={steps}" if by_hand else choice


def _name(t: optuna.trial.FrozenTrial) -> str:
    """``max_steps=600``, ``under (500 steps)``, plus any other swept param: a trial in one phrase."""
    label, steps = schedule_label(t), t.user_attrs.get("max_steps")
    name = label or f"trial {t.number}"
    if steps is not None and not name.startswith("max_steps="):
        name += f" ({steps} steps)"
    extra = {k: v for k, v in t.params.items() if k not in ("schedule", "schedule.max_steps", "max_steps", "method")}
    return name + (" " + _params(extra) if extra else "")


def attrs(t: optuna.trial.FrozenTrial) -> dict:
    """A trial's results: its user attrs plus those kept as system attrs so that optuna-dashboard's
    attribute table stays readable (curves, ``sft_config``, ``plan``; user attrs in older studies)."""
    from sweeper.storage import SYSTEM_ATTRS

    return {**{k: t.system_attrs[k] for k in SYSTEM_ATTRS if k in t.system_attrs}, **t.user_attrs}


def curve_attr(t: optuna.trial.FrozenTrial, name: str) -> list:
    """A trial's stored curve ``[[step, value], ...]``."""
    return attrs(t).get(name) or []


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = attrs(t)
        rows.append({
            "trial": t.number,
            "schedule": schedule_label(t),
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


# --------------------------------------------------------------------------- noise


NOISE_FLOOR = 0.005  # the noise is never taken below 0.5% of the best value


@dataclass(frozen=True)
class Noise:
    sigma: float  # one standard deviation of an evaluation, in the metric's units (eval loss: nats/token)
    method: str   # how it was measured, in words, for the report


def noise_estimate(curves: Sequence[Sequence[Sequence[float]]], rel_floor: float = NOISE_FLOOR,
                   maximize: bool = False) -> Noise:
    """The evaluation-to-evaluation noise of eval curves near their best, as one standard deviation.

    Trials store only their eval curves (``[step, value]`` pairs, in step order), so the noise is read
    from the curves. In each curve of n evaluations, take the 2k+1 evaluations around its best one,
    k = max(3, n//3) (the window shifted to stay inside the curve when the best is near an end), and
    their second differences ``v[i-1] - 2*v[i] + v[i+1]``, which cancel a local linear trend;
    centring them on their median cancels a constant curvature, so what is left is the scatter around
    a local quadratic fit. For independent noise of standard deviation σ a second difference has
    standard deviation √6·σ: σ = RMS / √6, with deviations beyond 3.5 robust standard deviations
    (1.4826·MAD) dropped as jumps. Deviations are pooled over the curves; a curve with fewer than 6
    evaluations adds none. The result is floored at ``rel_floor`` of the best value over all curves,
    so smooth (deterministic) curves still get a band. ``maximize``: the best is the highest value
    (eval_accuracy). No usable curve: the floor alone (0.0 without any value), and the method says so.
    Units: those of the values (eval loss: nats per token).
    """
    pick = max if maximize else min
    devs: list[float] = []
    best, used = None, 0
    for curve in curves:
        vals = [float(v) for _, v in curve if math.isfinite(float(v))]
        if not vals:
            continue
        i = pick(range(len(vals)), key=vals.__getitem__)
        best = vals[i] if best is None else pick(best, vals[i])
        k = max(3, len(vals) // 3)
        lo = max(0, min(i - k, len(vals) - (2 * k + 1)))  # 2k+1 evaluations around the best, inside the curve
        w = vals[lo: lo + 2 * k + 1]
        d2 = [w[j - 1] - 2 * w[j] + w[j + 1] for j in range(1, len(w) - 1)]
        if len(d2) < 4:
            continue
        centre = statistics.median(d2)
        devs += [abs(d - centre) for d in d2]
        used += 1
    floor = rel_floor * abs(best) if best is not None else 0.0
    if not devs:
        return Noise(floor, f"too few evaluations near the best to measure it: the floor, {rel_floor:.1%} of the best")
    robust = 1.4826 * statistics.median(devs)
    kept = [d for d in devs if d <= 3.5 * robust] or devs
    measured = math.sqrt(sum(d * d for d in kept) / len(kept)) / math.sqrt(6)
    how = (f"scatter of the evaluations around a local quadratic fit near the best: RMS/√6 of {len(kept)} second "
           "differences" + (f" from {used} curves" if used > 1 else ""))
    how += (f", measured ±{measured:.4f}, raised to the floor of {rel_floor:.1%} of the best" if measured < floor
            else f", floor {rel_floor:.1%} of the best")
    return Noise(max(measured, floor), how)


# --------------------------------------------------------------------------- diagnosis


@dataclass(frozen=True)
class Diagnosis:
    verdict: str  # under-trained | over-trained | plateau | good | no curve | failed | running
    reason: str


# Schedulers whose LR decays towards zero by max_steps (transformers' names): their curves flatten at
# the end whether or not the model has converged.
DECAYING = ("linear", "cosine", "polynomial", "cosine_with_min_lr", "cosine_warmup_with_min_lr")
TAIL = 0.75  # the tail of a decaying schedule: the last quarter of the run (cosine: under 15% of its peak LR)


def diagnose(eval_curve: Sequence[Sequence[float]], train_curve: Sequence[Sequence[float]] = (),
             rel_tol: float = 0.01, *, noise: float | None = None, scheduler: str | None = None,
             max_steps: int | None = None, branch_point: int | None = None) -> Diagnosis:
    """Read an eval-loss curve ([step, loss] pairs, in step order) as a person would.

    A change counts only above both a relative bar and the noise: ``noise`` is one standard deviation
    of an evaluation in loss units (None: :func:`noise_estimate` of this curve, floored at 0.5%).

    - *under-trained*: still falling clearly at the end: the best is the last evaluation and the last
      quarter of the evaluations gained more than ``rel_tol`` and 2 noise;
    - *over-trained*: the end is more than ``2*rel_tol`` and 3 noise above the best (a smaller rise is
      noise, and said so); the step where it turned is named, and whether train loss kept falling;
    - *plateau*: the whole run moved the loss by less than ``2*rel_tol``: consider a lower learning rate;
    - *good*: it fell and then flattened near its best. With a ``scheduler`` that decays to zero
      (:data:`DECAYING`) and a run that reached the last quarter of ``max_steps``, the flat tail is the
      LR decaying, not convergence, and the reason says so.

    ``branch_point``: the curve is a WSD cooldown branch (constant-LR trunk up to that step, then the
    cooldown); its drop at the end is the cooldown, so the trunk's trend before the branch point is
    judged instead (see :func:`_diagnose_wsd`).
    """
    pts = [(int(s), float(v)) for s, v in eval_curve if math.isfinite(float(v))]
    if len(pts) < 2:
        return Diagnosis("no curve", "fewer than two evaluations; lower eval.eval_steps")
    sigma = noise if noise is not None else noise_estimate([pts]).sigma
    if branch_point is not None and pts[0][0] <= branch_point < pts[-1][0]:
        return _diagnose_wsd(pts, branch_point, rel_tol, sigma)
    steps, vals = [p[0] for p in pts], [p[1] for p in pts]
    best_i = min(range(len(vals)), key=vals.__getitem__)
    best, first, last = vals[best_i], vals[0], vals[-1]
    scale = max(abs(best), 1e-8)
    if (first - best) / max(abs(first), 1e-8) < 2 * rel_tol and (max(vals) - min(vals)) / scale < 2 * rel_tol:
        return Diagnosis("plateau", f"eval loss stayed within {2 * rel_tol:.0%} of {best:.4f} over the whole run: "
                                    "the model is not learning at this rate; consider a lower learning rate")
    rise = last - best
    if rise > max(2 * rel_tol * scale, 3 * sigma):
        turn = steps[best_i]
        train = [(int(s), float(v)) for s, v in train_curve]
        at_best = [v for s, v in train if s <= turn]
        after = [v for s, v in train if s > turn]
        falling = bool(at_best and after and min(after[-3:]) < at_best[-1])
        why = " while train loss kept falling" if falling else ""
        return Diagnosis("over-trained", f"eval loss turned up after step {turn} (best {best:.4f}, end {last:.4f}, "
                                         f"+{rise / scale:.1%}){why}: fewer steps would do")
    decaying = scheduler in DECAYING and bool(max_steps) and steps[-1] >= TAIL * max_steps
    quarter = max(1, len(vals) // 4)
    recent_gain = vals[-1 - quarter] - last
    if best_i == len(vals) - 1 and recent_gain > max(rel_tol * scale, 2 * sigma):
        lr = f", even as the {scheduler} LR decayed towards zero" if decaying else ""
        return Diagnosis("under-trained", f"eval loss was still falling at the end ({recent_gain / scale:.1%} over the "
                                          f"last {quarter} evaluation(s), best at step {steps[best_i]} of "
                                          f"{steps[-1]}{lr}): more steps would help")
    fell = f"eval loss fell from {first:.4f} to {best:.4f} at step {steps[best_i]}"
    if rise > 2 * rel_tol * scale:
        return Diagnosis("good", f"{fell}; the end, {last:.4f} (+{rise / scale:.1%}), is within the noise "
                                 f"(±{sigma:.4f}), not a turn")
    if decaying:
        return Diagnosis("good", f"{fell}; its flat tail is the {scheduler} LR decaying towards zero over the last "
                                 "quarter of the run, not convergence: only a longer run shows whether more steps help")
    return Diagnosis("good", f"{fell} and flattened")


def _diagnose_wsd(pts: list[tuple[int, float]], branch_point: int, rel_tol: float, sigma: float) -> Diagnosis:
    """A WSD branch: the trunk (constant LR) up to ``branch_point``, then its cooldown. The cooldown's drop
    is what a cooldown does, so the verdict reads the trunk: the median of its last quarter of
    evaluations against the quarter before (medians, because a constant-LR curve is noisy: a fall
    counts above ``rel_tol`` and 2 standard errors of that difference, a rise above ``2*rel_tol`` and
    3, from the trunk's own noise). ``sigma`` (loss units) judges the cooldown: a rise after its best
    of more than ``2*rel_tol`` and 3 sigma is named."""
    trunk = [v for s, v in pts if s <= branch_point]
    cool = [(s, v) for s, v in pts if s > branch_point]
    b_step, b_val = min(cool, key=lambda p: p[1])
    at_p = trunk[-1]
    cooled = (f"the cooldown took it from {at_p:.4f} at the branch point (step {branch_point}) to {b_val:.4f} "
              f"at step {b_step} ({(b_val - at_p) / max(abs(at_p), 1e-8):+.1%}"
              + ("), the drop a cooldown brings" if b_val < at_p else "): no drop, the cooldown did not help"))
    end = cool[-1][1]
    if end - b_val > max(2 * rel_tol * abs(b_val), 3 * sigma):
        cooled += f"; it rose again to {end:.4f} by step {cool[-1][0]}"
    q = max(2, len(trunk) // 4)
    if len(trunk) < 2 * q:
        return Diagnosis("good", f"too few evaluations before the branch point to judge the trunk; {cooled}")
    before, recent = statistics.median(trunk[-2 * q:-q]), statistics.median(trunk[-q:])
    # standard error of a difference of two medians of q evaluations, from the trunk's own noise
    se = 1.2533 * noise_estimate([[(i, v) for i, v in enumerate(trunk)]]).sigma * math.sqrt(2 / q)
    scale = max(abs(recent), 1e-8)
    trend = f"median {before:.4f} -> {recent:.4f} over its last {2 * q} evaluations"
    if before - recent > max(rel_tol * scale, 2 * se):
        return Diagnosis("under-trained", f"the constant-LR trunk was still falling at the branch point ({trend}): "
                                          f"more steps would help; {cooled}")
    if recent - before > max(2 * rel_tol * scale, 3 * se):
        return Diagnosis("over-trained", f"the constant-LR trunk had turned up before the branch point ({trend}): "
                                         f"fewer steps would do; {cooled}")
    return Diagnosis("good", f"the constant-LR trunk had flattened by the branch point ({trend}); {cooled}")


def _branch_point(t: optuna.trial.FrozenTrial) -> int | None:
    """Where a WSD trial's cooldown starts: a branch's ``wsd.branch_point``, or for the trunk the entry
    of its ``branches`` at its own length; None for any other trial."""
    a = attrs(t)
    if method(t) != "wsd":
        return None
    w = a.get("wsd") or {}
    if "branch_point" in w:
        return int(w["branch_point"])
    own = [b for b in a.get("branches") or [] if b.get("max_steps") == a.get("max_steps") and "branch_point" in b]
    return int(own[0]["branch_point"]) if own else None


def _eval_curve(t: optuna.trial.FrozenTrial) -> list[list[float]]:
    return [[s, v] for s, v in sorted(t.intermediate_values.items())]


def trial_noise(t: optuna.trial.FrozenTrial, maximize: bool = False) -> Noise:
    """:func:`noise_estimate` of a trial's own eval curve; a WSD trial's cooldown only (the evaluations after
    its branch point; all of them for a trunk stopped before its own), since its constant-LR trunk is
    noisier than its result."""
    curve, p = _eval_curve(t), _branch_point(t)
    cooldown = [c for c in curve if p is not None and c[0] > p]
    return noise_estimate([cooldown or curve], maximize=maximize)


def trial_diagnosis(t: optuna.trial.FrozenTrial) -> Diagnosis:
    """:func:`diagnose` with what the trial knows: its scheduler, length, WSD branch point and own noise
    (:func:`trial_noise`: the jitter of evaluations differs between runs, e.g. with the LR at their best).
    A FAIL trial's diagnosis is its ``error`` attr; a running one without two evaluations yet is *running*."""
    a = attrs(t)
    if t.state == optuna.trial.TrialState.FAIL:
        return Diagnosis("failed", str(a.get("error") or "no error recorded; see the job log in its run_dir"))
    curve = _eval_curve(t)
    if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING) and len(curve) < 2:
        return Diagnosis("running", "fewer than two evaluations so far")
    return diagnose(curve, curve_attr(t, "train_curve"), noise=trial_noise(t).sigma,
                    scheduler=(a.get("sft_config") or {}).get("lr_scheduler_type"), max_steps=a.get("max_steps"),
                    branch_point=_branch_point(t))


# --------------------------------------------------------------------------- recommendation


# A best step in the first two thirds of its run is "well inside" it: the run went on for a third without
# improving on it, while a cosine LR was still above a quarter of its peak (later, a flat curve is the decay).
INSIDE = 2 / 3


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _cost(t: optuna.trial.FrozenTrial) -> tuple[int | None, int | None, float | None]:
    """What a trial cost: optimizer steps trained (its early stop or max_steps), tokens (``tokens_seen``, or
    the plan's tokens per step × steps) and measured training seconds (``train_runtime_s``, else
    ``timing.job_s``; None for a WSD trial, whose own time is a cooldown, not a run of its length)."""
    a = attrs(t)
    steps = a.get("stopped_early_step") or a.get("max_steps")
    tps = (a.get("plan") or {}).get("tokens_per_step")
    tokens = a.get("tokens_seen") or (round(tps * steps) if tps and steps else None)
    seconds = None if method(t) == "wsd" else (a.get("train_runtime_s") or (a.get("timing") or {}).get("job_s"))
    return steps, tokens, seconds


def _grid(values: Sequence[float], unit: int) -> list[int]:
    """Step counts rounded to multiples of ``unit`` (the evaluation interval), at least one unit, sorted."""
    return sorted({max(unit, unit * round(v / unit)) for v in values})


def _settings(best: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """The overrides that ran ``best`` besides its schedule (a WSD branch: its trunk's), which a follow-up
    command repeats; none for trials recorded before the sweeper stored them."""
    found = best.system_attrs.get("overrides")
    trunk = attrs(best).get("branch_of")
    if found is None and trunk is not None:
        found = next((t.system_attrs.get("overrides") for t in trials if t.number == trunk), None)
    return list(found or [])


def _one_run(steps: int, settings: Sequence[str], extra: str = "") -> str:
    """One confirming run of ``steps`` steps with the trial's settings, then ``extra`` (which wins)."""
    import shlex

    return f"python train.py schedule.max_steps={steps}" + "".join(" " + shlex.quote(o) for o in settings) + extra


def _grid_command(lengths: Sequence[int], wsd: bool, settings: Sequence[str] = ()) -> str:
    """The follow-up command: the new lengths, and the ``settings`` (overrides) of the trial it follows, so
    that it runs in the same study with the same data, model and settings."""
    import shlex

    joined = ",".join(str(n) for n in lengths)
    rest = "".join(" " + shlex.quote(o) for o in settings)
    if wsd:
        return f"python train.py -m schedule=wsd_search 'schedule.wsd.candidates=[{joined}]'{rest}"
    return f"python train.py -m schedule.max_steps={joined}{rest}"


def recommend(study: optuna.Study) -> dict | None:
    """The step count to train this dataset for: the best COMPLETE trial's ``max_steps``, with the reason
    (``reason``, one paragraph) and what qualifies it (``notes``, one line each): its curve's diagnosis;
    whether it is at an edge of the lengths tried (then the next grid to run); where its best step lies
    well inside the run, how to get that model; the shortest length within noise of it and its cost; the
    noise and how it was measured. None when no trial completed."""
    best = best_trial(study)
    if best is None:
        return None
    metric = study.user_attrs.get("metric", "value")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    noise = trial_noise(best, maximize)
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None]
    a = attrs(best)
    d = trial_diagnosis(best)
    steps, b_step, wsd = a.get("max_steps"), a.get("best_step"), method(best) == "wsd"
    label = schedule_label(best)
    reason = (f"max_steps={steps}" + (f" (schedule={label})" if label and label != f"max_steps={steps}" else "")
              + f" reached the lowest {metric}, {best.value:.4f}, at step {b_step}")
    if a.get("stopped_early_step"):
        reason += f"; early stopping ended it at step {a['stopped_early_step']}"
    w = a.get("wsd") or {}
    if wsd and "branch_point" in w:
        reason += (f"; it is a WSD cooldown branch (of trial {a.get('branch_of')}): warmup {w['warmup_steps']}, "
                   f"constant LR to step {w['branch_point']}, {w['decay_type']} decay over {w['decay_steps']} steps")
    elif wsd:
        reason += "; it is the trunk of a WSD search (the longest candidate, with its own cooldown)"
    if wsd:
        reason += (f"; to train with cosine instead, confirm it with one run "
                   f"(`{_one_run(steps, _settings(best, done), ' lr.lr_scheduler_type=cosine')}`): how close cosine "
                   "comes to WSD at equal length depends on the LR")
    others = [f"{_name(t)}: {t.value:.4f}" for t in done if t.number != best.number]
    if others:
        reason += "; the others: " + ", ".join(others)
    reason += "."

    notes = [f"Its curve (trial {best.number}): {d.verdict}: {d.reason}.",
             *_generalisation(best, metric), *_metric_steps(best, metric), *_length_notes(best, d, done, maximize, study.get_trials(deepcopy=False))]
    close = _shortest_within_noise(best, done, maximize)
    if close is not None:
        notes.append(_within_noise(best, *close))
    notes.append(f"Noise ±{noise.sigma:.4f} near its best ({noise.sigma / max(abs(best.value), 1e-8):.1%}; method: "
                 f"{noise.method}); two results are within noise when they differ by at most twice the larger "
                 "noise of their two curves.")
    joint = a.get("learning_rate", (a.get("wsd_trunk") or {}).get("lr"))  # a joint search's learning rate
    return {"trial": best.number, "max_steps": steps, "best_step": b_step, "value": best.value,
            "learning_rate": float(joint) if joint is not None else None,
            "diagnosis": d, "reason": reason, "notes": notes, "noise": noise,
            "within_noise": close[0] if close else None, "verdict": _verdict(best, d, notes, close)}


def joint_sections(study: optuna.Study) -> list[str]:
    """Markdown lines for each joint (learning rate, steps) WSD search in the study: its table of rates by
    lengths (:func:`sweeper.halving.joint_table`), the winner, the cost against the full cosine grid and
    where each stopped trunk stopped. Empty when the study holds none."""
    from sweeper.halving import joint_table
    from sweeper.storage import is_branch

    groups: dict[str, dict[float, dict]] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        rec = t.system_attrs.get("wsd_trunk")
        if rec and not is_branch(t):  # the newest trial of a rate stands for it (a retry for its failed run)
            groups.setdefault(rec["group"], {})[float(rec["lr"])] = {**attrs(t), "state": t.state.name}
    metric = study.user_attrs.get("metric", "value")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    out = []
    for trunks in groups.values():
        any_trunk = next(iter(trunks.values()))
        rec, cands = any_trunk["wsd_trunk"], list((any_trunk.get("wsd") or {}).get("candidates") or [])
        rule = f"successive halving, eta={rec['eta']}" if rec["rule"] != "none" else "no halving"
        out += [f"### Joint search: learning rate x steps ({len(rec['learning_rates'])} rates x {len(cands)} "
                f"lengths, {rule})", "", joint_table(trunks, cands, metric, maximize), ""]
    return out


def _verdict(best: optuna.trial.FrozenTrial, d: Diagnosis, notes: Sequence[str],
             close: tuple[optuna.trial.FrozenTrial, float] | None) -> str:
    """The recommendation in one line, for the table of datasets: the winner's diagnosis and length, the
    next grid to run when the best may lie outside (or between) the lengths tried, and a shorter length
    within noise with its share of the cost."""
    parts = [f"{d.verdict}: train max_steps={best.user_attrs.get('max_steps')}"]
    for note in notes:
        kind, _, rest = note.partition(": ")
        command = re.search(r"`([^`]+)`", rest)
        if kind == "Edge of the grid" and command:
            parts.append(("longer may be better" if "longer" in rest else "shorter may do as well")
                         + f", try `{command.group(1)}`")
        elif kind == "Between lengths" and command:
            parts.append(f"the best lies between two lengths tried, try `{command.group(1)}`")
    if close is not None:
        c = close[0]
        (s1, _, _), (s0, _, _) = _cost(c), _cost(best)
        parts.append(f"max_steps={c.user_attrs.get('max_steps')} is within noise"
                     + (f" for {s1 / s0:.0%} of the steps" if s1 and s0 else ""))
    return "; ".join(parts)


def _generalisation(t: optuna.trial.FrozenTrial, metric: str) -> list[str]:
    """The train/eval gap line of :mod:`sweeper.generalisation` for ``t`` (its eval-loss curve: the objective's
    when it is ``eval_loss``, else the ``loss_curve`` stored beside it), or none."""
    from sweeper.generalisation import gap, note

    a = attrs(t)
    loss = _eval_curve(t) if metric == "eval_loss" else (a.get("loss_curve") or [])
    g = gap(loss, curve_attr(t, "train_curve"), noise_estimate([loss]).sigma) if loss else None
    per_step = (a["epochs_trained"] / a["steps_trained"]) if a.get("epochs_trained") and a.get("steps_trained") else None
    return [note(g, per_step)] if g else []


def _metric_steps(t: optuna.trial.FrozenTrial, metric: str) -> list[str]:
    """The line of :func:`sweeper.advice.metric_steps` when a task metric is on: the objective itself (its
    curve and the eval loss kept beside it), else label accuracy or TRL's mean token accuracy beside the loss."""
    from sweeper.advice import metric_steps

    a = attrs(t)
    if metric != "eval_loss":
        line = metric_steps(metric, a.get("loss_curve") or [], metric, _eval_curve(t))
    elif a.get("accuracy_curve"):
        line = metric_steps(metric, _eval_curve(t), "eval_accuracy", a["accuracy_curve"])
    else:
        line = metric_steps(metric, _eval_curve(t), "eval_mean_token_accuracy", a.get("token_accuracy_curve") or [])
    return [line] if line else []


def _peaks(trials: Sequence[optuna.trial.FrozenTrial], maximize: bool) -> list[int]:
    """Where curves peaked inside their runs (:func:`sweeper.advice.peak`): a WSD trial's trunk before its
    branch point (a stopped trunk's too), a cosine run's best step before its end."""
    from sweeper.advice import peak

    found = [peak(_eval_curve(t), _branch_point(t) if method(t) == "wsd" else None, maximize) for t in trials
             if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    return sorted({m for m in found if m is not None})


def _length_notes(best: optuna.trial.FrozenTrial, d: Diagnosis, done: Sequence[optuna.trial.FrozenTrial],
                  maximize: bool, trials: Sequence[optuna.trial.FrozenTrial] = ()) -> list[str]:
    """Where the winner's length sits among the lengths tried (``max_steps`` of the COMPLETE trials ``done``)
    and what to run next: above the longest when it won with its best late in its run (not when its best
    came well inside it: see :data:`INSIDE`), below the shortest when it won, between the winner and the
    next longer length when the winner was still falling; and, when the best step is well inside the
    run, how to get that model. The grids are rounded to the winner's ``eval_steps``."""
    a = attrs(best)
    steps, b_step, wsd = a.get("max_steps"), a.get("best_step"), method(best) == "wsd"
    lengths = sorted({t.user_attrs["max_steps"] for t in done if t.user_attrs.get("max_steps")})
    if not steps or not lengths:
        return []
    unit = int((a.get("sft_config") or {}).get("eval_steps") or 1)
    tried = "/".join(map(str, lengths))
    from sweeper.advice import between, prune_measured

    measured: dict[int, float] = {}  # length -> its best value in the study
    for t in done:
        n = t.user_attrs.get("max_steps")
        if n and (n not in measured or (t.value > measured[n] if maximize else t.value < measured[n])):
            measured[int(n)] = t.value
    inside = bool(b_step and b_step < steps and not wsd
                  and (b_step <= INSIDE * steps or a.get("stopped_early_step") or d.verdict == "over-trained"))
    notes = []
    if steps == lengths[-1]:
        which = f"the only length tried ({steps})" if len(lengths) == 1 else f"the longest tried ({tried})"
        if inside:
            notes.append(f"Not an edge of the grid: the best length is {which}, but its best came at step {b_step}, "
                         "well inside the run: longer runs will not help.")
        else:
            when = "at the end of its run" if b_step == steps else f"late in its run (step {b_step} of {steps})"
            grid = prune_measured(_grid([steps, 1.5 * steps, 2 * steps], unit), measured, best.value, maximize)
            notes.append(f"Edge of the grid: the best length is {which} and its best came {when}, so longer may be "
                         f"better still: run `{_grid_command(grid, wsd, _settings(best, done))}`.")
    if len(lengths) > 1 and steps == lengths[0] and d.verdict != "under-trained":
        grid = prune_measured(_grid([steps / 4, steps / 2, steps], unit), measured, best.value, maximize)
        notes.append(f"Edge of the grid: the best length is the shortest tried ({tried}): a shorter run may do as "
                     f"well: run `{_grid_command(grid, wsd, _settings(best, done))}`.")
    if d.verdict == "under-trained" and steps != lengths[-1]:
        longer = min(n for n in lengths if n > steps)
        there = (max if maximize else min)(t.value for t in done if t.user_attrs.get("max_steps") == longer)
        grid, m = between(steps, longer, unit, measured, best.value, _peaks(trials or done, maximize), maximize)
        falling = "its trunk was still falling at its branch point" if wsd else "its curve was still falling at its end"
        near = f"; a curve of the study peaked at step {m}, so the grid is narrowed around it" if m else ""
        run = (f"run `{_grid_command(grid, wsd, _settings(best, done))}`" if grid
               else "every length between them on the evaluation grid is measured already")
        notes.append(f"Between lengths: {falling}, but max_steps={longer} reached only {there:.4f}: the best "
                     f"length lies between {steps} and {longer}{near}: {run}.")
    if inside:
        if a.get("stopped_early_step"):
            why = f"early stopping ended it at step {a['stopped_early_step']}"
        elif d.verdict == "over-trained":
            why = "the curve turned up after it"
        else:
            why = "the rest of the run did not improve on it"
        ckpt = a.get("best_checkpoint")
        decays = (a.get("sft_config") or {}).get("lr_scheduler_type") in DECAYING
        notes.append(f"Best step inside the run: step {b_step} of {steps} ({why}); "
                     + (f"that model is the best checkpoint kept, `{ckpt}`; " if ckpt else "")
                     + "to train for that length, confirm it with one run: "
                     + f"`{_one_run(b_step, _settings(best, done))}`"
                     + (" (with its own LR decay it may end lower)" if decays else "") + ".")
    return notes


def _shortest_within_noise(best: optuna.trial.FrozenTrial, done: Sequence[optuna.trial.FrozenTrial],
                           maximize: bool) -> tuple[optuna.trial.FrozenTrial, float] | None:
    """The trial of the shortest length shorter than the winner's whose best value is within noise of the
    winner's (at most twice the larger :func:`trial_noise` of the two curves), with that noise; None when
    there is none."""
    steps, sign = best.user_attrs.get("max_steps") or 0, -1.0 if maximize else 1.0
    own = trial_noise(best, maximize).sigma
    noise = {t.number: max(own, trial_noise(t, maximize).sigma) for t in done}
    close = [t for t in done if (t.user_attrs.get("max_steps") or 0) < steps
             and sign * (t.value - best.value) <= 2 * noise[t.number]]
    if not close:
        return None
    c = min(close, key=lambda t: (t.user_attrs["max_steps"], sign * t.value))
    return c, noise[c.number]


def _within_noise(best: optuna.trial.FrozenTrial, c: optuna.trial.FrozenTrial, sigma: float) -> str:
    """The note on ``c``, within noise ``sigma`` of the winner ``best``, with what each cost (:func:`_cost`)."""
    steps = best.user_attrs.get("max_steps") or 0
    (s1, k1, x1), (s0, k0, x0) = _cost(c), _cost(best)
    parts = [f"{s1:,} vs {s0:,} steps"]
    if k1 and k0:
        parts.append(f"{_si(k1)} vs {_si(k0)} tokens")
    if x1 and x0:
        parts.append(f"{x1:,.0f} s vs {x0:,.0f} s of training")
    return (f"Within noise: {_name(c)} reached {c.value:.4f}, within noise of the best {best.value:.4f} at "
            f"max_steps={steps} ({(c.value - best.value) / max(abs(best.value), 1e-8):+.1%}, noise "
            f"±{sigma:.4f}), for "
            f"{s1 / s0:.0%} of the cost ({', '.join(parts)}).")


def sftconfig_snippet(trial: optuna.trial.FrozenTrial) -> str:
    """A ready-to-paste SFTConfig for the winning trial (TRL's own names)."""
    a = attrs(trial)
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
        a = attrs(t)
        label = f"#{t.number} {_name(t)}"
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
    a = attrs(t)
    if a.get("best_accuracy") is None:
        return "–"
    return f"{a['best_accuracy']:.1%} ({a.get('best_accuracy_step')})"


def accuracy_disagrees(t: optuna.trial.FrozenTrial) -> str | None:
    """Say so when the best step by eval loss and by accuracy differ: SFT eval loss often rises
    while the task still improves, so a run picked by loss alone can be too short."""
    a = attrs(t)
    curve = curve_attr(t, "accuracy_curve")
    loss_step, acc_step = a.get("best_step"), a.get("best_accuracy_step")
    if not curve or loss_step is None or acc_step is None or loss_step == acc_step:
        return None
    at_loss = next((v for s, v in curve if s == loss_step), None)
    if at_loss is None or at_loss >= a["best_accuracy"]:
        return None  # accuracy at the loss-best step is as good: no disagreement that matters
    return (f"best eval loss at step {loss_step} but best accuracy at step {acc_step} "
            f"({at_loss:.1%} -> {a['best_accuracy']:.1%}): eval loss and the task disagree; "
            "consider eval.metric=eval_accuracy")


def settings_note(study: optuna.Study) -> str | None:
    """Which trials ran which settings, when a study holds trials whose unswept settings differ (added
    with ``hydra.sweeper.allow_config_change=true``); None when every trial ran the same ones."""
    from sweeper import identity

    trials = [t for t in study.get_trials(deepcopy=False) if "config" in t.system_attrs]
    params = {k for t in trials for k in t.params}
    keys = sorted(k for k in identity.varying([t.system_attrs["config"] for t in trials])
                  if not k.startswith(identity.SEARCHED) and k not in params
                  and not any(k.startswith(p + ".") for p in params))
    if not keys:
        return None
    groups: dict[str, list[int]] = {}
    for t in trials:
        label = " ".join(f"{k}={t.system_attrs['config'].get(k)}" for k in keys)
        groups.setdefault(label, []).append(t.number)
    parts = [f"{label} for trial(s) {', '.join(map(str, nums))}" for label, nums in groups.items()]
    return "Settings differ between trials (added with hydra.sweeper.allow_config_change=true): " + "; ".join(parts)


def accuracy_off(study: optuna.Study) -> str | None:
    """Why the task metric was not measured (``accuracy`` attr of the trials), when it was not."""
    whys = []
    for t in study.get_trials(deepcopy=False):
        d = t.user_attrs.get("accuracy") or {}
        if d.get("on") is False and d.get("why") and d["why"] not in whys:
            whys.append(d["why"])
    return "; ".join(whys) or None


def study_report(study: optuna.Study) -> str:
    """Markdown: the table (with diagnosis), the recommendation with its notes and the SFTConfig for it; for a
    two-objective study, its Pareto front and the point picked (``sweeper.report_front``)."""
    if len(study.directions) > 1:
        from sweeper.report_front import front_report

        return front_report(study)
    metric = study.user_attrs.get("metric", "value")
    lines = [
        f"## {study.study_name}",
        "",
        f"| trial | schedule | method | params | max_steps | epochs | eff. batch | tokens/step | best {metric} "
        "| best step | stopped early | accuracy (step) | state | diagnosis |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = trial_rows(study)
    diagnoses = {r["trial"]: trial_diagnosis(by_number[r["trial"]]) for r in rows}
    for r in rows:
        t = by_number[r["trial"]]
        lines.append(
            f"| {r['trial']} | {_fmt(r['schedule'])} | {_fmt(r['method'])} | {_params(r['params'])} "
            f"| {_fmt(r['max_steps'])} "
            f"| {_fmt(r['epochs'], '.2f')} | {_fmt(r['effective_batch'])} | {_fmt(r['tokens_per_step'], ',.0f')} "
            f"| {_fmt(r['best'])} "
            f"| {_fmt(r['best_step'])} | {_fmt(r['stopped_early'])} | {_accuracy(t)} | {r['state']} "
            f"| {diagnoses[r['trial']].verdict} |")
    lines.append("")
    settings = settings_note(study)
    if settings:
        lines += [f"- {settings}", ""]
    off = accuracy_off(study)
    if off:
        lines += [f"- accuracy off: {off}", ""]
    for r in rows:
        t, d = by_number[r["trial"]], diagnoses[r["trial"]]
        error = f" (error: {r['error']})" if r["error"] and d.verdict != "failed" else ""
        lines.append(f"- trial {r['trial']}: {d.verdict}: {d.reason}{error}")
        flag = accuracy_disagrees(t)
        if flag:
            lines.append(f"  - note: {flag}")
    lines += joint_sections(study)
    rec = recommend(study)
    lines.append("")
    if rec is None:
        lines.append("No trial completed, so no step count can be recommended yet.")
    else:
        lr = f"lr.learning_rate={rec['learning_rate']:g}, " if rec.get("learning_rate") is not None else ""
        lines.append(f"**Recommended for {study.user_attrs.get('data', study.study_name)}: {lr}max_steps={rec['max_steps']}.** "
                     + rec["reason"])
        lines += [f"- {note}" for note in rec["notes"]]
        snippet = sftconfig_snippet(by_number[rec["trial"]])
        lines += ["", "```python", snippet, "```"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- several datasets


def _spent(study: optuna.Study) -> tuple[float, str]:
    """Seconds the study's trials took (each job's ``timing.job_s``, else its ``train_runtime_s``; a WSD
    branch's time is inside its trunk's job) and on what: ``GPU`` when any trial used one, else ``CPU``."""
    from sweeper.storage import is_branch

    jobs = [attrs(t) for t in study.get_trials(deepcopy=False) if not is_branch(t)]
    seconds = sum((a.get("timing") or {}).get("job_s") or a.get("train_runtime_s") or 0.0 for a in jobs)
    return seconds, "GPU" if any(a.get("peak_gpu_gib") is not None for a in jobs) else "CPU"


def dataset_row(study: optuna.Study) -> dict:
    """One study's answer in numbers, for the table of datasets: its data (train rows, median tokens per
    row), the recommended ``max_steps`` (:func:`recommend`) as epochs, samples and tokens of that data, its
    best value and accuracy, the noise and the shortest length within it, what the study cost and the
    one-line verdict. Keys are None where a study has no completed trial (``verdict`` says so)."""
    rec = recommend(study)
    seconds, device = _spent(study)
    row = {"study": study.study_name, "data": study.user_attrs.get("data", study.study_name),
           "model": study.user_attrs.get("model"), "metric": study.user_attrs.get("metric", "value"),
           "cost_s": seconds, "device": device, "rows": None, "tokens_per_row": None, "max_steps": None,
           "epochs": None, "samples": None, "tokens": None, "best": None, "accuracy": None, "noise": None,
           "within_noise": None, "verdict": "no trial completed yet: no step count to recommend"}
    if rec is None:
        return row
    best = next(t for t in study.get_trials(deepcopy=False) if t.number == rec["trial"])
    a, steps = attrs(best), rec["max_steps"]
    plan = a.get("plan") or {}
    spe, tps = plan.get("steps_per_epoch"), plan.get("tokens_per_step")
    eff = a.get("effective_batch") or plan.get("effective_batch")
    close = rec["within_noise"]
    row.update(rows=a.get("train_rows"), tokens_per_row=a.get("median_tokens_per_row"), max_steps=steps,
               epochs=steps / spe if steps and spe else None, samples=steps * eff if steps and eff else None,
               tokens=steps * tps if steps and tps else None, best=rec["value"], accuracy=a.get("best_accuracy"),
               noise=rec["noise"].sigma, verdict=rec["verdict"],
               within_noise=close.user_attrs.get("max_steps") if close is not None else None)
    return row


def _count(n: float | None) -> str:
    return "–" if n is None else f"{n:,.0f}"


def datasets_table(studies: Sequence[optuna.Study]) -> str:
    """Markdown: a row per study (:func:`dataset_row`), so that the step counts of several datasets (or
    models) read side by side; each row is what that study's own report recommends."""
    rows = [dataset_row(s) for s in studies]
    metrics = {r["metric"] for r in rows}
    best = f"best {metrics.pop()}" if len(metrics) == 1 else "best value"
    lines = [f"| dataset | model | rows | tokens/row (median) | max_steps | epochs | samples | tokens | {best} "
             "| accuracy | noise ± | shortest within noise | cost | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r["data"], _fmt(r["model"]), _count(r["rows"]), _fmt(r["tokens_per_row"], ".0f"), _fmt(r["max_steps"]),
                 _fmt(r["epochs"], ".2f"), _count(r["samples"]), "–" if r["tokens"] is None else _si(r["tokens"]),
                 _fmt(r["best"]), "–" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
                 "–" if r["noise"] is None else f"±{r['noise']:.4f}",
                 "–" if r["within_noise"] is None else f"max_steps={r['within_noise']}",
                 f"{r['cost_s']:,.0f} {r['device']} s", r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        plan, curve = attrs(best).get("plan") or {}, _eval_curve(best)
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
    fig.legend(loc="lower center", ncol=min(3, max(1, len(studies))), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def datasets_section(studies: Sequence[optuna.Study], png: Path) -> str:
    """Markdown: the table of datasets (:func:`datasets_table`) and its figure (:func:`plot_datasets`,
    written to ``png``)."""
    plot_datasets(studies, png)
    return ("## Step count per dataset\n\n" + datasets_table(studies)
            + f"\n\n![best curve of each dataset by epoch and by tokens]({png.name})\n")


# report.html: the same markdown, rendered. markdown-it-py with raw HTML off (any "<" in a study name, an error
# or a label is shown as text) and links and images off (user text cannot add markup that fetches anything);
# only the curves come in, as data: URIs. The Content-Security-Policy makes the browser hold the page to that.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1440px;
  margin:2em auto;padding:0 1.5em}
h1,h2{border-bottom:1px solid #d0d7de;padding-bottom:.3em}
h2{margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d0d7de;padding:4px 7px;vertical-align:top}
th{background:#f6f8fa;vertical-align:bottom}
tbody tr:nth-child(even){background:#fafbfc}
code{font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:88%;
  background:#eff1f3;padding:.1em .35em;border-radius:4px;overflow-wrap:anywhere}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:1em;overflow-x:auto;line-height:1.4}
pre code{background:none;padding:0;font-size:13px;overflow-wrap:normal}
li{margin:.3em 0}
figure{margin:1em 0}
img{max-width:100%;height:auto;border:1px solid #d0d7de}
"""


@functools.cache
def _markdown_renderer() -> Any:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "image", "autolink"])


def markdown_html(text: str) -> str:
    """HTML of one study's markdown (:func:`study_report`): tables, bold, lists, code blocks; any HTML in it is
    escaped, not passed through."""
    return _markdown_renderer().render(text)


def report_html(sections: Sequence[tuple[str, str, bytes]]) -> str:
    """The self-contained ``report.html`` for ``(study name, markdown, curves PNG)`` sections: each study's
    rendered markdown followed by its curves, embedded as base64."""
    body = []
    for name, text, png in sections:
        img = base64.b64encode(png).decode("ascii")
        body.append(f"<section>\n{markdown_html(text)}<figure><img alt=\"{html.escape(name)} curves\" "
                    f"src=\"data:image/png;base64,{img}\"></figure>\n</section>\n")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>sft-sweep report</title><style>{_CSS}</style></head>\n"
            "<body>\n<h1>sft-sweep report</h1>\n" + "".join(body) + "</body></html>\n")


def write_report(storage: Any, out_dir: Path, study_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``<study>.png`` and ``report.html`` (markdown rendered, PNGs embedded) under
    ``out_dir``; with several studies both open with the table of datasets and ``datasets.png``."""
    summaries = optuna.get_all_study_summaries(storage=storage)
    names = list(study_names) if study_names else [s.study_name for s in summaries]
    known = {s.study_name for s in summaries}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"--study {missing[0]!r} is not in the storage; studies there: {sorted(known) or 'none'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    md_parts, sections = [], []
    studies = [optuna.load_study(study_name=name, storage=storage) for name in names]
    if len(studies) > 1 and all(len(s.directions) == 1 for s in studies):  # a front has no one best trial
        text = datasets_section(studies, out_dir / "datasets.png")
        md_parts.append(text)
        sections.append(("datasets", text.rsplit("\n\n![", 1)[0], (out_dir / "datasets.png").read_bytes()))
    for name, study in zip(names, studies):
        text = study_report(study)
        png = plot_curves(study, out_dir / f"{name}.png")
        md_parts.append(text + f"\n\n![{name} curves]({png.name})\n")
        sections.append((name, text, png.read_bytes()))
    md = "# sft-sweep report\n\n" + "\n".join(md_parts)
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    (out_dir / "report.html").write_text(report_html(sections), encoding="utf-8")
    return {"markdown": out_dir / "summary.md", "html": out_dir / "report.html"}
