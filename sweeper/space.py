"""Hydra's sweep grammar -> an Optuna search space: pure translation of parsed overrides, table-tested.

    python train.py -m schedule=under,sweet,over                      # a 3-point grid
    python train.py -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra.sweeper.n_trials=6

Translated exactly (:func:`translate`, one override; :func:`build_space`, a command's):

- ``a,b,c`` (comma list, also ``glob(...)``) is a **grid** axis: every combination once, in order.
- ``choice(a,b)`` -> categorical; ``range(start,stop,step)`` -> integers with the stop **excluded**
  (Hydra's rule; hydra-optuna-sweeper included it, so :func:`range_note` gives the start line naming the
  values tried); a float range -> a stepped float over its points, computed in decimal so that float drift
  never lets the stop in; a descending, empty or zero-step range is refused in one line;
  ``shuffle(range(...))`` -> categorical;
  ``interval(lo,hi)`` -> float in [lo, hi]; ``int(interval(lo,hi))`` or ``tag(int, interval(...))`` ->
  integers in [lo, hi]; ``tag(log, ...)`` -> log scale; ``tag(float, range(...))`` -> a stepped float and
  ``tag(float, interval(1,10))`` -> floats; any other tag, or a tag on a choice, is refused in one line
  (:data:`TAGS`). With ``grid_sampler`` (``sampler.name=grid``)
  choice and range become grid axes instead, and an interval is refused.
- :func:`exhaust_finite`: a sampled space of finite points no larger than ``n_trials`` becomes a grid, so
  each point runs once (a sampler would repeat points of a 2-point space). Its axes keep the distribution the
  sampled form records (:attr:`SweepSpace.sampled_as`), and so do choice and range under the grid sampler: a
  re-run of the same space with another ``n_trials`` continues the study, whichever form each run took.
- :func:`untried`: in a finite space too large to run as a grid, a sampler's draw of a point already trained
  moves to the next point not yet trained, so that no point trains twice while others have not.
- Anything else is a fixed override, passed unchanged to every job.

:meth:`SweepSpace.grid_distributions` says how grid values are recorded as Optuna params;
:func:`same_value` says when two recorded values are one point; :func:`value_text` and :func:`quote` write values
back as override text. Imports Optuna's distributions and Hydra's override types (inside :func:`translate`); no
storage, no study.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import optuna

__all__ = ["TAGS", "SweepSpace", "build_space", "distribution_text", "exhaust_finite", "finite_size", "finite_values", "quote", "range_note",
           "same_value", "translate", "untried", "value_text"]


@dataclass
class SweepSpace:
    """What a multirun's overrides mean for the study."""

    fixed: list[str] = field(default_factory=list)  # overrides passed unchanged to every job
    grid: list[tuple[str, list[tuple[Any, str]]]] = field(default_factory=list)  # key -> [(value, override text)]
    distributions: dict[str, optuna.distributions.BaseDistribution] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # lines the start of a sweep logs once (a range's stop rule)
    # grid axes that stand for a choice or range (a finite sampled space run as a grid, or the grid sampler's): the
    # distribution its sampled form records, so that both forms record the param alike (grid_distributions)
    sampled_as: dict[str, optuna.distributions.BaseDistribution] = field(default_factory=dict)

    def grid_points(self) -> list[dict[str, tuple[Any, str]]]:
        if not self.grid:
            return [{}]
        keys = [k for k, _ in self.grid]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in self.grid))]

    def grid_distributions(self, group_options: Any = None,
                           recorded: dict[str, optuna.distributions.BaseDistribution] | None = None,
                           ) -> dict[str, optuna.distributions.BaseDistribution]:
        """Distributions that record grid values as Optuna params.

        Optuna forbids a categorical param from changing its choices within a study, yet a user
        extends a grid (``under,sweet`` then ``under,sweet,over``). So numbers are recorded on an
        int/float range (whose bounds may change), and config-group choices on the group's full
        option list; other values on the list given. An axis that stands for a choice or range
        (:attr:`sampled_as`) is recorded under that distribution, as a sampled run of it records its draws, so that
        either form continues the other's study. ``recorded``: the distribution the study already records each key
        under; an axis whose distribution could not join it takes one that holds its values and can (the plain
        grid's, or the recorded one), so that a study recorded by an earlier form of the space goes on.
        """
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for key, vals in self.grid:
            values = [v for v, _ in vals]
            options = [self.sampled_as[key]] if key in self.sampled_as else []
            options.append(_plain_grid(key, values, group_options))
            old = (recorded or {}).get(key)
            if old is not None:
                options.append(_holding(old, values))
                options = [d for d in options if d is not None and _compatible(old, d)] or options
            out[key] = options[0]
        return out


