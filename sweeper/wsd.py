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
  values are all worse than the best branch so far, the trunk stops (longer cannot help then); and after
  each trunk evaluation at constant LR, once no later branch can win (:mod:`sweeper.trunk_stop`, with
  ``no_win_patience`` and ``gain_margin``) the trunk stops there, between branch points;
- a joint search (``schedule.wsd.learning_rates``): one trunk per learning rate, each its own job; after
  each branch :func:`sweeper.halving.decide` says whether the trunk goes on, stops (successive halving
  across the rates' branches at that length), or waits: for trunks other workers train, or parked (the
  job ends, its trial goes back to the queue and resumes from its checkpoint once the rule has decided).
  Without a study :func:`run_joint` runs every rate's trunk in this process, rung by rung.

Each shorter branch is recorded as its own COMPLETE trial of the study (params max_steps=s,
method=wsd; its curve = the trunk's evaluations up to p_s + its cooldown; its value = the best
evaluation after p_s, so that a trunk state from before p_s, which no cooldown annealed, never stands
for it and the stop rule sees each branch's own result) when its cooldown ends. The trunk's own states
are models too (its state at step t is a t-step constant-LR run): the best of them before its own
cooldown is recorded as ``trunk_best`` (step, value), beside the branches, for the report;
the job's own trial is the trunk = the longest candidate (PRUNED, with ``stopped_reason``, when
the trunk stopped early). The search's state lives in ``wsd_branches.json`` in the trunk's run dir,
so a re-run of a killed trunk skips the branches already recorded and continues from the newest
trunk checkpoint. Branch runs live in ``branch-<s>/`` subfolders. Optuna is never imported here:
the study is reached through the reporter (``sweeper.sweep.handle.TrialReporter``).
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
from sweeper import halving, records, trunk_stop
from sweeper import spec as spec_mod
from sweeper.callbacks import DivergedError
from sweeper.reporter import Collect, NullReporter, Parked, Reporter
from sweeper.runner import Segment, train_segment
from sweeper.spec import RunSpec, Schedule

__all__ = ["SCHEDULER", "STATE_FILE", "branch_table", "cooldown_best", "run_joint", "run_search", "search",
           "should_stop_trunk", "wsd_schedule"]

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


def _no_win(search: "_Search") -> Any:
    from transformers import TrainerCallback

    class NoWinStop(TrainerCallback):
        """After each trunk evaluation in its constant-LR phase: stop the trunk once no later branch can win
        (:func:`sweeper.trunk_stop.check` on the trunk's whole eval curve and the branches recorded)."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step > search.points[search.s_max] or search.no_win is not None:
                return control
            verdict = search.no_win_check([(e["step"], e[search.spec.metric]) for e in state.log_history
                                           if search.spec.metric in e and "step" in e])
            if verdict is not None:
                search.no_win = verdict
                control.should_training_stop = True
                log.info("WSD search%s: %s", f" (lr={search.lr:g})" if search.joint else "", verdict.reason())
            return control

    return NoWinStop()


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
    :func:`run_joint` trains every rate's trunk in this process. The trunk trains to each candidate's branch
    point, branches its cooldown there, and asks :meth:`_Search.gate` before it goes on.
    """
    w = spec.wsd
    if w.learning_rates and reporter.number is None and not isinstance(reporter, _LocalTrunk):
        return run_joint(spec, splits, job_dir)
    if w.learning_rates and spec.learning_rate not in w.learning_rates:
        raise config_mod.InputError(
            f"lr.learning_rate={spec.learning_rate:g} is not one of schedule.wsd.learning_rates="
            f"{[float(r) for r in w.learning_rates]}; a joint search trains one trunk per listed rate")
    search = _Search(spec, splits, reporter, job_dir)
    stopped: str | None = None
    last: int | None = None  # the newest candidate whose branch is recorded
    for s in search.cands[:-1]:
        if search.recorded(s):
            last = s
            continue
        if stopped is None and last is not None:
            stopped = search.gate(last, search.points[s])
        if stopped is None:
            stopped = search.train_trunk_to(search.points[s])
        if stopped is None:
            search.branch(s)
            last = s
    if stopped is None and last is not None:
        stopped = search.gate(last, search.points[search.s_max])
    return search.finish(stopped)


