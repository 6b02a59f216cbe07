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

import dataclasses
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import halving
from sweeper import spec as spec_mod
from sweeper.callbacks import DivergedError
from sweeper.reporter import Collect, NullReporter, Parked, Reporter
from sweeper.runner import Segment, train_segment
from sweeper.spec import RunSpec, Schedule

log = logging.getLogger(__name__)

STATE_FILE = "wsd_branches.json"
SCHEDULER = "warmup_stable_decay"
POLL_S = 2.0  # a joint search's trunk waiting at a rung for trunks that train now re-reads the study this often


def should_stop_trunk(values: Sequence[float], stop_after_worse: int | None, maximize: bool = False) -> bool:
    """True when the last ``stop_after_worse`` branch values (in candidate order) are all worse than
    the best branch so far. ``None`` never stops; fewer values than that + 1 never stop either."""
    if stop_after_worse is None or len(values) <= stop_after_worse:
        return False
    best = max(values) if maximize else min(values)
    tail = values[-stop_after_worse:]
    return all((v < best) if maximize else (v > best) for v in tail)


def wsd_schedule(steps: int, branch_point: int, warmup: int, decay_type: str) -> Schedule:
    """The schedule of a WSD run of ``steps`` steps whose cooldown starts at ``branch_point``."""
    return Schedule(max_steps=int(steps), num_train_epochs=None, warmup_steps=int(warmup),
                    lr_scheduler_type=SCHEDULER,
                    lr_scheduler_kwargs={"num_decay_steps": int(steps - branch_point), "decay_type": str(decay_type)})


# SFTConfig fields of every segment: checkpoints are the search's own (at branch points), never rotated
# or chosen by best
SEGMENT_ARGS = {"save_strategy": "no", "save_total_limit": None, "load_best_model_at_end": False}


def _segment_spec(spec: RunSpec, steps: int, branch_point: int) -> RunSpec:
    """The spec of one WSD run: its schedule (at the trunk's learning rate), no early stopping (the search
    decides the length)."""
    w = spec.wsd
    schedule = dataclasses.replace(wsd_schedule(steps, branch_point, w.warmup_steps, w.decay_type),
                                   learning_rate=spec.schedule.learning_rate)
    return spec.with_schedule(schedule, early_stopping=False)


def _pin_batch(spec: RunSpec, batch: dict) -> RunSpec:
    """``spec`` with the micro-batch the first segment ran fixed for every later one (no batch=auto fit):
    a resumed segment skips ``steps x accumulation`` batches of the data, which lands on the right rows
    only at the same micro-batch, and the later segments need no new probes."""
    return spec.with_batch(int(batch["micro_batch"]), int(batch["grad_accum"]), batch.get("eval_batch"))


def cooldown_best(curve: Sequence[Sequence[float]], branch_point: int, maximize: bool = False) -> tuple[float, int]:
    """A branch's value and its step: the best evaluation after its branch point (its cooldown, the end
    included). The trunk's evaluations before that point stay on the branch's curve but are not its
    result: they are constant-LR states, which the shorter candidates' branches cool down."""
    after = [(int(step), float(value)) for step, value in curve if step > branch_point]
    if not after:
        raise RuntimeError(f"WSD search: no evaluation after the branch point {branch_point}")
    step, value = (max if maximize else min)(after, key=lambda x: x[1])  # the first of equal values
    return value, step


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


def search(cfg: DictConfig, reporter: Reporter | None = None, job_dir: Path | None = None) -> float:
    """Check and resolve ``cfg`` (``schedule=wsd_search``), load its data and run :func:`run_search`."""
    spec, splits = spec_mod.prepare(cfg)
    return run_search(spec, splits, reporter or NullReporter(), Path(job_dir or spec_mod.job_dir(cfg)))


