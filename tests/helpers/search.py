"""A custom search space (``hydra.sweeper.custom_search_space=tests.helpers.search.configure``): the learning
rate's range depends on the sampled length, as hydra-optuna-sweeper's example makes z depend on x."""


def configure(cfg, trial) -> None:
    high = 1e-3 if trial.params["schedule.max_steps"] <= 8 else 5e-4
    trial.suggest_float("lr.learning_rate", 1e-4, high, log=True)


def bad_patience(cfg, trial) -> None:
    """A float for an int key at the second seed's trial only: that job cannot be composed."""
    if trial.params["seed"] == 2:
        trial.suggest_float("eval.early_stopping_patience", 1.5, 2.5)
