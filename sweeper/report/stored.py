"""What a study holds, read back: a trial's attrs and curves, its schedule in words, its cost, the
overrides that ran it, the settings its trials differ in and the trials that ran the same ones. Reads storage only (Optuna's frozen trials);
how a trial is recorded comes from ``sweeper.storage`` (``SYSTEM_ATTRS``, ``is_branch``)."""

from __future__ import annotations

from typing import Sequence

import optuna

from sweeper import identity, plan, records
from sweeper.program import Program, this_process
from sweeper.storage import SYSTEM_ATTRS, is_branch

__all__ = ["LENGTH_PARAMS", "accuracy_off", "attrs", "best_trial", "branch_point", "cost", "curve_attr", "eval_curve",
           "like_with_like", "method", "overrides", "params_text", "schedule_label", "settings_note", "spent",
           "started", "trial_name", "trial_rows", "unswept_differences"]


def attrs(t: optuna.trial.FrozenTrial) -> dict:
    """A trial's results: its user attrs plus those kept as system attrs so that optuna-dashboard's
    attribute table stays readable (curves, ``sft_config``, ``plan``; user attrs in older studies)."""
    return {**{k: t.system_attrs[k] for k in SYSTEM_ATTRS if k in t.system_attrs}, **t.user_attrs}


def curve_attr(t: optuna.trial.FrozenTrial, name: str) -> list:
    """A trial's stored curve ``[[step, value], ...]``."""
    return attrs(t).get(name) or []


def eval_curve(t: optuna.trial.FrozenTrial) -> list[list[float]]:
    """The objective's curve: the trial's intermediate values as ``[[step, value], ...]`` in step order."""
    return [[s, v] for s, v in sorted(t.intermediate_values.items())]


def params_text(params: dict) -> str:
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


def schedule_label(t: optuna.trial.FrozenTrial) -> str | None:
    """What to call a trial's schedule: the ``schedule`` group choice (``sweet``), unless its length
    was set by hand, then ``max_steps=N``: a swept ``schedule.max_steps`` param, or a ``max_steps``
    other than the preset of a choice the sweep did not sweep (the default ``sweet`` under
    ``schedule.max_steps=600``; the presets' lengths come from :func:`sweeper.plan.preset_max_steps`).
    A swept choice (``schedule=under,over``) stays the label, being the grid's own coordinate; WSD
    trials keep ``wsd_search``. The length is always its own column."""
    a = attrs(t)
    choice = a.get("choices", {}).get("schedule", t.params.get("schedule"))
    steps = a.get("max_steps")
    if steps is None or method(t) == "wsd":
        return choice
    by_hand = "schedule.max_steps" in t.params or (
        choice is not None and "schedule" not in t.params and plan.preset_max_steps(choice) not in (None, steps))
    return f"max_steps={steps}" if by_hand else choice


def trial_name(t: optuna.trial.FrozenTrial) -> str:
    """``max_steps=600``, ``under (500 steps)``, plus any other swept param: a trial in one phrase."""
    label, steps = schedule_label(t), t.user_attrs.get("max_steps")
    name = label or f"trial {t.number}"
    if steps is not None and not name.startswith("max_steps="):
        name += f" ({steps} steps)"
    extra = {k: v for k, v in t.params.items() if k not in ("schedule", "schedule.max_steps", "max_steps", "method")}
    return name + (" " + params_text(extra) if extra else "")