def run_search(spec: RunSpec, splits: data_mod.Splits, reporter: Reporter, job_dir: Path) -> float:
    """Run the WSD search of ``spec.wsd`` and return the trunk's best ``eval.metric`` (the longest
    candidate), or the best branch's when the trunk stopped early and the reporter did not raise.

    In a multirun each shorter branch is recorded as a trial (``reporter.record_branch``) and the trunk
    is the job's trial; a trunk stopped early calls ``reporter.stop`` (the trial ends PRUNED). In a joint
    search (``schedule.wsd.learning_rates``) the job is the trunk of ``spec.learning_rate``; without a study
    :func:`run_joint` trains every rate's trunk in this process.
    """
    w = spec.wsd
    if w.learning_rates and reporter.number is None and not isinstance(reporter, _LocalTrunk):
        return run_joint(spec, splits, job_dir)
    if w.learning_rates and spec.learning_rate not in w.learning_rates:
        raise config_mod.InputError(
            f"lr.learning_rate={spec.learning_rate:g} is not one of schedule.wsd.learning_rates="
            f"{[float(r) for r in w.learning_rates]}; a joint search trains one trunk per listed rate")
    cands = list(w.candidates)
    f, decay_type, warmup = w.decay_fraction, w.decay_type, w.warmup_steps
    points = {s: w.branch_point(s) for s in cands}
    s_max = cands[-1]
    metric, maximize = spec.metric, spec.maximize

    resume = reporter.resume_checkpoint()
    wanted = {"candidates": cands, "decay_fraction": f, "decay_type": decay_type, "warmup_steps": warmup}
    state = _load_state(Path(resume).parent) if resume else None
    if state is not None and {k: state.get(k) for k in wanted} != wanted:
        raise config_mod.InputError(
            f"schedule.wsd: the interrupted search in {Path(resume).parent} used {({k: state.get(k) for k in wanted})}, "
            f"but this run asks for {wanted}; re-run with the same schedule.wsd and lr.warmup_steps")
    if state is None:
        state = {"search_id": uuid.uuid4().hex[:12], **wanted, "branches": {}, "trunk_segments": []}
        resume = None  # a checkpoint without the search's state is not a trunk checkpoint
    state["run_dir"] = str(job_dir)
    _save_state(job_dir, state)
    if state.get("batch"):  # a resumed search keeps the micro-batch its first segment ran
        spec = _pin_batch(spec, state["batch"])
    reporter.set_attrs({"method": "wsd", "max_steps": s_max})
    reporter.set_wsd_params(s_max, cands[0], s_max)
    joint = bool(w.learning_rates)
    lr = spec.learning_rate

    def values() -> list[float]:
        return [state["branches"][str(s)]["value"] for s in cands
                if state["branches"].get(str(s), {}).get("status") == "done"]

    def trunk_record(parked_at: int | None = None) -> dict:
        """This trunk as the other rates' trunks read it (``wsd_trunk``): its branch value at each rung."""
        return {"group": w.group, "lr": lr, "learning_rates": list(w.learning_rates), "rule": w.halving_rule,
                "eta": w.eta, "maximize": maximize, "metric": metric, "parked_at": parked_at,
                "rungs": {str(s): state["branches"][str(s)]["value"] for s in cands[:-1]
                          if state["branches"].get(str(s), {}).get("status") == "done"}}

    if joint:
        reporter.set_attrs({"wsd_trunk": trunk_record()})
    log.info("WSD search%s: candidates %s, cooldown %.0f%% (%s), warmup %d steps; branch points %s; trunk in %s%s",
             f" (trunk of lr={lr:g} of {list(w.learning_rates)}, {w.halving_rule}, eta={w.eta})" if joint else "",
             cands, 100 * f, decay_type, warmup, [points[s] for s in cands], job_dir,
             f", resuming from {resume}" if resume else "")

    trunk_spec = _segment_spec(spec, s_max, points[s_max])
    trunk_rep = Collect(reporter)
    ckpt, at = resume, _step_of(resume)

    def trunk_segment(until: int, final: bool) -> Segment:
        nonlocal spec, trunk_spec
        seg = Segment(output_dir=job_dir, args=SEGMENT_ARGS, resume=ckpt, final_eval=final, save_state=True,
                      callbacks=[] if final else [_stop_at(until)])
        train_segment(trunk_spec, splits, seg, trunk_rep)
        if not state.get("batch"):
            a = trunk_rep.attrs
            fitted = (a.get("batch_auto") or {}).get("mode") == "fitted"
            state["batch"] = {"micro_batch": a["micro_batch"], "grad_accum": a["grad_accum"],
                              "eval_batch": a["micro_batch"] if fitted else None}
            spec = _pin_batch(spec, state["batch"])
            trunk_spec = _segment_spec(spec, s_max, points[s_max])
        state["trunk_segments"].append({"from": at, "to": until, "steps": until - at,
                                        "train_runtime_s": seg.results["train_runtime_s"]})
        return seg

    def gate(rung: int, next_point: int) -> str | None:
        """Before the trunk trains past ``rung`` (whose branch is recorded): why it stops there, or None
        to go on. A joint search's halving rule may wait for the other rates' trunks, or park this one."""
        done = values()
        if should_stop_trunk(done, w.stop_after_worse, maximize):
            return (f"trunk stopped before step {next_point}: the last {w.stop_after_worse} branch(es) were worse "
                    f"than the best ({'max' if maximize else 'min'} {metric} {(max if maximize else min)(done):.4f}); "
                    "longer runs cannot help")
        if not joint:
            return None
        waited = 0.0
        while True:
            d = halving.decide(lr, rung, reporter.trunks(trunk_record()), w.eta, maximize, w.halving_rule, metric)
            if d.verdict == "continue":
                if waited:
                    log.info("WSD joint search: lr=%g goes on past the %d-step rung (waited %.0f s)", lr, rung, waited)
                return None
            if d.verdict == "stop":
                return f"trunk stopped before step {next_point}: {d.reason}"
            needs = ", ".join(f"lr={r:g}" for r in d.waiting_for)
            if not d.running:
                why = (f"parked at the {rung}-step rung: successive halving needs {needs} there, which no worker "
                       "trains now; it resumes from its checkpoint once they have")
                _save_state(job_dir, state)
                reporter.set_attrs({**_jsonable(_summary(state, cands, wanted, job_dir, resume, None)),
                                    "wsd_trunk": trunk_record(parked_at=rung)})
                log.info("WSD joint search: lr=%g %s", lr, why)
                reporter.park(why)  # raises
            if not waited:
                log.info("WSD joint search: lr=%g waits at the %d-step rung for %s (training now)", lr, rung, needs)
            time.sleep(POLL_S)
            waited += POLL_S

    stopped: str | None = None
    last: int | None = None  # the newest rung whose branch is recorded
    for s in cands[:-1]:
        p = points[s]
        if str(s) in state["branches"]:
            last = s
            continue
        if stopped is None and last is not None:
            stopped = gate(last, p)
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
        branch = _branch(spec, s, p, ckpt, job_dir, splits)
        key = f"{state['search_id']}:{s}"
        attrs = {**branch.pop("attrs"), "method": "wsd", "branch_of": reporter.number, "optimizer_steps": s - p}
        if joint:
            attrs["learning_rate"] = lr
        number = reporter.record_branch(key=key, max_steps=s, low=cands[0], high=s_max, value=branch["value"],
                                        curve=attrs["curve"], user_attrs=_jsonable(attrs))
        state["branches"][str(s)] = {**branch, "trial": number, "status": "done"}
        _save_state(job_dir, state)
        last = s
        if joint:
            reporter.set_attrs({"wsd_trunk": trunk_record()})
        log.info("WSD branch %d (cooldown %d..%d)%s: best %s %.4f at step %d%s", s, p, s,
                 f" of lr={lr:g}" if joint else "", metric, branch["value"], branch["best_step"],
                 f"; recorded as trial {number}" if number is not None else "")

    if stopped is None and last is not None:
        stopped = gate(last, points[s_max])
    for s in cands:
        if stopped is not None and str(s) not in state["branches"]:
            state["branches"][str(s)] = {"max_steps": s, "branch_point": points[s], "status": f"not run: {stopped}"}

    trunk_value = None
    if stopped is None:
        seg = trunk_segment(s_max, final=True)
        trunk_value, trunk_best_step = cooldown_best(seg.results["curve"], points[s_max], maximize)
        state["branches"][str(s_max)] = {"max_steps": s_max, "branch_point": points[s_max],
                                         "decay_steps": s_max - points[s_max], "value": trunk_value,
                                         "best_step": trunk_best_step, "trial": reporter.number,
                                         "status": "done (trunk)"}
    state["finished"] = True
    _save_state(job_dir, state)

    summary = _summary(state, cands, wanted, job_dir, resume, stopped)
    if trunk_value is not None:
        summary["best_value"], summary["best_step"] = trunk_value, trunk_best_step  # its cooldown's, as a branch's
        sft = dict(trunk_rep.attrs.get("sft_config") or {})
        sft["lr_scheduler_kwargs"] = trunk_spec.schedule.lr_scheduler_kwargs
        summary["sft_config"] = _jsonable(sft)
    table = branch_table(state, metric)
    log.info("WSD search, %d optimizer steps in all (trunk %d + cooldowns %d):\n%s", summary["wsd_optimizer_steps"],
             summary["wsd_optimizer_steps"] - summary["wsd_cooldown_steps"], summary["wsd_cooldown_steps"], table)
    if joint:
        summary["wsd_trunk"] = trunk_record()
    reporter.set_attrs(_jsonable(summary))
    if reporter.number is None and not joint:  # no study to read it from
        print(table)
    if stopped is not None:
        reporter.stop(stopped)  # a study's reporter raises: the trunk trial ends PRUNED
        done = values()
        return float(max(done) if maximize else min(done))
    return trunk_value


