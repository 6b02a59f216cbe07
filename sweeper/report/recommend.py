"""The step count to recommend for a study (:func:`recommend`): the best trial's length, why, and the notes
that qualify it: its curve, the train/eval gap, the loss and task-metric steps, where it sits among the
lengths tried (the next grid to run), a WSD trunk's own state that did better than every trial (a constant-LR
run of that length), the shortest length within noise and the noise itself."""

from __future__ import annotations

from typing import Sequence

import optuna

from sweeper import advice, generalisation, records, trunk_stop
from sweeper.report.commands import Target, grid_command, one_run
from sweeper.report.curves import DECAYING, Diagnosis, noise_estimate, trial_diagnosis, trial_noise
from sweeper.report.stored import (
    attrs,
    best_trial,
    branch_point,
    cost,
    curve_attr,
    eval_curve,
    like_with_like,
    method,
    overrides,
    schedule_label,
    started,
    trial_name,
)
from sweeper.report.text import code, escape, si

__all__ = ["INSIDE", "recommend"]


# A best step in the first two thirds of its run is "well inside" it: the run went on for a third without
# improving on it, while a cosine LR was still above a quarter of its peak (later, a flat curve is the decay).
INSIDE = 2 / 3


def _grid(values: Sequence[float], unit: int) -> list[int]:
    """Step counts rounded to multiples of ``unit`` (the evaluation interval), at least one unit, sorted."""
    return sorted({max(unit, unit * round(v / unit)) for v in values})


def recommend(study: optuna.Study, storage: str | None = None) -> dict | None:
    """The step count to train this dataset for: the best COMPLETE trial's ``max_steps``, with the reason
    (``reason``, one paragraph) and what qualifies it (``notes``, one line each): its curve's diagnosis;
    which trials it is compared with (those that ran its settings: :func:`sweeper.report.stored.like_with_like`);
    whether it is at an edge of the lengths tried (then the next grid to run, a command naming this study and
    ``storage``, the URL its trials are in; None: the default storage); where its best step lies well inside
    the run, how to get that model; a WSD trunk's state before its cooldown that did better than the winner, and
    the constant-LR run that trains it (``trunk_state``: :func:`_trunk_state`, None when none did); the shortest
    length within noise of it and its cost; the noise and how it was measured. None when no trial completed.
    Running trials are never compared: only COMPLETE ones."""
    best = best_trial(study)
    if best is None:
        return None
    metric = study.user_attrs.get("metric", "value")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    target = Target.of(study.study_name, storage)
    noise = trial_noise(best, maximize)
    done, like = like_with_like(best, [t for t in study.get_trials(deepcopy=False, states=(
        optuna.trial.TrialState.COMPLETE,)) if t.value is not None])
    trials, _ = like_with_like(best, study.get_trials(deepcopy=False))
    d = trial_diagnosis(best)
    lengths = _length_notes(best, d, done, maximize, trials, target)
    notes = [f"Its curve (trial {best.number}): {d.verdict}: {d.reason}.", *([like] if like else []),
             *_generalisation(best, metric), *_metric_steps(best, metric), *(n for n, _ in lengths)]
    state = _trunk_state(best, trials, maximize)
    if state is not None:
        notes.append(state["note"])
    close = _shortest_within_noise(best, done, maximize)
    if close is not None:
        notes.append(_within_noise(best, *close))
    notes.append(f"Noise ±{noise.sigma:.4f} near its best ({noise.sigma / max(abs(best.value), 1e-8):.1%}; method: "
                 f"{noise.method}); two results are within noise when they differ by at most twice the larger "
                 "noise of their two curves.")
    if target.password_left_out and any(c for _, c in lengths):
        notes.append("The commands name the storage without its password: set PGPASSWORD (or use ~/.pgpass) "
                     "before pasting them.")
    a = attrs(best)
    joint = a.get("learning_rate", (a.get(records.WSD_TRUNK) or {}).get("lr"))  # a joint search's learning rate
    return {"trial": best.number, "max_steps": a.get("max_steps"), "best_step": a.get("best_step"),
            "value": best.value, "learning_rate": float(joint) if joint is not None else None,
            "diagnosis": d, "reason": _reason(best, done, metric), "notes": notes, "noise": noise,
            "within_noise": close[0] if close else None, "trunk_state": state,
            "verdict": _verdict(best, d, lengths, close, state)}


