"""The step count for about the cost of one run: a warmup-stable-decay trunk with cooldown branches.

    python train.py schedule=wsd_search                       # one search, prints the branch table
    python train.py -m schedule=wsd_search                    # each branch becomes a trial of the study
    python train.py -m schedule=wsd_search 'schedule.wsd.candidates=[250,500,1000,1500,2000,3000]'

With cosine, 500/1500/3000 steps are three trainings. With warmup-stable-decay (Hägele et al.
2024, arXiv 2405.18392) one constant-LR trunk branches a short cooldown at each candidate length s:

- warmup W (one value for all: ``lr.warmup_steps`` if >= 1, else that fraction of the smallest
  candidate), then constant LR; branch point p_s = s - round(decay_fraction * s);
- the trunk *is* the longest candidate's run: a ``warmup_stable_decay`` trainer with max_steps=s_max
  and num_decay_steps = s_max - p_max. It stops at each shorter candidate's p_s, saves model +
  optimizer + scheduler + RNG (``checkpoint-<p_s>``), and is resumed from there later;
- branch s resumes that checkpoint in a new trainer whose scheduler is WSD(max_steps=s,
  num_decay_steps=s - p_s, same W). It loads the trunk's optimizer and the trunk's scheduler *state*
  (step count and the LR at p_s, which both schedules share) but keeps its own LR function: a
  LambdaLR's saved state never carries the function itself, so from p_s on the LR follows the
  branch's cooldown (tests/test_wsd.py checks every logged LR). transformers loads the optimizer
  only when ``scheduler.pt`` is there, so the trunk's scheduler file stays;
- sequential, in one process, ascending; after each branch, if the last ``stop_after_worse`` branch
  values are all worse than the best branch so far, the trunk stops (longer cannot help then).

Each shorter branch is recorded as its own COMPLETE trial of the study (params max_steps=s,
method=wsd; its curve = the trunk's evaluations up to p_s + its cooldown; its value = the best
evaluation after p_s, so that a trunk state from before p_s, which no cooldown annealed, never stands
for it and the stop rule sees each branch's own result) when its cooldown ends;
the job's own trial is the trunk = the longest candidate (PRUNED, with ``stopped_reason``, when
the trunk stopped early). The search's state lives in ``wsd_branches.json`` in the trunk's run dir,
so a re-run of a killed trunk skips the branches already recorded and continues from the newest
trunk checkpoint. Branch runs live in ``branch-<s>/`` subfolders. Optuna is never imported here:
the study is reached through the reporter (``sweeper.study.TrialReporter``).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, open_dict

from sweeper import config as config_mod

log = logging.getLogger(__name__)

STATE_FILE = "wsd_branches.json"
SCHEDULER = "warmup_stable_decay"


def should_stop_trunk(values: Sequence[float], stop_after_worse: int | None, maximize: bool = False) -> bool:
    """True when the last ``stop_after_worse`` branch values (in candidate order) are all worse than
    the best branch so far. ``None`` never stops; fewer values than that + 1 never stop either."""
    if stop_after_worse is None or len(values) <= stop_after_worse:
        return False
    best = max(values) if maximize else min(values)
    tail = values[-stop_after_worse:]
    return all((v < best) if maximize else (v > best) for v in tail)


def wsd_args(steps: int, branch_point: int, warmup: int, decay_type: str) -> dict:
    """SFTConfig fields of a WSD run of ``steps`` steps whose cooldown starts at ``branch_point``.
    Checkpoints are the search's own (at branch points), never rotated or chosen by best."""
    return {
        "max_steps": int(steps),
        "warmup_steps": int(warmup),
        "lr_scheduler_type": SCHEDULER,
        "lr_scheduler_kwargs": {"num_decay_steps": int(steps - branch_point), "decay_type": str(decay_type)},
        "save_strategy": "no",
        "save_total_limit": None,
        "load_best_model_at_end": False,
    }


def _pin_batch(cfg: DictConfig, batch: dict) -> DictConfig:
    """``cfg`` with the micro-batch the first segment ran fixed for every later one (``batch=auto``
    off): a resumed segment skips ``steps x accumulation`` batches of the data, which lands on the
    right rows only at the same micro-batch, and the later segments need no new probes."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.batch.auto = None
        out.batch.per_device_train_batch_size = int(batch["micro_batch"])
        out.batch.gradient_accumulation_steps = int(batch["grad_accum"])
        if batch.get("eval_batch"):
            out.batch.per_device_eval_batch_size = int(batch["eval_batch"])
    return out


def _segment_cfg(cfg: DictConfig, steps: int, warmup: int) -> DictConfig:
    """The plain-run config of one WSD run: max_steps fixed, warmup in steps, no search node."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.schedule.max_steps = int(steps)
        out.schedule.num_train_epochs = None
        out.schedule.wsd = None
        out.lr.warmup_steps = int(warmup)
        out.lr.lr_scheduler_type = SCHEDULER
    return out


