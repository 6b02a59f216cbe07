"""The lengths a follow-up grid proposes, from what the study already knows. Pure: plain values only.

- A length the study has already measured worse than the winner is never proposed again (it would only
  repeat a known loss).
- A curve that peaked inside its run says where the best length lies: a WSD trunk's minimum at constant LR
  before its own cooldown, or a cosine run's best step before its end. A peak between the winner and the
  longer length that did worse narrows the proposal to the lengths around it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["between", "metric_steps", "peak", "prune_measured"]


def peak(curve: Sequence[Sequence[float]], until: int | None = None, maximize: bool = False) -> int | None:
    """The step of the best evaluation of ``curve`` at or before ``until`` (None: the whole curve) when it lies
    strictly inside that part (a later evaluation did worse); None when the best is its last evaluation or
    there are fewer than three evaluations."""
    pts = sorted((int(s), float(v)) for s, v in curve if until is None or s <= until)
    if len(pts) < 3:
        return None
    step, _ = (max if maximize else min)(pts, key=lambda p: p[1])  # the first of equal values
    return step if step < pts[-1][0] else None


def prune_measured(grid: Iterable[int], measured: dict[int, float], best: float, maximize: bool = False) -> list[int]:
    """``grid`` without the lengths already measured worse than ``best`` (``measured``: length -> its best
    value in the study), sorted."""
    worse = {s for s, v in measured.items() if (v < best if maximize else v > best)}
    return sorted({int(s) for s in grid} - worse)


def _round(values: Iterable[float], unit: int) -> list[int]:
    return sorted({max(unit, unit * round(v / unit)) for v in values})


def between(winner: int, longer: int, unit: int, measured: dict[int, float], best: float,
            peaks: Sequence[int] = (), maximize: bool = False) -> tuple[list[int], int | None]:
    """The grid between the ``winner``'s length and the ``longer`` one that did worse, rounded to ``unit``
    (the evaluation interval), and the peak it was narrowed around (None: not narrowed).

    Without a peak in (winner, longer): its thirds. With one (the latest such peak ``m``: a run's best step is
    where it stopped gaining, so the best length lies near it): ``m`` and the midpoints on either side,
    ``(winner + m) / 2`` and ``(m + longer) / 2``. Only lengths strictly between the two are proposed (both
    ends are measured), and none measured worse than ``best`` (:func:`prune_measured`); an empty grid means
    nothing new lies between them at this resolution."""
    inside = [m for m in peaks if winner < m < longer]
    if inside:
        m = max(inside)
        raw = [(winner + m) / 2, m, m + (longer - m) / 2]
    else:
        m = None
        raw = [winner + (longer - winner) / 3, winner + 2 * (longer - winner) / 3]
    grid = [s for s in _round(raw, unit) if winner < s < longer]
    return prune_measured(grid, measured, best, maximize), m


def _best(curve: Sequence[Sequence[float]], maximize: bool) -> tuple[int, float] | None:
    pts = [(int(s), float(v)) for s, v in curve]
    return (max if maximize else min)(pts, key=lambda p: p[1]) if pts else None


def metric_steps(metric: str, loss_curve: Sequence[Sequence[float]], task: str,
                 task_curve: Sequence[Sequence[float]]) -> str | None:
    """With a task metric on (``task``: ``eval_accuracy`` or ``eval_mean_token_accuracy``, maximised, with its
    curve): the step of the lowest eval loss and the step of the best task metric, and which of the two the
    recommendation uses (the study's objective ``metric``). None without both curves."""
    lo, hi = _best(loss_curve, False), _best(task_curve, True)
    if lo is None or hi is None:
        return None
    shown = f"{hi[1]:.1%}" if task.endswith("accuracy") else f"{hi[1]:.4f}"
    text = (f"Loss and task metric: lowest eval_loss {lo[1]:.4f} at step {lo[0]}; best {task} {shown} at step "
            f"{hi[0]}" + (" (the same step)" if lo[0] == hi[0] else
                          f" ({'later' if hi[0] > lo[0] else 'earlier'} than the loss's)"))
    if metric == task:
        return text + f". The recommendation uses {task} (eval.metric), so its step {hi[0]}."
    return (text + f". The recommendation uses eval_loss (eval.metric), so its step {lo[0]}"
            + (f"; to choose by the task, set eval.metric={task}." if lo[0] != hi[0] else "."))
