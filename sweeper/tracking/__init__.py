"""Trials in the team's tracker: MLflow (``tracking=mlflow``) or Weights & Biases (``tracking=wandb``).

    python train.py -m schedule=under,sweet,over tracking=mlflow      # MLFLOW_TRACKING_URI names the server
    python train.py -m schedule=under,sweet,over tracking=wandb tracking.project=my-project

The mapping (the study stays the source of truth; the tracker is a copy that people browse):

- the study is an MLflow experiment named after it / a W&B group of that name;
- each trial is one run (``trial_<n>``), opened by the sweeper when it hands the trial out
  (:func:`open_trial`); its id is kept in the trial's ``tracking_run`` user attr, which a retried trial
  inherits, so a trial resumed after a kill continues the same run;
- the run carries the trial's settings (its ``config`` system attr) as params, its train and eval curves
  (every scalar the trainer logs, at its optimizer step, through :func:`callbacks`), and when the trial
  ends (:func:`close_trial`) its state (COMPLETE / PRUNED / FAIL, tag or summary ``state``), the Optuna
  trial number (``optuna.trial_number``) and its value;
- a WSD search's branches are runs of their own tied to their trunk's run (MLflow: nested under it;
  W&B: ``job_type=branch`` with ``trunk_run`` in their config), closed with their own trial number;
- one study-level run (MLflow: the parent run of every trial run; W&B: ``job_type=summary``) gets the
  recommendation, the report (``report.html``, ``summary.md``, the curves' PNGs) and, with several studies, the
  table of datasets when the sweep ends (:func:`close_study`).

Only rank 0 logs (``RANK`` unset or 0). Credentials come only from the tools' own environment variables
(``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN``, ``WANDB_API_KEY``); a URI
with a password in it is refused. A tracker that is down or refuses the credentials costs one warning line
and the trial goes on untracked: a failed call turns tracking off for the rest of that trial, and the next
trial tries again. Nothing of MLflow or W&B is imported unless chosen.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import passwords, records

__all__ = ["BACKENDS", "Tracker", "callbacks", "check", "close_study", "close_trial", "open_trial"]

log = logging.getLogger(__name__)

BACKENDS = ("none", "mlflow", "wandb")
_EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}  # backend -> the module it needs (and the extra that installs it)


class Tracker(ABC):
    """One tracker (MLflow or W&B) as the sweep uses it. Every method may raise on a tracker that is down or
    refuses the credentials; the functions of this module catch that."""

    backend: str
    where: str  # the server / project, for messages (no secret in it)

    @abstractmethod
    def study_run(self, study: str) -> str:
        """The id of ``study``'s study-level run, created (RUNNING) if it has none."""

    @abstractmethod
    def open_run(self, study: str, *, name: str, run_id: str | None, parent: str | None, kind: str,
                 tags: dict[str, str], params: dict[str, Any], key: str | None = None) -> str:
        """Create a run of ``study`` (or continue ``run_id``, or the run tagged ``key`` under ``parent``) and
        return its id."""

    @abstractmethod
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Scalars at optimizer step ``step``."""

    @abstractmethod
    def close_run(self, run_id: str, state: str, tags: dict[str, str], metrics: dict[str, float]) -> None:
        """The run's end: its Optuna ``state`` (COMPLETE, PRUNED, FAIL; WAITING leaves it open), tags, values."""

    @abstractmethod
    def summarise(self, study: str, tags: dict[str, str], metrics: dict[str, float], note: str,
                  files: list[Path]) -> str:
        """Update the study-level run: tags, metrics, ``note`` (markdown), ``files`` as artifacts; its id."""


@dataclass
class _Trial:
    """The run of the trial this process trains now."""

    tracker: Tracker
    study: str
    number: int
    run_id: str
    name: str  # the run's name: trial_<number of the trial that opened it> (a retry keeps it)
    off: bool = False  # a call failed: the rest of this trial goes untracked
    children: dict[str, str] = field(default_factory=dict)  # branch folder -> run id


_trackers: dict[tuple, Tracker] = {}
_current: _Trial | None = None


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _settings(cfg: Any) -> dict | None:
    """``cfg.tracking`` as a plain dict, or None when tracking is off."""
    t = cfg.get("tracking") if cfg is not None else None
    if t is None or str(t.get("backend", "none")) == "none":
        return None
    return {k: (None if v is None else str(v)) for k, v in t.items()}


def check(cfg: Any) -> None:
    """Refuse, before any trial, a tracking choice that cannot work: a package not installed, a URI with a
    password in it (credentials belong in the tool's environment variables), an MLflow file store that the
    installed MLflow will not open. Raises ValueError."""
    t = _settings(cfg)
    if t is None:
        return
    backend = t["backend"]
    if backend not in BACKENDS:
        raise ValueError(f"tracking.backend must be one of {', '.join(BACKENDS)}, but got {backend!r}; "
                         "pick tracking=none, tracking=mlflow or tracking=wandb")
    import importlib.util

    if importlib.util.find_spec(_EXTRAS[backend]) is None:
        raise ValueError(f"tracking={backend} needs the {backend} package: pip install 'sft-sweep[{backend}]' "
                         f"(or pick tracking=none)")
    uri = t.get("uri")
    if uri and passwords.mask_passwords(uri) != uri:
        raise ValueError(f"tracking.uri={passwords.mask_passwords(uri)} carries a password; give the plain URI and "
                         "the credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                         "MLFLOW_TRACKING_TOKEN), which MLflow reads itself")
    if backend == "mlflow":
        _check_mlflow_store(uri)


