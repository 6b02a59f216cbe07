"""WSD trunk + cooldown branches vs the cosine grid: same winner, fewer optimizer steps?

    python benchmarks/wsd_search.py --out /tmp/wsd_bench --smoke                      # CPU, toy scale, minutes
    python benchmarks/wsd_search.py --out /root/out/wsd --workers 3 --gpus '[0,0,0]' \\
        --model-overrides 'model=qwen2.5-0.5b precision=bf16 peft=lora lr=lora'       # on a GPU

For each dataset (banking77 and gsm8k by default) it runs, through the real CLI (`train.py -m`):

1. the cosine grid of the 6 lengths (which include the 3 of the 3-point set), run to their end:
   `schedule.max_steps=<6 values> lr.lr_scheduler_type=cosine eval.early_stopping_patience=null`,
   with `hydra.sweeper.workers=N hydra.sweeper.gpus=[...]` (several workers may share one GPU);
2. the same grid as a user runs it, with the default early stopping (`conf/config.yaml`): its optimizer
   steps are those each run trained;
3. `schedule=wsd_search` with the 3-point candidates [500,1500,3000];
4. `schedule=wsd_search` with the 6-point candidates [250,500,1000,1500,2000,3000] (not with
   ``--three-only``);

each into its own SQLite study under ``--out`` (`<data>-cosine.db`, `<data>-cosine_es.db`, `<data>-wsd3.db`,
`<data>-wsd6.db`). ``--replay`` trains nothing: from a folder of studies of 1, 3 and 4 (e.g. those in
``benchmarks/wsd_runs/``) it derives 2 (early stopping applied to the full curves: it only ends a run) and
replays each search under the trunk's no-win rule (:mod:`sweeper.trunk_stop`; it only ends a trunk earlier)
and writes ``--out/wsd_search_replay.md``.
Every run uses the same integer warmup (``--warmup-steps``, default 3% of the smallest length), the
same eval cadence and the same ``--model-overrides``. It then prints and writes ``--out/wsd_search.md``:
per length the eval loss by cosine and by each WSD branch set; the winner (best length) by each
method (a search's answer: its branches and its trunk's best state before its cooldown, a constant-LR run of
that many steps, labelled as such: :func:`answer`); optimizer steps (cosine grid: the sum of its max_steps; WSD: trunk + cooldowns) and GPU time
(sum of train_runtime_s) with their ratios to the 3-point and 6-point cosine grids; and whether the
targets hold: the same winner, or the WSD winner's cosine eval loss within 1% of the cosine
winner's, at <= 70% of the 3-point grid's steps and <= 50% of the 6-point grid's; and against the
early-stopped grid (on data that over-fits): its winner, or within 1% of its best, at <= 60% of its steps. The device, date,
versions and command are recorded with the table. ``--summarise-only`` rewrites the tables from the
studies under ``--out`` and keeps the device, command, settings and wall-time lines of the run that trained
them (the H100 runs in ``benchmarks/wsd_runs/`` are re-read this way).

``--joint`` compares the learning rate and the length together, per dataset:

    python benchmarks/wsd_search.py --joint --out /tmp/joint --smoke                    # CPU, toy scale
    python benchmarks/wsd_search.py --joint --out /root/out/joint --learning-rates 1e-4,3e-4,1e-3 \
        --workers 9 --gpus '[0,0,0,0,0,0,0,0,0]' --parallel --model-overrides '...'     # on a GPU

(a) the cosine grid of every learning rate x the 3-point lengths (``lr.learning_rate=a,b,c
schedule.max_steps=500,1500,3000``, 9 runs); (b) the same grid under Optuna's Hyperband pruner
(``hydra.sweeper.pruner.name=hyperband``, min_resource ``--hyperband-min``, max_resource the longest length,
reduction factor 3); (c) the joint WSD search (``schedule=wsd_search schedule.wsd.learning_rates=[a,b,c]``,
successive halving with ``--eta``, one worker per rate). It writes ``--out/joint_search.md``: the eval loss of
every (lr, steps) by each method, each method's winner, its loss against (a)'s best, optimizer steps as a
share of (a)'s (a pruned run counts the steps to its last report) and training seconds beside them, and
whether the targets hold: (c) the same winner as (a), or its own loss within 1% of (a)'s best, at <= 35% of
(a)'s optimizer steps, and cheaper than (b) at an equal (within 1%) or better answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import run_header  # noqa: E402

GRID3 = [500, 1500, 3000]
GRID6 = [250, 500, 1000, 1500, 2000, 3000]
SMOKE3 = [8, 16, 24]
SMOKE6 = [4, 8, 12, 16, 20, 24]
# toy scale for --smoke: the tiny model, a few hundred rows, an evaluation every 4 steps
SMOKE_OVERRIDES = ["model=tiny", "data.max_train_rows=200", "data.max_eval_rows=40", "data.max_length=256",
                   "eval.eval_steps=4", "eval.logging_steps=4", "eval.accuracy_rows=8",
                   "batch.per_device_train_batch_size=4", "batch.gradient_accumulation_steps=1", "report_to=none"]


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen, Any]:
    """Start `python train.py ...` with its output (command line first) in ``log``."""
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")
    out.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    out.flush()
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "TQDM_DISABLE": "1"}), out


def _train_all(jobs: dict[str, tuple[list[str], Path]], parallel: bool) -> dict[str, float]:
    """Run the ``train.py`` commands one after another, or all at once (``--parallel``: every command its own
    process on the same GPU, as separate users of a shared box would); returns each command's wall seconds
    (from its own start, or from the common start with ``--parallel``) and raises with the logs' tails if
    any failed."""
    walls, failed = {}, []

    def finish(key: str, proc: subprocess.Popen, out: Any, log: Path, started: float) -> None:
        rc = proc.wait()
        out.close()
        walls[key] = time.time() - started
        print(f"[{key}] exited {rc} after {walls[key]:.0f} s", flush=True)
        if rc != 0:
            failed.append(f"{key} exited {rc}; log {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))

    if not parallel:
        for key, (args, log) in jobs.items():
            started = time.time()
            finish(key, *_start(args, log), log, started)
            if failed:
                break
    else:
        started = time.time()
        running = {key: (*_start(args, log), log) for key, (args, log) in jobs.items()}
        while running:  # poll, so that each command's wall time is its own finish, not the slowest before it
            for key, (proc, out, log) in list(running.items()):
                if proc.poll() is not None:
                    del running[key]
                    finish(key, proc, out, log, started)
            time.sleep(1)
    if failed:
        raise RuntimeError("\n".join(failed))
    return walls


def _study(db: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def cosine_results(study) -> dict[int, dict]:
    """length -> {value, runtime_s, steps} of the cosine grid's COMPLETE trials."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE":
            s = int(t.user_attrs["max_steps"])
            trained = t.user_attrs.get("steps_trained")  # below s when early stopping ended the run
            out[s] = {"value": t.value, "runtime_s": float(t.user_attrs.get("train_runtime_s") or 0.0),
                      "steps": int(trained) if trained is not None else s, **_curve(t)}
    return out