def cooldown_best(curve: Sequence[Sequence[float]], branch_point: int, maximize: bool = False) -> tuple[float, int]:
    """A branch's value and its step: the best evaluation after its branch point (its cooldown, the end
    included). The trunk's evaluations before that point stay on the branch's curve but are not its
    result: they are constant-LR states, which the shorter candidates' branches cool down."""
    after = [(int(step), float(value)) for step, value in curve if step > branch_point]
    if not after:
        raise RuntimeError(f"WSD search: no evaluation after the branch point {branch_point}")
    step, value = (max if maximize else min)(after, key=lambda x: x[1])  # the first of equal values
    return value, step


class _Collect:
    """Reporter of one segment: keeps its attrs; the trunk's forwards evaluations (and pruning) to
    the job's trial, a branch's never (its curve becomes its own trial)."""

    def __init__(self, parent: Any = None) -> None:
        self.parent, self.attrs = parent, {}

    def report(self, value: float, step: int) -> None:
        if self.parent is not None:
            self.parent.report(value, step)

    def should_prune(self) -> bool:
        return self.parent is not None and self.parent.should_prune()

    def prune(self, step: int) -> None:
        self.parent.prune(step)

    def set_attrs(self, attrs: dict) -> None:
        self.attrs.update(attrs)
        if self.parent is not None:  # run_dir first of all: a re-queued trunk finds its checkpoints by it
            self.parent.set_attrs(attrs)


def _stop_at(step: int) -> Any:
    from transformers import TrainerCallback

    class StopAtBranchPoint(TrainerCallback):
        """Save model + optimizer + scheduler + RNG at the branch point and end this trunk segment."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopAtBranchPoint()


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _load_state(run_dir: Path) -> dict | None:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _save_state(run_dir: Path, state: dict) -> None:
    """Atomically: a kill mid-write leaves the previous state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(run_dir / STATE_FILE)


