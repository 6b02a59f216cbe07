"""One command's sweep: its overrides -> checked points -> one study per dataset and model (:func:`prepare`).

    python train.py -m schedule=under,sweet,over data=demo,banking77_sample    # 6 points, 2 studies

The overrides (``hydra.sweeper.params`` first, the command line over them) become a search space through
``sweeper.space`` (Hydra's sweep grammar, translated exactly). A grid (comma lists; with ``sampler.name=grid``
also choice and range) is the command's own points; distributions (choice, range, interval) are sampled, and a
small finite space becomes a grid, whose params the study records as it records the sampled form's (and as it
already records them: :meth:`sweeper.space.SweepSpace.grid_distributions`), so that a re-run with another
``n_trials`` continues the study. Each point is composed once (:class:`Composer` keeps every composed
config) and checked by ``sweeper.sweep.preflight``; a sampled value that does not fit its key
(``sweeper.typefit``), a search space reaching a value its key does not take (``interval(-1,1)`` for a learning
rate), and two points that are one run (``sweeper.points``) are refused. Points of several
datasets or models (anything that changes ``<data.name>-<model.name>``) go to one study each, named as a
single-dataset command names it. Every check runs before any study's trial exists; a refusal once the studies
are open (their state read: one that cannot take the command) deletes the studies the command created
(:func:`drop_new`), so that nothing is left half-written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import optuna
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig

from sweeper import config as config_mod
from sweeper import fingerprint, folders, identity, objectives, passwords, records, samplers, typefit
from sweeper import points as points_mod
from sweeper import workers as workers_mod
from sweeper.space import SweepSpace, build_space, exhaust_finite, finite_size, finite_values, value_text
from sweeper.storage import claim_lock, mask_url, open_storage, sqlite_path
from sweeper.sweep import preflight
from sweeper.sweep.settings import Settings

__all__ = ["Command", "Composer", "Sweep", "drop_new", "prepare"]

log = logging.getLogger(__name__)


class Composer:
    """Hydra's composition of the app's config with a point's overrides, each distinct list composed once."""

    def __init__(self, loader: Any, config: DictConfig) -> None:
        self.loader, self.config = loader, config
        self._done: dict[tuple[str, ...], DictConfig] = {}

    def __call__(self, overrides: Sequence[str]) -> DictConfig:
        key = tuple(overrides)
        if key not in self._done:
            self._done[key] = self.loader.load_sweep_config(self.config, list(overrides))
        return self._done[key]

    def group_options(self, key: str) -> list[str] | None:
        """The options of config group ``key`` (``schedule``: under, sweet, ...); None for any other key."""
        if "." in key or key.startswith(("+", "~")):
            return None
        return sorted(self.loader.get_group_options(key, results_filter=ObjectType.CONFIG)) or None


@dataclass
class Sweep:
    """One study of a command, as prepared: the study, its part of the search space and its points."""

    study: optuna.Study
    name: str
    space: SweepSpace  # its own: keys that pick the study (``data=demo``) are fixed overrides here
    points: list  # grid points this command runs ([{}] with distributions only)
    pure_grid: bool
    total: int  # a grid: its own points; sampled: the study's n_trials
    dists: dict
    configs: list = field(default_factory=list)  # each point's result config (sweeper.identity)
    cfgs: list = field(default_factory=list)  # each point's composed config
    order: list = field(default_factory=list)  # each point's place in the command's grid (claim order)
    new: bool = False  # this command created the study (dropped again when the command is refused: drop_new)

    @property
    def folder(self) -> Path:
        """The study's folder (``hydra.sweep.dir`` of its runs): its trials and summary.md."""
        return Path(str(self.cfgs[0].hydra.sweep.dir))