def _curve(trial) -> dict:
    """The step of a trial's best evaluation and its eval loss at its last evaluation (the end of the run)."""
    iv = trial.intermediate_values
    if not iv:
        return {"best_step": None, "end": None}
    return {"best_step": min(iv, key=iv.get), "end": iv[max(iv)]}


def wsd_results(study) -> tuple[dict[int, dict], dict]:
    """length -> {value} of the WSD branches (the trunk is the longest), and the search's totals, with
    ``trunk_best``: the trunk's best (step, value) before its own cooldown (:func:`_trunk_best`)."""
    per, totals = {}, {"steps": None, "runtime_s": None, "stopped": None, "trunk_best": None}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("method") != "wsd":
            continue
        if "wsd_branch_of" not in t.system_attrs and a.get("wsd_optimizer_steps") is not None:
            if t.state.name in ("COMPLETE", "PRUNED"):  # the trunk (a retried one replaces a failed one)
                totals = {"steps": int(a["wsd_optimizer_steps"]), "runtime_s": float(a.get("wsd_train_runtime_s") or 0),
                          "stopped": a.get("stopped_reason"), "trunk_best": _trunk_best(t)}
        if t.state.name == "COMPLETE":
            per[int(a["max_steps"])] = _cooldown(t)
    return per, totals


def _trunk_best(trunk, until_step: int | None = None) -> tuple[int, float] | None:
    """The trunk's best evaluation before its own cooldown (and at or before ``until_step``, a replayed stop):
    :func:`sweeper.trunk_stop.trunk_best`, computed from the curve so that studies recorded before the search
    stored it read the same. Its state there is a constant-LR run of that many steps."""
    from sweeper.trunk_stop import trunk_best

    a = trunk.user_attrs
    s = int(a["max_steps"])
    p = next(int(b["branch_point"]) for b in a.get("branches", []) if int(b["max_steps"]) == s)
    curve = sorted(trunk.intermediate_values.items())
    return trunk_best(curve, p if until_step is None else min(p, until_step))


def answer(per: dict[int, dict], trunk: tuple[int, float] | None) -> dict[int, dict]:
    """What a search hands the user, by length: each branch's value, and the trunk's best state before its
    cooldown (``trunk``: (step, value)) at its own step, where it is better than a branch of that length (or
    there is none): a constant-LR run of that many steps is a model the search measured, as early stopping
    keeps a cosine run's best checkpoint."""
    out = dict(per)
    if trunk is not None:
        step, value = trunk
        if step not in out or value < out[step]["value"]:
            out[step] = {"value": value, "best_step": step, "end": None, "trunk": True}
    return out


def _cooldown(trial) -> dict:
    """A WSD trial's result: the best evaluation after its branch point (as `sweeper.wsd.cooldown_best`
    records it; computed here from the curve so that studies recorded before that rule read the same)."""
    from sweeper.wsd import cooldown_best

    a = trial.user_attrs
    s = int(a["max_steps"])
    p = (a.get("wsd") or {}).get("branch_point")
    if p is None:  # the trunk: its own entry in the branch list
        p = next(b["branch_point"] for b in a.get("branches", []) if int(b["max_steps"]) == s)
    iv = trial.intermediate_values
    value, step = cooldown_best(sorted(iv.items()), int(p))
    return {"value": value, "best_step": step, "end": iv[max(iv)]}


def _winner(res: dict[int, dict]) -> int | None:
    done = {s: r["value"] for s, r in res.items() if r.get("value") is not None}
    return min(done, key=done.get) if done else None