def _step_of(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def branch_table(state: dict, metric: str) -> str:
    """Markdown table of the search: one row per candidate."""
    lines = [f"| max_steps | branch point | cooldown steps | best {metric} | best step | trial | status |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for s in state["candidates"]:
        b = state["branches"].get(str(s), {})
        value = b.get("value")
        lines.append(f"| {s} | {b.get('branch_point', '–')} | {b.get('decay_steps', '–')} "
                     f"| {f'{value:.4f}' if value is not None else '–'} | {b.get('best_step', '–')} "
                     f"| {b.get('trial', '–') if b.get('trial') is not None else '–'} | {b.get('status', 'not run')} |")
    return "\n".join(lines)


def search(cfg: DictConfig, reporter: Any = None, job_dir: Path | None = None) -> float:
    """Run the WSD search of ``cfg.schedule.wsd`` and return the trunk's best ``eval.metric`` (the
    longest candidate), or the best branch's when no study is attached and the trunk stopped early.

    With a reporter (a multirun job) each shorter branch is recorded as a trial and the trunk is
    the job's trial; a trunk stopped early raises the reporter's ``stop`` (the trial ends PRUNED).
    """
    from sweeper.trial import Segment, _job_dir, _run, preflight

    preflight(cfg)  # config rules and data, before any model
    w = cfg.schedule.wsd
    cands = sorted(int(c) for c in w.candidates)
    f, decay_type = float(w.decay_fraction), str(w.decay_type)
    warmup = config_mod.wsd_warmup_steps(cfg)
    points = {s: config_mod.wsd_branch_point(s, f) for s in cands}
    s_max = cands[-1]
    metric = str(cfg.eval.metric)
    maximize = config_mod.metric_direction(metric) == "maximize"
    job_dir = Path(job_dir or _job_dir(cfg))

    resume = reporter.resume_checkpoint() if reporter is not None and hasattr(reporter, "resume_checkpoint") else None
    spec = {"candidates": cands, "decay_fraction": f, "decay_type": decay_type, "warmup_steps": warmup}
    state = _load_state(Path(resume).parent) if resume else None
    if state is not None and {k: state.get(k) for k in spec} != spec:
        raise config_mod.InputError(
            f"schedule.wsd: the interrupted search in {Path(resume).parent} used {({k: state.get(k) for k in spec})}, "
            f"but this run asks for {spec}; re-run with the same schedule.wsd and lr.warmup_steps")
    if state is None:
        state = {"search_id": uuid.uuid4().hex[:12], **spec, "branches": {}, "trunk_segments": []}
        resume = None  # a checkpoint without the search's state is not a trunk checkpoint
    state["run_dir"] = str(job_dir)
    _save_state(job_dir, state)
    if state.get("batch"):  # a resumed search keeps the micro-batch its first segment ran
        cfg = _pin_batch(cfg, state["batch"])
    if reporter is not None:
        reporter.set_attrs({"method": "wsd", "max_steps": s_max})
        if hasattr(reporter, "set_wsd_params"):
            reporter.set_wsd_params(s_max, cands[0], s_max)
    log.info("WSD search: candidates %s, cooldown %.0f%% (%s), warmup %d steps; branch points %s; trunk in %s%s",
             cands, 100 * f, decay_type, warmup, [points[s] for s in cands], job_dir,
             f", resuming from {resume}" if resume else "")

    trunk_cfg = _segment_cfg(cfg, s_max, warmup)
    trunk_args = wsd_args(s_max, points[s_max], warmup, decay_type)
    trunk_rep = _Collect(reporter)
    ckpt, at = resume, _step_of(resume)

    def values() -> list[float]:
        return [state["branches"][str(s)]["value"] for s in cands
                if state["branches"].get(str(s), {}).get("status") == "done"]

    def trunk_segment(until: int, final: bool) -> Segment:
        nonlocal cfg, trunk_cfg
        seg = Segment(output_dir=job_dir, args=trunk_args, resume=ckpt, final_eval=final,
                      callbacks=[] if final else [_stop_at(until)])
        _run(trunk_cfg, trunk_rep, seg)
        if not state.get("batch"):
            a = trunk_rep.attrs
            fitted = (a.get("batch_auto") or {}).get("mode") == "fitted"
            state["batch"] = {"micro_batch": a["micro_batch"], "grad_accum": a["grad_accum"],
                              "eval_batch": a["micro_batch"] if fitted else None}
            cfg = _pin_batch(cfg, state["batch"])
            trunk_cfg = _segment_cfg(cfg, s_max, warmup)
        state["trunk_segments"].append({"from": at, "to": until, "steps": until - at,
                                        "train_runtime_s": seg.results["train_runtime_s"]})
        return seg

    stopped: str | None = None
    for s in cands[:-1]:
        p = points[s]
        if str(s) in state["branches"]:
            continue
        if stopped is None and should_stop_trunk(values(), w.stop_after_worse, maximize):
            stopped = (f"trunk stopped before step {p}: the last {w.stop_after_worse} branch(es) were worse than "
                       f"the best ({'max' if maximize else 'min'} {metric} "
                       f"{(max if maximize else min)(values()):.4f}); longer runs cannot help")
        if stopped is not None:
            continue
        if p < at:
            raise RuntimeError(f"WSD search: branch {s} starts at step {p}, before the trunk checkpoint {ckpt}")
        if p > at:
            trunk_segment(p, final=False)
            old = [c for c in job_dir.glob("checkpoint-*") if c.name != f"checkpoint-{p}"]
            ckpt, at = str(job_dir / f"checkpoint-{p}"), p
            state["trunk_checkpoint"] = ckpt
            _save_state(job_dir, state)
            for c in old:  # only the newest trunk checkpoint is needed from here on
                shutil.rmtree(c, ignore_errors=True)
        branch = _branch(cfg, s, p, warmup, decay_type, ckpt, job_dir, metric)
        key = f"{state['search_id']}:{s}"
        attrs = {**branch.pop("attrs"), "method": "wsd",
                 "branch_of": getattr(reporter, "number", None), "optimizer_steps": s - p}
        number = None
        if reporter is not None and hasattr(reporter, "record_branch"):
            number = reporter.record_branch(key=key, max_steps=s, low=cands[0], high=s_max, value=branch["value"],
                                            curve=attrs["curve"], user_attrs=_jsonable(attrs))
        state["branches"][str(s)] = {**branch, "trial": number, "status": "done"}
        _save_state(job_dir, state)
        log.info("WSD branch %d (cooldown %d..%d): best %s %.4f at step %d%s", s, p, s, metric, branch["value"],
                 branch["best_step"], f"; recorded as trial {number}" if number is not None else "")

    if stopped is None and should_stop_trunk(values(), w.stop_after_worse, maximize):
        stopped = (f"trunk stopped before step {points[s_max]}: the last {w.stop_after_worse} branch(es) were "
                   f"worse than the best; longer runs cannot help")
    for s in cands:
        if stopped is not None and str(s) not in state["branches"]:
            state["branches"][str(s)] = {"max_steps": s, "branch_point": points[s], "status": f"not run: {stopped}"}

    trunk_value = None
    if stopped is None:
        seg = trunk_segment(s_max, final=True)
        trunk_value, trunk_best_step = cooldown_best(seg.results["curve"], points[s_max], maximize)
        state["branches"][str(s_max)] = {"max_steps": s_max, "branch_point": points[s_max],
                                         "decay_steps": s_max - points[s_max], "value": trunk_value,
                                         "best_step": trunk_best_step, "trial": getattr(reporter, "number", None),
                                         "status": "done (trunk)"}
    state["finished"] = True
    _save_state(job_dir, state)

    trunk_steps = sum(x["steps"] for x in state["trunk_segments"])
    cooldowns = sum(b.get("decay_steps", 0) for k, b in state["branches"].items()
                    if b.get("status") == "done")
    runtime = sum(x["train_runtime_s"] for x in state["trunk_segments"])
    summary = {
        "method": "wsd", "max_steps": s_max, "wsd": spec,
        "branches": [state["branches"][str(s)] for s in cands],
        "wsd_optimizer_steps": trunk_steps + cooldowns,
        "wsd_train_runtime_s": round(runtime + sum(b.get("train_runtime_s", 0.0) for b in state["branches"].values()
                                                   if b.get("status") == "done"), 2),
        "train_runtime_s": round(runtime, 2),  # the trunk's own segments; each branch has its own
        "resumed_from_checkpoint": resume,
        "run_dir": str(job_dir),
        "stopped_reason": stopped,
    }
    if trunk_value is not None:
        summary["best_value"], summary["best_step"] = trunk_value, trunk_best_step  # its cooldown's, as a branch's
        sft = dict(trunk_rep.attrs.get("sft_config") or {})
        sft["lr_scheduler_kwargs"] = trunk_args["lr_scheduler_kwargs"]
        summary["sft_config"] = _jsonable(sft)
    table = branch_table(state, metric)
    log.info("WSD search, %d optimizer steps in all (trunk %d + cooldowns %d):\n%s",
             summary["wsd_optimizer_steps"], trunk_steps, cooldowns, table)
    if reporter is not None:
        reporter.set_attrs(_jsonable(summary))
    else:
        print(table)
    if stopped is not None:
        if reporter is not None and hasattr(reporter, "stop"):
            reporter.stop(stopped)  # raises: the trunk trial ends PRUNED
        done = values()
        return float(max(done) if maximize else min(done))
    return trunk_value


def _branch(cfg: DictConfig, s: int, p: int, warmup: int, decay_type: str, ckpt: str, job_dir: Path,
            metric: str) -> dict:
    """The cooldown of candidate ``s`` from the trunk checkpoint at ``p``, in ``branch-<s>/``."""
    from sweeper.trial import Segment, _run

    out = job_dir / f"branch-{s}"
    if out.exists():  # a cooldown cut short by a kill: start it again
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rec = _Collect()
    args = wsd_args(s, p, warmup, decay_type)
    seg = Segment(output_dir=out, args=args, resume=ckpt, final_eval=True)
    _run(_segment_cfg(cfg, s, warmup), rec, seg)
    r = seg.results
    value, best_step = cooldown_best(r["curve"], p, config_mod.metric_direction(metric) == "maximize")
    attrs = {**rec.attrs, **r, "best_value": value, "best_step": best_step}
    attrs["curve"] = r["curve"]
    attrs["max_steps"] = s
    attrs["resumed_from_checkpoint"] = ckpt
    attrs["wsd"] = {"warmup_steps": warmup, "branch_point": p, "decay_steps": s - p, "decay_type": decay_type}
    sft = dict(attrs.get("sft_config") or {})
    sft["lr_scheduler_kwargs"] = args["lr_scheduler_kwargs"]
    attrs["sft_config"] = sft
    return {"max_steps": s, "branch_point": p, "decay_steps": s - p, "value": value,
            "best_step": best_step, "train_runtime_s": r["train_runtime_s"], "attrs": attrs}
