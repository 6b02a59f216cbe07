"""Reading a curve as a person would: the noise of its evaluations (:func:`noise_estimate`), its diagnosis
(:func:`diagnose`: under-trained, over-trained, plateau, good; a WSD branch judged by its trunk) and, for
a stored trial, both with what the trial knows (:func:`trial_noise`, :func:`trial_diagnosis`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import optuna

from sweeper.report.stored import attrs, branch_point, curve_attr, eval_curve

__all__ = ["DECAYING", "NOISE_FLOOR", "TAIL", "Diagnosis", "Noise", "accuracy_disagrees", "diagnose",
           "noise_estimate", "trial_diagnosis", "trial_noise"]

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
    verdict: str  # under-trained | over-trained | plateau | good | no curve | pruned | failed | running
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
    - *plateau*: the whole run moved the loss by less than ``2*rel_tol``: the learning rate is off, on either side
      (too low barely moves the loss, too high stalls it);
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
                                    "the model is not learning at this rate (too low a learning rate barely moves the loss, "
                                    "too high a one stalls it): try learning rates on both sides of it")
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
def trial_noise(t: optuna.trial.FrozenTrial, maximize: bool = False) -> Noise:
    """:func:`noise_estimate` of a trial's own eval curve; a WSD trial's cooldown only (the evaluations after
    its branch point; all of them for a trunk stopped before its own), since its constant-LR trunk is
    noisier than its result."""
    curve, p = eval_curve(t), branch_point(t)
    cooldown = [c for c in curve if p is not None and c[0] > p]
    return noise_estimate([cooldown or curve], maximize=maximize)


def trial_diagnosis(t: optuna.trial.FrozenTrial) -> Diagnosis:
    """:func:`diagnose` with what the trial knows: its scheduler, length, WSD branch point and own noise
    (:func:`trial_noise`: the jitter of evaluations differs between runs, e.g. with the LR at their best).
    A FAIL trial's diagnosis is its ``error`` attr; a RUNNING or WAITING one is *running*, never diagnosed: its
    curve so far is part of a run (a partial curve still falls at its end), so it says how far the run got. A
    PRUNED one stopped before a second evaluation is *pruned*: its one point is no curve to read, and fewer
    evaluations would not have helped."""
    a = attrs(t)
    if t.state == optuna.trial.TrialState.FAIL:
        return Diagnosis("failed", str(a.get("error") or "no error recorded; see the job log in its run_dir"))
    curve = eval_curve(t)
    if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING):
        if len(curve) < 2:
            return Diagnosis("running", "fewer than two evaluations so far")
        of = f" of {a['max_steps']}" if a.get("max_steps") else ""
        return Diagnosis("running", f"{len(curve)} evaluations so far, the last at step {int(curve[-1][0])}{of}; "
                                    "diagnosed once it finishes")
    if t.state == optuna.trial.TrialState.PRUNED and len(curve) < 2:
        at = f" at step {int(curve[-1][0])}" if curve else ""
        return Diagnosis("pruned", f"stopped by the pruner{at}, after {len(curve)} evaluation(s): too short a run "
                                   "to diagnose (the pruner's rule is in hydra.sweeper.pruner)")
    return diagnose(curve, curve_attr(t, "train_curve"), noise=trial_noise(t).sigma,
                    scheduler=(a.get("sft_config") or {}).get("lr_scheduler_type"), max_steps=a.get("max_steps"),
                    branch_point=branch_point(t))


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
