"""Are a command's points distinct runs? Checked on the composed configs before any trial exists.

    python train.py -m schedule=choice(under,sweet) schedule.max_steps=10   # refused: one run, twice

A swept config group whose options a fixed override makes identical (``schedule=under,sweet
schedule.max_steps=10``: the presets differ only in ``max_steps``) would train the same run once per option
and rank the copies against each other. :func:`same_runs` gives the one line the sweep refuses it with before
any trial, naming the two points and the overrides that erase their difference (the same config twice, seed
included, measures no noise: vary ``seed`` for that). Pure apart from the ``compose`` callable it is given.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import optuna

from sweeper import identity
from sweeper.space import SweepSpace, value_text

__all__ = ["fixed_params", "same_runs"]


def _erasers(fixed: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The fixed overrides under ``keys``, each key's last (the one Hydra applies)."""
    last = {o.lstrip("+~").split("=", 1)[0]: o for o in fixed if any(o.lstrip("+~").startswith(k + ".") for k in keys)}
    return list(last.values())


def _line(a: str, b: str, keys: Sequence[str], fixed: Sequence[str]) -> str:
    by = _erasers(fixed, keys)
    why = f" ({' '.join(by)} sets what tells them apart)" if by else ""
    return (f"{a} and {b} compose the same run{why}: the sweep would train it once for each; sweep only one of "
            f"them, or drop {' '.join(by) if by else 'the override that makes them equal'}")


def _repeated(key: str, texts: Sequence[str], choice: bool = False) -> str:
    """The line for a value listed more than once on one axis (``schedule.max_steps=6,6``, ``lr=1e-3,0.001``;
    ``choice(a,a)`` with ``choice``)."""
    repeats = [t for t in dict.fromkeys(texts) if texts.count(t) > 1]
    once = ",".join(dict.fromkeys(texts))
    once = f"choice({once})" if choice and "," in once else once
    return (f"{key} lists {' and '.join(repeats)} more than once (values compared as parsed): the sweep would "
            f"train each copy; list each value once, e.g. {key}={once}")


def same_runs(space: SweepSpace, configs: Sequence[dict], compose: Callable[[list[str]], Any]) -> str | None:
    """The line saying that two grid points (``configs``: their :func:`sweeper.identity.run_config`, in
    :meth:`SweepSpace.grid_points` order) or two choices of a sampled ``choice(...)`` over a config group
    (composed with ``compose(overrides)``) are the same run; None when every point is its own. Points that learn
    the same but run differently (``speed=auto,plain``, ``batch=conservative,balanced``: the same effective batch)
    are their own runs: comparing how fast they run is a reason to sweep them."""
    points = space.grid_points()
    for j in range(len(configs)):
        for i in range(j):
            if configs[i] == configs[j]:
                diff = [k for k in points[i] if points[i][k][1] != points[j][k][1]]
                if not diff:  # the same override text twice: a value repeated on an axis
                    key = next(k for k, vals in space.grid if len({t for _, t in vals}) < len(vals))
                    return _repeated(key, [t for _, t in dict(space.grid)[key]])
                a = " ".join(f"{k}={points[i][k][1]}" for k in diff)
                b = " ".join(f"{k}={points[j][k][1]}" for k in diff)
                return _line(a, b, diff, space.fixed)
    for key, dist in space.distributions.items():
        if not isinstance(dist, optuna.distributions.CategoricalDistribution) or "." in key:
            continue
        seen: dict[str, str] = {}
        for value in dist.choices:
            try:
                cfg = compose(space.fixed + [f"{key}={value_text(value)}"])
            except Exception:  # a choice that does not compose fails its own trial
                continue
            flat = repr(sorted(identity.run_config(cfg).items()))
            if flat in seen and seen[flat] == value_text(value):
                return _repeated(key, [value_text(v) for v in dist.choices], choice=True)
            if flat in seen:
                return _line(f"{key}={seen[flat]}", f"{key}={value_text(value)}", [key], space.fixed)
            seen[flat] = value_text(value)
    return None


def fixed_params(config: dict, trials: Sequence[optuna.trial.FrozenTrial]
                 ) -> dict[str, tuple[Any, optuna.distributions.BaseDistribution]]:
    """The params a trial of a command that sweeps nothing records: the study's earlier trials' param names
    (``schedule.max_steps`` after a sweep over it), each at this trial's value in its result ``config``, with a
    distribution Optuna accepts beside the earlier ones (same kind and scale), so that the dashboard and
    ``status`` show what it ran and it ranks beside them. A name the config does not hold, or a categorical
    value outside the earlier choices, is left out."""
    out: dict[str, tuple[Any, optuna.distributions.BaseDistribution]] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            value = config.get(name)
            if name in out or value is None or isinstance(value, bool):
                continue
            if isinstance(dist, optuna.distributions.IntDistribution) and isinstance(value, int):
                if value >= 1 or not dist.log:
                    out[name] = (value, optuna.distributions.IntDistribution(value, value, log=dist.log))
            elif isinstance(dist, optuna.distributions.FloatDistribution) and isinstance(value, (int, float)):
                if value > 0 or not dist.log:
                    out[name] = (float(value), optuna.distributions.FloatDistribution(value, value, log=dist.log))
            elif isinstance(dist, optuna.distributions.CategoricalDistribution) and value in dist.choices:
                out[name] = (value, dist)
    return out