def _reason(best: optuna.trial.FrozenTrial, done: Sequence[optuna.trial.FrozenTrial], metric: str) -> str:
    """The recommendation's paragraph: the winner's length and value, how it ran (early stop, WSD), the
    others it was compared with (``done``)."""
    a = attrs(best)
    steps, wsd = a.get("max_steps"), method(best) == "wsd"
    label = schedule_label(best)
    reason = (f"max_steps={steps}" + (f" (schedule={escape(label)})" if label and label != f"max_steps={steps}" else "")
              + f" reached the lowest {metric}, {best.value:.4f}"
              + (f", at step {a['best_step']}" if a.get("best_step") is not None else ""))
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
                   f"({code(one_run(steps, overrides(best, done), ' lr.lr_scheduler_type=cosine', started(best, done)))}): how close "
                   "cosine comes to WSD at equal length depends on the LR")
    others = [f"{escape(trial_name(t))}: {t.value:.4f}" for t in done if t.number != best.number]
    if others:
        reason += "; the others: " + ", ".join(others)
    return reason + "."


def _verdict(best: optuna.trial.FrozenTrial, d: Diagnosis, lengths: Sequence[tuple[str, str | None]],
             close: tuple[optuna.trial.FrozenTrial, float] | None, state: dict | None = None) -> str:
    """The recommendation in one line of markdown, for the table of datasets: the winner's diagnosis and length,
    the next grid to run when the best may lie outside (or between) the lengths tried (``lengths``: the notes
    of :func:`_length_notes` with their commands), a WSD trunk's state that did better (``state``:
    :func:`_trunk_state`) with the run that trains it, and a shorter length within noise with its share of the
    cost."""
    parts = [f"{d.verdict}: train max_steps={best.user_attrs.get('max_steps')}"]
    for note, command in lengths:
        kind, _, rest = note.partition(": ")
        if kind == "Edge of the grid" and command:
            parts.append(("longer may be better" if "longer" in rest else "shorter may do as well")
                         + f", try {code(command)}")
        elif kind == "Between lengths" and command:
            parts.append(f"the best lies between two lengths tried, try {code(command)}")
    if state is not None:
        parts.append(f"a WSD trunk at constant LR did better at step {state['step']} ({state['value']:.4f}), "
                     f"try {code(state['command'])}")
    if close is not None:
        c = close[0]
        (s1, _, _), (s0, _, _) = cost(c), cost(best)
        parts.append(f"max_steps={c.user_attrs.get('max_steps')} is within noise"
                     + (f" for {s1 / s0:.0%} of the steps" if s1 and s0 else ""))
    return "; ".join(parts)


def _trunk_state(best: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial],
                 maximize: bool) -> dict | None:
    """The best state of a WSD trunk among ``trials`` (those that ran the winner's settings) before its own
    cooldown (:func:`sweeper.trunk_stop.trunk_best` of its curve up to its branch point), when it did better
    than the winner ``best``: {trial, step, value, within_noise, command, note}. A trunk's state at step t is
    a t-step run at constant LR after the search's warmup, measured like any checkpoint a run keeps; the
    search keeps no checkpoint of it, so the command trains that run. None when no trunk did better."""
    sign = -1.0 if maximize else 1.0
    found = []
    for t in trials:
        if method(t) != "wsd" or records.is_branch(t) or t.state not in (optuna.trial.TrialState.COMPLETE,
                                                                         optuna.trial.TrialState.PRUNED):
            continue
        tb = trunk_stop.trunk_best(eval_curve(t), branch_point(t), maximize)
        if tb is not None and sign * (tb[1] - best.value) < 0:
            found.append((sign * tb[1], t.number, tb, t))
    if not found:
        return None
    _, number, (step, value), trunk = min(found)
    a = attrs(trunk)
    warmup = (a.get("wsd") or {}).get("warmup_steps")
    extra = " lr.lr_scheduler_type=constant_with_warmup" + (f" lr.warmup_steps={warmup}" if warmup is not None else "")
    settings = [o for o in overrides(trunk, trials) if not o.startswith(("lr.lr_scheduler_type=", "lr.warmup_steps="))]
    command = one_run(step, settings, extra, started(trunk, trials))
    sigma = max(trial_noise(trunk, maximize).sigma, trial_noise(best, maximize).sigma)
    within = abs(value - best.value) <= 2 * sigma
    note = (f"The trunk's own state: the WSD trunk (trial {number}) reached {value:.4f} at step {step}, at constant "
            f"LR before any cooldown, better than the winner's {best.value:.4f} "
            f"({(value - best.value) / max(abs(best.value), 1e-8):+.1%}, "
            + ("within" if within else "beyond") + f" noise: {'at most' if within else 'more than'} twice "
            f"±{sigma:.4f}, the larger noise of the two curves"
            + f"). That model is a {step}-step run at constant LR"
            + (f" after a {warmup}-step warmup" if warmup is not None else "")
            + f"; the search keeps no checkpoint of it: to train it, run {code(command)}.")
    return {"trial": number, "step": step, "value": value, "within_noise": within, "command": command, "note": note}