def _plain_grid(key: str, values: list[Any], group_options: Any) -> optuna.distributions.BaseDistribution:
    """A comma list's distribution (:meth:`SweepSpace.grid_distributions`)."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return optuna.distributions.IntDistribution(min(values), max(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return optuna.distributions.FloatDistribution(float(min(values)), float(max(values)))
    options = group_options(key) if group_options else None
    choices = options if options and set(values) <= set(options) else values
    return optuna.distributions.CategoricalDistribution(choices)


def _holding(old: optuna.distributions.BaseDistribution, values: list[Any]) -> optuna.distributions.BaseDistribution | None:
    """A distribution of ``old``'s kind and scale that holds ``values``, or None: ``old`` itself for a categorical
    whose choices hold them all, else an int/float range over them."""
    D = optuna.distributions
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if isinstance(old, D.CategoricalDistribution):
        return old if all(v in old.choices for v in values) else None
    if not numbers or (old.log and min(values) <= 0):
        return None
    if isinstance(old, D.IntDistribution):
        return D.IntDistribution(min(values), max(values), log=old.log) if all(isinstance(v, int) for v in values) else None
    return D.FloatDistribution(float(min(values)), float(max(values)), log=old.log)


def _compatible(old: optuna.distributions.BaseDistribution, new: optuna.distributions.BaseDistribution) -> bool:
    try:
        optuna.distributions.check_distribution_compatibility(old, new)
    except ValueError:
        return False
    return True


def finite_values(dist: optuna.distributions.BaseDistribution) -> Sequence[Any] | None:
    """Every value ``dist`` can give, ascending where ordered, or None for a continuous one (an int range as a
    ``range``, so that ``int(interval(1,1000000000))`` is counted, not listed)."""
    D = optuna.distributions
    if isinstance(dist, D.CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, D.IntDistribution):
        return range(dist.low, dist.high + 1, dist.step)
    if isinstance(dist, D.FloatDistribution) and (dist.step is not None or dist.low == dist.high):
        from decimal import Decimal

        if dist.low == dist.high:
            return [dist.low]
        n = int((Decimal(str(dist.high)) - Decimal(str(dist.low))) / Decimal(str(dist.step)))
        return [float(Decimal(str(dist.low)) + i * Decimal(str(dist.step))) for i in range(n + 1)]
    return None


def finite_size(space: SweepSpace) -> int | None:
    """How many points a sampled space has, its grid's included (:func:`finite_values` of each distribution), or
    None when it samples nothing or a distribution is continuous."""
    values = [finite_values(d) for d in space.distributions.values()]
    if not values or any(v is None for v in values):
        return None
    return math.prod(len(v) for v in values) * (len(space.grid_points()) if space.grid else 1)


def exhaust_finite(space: SweepSpace, n_trials: int) -> tuple[SweepSpace, str | None]:
    """A sampled space with at most ``n_trials`` points, all finite (choice, range, stepped floats): its
    points as grid axes instead, so each runs once and the sweep stops when they are done (a sampler asked
    for ``n_trials`` draws of a 2-point space repeats points). Each axis keeps its distribution
    (:attr:`SweepSpace.sampled_as`), which the study records its points under, as the sampled form records its
    draws: a re-run with fewer trials samples the same study, and one with more counts the points the sampled
    runs trained as done (``sweeper.sweep.queue.matches``). Returns the space and the line that says so, or the
    space unchanged and None."""
    size = finite_size(space)
    if size is None or size > n_trials:
        return space, None
    values = {k: finite_values(d) for k, d in space.distributions.items()}
    grid = space.grid + [(k, [(x, value_text(x)) for x in v]) for k, v in values.items()]
    keys = ", ".join(sorted(space.distributions))
    note = (f"the sampled space ({keys}) has {size} point(s), no more than n_trials={n_trials}: each runs once, "
            "as a grid, and the sweep stops when they are done (a sampler would repeat points; points the study "
            "has trained already count as done)")
    return SweepSpace(fixed=list(space.fixed), grid=grid, distributions={}, notes=[*space.notes, note],
                      sampled_as={**space.sampled_as, **space.distributions}), note


def same_value(a: Any, b: Any) -> bool:
    """Whether two values of one key are one point: equal, or two numbers a float's rounding apart (a sampler's
    0.15000000000000002 on ``range(0.05,0.2,0.05)`` is the grid's 0.15)."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _position(dist: optuna.distributions.BaseDistribution, axis: Sequence[Any], value: Any) -> int | None:
    """Where ``value`` lies on ``axis`` (:func:`finite_values` of ``dist``), or None when it is not one of its points."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution) or len(axis) == 1:
        return next((j for j, v in enumerate(axis) if same_value(v, value)), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    j = round((value - axis[0]) / (axis[1] - axis[0]))  # ascending, one step apart
    return j if 0 <= j < len(axis) and same_value(axis[j], value) else None


def untried(dists: dict[str, optuna.distributions.BaseDistribution], drawn: dict[str, Any],
            tried: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The point of the finite space ``dists`` (each with :func:`finite_values`) a trial should train when a
    sampler drew ``drawn`` and the points ``tried`` are trained (or running): ``drawn`` itself when it is not one
    of them, else the next point that is not, in the space's order (the last key fastest, from ``drawn`` on,
    wrapping around); ``drawn`` when every point is tried. Looks at no more than ``len(tried) + 1`` points, so a
    space of a billion points costs no more than one of ten."""
    keys = list(dists)
    axes = [finite_values(dists[k]) for k in keys]

    def place(point: dict[str, Any]) -> tuple | None:
        at = tuple(_position(dists[k], axis, point.get(k)) for k, axis in zip(keys, axes))
        return None if None in at else at

    seen = {p for p in map(place, tried) if p is not None}
    start = place(drawn)
    if start is None or start not in seen:
        return drawn
    sizes = [len(axis) for axis in axes]
    total = math.prod(sizes)
    flat = 0
    for j, n in zip(start, sizes):
        flat = flat * n + j
    for step in range(1, min(total, len(seen) + 1)):  # of these len(seen) points, at most len(seen) - 1 are tried
        rest, at = (flat + step) % total, []
        for n in reversed(sizes):
            rest, j = divmod(rest, n)
            at.append(j)
        at.reverse()
        if tuple(at) not in seen:
            return {**drawn, **{k: axis[j] for k, axis, j in zip(keys, axes, at)}}
    return drawn


