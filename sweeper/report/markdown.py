"""The report in markdown: a study's table, diagnoses and recommendation with the ``SFTConfig`` to paste
(:func:`study_report`; a two-objective study's Pareto front from :mod:`sweeper.report.front`), a joint
(learning rate, steps) search's table (:func:`joint_sections`) and, over several studies, the table of
datasets (:func:`datasets_table`, :func:`datasets_section`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import optuna

from sweeper.halving import joint_table
from sweeper.report.curves import accuracy_disagrees, trial_diagnosis
from sweeper.report.figures import plot_datasets
from sweeper.report.front import front_report
from sweeper.report.recommend import recommend
from sweeper.report.stored import accuracy_off, attrs, params_text, settings_note, spent, trial_rows
from sweeper.report.text import count, fmt, si
from sweeper.storage import is_branch

__all__ = ["dataset_row", "datasets_section", "datasets_table", "joint_sections", "sftconfig_snippet", "study_report"]


def study_report(study: optuna.Study) -> str:
    """Markdown: the table (with diagnosis), the recommendation with its notes and the SFTConfig for it; for a
    two-objective study, its Pareto front and the point picked (``sweeper.report_front``)."""
    if len(study.directions) > 1:
        return front_report(study)
    metric = study.user_attrs.get("metric", "value")
    lines = [
        f"## {study.study_name}",
        "",
        f"| trial | schedule | method | params | max_steps | epochs | eff. batch | tokens/step | best {metric} "
        "| best step | stopped early | accuracy (step) | state | diagnosis |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = trial_rows(study)
    diagnoses = {r["trial"]: trial_diagnosis(by_number[r["trial"]]) for r in rows}
    for r in rows:
        t = by_number[r["trial"]]
        lines.append(
            f"| {r['trial']} | {fmt(r['schedule'])} | {fmt(r['method'])} | {params_text(r['params'])} "
            f"| {fmt(r['max_steps'])} "
            f"| {fmt(r['epochs'], '.2f')} | {fmt(r['effective_batch'])} | {fmt(r['tokens_per_step'], ',.0f')} "
            f"| {fmt(r['best'])} "
            f"| {fmt(r['best_step'])} | {fmt(r['stopped_early'])} | {_accuracy(t)} | {r['state']} "
            f"| {diagnoses[r['trial']].verdict} |")
    lines.append("")
    settings = settings_note(study)
    if settings:
        lines += [f"- {settings}", ""]
    off = accuracy_off(study)
    if off:
        lines += [f"- accuracy off: {off}", ""]
    for r in rows:
        t, d = by_number[r["trial"]], diagnoses[r["trial"]]
        error = f" (error: {r['error']})" if r["error"] and d.verdict != "failed" else ""
        lines.append(f"- trial {r['trial']}: {d.verdict}: {d.reason}{error}")
        flag = accuracy_disagrees(t)
        if flag:
            lines.append(f"  - note: {flag}")
    lines += joint_sections(study)
    rec = recommend(study)
    lines.append("")
    if rec is None:
        lines.append("No trial completed, so no step count can be recommended yet.")
    else:
        lr = f"lr.learning_rate={rec['learning_rate']:g}, " if rec.get("learning_rate") is not None else ""
        lines.append(f"**Recommended for {study.user_attrs.get('data', study.study_name)}: {lr}max_steps={rec['max_steps']}.** "
                     + rec["reason"])
        lines += [f"- {note}" for note in rec["notes"]]
        snippet = sftconfig_snippet(by_number[rec["trial"]])
        lines += ["", "```python", snippet, "```"]
    return "\n".join(lines)


def _accuracy(t: optuna.trial.FrozenTrial) -> str:
    a = attrs(t)
    if a.get("best_accuracy") is None:
        return "–"
    return f"{a['best_accuracy']:.1%} ({a.get('best_accuracy_step')})"


def sftconfig_snippet(trial: optuna.trial.FrozenTrial) -> str:
    """A ready-to-paste SFTConfig for the winning trial (TRL's own names)."""
    a = attrs(trial)
    cfg = a.get("sft_config")
    if not cfg:
        return f"# trial {trial.number} predates the sft_config attr; its run config is in {a.get('run_dir')}/.hydra"
    lines = ["SFTConfig("]
    if a.get("method") == "wsd":
        # The schedule that was measured: WSD with this run's cooldown (lr_scheduler_kwargs below).
        # Cosine at the same length comes close at a well-chosen LR (Hägele et al. 2024); our H100 runs
        # found its eval loss 21% below to 25% above WSD's, depending on the LR (benchmarks/RESULTS.md).
        lines = ["# warmup-stable-decay, as measured: constant LR, then the cooldown of lr_scheduler_kwargs",
                 *lines]
    for key, value in cfg.items():
        lines.append(f"    {key}={value!r},")
    lines.append(")")
    return "\n".join(lines)


def joint_sections(study: optuna.Study) -> list[str]:
    """Markdown lines for each joint (learning rate, steps) WSD search in the study: its table of rates by
    lengths (:func:`sweeper.halving.joint_table`), the winner, the cost against the full cosine grid and
    where each stopped trunk stopped. Empty when the study holds none."""
    groups: dict[str, dict[float, dict]] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        rec = t.system_attrs.get("wsd_trunk")
        if rec and not is_branch(t):  # the newest trial of a rate stands for it (a retry for its failed run)
            groups.setdefault(rec["group"], {})[float(rec["lr"])] = {**attrs(t), "state": t.state.name}
    metric = study.user_attrs.get("metric", "value")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    out = []
    for trunks in groups.values():
        any_trunk = next(iter(trunks.values()))
        rec, cands = any_trunk["wsd_trunk"], list((any_trunk.get("wsd") or {}).get("candidates") or [])
        rule = f"successive halving, eta={rec['eta']}" if rec["rule"] != "none" else "no halving"
        out += [f"### Joint search: learning rate x steps ({len(rec['learning_rates'])} rates x {len(cands)} "
                f"lengths, {rule})", "", joint_table(trunks, cands, metric, maximize), ""]
    return out


def dataset_row(study: optuna.Study) -> dict:
    """One study's answer in numbers, for the table of datasets: its data (train rows, median tokens per
    row), the recommended ``max_steps`` (:func:`recommend`) as epochs, samples and tokens of that data, its
    best value and accuracy, the noise and the shortest length within it, what the study cost and the
    one-line verdict. Keys are None where a study has no completed trial (``verdict`` says so)."""
    rec = recommend(study)
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


def datasets_table(studies: Sequence[optuna.Study]) -> str:
    """Markdown: a row per study (:func:`dataset_row`), so that the step counts of several datasets (or
    models) read side by side; each row is what that study's own report recommends."""
    rows = [dataset_row(s) for s in studies]
    metrics = {r["metric"] for r in rows}
    best = f"best {metrics.pop()}" if len(metrics) == 1 else "best value"
    lines = [f"| dataset | model | rows | tokens/row (median) | max_steps | epochs | samples | tokens | {best} "
             "| accuracy | noise ± | shortest within noise | cost | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r["data"], fmt(r["model"]), count(r["rows"]), fmt(r["tokens_per_row"], ".0f"), fmt(r["max_steps"]),
                 fmt(r["epochs"], ".2f"), count(r["samples"]), "–" if r["tokens"] is None else si(r["tokens"]),
                 fmt(r["best"]), "–" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
                 "–" if r["noise"] is None else f"±{r['noise']:.4f}",
                 "–" if r["within_noise"] is None else f"max_steps={r['within_noise']}",
                 f"{r['cost_s']:,.0f} {r['device']} s", r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def datasets_section(studies: Sequence[optuna.Study], png: Path) -> str:
    """Markdown: the table of datasets (:func:`datasets_table`) and its figure (:func:`plot_datasets`,
    written to ``png``)."""
    plot_datasets(studies, png)
    return ("## Step count per dataset\n\n" + datasets_table(studies)
            + f"\n\n![best curve of each dataset by epoch and by tokens]({png.name})\n")
