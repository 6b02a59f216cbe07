"""hydra-optuna-sweeper parity: samplers by name and _target_, directions and cost, the fields that map, the
Pareto front of a two-objective study, optimization_results.yaml; one slow CLI run of its example block and
one two-objective sweep on the demo data."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from sweeper import hos, objectives, samplers
from sweeper.report import attrs, front_report, pick

from .conftest import ROOT
from .helpers.cli import run_in_process


@pytest.mark.parametrize("cfg,cls,seed", [
    ({"name": "tpe", "seed": 3}, optuna.samplers.TPESampler, 3),
    ({"name": "grid", "seed": 3}, optuna.samplers.TPESampler, 3),
    ({"name": "random", "seed": 4}, optuna.samplers.RandomSampler, 4),
    ({"name": "nsgaii", "seed": 5, "population_size": 8}, optuna.samplers.NSGAIISampler, 5),
    ({"name": "bruteforce", "seed": 6}, optuna.samplers.BruteForceSampler, 6),
    ({"_target_": "optuna.samplers.TPESampler", "seed": 7, "n_startup_trials": 4}, optuna.samplers.TPESampler, 7),
    ({"name": "tpe", "_target_": "optuna.samplers.RandomSampler", "seed": 8}, optuna.samplers.RandomSampler, 8),
    ({"_target_": "optuna.samplers.GridSampler", "seed": 9}, optuna.samplers.TPESampler, 9),  # our grid
])
def test_sampler_by_name_or_target_with_options_and_seed(cfg, cls, seed):
    s = samplers.make_sampler(OmegaConf.create(cfg))
    assert type(s) is cls
    draws = [samplers.make_sampler(OmegaConf.create(cfg)) for _ in range(2)]  # seeded: the same first draw
    firsts = []
    for d in draws:
        study = optuna.create_study(sampler=d)
        firsts.append(study.ask().suggest_int("x", 0, 1000))
    assert firsts[0] == firsts[1]
    if "population_size" in cfg:
        assert s._population_size == 8
    if "n_startup_trials" in cfg:
        assert s._n_startup_trials == 4


@pytest.mark.parametrize("cfg,line", [
    ({"name": "nope"}, r"hydra.sweeper.sampler.name must be one of tpe, random, grid, cmaes"),
    ({"name": "tpe", "n_startup": 3}, r"TPESampler takes no option 'n_startup'; its options are"),
    ({"_target_": "optuna.samplers.NoSuchSampler"}, r"_target_='optuna.samplers.NoSuchSampler' is not an importable"),
    ({"name": "nsgaii", "population_size": 1}, r"NSGAIISampler\(population_size=1\) failed: "),
])
def test_bad_sampler_refused_in_one_line(cfg, line):
    with pytest.raises(ValueError, match=line) as e:
        samplers.make_sampler(OmegaConf.create(cfg))
    assert "\n" not in str(e.value)


def test_a_sampler_needing_a_missing_package_or_one_objective_is_refused():
    import importlib.util

    if importlib.util.find_spec("cmaes") is None:
        with pytest.raises(ValueError, match="needs the package cmaes, which is not installed: pip install cmaes"):
            samplers.make_sampler({"name": "cmaes"})
    with pytest.raises(ValueError, match="bruteforce tries every point, but lr.learning_rate is continuous"):
        samplers.check_space({"name": "bruteforce"}, {"lr.learning_rate": optuna.distributions.FloatDistribution(0, 1)})
    samplers.check_space({"name": "bruteforce"}, {"n": optuna.distributions.IntDistribution(0, 3)})
    with pytest.raises(ValueError, match="optimises one objective"):
        samplers.make_sampler({"_target_": "optuna.samplers.CmaEsSampler"}, n_objectives=2)


def test_pruner_by_target_takes_its_options_and_ignores_our_other_keys():
    cfg = OmegaConf.create({"name": "none", "n_warmup_steps": 0, "n_startup_trials": 2, "min_resource": 5,
                            "max_resource": "auto", "reduction_factor": 2,
                            "_target_": "optuna.pruners.HyperbandPruner", "bootstrap_count": 0})
    p = samplers.make_pruner(cfg)
    assert isinstance(p, optuna.pruners.HyperbandPruner) and (p._min_resource, p._reduction_factor) == (5, 2)
    assert isinstance(samplers.make_pruner(None), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="HyperbandPruner takes no option 'bogus'"):
        samplers.make_pruner({"_target_": "optuna.pruners.HyperbandPruner", "bogus": 1})


@pytest.mark.parametrize("direction,cost,expected", [
    (None, "steps", ["minimize"]),
    ("minimize", "steps", ["minimize"]),
    (["minimize"], "steps", ["minimize"]),
    (["minimize", "minimize"], "tokens", ["minimize", "minimize"]),
    (OmegaConf.create(["minimize", "minimize"]), "gpu_seconds", ["minimize", "minimize"]),
])
def test_directions(direction, cost, expected):
    assert objectives.directions(direction, "eval_loss", "minimize", cost) == expected


@pytest.mark.parametrize("direction,line", [
    ("maximize", r"hydra.sweeper.direction=maximize, but the objective is eval.metric=eval_loss, which is minimized"),
    (["minimize", "maximize"], r"direction\[1\]=maximize, but the second objective is the trial's cost"),
    (["minimize", "minimize", "minimize"], r"lists 3 objectives"),
    ("sideways", r"must be minimize, maximize or a list of two, but got 'sideways'"),
])
def test_bad_direction_refused_in_one_line(direction, line):
    with pytest.raises(ValueError, match=line):
        objectives.directions(direction, "eval_loss", "minimize", "steps")


def test_hos_fields_map_or_refuse(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        assert hos.workers(2, "auto") == 2
    assert "hydra.sweeper.n_jobs=2 runs as hydra.sweeper.workers=2" in caplog.text
    assert hos.workers(None, "auto") == "auto"
    with pytest.raises(ValueError, match="n_jobs=2 and hydra.sweeper.workers=3 both set"):
        hos.workers(2, 3)
    assert hos.storage(None, "/x") == "sqlite:////x/optuna.db" and hos.storage("sqlite:///a.db", "/x") == "sqlite:///a.db"
    assert hos.failure_rate_exceeded(None, 3, 3) is None
    assert hos.failure_rate_exceeded(0.5, 1, 2) is None
    assert "2 of 3 trial(s) failed (67%), above hydra.sweeper.max_failure_rate=0.5" in hos.failure_rate_exceeded(0.5, 2, 3)
    assert hos.failure_rate_exceeded(0.0, 1, 5) is not None
    with pytest.raises(ValueError, match="max_failure_rate must be between 0.0 and 1.0"):
        hos.check_failure_rate(1.5)
    with pytest.raises(ValueError, match="search_space .* deprecated form; give the space as hydra.sweeper.params"):
        hos.refuse_search_space({"x": {"type": "float", "low": 0, "high": 1}})
    with pytest.raises(ValueError, match="custom_search_space='no.such.fn' is not an importable function"):
        hos.custom_search_space("no.such.fn")
    assert hos.custom_search_space("tests.helpers.search.configure") is not None


def _two_objective_study(points):
    """A study of (eval_loss, steps) points, each with a flat eval curve of small noise."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.set_user_attr("metric", "eval_loss")
    study.set_user_attr("cost", "steps")
    for steps, loss in points:
        t = study.ask()
        t.suggest_int("schedule.max_steps", 1, 1000)
        curve = [[s, loss + 0.002 * (-1) ** s] for s in range(1, 9)]
        t.storage.set_trial_system_attr(t._trial_id, objectives.EVAL_CURVE, curve)
        study.tell(t, [loss, float(steps)])
    return study