def _check_mlflow_store(uri: str | None) -> None:
    """Refuse MLflow's file store (``file:///...``, a plain path, or MLflow's default where ``./mlruns`` holds
    runs) when the installed MLflow refuses to open one (MLflow 3: unless ``MLFLOW_ALLOW_FILE_STORE=true``):
    every trial would warn and go untracked."""
    from urllib.parse import urlparse

    import mlflow

    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow that still writes file stores
        return
    if MLFLOW_ALLOW_FILE_STORE.get():
        return
    where = "tracking.uri" if uri else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else \
        "MLflow's default (./mlruns holds runs)"
    uri = uri or mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("", "file"):
        return
    raise ValueError(f"tracking=mlflow: {where}={uri} is MLflow's file store, which MLflow {mlflow.__version__} no "
                     "longer opens; use a database (MLFLOW_TRACKING_URI=sqlite:///mlflow.db) or a server "
                     "(http://host:5000), or set MLFLOW_ALLOW_FILE_STORE=true to keep the file store")


def _tracker(t: dict) -> Tracker:
    key = tuple(sorted(t.items()))
    if key not in _trackers:
        if t["backend"] == "mlflow":
            from sweeper.tracking.mlflow import MlflowTracker

            _trackers[key] = MlflowTracker(t)
        else:
            from sweeper.tracking.wandb import WandbTracker

            _trackers[key] = WandbTracker(t)
    return _trackers[key]


def _failed(where: str, e: BaseException, what: str, then: str | None = None) -> None:
    """The one line for a tracker call that failed: where, for what, why, and what happens now."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    log.warning("tracking: %s failed for %s (%s: %s); %s", where, what, type(e).__name__,
                passwords.mask_secrets(first), then or f"{what} goes on without tracking, the study keeps it")


def _frozen(study: Any, trial: Any) -> Any:
    return records.frozen(study, records.trial_id(trial), fresh=True)  # past the cache: the job wrote attrs


def open_trial(config: Any, study: Any, trial: Any) -> None:
    """The sweeper hands ``trial`` of ``study`` to its job: open its run (or continue the one its failed run
    left, named by the inherited ``tracking_run`` attr), with the trial's settings as params. Called in the
    worker that trains it; nothing happens with ``tracking=none`` or off rank 0."""
    global _current
    _current = None
    t = _settings(config)
    if t is None or not _rank0():
        return
    number = trial.number
    what = f"trial {number}"
    try:
        tracker = _tracker(t)
        frozen = _frozen(study, trial)
        before = records.tracking_run_of(frozen)
        run_id = before.get("run_id") if before.get("backend") == tracker.backend else None
        name = before.get("name", f"trial_{number}") if run_id else f"trial_{number}"
        parent = tracker.study_run(study.study_name)
        params = dict(records.config_of(frozen) or {})
        params.update({f"param.{k}": v for k, v in frozen.params.items()})
        tags = {"sft_sweep.study": study.study_name, "sft_sweep.kind": "trial", "optuna.trial_number": str(number),
                "sft_sweep.state": "RUNNING"}
        if records.failed_trial_of(frozen) is not None:
            tags["sft_sweep.retry_of"] = str(records.failed_trial_of(frozen))
        run_id = tracker.open_run(study.study_name, name=name, run_id=run_id, parent=parent,
                                  kind="trial", tags=tags, params=params)
    except Exception as e:
        _failed(getattr(locals().get("tracker"), "where", t["backend"]), e, what)
        return
    records.set_user(study, records.trial_id(trial), records.TRACKING_RUN,
                     {"backend": tracker.backend, "run_id": run_id, "parent": parent, "name": name}, fresh=True)
    _current = _Trial(tracker, study.study_name, number, run_id, name)


def close_trial(study: Any, trial: Any) -> None:
    """The sweeper recorded how ``trial`` ended: give its run (and the runs of the WSD branches it recorded)
    the state, the trial number and the value."""
    global _current
    cur, _current = _current, None
    if cur is None or cur.off or cur.number != trial.number:
        return
    try:
        frozen = _frozen(study, trial)
        cur.tracker.close_run(cur.run_id, frozen.state.name, *_outcome(frozen))
        if frozen.params.get("method") == "wsd":  # its branches' trials, this job's and those of a killed run before it
            for t in records.all_trials(study, fresh=True):
                run = records.tracking_run_of(t)
                if records.is_branch(t) and run.get("parent") == cur.run_id:
                    cur.tracker.close_run(run["run_id"], t.state.name, *_outcome(t))
    except Exception as e:
        _failed(cur.tracker.where, e, f"trial {trial.number}")


def _outcome(t: Any) -> tuple[dict, dict]:
    """Tags and metrics of a finished trial's run."""
    tags = {"optuna.trial_number": str(t.number), "sft_sweep.state": t.state.name}
    error = records.error_of(t) or records.stopped_reason_of(t)
    if error:
        tags["sft_sweep.reason"] = passwords.mask_secrets(str(error))[:500]
    metrics = {}
    if t.values:
        metrics.update({"objective" if i == 0 else f"objective_{i}": float(v) for i, v in enumerate(t.values)})
    for k in ("best_step", "max_steps", "tokens_seen", "samples_seen", "train_runtime_s"):
        if isinstance(t.user_attrs.get(k), (int, float)):
            metrics[k] = float(t.user_attrs[k])
    return tags, metrics