# the tags of tag(..., range or interval) that mean something here (hydra-optuna-sweeper's log and int; float: a
# range or an interval of whole-number ends samples floats)
TAGS = {"log": "log scale", "int": "whole numbers", "float": "floats"}


def _number(x: Any) -> Any:
    return float(x) if hasattr(x, "as_tuple") else x  # decimal.Decimal from Hydra float ranges


def _float_range(value: Any) -> list[float]:
    """Hydra's range(start, stop, step) on floats, stop excluded, without float drift
    (Hydra's own expansion of range(0.1,0.4,0.1) yields 0.30000000000000004 and then 0.4)."""
    from decimal import Decimal

    start, stop, step = (Decimal(str(x)) for x in (value.start, value.stop, value.step))
    out, x = [], start
    while (x < stop) if step > 0 else (x > stop):
        out.append(float(x))
        x += step
    return out


def _plus(a: Any, b: Any) -> Any:
    from decimal import Decimal

    return a + b if isinstance(a, int) and isinstance(b, int) else float(Decimal(str(a)) + Decimal(str(b)))


def _range_text(value: Any) -> str:
    return f"range({value_text(value.start)},{value_text(value.stop)},{value_text(value.step)})"


def _range_values(key: str, value: Any) -> list[Any]:
    """The points of ``range(start, stop, step)``, stop excluded (Hydra's rule), ascending; a zero step,
    a descending range or an empty one is refused in one line."""
    if value.step == 0:
        raise ValueError(f"{key}={_range_text(value)}: the step must not be 0")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in (value.start, value.stop, value.step)):
        values = list(range(value.start, value.stop, value.step))
    else:
        values = _float_range(value)
    if value.step < 0:
        fix = (f", e.g. range({value_text(values[-1])},{value_text(_plus(values[0], -value.step))},"
               f"{value_text(-value.step)}) for the same points" if values else "")
        raise ValueError(f"{key}={_range_text(value)}: a descending range is not a search space; write it "
                         f"ascending{fix} (the stop is excluded)")
    if not values:
        raise ValueError(f"{key}={_range_text(value)}: the range is empty (the stop is excluded); the start must "
                         f"be below the stop, e.g. range({value_text(value.start)},"
                         f"{value_text(value.start + value.step)})")
    return values


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _stop_on_step(value: Any) -> bool:
    """Whether the stop is a point of the range's steps: only then does hydra-optuna-sweeper (stop included)
    try a value this range does not."""
    from decimal import Decimal

    start, stop, step = (Decimal(str(x)) for x in (value.start, value.stop, value.step))
    return (stop - start) % step == 0


