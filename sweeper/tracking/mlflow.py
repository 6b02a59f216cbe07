"""MLflow: a study is an experiment, its study-level run the parent of every trial run, a WSD branch a run
nested under its trunk's. Imported only with ``tracking=mlflow``.

Everything goes through ``MlflowClient`` with explicit run ids (no fluent "active run"), so that a trunk's
run and its branches' runs can be open in one process. The server is ``tracking.uri``, else
``MLFLOW_TRACKING_URI`` (MLflow's own default otherwise); MLflow reads the credentials from
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN`` itself. Unless set
already, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` is 1 and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 10 s here, so that a
server that is down costs seconds, not MLflow's default of minutes of retries.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from sweeper.tracking import Tracker

__all__ = ["MlflowTracker"]

_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}  # WAITING (a parked trunk): left RUNNING
_MAX_PARAM = 500  # characters of a param value (MLflow allows more; a long one is cut, not dropped)


def _metric_name(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)  # as transformers' MLflowCallback sanitises them


class MlflowTracker(Tracker):
    backend = "mlflow"

    def __init__(self, settings: dict) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.get("uri") or None)
        self.where = f"MLflow at {self.client.tracking_uri}"
        self._experiments: dict[str, str] = {}

    def _experiment(self, study: str) -> str:
        if study not in self._experiments:
            e = self.client.get_experiment_by_name(study)
            if e is None:
                from mlflow.exceptions import MlflowException

                try:
                    self._experiments[study] = self.client.create_experiment(study, tags={"sft_sweep.study": study})
                except MlflowException:  # another worker created it first
                    self._experiments[study] = self.client.get_experiment_by_name(study).experiment_id
            else:
                self._experiments[study] = e.experiment_id
        return self._experiments[study]

    def _find(self, study: str, tags: dict[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self._experiment(study)], filter_string=query, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def study_run(self, study: str) -> str:
        found = self._find(study, {"sft_sweep.kind": "study"})
        if found is not None:
            return found
        run = self.client.create_run(self._experiment(study), run_name=f"study {study}",
                                     tags={"sft_sweep.kind": "study", "sft_sweep.study": study})
        return run.info.run_id

    def open_run(self, study: str, *, name: str, run_id: str | None, parent: str | None, kind: str,
                 tags: dict[str, str], params: dict[str, Any], key: str | None = None) -> str:
        if run_id is None and key is not None:
            run_id = self._find(study, {"sft_sweep.key": key})
        if run_id is not None:  # a retried or resumed trial (or a branch cut short): the same run goes on
            self.client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
            return run_id
        from mlflow.entities import Param

        all_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {}), **({"sft_sweep.key": key} if key else {})}
        run = self.client.create_run(self._experiment(study), run_name=name, tags=all_tags)
        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(_metric_name(k), float(v), now, step) for k, v in metrics.items()])

    def close_run(self, run_id: str, state: str, tags: dict[str, str], metrics: dict[str, float]) -> None:
        if self.client.get_run(run_id).info.status != "RUNNING":  # closed already (a branch of an earlier job)
            return
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        if metrics:
            self.log_metrics(run_id, metrics, 0)
        if state in _STATUS:
            self.client.set_terminated(run_id, _STATUS[state])

    def summarise(self, study: str, tags: dict[str, str], metrics: dict[str, float], note: str,
                  files: list[Path]) -> str:
        run_id = self.study_run(study)
        self.client.update_run(run_id, status="RUNNING")
        for k, v in {**tags, **({"mlflow.note.content": note} if note else {})}.items():
            self.client.set_tag(run_id, k, v)
        if metrics:
            self.log_metrics(run_id, metrics, 0)
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path="report")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id
