"""Read studies back from storage and say which step count to train for, and why.
Imports Optuna and matplotlib, never TRL; how a trial is recorded comes from ``sweeper.storage``
(``SYSTEM_ATTRS``, ``is_branch``). The sweeper prints :func:`study_report` (and :func:`datasets_section`);
a study holding a joint (learning rate, steps) WSD search also gets :func:`joint_sections`, and its
recommendation names the learning rate with the step count.

    python train.py -m schedule=under,sweet,over   # prints study_report() at the end of the sweep
    python -m sweeper report                       # every study: table, diagnosis, winner, PNG + HTML
    python -m sweeper report --storage postgresql://user@host/db --study banking77-qwen2.5-1.5b

The modules, each importing only those above it:

- ``text``: how numbers are written; ``stored``: a trial's records read back (attrs, curves, schedule label,
  cost, the overrides that ran it, the settings its trials differ in);
- ``curves``: the noise of a curve's evaluations and its diagnosis; ``commands``: the commands to paste;
- ``recommend``: the step count to train for and the notes that qualify it; ``front``: a two-objective
  study's Pareto front and the point to pick;
- ``figures`` (PNG), ``markdown`` (the report's text), ``page`` (``report.html``) and ``write`` (the files).
"""

from __future__ import annotations

from sweeper.report.curves import (
    NOISE_FLOOR,
    Diagnosis,
    Noise,
    accuracy_disagrees,
    diagnose,
    noise_estimate,
    trial_diagnosis,
    trial_noise,
)
from sweeper.report.figures import plot_curves, plot_datasets
from sweeper.report.front import front_report, pick
from sweeper.report.markdown import (
    dataset_row,
    datasets_section,
    datasets_table,
    joint_sections,
    sftconfig_snippet,
    study_report,
)
from sweeper.report.page import markdown_html, report_html
from sweeper.report.recommend import recommend
from sweeper.report.stored import (
    accuracy_off,
    attrs,
    best_trial,
    curve_attr,
    method,
    schedule_label,
    settings_note,
    trial_rows,
)
from sweeper.report.write import write_report

__all__ = ["NOISE_FLOOR", "Diagnosis", "Noise", "accuracy_disagrees", "accuracy_off", "attrs", "best_trial", "curve_attr",
           "dataset_row", "datasets_section", "datasets_table", "diagnose", "front_report", "joint_sections",
           "markdown_html", "method", "noise_estimate", "pick", "plot_curves", "plot_datasets", "recommend",
           "report_html", "schedule_label", "settings_note", "sftconfig_snippet", "study_report", "trial_diagnosis",
           "trial_noise", "trial_rows", "write_report"]
