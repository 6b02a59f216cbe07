"""One job, the entry of a run: ``python train.py`` (one run, no study) or one job of a multirun (one
trial of the study).

    python train.py schedule=under          # one trial, no study
    python train.py -m schedule=under,sweet # each job reports into its own Optuna trial

:func:`run` reads a trial top to bottom: scrub the storage password Hydra saved, quiet the libraries,
pin one GPU (and give an earlier trial's cached CUDA blocks back), open the job's reporter, resolve the
run and load its data once (:func:`sweeper.spec.prepare`), then train it (:func:`sweeper.runner.train_segment`)
or run a WSD search (:func:`sweeper.wsd.run_search`). A failure caused by a full disk is named as such.
"""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import disk
from sweeper import gpu as gpu_mod
from sweeper import spec as spec_mod
from sweeper.callbacks import DivergedError
from sweeper.reporter import NullReporter, Reporter
from sweeper.runner import Segment, train_segment

__all__ = ["DivergedError", "preflight", "quiet_libraries", "run"]

log = logging.getLogger(__name__)


def run(cfg: DictConfig, reporter: Reporter | None = None) -> float:
    """Run the job of ``cfg`` and return its best ``eval.metric`` (NaN when none). In a multirun the
    sweeper fills ``cfg.study`` and the job reports to its own trial; a retried trial resumes from its
    newest whole checkpoint. The job's own connection to the study is closed however the run ends."""
    from sweeper import passwords

    job_dir = spec_mod.job_dir(cfg)
    passwords.scrub_saved_config(job_dir)  # Hydra saved the command line: no storage password in it
    quiet_libraries()
    try:
        gpu_mod.pin_one()  # one trial, one GPU: before anything initialises CUDA
    except ValueError as e:
        raise config_mod.InputError.wrap(e) from e
    _free_cuda_cache()
    own = None
    if reporter is None and cfg.study.trial_number is not None:
        from sweeper.study import TrialReporter

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


def _free_cuda_cache() -> None:
    """A worker's earlier trial: give its cached blocks back, so that NVML's free memory (batch=auto's
    budget) does not count them as taken."""
    if gpu_mod.cuda_initialised():
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


class _DropNotes(logging.Filter):
    """Library notes the user can do nothing about (they describe this tool's own choices)."""

    NOTES = ("load_best_model_at_end",)  # EarlyStoppingCallback: we keep the best checkpoint ourselves

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTES)


def quiet_libraries() -> None:
    """No nested progress bars from datasets' map and the weight loader (the trial keeps its own bar),
    and no library notes the user cannot act on."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for name in ("transformers", "transformers.trainer_callback"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotes) for f in logger.filters):
            logger.addFilter(_DropNotes())
