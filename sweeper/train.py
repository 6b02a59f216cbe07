"""The Hydra app: one fine-tuning run, or with -m a sweep into an Optuna study (``sft-sweep``, or
``python train.py`` in a checkout; both go through :func:`sweeper.cli.main`). Hydra's job name is this
module's, ``train`` (the job log is ``train.log``); the configs are :data:`sweeper.paths.CONF_DIR`.

    sft-sweep                                     # one run on the defaults (tiny model, demo data)
    sft-sweep -m schedule=under,sweet,over        # 500 / 1500 / 3000 steps, one study
    sft-sweep -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra.sweeper.n_trials=6
"""

from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import sweeper.config
from sweeper.paths import CONF_DIR

__all__ = ["RunChecks", "main"]

sweeper.config.register()


class RunChecks(Callback):
    """``hydra.callbacks.run_checks`` (``conf/config.yaml``): before Hydra makes a single run's folder
    (``hydra.run.dir``, under ``paths.output_dir``), the output and cache folders can be written, refused in one
    line naming the key (a sweep checks them itself, before its first trial)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        import sys

        from sweeper import disk

        try:
            disk.check_writable(config.paths.output_dir, "paths.output_dir")
            disk.check_writable(config.paths.cache_dir, "paths.cache_dir")
        except ValueError as e:
            # Hydra turns a callback's exception into a warning and goes on to make the folder (a traceback): the
            # refusal ends the run itself, as Hydra ends one on an InputError (its line, exit code 1)
            print(e, file=sys.stderr)
            raise SystemExit(1) from None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from sweeper import extras
    from sweeper.trial import run

    extras.leave_out_unused([cfg])  # a single run (a sweep's process has decided from all its points already)
    return run(cfg)