def _summary(state: dict, cands: list[int], wanted: dict, job_dir: Path, resume: str | None,
             stopped: str | None) -> dict:
    """The trunk trial's record of the search so far: its branches, optimizer steps and seconds."""
    trunk_steps = sum(x["steps"] for x in state["trunk_segments"])
    cooldowns = sum(b.get("decay_steps", 0) for b in state["branches"].values() if b.get("status") == "done")
    runtime = sum(x["train_runtime_s"] for x in state["trunk_segments"])
    return {
        "method": "wsd", "max_steps": cands[-1], "wsd": wanted,
        "branches": [state["branches"].get(str(s), {"max_steps": s, "status": "not run yet"}) for s in cands],
        "wsd_optimizer_steps": trunk_steps + cooldowns, "wsd_cooldown_steps": cooldowns,
        "wsd_train_runtime_s": round(runtime + sum(b.get("train_runtime_s", 0.0) for b in state["branches"].values()
                                                   if b.get("status") == "done"), 2),
        "train_runtime_s": round(runtime, 2),  # the trunk's own segments; each branch has its own
        "resumed_from_checkpoint": resume,
        "run_dir": str(job_dir),
        "stopped_reason": stopped,
    }


def _branch(spec: RunSpec, s: int, p: int, ckpt: str, job_dir: Path, splits: data_mod.Splits) -> dict:
    """The cooldown of candidate ``s`` from the trunk checkpoint at ``p``, in ``branch-<s>/``."""
    out = job_dir / f"branch-{s}"
    if out.exists():  # a cooldown cut short by a kill: start it again
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rec = Collect()
    branch_spec = _segment_spec(spec, s, p)
    seg = Segment(output_dir=out, args=SEGMENT_ARGS, resume=ckpt, final_eval=True, save_state=True)
    r = train_segment(branch_spec, splits, seg, rec)
    value, best_step = cooldown_best(r["curve"], p, spec.maximize)
    attrs = {**rec.attrs, **r, "best_value": value, "best_step": best_step}
    attrs["curve"] = r["curve"]
    attrs["max_steps"] = s
    attrs["resumed_from_checkpoint"] = ckpt
    w = spec.wsd
    attrs["wsd"] = {"warmup_steps": w.warmup_steps, "branch_point": p, "decay_steps": s - p, "decay_type": w.decay_type}
    sft = dict(attrs.get("sft_config") or {})
    sft["lr_scheduler_kwargs"] = branch_spec.schedule.lr_scheduler_kwargs
    attrs["sft_config"] = sft
    return {"max_steps": s, "branch_point": p, "decay_steps": s - p, "value": value,
            "best_step": best_step, "train_runtime_s": r["train_runtime_s"], "attrs": attrs}


