"""Run one fine-tuning trial; with -m, sweep many into an Optuna study.

    python train.py                                   # one run on the defaults (tiny model, demo data)
    python train.py -m schedule=under,sweet,over      # 500 / 1500 / 3000 steps, one study
    python train.py -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra.sweeper.n_trials=6
"""

import hydra
from omegaconf import DictConfig

import sweeper.config

sweeper.config.register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from sweeper.trial import run

    return run(cfg)


if __name__ == "__main__":
    main()
