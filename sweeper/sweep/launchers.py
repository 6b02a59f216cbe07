"""The workers of a sweep: how many (:func:`plan`) and where they run: :class:`LocalWorkers` (processes of this
host) or :class:`SlurmWorkers` (SLURM jobs), both a :class:`Workers`.

    python train.py -m schedule=under,sweet,over hydra.sweeper.workers=2            # this process + one more
    python train.py -m schedule=under,sweet,over hydra.sweeper.launcher=slurm       # SLURM jobs, watched here

Every worker but this process runs the same command with one worker (:meth:`Workers.worker_command`): the
storage URL without its password, which it gets as ``PGPASSWORD`` with the other secret values in its
environment (:meth:`Workers.worker_env`), never on a command line. Locally this process is worker 0 and runs
trials itself (``sweeper.sweep.loop``), each other worker sees one GPU (``sweeper.workers`` plans them on free
memory) and logs to ``worker<i>.log``; with SLURM every worker is a job (``sweeper.slurm``) and this process
watches the studies, replacing the workers once all have ended with trials left.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from tqdm.auto import tqdm

from sweeper import config as config_mod
from sweeper import gpu as gpu_mod
from sweeper import model as model_mod
from sweeper import passwords, records, slurm
from sweeper import workers as workers_mod
from sweeper.plan import memory_estimate
from sweeper.space import quote
from sweeper.storage import mask_url
from sweeper.sweep.command import Command
from sweeper.sweep.queue import Queue
from sweeper.sweep.settings import SWEEP_ID_ENV, Settings

__all__ = ["LocalWorkers", "SlurmWorkers", "Workers", "plan", "start", "threads_per_worker"]

log = logging.getLogger(__name__)


def plan(settings: Settings, command: Command, to_run: int) -> workers_mod.WorkerPlan:
    """How many workers for ``to_run`` trials, and (locally) the GPU of each; logged in one line."""
    if settings.launcher == "slurm":
        result = workers_mod.plan_slurm(settings.workers, to_run, int(settings.slurm.max_workers))
    else:
        visible = gpu_mod.visible_gpus()
        need, fraction = _planned_need_gib(command.cfgs, visible)
        result = workers_mod.plan_local(settings.workers, settings.gpus, visible, need, fraction, to_run)
        for line in result.skipped:
            log.warning("workers: %s", line)
    log.info("workers: %s", workers_mod.describe(result))
    return result


def _planned_need_gib(cfgs: list, visible: list) -> tuple[float | None, float]:
    """The largest estimated peak over the sweep's configs at the smallest micro-batch each may
    use (batch=auto: 1; a fixed batch: its own), and the share of free memory it may take."""
    if not visible:
        return None, 1.0
    need, fraction = None, 1.0
    for cfg in cfgs:
        shape = model_mod.model_shape(cfg.model, cfg.paths.cache_dir)
        if shape is None:
            log.warning("workers: no shape for model.path=%s, so every GPU counts as having room", cfg.model.path)
            return None, 1.0
        auto = cfg.batch.get("auto")
        micro = 1 if auto is not None else int(cfg.batch.per_device_train_batch_size)
        accum = int(cfg.batch.gradient_accumulation_steps) if auto is None else int(auto.target_effective_batch)
        est = memory_estimate(cfg, shape, micro, int(cfg.data.max_length),
                              gpu_mod.compute_for(visible, str(cfg.precision.compute)), accum)
        if est is not None and (need is None or est.total_gib > need):
            need = est.total_gib
            fraction = float(auto.memory_fraction) if auto is not None else 1.0
    return need, fraction


def threads_per_worker(n: int) -> int:
    """CPU threads for each of ``n`` workers on this host: the cores shared out (as torchrun does), so that
    N processes of a machine-wide thread pool each do not slow every trial down."""
    return max(1, (os.cpu_count() or 1) // max(1, n))


def _share_cpu_threads(n: int) -> None:
    """This process's share of the CPU threads when it is one of ``n`` > 1 local workers (unless the
    user set OMP_NUM_THREADS)."""
    if n <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads_per_worker(n))
    if "torch" in sys.modules:  # already imported (e.g. to build the tiny model): set its pool directly
        sys.modules["torch"].set_num_threads(threads_per_worker(n))


class Workers:
    """The workers of one command other than this process's own loop. ``works_here``: whether this process
    runs trials too (locally) or only watches (SLURM)."""

    works_here = True

    def __init__(self, settings: Settings, command: Command, queue: Queue) -> None:
        self.settings, self.command, self.queue = settings, command, queue

    def worker_command(self) -> list[str]:
        """This command as one more worker: same overrides, one worker, this sweep's folder (with several
        studies each job's own, from its config); the storage URL without its password (see
        :meth:`worker_env`)."""
        script = str(Path(sys.argv[0]).resolve())
        url, _ = passwords.split_password(self.settings.storage_url)
        args = [a for a in passwords.split_secret_overrides(sys.argv[1:])[0]
                if not a.startswith(("hydra.sweeper.storage=", "+hydra.sweeper.storage="))]
        folder = [f"hydra.sweep.dir={self.command.folder.resolve()}"] if len(self.command.sweeps) == 1 else []
        return [sys.executable, script, *args, f"hydra.sweeper.storage={quote(url)}", "hydra.sweeper.workers=1",
                "hydra.sweeper.n_jobs=null", "hydra.sweeper.gpus=null", "hydra.sweeper.launcher=local", *folder]

    def worker_env(self) -> dict:
        """What a worker adds to this process's environment: the sweep id, the storage password as
        PGPASSWORD and secret ``hydra.job.env_set`` values as themselves (so that they are in no command
        line, log or saved config)."""
        env = {SWEEP_ID_ENV: self.settings.sweep_id, **passwords.split_secret_overrides(sys.argv[1:])[1]}
        _, password = passwords.split_password(self.settings.storage_url)
        if password is not None:
            env["PGPASSWORD"] = password
        return env

    def start(self) -> None:
        """Start the other workers."""

    def stop(self) -> None:
        """Stop the other workers now (a failure limit reached, Ctrl-C)."""

    def finish(self) -> bool:
        """Wait for (or watch) the other workers to the end; False when they run on unwatched (no summary)."""
        return True


class LocalWorkers(Workers):
    """Workers 1..N-1 as copies of this command on this host, each seeing only its own GPU; this process,
    pinned to its GPU first, is worker 0. Each claims trials of any study as it frees up: no batch barrier."""

    def start(self) -> None:
        p = self.command.plan
        if p.gpus[0] is not None:
            if gpu_mod.cuda_initialised():
                raise config_mod.InputError("CUDA was initialised before the sweep could pin this worker to one GPU; "
                                            "report this as a bug")
            gpu_mod.pin(p.gpus[0])  # before this process touches CUDA: one trial, one GPU
        _share_cpu_threads(p.n)
        self.children: list[subprocess.Popen] = []
        for i in range(1, p.n):
            env = {**os.environ, **self.worker_env()}
            if p.gpus[i] is not None:
                env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=p.gpus[i])
            env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(p.n)))
            log_path = Path(str(self.command.folder)) / f"worker{i}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as out:
                self.children.append(subprocess.Popen(self.worker_command(), env=env, stdout=out,
                                                      stderr=subprocess.STDOUT))
            log.info("worker %d started (pid %d, %s), log: %s", i, self.children[-1].pid,
                     "CPU" if p.gpus[i] is None else f"GPU {p.gpus[i]}", log_path)

    def stop(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait()

    def finish(self) -> bool:
        """Wait for the other workers; a trial one of them left RUNNING as it died (``kill -9``, a crash) is failed
        and queued to resume from its checkpoint, so that this process runs it before the sweep ends."""
        died = False
        for i, child in enumerate(self.children, start=1):
            if child.wait() != 0:
                died = True
                log.error("worker %d exited with code %d; see its worker%d.log", i, child.returncode, i)
        if died:
            for sw in self.command.sweeps:
                self.queue.reclaim_dead_local(sw.study)
        return True


class SlurmWorkers(Workers):
    """Every worker a SLURM job; this process submits them, then watches the studies (``slurm.wait``) and
    submits new workers once every job has ended with trials left (up to ``max_retry`` times)."""

    works_here = False

    def start(self) -> None:
        sweep_dir = str(self.command.folder.resolve())
        env = self.worker_env()
        for key in [k for k in env if passwords.is_secret_name(k)]:  # PGPASSWORD, HF_TOKEN, ...: SLURM hands
            os.environ[key] = env.pop(key)  # the submitting environment to its jobs; never in a job's command
        self.submitter = slurm.Submitter(self.settings.slurm, Path(sweep_dir) / "slurm", self.worker_command(),
                                         env=env, cwd=os.getcwd())
        jobs = self.submitter.submit(self.command.plan.n)
        self._note_jobs(jobs)
        log.info("submitted %d SLURM worker job(s): %s; logs in %s", len(jobs), " ".join(jobs), self.submitter.folder)
        self.status = (f"python -m sweeper status --storage {shlex.quote(mask_url(self.settings.storage_url))} "
                       + " ".join(f"--study {shlex.quote(sw.name)}" for sw in self.command.sweeps))

    def _note_jobs(self, jobs: list[str]) -> None:
        """Record SLURM worker jobs on every study they serve (``python -m sweeper status`` reads them)."""
        for sw in self.command.sweeps:
            records.add_slurm_jobs(sw.study, jobs)

    def finish(self) -> bool:
        command = self.command
        if not self.settings.slurm.wait:
            what = f"the study {command.sweeps[0].name!r}" if len(command.sweeps) == 1 else f"the studies {command.names}"
            print(f"SLURM jobs {' '.join(self.submitter.job_ids)} run {what}; follow it with: {self.status}")
            return False
        progress = tqdm(total=self.queue.total(), initial=self.queue.done(),
                        desc=f"sweep {command.names} (SLURM)", unit="trial", position=0)
        try:
            self._watch(progress)
        except KeyboardInterrupt:
            progress.close()
            log.warning("stopped watching; the SLURM jobs %s keep running. Follow them with: %s "
                        "(scancel them to stop)", " ".join(self.submitter.job_ids), self.status)
            raise SystemExit(130) from None
        progress.close()
        for line in self.submitter.failures():
            log.error("%s", line)
        return True

    def _watch(self, progress: Any) -> None:
        """Until no job is active and no trial is left (or the replacements are spent): every worker job
        ended with trials left over (a worker was cancelled or lost its node): new workers, which fail the
        stale trials and re-run them from their checkpoints."""
        replacements, s = 0, self.settings
        while True:
            time.sleep(float(s.slurm.poll_s))
            counts = [self.queue.counts(sw) for sw in self.command.sweeps]
            progress.n = sum(c.done for c in counts)
            progress.refresh()
            if self.submitter.any_active():
                continue
            waiting = sum(len(sw.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
                          for sw in self.command.sweeps)
            running = sum(c.running for c in counts)
            left = sum(c.to_run for c in counts) + running + waiting
            if left == 0 or replacements >= max(1, int(s.max_retry or 0)):
                return
            replacements += 1
            if running and s.heartbeat_interval:  # let the dead workers' trials go stale
                time.sleep(s.grace_s)
            more = self.submitter.submit(min(self.command.plan.n, left))
            self._note_jobs(more)
            log.warning("every SLURM worker ended with %d trial(s) left; submitted %s to finish them",
                        left, " ".join(more))


def start(settings: Settings, command: Command, queue: Queue) -> Workers:
    """The command's workers, started: SLURM jobs with ``launcher=slurm``, else local processes."""
    workers = (SlurmWorkers if settings.launcher == "slurm" else LocalWorkers)(settings, command, queue)
    workers.start()
    return workers