def callbacks(output_dir: Path, reporter: Any) -> list:
    """The TrainerCallback that logs a training segment's scalars into the current trial's run: the trial's
    own run, or, for a WSD branch (a segment in ``branch-<s>/``), a run of its own tied to the trunk's (its
    id reaches the branch's trial through ``reporter``). Empty when no run is open."""
    cur = _current
    if cur is None or cur.off:
        return []
    run_id = cur.run_id
    folder = Path(output_dir).name
    if folder.startswith("branch-"):
        try:
            run_id = cur.children.get(folder) or cur.tracker.open_run(
                cur.study, name=f"{cur.name}/{folder}", run_id=None, parent=cur.run_id, kind="branch",
                tags={"sft_sweep.study": cur.study, "sft_sweep.kind": "branch", "sft_sweep.branch_of": str(cur.number),
                      "sft_sweep.state": "RUNNING"},
                params={"branch.max_steps": folder.split("-", 1)[1]}, key=f"{cur.run_id}/{folder}")
        except Exception as e:
            cur.off = True
            _failed(cur.tracker.where, e, f"trial {cur.number}")
            return []
        cur.children[folder] = run_id
        reporter.set_attrs({records.TRACKING_RUN: {"backend": cur.tracker.backend, "run_id": run_id,
                                                   "parent": cur.run_id, "name": f"{cur.name}/{folder}"}})
    return [_callback(cur, run_id)]


def _callback(cur: _Trial, run_id: str) -> Any:
    from transformers import TrainerCallback

    class TrackingCallback(TrainerCallback):
        """Every scalar the trainer logs (train loss, learning rate, eval metrics) at its optimizer step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if cur.off or not state.is_world_process_zero or not logs:
                return
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if not metrics:
                return
            try:
                cur.tracker.log_metrics(run_id, metrics, int(state.global_step))
            except Exception as e:
                cur.off = True
                _failed(cur.tracker.where, e, f"trial {cur.number}")

    return TrackingCallback()


def close_study(config: Any, studies: list, folder: Path) -> None:
    """The sweep ended: write the report of ``studies`` into ``<folder>/report/`` and put the recommendation,
    the report and its figures (and, with several studies, the table of datasets) on each study's run."""
    t = _settings(config)
    if t is None or not _rank0():
        return
    try:
        tracker = _tracker(t)
    except Exception as e:
        _failed(t["backend"], e, "the study runs", "they are not updated; the report is in the sweep folder")
        return
    from sweeper.report import recommend, write_report

    out = Path(folder) / "report"
    try:
        write_report(records.storage(studies[0]), out, [s.study_name for s in studies])
    except Exception as e:  # the report itself failing is not the tracker's fault, but it is no reason to stop
        log.warning("tracking: the report for the study runs could not be written (%s: %s)", type(e).__name__, e)
    files = sorted(p for p in out.glob("*") if p.suffix in (".html", ".md", ".png"))
    for study in studies:
        tags, metrics, note = {"sft_sweep.study": study.study_name, "sft_sweep.kind": "study"}, {}, ""
        try:
            rec = recommend(study) if len(study.directions) == 1 else None
        except Exception:
            rec = None
        if rec:
            note = str(rec.get("reason") or "")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics[f"recommended.{k}"] = float(v)
            if rec.get("notes"):
                note += "\n\n" + "\n".join(f"- {n}" for n in rec["notes"])
        best = [tr for tr in study.get_trials(deepcopy=False) if tr.state.name == "COMPLETE" and tr.values]
        tags["sft_sweep.trials_complete"] = str(len(best))
        if len(study.directions) == 1 and best:
            b = study.best_trial
            tags["sft_sweep.best_trial"] = str(b.number)
            metrics["best_value"] = float(b.value)
        try:
            tracker.summarise(study.study_name, tags, metrics, passwords.mask_secrets(note), files)
        except Exception as e:
            _failed(tracker.where, e, f"the summary of study {study.study_name!r}",
                    f"its run is not updated; the report is in {out}")
