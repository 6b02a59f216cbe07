"""hydra-optuna-sweeper's fields that map onto ours: ``n_jobs``, ``max_failure_rate``, ``custom_search_space``,
``storage: null``, ``params`` and the deprecated ``search_space``.

    # a hydra-optuna-sweeper block, pasted into a config of this project, runs as it is:
    defaults:
      - override hydra/sweeper: optuna          # our sweeper under hydra-optuna-sweeper's name
      - override hydra/sweeper/sampler: tpe
    hydra:
      sweeper:
        direction: minimize
        n_trials: 20
        n_jobs: 1                                # -> workers: 1 (said once at the start)
        params: {schedule.max_steps: range(10, 30, 10)}

Each function maps one field with hydra-optuna-sweeper's meaning, or refuses it in one line naming our
equivalent; the README's migration table lists every field.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable

__all__ = ["custom_search_space", "extend", "failure_rate_exceeded", "params", "refuse_search_space", "storage", "workers"]

log = logging.getLogger(__name__)


def workers(n_jobs: int | None, workers_arg: Any) -> Any:
    """``n_jobs`` (hydra-optuna-sweeper: trials run in parallel) -> our ``workers`` (processes sharing the
    study, one GPU each), said once; a different explicit ``workers`` is refused."""
    if n_jobs is None:
        return workers_arg
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise ValueError(f"hydra.sweeper.n_jobs must be a whole number >= 1 or null, but got {n_jobs!r}")
    if str(workers_arg) not in ("auto", str(n_jobs)):
        raise ValueError(f"hydra.sweeper.n_jobs={n_jobs} and hydra.sweeper.workers={workers_arg} both set the "
                         "parallel trials; keep hydra.sweeper.workers and drop n_jobs")
    log.info("hydra.sweeper.n_jobs=%d runs as hydra.sweeper.workers=%d: processes sharing the study, one GPU "
             "each, no batch barrier", n_jobs, n_jobs)
    return n_jobs


def storage(url: str | None, output_dir: Any) -> str:
    """``storage: null`` (hydra-optuna-sweeper: an in-memory study) -> the study file in ``paths.output_dir``:
    trials run in their own processes and a re-run resumes, so a study lives in a database here."""
    if url is not None:
        return url
    path = f"sqlite:///{output_dir}/optuna.db"
    log.info("hydra.sweeper.storage=null (an in-memory study in hydra-optuna-sweeper) stores the study in %s, "
             "so that a re-run resumes it", path)
    return path


def failure_rate_exceeded(rate: float | None, failed: int, finished: int) -> str | None:
    """hydra-optuna-sweeper's ``max_failure_rate``: the sweep stops once the failed share of this command's
    finished trials exceeds it (0.0: the first failure stops it; null: never). Returns the stop line."""
    if rate is None or finished == 0 or failed / finished <= float(rate):
        return None
    return (f"stopping the sweep: {failed} of {finished} trial(s) failed ({failed / finished:.0%}), above "
            f"hydra.sweeper.max_failure_rate={float(rate):g}")


def check_failure_rate(rate: Any) -> None:
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1):
        raise ValueError(f"hydra.sweeper.max_failure_rate must be between 0.0 and 1.0 or null, but got {rate!r}")


def custom_search_space(path: str | None) -> Callable[[Any, Any], None] | None:
    """The function named by ``custom_search_space`` (an import path, ``package.module.function``), taking
    ``(cfg, trial)``: the app's config and the Optuna trial, after the sweep's own params are suggested; it
    may suggest more (``trial.suggest_float("lr.weight_decay", 0, 0.1)``), conditional on those. Every param it
    suggests becomes an override of the trial's job. Refused in one line when it cannot be imported."""
    if not path:
        return None
    from hydra.utils import get_method

    try:
        return get_method(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"hydra.sweeper.custom_search_space={path!r} is not an importable function ({first}); give "
                         "an import path, e.g. my_project.search.configure, of a function taking (cfg, trial)") from None


def params(value: Any) -> dict[str, str]:
    """``hydra.sweeper.params`` (null, or ``{key: override}``, each override a string or a number) as a plain dict;
    anything else refused in one line."""
    if value is None:
        return {}
    example = "e.g. hydra.sweeper.params={schedule:'under,sweet,over'}"
    if not isinstance(value, Mapping):
        raise ValueError(f"hydra.sweeper.params must be a mapping of keys to overrides, but got {value!r}; {example}")
    out = {}
    for key, v in value.items():
        if isinstance(v, Mapping) or (not isinstance(v, (str, int, float, bool)) and v is not None):
            raise ValueError(f"hydra.sweeper.params.{key} must be one override in the sweep grammar (a string such "
                             f"as 'under,sweet' or 'interval(1e-5,1e-3)'), but got {v!r}; {example}")
        out[str(key)] = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return out


def extend(fn: Callable[[Any, Any], None] | None, cfg: Any, trial: Any) -> None:
    """Call the custom search space on ``trial`` (nothing without one)."""
    if fn is not None:
        fn(cfg, trial)


def refuse_search_space(search_space: Any) -> None:
    """hydra-optuna-sweeper's deprecated ``search_space`` (distributions as dicts): refused, naming ``params``."""
    if search_space is not None and not isinstance(search_space, Mapping):
        raise ValueError(f"hydra.sweeper.search_space is hydra-optuna-sweeper's deprecated form (here {search_space!r}); "
                         "give the space as hydra.sweeper.params in the override grammar, e.g. params: "
                         "{lr.learning_rate: 'tag(log, interval(1e-5, 1e-3))'}")
    if search_space:
        first = next(iter(search_space))
        raise ValueError(f"hydra.sweeper.search_space ({first}: ...) is hydra-optuna-sweeper's deprecated form; give "
                         f"the space as hydra.sweeper.params in the override grammar, e.g. params: "
                         f"{{{first}: 'interval(0.0, 1.0)'}} (int(interval(...)), choice(...), range(...))")
