"""The Hydra app: one fine-tuning run, or with -m a sweep into an Optuna study (``sft-sweep``, or
``python train.py`` in a checkout; both go through :func:`sweeper.cli.main`). Hydra's job name is this
module's, ``train`` (the job log is ``train.log``); the configs are :data:`sweeper.paths.CONF_DIR`.

    sft-sweep                                     # one run on the defaults (tiny model, demo data)
    sft-sweep -m schedule=under,sweet,over        # 500 / 1500 / 3000 steps, one study
    sft-sweep -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra.sweeper.n_trials=6
"""

import hydra
from omegaconf import DictConfig

import sweeper.config
from sweeper.paths import CONF_DIR

__all__ = ["main"]

sweeper.config.register()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from sweeper import extras
    from sweeper.trial import run

    extras.leave_out_unused([cfg])  # a single run (a sweep's process has decided from all its points already)
    return run(cfg)
