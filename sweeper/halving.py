"""Successive halving of WSD trunks, one per learning rate, at the candidate lengths. Pure: no Optuna, no torch.

A joint search (``schedule.wsd.learning_rates=[1e-4,2e-4,4e-4]``) trains one warmup-stable-decay trunk per
learning rate. Every candidate length but the longest is a *rung*: there each surviving trunk branches its
cooldown, and the branch's value ranks the trunk. Of the ``n`` trunks that reach a rung, the best
``ceil(n / eta)`` go on (``schedule.wsd.halving.eta``; at least one); the others stop there (their trial ends
PRUNED with the reason). ``rule: none`` never stops a trunk (every learning rate runs every length).

Trunks run on several workers at once and reach a rung at different times, so :func:`decide` is
asynchronous (as ASHA's promotions are), from what is known now:

- ``stop`` once the trunk is *provably* outside the best ``ceil(n_max / eta)``: at least that many trunks
  already recorded a better value there, where ``n_max`` counts every trunk that has reached the rung or
  still may (later arrivals can only add better ones);
- ``continue`` once it is provably inside: the trunks already better plus every trunk still to come are
  fewer than ``ceil(n_recorded / eta)``;
- else ``pending``: the rule needs a trunk that has not reached the rung yet. The job then waits for it when
  every such trunk is training on some worker, or parks (its trial goes back to the queue, WAITING, with
  its checkpoint) so that its worker can train that trunk; ``sweeper.sweep.queue`` hands a parked trunk out again
  once the rule decides it.

When every trunk has reached the rung the two bounds meet, so the decisions are exactly synchronous
successive halving's, in whatever order the trunks arrive. Ties rank the smaller learning rate first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from sweeper import records

__all__ = ["RULES", "Decision", "Trunk", "decide", "joint_table", "keep", "rank", "stop_reason"]

RULES = ("successive_halving", "none")


@dataclass(frozen=True)
class Trunk:
    """What the study knows of one learning rate's trunk: its branch value at each rung reached
    (candidate steps -> value), whether it may still reach later rungs (``live``: running, queued, parked
    or not started) and whether a worker is training it now (``running``)."""

    lr: float
    values: dict[int, float] = field(default_factory=dict)
    live: bool = True
    running: bool = False


@dataclass(frozen=True)
class Decision:
    verdict: str  # continue | stop | pending
    reason: str = ""
    waiting_for: tuple[float, ...] = ()  # pending: the learning rates the rule still needs at this rung
    running: bool = False  # pending: every trunk it needs is training now (wait rather than park)


def keep(n: int, eta: int) -> int:
    """How many of ``n`` trunks at a rung go on: ``ceil(n / eta)``, at least one."""
    return max(1, math.ceil(n / eta))


def _better(a: tuple[float, float], b: tuple[float, float], maximize: bool) -> bool:
    """(value, lr) ``a`` ranks before ``b``: the better value, or on a tie the smaller learning rate."""
    if a[0] != b[0]:
        return a[0] > b[0] if maximize else a[0] < b[0]
    return a[1] < b[1]


def rank(trunks: Sequence[Trunk], rung: int, maximize: bool) -> list[Trunk]:
    """The trunks that reached ``rung``, best first."""
    import functools

    reached = [t for t in trunks if rung in t.values]

    def cmp(x: Trunk, y: Trunk) -> int:
        a, b = (x.values[rung], x.lr), (y.values[rung], y.lr)
        return -1 if _better(a, b, maximize) else (1 if _better(b, a, maximize) else 0)

    return sorted(reached, key=functools.cmp_to_key(cmp))


def decide(lr: float, rung: int, trunks: Sequence[Trunk], eta: int, maximize: bool, rule: str = "successive_halving",
           metric: str = "eval_loss") -> Decision:
    """Whether the trunk of learning rate ``lr``, which has recorded its branch value at ``rung`` (a
    candidate's steps), goes on past it. ``trunks`` holds every learning rate of the search, ``lr``'s
    included (see the module docstring for the rule)."""
    if rule == "none":
        return Decision("continue")
    me = next(t for t in trunks if t.lr == lr)
    mine = (me.values[rung], lr)
    recorded = [t for t in trunks if rung in t.values]
    pending = [t for t in trunks if rung not in t.values and t.live]
    better = [t for t in recorded if t.lr != lr and _better((t.values[rung], t.lr), mine, maximize)]
    n_max = len(recorded) + len(pending)
    if len(better) >= keep(n_max, eta):
        k = keep(n_max, eta)
        return Decision("stop", (
            f"stopped at the {rung}-step rung by successive halving (eta={eta}): its branch's {metric} "
            f"{me.values[rung]:.4f} ranks {len(better) + 1} of {n_max} learning rates there, and only the best "
            f"{k} go on (best: lr={rank(trunks, rung, maximize)[0].lr:g}, "
            f"{rank(trunks, rung, maximize)[0].values[rung]:.4f})"))
    if len(better) + len(pending) < keep(len(recorded), eta):
        return Decision("continue")
    return Decision("pending", waiting_for=tuple(t.lr for t in pending),
                    running=bool(pending) and all(t.running for t in pending))


def joint_table(trunks: dict[float, dict], cands: list[int], metric: str, maximize: bool) -> str:
    """Markdown table of a joint search: one row per learning rate, its branch value at each length, where
    its trunk stopped, its optimizer steps and seconds; then the winning (learning rate, steps) and the cost
    against the full cosine grid of the same rates and lengths; then why each stopped trunk stopped.
    ``trunks``: learning rate -> its trunk trial's attrs (``sweeper.wsd``'s summary; ``state``: its trial's
    state, when it comes from a study)."""
    head = " | ".join(f"{s} steps" for s in cands)
    lines = [f"| lr | {head} | trunk | optimizer steps | train s |", "|---:|" + "---:|" * len(cands) + "---|---:|---:|"]
    best, spent, seconds, why = None, 0, 0.0, []
    table: dict[int, dict[float, float]] = {}  # length -> learning rate -> its value, as the table shows it
    for r in sorted(trunks):
        a = trunks[r]
        by_steps = {int(b["max_steps"]): b for b in a.get("branches") or [] if "max_steps" in b}
        cells = []
        for s in cands:
            b = by_steps.get(s, {})
            v = b.get("value") if str(b.get("status", "")).startswith("done") else None
            cells.append(f"{v:.4f}" if v is not None else "–")
            if v is not None:
                table.setdefault(s, {})[r] = v
            if v is not None and (best is None or (v > best[0] if maximize else v < best[0])):
                best = (v, r, s)
        stopped = a.get(records.STOPPED_REASON)
        reached = [int(k) for k in ((a.get(records.WSD_TRUNK) or {}).get("rungs") or {})]
        if a.get("state") == "FAIL":
            where = "failed" + (f" after its {max(reached)}-step branch" if reached else "")
            why.append(f"- lr={r:g}: failed: {a.get(records.ERROR) or 'see its train.log'}")
        elif stopped:
            where = f"stopped after its {max(reached)}-step branch" if reached else "stopped"
            why.append((r, max(reached) if reached else None, stopped))
        elif a.get("best_value") is not None:
            where = "ran every length"
        else:
            where = f"parked after its {max(reached)}-step branch" if reached else "not finished"
        steps = int(a.get("wsd_optimizer_steps") or 0)
        spent += steps
        seconds += float(a.get("wsd_train_runtime_s") or 0.0)
        lines.append(f"| {r:g} | {' | '.join(cells)} | {where} | {steps} | {a.get('wsd_train_runtime_s') or 0:.0f} |")
    grid = len(trunks) * sum(cands)
    lines.append("")
    if best is not None:
        lines.append(f"Best: lr={best[1]:g}, max_steps={best[2]} ({metric} {best[0]:.4f}). Cost: {spent} optimizer "
                     f"steps ({seconds:.0f} s of training), {100 * spent / grid:.0f}% of the {grid} of the "
                     f"{len(trunks)} x {len(cands)} cosine grid (one run per learning rate and length).")
    return "\n".join(lines + [w if isinstance(w, str) else stop_reason(*w, table, metric, maximize) for w in why])


def stop_reason(lr: float, at: int | None, reason: str, table: dict[int, dict[float, float]], metric: str,
                maximize: bool) -> str:
    """Why the trunk of ``lr`` stopped, with the final facts first: its rank among the learning rates at the
    last length it reached (``at``) and the best rate there, from ``table`` (length -> rate -> value, the
    values the joint table shows), then the decision-time ``reason`` ("when it was stopped, ...")."""
    there = table.get(at, {}) if at is not None else {}
    if lr not in there:
        return f"- lr={lr:g}: {reason}"
    order = sorted(there, key=lambda r: (-there[r] if maximize else there[r], r))
    top = order[0]
    final = (f"its {at}-step branch's {metric} {there[lr]:.4f} ranks {order.index(lr) + 1} of {len(order)} learning "
             f"rates at {at} steps (best: lr={top:g}, {there[top]:.4f})")
    return f"- lr={lr:g}: {final}; when it was stopped, {reason}"
