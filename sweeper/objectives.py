"""What a study optimises: the eval metric, or the metric and a cost (quality vs cost, two objectives).

    python train.py -m schedule.max_steps=20,40,80 'hydra.sweeper.direction=[minimize,minimize]' \
        hydra.sweeper.cost=steps          # the Pareto front of eval_loss vs optimizer steps

``hydra.sweeper.direction`` is hydra-optuna-sweeper's field: null (our default) takes the direction of
``eval.metric`` (:func:`sweeper.config.metric_direction`); one direction must agree with it (the objective here
is the best ``eval.metric`` of each run, so it cannot be flipped); a list of two makes the study multi-objective,
the metric first and then the trial's cost ``hydra.sweeper.cost`` (:data:`COSTS`: optimizer steps trained,
tokens seen, or GPU-seconds of training), which must be minimised. Optuna cannot prune a multi-objective study
(``Trial.report`` is single-objective), so there the pruner is off, and the trainer's early stopping still ends a
run early: :func:`pruning_note` says so once. :func:`values` is what the sweeper tells a finished trial;
:func:`write_results` writes hydra-optuna-sweeper's ``optimization_results.yaml`` into the study's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from sweeper import records
from sweeper.records import EVAL_CURVE

__all__ = ["COSTS", "EVAL_CURVE", "cost_of", "eval_curve", "record_curve", "directions", "is_multi", "pruning_note", "results", "values", "write_results"]

# cost name -> (trial user attr, unit); GPU-seconds: a trial trains on one GPU, so its training seconds
COSTS = {"steps": ("steps_trained", "optimizer steps"), "tokens": ("tokens_seen", "tokens"),
         "gpu_seconds": ("train_runtime_s", "GPU-seconds")}


def record_curve(trial: optuna.Trial, value: float, step: int) -> None:
    """Keep an evaluation of a multi-objective trial (which ``Trial.report`` refuses) in its ``eval_curve``
    system attr, for the report's noise estimate; a step reported again (a retry) keeps its first value."""
    tid = records.trial_id(trial)
    curve = list(records.frozen(trial.study, tid, fresh=True).system_attrs.get(EVAL_CURVE) or [])
    if all(s != step for s, _ in curve):
        records.set_system(trial.study, tid, EVAL_CURVE, [*curve, [int(step), float(value)]], fresh=True)


def eval_curve(t: optuna.trial.FrozenTrial) -> list[list[float]]:
    """A trial's evaluations: reported intermediate values, or a multi-objective trial's ``eval_curve``."""
    if t.intermediate_values:
        return [[s, v] for s, v in sorted(t.intermediate_values.items())]
    return [list(p) for p in t.system_attrs.get(EVAL_CURVE) or []]


def _plain(direction: Any) -> Any:
    from omegaconf import ListConfig, OmegaConf

    if isinstance(direction, ListConfig):
        return OmegaConf.to_container(direction, resolve=True)
    return direction


def directions(direction: Any, metric: str, metric_direction: str, cost: Any) -> list[str]:
    """The study's directions for ``hydra.sweeper.direction`` (None, a name, or a list of one or two), or a
    one-line ValueError. ``metric_direction``: the one ``eval.metric`` needs."""
    direction = _plain(direction)
    given = [] if direction is None else list(direction) if isinstance(direction, (list, tuple)) else [direction]
    given = [str(getattr(d, "name", d)).lower() for d in given]
    for d in given:
        if d not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction must be minimize, maximize or a list of two, but got {d!r}")
    if len(given) > 2:
        raise ValueError(f"hydra.sweeper.direction lists {len(given)} objectives, but a trial gives two at most: "
                         f"eval.metric and hydra.sweeper.cost; e.g. direction: [{metric_direction}, minimize]")
    if given and given[0] != metric_direction:
        raise ValueError(f"hydra.sweeper.direction={given[0]}, but the objective is eval.metric={metric}, which is "
                         f"{metric_direction[:-1]}ed; set direction: {metric_direction} (or drop it), or pick "
                         "another eval.metric")
    if len(given) == 2:
        if given[1] != "minimize":
            raise ValueError(f"hydra.sweeper.direction[1]={given[1]}, but the second objective is the trial's cost "
                             f"(hydra.sweeper.cost={cost}), which is minimised; write [{metric_direction}, minimize]")
        if cost not in COSTS:
            raise ValueError(f"hydra.sweeper.cost must be one of {', '.join(COSTS)}, but got {cost!r}")
    return given or [metric_direction]


def is_multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def pruning_note(pruner_name: Any) -> str:
    """The one line the start of a multi-objective sweep logs."""
    off = f"the pruner ({pruner_name}) is off for this study" if pruner_name not in (None, "none") else (
        "no trial is pruned")
    return (f"two objectives: Optuna cannot prune a multi-objective study (Trial.report takes one value), so "
            f"{off}; early stopping (eval.early_stopping_patience) still ends a run early")


def cost_of(attrs: dict, cost: str) -> float | None:
    """The trial's cost from its user attrs (None when the run did not record it)."""
    key, _ = COSTS[cost]
    value = attrs.get(key)
    return None if value is None else float(value)


def values(study: optuna.Study, attrs: dict, value: float, cost: str) -> float | list[float]:
    """What the sweeper tells a trial: its objective, or ``[objective, cost]`` for a two-objective study.
    Raises ValueError (one line) when the run recorded no cost."""
    if not is_multi(study):
        return value
    spent = cost_of(attrs, cost)
    if spent is None:
        key, unit = COSTS[cost]
        raise ValueError(f"the run recorded no {unit} ({key}), the second objective (hydra.sweeper.cost={cost})")
    return [value, spent]


def results(study: optuna.Study) -> dict | None:
    """hydra-optuna-sweeper's ``optimization_results.yaml`` content: ``name``, ``best_params`` and
    ``best_value``; for two objectives ``solutions``, the Pareto front's params and values. None before any
    trial completed."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return None
    out: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
    if is_multi(study):
        out["solutions"] = [{"number": t.number, "params": dict(t.params), "values": list(t.values)}
                            for t in sorted(study.best_trials, key=lambda t: t.values[1])]
    else:
        best = study.best_trial
        out["best_params"] = dict(best.params)
        out["best_value"] = best.value
    return out


def write_results(study: optuna.Study, folder: Path) -> Path | None:
    """Write :func:`results` to ``folder/optimization_results.yaml``; returns the path (None: nothing yet)."""
    from omegaconf import OmegaConf

    content = results(study)
    if content is None:
        return None
    path = Path(folder) / "optimization_results.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(content)), encoding="utf-8")
    return path