def _own(t: optuna.trial.FrozenTrial, curve: Sequence[Sequence[float]]) -> list:
    """The part of ``curve`` that is ``t``'s own result: a WSD trial's evaluations after its branch point (its
    cooldown: the trunk's states before it are not its result, as its value says), any other trial's whole curve."""
    p = branch_point(t)
    return [list(x) for x in curve if p is None or x[0] > p]


def _generalisation(t: optuna.trial.FrozenTrial, metric: str) -> list[str]:
    """The train/eval gap line of :mod:`sweeper.generalisation` for ``t`` (its eval-loss curve: the objective's
    when it is ``eval_loss``, else the ``loss_curve`` stored beside it; a WSD trial's cooldown part), or none."""
    a = attrs(t)
    loss = _own(t, eval_curve(t) if metric == "eval_loss" else (a.get("loss_curve") or []))
    g = generalisation.gap(loss, curve_attr(t, "train_curve"), noise_estimate([loss]).sigma) if loss else None
    per_step = (a["epochs_trained"] / a["steps_trained"]) if a.get("epochs_trained") and a.get("steps_trained") else None
    return [generalisation.note(g, per_step)] if g else []


def _metric_steps(t: optuna.trial.FrozenTrial, metric: str) -> list[str]:
    """The line of :func:`sweeper.advice.metric_steps` when a task metric is on: the objective itself (its
    curve and the eval loss kept beside it), else label accuracy or TRL's mean token accuracy beside the loss;
    a WSD trial's cooldown part of each (:func:`_own`)."""
    a = attrs(t)
    own = _own(t, eval_curve(t))
    if metric != "eval_loss":
        line = advice.metric_steps(metric, _own(t, a.get("loss_curve") or []), metric, own)
    elif a.get("accuracy_curve"):
        line = advice.metric_steps(metric, own, "eval_accuracy", _own(t, a["accuracy_curve"]))
    else:
        line = advice.metric_steps(metric, own, "eval_mean_token_accuracy", _own(t, a.get("token_accuracy_curve") or []))
    return [line] if line else []