def _f(x, spec=".4f"):
    return "–" if x is None else format(x, spec)


def _cell(r: dict | None, length: int) -> str:
    """'best @step', and the loss at the end of the run when the best came before it (over-fitting)."""
    if not r or r.get("value") is None:
        return "–"
    text = f"{r['value']:.4f} @{r['best_step']}" if r.get("best_step") is not None else f"{r['value']:.4f}"
    if r.get("trunk"):
        return text + " (the trunk's own state: constant LR, no cooldown)"
    if (r.get("best_step") is not None and r["best_step"] < length and r.get("end") is not None
            and f"{r['end']:.4f}" != f"{r['value']:.4f}"):
        text += f" (end {r['end']:.4f})"
    return text


def summarise(name: str, grid3: list[int], grid6: list[int], cos: dict, wsd3: tuple, wsd6: tuple,
              es: dict | None = None, six: bool = True) -> tuple[str, dict]:
    """The markdown section of one dataset and its verdicts. ``cos``: the cosine grid run to its end
    (``eval.early_stopping_patience=null``); ``es``: the same grid as a user runs it, with the default early
    stopping (its optimizer steps are those each run trained)."""
    (w3, t3), (w6, t6) = wsd3, wsd6
    es = es or {}
    lines = [f"### {name}", "", "| max_steps | cosine eval loss | cosine, early stopping (steps trained) "
             "| WSD 3-point branch | WSD 6-point branch |", "|---:|---:|---:|---:|---:|"]
    for s in sorted(set(grid6) | set(grid3)):
        e = es.get(s)
        ecell = _cell(e, s) + (f" ({e['steps']})" if e and e.get("steps") is not None else "")
        lines.append(f"| {s} | {_cell(cos.get(s), s)} | {ecell if e else '–'} | {_cell(w3.get(s), s)} "
                     f"| {_cell(w6.get(s), s)} |")
    cos3 = {s: r for s, r in cos.items() if s in grid3}
    es3 = {s: r for s, r in es.items() if s in grid3}
    es6 = {s: r for s, r in es.items() if s in grid6}
    verdicts = {}
    rows = ["", "| method | winner (max_steps) | its eval loss | vs cosine winner's loss | cosine loss at that length "
            "| that vs cosine winner "
            "| optimizer steps | vs 3-pt grid | vs 6-pt grid | vs 3-pt grid, early stopping | vs 6-pt grid, early "
            "stopping | CPU/GPU time s | vs 3-pt grid | vs 6-pt grid | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    steps3, steps6 = sum(grid3), sum(grid6)
    es_steps3 = sum(r["steps"] for r in es3.values()) if len(es3) == len(grid3) else None
    es_steps6 = sum(r["steps"] for r in es6.values()) if len(es6) == len(grid6) else None
    time3 = sum(r["runtime_s"] for r in cos3.values())
    time6 = sum(r["runtime_s"] for s, r in cos.items() if s in grid6)
    methods = [("cosine 3-pt grid", cos3, steps3, time3, cos3, None, None, None),
               ("cosine 6-pt grid", cos, steps6, time6, cos, None, None, None)]
    if es:
        methods += [("cosine 3-pt grid, early stopping", es3, es_steps3, sum(r["runtime_s"] for r in es3.values()),
                     es3, None, None, None),
                    ("cosine 6-pt grid, early stopping", es6, es_steps6, sum(r["runtime_s"] for r in es6.values()),
                     es6, None, None, None)]
    # (label, results, steps, seconds, grid whose winner it must name, limit vs that grid run to its end,
    #  the early-stopped grid, limit vs that)
    # a search's answer: its branches and its trunk's best state before its cooldown (answer())
    methods += [("WSD 3-pt", answer(w3, t3.get("trunk_best")), t3["steps"], t3["runtime_s"], cos3, 0.70, es3, 0.60),
                ("WSD 6-pt", answer(w6, t6.get("trunk_best")), t6["steps"], t6["runtime_s"], cos, 0.50, es6, 0.60)]
    if not six:  # --three-only: the 3-point grid and search only
        methods = [m for m in methods if "6-pt" not in m[0]]
    for label, res, steps, secs, grid_ref, limit, es_ref, es_limit in methods:
        win = _winner(res)
        cw = _winner(grid_ref)
        at = cos.get(win, {}).get("value") if win is not None else None
        best = cos.get(cw, {}).get("value") if cw is not None else None
        gap = (at - best) / abs(best) if at is not None and best else None
        own = res.get(win, {}).get("value") if win is not None else None
        own_gap = (own - best) / abs(best) if own is not None and best else None
        ratio_ref = steps / (steps3 if limit == 0.70 else steps6) if steps and limit else None
        es_total = (es_steps3 if es_ref is es3 else es_steps6) if es_ref is not None else None
        ok = None
        if limit is not None:
            # the target: the same winner, or the winner's own eval loss (what the search hands the user)
            # within 1% of (or below) the cosine grid's best
            ok = (win == cw or (own_gap is not None and own_gap <= 0.01)) and ratio_ref is not None and ratio_ref <= limit
            verdicts[label] = ok
            if es_ref and es_total:
                ew = _winner(es_ref)
                e_best = es_ref[ew]["value"]
                e_ok = ((win == ew or (own is not None and (own - e_best) / abs(e_best) <= 0.01))
                        and steps <= es_limit * es_total)
                verdicts[f"{label} vs early stopping"] = e_ok
        label_ok = "–" if ok is None else ("met" if ok else "NOT met")
        if f"{label} vs early stopping" in verdicts:
            label_ok += f"; vs early stopping: {'met' if verdicts[f'{label} vs early stopping'] else 'NOT met'}"
        rows.append(
            f"| {label} | {_f(win, 'd')} | {_cell(res.get(win), win) if win is not None else '–'} | {_f(own_gap, '+.2%')} | {_f(at)} "
            f"| {_f(gap, '+.2%')} | {_f(steps, ',d')} | {_f(steps / steps3 if steps else None, '.0%')} "
            f"| {_f(steps / steps6 if steps else None, '.0%')} "
            f"| {_f(steps / es_steps3 if steps and es_steps3 else None, '.0%')} "
            f"| {_f(steps / es_steps6 if steps and es_steps6 else None, '.0%')} | {_f(secs, '.1f')} "
            f"| {_f(secs / time3 if secs is not None and time3 else None, '.0%')} "
            f"| {_f(secs / time6 if secs is not None and time6 else None, '.0%')} "
            f"| {label_ok} |")
    for label, t in (("WSD 3-pt", t3), ("WSD 6-pt", t6)):
        if t.get("stopped") and (six or label == "WSD 3-pt"):
            rows.append(f"\n{label}: {t['stopped']}")
    return "\n".join(lines + rows), verdicts


def early_stopped(cos: dict[int, dict], curves: dict[int, list], patience: int, threshold: float = 0.0) -> dict:
    """The cosine grid as a user runs it, from the same runs trained to their end: transformers'
    EarlyStoppingCallback on each curve (an evaluation not better than the best so far by more than
    ``threshold`` adds one to a counter, a better one resets it; training stops at the evaluation where the
    counter reaches ``patience``). Stopping changes nothing before it, so each run is the full run up to its
    stop: its steps are those to the stop, its value the best evaluation up to there."""
    out = {}
    for s, r in cos.items():
        pts = sorted(curves[s])
        best, count, stop = None, 0, pts[-1][0] if pts else s
        for step, v in pts:
            if best is None or (v < best and abs(v - best) > threshold):
                best, count = v, 0
            else:
                count += 1
            if count >= patience:
                stop = step
                break
        kept = [(step, v) for step, v in pts if step <= stop]
        b_step, b_val = min(kept, key=lambda x: x[1])
        out[s] = {"value": b_val, "steps": stop if stop < s else s, "best_step": b_step, "end": kept[-1][1],
                  "runtime_s": r["runtime_s"] * (stop if stop < s else s) / s}
    return out


def replay_no_win(study, patience: int, margin: float, es_patience: int | None = None,
                  es_threshold: float = 0.0) -> tuple[dict[int, dict], dict]:
    """A stored WSD search replayed under the no-win rule (:func:`sweeper.trunk_stop.check`): at each trunk
    evaluation of its constant-LR phase, on the trunk's curve so far and the branches recorded by then (a
    branch at s is recorded before the trunk trains past its branch point). The rule only ends the trunk
    earlier, so the search is the stored one up to that evaluation: its steps are the trunk's to there plus
    the cooldowns recorded, its branches those recorded. Returns what :func:`wsd_results` returns, with
    ``no_win`` (the rule's reason or None) and ``stored_steps`` in the totals; seconds are not replayed."""
    from sweeper.trunk_stop import Branch, check

    per, totals = wsd_results(study)
    trunk = next(t for t in study.get_trials(deepcopy=False) if (t.user_attrs.get("method") == "wsd"
                 and "wsd_branch_of" not in t.system_attrs and t.user_attrs.get("wsd_optimizer_steps") is not None
                 and t.state.name in ("COMPLETE", "PRUNED")))
    a = trunk.user_attrs
    cands = [int(b["max_steps"]) for b in a["branches"]]
    points = {int(b["max_steps"]): int(b["branch_point"]) for b in a["branches"]}
    curve = sorted(trunk.intermediate_values.items())
    out = {**totals, "stored_steps": totals["steps"], "no_win": None}
    for i, (step, _) in enumerate(curve):
        if step > points[cands[-1]]:
            break
        done = [Branch(c, points[c], per[c]["value"]) for c in cands[:-1] if c in per and points[c] < step]
        verdict = check(curve[:i + 1], done, patience, margin, es_patience=es_patience, es_threshold=es_threshold)
        if verdict is not None:
            steps = step + sum(b.max_steps - b.branch_point for b in done)
            if steps < totals["steps"]:
                kept = {b.max_steps for b in done}
                return ({c: r for c, r in per.items() if c in kept},
                        {**out, "steps": steps, "runtime_s": None, "no_win": verdict.reason(),
                         "stopped": verdict.reason(), "trunk_best": _trunk_best(trunk, step)})
            break
    return per, out


def replay(a: argparse.Namespace, grid3: list[int], grid6: list[int]) -> int:
    """``--replay``: the fair-baseline tables from stored studies (``--out``), without training."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(ROOT / "conf" / "config.yaml")
    wsd_conf = OmegaConf.load(ROOT / "conf" / "schedule" / "wsd_search.yaml").wsd
    patience = int(conf.eval.early_stopping_patience)
    no_win, margin = int(wsd_conf.no_win_patience), float(wsd_conf.gain_margin)
    out = a.out.resolve()
    sections, verdicts = [], {}
    for ds in a.datasets:
        cstudy = _study(out / f"{ds}-cosine.db", f"{ds}-cosine")
        cos = cosine_results(cstudy)
        curves = {int(t.user_attrs["max_steps"]): sorted(t.intermediate_values.items())
                  for t in cstudy.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
        es = early_stopped(cos, curves, patience, float(conf.eval.early_stopping_threshold))
        threshold = float(conf.eval.early_stopping_threshold)
        w3 = replay_no_win(_study(out / f"{ds}-wsd3.db", f"{ds}-wsd3"), no_win, margin, patience, threshold)
        w6 = w3 if a.three_only else replay_no_win(_study(out / f"{ds}-wsd6.db", f"{ds}-wsd6"), no_win, margin,
                                                    patience, threshold)
        text, v = summarise(ds, grid3, grid6, cos, w3, w6, es, six=not a.three_only)
        stored = ", ".join(f"{label} {t['stored_steps']:,}" for label, (_, t) in
                           (("3-pt", w3), ("6-pt", w6))[:1 if a.three_only else 2])
        sections.append(text + f"\n\nStored searches (stop_after_worse only), optimizer steps: {stored}.")
        verdicts.update({f"{ds} {k}": ok for k, ok in v.items()})
    md = "\n".join([
        "## WSD search vs the cosine grid as a user runs it (replayed from stored studies)", "",
        run_header("benchmarks/wsd_search.py", sys.argv[1:]),
        f"- studies: {out}; early stopping as conf/config.yaml sets it (patience {patience}, threshold "
        f"{conf.eval.early_stopping_threshold}) applied to the cosine runs' full curves; the WSD searches replayed "
        f"under the no-win rule (no_win_patience={no_win}, gain_margin={margin}) on their trunks' curves",
        "", *sections, "",
        "Targets: " + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in verdicts.items()),
    ])
    (out / "wsd_search_replay.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


SMOKE_RATES = "1e-3,3e-3,1e-2"


def joint_grid_results(study) -> dict[tuple[float, int], dict]:
    """(lr, length) -> {value, steps, runtime_s, state} of a cosine grid's trials (COMPLETE or PRUNED): a
    pruned run's steps are those to its last report and its seconds its trial's wall time (it records no
    train_runtime_s); a finished run's, its length and train_runtime_s."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        a, iv = t.user_attrs, t.intermediate_values
        s = int(a.get("max_steps") or t.params.get("schedule.max_steps"))
        complete = t.state.name == "COMPLETE"
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0.0
        out[(float(t.params["lr.learning_rate"]), s)] = {
            "value": t.value if complete else (min(iv.values()) if iv else None),
            "steps": s if complete else (max(iv) if iv else 0),
            "runtime_s": float(a.get("train_runtime_s") or 0.0) if complete else wall,
            "state": t.state.name}
    return out


def joint_wsd_results(study) -> tuple[dict[tuple[float, int], dict], dict]:
    """(lr, length) -> {value} of a joint WSD search's branches and trunks, and its totals (optimizer steps
    and training seconds of every trunk with its cooldowns, and where trunks stopped)."""
    per, steps, secs, stopped = {}, 0, 0.0, {}
    for t in study.get_trials(deepcopy=False):
        a = {**{k: t.system_attrs[k] for k in ("wsd_trunk",) if k in t.system_attrs}, **t.user_attrs}
        if "wsd_branch_of" in t.system_attrs:
            if t.state.name == "COMPLETE":
                per[(float(t.params["lr.learning_rate"]), int(a["max_steps"]))] = {"value": t.value}
            continue
        if a.get("wsd_trunk") is None or t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        lr = float(a["wsd_trunk"]["lr"])
        steps += int(a.get("wsd_optimizer_steps") or 0)
        secs += float(a.get("wsd_train_runtime_s") or 0.0)
        if t.state.name == "COMPLETE":
            per[(lr, int(a["max_steps"]))] = {"value": t.value}
        else:
            stopped[lr] = a.get("stopped_reason")
    return per, {"steps": steps, "runtime_s": secs, "stopped": stopped}


def _best(res: dict) -> tuple | None:
    done = [(r["value"], k) for k, r in res.items() if r.get("value") is not None and r.get("state", "COMPLETE") == "COMPLETE"]
    return min(done) if done else None


def joint_summary(name: str, rates: list[float], lengths: list[int], grid: dict, hb: dict, joint: tuple) -> tuple[str, bool]:
    """The markdown section of one dataset (see the module docstring) and whether (c) met its targets."""
    per, totals = joint
    lines = [f"### {name}", "", "| lr | max_steps | (a) cosine grid | (b) Hyperband | (c) joint WSD branch |",
             "|---:|---:|---:|---:|---:|"]
    for r in rates:
        for s in lengths:
            g, h, j = grid.get((r, s), {}), hb.get((r, s), {}), per.get((r, s), {})
            hcell = _f(h.get("value")) + (f" (pruned at {h['steps']})" if h.get("state") == "PRUNED" else "")
            lines.append(f"| {r:g} | {s} | {_f(g.get('value'))} | {hcell if h else '–'} | {_f(j.get('value'))} |")
    a_steps = len(rates) * sum(lengths)
    a_secs = sum(x["runtime_s"] for x in grid.values())
    ref = _best(grid)
    rows = ["", "| method | winner (lr, max_steps) | its eval loss | vs (a)'s best | optimizer steps | % of (a) "
            "| training s | % of (a) | target |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    hb_best, hb_steps = _best(hb), sum(x["steps"] for x in hb.values())
    ok = False
    for label, res, steps, secs in [
        ("(a) cosine grid", grid, a_steps, a_secs),
        ("(b) Hyperband over (a)", hb, hb_steps, sum(x["runtime_s"] for x in hb.values())),
        ("(c) joint WSD search", per, totals["steps"], totals["runtime_s"]),
    ]:
        win = _best(res)
        gap = (win[0] - ref[0]) / abs(ref[0]) if win and ref else None
        verdict = "–"
        if label.startswith("(c)") and win and ref:
            answer = win[1] == ref[1] or (gap is not None and gap <= 0.01)
            cheap = steps <= 0.35 * a_steps
            beats_b = hb_best is None or (steps < hb_steps and win[0] <= hb_best[0] * 1.01)
            ok = answer and cheap and beats_b
            verdict = ("met" if ok else "NOT met") + (f" (answer {'ok' if answer else 'off'}, <=35% "
                                                      f"{'yes' if cheap else 'no'}, below (b) {'yes' if beats_b else 'no'})")
        rows.append(f"| {label} | {f'{win[1][0]:g}, {win[1][1]}' if win else '–'} | {_f(win[0] if win else None)} "
                    f"| {_f(gap, '+.2%')} | {steps:,} | {100 * steps / a_steps:.0f}% | {secs:.0f} "
                    f"| {100 * secs / a_secs if a_secs else 0:.0f}% | {verdict} |")
    notes = [f"- (c) lr={r:g}: {why}" for r, why in sorted(totals["stopped"].items())]
    return "\n".join(lines + rows + ([""] + notes if notes else [])), ok


def main_joint(a: argparse.Namespace, argv: list[str] | None) -> int:
    """``--joint``: (a), (b) and (c) per dataset (see the module docstring)."""
    lengths = [int(x) for x in a.grid3.split(",")] if a.grid3 else (SMOKE3 if a.smoke else GRID3)
    rates = sorted(float(x) for x in (a.learning_rates or (SMOKE_RATES if a.smoke else "1e-4,3e-4,1e-3")).split(","))
    warmup = a.warmup_steps if a.warmup_steps is not None else max(1, math.ceil(0.03 * min(lengths)))
    hb_min = a.hyperband_min or max(1, min(lengths) // 5)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"lr.warmup_steps={warmup}", "eval.early_stopping_patience=null",
              *(SMOKE_OVERRIDES if a.smoke else []), *shlex.split(a.model_overrides)]
    rate_list = ",".join(f"{r:g}" for r in rates)
    workers = [f"hydra.sweeper.workers={a.workers}", *([f"hydra.sweeper.gpus={a.gpus}"] if a.gpus else [])]
    n_joint = a.joint_workers or len(rates)
    n_hb = a.hyperband_workers or n_joint  # Hyperband prunes on what finished runs reported: as many workers as (c)
    hb_workers = [f"hydra.sweeper.workers={n_hb}", *([f"hydra.sweeper.gpus=[{','.join(['0'] * n_hb)}]"] if a.gpus else [])]
    jobs = {}
    for ds in a.datasets:
        base = [f"data={ds}", *common, f"paths.output_dir={out}/runs/{ds}", f"paths.cache_dir={out}/cache"]
        grid = ["-m", f"schedule.max_steps={','.join(map(str, lengths))}", f"lr.learning_rate={rate_list}",
                "lr.lr_scheduler_type=cosine", *workers]
        runs = {
            "grid": grid,
            "hyperband": [*grid[:-len(workers)], *hb_workers, "hydra.sweeper.pruner.name=hyperband", f"hydra.sweeper.pruner.min_resource={hb_min}",
                          f"hydra.sweeper.pruner.max_resource={max(lengths)}", "hydra.sweeper.pruner.reduction_factor=3"],
            "joint": ["-m", "schedule=wsd_search", f"schedule.wsd.candidates=[{','.join(map(str, lengths))}]",
                      f"schedule.wsd.learning_rates=[{rate_list}]", f"schedule.wsd.halving.eta={a.eta}",
                      f"schedule.wsd.decay_fraction={a.decay_fraction}",
                      f"schedule.wsd.stop_after_worse={a.stop_after_worse}", f"hydra.sweeper.workers={n_joint}",
                      *([f"hydra.sweeper.gpus=[{','.join(['0'] * n_joint)}]"] if a.gpus else [])],
        }
        for key, extra in runs.items():
            db = out / f"{ds}-{key}.db"
            args = [*extra, *base, f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweeper.study_name={ds}-{key}",
                    f"hydra.sweep.dir={out}/sweeps/{ds}-{key}"]
            print(f"[{ds}] {key}: train.py {' '.join(args)}", flush=True)
            jobs[f"{ds}-{key}"] = (args, out / "logs" / f"{ds}-{key}.log")
    walls = {} if a.summarise_only else _train_all(jobs, a.parallel)
    sections, verdicts = [], {}
    for ds in a.datasets:
        text, ok = joint_summary(ds, rates, lengths, joint_grid_results(_study(out / f"{ds}-grid.db", f"{ds}-grid")),
                                 joint_grid_results(_study(out / f"{ds}-hyperband.db", f"{ds}-hyperband")),
                                 joint_wsd_results(_study(out / f"{ds}-joint.db", f"{ds}-joint")))
        sections.append(text)
        verdicts[ds] = ok
    md_path = out / "joint_search.md"
    header = run_header("benchmarks/wsd_search.py", argv if argv is not None else sys.argv[1:])
    if a.summarise_only and md_path.exists():
        old = [ln for ln in md_path.read_text(encoding="utf-8").splitlines() if ln.startswith(("- device:", "- command:"))]
        header = "\n".join(old) or header
    md = "\n".join([
        "## Joint (learning rate, steps) search vs the cosine grid and Hyperband"
        + (" (smoke: CPU toy scale, not evidence)" if a.smoke else ""), "", header,
        f"- learning rates {rates}, lengths {lengths}; warmup {warmup} steps in every run; WSD cooldown "
        f"{a.decay_fraction:.0%} (1-sqrt), successive halving eta={a.eta}; Hyperband min_resource={hb_min}, "
        f"max_resource={max(lengths)}, reduction_factor=3; overrides: `{' '.join(common)}`",
        "- eval loss = a run's best evaluation (a WSD branch: the best after its branch point); optimizer steps: "
        "(a) the sum of the lengths, (b) each run's steps to its end or its last report before it was pruned, "
        "(c) every trunk with all its cooldowns; training s: train_runtime_s summed ((b)'s pruned runs: their "
        "trials' wall time)",
        f"- wall seconds per command: {json.dumps({k: round(v, 1) for k, v in walls.items()})}",
        "", *sections, "",
        "Targets for (c): the same winner as (a), or its own eval loss within 1% of (a)'s best, at <= 35% of (a)'s "
        "optimizer steps, and below (b)'s at an equal (within 1%) or better answer: "
        + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in verdicts.items()),
    ])
    md_path.write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the studies, runs, logs and wsd_search.md")
    p.add_argument("--datasets", nargs="+", default=["banking77", "gsm8k"], help="data= options")
    p.add_argument("--model-overrides", default="", help="overrides for every run, e.g. 'model=qwen2.5-0.5b precision=bf16'")
    p.add_argument("--workers", type=int, default=1, help="hydra.sweeper.workers for the cosine grid")
    p.add_argument("--gpus", default=None, help="hydra.sweeper.gpus for the cosine grid, e.g. '[0,0,0]'")
    p.add_argument("--grid3", default=None, help="comma list; default 500,1500,3000 (8,16,24 with --smoke)")
    p.add_argument("--grid6", default=None, help="comma list; default 250,...,3000 (4,...,24 with --smoke)")
    p.add_argument("--warmup-steps", type=int, default=None, help="lr.warmup_steps for all runs; default 3%% of the smallest length")
    p.add_argument("--decay-fraction", type=float, default=0.2)
    p.add_argument("--stop-after-worse", default="2", help="schedule.wsd.stop_after_worse (null: never stop the trunk)")
    p.add_argument("--smoke", action="store_true", help="toy scale on CPU: tiny model, 200 rows, lengths up to 24")
    p.add_argument("--summarise-only", action="store_true",
                   help="no training: read the studies already under --out and write the tables")
    p.add_argument("--joint", action="store_true",
                   help="learning rate and length together: the lr x length cosine grid, Hyperband over it, and the "
                        "joint WSD search (writes joint_search.md)")
    p.add_argument("--learning-rates", default=None, help="--joint: comma list (default 1e-4,3e-4,1e-3; smoke 1e-3,3e-3,1e-2)")
    p.add_argument("--eta", type=int, default=3, help="--joint: schedule.wsd.halving.eta")
    p.add_argument("--joint-workers", type=int, default=None, help="--joint: workers of the joint search (default: one per rate)")
    p.add_argument("--hyperband-workers", type=int, default=None, help="--joint: workers of (b) (default: --joint-workers)")
    p.add_argument("--hyperband-min", type=int, default=None, help="--joint: Hyperband's min_resource (default: 1/5 of the shortest length)")
    p.add_argument("--parallel", action="store_true",
                   help="start every command (all datasets and methods) at once, sharing the GPU; wall and GPU "
                        "seconds then include the contention, optimizer steps do not")
    p.add_argument("--replay", action="store_true",
                   help="no training: from the studies under --out (a cosine grid run to its end and the WSD "
                        "searches), the early-stopped grid and the searches under the no-win rule, replayed")
    p.add_argument("--three-only", action="store_true",
                   help="the 3-point grid and search only (no 6-point lengths): a third of the cost on CPU")
    a = p.parse_args(argv)
    if a.joint:
        return main_joint(a, argv)

    grid3 = [int(x) for x in a.grid3.split(",")] if a.grid3 else (SMOKE3 if a.smoke else GRID3)
    grid6 = [int(x) for x in a.grid6.split(",")] if a.grid6 else (SMOKE6 if a.smoke else GRID6)
    if a.three_only:
        grid6 = grid3
    if a.replay:
        return replay(a, grid3, grid6)
    warmup = a.warmup_steps if a.warmup_steps is not None else max(1, math.ceil(0.03 * min(grid6)))
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"lr.warmup_steps={warmup}", *(SMOKE_OVERRIDES if a.smoke else []), *shlex.split(a.model_overrides)]
    sections, verdicts, walls, jobs = [], {}, {}, {}
    for ds in a.datasets:
        base = [f"data={ds}", *common, f"paths.output_dir={out}/runs/{ds}", f"paths.cache_dir={out}/cache"]
        lengths = ",".join(str(s) for s in sorted(set(grid3) | set(grid6)))
        workers = [f"hydra.sweeper.workers={a.workers}", *([f"hydra.sweeper.gpus={a.gpus}"] if a.gpus else [])]
        runs = {
            "cosine": ["-m", f"schedule.max_steps={lengths}", "lr.lr_scheduler_type=cosine",
                       "eval.early_stopping_patience=null", *workers],
            # the grid as a user runs it: the default early stopping (conf/config.yaml eval.early_stopping_*)
            "cosine_es": ["-m", f"schedule.max_steps={lengths}", "lr.lr_scheduler_type=cosine", *workers],
            "wsd3": ["-m", "schedule=wsd_search", f"schedule.wsd.candidates=[{','.join(map(str, grid3))}]"],
            "wsd6": ["-m", "schedule=wsd_search", f"schedule.wsd.candidates=[{','.join(map(str, grid6))}]"],
        }
        if a.three_only:
            del runs["wsd6"]
        for key, extra in runs.items():
            if key.startswith("wsd"):
                extra += [f"schedule.wsd.decay_fraction={a.decay_fraction}", f"schedule.wsd.stop_after_worse={a.stop_after_worse}"]
            db = out / f"{ds}-{key}.db"
            args = [*extra, *base, f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweeper.study_name={ds}-{key}",
                    f"hydra.sweep.dir={out}/sweeps/{ds}-{key}"]
            print(f"[{ds}] {key}: train.py {' '.join(args)}", flush=True)
            jobs[f"{ds}-{key}"] = (args, out / "logs" / f"{ds}-{key}.log")
    walls = {} if a.summarise_only else _train_all(jobs, a.parallel)
    for ds in a.datasets:
        cos = cosine_results(_study(out / f"{ds}-cosine.db", f"{ds}-cosine"))
        w3 = wsd_results(_study(out / f"{ds}-wsd3.db", f"{ds}-wsd3"))
        w6 = w3 if a.three_only else wsd_results(_study(out / f"{ds}-wsd6.db", f"{ds}-wsd6"))
        es_db = out / f"{ds}-cosine_es.db"
        es = cosine_results(_study(es_db, f"{ds}-cosine_es")) if es_db.exists() else None
        text, v = summarise(ds, grid3, grid6, cos, w3, w6, es, six=not a.three_only)
        sections.append(text)
        verdicts.update({f"{ds} {k}": ok for k, ok in v.items()})

    lines = {
        "device": run_header("benchmarks/wsd_search.py", argv if argv is not None else sys.argv[1:]),
        "lengths": f"- lengths: 3-point {grid3}, 6-point {grid6}; warmup {warmup} steps in every run; WSD cooldown "
                   f"{a.decay_fraction:.0%} (1-sqrt), stop_after_worse={a.stop_after_worse}; overrides: `{' '.join(common)}`",
        "wall": f"- wall seconds per command: {json.dumps({k: round(v, 1) for k, v in walls.items()})}",
    }
    md_path = out / "wsd_search.md"
    if a.summarise_only and md_path.exists():
        # device, versions, command, settings and wall times stay those of the run that trained the studies
        old = md_path.read_text(encoding="utf-8").splitlines()
        pick = {key: [ln for ln in old if ln.startswith(f"- {prefix}")]
                for key, prefix in (("device", "device:"), ("command", "command:"), ("lengths", "lengths:"),
                                    ("wall", "wall seconds per command:"))}
        if pick["device"] and pick["command"]:
            lines["device"] = pick["device"][0] + "\n" + pick["command"][0]
        lines.update({key: pick[key][0] for key in ("lengths", "wall") if pick[key]})
    md = "\n".join([
        "## WSD trunk + cooldown branches vs the cosine grid" + (" (smoke: CPU toy scale, not evidence)" if a.smoke else ""),
        "", lines["device"], lines["lengths"],
        "- eval loss = a trial's best eval loss, @ the step of that evaluation, and (end …) its loss at the end of "
        "the run where the best came earlier (over-fitting); for a WSD branch, the best after its branch point "
        "(its cooldown; the trunk's evaluations before it are not its result); WSD steps = trunk + all cooldowns; GPU time = sum of "
        "train_runtime_s (cosine: its trials; WSD: trunk segments + cooldowns); 'cosine loss at that length' asks "
        "whether the WSD winner's length would also be cosine's best, which is stricter than the target",
        lines["wall"],
        "", *sections, "",
        "Targets (the same winner, or the WSD winner's own eval loss within 1% of the cosine grid's best, at <= 70% "
        "/ <= 50% of the 3-point / 6-point grid's optimizer steps; against the grid as a user runs it, with the "
        "default early stopping: its winner, or within 1% of its best, at <= 60% of its optimizer steps): "
        + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in verdicts.items()),
    ])
    md_path.write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
