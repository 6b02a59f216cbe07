"""Every check of a sweep point before GPU time: each one raises one ``ValueError`` line naming the setting and
what would be valid, before any trial exists (``sweeper.sweep.command`` calls them in order).

    python train.py -m schedule=under,sweet data=demo,banking77_sample     # each point checked before training

- :func:`check_points`: every grid point composed and validated (``sweeper.config``), its folders writable, a local
  ``model.path`` a saved model's folder, its precision available here, the data it names loaded, checked and
  prepared once as the trials will (an ``eval.metric=eval_accuracy`` on answers that are not a label set refused
  here); and the study file's folder writable.
- :func:`check_sampled_ends`: each end of a sampled range, interval or choice passes the rules a fixed value of
  its key does (``lr.learning_rate=interval(-1,1)`` is refused as ``lr.learning_rate=-1`` is).
- :func:`check_sampled_names` (and :func:`check_sampled_names_early`): a distribution must not pick the study
  (``data=choice(a,b)``).
- :func:`check_study_name`: a study name is also a folder name.
- :func:`check_compatible`: a param's distribution the study can take (:func:`recorded_distributions`: the ones
  it has); :func:`check_same_settings`: the command runs the settings the study's trials ran (unless
  ``allow_config_change``).

Composition is the caller's: each function takes ``compose(overrides) -> DictConfig``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import optuna
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from sweeper import callbacks, datacheck, disk, extras, identity, records
from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import gpu as gpu_mod
from sweeper import model as model_mod
from sweeper import speed as speed_mod
from sweeper import storage as storage_mod
from sweeper.datacheck import DataCheck
from sweeper.sft import check_prepared_data, import_ahead
from sweeper.space import SweepSpace, value_text
from sweeper.spec import check_folders, resolve_speed
from sweeper.storage import mask_url, sqlite_path
from sweeper.sweep.settings import SWEEP_ID_ENV, Settings

__all__ = ["check_compatible", "check_connections", "check_points", "check_same_settings", "check_sampled_ends",
           "check_sampled_names",
           "check_default_study_name", "check_sampled_names_early", "check_study_name", "point_overrides",
           "recorded_distributions"]

log = logging.getLogger(__name__)

Compose = Callable[[Sequence[str]], DictConfig]


def point_overrides(space: SweepSpace, point: dict) -> list[str]:
    """The overrides that compose grid ``point`` of ``space``: its fixed ones, then the point's values."""
    return space.fixed + [f"{k}={t}" for k, (_, t) in point.items()]


def check_points(space: SweepSpace, compose: Compose, launcher: str, storage_url: str) -> list[DictConfig]:
    """Compose every grid point, then check each (and the data each one names) before any trial; returns the
    composed configs. Before the first check, the optional packages no point uses are left out of this process
    (:func:`sweeper.extras.leave_out_unused`). SLURM jobs run where the GPUs are, so their precision is not
    checked here; TRL's preparation of each data runs once before any trial, so that the trials hit its cache
    (with a GPU visible, in a child process that sees none, :mod:`sweeper.datacheck`: the first data's child,
    started by the command's entry, gets its config before the other checks, so that the two overlap, at most two
    children run at once, and this process imports the first trial's modules meanwhile and starts reading its
    model's weights in a thread)."""
    loaded: dict[str, data_mod.Splits] = {}
    cfgs = []
    composed = [compose(point_overrides(space, point)) for point in space.grid_points()]
    # the optional packages none of the points uses stay out of this process (before TRL is first imported)
    extras.leave_out_unused(None if space.distributions else composed)
    prepare = launcher == "local" and SWEEP_ID_ENV not in os.environ
    # with a GPU visible TRL's preparation runs in a child that sees none, started as early as it can be
    in_child = prepare and bool(gpu_mod.visible_gpus())
    started: set[str] = set()
    running: list[DataCheck] = []
    try:
        if in_child:  # the first data's child starts now, beside the checks below
            _start_check(running, started, composed[0])
        for cfg in composed:
            _check_rules(cfg, launcher)
            check_folders(cfg)
            model_mod.check_path(cfg.model)
            key = _data_key(cfg)
            if key not in loaded:
                splits = loaded[key] = data_mod.load(cfg.data, cfg.paths.cache_dir)
                # SLURM's trials run where the GPUs are; local ones on this machine
                data_mod.check_train_size(splits, cfg.batch, gpu=launcher == "slurm" or bool(gpu_mod.visible_gpus()))
                callbacks.check_accuracy_metric(str(cfg.eval.metric), str(cfg.eval.accuracy), str(cfg.data.name),
                                                splits)
                if in_child:
                    _start_check(running, started, cfg)
                elif prepare:
                    check_prepared_data(cfg, splits)
            else:  # the same data, maybe another eval.metric
                callbacks.check_accuracy_metric(str(cfg.eval.metric), str(cfg.eval.accuracy), str(cfg.data.name),
                                                loaded[key])
            cfgs.append(cfg)
        if running:  # while the child prepares the data: the first trial's imports, then its weights (a thread)
            import_ahead("trl.trainer.sft_trainer", "peft.tuners.lora", "sweeper.runner")
            _read_model_ahead(composed[0])
        while running:
            running.pop(0).wait()
    finally:
        for child in running:
            child.stop()
        datacheck.drop()  # a child the command's entry started and no check took
    db = sqlite_path(storage_url)
    if db is not None:
        disk.check_writable(db.parent, "hydra.sweeper.storage")
    return cfgs