def range_note(key: str, value: Any, values: Sequence[Any]) -> str:
    """The one line saying what ``range(...)`` tries here, where hydra-optuna-sweeper would also try its stop."""
    shown = ", ".join(value_text(v) for v in (values if len(values) <= 8 else [*values[:3], "...", *values[-2:]]))
    return (f"{key}={_range_text(value)} tries {shown}: the stop {value_text(value.stop)} is excluded (Hydra's "
            "rule; hydra-optuna-sweeper included it)")


def translate(override: Any, *, grid_sampler: bool = False) -> tuple[str, Any]:
    """One parsed Hydra override -> ``("fixed", text)``, ``("grid", [(value, text)])`` or
    ``("dist", distribution)``. Pure; table-tested against Hydra's basic sweeper expansion."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer

    key = override.get_key_element()
    if not override.is_sweep_override():
        return "fixed", override.input_line
    value = override.value()
    tags = set(getattr(value, "tags", set()) or set())
    unknown = sorted(tags - set(TAGS))
    if unknown:
        raise ValueError(f"{override.input_line}: unknown tag {unknown[0]!r}; the tags are "
                         + ", ".join(f"{t} ({why})" for t, why in TAGS.items())
                         + ", e.g. tag(log, interval(1e-5,1e-3))")
    log_scale = "log" in tags
    if override.is_choice_sweep():
        if tags:
            raise ValueError(f"{override.input_line}: tag({', '.join(sorted(tags))}, ...) has no meaning for a choice "
                             "(its values are taken as written); tag a range or an interval, e.g. "
                             "tag(log, interval(1e-5,1e-3))")
        items = list(override.sweep_iterator(transformer=Transformer.encode))
        texts = list(override.sweep_string_iterator())
        pairs = [(_number(v) if not isinstance(v, str) else v, t) for v, t in zip(items, texts)]
        if isinstance(value, ChoiceSweep) and not value.simple_form and not grid_sampler:
            return "dist", optuna.distributions.CategoricalDistribution([v for v, _ in pairs])
        return "grid", pairs  # comma list or glob: a grid axis
    if isinstance(value, RangeSweep):
        values = _range_values(key, value)
        texts = [value_text(v) for v in values]
        if grid_sampler:
            return "grid", list(zip(values, texts))
        if value.shuffle:  # shuffle(range(...)): its points, unordered
            return "dist", optuna.distributions.CategoricalDistribution(values)
        if all(_is_int(v) for v in values) and _is_int(value.step) and "float" not in tags:
            step = int(value.step)
            if log_scale and step != 1:
                raise ValueError(f"{key}: tag(log, range(...)) needs step 1, but got step {step}")
            if log_scale and values[0] < 1:
                raise ValueError(f"{key}: tag(log, {_range_text(value)}) needs a start of at least 1 (a log scale has "
                                 f"no 0), e.g. tag(log, range(1,{value_text(value.stop)}))")
            return "dist", optuna.distributions.IntDistribution(
                low=values[0], high=values[-1], step=1 if log_scale else step, log=log_scale)
        if log_scale:
            raise ValueError(f"{key}: tag(log, range(...)) needs whole numbers; for a float on a log scale use "
                             f"tag(log, interval({value_text(value.start)},{value_text(value.stop)}))")
        if len(values) == 1:
            return "dist", optuna.distributions.FloatDistribution(values[0], values[0])
        # an ordered, stepped float: the sampler learns from the order (a categorical would not)
        return "dist", optuna.distributions.FloatDistribution(values[0], values[-1], step=float(value.step))
    if isinstance(value, IntervalSweep):
        if grid_sampler:
            raise ValueError(
                f"{key}: interval(...) is continuous and cannot be a grid axis; use sampler.name=tpe "
                "or give a comma list / range(...)"
            )
        # int(interval(a,b)) keeps whole-number bounds; tag(int, interval(...)) says the same
        whole = "int" in tags or (_is_int(value.start) and _is_int(value.end) and "float" not in tags)
        lo, hi = float(value.start), float(value.end)
        if lo > hi:
            raise ValueError(f"{key}=interval({value.start},{value.end}): the low end must not exceed the high end; "
                             f"write interval({value.end},{value.start})")
        if log_scale and lo <= 0:
            raise ValueError(f"{key}: tag(log, interval({value.start},{value.end})) needs a low end above 0")
        if whole:
            if lo != int(lo) or hi != int(hi):
                raise ValueError(f"{key}: int(interval({value.start},{value.end})) needs whole-number ends")
            return "dist", optuna.distributions.IntDistribution(int(lo), int(hi), log=log_scale)
        return "dist", optuna.distributions.FloatDistribution(lo, hi, log=log_scale)
    raise ValueError(f"{override.input_line}: unsupported sweep type {type(value).__name__}")


def build_space(overrides: Sequence[Any], *, grid_sampler: bool = False) -> SweepSpace:
    """A command's parsed overrides, each through :func:`translate`, gathered into one :class:`SweepSpace`; with
    ``grid_sampler``, a choice or range run as a grid axis keeps its sampled distribution
    (:attr:`SweepSpace.sampled_as`)."""
    space = SweepSpace()
    for ov in overrides:
        kind, payload = translate(ov, grid_sampler=grid_sampler)
        key = ov.get_key_element()
        if kind == "grid" and grid_sampler:  # a choice or range the grid sampler runs as a grid: recorded as sampled
            try:
                sampled_kind, dist = translate(ov)
            except ValueError:  # a range only the grid sampler takes (tag(log, range(1,9,2))): a plain grid's record
                sampled_kind = "grid"
            if sampled_kind == "dist":
                space.sampled_as[key] = dist
        if kind != "fixed" and type(ov.value()).__name__ == "RangeSweep" and _stop_on_step(ov.value()):
            space.notes.append(range_note(key, ov.value(), _range_values(key, ov.value())))
        if kind == "fixed":
            space.fixed.append(payload)
        elif kind == "grid":
            space.grid.append((key, payload))
        else:
            space.distributions[key] = payload
    return space


def distribution_text(dist: optuna.distributions.BaseDistribution) -> str:
    """A distribution as the override text that samples it (``interval(0.5,1.5)``, ``tag(log, interval(...))``,
    ``int(interval(1,9))``, ``range(1,9,2)``, ``choice(a,b)``): for messages."""
    D = optuna.distributions
    if isinstance(dist, D.CategoricalDistribution):
        return "choice(" + ",".join(value_text(v) for v in dist.choices) + ")"
    if isinstance(dist, (D.FloatDistribution, D.IntDistribution)):
        if dist.step not in (None, 1) or (isinstance(dist, D.FloatDistribution) and dist.step is not None):
            return f"range({value_text(dist.low)},{value_text(dist.high + dist.step)},{value_text(dist.step)})"
        inner = f"interval({value_text(dist.low)},{value_text(dist.high)})"
        inner = f"int({inner})" if isinstance(dist, D.IntDistribution) else inner
        return f"tag(log, {inner})" if dist.log else inner
    return str(dist)


def value_text(value: Any) -> str:
    """A swept value as override text (a float by its repr, so that it reads back the same)."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:/+-]+")


def quote(value: str) -> str:
    """A Hydra override value for any string (quoted and escaped unless it is plain)."""
    if _PLAIN_NAME.fullmatch(value):
        return value
    # Hydra's quoted strings: backslashes before a quote (or the closing quote) are doubled, others kept
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"
