"""The train/eval gap of a run and whether it is memorising. Pure: curves are lists of (step, loss).

The train loss logged every ``eval.logging_steps`` is the mean over the batches since the previous log, so the
train loss *at* an evaluation step s is the mean of the train-loss entries logged in the evaluation interval
that ends at s, ``(s - interval, s]`` (interval: the spacing of the evaluations). The gap is eval loss minus
that train loss, at the best evaluation and at the last one.

A run is *memorising* when, at its end, train loss is far below eval loss (below :data:`FAR` of it) and eval
loss has risen since its best by more than twice the noise (σ, the report's estimate): the model fits the
training rows ever better while it gets worse on rows it has not seen. What helps then: fewer epochs (stop
near the best step), more data, a lower learning rate, dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["FAR", "Gap", "gap", "note", "train_at"]

FAR = 0.5  # train loss below half the eval loss is "far below" it


@dataclass(frozen=True)
class Gap:
    best_step: int
    eval_best: float
    train_best: float | None
    end_step: int
    eval_end: float
    train_end: float | None
    memorising: bool


def train_at(train_curve: Sequence[Sequence[float]], step: int, interval: int) -> float | None:
    """The mean train loss logged in ``(step - interval, step]``; else the last one logged at or before
    ``step`` (a log interval longer than the evaluations'); None when none was logged by then."""
    pts = sorted((int(s), float(v)) for s, v in train_curve)
    window = [v for s, v in pts if step - interval < s <= step]
    if window:
        return sum(window) / len(window)
    before = [v for s, v in pts if s <= step]
    return before[-1] if before else None


def gap(eval_curve: Sequence[Sequence[float]], train_curve: Sequence[Sequence[float]], sigma: float) -> Gap | None:
    """The gap at the best (lowest) eval loss and at the last evaluation; None without two evaluations or
    without a train loss."""
    pts = sorted((int(s), float(v)) for s, v in eval_curve)
    if len(pts) < 2 or not train_curve:
        return None
    interval = min(b[0] - a[0] for a, b in zip(pts, pts[1:])) or 1
    best_step, eval_best = min(pts, key=lambda p: p[1])
    end_step, eval_end = pts[-1]
    t_best, t_end = train_at(train_curve, best_step, interval), train_at(train_curve, end_step, interval)
    if t_best is None and t_end is None:
        return None
    memorising = (t_end is not None and t_end < FAR * eval_end and eval_end - eval_best > 2 * sigma)
    return Gap(best_step, eval_best, t_best, end_step, eval_end, t_end, memorising)


def _at(step: int, eval_loss: float, train_loss: float | None) -> str:
    if train_loss is None:
        return f"step {step}: eval loss {eval_loss:.4f} (no train loss logged by then)"
    return f"step {step}: train loss {train_loss:.4f}, eval loss {eval_loss:.4f} (gap {eval_loss - train_loss:+.4f})"


def note(g: Gap, epochs_per_step: float | None = None) -> str:
    """The report's line: the gap at the best step and at the end, and a plain sentence when memorising."""
    text = f"Train/eval gap: at the best {_at(g.best_step, g.eval_best, g.train_best)}"
    if g.end_step != g.best_step:
        text += f"; at the end, {_at(g.end_step, g.eval_end, g.train_end)}"
    text += "."
    if g.memorising:
        epochs = f" ({g.best_step * epochs_per_step:.1f} epochs)" if epochs_per_step else ""
        text += (f" The model is memorising the training rows: its train loss ({g.train_end:.4f}) is far below its "
                 f"eval loss ({g.eval_end:.4f}), which rose {g.eval_end - g.eval_best:+.4f} after step {g.best_step}. "
                 f"What helps: fewer epochs (stop near step {g.best_step}{epochs}), more data, a lower learning rate, "
                 "dropout (`peft.lora_dropout`, or the model's own).")
    return text