def _read_model_ahead(cfg: DictConfig) -> None:
    """The first point's model weights read into this process's memory in a thread (:func:`sweeper.model.read_ahead`),
    with the precision and attention its trial will ask for on the visible GPUs, decided without touching CUDA (this
    process pins its GPU later); its first trial takes them if it asks for the same, else drops them."""
    try:
        compute = gpu_mod.compute_for(gpu_mod.visible_gpus(), str(cfg.precision.compute))
        attention = speed_mod.attn_implementation(resolve_speed(cfg, compute, strict=False, cuda=True))
    except Exception as e:  # the trial decides, and reports, for itself
        log.debug("no model read ahead: %s", e)
        return
    model_mod.read_ahead(cfg.model, cfg.precision, cfg.paths.cache_dir, compute, attention)


def _start_check(running: list[DataCheck], started: set[str], cfg: DictConfig) -> None:
    """Start the data check's child for ``cfg``'s data unless one was started for it; at most two run at once
    (each imports torch and TRL and tokenises in several processes): the older is waited for first."""
    key = _data_key(cfg)
    if key in started:
        return
    started.add(key)
    while len(running) >= 2:
        running.pop(0).wait()
    running.append(DataCheck(cfg))


def _data_key(cfg: DictConfig) -> str:
    """The data and model a composed config names: one load and one preparation check each."""
    return OmegaConf.to_yaml(cfg.data) + OmegaConf.to_yaml(cfg.model)


def _check_rules(cfg: DictConfig, launcher: str) -> None:
    """The rules of one composed config (``sweeper.config.validate``), and its precision and GPU-only speed
    choices (``speed.attention=varlen``, ``speed.graphs=true``, ``speed.liger=true``) on this machine when a local
    launcher's trials run here with no GPU visible (SLURM jobs run where the GPUs are)."""
    config_mod.validate(cfg)
    if launcher == "local":
        gpu_mod.check_precision(str(cfg.precision.compute), str(cfg.precision.name))
        if not gpu_mod.visible_gpus():
            compute = gpu_mod.compute_for([], str(cfg.precision.compute))
            speed_mod.resolve(cfg.speed, cuda=False, compute=compute, optim=str(cfg.lr.optim))