@dataclass
class Command:
    """One command's sweep: a study per dataset and model it covers, and the workers they share."""

    sweeps: list[Sweep]
    cfgs: list = field(default_factory=list)  # every point's composed config, in the command's order
    plan: workers_mod.WorkerPlan | None = None
    file_existed: bool = True  # the SQLite study file was there before the command (drop_new)

    @property
    def folder(self) -> Path:
        """Where the command's own files go (worker logs, SLURM logs, the table of datasets): the study's
        folder, or with several studies the folder that holds theirs (``outputs/sweeps``)."""
        if len(self.sweeps) == 1:
            return self.sweeps[0].folder
        return Path(os.path.commonpath([str(sw.folder.resolve()) for sw in self.sweeps]))

    @property
    def names(self) -> str:
        return ", ".join(sw.name for sw in self.sweeps)


def prepare(settings: Settings, compose: Composer, arguments: list[str]) -> Command:
    """The command's studies, every point checked (raises one ``ValueError`` line before any trial exists)."""
    space = _space(settings, compose, arguments)
    pure_grid = not space.distributions
    all_cfgs = preflight.check_points(space, compose, settings.launcher, settings.storage_url)
    preflight.check_connections(settings)
    typefit.check(space, all_cfgs[0])  # a sampled value Hydra could not merge: refused now, not at a trial
    if settings.leads:  # a worker skips it: the command checked the search space before it started the workers
        preflight.check_sampled_ends(space, compose, settings.launcher)  # interval(-1,1) where -1 is refused
    same = points_mod.same_runs(space, [identity.run_config(c) for c in all_cfgs], compose)
    if same:
        raise ValueError(same)
    for line in space.notes:
        log.info(line)
    sweeps: list[Sweep] = []
    studies = list(_split_by_study(settings, space, all_cfgs, compose))
    db = sqlite_path(settings.storage_url)
    file_existed = db is None or db.exists()
    try:
        for name, sub, points, idx in studies:
            cfgs = [all_cfgs[i] for i in idx]
            configs = [identity.result_config(c, fingerprint.data_content(c.data, c.paths.cache_dir)) for c in cfgs]
            if pure_grid:  # a grid runs its own points, whatever else the study holds
                total = min(settings.n_trials, len(points)) if settings.n_trials else len(points)
                points, cfgs, configs, idx = points[:total], cfgs[:total], configs[:total], idx[:total]
            else:  # sampled: n_trials is the study's total
                total = settings.sampled_total
            study, new = _create_study(settings, name, cfgs[0])
            recorded = preflight.recorded_distributions(study)  # a grid records its values as the study does
            dists = {**sub.grid_distributions(compose.group_options, recorded), **sub.distributions}
            sweeps.append(Sweep(study, name, sub, points, pure_grid, total, dists, configs, cfgs, idx, new))
            preflight.check_compatible(study, dists, _as_grid(space, recorded, compose.group_options))
            preflight.check_same_settings(study, sub, configs, storage_url=settings.storage_url,
                                          allow_change=settings.allow_config_change, several=len(studies) > 1)
    except BaseException:
        drop_new(Command(sweeps, all_cfgs, file_existed=file_existed), settings.storage_url)
        raise
    for sw in sweeps:  # after every check: another study incarnation's trial folders moved aside
        with claim_lock(settings.storage_url, sw.name):
            folders.claim(sw.folder, sw.study, mask_url(settings.storage_url))
    return Command(sweeps, all_cfgs, file_existed=file_existed)


def drop_new(command: Command, storage_url: str) -> None:
    """Undo the studies a command created when it is refused before its first trial: each study it created
    that holds no trial is deleted (one that another command has added trials to meanwhile is kept), then an
    SQLite file it created that holds no study, with the lock file beside it. Nothing is left half-written."""
    for sw in command.sweeps:
        if sw.new and not sw.study.get_trials(deepcopy=False):
            optuna.delete_study(study_name=sw.name, storage=records.storage(sw.study))
    db = sqlite_path(storage_url)
    if db is None or command.file_existed or not command.sweeps:
        return
    backend = records.storage(command.sweeps[0].study, fresh=True)
    if optuna.study.get_all_study_names(backend):
        return
    if isinstance(backend, optuna.storages.RDBStorage):
        backend.engine.dispose()  # its connections to the file closed before the file goes
    for path in (db, db.with_name(db.name + ".lock")):
        path.unlink(missing_ok=True)