class _LocalTrunk(NullReporter):
    """One learning rate's trunk of a joint search run without a study (:func:`run_joint`): its rungs are
    read by the other trunks from ``group`` (learning rate -> its record), in this process."""

    def __init__(self, group: dict[float, dict], lr: float, run_dir: Path) -> None:
        self.group, self.lr, self.run_dir = group, lr, run_dir

    def trunks(self, trunk: dict) -> list:
        self.group[self.lr]["trunk"] = trunk
        return [halving.Trunk(r, {int(k): float(v) for k, v in g["trunk"]["rungs"].items()}, live=g["end"] is None)
                for r, g in self.group.items()]

    def resume_checkpoint(self) -> str | None:
        """A parked trunk goes on from its newest whole checkpoint."""
        if not self.group[self.lr]["parked"]:
            return None
        ckpts = sorted((p for p in self.run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                       key=lambda p: int(p.name.split("-")[-1]))
        return str(ckpts[-1]) if ckpts else None

    def set_attrs(self, attrs: dict) -> None:
        self.group[self.lr]["attrs"].update(attrs)
        if "wsd_trunk" in attrs:
            self.group[self.lr]["trunk"] = attrs["wsd_trunk"]

    def stop(self, reason: str) -> None:
        self.group[self.lr]["end"] = f"stopped: {reason}"


def run_joint(spec: RunSpec, splits: data_mod.Splits, job_dir: Path) -> float:
    """A joint (learning rate, steps) search without a study (``python train.py schedule=wsd_search
    'schedule.wsd.learning_rates=[...]'``): every rate's trunk in ``job_dir/lr-<rate>/``, one at a time in
    this process. A trunk that must wait at a rung for the others parks and is resumed from its checkpoint
    once :func:`sweeper.halving.decide` has ranked it, so the trunks advance rung by rung, as synchronous
    successive halving does. Prints the table of rates by lengths and returns the best value."""
    w = spec.wsd
    group = {r: {"trunk": {"rungs": {}}, "end": None, "parked": False, "attrs": {}, "value": None}
             for r in w.learning_rates}
    while any(g["end"] is None for g in group.values()):
        progress = False
        for r, g in group.items():
            if g["end"] is not None:
                continue
            before = dict(g["trunk"]["rungs"])
            trunk_spec = spec.with_schedule(dataclasses.replace(spec.schedule, learning_rate=r))
            rep = _LocalTrunk(group, r, job_dir / f"lr-{r:g}")
            try:
                g["value"] = run_search(trunk_spec, splits, rep, rep.run_dir)
                g["end"] = g["end"] or "done"
                progress = True
            except Parked:
                g["parked"] = True
                progress = progress or g["trunk"]["rungs"] != before
            except DivergedError as e:  # this rate is too high: the others go on without it
                log.warning("WSD joint search: the trunk of lr=%g failed: %s", r, e)
                g["end"], g["attrs"]["state"], g["attrs"]["error"] = "failed", "FAIL", f"DivergedError: {e}"
                progress = True
        if not progress:
            raise RuntimeError("WSD joint search: no trunk could go on; report this as a bug")
    table = halving.joint_table({r: g["attrs"] for r, g in group.items()}, list(w.candidates), spec.metric,
                                spec.maximize)
    print(table)
    done = [(g["value"], r) for r, g in group.items() if g["value"] is not None]
    if not done:
        raise DivergedError(f"every learning rate's trunk failed ({', '.join(g['attrs'].get('error', '?') for g in group.values())})")
    return float((max if spec.maximize else min)(done)[0])