def test_front_pick_is_the_cheapest_within_noise_of_the_best():
    study = _two_objective_study([(20, 1.50), (40, 1.001), (80, 1.000), (160, 1.02)])
    picked, best, noise = pick(study)
    assert (picked.values[1], best.values[1]) == (40.0, 80.0) and noise > 0
    text = front_report(study)
    assert "| 3 | schedule.max_steps=" in text and "Pareto front (cheapest first): trial 0" in text
    assert "trial 3" not in text.split("Pareto front")[1]  # dominated: not on the front
    assert "**Recommended for" in text and "the cheapest front point within noise of the best eval_loss" in text
    far = _two_objective_study([(20, 1.50), (80, 1.00)])
    assert pick(far)[0].values[1] == 80.0  # nothing cheaper is close: the best


def test_optimization_results_as_hydra_optuna_sweeper_writes_them(tmp_path):
    single = optuna.create_study()
    t = single.ask()
    t.suggest_float("x", 0, 1)
    single.tell(t, 0.25)
    path = objectives.write_results(single, tmp_path)
    got = OmegaConf.load(path)
    assert got.name == "optuna" and got.best_value == 0.25 and got.best_params.x == t.params["x"]
    multi = _two_objective_study([(20, 1.5), (80, 1.0)])
    got = OmegaConf.load(objectives.write_results(multi, tmp_path))
    assert [s["values"][1] for s in got.solutions] == [20.0, 80.0]
    assert objectives.write_results(optuna.create_study(), tmp_path / "none") is None