def _space(settings: Settings, compose: Composer, arguments: list[str]) -> SweepSpace:
    """The command's search space: ``hydra.sweeper.params`` under the command line's overrides, a joint WSD
    search's rates as a grid, a small finite sampled space as a grid."""
    params_args = [f"{k}={v}" for k, v in settings.params.items()]
    cli_keys = {a.split("=", 1)[0].lstrip("+~") for a in arguments}
    all_args = [a for a in params_args if a.split("=", 1)[0] not in cli_keys] + list(arguments)
    parser = OverridesParser.create(config_loader=compose.loader)
    parsed = []
    for arg in all_args:
        try:
            parsed += parser.parse_overrides([arg])
        except OverrideParseException as e:  # one of hydra.sweeper.params (Hydra parsed the command line itself)
            key = arg.split("=", 1)[0]
            where = f"hydra.sweeper.params.{key}" if arg in params_args else "the command line"
            said = "; ".join(x.strip().rstrip(".") for x in str(e.message).splitlines() if x.strip())
            raise ValueError(passwords.mask_secrets(f"{where}: Error parsing override '{arg}': {said}")) from None
    space = _joint_rates(build_space(parsed, grid_sampler=samplers.sampler_name(settings.sampler) == "grid"), compose)
    preflight.check_sampled_names_early(space, settings.study_name, compose)  # before choice(a,b) becomes a grid
    space, _ = exhaust_finite(space, settings.sampled_total)
    samplers.check_space(settings.sampler, space.distributions)
    return space


def _as_grid(space: SweepSpace, recorded: dict, group_options: Any) -> dict[str, str]:
    """For each key of a sampled space of finite points whose distribution the study cannot take but whose grid
    form could (the study ran its points as a comma list, or as a grid before grids recorded a choice as one), the
    fix: the ``n_trials`` that runs the space as a grid (:func:`sweeper.space.exhaust_finite`)."""
    size = finite_size(space)
    if size is None:
        return {}
    out = {}
    for key, dist in space.distributions.items():
        if key not in recorded:
            continue
        axis = finite_values(dist)  # an ordered axis by its ends: they decide its grid's distribution, as all would
        values = list(axis) if isinstance(dist, optuna.distributions.CategoricalDistribution) else [axis[0], axis[-1]]
        grid = SweepSpace(grid=[(key, [(v, value_text(v)) for v in values])], sampled_as={key: dist})
        if grid.grid_distributions(group_options, recorded)[key] != dist:  # one the study takes, where dist is not
            out[key] = (f"set hydra.sweeper.n_trials={size} (or more) to run its {size} point(s) once each, as a grid, "
                        "which this study takes")
    return out


def _joint_rates(space: SweepSpace, compose: Composer) -> SweepSpace:
    """``schedule=wsd_search`` with several learning rates is one trunk, so one trial, per rate: the rates
    of ``schedule.wsd.learning_rates`` become a grid over ``lr.learning_rate``; a grid over
    ``lr.learning_rate`` alone (``lr.learning_rate=1e-4,2e-4``) sets ``schedule.wsd.learning_rates``, so
    each trunk knows the others. Left as it is when a point is not a WSD search or does not compose (the
    pre-flight names that)."""
    points = space.grid_points()
    if not any(k == "schedule" or k.startswith("schedule.wsd") for k, _ in space.grid):
        points = points[:1]  # the schedule is the same at every point: one composed config tells
    try:
        cfgs = [compose(preflight.point_overrides(space, p)) for p in points]
    except Exception:
        return space
    wsd = [c.schedule.get("wsd") for c in cfgs]
    if any(w is None for w in wsd):
        return space
    lists = {None if w.get("learning_rates") is None else tuple(float(r) for r in w.learning_rates) for w in wsd}
    swept = dict(space.grid).get("lr.learning_rate")
    if lists == {None}:
        if swept and len(swept) > 1:
            rates = ",".join(value_text(float(v)) for v, _ in swept)
            return dataclasses.replace(space, fixed=space.fixed + [f"schedule.wsd.learning_rates=[{rates}]"])
        return space
    if len(lists) > 1:
        return space
    if swept or "lr.learning_rate" in space.distributions:
        raise ValueError("schedule.wsd.learning_rates lists the learning rates of the joint search, so "
                         "lr.learning_rate must not be swept as well; give the rates once, as "
                         "schedule.wsd.learning_rates=[...] or as lr.learning_rate=a,b,c")
    [rates] = lists
    return dataclasses.replace(space, grid=space.grid + [("lr.learning_rate", [(r, value_text(r)) for r in rates])])