def trial_rows(study: optuna.Study) -> list[dict]:
    """One dict per trial of the study, in trial order: the columns of the report's table."""
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
    """Optuna's best trial of a one-objective study; None before any trial completed."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


def branch_point(t: optuna.trial.FrozenTrial) -> int | None:
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


def cost(t: optuna.trial.FrozenTrial) -> tuple[int | None, int | None, float | None]:
    """What a trial cost: optimizer steps trained (its early stop or max_steps), tokens (``tokens_seen``, or
    the plan's tokens per step × steps) and measured training seconds (``train_runtime_s``, else
    ``timing.job_s``; None for a WSD trial, whose own time is a cooldown, not a run of its length)."""
    a = attrs(t)
    steps = a.get("stopped_early_step") or a.get("max_steps")
    tps = (a.get("plan") or {}).get("tokens_per_step")
    tokens = a.get("tokens_seen") or (round(tps * steps) if tps and steps else None)
    seconds = None if method(t) == "wsd" else (a.get("train_runtime_s") or (a.get("timing") or {}).get("job_s"))
    return steps, tokens, seconds


def spent(study: optuna.Study) -> tuple[float, str]:
    """Seconds the study's trials took (each job's ``timing.job_s``, else its ``train_runtime_s``; a WSD
    branch's time is inside its trunk's job) and on what: ``GPU`` when any trial used one, else ``CPU``."""
    jobs = [attrs(t) for t in study.get_trials(deepcopy=False) if not is_branch(t)]
    seconds = sum((a.get("timing") or {}).get("job_s") or a.get("train_runtime_s") or 0.0 for a in jobs)
    return seconds, "GPU" if any(a.get("peak_gpu_gib") is not None for a in jobs) else "CPU"


def overrides(best: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """The overrides that ran ``best`` besides its schedule (a WSD branch: its trunk's), which a follow-up
    command repeats; none for trials recorded before the sweeper stored them."""
    found = best.system_attrs.get(records.OVERRIDES)
    trunk = attrs(best).get("branch_of")
    if found is None and trunk is not None:
        found = next((t.system_attrs.get(records.OVERRIDES) for t in trials if t.number == trunk), None)
    return list(found or [])


def started(best: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial]) -> Program:
    """How the sweep that ran ``best`` was started (a WSD branch: its trunk's), which a follow-up command
    starts with; for trials recorded before the sweeper stored it, this process's program."""
    found = Program.from_record(best.system_attrs.get(records.COMMAND))
    trunk = attrs(best).get("branch_of")
    if found is None and trunk is not None:
        found = next((Program.from_record(t.system_attrs.get(records.COMMAND)) for t in trials if t.number == trunk),
                     None)
    return found or this_process()


# the params that are a trial's length itself (its schedule), not a setting it ran with
LENGTH_PARAMS = ("schedule", "schedule.max_steps", "max_steps", "method")


def _config(t: optuna.trial.FrozenTrial) -> dict:
    return records.config_of(t) or {}


def unswept_differences(trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """The unswept settings (config keys, not a param's and not searched) whose values differ among the trials
    that recorded their config (added with ``hydra.sweeper.allow_config_change=true``), sorted."""
    trials = [t for t in trials if "config" in t.system_attrs]
    params = {k for t in trials for k in t.params}
    return sorted(k for k in identity.varying([t.system_attrs["config"] for t in trials])
                  if not k.startswith(identity.SEARCHED) and k not in params
                  and not any(k.startswith(p + ".") for p in params))


def settings_note(study: optuna.Study) -> str | None:
    """Which trials ran which settings, when a study holds trials whose unswept settings differ (added
    with ``hydra.sweeper.allow_config_change=true``); None when every trial ran the same ones."""
    trials = [t for t in study.get_trials(deepcopy=False) if "config" in t.system_attrs]
    keys = unswept_differences(trials)
    if not keys:
        return None
    groups: dict[str, list[int]] = {}
    for t in trials:
        label = " ".join(f"{k}={t.system_attrs['config'].get(k)}" for k in keys)
        groups.setdefault(label, []).append(t.number)
    parts = [f"{label} for trial(s) {', '.join(map(str, nums))}" for label, nums in groups.items()]
    return "Settings differ between trials (added with hydra.sweeper.allow_config_change=true): " + "; ".join(parts)


def like_with_like(best: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial]
                   ) -> tuple[list[optuna.trial.FrozenTrial], str | None]:
    """The ``trials`` that ran ``best``'s settings besides their length, so that lengths are compared like with
    like: the same swept params other than the schedule (:data:`LENGTH_PARAMS`; a learning rate, a dataset
    option; a trial that ran a swept key as a fixed setting, e.g. a follow-up at the best learning rate, by its
    recorded config) and the same unswept settings (:func:`unswept_differences`; a trial without a recorded config is
    judged by its params). Returns them and the one line that says which settings they share and which
    trials were left out (None when none was)."""
    params = sorted({k for t in trials for k in t.params if k not in LENGTH_PARAMS})
    unswept = unswept_differences(trials)

    def setting(t: optuna.trial.FrozenTrial, k: str):  # its param, else (a follow-up that fixed it) its config's
        return t.params[k] if k in t.params else (_config(t) or {}).get(k)

    def same(t: optuna.trial.FrozenTrial) -> bool:
        if any(repr(setting(t, k)) != repr(setting(best, k)) for k in params):
            return False
        mine, theirs = _config(best), _config(t)
        return not (mine and theirs) or all(repr(mine.get(k)) == repr(theirs.get(k)) for k in unswept)

    kept = [t for t in trials if same(t)]
    out = [t.number for t in trials if not same(t)]
    if not out:
        return kept, None
    shared = [f"{k}={setting(best, k)}" for k in params] + [f"{k}={_config(best).get(k)}" for k in unswept]
    return kept, (f"Like with like: lengths are compared only among the trials that ran the winner's settings "
                  f"({' '.join(shared)}: trial(s) {', '.join(str(t.number) for t in kept)}); trial(s) "
                  f"{', '.join(map(str, out))} ran other settings and are left out of the comparison.")


def accuracy_off(study: optuna.Study) -> str | None:
    """Why the task metric was not measured (``accuracy`` attr of the trials), when it was not."""
    whys = []
    for t in study.get_trials(deepcopy=False):
        d = t.user_attrs.get("accuracy") or {}
        if d.get("on") is False and d.get("why") and d["why"] not in whys:
            whys.append(d["why"])
    return "; ".join(whys) or None