# --------------------------------------------------------------------------- the CLI

HOS_EXAMPLE = """\
# hydra-optuna-sweeper's example/conf/config.yaml sweeper block, with this project's keys in params
defaults:
  - config
  - override hydra/sweeper: optuna
  - override hydra/sweeper/sampler: tpe
  - _self_

hydra:
  sweeper:
    sampler:
      seed: 123
    direction: minimize
    study_name: sphere
    storage: null
    n_trials: 20
    n_jobs: 1
    params:
      schedule.max_steps: range(8, 24, 8)
    custom_search_space: tests.helpers.search.configure
"""


@pytest.mark.slow
def test_a_hydra_optuna_sweeper_example_block_runs(tmp_path, cache_dir):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "hos.yaml").write_text(HOS_EXAMPLE)
    proc = run_in_process("-m", f"--config-dir={conf}", "--config-name=hos", "eval.eval_steps=8", "eval.logging_steps=8",
                   "data.demo_rows=120", "batch.per_device_train_batch_size=4", "batch.gradient_accumulation_steps=1",
                   "report_to=none", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stdout + proc.stderr
    assert "hydra.sweeper.n_jobs=1 runs as hydra.sweeper.workers=1" in err
    assert "schedule.max_steps=range(8,24,8) tries 8, 16: the stop 24 is excluded" in err
    assert "has 2 point(s), no more than n_trials=20: each runs once" in err  # not 20 draws of 2 points
    assert "storage=null" in err
    study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert sorted(t.params["schedule.max_steps"] for t in study.trials) == [8, 16]
    for t in study.trials:  # the custom search space's param, conditional on the length, reached the job
        assert 1e-4 <= t.params["lr.learning_rate"] <= (1e-3 if t.params["schedule.max_steps"] <= 8 else 5e-4)
        assert attrs(t)["sft_config"]["learning_rate"] == pytest.approx(t.params["lr.learning_rate"])
    results = OmegaConf.load(tmp_path / "sweeps" / "sphere" / "optimization_results.yaml")
    assert results.name == "optuna" and results.best_value == study.best_value
    assert dict(results.best_params) == study.best_trial.params


@pytest.mark.slow
def test_two_objective_sweep_shows_its_front(tmp_path, cache_dir):
    proc = run_in_process("-m", "schedule.max_steps=20,40", "eval.eval_steps=10", "eval.logging_steps=10", "data.demo_rows=200",
                   "batch.per_device_train_batch_size=4", "batch.gradient_accumulation_steps=1", "report_to=none",
                   "hydra.sweeper.direction=[minimize,minimize]", "hydra.sweeper.cost=steps",
                   "hydra.sweeper.pruner.name=median", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Optuna cannot prune a multi-objective study" in proc.stdout + proc.stderr
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert sorted(t.values[1] for t in study.trials) == [20.0, 40.0]
    assert all(len(t.system_attrs[objectives.EVAL_CURVE]) == t.values[1] // 10 for t in study.trials)
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    summary = (tmp_path / "sweeps" / "demo-tiny" / "summary.md").read_text()
    listed = "; ".join(f"trial {t.number}: eval_loss {t.values[0]:.4f} for {t.values[1]:,.4g} optimizer steps"
                       for t in front)
    assert f"Pareto front (cheapest first): {listed}." in summary and "**Recommended for demo: trial" in summary
    solutions = OmegaConf.load(tmp_path / "sweeps" / "demo-tiny" / "optimization_results.yaml").solutions
    assert [s["number"] for s in solutions] == [t.number for t in front]
    # the same study with another cost: its front would mix steps and tokens, so it is refused, nothing added
    again = run_in_process("-m", "schedule.max_steps=20,60", "eval.eval_steps=10", "data.demo_rows=200",
                           "hydra.sweeper.direction=[minimize,minimize]", "hydra.sweeper.cost=tokens",
                           f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert again.returncode != 0 and "measures its cost in steps, but this command asks for " \
        "hydra.sweeper.cost=tokens" in again.stderr, again.stderr[-2000:]
    assert len(optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db").trials) == 2


def test_hos_block_in_configs_composes_with_our_sweeper():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["hydra/sweeper=optuna", "hydra/sweeper/sampler=nsgaii",
                                           "+hydra.sweeper.sampler.population_size=4"], return_hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("SftSweepSweeper") and sw.sampler.name == "nsgaii"
    assert isinstance(samplers.make_sampler(sw.sampler), optuna.samplers.NSGAIISampler)


@pytest.mark.slow
def test_a_job_hydra_cannot_compose_fails_its_trial_and_the_sweep_goes_on(tmp_path, cache_dir):
    from .conftest import FAST

    proc = run_in_process("-m", "seed=1,2", *FAST, "hydra.sweeper.custom_search_space=tests.helpers.search.bad_patience",
                   f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="demo-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = {t.params["seed"]: t.state for t in study.trials}
    assert states == {1: optuna.trial.TrialState.COMPLETE, 2: optuna.trial.TrialState.FAIL}  # none left RUNNING
    [failed] = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.user_attrs["error"].startswith("ValueError: the job could not start: ")
    assert "early_stopping_patience" in failed.user_attrs["error"] and "\n" not in failed.user_attrs["error"]


def test_a_fixed_value_counts_as_that_grid_point_later():
    from sweeper.sweep.queue import matches

    config = {"schedule.max_steps": 10, "seed": 1}
    ran = optuna.trial.create_trial(value=1.0, system_attrs={"config": config})  # max_steps=10, not a param
    assert matches(ran, {"schedule.max_steps": (10, "10")}, config)
    assert not matches(ran, {"schedule.max_steps": (15, "15")}, {**config, "schedule.max_steps": 15})
    other = optuna.trial.create_trial(value=1.0, params={"schedule.max_steps": 15},
                                      distributions={"schedule.max_steps": optuna.distributions.IntDistribution(1, 99)},
                                      system_attrs={"config": config})
    assert not matches(other, {"schedule.max_steps": (10, "10")}, config)  # its param says 15


def test_two_points_that_compose_one_run_are_named():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sweeper.points import same_runs
    from sweeper.space import build_space

    space = build_space(OverridesParser.create().parse_overrides(["schedule=under,sweet", "schedule.max_steps=10"]))
    same = {"schedule.max_steps": 10, "seed": 1}
    line = same_runs(space, [same, dict(same)], compose=None)
    assert line == ("schedule=under and schedule=sweet compose the same run (schedule.max_steps=10 sets what tells "
                    "them apart): the sweep would train it once for each; sweep only one of them, or drop "
                    "schedule.max_steps=10")
    assert same_runs(space, [same, {**same, "schedule.max_steps": 11}], compose=None) is None
    # the same result but another way to run it (speed, micro-batch): its own run, not refused
    assert same_runs(space, [{**same, "speed.name": "auto"}, {**same, "speed.name": "plain"}], compose=None) is None


@pytest.mark.parametrize("override, line", [
    ("schedule.max_steps=4,6,6", "schedule.max_steps lists 6 more than once (values compared as parsed): the sweep "
     "would train each copy; list each value once, e.g. schedule.max_steps=4,6"),
    ("lr.learning_rate=1e-3,0.001", "lr.learning_rate lists 0.001 more than once (values compared as parsed): the "
     "sweep would train each copy; list each value once, e.g. lr.learning_rate=0.001"),
    ("schedule=under,under", "schedule lists under more than once (values compared as parsed): the sweep would "
     "train each copy; list each value once, e.g. schedule=under"),
])
def test_a_value_repeated_on_a_grid_axis_is_named(override, line):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sweeper.points import same_runs
    from sweeper.space import build_space

    space = build_space(OverridesParser.create().parse_overrides([override]))
    configs = [{"seed": 1, "x": v} for v, _ in space.grid[0][1]]  # the repeated value composes the same run
    assert same_runs(space, configs, compose=None) == line


def test_points_that_differ_only_in_how_they_run_are_their_own_runs(compose_cfg):
    from sweeper import identity

    auto, plain = compose_cfg("speed=auto"), compose_cfg("speed=plain")
    assert identity.result_config(auto) == identity.result_config(plain)  # they learn the same
    assert identity.run_config(auto) != identity.run_config(plain)  # but run differently
    a, b = compose_cfg("batch=conservative"), compose_cfg("batch=balanced")
    assert identity.result_config(a) == identity.result_config(b) and identity.run_config(a) != identity.run_config(b)
    assert identity.run_config(compose_cfg("schedule=under", "schedule.max_steps=10")) == \
        identity.run_config(compose_cfg("schedule=sweet", "schedule.max_steps=10"))
    assert not any(k.startswith("hydra.") for k in identity.run_config(auto))


@pytest.mark.slow
def test_the_pareto_front_in_optuna_dashboard(tmp_path):
    """optuna-dashboard on a two-objective study (metric names from the sweeper): its Pareto-front graph, in
    headless Chromium; the screenshot goes to the test artifacts."""
    import subprocess
    import sys

    from playwright.sync_api import sync_playwright

    from .helpers.ports import free_port, wait_for_port
    from .test_report import ARTIFACTS, CHROMIUM_ARGS, _chromium

    chromium = _chromium()
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = _two_objective_study([(20, 1.50), (40, 1.001), (80, 1.000), (160, 1.02)])
    stored = optuna.create_study(storage=url, study_name="demo-tiny", directions=["minimize", "minimize"])
    stored.set_metric_names(["eval_loss", "optimizer steps"])
    for t in study.trials:
        stored.add_trial(t)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sweeper", "dashboard", "--storage", url, "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard-pareto-front.png"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/dashboard/")
            page.wait_for_selector("text=demo-tiny", timeout=60_000)
            page.click("text=demo-tiny")
            page.wait_for_selector("text=Pareto Front", timeout=60_000)
            page.locator("text=Pareto Front").first.scroll_into_view_if_needed()
            # the graph draws its axes after its heading appears (seconds later on a loaded machine)
            page.wait_for_function("() => document.body.innerHTML.includes('optimizer steps')", timeout=60_000)
            body = page.content()
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert "eval_loss" in body and "optimizer steps" in body  # the axes carry the metric and cost names
        assert shot.stat().st_size > 20_000
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_trial_of_a_command_sweeping_nothing_records_the_studys_params_at_its_values():
    from sweeper.points import fixed_params

    dists = {"schedule.max_steps": optuna.distributions.IntDistribution(20, 40),
             "lr.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
             "schedule": optuna.distributions.CategoricalDistribution(["under", "over"])}
    earlier = optuna.trial.create_trial(value=1.0, params={"schedule.max_steps": 20, "lr.learning_rate": 1e-3,
                                                           "schedule": "under"}, distributions=dists)
    found = fixed_params({"schedule.max_steps": 60, "lr.learning_rate": 3e-3, "seed": 1}, [earlier])
    assert {k: v for k, (v, _) in found.items()} == {"schedule.max_steps": 60, "lr.learning_rate": 3e-3}
    study = optuna.create_study()  # Optuna takes them beside the earlier trial's (same kind and scale)
    study.add_trial(earlier)
    study.add_trial(optuna.trial.create_trial(value=0.5, params={k: v for k, (v, _) in found.items()},
                                              distributions={k: d for k, (_, d) in found.items()}))
    assert study.best_trial.params == {"schedule.max_steps": 60, "lr.learning_rate": 3e-3}


def test_params_and_search_space_given_on_the_command_line_compose(compose_cfg):
    """hydra.sweeper.params={...} (and search_space={...}, refused later naming params) merge into their null
    defaults; a dict typed node that is null made OmegaConf fail with a traceback."""
    cfg = compose_cfg("hydra.sweeper.params={seed:'1,2',schedule:under}", "hydra.sweeper.search_space={a:1}")
    assert hos.params(cfg.hydra.sweeper.params) == {"seed": "1,2", "schedule": "under"}
    with pytest.raises(ValueError, match=r"search_space \(a: \.\.\.\) is hydra-optuna-sweeper's deprecated form"):
        hos.refuse_search_space(cfg.hydra.sweeper.search_space)
    assert hos.params(None) == {} and hos.params({"lr.learning_rate": 0.001}) == {"lr.learning_rate": "0.001"}


@pytest.mark.parametrize("override,built", [
    ("+hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler", optuna.samplers.RandomSampler),
    ("+hydra.sweeper.pruner._target_=optuna.pruners.MedianPruner", optuna.pruners.MedianPruner),
], ids=["sampler", "pruner"])
def test_a_sampler_or_pruner_by_target_on_the_command_line(compose_cfg, override, built):
    """Hydra instantiates the sweeper from hydra.sweeper; a sampler or pruner block with its own _target_ reaches it
    as config (not instantiated by Hydra with the block's name and seed, which the class does not take)."""
    from hydra.utils import instantiate

    cfg = compose_cfg(override)
    fields = instantiate(cfg.hydra.sweeper)._impl.fields
    made = (samplers.make_sampler(fields["sampler"]) if "sampler" in override
            else samplers.make_pruner(fields["pruner"]))
    assert isinstance(made, built)


@pytest.mark.parametrize("cfg", [{"name": "tpe", "seed": 42}, {"name": "random", "seed": 42},
                                 {"_target_": "optuna.samplers.TPESampler", "seed": 42, "n_startup_trials": 2}])
def test_a_resumed_or_second_worker_sampler_of_a_seeded_study_draws_new_points(tmp_path, cfg):
    """Each command that resumes a study (and each worker of one) opens it with a sampler of the same seed:
    its trials get draws of their own (the trial's number seeds them), not the first command's again, and the
    same trials draw the same values on every run."""
    from sweeper import records
    from sweeper.sweep.queue import take

    dists = {"lr.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "batch.size": optuna.distributions.CategoricalDistribution([4, 8, 16, 32])}

    def commands(url: str) -> list[tuple]:
        drawn = []
        for _command in range(3):  # three commands, each with its own study object and a sampler seeded 42
            study = optuna.create_study(study_name="s", storage=url, load_if_exists=True,
                                        sampler=samplers.make_sampler(cfg))
            for _ in range(2):
                trial = take(study, records.new_trial(study), dists, True, cfg)
                drawn.append(tuple(trial.params[k] for k in dists))
                study.tell(trial, trial.params["lr.learning_rate"])
        return drawn

    first = commands(f"sqlite:///{tmp_path / 'a.db'}")
    assert len({d[0] for d in first}) == len(first), first  # no command replays another's learning rates
    assert commands(f"sqlite:///{tmp_path / 'b.db'}") == first  # seeded: the same trials draw the same values
    assert samplers.for_trial({"name": "qmc", "seed": 1}, 1, 3) is None  # one sequence, continued by trial count
    assert samplers.for_trial({"name": "tpe"}, 1, 3) is None  # unseeded: fresh entropy in each process
