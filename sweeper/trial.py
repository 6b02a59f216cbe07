"""One job, the entry of a run: ``python train.py`` (one run, no study) or one job of a multirun (one
trial of the study).

    python train.py schedule=under          # one trial, no study
    python train.py -m schedule=under,sweet # each job reports into its own Optuna trial

:func:`run` reads a trial top to bottom: mask the secrets (storage password, tokens) in what Hydra saved and in the log, quiet the libraries,
pin one GPU (and give an earlier trial's cached CUDA blocks back), open the job's reporter, resolve the
run and load its data once (:func:`sweeper.spec.prepare`), then train it (:func:`sweeper.runner.train_segment`)
or run a WSD search (:func:`sweeper.wsd.run_search`). A failure caused by a full disk is named as such.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import disk, gpu, passwords
from sweeper import spec as spec_mod
from sweeper.callbacks import DivergedError
from sweeper.reporter import NullReporter, Reporter
from sweeper.runner import Segment, quiet_libraries, train_segment

__all__ = ["DivergedError", "preflight", "run"]


def run(cfg: DictConfig, reporter: Reporter | None = None) -> float:
    """Run the job of ``cfg`` and return its best ``eval.metric`` (NaN when none). In a multirun the
    sweeper fills ``cfg.study`` and the job reports to its own trial; a retried trial resumes from its
    newest whole checkpoint. The job's own connection to the study is closed however the run ends."""
    job_dir = spec_mod.job_dir(cfg)
    secrets = passwords.job_secrets()
    passwords.install_log_filter(secrets)  # train.log and the console: no secret in any line
    passwords.scrub_saved_config(job_dir, secrets)  # Hydra saved the command line: no password or token in it
    quiet_libraries()
    try:
        gpu.pin_one()  # one trial, one GPU: before anything initialises CUDA
    except ValueError as e:
        raise config_mod.InputError.wrap(e) from e
    gpu.free_cuda_cache()
    own = None
    if reporter is None and cfg.study.trial_number is not None:
        from sweeper.sweep.handle import TrialReporter

        reporter = own = TrialReporter.from_job(cfg)
    reporter = reporter or NullReporter()
    try:
        spec, splits = spec_mod.prepare(cfg)
        if spec.wsd is not None:
            from sweeper import wsd

            return wsd.run_search(spec, splits, reporter, job_dir)
        segment = Segment(output_dir=job_dir, resume=reporter.resume_checkpoint(), retry_resumes=False)
        best = train_segment(spec, splits, segment, reporter)["best_value"]
        return float(best) if best is not None else math.nan
    except (DivergedError, config_mod.InputError):
        raise
    except Exception as e:
        full = disk.disk_full(e, job_dir, "paths.output_dir")
        if full is not None:
            raise full from e
        raise
    finally:
        if own is not None:
            own.close()


def preflight(cfg: DictConfig) -> data_mod.Splits:
    """Every check that needs no model, and the data (see :func:`sweeper.spec.prepare`)."""
    return spec_mod.prepare(cfg)[1]
