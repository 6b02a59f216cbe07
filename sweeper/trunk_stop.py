"""When a WSD trunk can stop: no later branch can beat the best one. Pure: curves are lists of (step, value).

A cooldown branch at step p gains ``trunk(p) - branch`` over the constant-LR trunk it starts from
(``trunk(p)``: the trunk's smoothed eval value at p, the median of its last :data:`WINDOW` evaluations up to
p; ``branch``: the branch's best value). Cooldown gains shrink as the trunk trains (on banking77_sample with
the tiny model the branches at 250, 500, 1,000, 1,500 and 2,000 steps gained 0.66, 0.23, 0.07, -0.005 and
-0.005: once the trunk over-fits, a cooldown no longer helps), so a branch cut later gains at most about
what the newest cooldown gained, and a branch at step t can reach at best

    bound(t) = trunk(t) - (1 + margin) * max(0, the newest branch's gain).

Once ``bound(t)`` is worse than the best branch by more than twice the trunk's noise (σ of
:func:`sweeper.report.noise_estimate`, the report's own estimate; two results are within noise when they
differ by at most 2σ) at each of the trunk's last ``patience`` evaluations after its newest branch point,
no later branch can win and the trunk stops (``schedule.wsd.no_win_patience``, ``schedule.wsd.gain_margin``).

The trunk also stops, sooner, when it has *stalled*: it has made no new best evaluation for
``eval.early_stopping_patience`` evaluations (by more than ``eval.early_stopping_threshold``: transformers'
``EarlyStoppingCallback`` rule, the one that ends each run of the cosine grid a user runs) and, at its newest
evaluation after the newest branch point, ``bound(t)`` is no better than the best branch. A branch cut later
starts from a trunk no better than the one that gave the best branch and gains at most what the newest
cooldown gained, which is the evidence early stopping accepts for a cosine run; the 2σ test above needs the
trunk to climb first, several hundred steps later on a slowly over-fitting curve.

On data that the model over-fits this is where the trunk's eval loss climbs at constant LR; on data that it
does not, the trunk keeps falling below where the newest branch started and the bound stays below the best
branch. A maximised metric (``eval_accuracy``) mirrors every sign.

The trunk's own evaluations are models too: its state at step t, before any cooldown, is what a run of t
steps at constant LR (the same warmup, then ``constant_with_warmup``) trains. :func:`trunk_best` is the best
of them, which the search records (``trunk_best``) and the report compares with the branches.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = ["WINDOW", "Branch", "NoWin", "check", "gain", "smoothed", "stalled_for", "trunk_best", "trunk_noise"]

WINDOW = 3  # evaluations in the trunk's running median


@dataclass(frozen=True)
class Branch:
    """A recorded cooldown: its length, branch point and best value."""

    max_steps: int
    branch_point: int
    value: float


@dataclass(frozen=True)
class NoWin:
    """Why the trunk stopped: at ``step`` its bound was worse than the best branch by more than ``2 * sigma``
    for ``patience`` evaluations."""

    step: int
    trunk_value: float   # smoothed trunk value at ``step``
    gain: float          # the newest cooldown's gain (at least 0), before the margin
    margin: float
    bound: float         # the best a branch cut at ``step`` could reach
    best_steps: int      # the best branch's length
    best_value: float
    sigma: float
    patience: int
    metric: str = "eval_loss"
    stalled_for: int | None = None  # stalled: evaluations since the trunk's best (early stopping's count)

    def reason(self) -> str:
        """The sentence stored as the trunk's ``stopped_reason``."""
        if self.stalled_for is not None:
            return (f"trunk stopped at step {self.step}: no later branch can win: it has not improved on its best "
                    f"{self.metric} for {self.stalled_for} evaluations (eval.early_stopping_patience or more) and its smoothed "
                    f"{self.metric} {self.trunk_value:.4f} less the newest cooldown's gain ({self.gain:.4f}"
                    + (f", +{self.margin:.0%} margin" if self.margin else "")
                    + f") is {self.bound:.4f}, no better than the best branch (max_steps={self.best_steps}, "
                    f"{self.best_value:.4f})")
        return (f"trunk stopped at step {self.step}: no later branch can win: its smoothed {self.metric} "
                f"{self.trunk_value:.4f} less the newest cooldown's gain ({self.gain:.4f}"
                + (f", +{self.margin:.0%} margin" if self.margin else "")
                + f") is {self.bound:.4f}, worse than the best branch (max_steps={self.best_steps}, "
                f"{self.best_value:.4f}) by more than twice the noise (±{self.sigma:.4f}) at each of its last "
                f"{self.patience} evaluation(s)")

    def record(self) -> dict:
        return {"rule": "no_win", **asdict(self)}