def _peaks(trials: Sequence[optuna.trial.FrozenTrial], maximize: bool) -> list[int]:
    """Where curves peaked inside their runs (:func:`sweeper.advice.peak`): a WSD trial's trunk before its
    branch point (a stopped trunk's too), a cosine run's best step before its end."""
    found = [advice.peak(eval_curve(t), branch_point(t) if method(t) == "wsd" else None, maximize) for t in trials
             if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    return sorted({m for m in found if m is not None})


def _length_notes(best: optuna.trial.FrozenTrial, d: Diagnosis, done: Sequence[optuna.trial.FrozenTrial],
                  maximize: bool, trials: Sequence[optuna.trial.FrozenTrial] = (), target: Target | None = None
                  ) -> list[tuple[str, str | None]]:
    """Where the winner's length sits among the lengths tried (``max_steps`` of the COMPLETE trials ``done``)
    and what to run next: above the longest when it won with its best late in its run (not when its best
    came well inside it: see :data:`INSIDE`; nor when a WSD trunk of ``trials`` trained past it and its search
    stopped it: :func:`_stopped_trunk`), below the shortest when it won, between the winner and the
    next longer length when the winner was still falling; and, when the best step is well inside the
    run, how to get that model (:func:`_inside_note`). The grids are rounded to the winner's ``eval_steps``;
    their commands name ``target``. Each note with the grid command it proposes (None: none)."""
    a = attrs(best)
    steps, b_step, wsd = a.get("max_steps"), a.get("best_step"), method(best) == "wsd"
    lengths = sorted({t.user_attrs["max_steps"] for t in done if t.user_attrs.get("max_steps")})
    if not steps or not lengths:
        return []
    unit = int((a.get("sft_config") or {}).get("eval_steps") or 1)
    tried = "/".join(map(str, lengths))
    measured: dict[int, float] = {}  # length -> its best value in the study
    for t in done:
        n = t.user_attrs.get("max_steps")
        if n and (n not in measured or (t.value > measured[n] if maximize else t.value < measured[n])):
            measured[int(n)] = t.value
    inside = bool(b_step and b_step < steps and not wsd
                  and (b_step <= INSIDE * steps or a.get("stopped_early_step") or d.verdict == "over-trained"))
    notes: list[tuple[str, str | None]] = []

    def command(grid: Sequence[int]) -> str:
        return grid_command(grid, wsd, overrides(best, done), target, started(best, done))

    stopped = _stopped_trunk(trials, steps)
    if steps == lengths[-1]:
        which = f"the only length tried ({steps})" if len(lengths) == 1 else f"the longest tried ({tried})"
        if stopped is not None and not inside:
            t, last = stopped
            notes.append((f"Not an edge of the grid: the best length is {which}, but the WSD search's trunk (trial "
                          f"{t.number}) trained on to step {last} and stopped: {escape(records.stopped_reason_of(t))}; "
                          "longer runs will not help.", None))
        elif inside:
            notes.append((f"Not an edge of the grid: the best length is {which}, but its best came at step "
                          f"{b_step}, well inside the run: longer runs will not help.", None))
        else:
            when = ("at the end of its run" if b_step == steps else f"late in its run (step {b_step} of {steps})"
                    if b_step is not None else "at a step it did not record")
            run = command(advice.prune_measured(_grid([steps, 1.5 * steps, 2 * steps], unit), measured, best.value,
                                                maximize))
            notes.append((f"Edge of the grid: the best length is {which} and its best came {when}, so longer may "
                          f"be better still: run {code(run)}.", run))
    if len(lengths) > 1 and steps == lengths[0] and d.verdict != "under-trained":
        run = command(advice.prune_measured(_grid([steps / 4, steps / 2, steps], unit), measured, best.value, maximize))
        notes.append((f"Edge of the grid: the best length is the shortest tried ({tried}): a shorter run may do as "
                      f"well: run {code(run)}.", run))
    if d.verdict == "under-trained" and steps != lengths[-1]:
        longer = min(n for n in lengths if n > steps)
        there = (max if maximize else min)(t.value for t in done if t.user_attrs.get("max_steps") == longer)
        grid, m = advice.between(steps, longer, unit, measured, best.value, _peaks(trials or done, maximize), maximize)
        falling = "its trunk was still falling at its branch point" if wsd else "its curve was still falling at its end"
        near = f"; a curve of the study peaked at step {m}, so the grid is narrowed around it" if m else ""
        run = command(grid) if grid else None
        notes.append((f"Between lengths: {falling}, but max_steps={longer} reached only {there:.4f}: the best "
                      f"length lies between {steps} and {longer}{near}: "
                      + (f"run {code(run)}." if run else "every length between them on the evaluation grid is "
                                                          "measured already."), run))
    if inside:
        notes.append((_inside_note(best, d, done), None))
    return notes


def _stopped_trunk(trials: Sequence[optuna.trial.FrozenTrial], steps: int) -> tuple[optuna.trial.FrozenTrial, int] | None:
    """A WSD trunk among ``trials`` that trained past ``steps`` and was stopped by its search's rules (PRUNED
    with a ``stopped_reason``: no later branch could win, or longer branches were worse), with its last
    evaluated step: the search's own verdict that lengths beyond it will not help. None when there is none."""
    found = []
    for t in trials:
        if (method(t) == "wsd" and not records.is_branch(t) and t.state == optuna.trial.TrialState.PRUNED
                and records.stopped_reason_of(t) and t.intermediate_values and max(t.intermediate_values) > steps):
            found.append((max(t.intermediate_values), t.number, t))
    if not found:
        return None
    last, _, t = min(found)
    return t, last


def _inside_note(best: optuna.trial.FrozenTrial, d: Diagnosis, done: Sequence[optuna.trial.FrozenTrial]) -> str:
    """The winner's best step came well inside its run: why, the checkpoint that holds that model, and one run
    of that length to confirm it."""
    a = attrs(best)
    if a.get("stopped_early_step"):
        why = f"early stopping ended it at step {a['stopped_early_step']}"
    elif d.verdict == "over-trained":
        why = "the curve turned up after it"
    else:
        why = "the rest of the run did not improve on it"
    ckpt = a.get("best_checkpoint")
    decays = (a.get("sft_config") or {}).get("lr_scheduler_type") in DECAYING
    return (f"Best step inside the run: step {a.get('best_step')} of {a.get('max_steps')} ({why}); "
            + (f"that model is the best checkpoint kept, {code(str(ckpt))}; " if ckpt else "")
            + "to train for that length, confirm it with one run: "
            + code(one_run(a.get("best_step"), overrides(best, done), program=started(best, done)))
            + (" (with its own LR decay it may end lower)" if decays else "") + ".")


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
    (s1, k1, x1), (s0, k0, x0) = cost(c), cost(best)
    parts = [f"{s1:,} vs {s0:,} steps"]
    if k1 and k0:
        parts.append(f"{si(k1)} vs {si(k0)} tokens")
    if x1 and x0:
        parts.append(f"{x1:,.0f} s vs {x0:,.0f} s of training")
    return (f"Within noise: {escape(trial_name(c))} reached {c.value:.4f}, within noise of the best {best.value:.4f} at "
            f"max_steps={steps} ({(c.value - best.value) / max(abs(best.value), 1e-8):+.1%}, noise "
            f"±{sigma:.4f}), for "
            f"{s1 / s0:.0%} of the cost ({', '.join(parts)}).")