def _split_by_study(settings: Settings, space: SweepSpace, cfgs: list[DictConfig],
                    compose: Composer) -> list[tuple[str, SweepSpace, list, list]]:
    """The command's grid points grouped by the study each belongs to, ``<data.name>-<model.name>`` of
    its composed config (whatever changed them: ``data=a,b``, ``model=...``, ``data.train_path=...``),
    in the command's order: ``[(name, space, points, indices)]``. In each study's own space the keys
    that are constant within it (``data=demo``) are fixed overrides, so its trials record the params a
    single-dataset command would, and either command resumes the other's."""
    points = space.grid_points()
    names = [identity.default_study_name(c) if settings.study_name is not None else preflight.check_default_study_name(c)
             for c in cfgs]
    distinct = list(dict.fromkeys(names))
    if settings.study_name is not None:
        name = preflight.check_study_name(str(settings.study_name))
        if len(distinct) > 1:
            raise ValueError(
                f"hydra.sweeper.study_name={name!r} names one study, but this sweep covers {len(distinct)} "
                f"datasets/models ({', '.join(distinct)}) and a study holds one; drop hydra.sweeper.study_name "
                "to run one study per dataset and model (each named <data.name>-<model.name>)")
        _check_one_dataset(name, cfgs, "hydra.sweeper.study_name")
        return [(name, space, points, list(range(len(points))))]
    preflight.check_sampled_names(space, cfgs[0], compose)
    for name in distinct:
        _check_one_dataset(name, [c for c, n in zip(cfgs, names) if n == name], "data.name")
    if len(distinct) == 1:
        return [(distinct[0], space, points, list(range(len(points))))]
    out = []
    for name in distinct:
        idx = [i for i, n in enumerate(names) if n == name]
        mine = [points[i] for i in idx]
        constant = [k for k, _ in space.grid if len({p[k][1] for p in mine}) == 1]
        sub = SweepSpace(
            fixed=space.fixed + [f"{k}={mine[0][k][1]}" for k in constant],
            grid=[(k, [vt for vt in vals if any(p[k][1] == vt[1] for p in mine)])
                  for k, vals in space.grid if k not in constant],
            distributions=dict(space.distributions),
            sampled_as={k: d for k, d in space.sampled_as.items() if k not in constant})
        out.append((name, sub, [{k: v for k, v in p.items() if k not in constant} for p in mine], idx))
    _check_folders_apart(out, cfgs)
    return out


def _data_files(cfg: DictConfig) -> str:
    """The files (or hub dataset) a config trains and evaluates on, as the user gave them."""
    d = cfg.data
    parts = [f"data.train_path={d.get('train_path')}"]
    if d.get("eval_path") is not None:
        parts.append(f"data.eval_path={d.get('eval_path')}")
    if d.get("train_split") not in (None, "train"):
        parts.append(f"data.train_split={d.get('train_split')}")
    return " ".join(parts)


def _same_file(cfg: DictConfig) -> tuple:
    """What tells two configs' data apart: each local file by its real path (``./a.jsonl`` is ``a.jsonl``)."""
    d = cfg.data
    return tuple(os.path.realpath(str(p)) if p is not None and os.path.exists(str(p)) else p
                 for p in (d.get("train_path"), d.get("eval_path"), d.get("train_split")))