def _points(curve: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    return sorted((int(s), float(v)) for s, v in curve)


def smoothed(curve: Sequence[Sequence[float]], step: int, window: int = WINDOW) -> float | None:
    """The median of the trunk's last ``window`` evaluations at or before ``step``; None before the first."""
    vals = [v for s, v in _points(curve) if s <= step][-window:]
    return statistics.median(vals) if vals else None


def gain(trunk_curve: Sequence[Sequence[float]], branch: Branch, maximize: bool = False) -> float | None:
    """What the cooldown of ``branch`` gained over the trunk at its branch point (positive: better)."""
    at = smoothed(trunk_curve, branch.branch_point)
    if at is None:
        return None
    return (branch.value - at) if maximize else (at - branch.value)


def trunk_best(trunk_curve: Sequence[Sequence[float]], until: int | None = None,
               maximize: bool = False) -> tuple[int, float] | None:
    """The trunk's best evaluation at or before ``until`` (its constant-LR phase: up to its own cooldown's
    branch point; None: the whole curve), as (step, value), the first of equal values; None without one. That
    state is a constant-LR run of ``step`` steps (see the module docstring)."""
    pts = [(s, v) for s, v in _points(trunk_curve) if until is None or s <= until]
    if not pts:
        return None
    return (max if maximize else min)(pts, key=lambda p: p[1])


def trunk_noise(trunk_curve: Sequence[Sequence[float]], maximize: bool = False) -> float:
    """σ of the trunk's evaluations, by the report's estimate (floored at 0.5% of the best)."""
    from sweeper.report import noise_estimate

    return noise_estimate([_points(trunk_curve)], maximize=maximize).sigma


def stalled_for(trunk_curve: Sequence[Sequence[float]], threshold: float = 0.0, maximize: bool = False) -> int:
    """Evaluations since the trunk's best, as transformers' ``EarlyStoppingCallback`` counts them: one that
    is not better than the best so far by more than ``threshold`` adds one, a better one resets to 0."""
    best, count = None, 0
    for _, v in _points(trunk_curve):
        better = best is None or ((v > best) if maximize else (v < best))
        if better and (best is None or abs(v - best) > threshold):
            best, count = v, 0
        else:
            count += 1
    return count


def check(trunk_curve: Sequence[Sequence[float]], branches: Sequence[Branch], patience: int | None,
          margin: float = 0.0, maximize: bool = False, sigma: float | None = None,
          metric: str = "eval_loss", es_patience: int | None = None, es_threshold: float = 0.0) -> NoWin | None:
    """A :class:`NoWin` when no branch cut from the trunk after its newest branch point can beat the best
    branch (see the module docstring), else None: ``patience`` None, no branch yet, or the trunk neither
    stalled (``es_patience``: early stopping's patience, None: not this test) nor past ``patience``
    evaluations after the newest branch point. ``sigma``: the noise (None: the trunk's own,
    :func:`trunk_noise`)."""
    if patience is None or not branches:
        return None
    pts = _points(trunk_curve)
    newest = max(b.branch_point for b in branches)
    after = [s for s, _ in pts if s > newest]
    newest_gain = gain(pts, max(branches, key=lambda b: b.branch_point), maximize)
    if not after or newest_gain is None:
        return None
    g = max(0.0, newest_gain)
    best = (max if maximize else min)(branches, key=lambda b: b.value)
    sign = -1.0 if maximize else 1.0
    if es_patience is not None:
        count = stalled_for(pts, es_threshold, maximize)
        bound = smoothed(pts, after[-1]) - sign * (1.0 + margin) * g
        if count >= es_patience and sign * (bound - best.value) >= 0:
            return NoWin(step=after[-1], trunk_value=smoothed(pts, after[-1]), gain=g, margin=margin, bound=bound,
                         best_steps=best.max_steps, best_value=best.value, sigma=0.0, patience=patience,
                         metric=metric, stalled_for=count)
    if len(after) < patience:
        return None
    sig = trunk_noise(pts, maximize) if sigma is None else float(sigma)
    verdicts = []
    for s in after[-patience:]:
        bound = smoothed(pts, s) - sign * (1.0 + margin) * g
        verdicts.append((sign * (bound - best.value) > 2 * sig, s, bound))
    if not all(v for v, _, _ in verdicts):
        return None
    _, step, bound = verdicts[-1]
    return NoWin(step=step, trunk_value=smoothed(pts, step), gain=g, margin=margin, bound=bound,
                 best_steps=best.max_steps, best_value=best.value, sigma=sig, patience=patience, metric=metric)
