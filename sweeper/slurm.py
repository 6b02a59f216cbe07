"""Sweep workers as SLURM jobs, through submitit. No Optuna here: ``sweeper.sweep.launchers`` decides how many
workers and watches the study; this module submits, lists and cancels the jobs.

    python train.py -m schedule=under,sweet,over hydra.sweeper.launcher=slurm \\
        hydra.sweeper.storage=postgresql://user@dbhost/sweeps hydra.sweeper.slurm.partition=gpu

Each worker job runs this same command with ``hydra.sweeper.workers=1 hydra.sweeper.launcher=local``:
it claims trials from the shared study until none is left, one GPU per job
(``hydra.sweeper.slurm.gpus_per_worker``), and SLURM sets its ``CUDA_VISIBLE_DEVICES``. Jobs go out as
one job array (ids ``<array>_<i>``); their logs are in ``<sweep dir>/slurm/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

__all__ = ["Submitter", "check"]


def check(slurm_cfg: Any, storage_url: str, gpus: list | None) -> None:
    """Refuse, in one line, what cannot work on SLURM; raises ValueError/ImportError."""
    if storage_url.startswith("sqlite"):
        raise ValueError(
            "hydra.sweeper.launcher=slurm needs a database server that every node reaches: SQLite "
            f"({storage_url.split('?')[0]}) does not survive a network file system shared by many nodes; "
            "set hydra.sweeper.storage=postgresql://user@dbhost/sweeps (pip install -e '.[postgres]')")
    if gpus is not None:
        raise ValueError("hydra.sweeper.gpus does not apply with hydra.sweeper.launcher=slurm: SLURM assigns each "
                         "worker's GPU; set hydra.sweeper.slurm.gpus_per_worker instead")
    n = int(slurm_cfg.gpus_per_worker)
    if n > 1:
        raise ValueError(f"hydra.sweeper.slurm.gpus_per_worker={n}: one trial runs on one GPU (for now); set it to 1 "
                         "and raise hydra.sweeper.workers to use more GPUs, one trial each")
    if n < 0:
        raise ValueError(f"hydra.sweeper.slurm.gpus_per_worker must be 0 (CPU jobs) or 1, but got {n}")
    if int(slurm_cfg.time_min) < 1:
        raise ValueError(f"hydra.sweeper.slurm.time_min must be >= 1 (minutes), but got {slurm_cfg.time_min}")
    if int(slurm_cfg.max_workers) < 1:
        raise ValueError(f"hydra.sweeper.slurm.max_workers must be >= 1, but got {slurm_cfg.max_workers}")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ImportError("hydra.sweeper.launcher=slurm needs submitit: pip install -e '.[slurm]'") from None
    if shutil.which("sbatch") is None:
        raise ValueError("hydra.sweeper.launcher=slurm: sbatch is not on this machine's PATH; run the sweep "
                         "from a SLURM login node (or use hydra.sweeper.launcher=local)")


def executor_parameters(slurm_cfg: Any) -> dict:
    """submitit's ``AutoExecutor.update_parameters`` keywords for one worker job."""
    from omegaconf import OmegaConf

    params: dict[str, Any] = {
        "name": "sft-sweep-worker",
        "timeout_min": int(slurm_cfg.time_min),
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": int(slurm_cfg.cpus_per_worker),
    }
    if int(slurm_cfg.gpus_per_worker) > 0:
        params["gpus_per_node"] = int(slurm_cfg.gpus_per_worker)
    if slurm_cfg.mem_gb is not None:
        params["mem_gb"] = float(slurm_cfg.mem_gb)
    for key in ("partition", "account", "qos"):
        if slurm_cfg.get(key):
            params[f"slurm_{key}"] = str(slurm_cfg[key])
    extra = OmegaConf.to_container(slurm_cfg.additional) if OmegaConf.is_config(slurm_cfg.additional) else dict(
        slurm_cfg.additional or {})
    if extra:
        params["slurm_additional_parameters"] = extra
    setup = list(slurm_cfg.setup or [])
    if setup:
        params["slurm_setup"] = setup
    return params


class Submitter:
    """Submits copies of one worker command as SLURM jobs and follows them."""

    def __init__(self, slurm_cfg: Any, folder: Path, command: list[str], env: dict, cwd: str) -> None:
        import submitit

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.command, self.env, self.cwd = command, env, cwd
        self.executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster="slurm")
        self.executor.update_parameters(**executor_parameters(slurm_cfg))
        self.jobs: list[Any] = []

    def submit(self, n: int) -> list[str]:
        """Submit ``n`` worker jobs as one array; returns their ids."""
        import submitit

        # `env NAME=value ...`: adds to the job's own environment (SLURM's CUDA_VISIBLE_DEVICES included);
        # CommandFunction(env=...) would replace it
        command = ["env", *(f"{k}={v}" for k, v in self.env.items()), *self.command]
        fn = submitit.helpers.CommandFunction(command, cwd=self.cwd, verbose=False)
        with self.executor.batch():
            jobs = [self.executor.submit(fn) for _ in range(n)]
        self.jobs += jobs
        return [j.job_id for j in jobs]

    @property
    def job_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs]

    def any_active(self) -> bool:
        """Whether any submitted job is still pending or running (submitit's view, from ``sacct``)."""
        return any(not j.done() for j in self.jobs)

    def failures(self) -> list[str]:
        """One line per job that did not end COMPLETED, naming its log."""
        out = []
        for j in self.jobs:
            state = str(j.state)
            if state.split()[0] != "COMPLETED":
                out.append(f"SLURM worker job {j.job_id} ended {state}; its log: {j.paths.stderr}")
        return out