def _ends(dist: optuna.distributions.BaseDistribution) -> list[tuple[object, str]]:
    """The values of ``dist`` that stand for all it samples: a categorical's every choice, a range's or an
    interval's low and high end."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return [(v, "a choice") for v in dist.choices]
    low, high = getattr(dist, "low"), getattr(dist, "high")
    return [(low, "its low end")] + ([(high, "its high end")] if high != low else [])


def check_sampled_ends(space: SweepSpace, compose: Compose, launcher: str) -> None:
    """Refuse a sampled key whose search space reaches a value its key does not take, before any trial: each
    choice of a ``choice(...)``, and the low and high end of a range or interval, composed with the first grid
    point and checked by the rules a fixed value meets (:func:`check_points`: the config's rules, and for a
    ``data.*``, ``batch`` or ``batch.*`` key the data loaded, split and batched as that value makes it; TRL's
    preparation is left to the trial). Raises one ``ValueError`` line naming the key, its search space, the value
    and the rule. A rule between this key and another sampled key
    (``lr.warmup_steps`` against a sampled ``schedule.max_steps``) is left to each trial, whose values are
    known only then. A key the config does not have is refused as Hydra refuses it (its did-you-mean); a value that
    does not compose is left to ``sweeper.typefit`` and the trial. The command's
    first process runs it; its workers, which it starts once this passed, do not."""
    from sweeper.space import distribution_text

    base = point_overrides(space, space.grid_points()[0])
    for key, dist in space.distributions.items():
        others = [k for k in space.distributions if k != key]
        for value, where in _ends(dist):
            try:
                cfg = compose(base + [f"{key}={value_text(value)}"])
            except ConfigCompositionException as e:
                if str(e).startswith(f"Could not override '{key}'"):  # no such key: every trial would fail alike
                    raise
                continue
            except Exception:
                continue
            try:
                _check_rules(cfg, launcher)
                if key == "batch" or key.startswith(("data.", "batch.")):  # the data as this value loads and batches it
                    splits = data_mod.load(cfg.data, cfg.paths.cache_dir)
                    data_mod.check_train_size(splits, cfg.batch, gpu=launcher == "slurm" or bool(gpu_mod.visible_gpus()))
            except ValueError as e:
                rule = str(e)
                if any(k in rule for k in others):
                    continue
                raise ValueError(f"{key}={distribution_text(dist)} samples {value_text(value)} ({where}), refused "
                                 f"as {key}={value_text(value)} would be: {rule}; keep the whole search space "
                                 f"within what {key} takes") from None


def check_connections(settings: Settings) -> None:
    """In the command's first process, before any study: a SQLite file can be written, and a PostgreSQL role
    or database has room under its ``CONNECTION LIMIT`` for every worker this command may start
    (``storage.check_connections``); one ``ValueError`` line otherwise."""
    if not settings.leads:
        return
    n = settings.workers
    if n == "auto":
        n = int(settings.slurm.max_workers) if settings.launcher == "slurm" else len(settings.gpus or gpu_mod.visible_gpus())
    storage_mod.check_connections(settings.storage_url, max(1, int(n)))


def check_sampled_names(space: SweepSpace, cfg: DictConfig, compose: Compose) -> None:
    """Refuse a distribution that would pick the study (``data=choice(a,b)``): a sampled value is known
    only once its trial exists, but each dataset and model has its own study."""
    for key, dist in space.distributions.items():
        if not isinstance(dist, optuna.distributions.CategoricalDistribution):
            continue
        for value in dist.choices:
            try:
                other = compose(space.fixed + [f"{key}={value_text(value)}"])
            except Exception:  # a choice that does not compose fails its own trial, as before
                continue
            if identity.default_study_name(other) != identity.default_study_name(cfg):
                choices = ",".join(value_text(v) for v in dist.choices)
                raise ValueError(
                    f"{key}=choice({choices}) samples the dataset or model, but each has its own study "
                    f"(<data.name>-<model.name>); list them as a grid, {key}={choices}")


def check_sampled_names_early(space: SweepSpace, study_name: str | None, compose: Compose) -> None:
    """:func:`check_sampled_names` on the first grid point's config, before a small finite space becomes a
    grid (a point that does not compose is left to :func:`check_points`, which names it)."""
    if not space.distributions or study_name is not None:
        return
    try:
        cfg = compose(point_overrides(space, space.grid_points()[0]))
    except Exception:
        return
    check_sampled_names(space, cfg, compose)


def check_study_name(name: str) -> str:
    """``hydra.sweeper.study_name`` as given: refused in one line when it cannot name a study and its folder."""
    why = identity.study_name_problem(name)
    if why:
        raise ValueError(f"hydra.sweeper.study_name={name!r} cannot name a study and its folder: {why}; use letters, "
                         "digits, spaces and punctuation other than / and \\ (e.g. hydra.sweeper.study_name=intents-v2)")
    return name


def check_default_study_name(cfg: DictConfig) -> str:
    """The study name ``<data.name>-<model.name>`` of a composed point, refused in one line that names those
    two keys when it cannot name a study and its folder (a hub-style ``model.name=org/model``, say)."""
    name = identity.default_study_name(cfg)
    why = identity.study_name_problem(name)
    if why:
        raise ValueError(f"data.name={cfg.data.name!r} and model.name={cfg.model.name!r} make the study name "
                         f"{name!r} (<data.name>-<model.name>), which cannot name a study and its folder: {why}; give "
                         "them names of letters, digits and punctuation other than / and \\ (e.g. "
                         "model.name=qwen2.5-1.5b), or name the study with hydra.sweeper.study_name=...")
    return name


def recorded_distributions(study: optuna.Study) -> dict[str, optuna.distributions.BaseDistribution]:
    """Each param's distribution as the study first recorded it (the one Optuna checks a new one against)."""
    seen: dict[str, optuna.distributions.BaseDistribution] = {}
    for t in study.get_trials(deepcopy=False):
        seen.update({k: d for k, d in t.distributions.items() if k not in seen})
    return seen


