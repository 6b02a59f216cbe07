"""Weights & Biases: a study is a group of runs in ``tracking.project`` (else ``WANDB_PROJECT``, else
``sft-sweep``), a trial one run (``job_type=trial``), a WSD branch one run (``job_type=branch``, its trunk's
run id in its config as ``trunk_run``), the study's summary one run (``job_type=summary``). Imported only with
``tracking=wandb``.

Runs are resumed by id (``resume="allow"``), several may be open in one process (``reinit="create_new"``),
and the curves use transformers' own names (``train/loss``, ``eval/loss``: ``rewrite_logs``) against
``train/global_step``, as its ``WandbCallback`` logs them. W&B reads ``WANDB_API_KEY``, ``WANDB_ENTITY``,
``WANDB_MODE`` (``offline`` writes the runs under ``WANDB_DIR`` for a later ``wandb sync``) itself.
A run's Optuna state is its summary's ``state`` and one of its tags.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

from sweeper.tracking import Tracker

__all__ = ["WandbTracker"]


def _id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, settings: dict) -> None:
        import wandb

        self.wandb = wandb
        self.project = settings.get("project") or os.environ.get("WANDB_PROJECT") or "sft-sweep"
        self.entity = settings.get("entity") or None  # None: WANDB_ENTITY, else the key's default entity
        self.mode = settings.get("mode") or None  # None: WANDB_MODE, else online
        self.where = f"W&B project {self.project}" + (f" ({self.mode})" if self.mode else "")
        self.runs: dict[str, Any] = {}

    def _init(self, run_id: str, *, study: str, name: str, job_type: str, config: dict, tags: list[str]) -> Any:
        settings = self.wandb.Settings(silent=True, console="off",
                                       init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", "30")))
        run = self.wandb.init(project=self.project, entity=self.entity, id=run_id, name=name, group=study,
                              job_type=job_type, config=config, tags=tags, resume="allow", reinit="create_new",
                              mode=self.mode, settings=settings)
        run.define_metric("train/global_step")
        run.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.runs[run_id] = run
        return run

    def study_run(self, study: str) -> str:
        return "study" + _id(f"{self.project}/{study}")[:12]

    def open_run(self, study: str, *, name: str, run_id: str | None, parent: str | None, kind: str,
                 tags: dict[str, str], params: dict[str, Any], key: str | None = None) -> str:
        if run_id is None:
            run_id = _id(key) if key is not None else uuid.uuid4().hex[:16]
        if run_id in self.runs:
            return run_id
        config = {**params, "sft_sweep": {**{k: v for k, v in tags.items() if k != "sft_sweep.state"},
                                          "parent_run": parent, "key": key}}
        if kind == "branch":
            config["trunk_run"] = parent
        run = self._init(run_id, study=study, name=name, job_type=kind, config=config, tags=[kind])
        run.config.update(config, allow_val_change=True)  # a resumed run: the settings it runs now
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from transformers.integrations.integration_utils import rewrite_logs

        self.runs[run_id].log({**rewrite_logs(metrics), "train/global_step": step})

    def close_run(self, run_id: str, state: str, tags: dict[str, str], metrics: dict[str, float]) -> None:
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        run.summary.update({**tags, **metrics, "state": state})
        run.tags = tuple(t for t in run.tags if t not in ("COMPLETE", "PRUNED", "FAIL", "WAITING")) + (state,)
        run.finish(exit_code=1 if state == "FAIL" else 0)  # a parked trunk (WAITING) is resumed by id later

    def summarise(self, study: str, tags: dict[str, str], metrics: dict[str, float], note: str,
                  files: list[Path]) -> str:
        run_id = self.study_run(study)
        run = self._init(run_id, study=study, name=f"study {study}", job_type="summary",
                         config={"sft_sweep": {"kind": "study", "study": study}}, tags=["summary"])
        run.summary.update({**tags, **metrics})
        if note:
            run.notes = note
        if files:
            artifact = self.wandb.Artifact(f"report-{_id(study)[:8]}", type="report")
            for path in files:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
        self.runs.pop(run_id, None)
        run.finish()
        return run_id
