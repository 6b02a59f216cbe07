"""Optuna samplers and pruners from ``hydra.sweeper.sampler`` / ``hydra.sweeper.pruner``: by name or by ``_target_``.

    python train.py -m 'lr.learning_rate=tag(log,interval(1e-5,3e-4))' hydra/sweeper/sampler=random
    python train.py -m ... hydra.sweeper.sampler.name=nsgaii +hydra.sweeper.sampler.population_size=8
    python train.py -m ... '+hydra.sweeper.sampler._target_=optuna.samplers.TPESampler' \
        +hydra.sweeper.sampler.n_startup_trials=4          # any sampler class, as hydra-optuna-sweeper takes it

A sampler block is ``name`` (one of :data:`SAMPLERS`), ``seed``, and any other keys, passed to the sampler's
class as its options; ``_target_`` (a class path, hydra-optuna-sweeper's form), when given, wins over
``name``. ``grid`` is TPE: the sweeper enqueues the grid's points itself (every combination once, also on
resume and across workers), and TPE samples any distribution left. A sampler that needs a package this
environment lacks (``cmaes``: cmaes; ``qmc``, ``gp``: scipy) or an option its class does not take is refused in
one line before any study exists. Pruners the same way (``none``, ``median``, ``hyperband`` or a ``_target_``).
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import optuna

__all__ = ["PER_TRIAL_SEED", "PRUNERS", "SAMPLERS", "check_space", "for_trial", "make_pruner", "make_sampler",
           "sampler_name", "trial_seed"]

# name -> (class name in optuna.samplers, packages it needs beyond Optuna)
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tpe": ("TPESampler", ()),
    "random": ("RandomSampler", ()),
    "grid": ("TPESampler", ()),  # the grid's points are enqueued by the sweeper; TPE samples the rest
    "cmaes": ("CmaEsSampler", ("cmaes",)),
    "nsgaii": ("NSGAIISampler", ()),
    "nsgaiii": ("NSGAIIISampler", ()),
    "qmc": ("QMCSampler", ("scipy",)),
    "gp": ("GPSampler", ("scipy", "torch")),
    "bruteforce": ("BruteForceSampler", ()),
}
SINGLE_OBJECTIVE = ("cmaes",)  # samplers Optuna runs on one objective only
PRUNERS = ("none", "median", "hyperband")
_OWN = ("name", "seed", "_target_")
_PRUNER_KEYS = ("n_warmup_steps", "n_startup_trials", "min_resource", "max_resource", "reduction_factor")


def _plain(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return dict(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else dict(cfg or {})


def sampler_name(sampler_cfg: Any) -> str:
    """The sampler's name: ``name``, or the lower-cased class of ``_target_`` without "Sampler"
    (``optuna.samplers.GridSampler`` -> ``grid``), so that a pasted GridSampler block runs our grid."""
    cfg = _plain(sampler_cfg)
    target = cfg.get("_target_")
    if target:
        return str(target).rsplit(".", 1)[-1].removesuffix("Sampler").lower()
    return str(cfg.get("name"))


def _instantiate(where: str, cls: Any, options: dict) -> Any:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(options) - set(params))
        if bad:
            known = ", ".join(n for n in params if n != "self")
            raise ValueError(f"{where}: {cls.__name__} takes no option {bad[0]!r}; its options are {known}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in options.items())}) "
                         f"failed: {e}") from None


def _target_class(where: str, target: str) -> Any:
    from hydra.utils import get_class

    try:
        return get_class(str(target))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{where}._target_={target!r} is not an importable class ({first}); e.g. "
                         "optuna.samplers.TPESampler") from None


# samplers whose every draw comes from a random stream of their own instance (the rest of their state is the
# study's trials): seeded per trial (:func:`trial_seed`), so that no two trials replay the same draws
PER_TRIAL_SEED = ("tpe", "random", "grid", "cmaes", "nsgaii", "nsgaiii", "gp")


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s sampler in a study of ``seed``: a command that resumes a study, and each
    worker of one, opens it with a sampler of the same seed, whose draws would repeat the first command's
    trials one by one; the trial's number (unique in the study) gives each trial draws of its own, the same on
    every run of the same trials."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


def for_trial(sampler_cfg: Any, n_objectives: int, number: int) -> optuna.samplers.BaseSampler | None:
    """Trial ``number``'s own sampler (:func:`trial_seed`) when ``hydra.sweeper.sampler`` has a seed and is one of
    :data:`PER_TRIAL_SEED`; None otherwise (the study's sampler: unseeded ones draw from fresh entropy in each
    process, ``qmc`` continues its one sequence by the study's trial count, ``bruteforce`` draws what is left)."""
    cfg = _plain(sampler_cfg)
    if cfg.get("seed") is None or sampler_name(cfg) not in PER_TRIAL_SEED:
        return None
    return make_sampler({**cfg, "seed": trial_seed(cfg["seed"], number)}, n_objectives)


def make_sampler(sampler_cfg: Any, n_objectives: int = 1) -> optuna.samplers.BaseSampler:
    """The study's sampler from ``hydra.sweeper.sampler`` (see the module docstring); ``seed`` is passed
    when the sampler takes one (each sampled trial then gets a sampler of its own seed, :func:`for_trial`).
    Raises ValueError (one line) for an unknown name or class, a missing package, an option the class does not
    take, or a single-objective sampler in a multi-objective study."""
    cfg = _plain(sampler_cfg)
    where = "hydra.sweeper.sampler"
    options = {k: v for k, v in cfg.items() if k not in _OWN}
    if cfg.get("_target_"):
        cls = _target_class(where, cfg["_target_"])
        name = sampler_name(cfg)
    else:
        name = str(cfg.get("name"))
        if name not in SAMPLERS:
            raise ValueError(f"{where}.name must be one of {', '.join(SAMPLERS)}, but got {name!r} (or give a class "
                             "as hydra.sweeper.sampler._target_)")
        class_name, needs = SAMPLERS[name]
        missing = [p for p in needs if importlib.util.find_spec(p) is None]
        if missing:
            raise ValueError(f"{where}.name={name} needs the package {' and '.join(missing)}, which is not "
                             f"installed: pip install {' '.join(missing)} (or pick tpe or random)")
        cls = getattr(optuna.samplers, class_name)
    if n_objectives > 1 and name in SINGLE_OBJECTIVE:
        raise ValueError(f"{where}: {cls.__name__} optimises one objective, but hydra.sweeper.direction has "
                         f"{n_objectives}; use tpe, nsgaii or random")
    seed = cfg.get("seed")
    if seed is not None and "seed" in inspect.signature(cls).parameters:
        options["seed"] = seed
    if name == "grid" and cfg.get("_target_"):  # our grid: points enqueued by the sweeper, not GridSampler's
        return optuna.samplers.TPESampler(seed=seed)
    return _instantiate(where, cls, options)


def check_space(sampler_cfg: Any, distributions: dict) -> None:
    """Refuse, before any trial, a space the sampler cannot draw from: ``bruteforce`` enumerates every point, so
    a continuous ``interval(...)`` has none to enumerate."""
    from sweeper.space import finite_values

    if sampler_name(sampler_cfg) != "bruteforce":
        return
    for key, dist in distributions.items():
        if finite_values(dist) is None:
            raise ValueError(f"hydra.sweeper.sampler.name=bruteforce tries every point, but {key} is continuous; "
                             f"give it a step (range(a,b,step)) or int(interval(...)), or pick tpe")


def make_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner:
    """The study's pruner from ``hydra.sweeper.pruner``: ``name`` (none, median, hyperband) with our keys, or a
    ``_target_`` class with its options (hydra-optuna-sweeper's form)."""
    cfg = _plain(pruner_cfg)
    where = "hydra.sweeper.pruner"
    if pruner_cfg is None:  # hydra-optuna-sweeper's pruner: null
        return optuna.pruners.NopPruner()
    if cfg.get("_target_"):
        cls = _target_class(where, cfg["_target_"])
        takes = set(inspect.signature(cls).parameters)
        # our own keys (from conf/hydra/sweeper/sft_sweep.yaml) go to the class only where it takes them
        options = {k: v for k, v in cfg.items() if k not in _OWN and (k in takes or k not in _PRUNER_KEYS)}
        return _instantiate(where, cls, options)
    name = cfg.get("name")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(cfg["n_startup_trials"]),
                                           n_warmup_steps=int(cfg["n_warmup_steps"]))
    if name == "hyperband":
        top = cfg.get("max_resource", "auto")
        low, eta = int(cfg.get("min_resource", 1)), int(cfg.get("reduction_factor", 3))
        if top != "auto" and (isinstance(top, bool) or not isinstance(top, int) or top <= low):
            raise ValueError(f"{where}.max_resource must be auto or a whole number of steps above "
                             f"min_resource ({low}), but got {top!r}")
        if low < 1 or eta < 2:
            raise ValueError(f"{where}.min_resource must be >= 1 and reduction_factor >= 2, but got {low} and {eta}")
        return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=top, reduction_factor=eta)
    raise ValueError(f"{where}.name must be one of {', '.join(PRUNERS)}, but got {name!r} (or give a class as "
                     f"{where}._target_)")