def check_compatible(study: optuna.Study, dists: dict[str, optuna.distributions.BaseDistribution],
                     fixes: dict[str, str] | None = None) -> None:
    """Refuse, before any trial is created, a param whose distribution the study cannot take. ``fixes``: for a
    key, the change of this command that would make it fit (named before a new study)."""
    seen = {k: d for k, d in recorded_distributions(study).items() if k in dists}
    for key, old in seen.items():
        try:
            optuna.distributions.check_distribution_compatibility(old, dists[key])
        except ValueError as e:
            fix = (fixes or {}).get(key)
            raise ValueError(
                f"{key}: study {study.study_name!r} already samples it as {old}, which cannot change to "
                f"{dists[key]} ({e}); " + (f"{fix}, " if fix else "keep the earlier values ")
                + "or start a new study with hydra.sweeper.study_name=..."
            ) from None


def check_same_settings(study: optuna.Study, space: SweepSpace, configs: list[dict], *, storage_url: str,
                        allow_change: bool, several: bool = False) -> None:
    """Refuse a command whose settings, besides what it sweeps and what the study searched (its trials'
    params), differ from what the study's trials ran (unless
    ``allow_change``, ``hydra.sweeper.allow_config_change``): a re-run must never serve old results as this
    command's. ``several``: the command runs several studies (one per dataset and model), which one
    ``study_name`` cannot name, so the way to new studies is another storage."""
    trials = [t for t in study.get_trials(deepcopy=False) if records.config_of(t) is not None and not records.is_branch(t)]
    ran = [records.config_of(t) for t in trials]
    if not ran or not configs:
        return
    # what this command sweeps, and what the study searched (each trial's params): a follow-up that fixes a
    # searched key at one value (the report's grid at the best learning rate) runs what the study is about
    swept = set(space.distributions) | {k for k, _ in space.grid} | {k for t in trials for k in t.params}
    skip = identity.varying(configs) | {k for k in configs[0] if any(k == s or k.startswith(s + ".")
                                                                     for s in swept)}
    if any(not identity.differences([c], configs[0], skip) for c in ran):
        return  # some earlier trials ran these very settings
    diff = identity.differences(ran, configs[0], skip)
    text = identity.describe_differences(diff)
    if allow_change:
        log.warning("study %r: this command's settings differ from its earlier trials (%s); adding them "
                    "(hydra.sweeper.allow_config_change=true)", study.study_name, text)
        return
    raise ValueError(
        f"study {study.study_name!r} in {mask_url(storage_url)} ran other settings than this command: "
        f"{text}. Its results are not this command's: start "
        + ("new studies in another file with hydra.sweeper.storage=sqlite:///<new file>.db (this command runs one "
           "study per dataset and model, so one study_name cannot name them)" if several else
           "a new study with hydra.sweeper.study_name=<new name>")
        + ", or add these runs to it with hydra.sweeper.allow_config_change=true")