def _check_one_dataset(name: str, cfgs: list[DictConfig], picked_by: str) -> None:
    """A study compares runs of one dataset: refuse points of one study (``name``) that train on different
    files, in one line."""
    files = list({_same_file(c): _data_files(c) for c in cfgs}.values())
    if len(files) > 1:
        how = ("a study holds one dataset: drop hydra.sweeper.study_name to run one study per dataset"
               if picked_by == "hydra.sweeper.study_name" else
               "a study holds one dataset: give each its own data.name, one command each (e.g. "
               f"{files[0]} data.name=<name>)")
        raise ValueError(f"study {name!r} would mix {len(files)} datasets ({' and '.join(files[:2])}"
                         f"{', ...' if len(files) > 2 else ''}), as {picked_by} names them alike; {how}")


def _check_folders_apart(split: list[tuple[str, SweepSpace, list, list]], cfgs: list[DictConfig]) -> None:
    """Several studies need a folder each (``hydra.sweep.dir``), or their ``trial_<n>`` folders collide."""
    seen: dict[str, str] = {}
    for name, _, _, idx in split:
        folder = str(cfgs[idx[0]].hydra.sweep.dir)
        if folder in seen:
            raise ValueError(
                f"hydra.sweep.dir={folder} is one folder for the studies {seen[folder]!r} and {name!r}, whose "
                "trial_<n> folders would collide; leave hydra.sweep.dir at its default (a folder per study) or "
                "put ${data.name}-${model.name} in it")
        seen[folder] = name


def _create_study(settings: Settings, name: str, cfg: DictConfig) -> tuple[optuna.Study, bool]:
    """Create (or load) the study ``name`` for the runs of ``cfg``, one composed config of it; and whether this
    call created it."""
    metric = str(cfg.eval.metric)
    wanted = objectives.directions(settings.direction, metric, config_mod.metric_direction(metric), settings.cost)
    multi = len(wanted) > 1
    if multi and cfg.schedule.get("wsd") is not None:  # its branches are trials of one objective value each
        raise ValueError("schedule=wsd_search picks one length by eval.metric alone (its branches report one value "
                         "each), so it cannot run with two objectives (hydra.sweeper.direction="
                         f"[{','.join(wanted)}]); drop the second objective, or sweep schedule.max_steps=a,b,c")
    storage = open_storage(settings.storage_url, settings.heartbeat_interval, settings.grace_period,
                           settings.max_retry)
    new = name not in optuna.study.get_all_study_names(storage)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=samplers.make_sampler(settings.sampler, len(wanted)),
        pruner=optuna.pruners.NopPruner() if multi else samplers.make_pruner(settings.pruner), directions=wanted,
        load_if_exists=True,
    )
    had = [d.name.lower() for d in study.directions]
    if had != wanted:
        raise ValueError(
            f"study {name!r} in {mask_url(settings.storage_url)} was created to {', '.join(had)}, but this command "
            f"needs {', '.join(wanted)} (eval.metric={metric}, hydra.sweeper.direction={settings.direction}); use "
            "another hydra.sweeper.study_name")
    cost = study.user_attrs.get(records.COST)
    if multi and not new and cost is not None and cost != settings.cost:  # its trials' second values are in cost's unit
        raise ValueError(
            f"study {name!r} in {mask_url(settings.storage_url)} measures its cost in {cost}, but this command asks "
            f"for hydra.sweeper.cost={settings.cost}: its Pareto front would mix the two; use "
            f"hydra.sweeper.cost={cost} or another hydra.sweeper.study_name")
    study.set_user_attr(records.METRIC, metric)
    if multi:
        study.set_user_attr(records.COST, settings.cost)
    study.set_metric_names([metric, objectives.COSTS[settings.cost][1]] if multi else [metric])  # dashboard axes
    study.set_user_attr(records.DATA, str(cfg.data.name))
    study.set_user_attr(records.MODEL, str(cfg.model.name))
    return study, new
