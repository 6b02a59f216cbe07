"""The report in markdown: a study's table, diagnoses and recommendation with the ``SFTConfig`` to paste
(:func:`study_report`; a two-objective study's Pareto front from :mod:`sweeper.report.front`), a joint
(learning rate, steps) search's table (:func:`joint_sections`) and, over several studies, the table of
datasets (:func:`datasets_table`, :func:`datasets_section`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import optuna

from sweeper import records
from sweeper.halving import joint_table
from sweeper.report.curves import accuracy_disagrees, trial_diagnosis
from sweeper.report.figures import plot_datasets
from sweeper.report.front import front_report
from sweeper.report.recommend import recommend
from sweeper.report.stored import accuracy_off, attrs, params_text, settings_note, spent, trial_rows
from sweeper.report.text import cell, count, escape, fmt, si
from sweeper.storage import is_branch

__all__ = ["dataset_row", "datasets_section", "datasets_table", "joint_sections", "sftconfig_snippet", "study_report"]


def study_report(study: optuna.Study, storage: str | None = None) -> str:
    """Markdown: the table (with diagnosis), the recommendation with its notes and the SFTConfig for it; for a
    two-objective study, its Pareto front and the point picked (:mod:`sweeper.report.front`). ``storage``: the
    URL the study is in, which the commands it proposes name (None: the default storage, left out). Names,
    paths and errors are escaped (:mod:`sweeper.report.text`)."""
    if len(study.directions) > 1:
        return front_report(study)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = trial_rows(study)
    diagnoses = {r["trial"]: trial_diagnosis(by_number[r["trial"]]) for r in rows}
    lines = [f"## {escape(study.study_name)}", "", *_table(study, rows, by_number, diagnoses), ""]
    settings = settings_note(study)
    if settings:
        lines += [f"- {escape(settings)}", ""]
    off = accuracy_off(study)
    if off:
        lines += [f"- accuracy off: {escape(off)}", ""]
    for r in rows:
        t, d = by_number[r["trial"]], diagnoses[r["trial"]]
        error = f" (error: {escape(r['error'])})" if r["error"] and d.verdict != "failed" else ""
        lines.append(f"- trial {r['trial']}: {d.verdict}: {escape(d.reason) if d.verdict == 'failed' else d.reason}"
                     f"{error}")
        flag = accuracy_disagrees(t)
        if flag:
            lines.append(f"  - note: {flag}")
    lines += joint_sections(study)
    rec = recommend(study, storage)
    lines.append("")
    if rec is None:
        lines.append("No trial completed, so no step count can be recommended yet.")
    else:
        lr = f"lr.learning_rate={rec['learning_rate']:g}, " if rec.get("learning_rate") is not None else ""
        data = escape(study.user_attrs.get("data", study.study_name))
        lines.append(f"**Recommended for {data}: {lr}max_steps={rec['max_steps']}.** " + rec["reason"])
        lines += [f"- {note}" for note in rec["notes"]]
        snippet = sftconfig_snippet(by_number[rec["trial"]], study.user_attrs.get("metric"),
                                    study.direction == optuna.study.StudyDirection.MAXIMIZE)
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", snippet)), default=0))
        lines += ["", f"{fence}python", snippet, fence]
    return "\n".join(lines)


def _table(study: optuna.Study, rows: Sequence[dict], by_number: dict, diagnoses: dict) -> list[str]:
    """The study's table of trials: one row per trial (:func:`sweeper.report.stored.trial_rows`)."""
    metric = study.user_attrs.get("metric", "value")
    lines = [f"| trial | schedule | method | params | max_steps | epochs | eff. batch | tokens/step | best {metric} "
             "| best step | stopped early | accuracy (step) | state | diagnosis |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        t = by_number[r["trial"]]
        lines.append(
            f"| {r['trial']} | {cell(escape(fmt(r['schedule'])))} | {cell(escape(fmt(r['method'])))} "
            f"| {cell(escape(params_text(r['params'])))} | {fmt(r['max_steps'])} "
            f"| {fmt(r['epochs'], '.2f')} | {fmt(r['effective_batch'])} | {fmt(r['tokens_per_step'], ',.0f')} "
            f"| {fmt(r['best'])} "
            f"| {fmt(r['best_step'])} | {fmt(r['stopped_early'])} | {_accuracy(t)} | {r['state']} "
            f"| {diagnoses[r['trial']].verdict} |")
    return lines


def _accuracy(t: optuna.trial.FrozenTrial) -> str:
    a = attrs(t)
    if a.get("best_accuracy") is None:
        return "–"
    return f"{a['best_accuracy']:.1%} ({a.get('best_accuracy_step')})"


# the metrics a plain SFTTrainer logs at evaluation, which metric_for_best_model can name
_TRAINER_METRICS = ("eval_loss", "eval_mean_token_accuracy")


def sftconfig_snippet(trial: optuna.trial.FrozenTrial, metric: str | None = None, maximize: bool = False) -> str:
    """A ready-to-paste SFTConfig for the winning trial (TRL 1.x / transformers 5 names): the run's settings
    (``sft_config`` attr), then its evaluation (``eval_strategy``, ``eval_steps``) with the best model kept and
    loaded at the end by ``metric`` (``metric_for_best_model``, ``greater_is_better``: ``maximize``), and the
    ``EarlyStoppingCallback`` the trial ran with (:func:`_early_stopping`), so that a run of the recommended
    length stops and ends where the trial's best did rather than at its over-trained end."""
    a = attrs(trial)
    cfg = a.get("sft_config")
    if not cfg:
        where = f"; its run config is in {a['run_dir']}/.hydra" if a.get("run_dir") else ""
        return f"# trial {trial.number} recorded no sft_config attr (it predates it, or another tool ran it){where}"
    stop = _early_stopping(trial)
    lines = ["from transformers import EarlyStoppingCallback"] if "EarlyStoppingCallback(" in stop else []
    lines += ["from trl import SFTConfig", ""]
    if a.get("method") == "wsd":
        # The schedule that was measured: WSD with this run's cooldown (lr_scheduler_kwargs below).
        # Cosine at the same length comes close at a well-chosen LR (Hägele et al. 2024); our H100 runs
        # found its eval loss 21% below to 25% above WSD's, depending on the LR (benchmarks/RESULTS.md).
        lines.append("# warmup-stable-decay, as measured: constant LR, then the cooldown of lr_scheduler_kwargs")
    lines.append("args = SFTConfig(")
    evaluation: dict = {"eval_strategy": "steps"} if cfg.get("eval_steps") else {}
    if metric and metric.startswith("eval_"):
        evaluation.update(save_strategy="best", load_best_model_at_end=True, metric_for_best_model=metric,
                          greater_is_better=bool(maximize))
    for key, value in {**cfg, **{k: v for k, v in evaluation.items() if k not in cfg}}.items():
        lines.append(f"    {key}={value!r},")
    lines.append(")")
    if metric and metric.startswith("eval_") and metric not in _TRAINER_METRICS:
        lines.append(f"# {metric} is measured by sft-sweep's own evaluation callback; a plain SFTTrainer logs "
                     f"{' and '.join(_TRAINER_METRICS)} (or add compute_metrics)")
    lines.append(stop)
    return "\n".join(lines)


def _early_stopping(trial: optuna.trial.FrozenTrial) -> str:
    """The snippet's line for early stopping, as the trial ran: the callback with its patience and threshold
    (``eval.early_stopping_patience`` / ``_threshold`` of the trial's recorded config), or why there is none."""
    if attrs(trial).get("method") == "wsd":
        return "callbacks = []  # a WSD run is not stopped early: its cooldown is part of the schedule"
    config = records.config_of(trial) or {}
    if "eval.early_stopping_patience" not in config:
        return "callbacks = []  # this trial's early stopping is not recorded (it predates the config attr)"
    patience = config["eval.early_stopping_patience"]
    if patience is None:
        return "callbacks = []  # the trial ran without early stopping (eval.early_stopping_patience=null)"
    threshold = float(config.get("eval.early_stopping_threshold") or 0.0)
    return (f"callbacks = [EarlyStoppingCallback(early_stopping_patience={int(patience)}, "
            f"early_stopping_threshold={threshold!r})]  # SFTTrainer(..., args=args, callbacks=callbacks)")


def joint_sections(study: optuna.Study) -> list[str]:
    """Markdown lines for each joint (learning rate, steps) WSD search in the study: its table of rates by
    lengths (:func:`sweeper.halving.joint_table`), the winner, the cost against the full cosine grid and
    where each stopped trunk stopped. Empty when the study holds none."""
    groups: dict[str, dict[float, dict]] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        rec = records.trunk_of(t)
        if rec and not is_branch(t):  # the newest trial of a rate stands for it (a retry for its failed run)
            groups.setdefault(rec["group"], {})[float(rec["lr"])] = {**attrs(t), "state": t.state.name}
    metric = study.user_attrs.get("metric", "value")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    out = []
    for trunks in groups.values():
        any_trunk = next(iter(trunks.values()))
        rec, cands = any_trunk[records.WSD_TRUNK], list((any_trunk.get("wsd") or {}).get("candidates") or [])
        rule = f"successive halving, eta={rec['eta']}" if rec["rule"] != "none" else "no halving"
        out += [f"### Joint search: learning rate x steps ({len(rec['learning_rates'])} rates x {len(cands)} "
                f"lengths, {rule})", "", joint_table(trunks, cands, metric, maximize), ""]
    return out


def dataset_row(study: optuna.Study, storage: str | None = None) -> dict:
    """One study's answer in numbers, for the table of datasets: its data (train rows, median tokens per
    row), the recommended ``max_steps`` (:func:`recommend`) as epochs, samples and tokens of that data, its
    best value and accuracy, the noise and the shortest length within it, what the study cost and the
    one-line verdict (markdown; its commands name the study and ``storage``, as :func:`recommend`). Keys are
    None where a study has no completed trial (``verdict`` says so)."""
    rec = recommend(study, storage)
    seconds, device = spent(study)
    row = {"study": study.study_name, "data": study.user_attrs.get("data", study.study_name),
           "model": study.user_attrs.get("model"), "metric": study.user_attrs.get("metric", "value"),
           "cost_s": seconds, "device": device, "rows": None, "tokens_per_row": None, "max_steps": None,
           "epochs": None, "samples": None, "tokens": None, "best": None, "accuracy": None, "noise": None,
           "within_noise": None, "verdict": "no trial completed yet: no step count to recommend"}
    if rec is None:
        return row
    best = next(t for t in study.get_trials(deepcopy=False) if t.number == rec["trial"])
    a, steps = attrs(best), rec["max_steps"]
    plan = a.get("plan") or {}
    spe, tps = plan.get("steps_per_epoch"), plan.get("tokens_per_step")
    eff = a.get("effective_batch") or plan.get("effective_batch")
    close = rec["within_noise"]
    row.update(rows=a.get("train_rows"), tokens_per_row=a.get("median_tokens_per_row"), max_steps=steps,
               epochs=steps / spe if steps and spe else None, samples=steps * eff if steps and eff else None,
               tokens=steps * tps if steps and tps else None, best=rec["value"], accuracy=a.get("best_accuracy"),
               noise=rec["noise"].sigma, verdict=rec["verdict"],
               within_noise=close.user_attrs.get("max_steps") if close is not None else None)
    return row


def datasets_table(studies: Sequence[optuna.Study], storage: str | None = None) -> str:
    """Markdown: a row per study (:func:`dataset_row`), so that the step counts of several datasets (or
    models) read side by side; each row is what that study's own report recommends."""
    rows = [dataset_row(s, storage) for s in studies]
    metrics = {r["metric"] for r in rows}
    best = f"best {metrics.pop()}" if len(metrics) == 1 else "best value"
    lines = [f"| dataset | model | rows | tokens/row (median) | max_steps | epochs | samples | tokens | {best} "
             "| accuracy | noise ± | shortest within noise | cost | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [escape(r["data"]), escape(fmt(r["model"])), count(r["rows"]), fmt(r["tokens_per_row"], ".0f"), fmt(r["max_steps"]),
                 fmt(r["epochs"], ".2f"), count(r["samples"]), "–" if r["tokens"] is None else si(r["tokens"]),
                 fmt(r["best"]), "–" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
                 "–" if r["noise"] is None else f"±{r['noise']:.4f}",
                 "–" if r["within_noise"] is None else f"max_steps={r['within_noise']}",
                 f"{r['cost_s']:,.0f} {r['device']} s", r["verdict"]]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines)


def datasets_section(studies: Sequence[optuna.Study], png: Path, storage: str | None = None) -> str:
    """Markdown: the table of datasets (:func:`datasets_table`; ``storage`` as there) and its figure
    (:func:`plot_datasets`, written to ``png``)."""
    plot_datasets(studies, png)
    return ("## Step count per dataset\n\n" + datasets_table(studies, storage)
            + f"\n\n![best curve of each dataset by epoch and by tokens]({png.name})\n")