class _Search:
    """One trunk's search: its state file (``wsd_branches.json``, so that a re-run resumes it), its trunk
    checkpoint, and the steps that :func:`run_search` takes in order."""

    def __init__(self, spec: RunSpec, splits: data_mod.Splits, reporter: Reporter, job_dir: Path) -> None:
        w = spec.wsd
        self.splits, self.reporter, self.job_dir = splits, reporter, job_dir
        self.cands = list(w.candidates)
        self.points = {s: w.branch_point(s) for s in self.cands}
        self.s_max = self.cands[-1]
        self.joint, self.lr = bool(w.learning_rates), spec.learning_rate
        resume = reporter.resume_checkpoint()
        self.wanted = {"candidates": self.cands, "decay_fraction": w.decay_fraction, "decay_type": w.decay_type,
                       "warmup_steps": w.warmup_steps}
        state = _load_state(Path(resume).parent) if resume else None
        if state is not None and {k: state.get(k) for k in self.wanted} != self.wanted:
            raise config_mod.InputError(
                f"schedule.wsd: the interrupted search in {Path(resume).parent} used "
                f"{({k: state.get(k) for k in self.wanted})}, but this run asks for {self.wanted}; re-run with the "
                "same schedule.wsd and lr.warmup_steps")
        if state is None:
            state = {"search_id": uuid.uuid4().hex[:12], **self.wanted, "branches": {}, "trunk_segments": []}
            resume = None  # a checkpoint without the search's state is not a trunk checkpoint
        self.state, self.resume = state, resume
        state["run_dir"] = str(job_dir)
        _save_state(job_dir, state)
        if state.get("batch"):  # a resumed search keeps the micro-batch its first segment ran
            spec = _pin_batch(spec, state["batch"])
        self.spec = spec
        self.trunk_spec = _segment_spec(spec, self.s_max, self.points[self.s_max])
        self.trunk_rep = Collect(reporter)
        self.ckpt, self.at = resume, _step_of(resume)
        self.no_win: trunk_stop.NoWin | None = None  # set when the trunk stopped because no branch can win
        reporter.set_attrs({"method": "wsd", "max_steps": self.s_max})
        reporter.set_wsd_params(self.s_max, self.cands[0], self.s_max)
        if self.joint:
            reporter.set_attrs({records.WSD_TRUNK: self.trunk_record()})
        log.info("WSD search%s: candidates %s, cooldown %.0f%% (%s), warmup %d steps; branch points %s; trunk in %s%s",
                 f" (trunk of lr={self.lr:g} of {list(w.learning_rates)}, {w.halving_rule}, eta={w.eta})"
                 if self.joint else "", self.cands, 100 * w.decay_fraction, w.decay_type, w.warmup_steps,
                 [self.points[s] for s in self.cands], job_dir, f", resuming from {resume}" if resume else "")

    def recorded(self, s: int) -> bool:
        return str(s) in self.state["branches"]

    def values(self) -> list[float]:
        """The recorded branch values, in candidate order."""
        return [self.state["branches"][str(s)]["value"] for s in self.cands
                if self.state["branches"].get(str(s), {}).get("status") == "done"]

    def no_win_check(self, trunk_curve: Sequence[Sequence[float]]) -> trunk_stop.NoWin | None:
        """:func:`sweeper.trunk_stop.check` of this trunk's curve against its recorded branches."""
        w = self.spec.wsd
        done = [trunk_stop.Branch(s, self.points[s], float(self.state["branches"][str(s)]["value"]))
                for s in self.cands[:-1] if self.state["branches"].get(str(s), {}).get("status") == "done"]
        e = self.spec.eval
        return trunk_stop.check(trunk_curve, done, w.no_win_patience, w.gain_margin, self.spec.maximize,
                                metric=self.spec.metric, es_patience=e.early_stopping_patience,
                                es_threshold=float(e.early_stopping_threshold or 0.0))

    def trunk_best(self) -> dict | None:
        """The trunk's best evaluation before its own cooldown (:func:`sweeper.trunk_stop.trunk_best` of its curve
        up to the longest candidate's branch point): the model a constant-LR run of that many steps trains (this
        search's warmup, then ``constant_with_warmup``). None before its first evaluation."""
        found = trunk_stop.trunk_best(self.state.get("trunk_curve") or [], self.points[self.s_max], self.spec.maximize)
        if found is None:
            return None
        return {"step": found[0], "value": found[1], "warmup_steps": self.spec.wsd.warmup_steps,
                "lr_scheduler_type": "constant_with_warmup"}

    def trunk_record(self, parked_at: int | None = None) -> dict:
        """This trunk as the other rates' trunks read it (``sweeper.records.WSD_TRUNK``): its branch value at each rung."""
        w = self.spec.wsd
        return {"group": w.group, "lr": self.lr, "learning_rates": list(w.learning_rates), "rule": w.halving_rule,
                "eta": w.eta, "maximize": self.spec.maximize, "metric": self.spec.metric, records.PARKED_AT: parked_at,
                "rungs": {str(s): self.state["branches"][str(s)]["value"] for s in self.cands[:-1]
                          if self.state["branches"].get(str(s), {}).get("status") == "done"}}

    def trunk_segment(self, until: int, final: bool) -> Segment:
        """Train the trunk from its checkpoint to ``until`` (``final``: to its end, with its cooldown)."""
        seg = Segment(output_dir=self.job_dir, args=SEGMENT_ARGS, resume=self.ckpt, final_eval=final,
                      save_state=True, callbacks=[_no_win(self)] + ([] if final else [_stop_at(until)]))
        train_segment(self.trunk_spec, self.splits, seg, self.trunk_rep)
        if not self.state.get("batch"):
            a = self.trunk_rep.attrs
            fitted = (a.get("batch_auto") or {}).get("mode") == "fitted"
            self.state["batch"] = {"micro_batch": a["micro_batch"], "grad_accum": a["grad_accum"],
                                   "eval_batch": a["micro_batch"] if fitted else None}
            self.spec = _pin_batch(self.spec, self.state["batch"])
            self.trunk_spec = _segment_spec(self.spec, self.s_max, self.points[self.s_max])
        reached = int(seg.results.get("steps_trained") or until)
        kept = {int(st): v for st, v in self.state.get("trunk_curve", [])}  # a re-run segment replaces its steps
        kept.update({int(st): float(v) for st, v in seg.results.get("curve") or []})
        self.state["trunk_curve"] = sorted([st, v] for st, v in kept.items())
        self.state["trunk_best"] = self.trunk_best()
        self.state["trunk_segments"].append({"from": self.at, "to": reached, "steps": reached - self.at,
                                             "train_runtime_s": seg.results["train_runtime_s"]})
        if self.no_win is not None:
            self.state["trunk_stop"] = self.no_win.record()
        return seg

    def train_trunk_to(self, p: int) -> str | None:
        """The trunk to the branch point ``p``, saved there; older trunk checkpoints are removed. Returns why
        the trunk stopped before ``p`` (no later branch can win: :mod:`sweeper.trunk_stop`), else None."""
        if p < self.at:
            raise RuntimeError(f"WSD search: a branch starts at step {p}, before the trunk checkpoint {self.ckpt}")
        if p == self.at:
            return None
        self.trunk_segment(p, final=False)
        if self.no_win is not None:
            _save_state(self.job_dir, self.state)
            return self.no_win.reason()
        old = [c for c in self.job_dir.glob("checkpoint-*") if c.name != f"checkpoint-{p}"]
        self.ckpt, self.at = str(self.job_dir / f"checkpoint-{p}"), p
        self.state["trunk_checkpoint"] = self.ckpt
        _save_state(self.job_dir, self.state)
        for c in old:  # only the newest trunk checkpoint is needed from here on
            shutil.rmtree(c, ignore_errors=True)
        return None

    def branch(self, s: int) -> None:
        """Cool down candidate ``s`` from the trunk checkpoint and record it (a trial of the study)."""
        p, rep = self.points[s], self.reporter
        branch = _branch(self.spec, s, p, self.ckpt, self.job_dir, self.splits)
        attrs = {**branch.pop("attrs"), "method": "wsd", "branch_of": rep.number, "optimizer_steps": s - p}
        if self.joint:
            attrs["learning_rate"] = self.lr
        number = rep.record_branch(key=f"{self.state['search_id']}:{s}", max_steps=s, low=self.cands[0],
                                   high=self.s_max, value=branch["value"], curve=attrs["curve"],
                                   user_attrs=_jsonable(attrs))
        self.state["branches"][str(s)] = {**branch, "trial": number, "status": "done"}
        _save_state(self.job_dir, self.state)
        if self.joint:
            rep.set_attrs({records.WSD_TRUNK: self.trunk_record()})
        log.info("WSD branch %d (cooldown %d..%d)%s: best %s %.4f at step %d%s", s, p, s,
                 f" of lr={self.lr:g}" if self.joint else "", self.spec.metric, branch["value"], branch["best_step"],
                 f"; recorded as trial {number}" if number is not None else "")

    def gate(self, rung: int, next_point: int) -> str | None:
        """Before the trunk trains past ``rung`` (whose branch is recorded): why it stops there, or None
        to go on. A joint search's halving rule may wait for the other rates' trunks, or park this one."""
        w, maximize, metric = self.spec.wsd, self.spec.maximize, self.spec.metric
        done = self.values()
        if should_stop_trunk(done, w.stop_after_worse, maximize):
            return (f"trunk stopped before step {next_point}: the last {w.stop_after_worse} branch(es) were worse "
                    f"than the best ({'max' if maximize else 'min'} {metric} {(max if maximize else min)(done):.4f}); "
                    "longer runs cannot help")
        if not self.joint:
            return None
        waited = 0.0
        while True:
            d = halving.decide(self.lr, rung, self.reporter.trunks(self.trunk_record()), w.eta, maximize,
                               w.halving_rule, metric)
            if d.verdict == "continue":
                if waited:
                    log.info("WSD joint search: lr=%g goes on past the %d-step rung (waited %.0f s)", self.lr, rung,
                             waited)
                return None
            if d.verdict == "stop":
                return f"trunk stopped before step {next_point}: {d.reason}"
            needs = ", ".join(f"lr={r:g}" for r in d.waiting_for)
            if not d.running:
                why = (f"parked at the {rung}-step rung: successive halving needs {needs} there, which no worker "
                       "trains now; it resumes from its checkpoint once they have")
                _save_state(self.job_dir, self.state)
                self.reporter.set_attrs({**_jsonable(_summary(self.state, self.cands, self.wanted, self.job_dir,
                                                              self.resume, None)),
                                         records.WSD_TRUNK: self.trunk_record(parked_at=rung)})
                log.info("WSD joint search: lr=%g %s", self.lr, why)
                self.reporter.park(why)  # raises
            if not waited:
                log.info("WSD joint search: lr=%g waits at the %d-step rung for %s (training now)", self.lr, rung, needs)
            time.sleep(POLL_S)
            waited += POLL_S

    def finish(self, stopped: str | None) -> float:
        """The trunk's own length (unless ``stopped``), the search's record on the trial, and its value."""
        state, metric, maximize, s_max = self.state, self.spec.metric, self.spec.maximize, self.s_max
        for s in self.cands:
            if stopped is not None and str(s) not in state["branches"]:
                state["branches"][str(s)] = {"max_steps": s, "branch_point": self.points[s],
                                             "status": f"not run: {stopped}"}
        trunk_value = None
        if stopped is None:
            seg = self.trunk_segment(s_max, final=True)
            if self.no_win is not None:  # stopped before its own cooldown: not a result of the longest length
                stopped = self.no_win.reason()
                state["branches"][str(s_max)] = {"max_steps": s_max, "branch_point": self.points[s_max],
                                                 "status": f"not run: {stopped}"}
        if stopped is None:
            trunk_value, trunk_best_step = cooldown_best(seg.results["curve"], self.points[s_max], maximize)
            state["branches"][str(s_max)] = {"max_steps": s_max, "branch_point": self.points[s_max],
                                             "decay_steps": s_max - self.points[s_max], "value": trunk_value,
                                             "best_step": trunk_best_step, "trial": self.reporter.number,
                                             "status": "done (trunk)"}
        state["finished"] = True
        _save_state(self.job_dir, state)
        summary = _summary(state, self.cands, self.wanted, self.job_dir, self.resume, stopped)
        if trunk_value is not None:
            summary["best_value"], summary["best_step"] = trunk_value, trunk_best_step  # its cooldown's, as a branch's
            sft = dict(self.trunk_rep.attrs.get("sft_config") or {})
            sft["lr_scheduler_kwargs"] = self.trunk_spec.schedule.lr_scheduler_kwargs
            summary["sft_config"] = _jsonable(sft)
        table = branch_table(state, metric)
        tb = state.get("trunk_best")
        if tb is not None:
            table += (f"\n\nThe trunk's own best state before its cooldown: {metric} {tb['value']:.4f} at step {tb['step']} "
                      f"(constant LR after a {tb['warmup_steps']}-step warmup, no cooldown: the model of a "
                      f"{tb['step']}-step run with lr.lr_scheduler_type=constant_with_warmup)")
        log.info("WSD search, %d optimizer steps in all (trunk %d + cooldowns %d):\n%s", summary["wsd_optimizer_steps"],
                 summary["wsd_optimizer_steps"] - summary["wsd_cooldown_steps"], summary["wsd_cooldown_steps"], table)
        if self.joint:
            summary[records.WSD_TRUNK] = self.trunk_record()
        self.reporter.set_attrs(_jsonable(summary))
        if self.reporter.number is None and not self.joint:  # no study to read it from
            print(table)
        if stopped is not None:
            self.reporter.stop(stopped)  # a study's reporter raises: the trunk trial ends PRUNED
            done = self.values()
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
        records.RUN_DIR: str(job_dir),
        records.STOPPED_REASON: stopped,
        "trunk_stop": state.get("trunk_stop"),  # the no-win rule's facts (sweeper.trunk_stop.NoWin), when it stopped
        "trunk_best": state.get("trunk_best"),  # the trunk's best state before its cooldown (_Search.trunk_best)
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
        from sweeper import checkpoints

        return checkpoints.newest_resumable(self.run_dir, f"the parked trunk at lr {self.lr:g}")

    def set_attrs(self, attrs: dict) -> None:
        self.group[self.lr]["attrs"].update(attrs)
        if records.WSD_TRUNK in attrs:
            self.group[self.lr]["trunk"] = attrs[records.WSD_TRUNK]

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
                g["end"], g["attrs"]["state"], g["attrs"][records.ERROR] = "failed", "FAIL", f"DivergedError: {e}"
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
