"""Hydra sweep grammar -> grid axes and Optuna distributions, checked against Hydra's own expansion."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.space import build_space, exhaust_finite, finite_values, same_value, translate, untried
from sweeper.storage import mask_url

from .conftest import ROOT

PARSER = OverridesParser.create()


def _one(text, **kw):
    [ov] = PARSER.parse_overrides([text])
    return translate(ov, **kw)


def _hydra_expansion(text):
    """What Hydra's basic sweeper would run for a discrete sweep."""
    [ov] = PARSER.parse_overrides([text])
    return [float(v) if hasattr(v, "as_tuple") else v for v in ov.sweep_iterator()]


@pytest.mark.parametrize("text,kind,expected", [
    ("schedule.max_steps=500", "fixed", "schedule.max_steps=500"),
    ("schedule=under,sweet,over", "grid", [("under", "under"), ("sweet", "sweet"), ("over", "over")]),
    ("schedule.max_steps=10,20", "grid", [(10, "10"), (20, "20")]),
    ("lr.learning_rate=1e-4,2e-4", "grid", [(1e-4, "0.0001"), (2e-4, "0.0002")]),
    ("schedule=choice(under,over)", "dist", CategoricalDistribution(["under", "over"])),
    ("schedule.max_steps=range(100,400,100)", "dist", IntDistribution(100, 300, step=100)),
    ("schedule.max_steps=range(1,5)", "dist", IntDistribution(1, 4)),
    ("schedule.max_steps=tag(log,range(1,100))", "dist", IntDistribution(1, 99, log=True)),
    ("lr.learning_rate=interval(1e-5,3e-4)", "dist", FloatDistribution(1e-5, 3e-4)),
    ("lr.learning_rate=tag(log,interval(1e-5,3e-4))", "dist", FloatDistribution(1e-5, 3e-4, log=True)),
    ("data.eval_fraction=range(0.1,0.4,0.1)", "dist", FloatDistribution(0.1, 0.3, step=0.1)),
])
def test_translation_table(text, kind, expected):
    got_kind, payload = _one(text)
    assert got_kind == kind
    if kind == "dist" and isinstance(expected, CategoricalDistribution):
        assert list(payload.choices) == pytest.approx(list(expected.choices))
    else:
        assert payload == expected


@pytest.mark.parametrize("text", ["schedule.max_steps=range(100,400,100)", "schedule.max_steps=range(1,5)",
                                  "schedule.max_steps=range(0,10,3)"])
def test_int_range_matches_hydra_stop_excluded(text):
    _, dist = _one(text)
    allowed = set(range(dist.low, dist.high + 1, dist.step))
    assert allowed == set(_hydra_expansion(text))


def test_float_range_excludes_stop_without_drift():
    _, dist = _one("data.eval_fraction=range(0.1,0.4,0.1)")
    assert finite_values(dist) == [0.1, 0.2, 0.3]
    kind, pairs = _one("data.eval_fraction=range(0.05,0.2,0.05)", grid_sampler=True)
    assert pairs == [(0.05, "0.05"), (0.1, "0.1"), (0.15, "0.15")]


def test_grid_sampler_expands_choice_and_range_but_refuses_interval():
    assert _one("schedule=choice(under,over)", grid_sampler=True)[0] == "grid"
    kind, pairs = _one("schedule.max_steps=range(10,40,10)", grid_sampler=True)
    assert kind == "grid" and [v for v, _ in pairs] == [10, 20, 30]
    with pytest.raises(ValueError, match="interval"):
        _one("lr.learning_rate=interval(1e-5,1e-4)", grid_sampler=True)


def test_grid_is_the_product_in_order():
    space = build_space(PARSER.parse_overrides(["schedule=under,over", "batch=balanced,aggressive", "seed=1"]))
    assert space.fixed == ["seed=1"]
    assert [(p["schedule"][0], p["batch"][0]) for p in space.grid_points()] == [
        ("under", "balanced"), ("under", "aggressive"), ("over", "balanced"), ("over", "aggressive")]


def test_password_masked():
    assert mask_url("postgresql://bob:s3cret@db:5432/sweeps") == "postgresql://bob:***@db:5432/sweeps"
    assert "s3cret" not in mask_url("postgresql+psycopg2://bob:s3cret@db/sweeps")


def test_plugin_discovered_by_hydra():
    names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]
    assert "SftSweepSweeper" in names


@pytest.mark.slow
def test_train_py_lists_the_plugin():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--info", "plugins"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert "SftSweepSweeper" in out.stdout


def test_storage_password_split_off_and_masked():
    from sweeper.passwords import mask_passwords, split_password

    assert split_password("postgresql://bob:p%40ss@db:5432/x") == ("postgresql://bob@db:5432/x", "p@ss")
    assert split_password("postgresql://bob@db/x") == ("postgresql://bob@db/x", None)
    assert split_password("sqlite:///tmp/x.db") == ("sqlite:///tmp/x.db", None)
    text = "storage: postgresql+psycopg://bob:s3cret@db/x\n- hydra.sweeper.storage='mysql://a:b@h/d'"
    assert mask_passwords(text) == "storage: postgresql+psycopg://bob:***@db/x\n- hydra.sweeper.storage='mysql://a:***@h/d'"
    # a password as a query parameter, and one with an @ or : left unencoded, are masked and split off whole
    query = "postgresql://bob@db/x?sslmode=require&password=s3%40cret"
    assert mask_passwords(query) == "postgresql://bob@db/x?sslmode=require&password=***"
    assert mask_url(query) == mask_passwords(query)
    assert split_password(query) == ("postgresql://bob@db/x?sslmode=require", "s3@cret")
    assert mask_url("postgresql://bob:p@ss:w0rd@db:5432/x") == "postgresql://bob:***@db:5432/x"
    from sweeper.storage import StorageError, check_url

    for bad in ("postgresql://bob:p@ss@db/x", "postgresql://bob:pw@db:port/x"):
        with pytest.raises(StorageError, match=r"^hydra.sweeper.storage=postgresql://bob:\*\*\*@db") as e:
            check_url(bad)
        assert "p@ss" not in str(e.value) and ":pw@" not in str(e.value)
    for good in ("postgresql://bob:pa:ss@db/x", "postgresql://bob:p%40ss@db:5432/x", "sqlite:///x.db", "optuna.db"):
        check_url(good)  # a : after the first is the password's; no scheme: said when it is opened
    from sweeper.passwords import secret_values

    assert set(secret_values({}, query)) == {"s3%40cret", "s3@cret"}


# hydra-optuna-sweeper's own table (plugins/hydra_optuna_sweeper/tests/test_optuna_sweeper_plugin.py): its ten
# override cases and its params cases, each with what it gives here: "same", "mapped" (the difference is
# ours on purpose: Hydra's range excludes its stop) or "refused" with the line's gist.
HOS_OVERRIDES = [
    ("key=choice(1,2)", "same", CategoricalDistribution([1, 2])),
    ("key=choice(true, false)", "same", CategoricalDistribution([True, False])),
    ("key=choice('hello', 'world')", "same", CategoricalDistribution(["hello", "world"])),
    ("key=shuffle(range(1,3))", "same", CategoricalDistribution([1, 2])),
    ("key=range(1,3)", "mapped", IntDistribution(1, 2)),  # HOS: IntUniformDistribution(1, 3)
    ("key=interval(1, 5)", "same", FloatDistribution(1, 5)),
    ("key=int(interval(1, 5))", "same", IntDistribution(1, 5)),
    ("key=tag(log, interval(1, 5))", "same", FloatDistribution(1, 5, log=True)),
    ("key=tag(log, int(interval(1, 5)))", "same", IntDistribution(1, 5, log=True)),
    # HOS: DiscreteUniformDistribution(0.5, 5.5, 1), i.e. the stop 5.5 included
    ("key=range(0.5, 5.5, step=1)", "mapped", FloatDistribution(0.5, 4.5, step=1)),
]


@pytest.mark.parametrize("text,how,expected", HOS_OVERRIDES)
def test_hydra_optuna_sweeper_override_table(text, how, expected):
    kind, dist = _one(text)
    assert kind == "dist"
    if isinstance(expected, CategoricalDistribution):
        assert set(dist.choices) == set(expected.choices)
    else:
        assert dist == expected


HOS_PARAMS = [
    (["key=choice(1,2)"], {"key": CategoricalDistribution([1, 2])}, []),
    (["key=5"], {}, ["key=5"]),
    (["key1=choice(1,2)", "key2=5"], {"key1": CategoricalDistribution([1, 2])}, ["key2=5"]),
    (["key1=choice(1,2)", "key2=5", "key3=range(1,3)"],
     {"key1": CategoricalDistribution([1, 2]), "key3": IntDistribution(1, 2)}, ["key2=5"]),  # mapped: stop excluded
    (["x=range(-5.5, 5.5, step=0.5)", "y=choice(-5 ,0 ,5)"],  # its example/conf/config.yaml params
     {"x": FloatDistribution(-5.5, 5.0, step=0.5), "y": CategoricalDistribution([-5, 0, 5])}, []),
    (["x=range(-5.5, 5.5, 0.5)", "y=choice(-5, 0, 5)", "z=1"],  # its custom-search-space params
     {"x": FloatDistribution(-5.5, 5.0, step=0.5), "y": CategoricalDistribution([-5, 0, 5])}, ["z=1"]),
]


@pytest.mark.parametrize("overrides,dists,fixed", HOS_PARAMS)
def test_hydra_optuna_sweeper_params_table(overrides, dists, fixed):
    space = build_space(PARSER.parse_overrides(overrides))
    assert space.distributions == dists and space.fixed == fixed and not space.grid


@pytest.mark.parametrize("text,line", [
    ("schedule.max_steps=range(5,1,-1)", r"descending range .* write it ascending, e.g. range\(2,6,1\) for the same points"),
    ("schedule.max_steps=range(5,1)", r"the range is empty \(the stop is excluded\)"),
    ("schedule.max_steps=range(1,5,0)", r"the step must not be 0"),
    ("data.eval_fraction=range(0.4,0.1,-0.1)", r"e.g. range\(0.2,0.5,0.1\)"),
    ("lr.learning_rate=tag(log, range(0.1,0.5,0.1))", r"tag\(log, interval\(0.1,0.5\)\)"),
])
def test_bad_ranges_refused_in_one_line(text, line):
    with pytest.raises(ValueError, match=line) as e:
        _one(text)
    assert "\n" not in str(e.value)


def test_range_note_names_the_values_and_the_stop_rule():
    space = build_space(PARSER.parse_overrides(["schedule.max_steps=range(10,30,10)"]))
    assert space.notes == ["schedule.max_steps=range(10,30,10) tries 10, 20: the stop 30 is excluded (Hydra's "
                           "rule; hydra-optuna-sweeper included it)"]
    assert build_space(PARSER.parse_overrides(["schedule.max_steps=range(0,10,3)"])).notes == []  # the same points


def test_float_range_with_a_step_is_ordered_and_a_grid_axis_with_the_grid_sampler():
    _, dist = _one("data.eval_fraction=range(0.05,0.2,0.05)")
    assert dist == FloatDistribution(0.05, 0.15, step=0.05)
    assert finite_values(dist) == [0.05, 0.1, 0.15]
    _, pairs = _one("data.eval_fraction=range(0.05,0.2,0.05)", grid_sampler=True)
    assert [v for v, _ in pairs] == [0.05, 0.1, 0.15]


def test_a_finite_space_no_larger_than_n_trials_runs_each_point_once():
    space = build_space(PARSER.parse_overrides(["schedule.max_steps=range(10,30,10)", "seed=3"]))
    grid, note = exhaust_finite(space, 4)
    assert not grid.distributions and [v for v, _ in dict(grid.grid)["schedule.max_steps"]] == [10, 20]
    assert "2 point(s), no more than n_trials=4" in note
    assert exhaust_finite(space, 1) == (space, None)  # more points than trials: sampled
    cont = build_space(PARSER.parse_overrides(["lr.learning_rate=interval(1e-5,1e-4)"]))
    assert exhaust_finite(cont, 100) == (cont, None)
    huge = build_space(PARSER.parse_overrides(["schedule.max_steps=int(interval(1,1000000000))"]))
    assert exhaust_finite(huge, 10) == (huge, None)  # counted, not listed


@pytest.mark.parametrize("text", ["lr.learning_rate=choice(1e-4,3e-4,1e-3)", "schedule.max_steps=range(4,10,2)",
                                  "data.eval_fraction=range(0.05,0.2,0.05)", "schedule=choice(under,sweet)"])
def test_a_finite_space_records_its_points_alike_sampled_or_as_a_grid(text):
    # Optuna refuses a param whose distribution changes kind (or a categorical's choices) within a study: a re-run
    # with more n_trials (a grid) or fewer (sampled) must record what the other recorded
    sampled = build_space(PARSER.parse_overrides([text]))
    [(key, dist)] = sampled.distributions.items()
    grid, _ = exhaust_finite(sampled, 10)
    assert grid.grid_distributions(lambda k: ["over", "sweet", "under"] if k == "schedule" else None) == {key: dist}
    by_grid_sampler = build_space(PARSER.parse_overrides([text]), grid_sampler=True)
    assert by_grid_sampler.grid == grid.grid and by_grid_sampler.grid_distributions() == {key: dist}


def test_a_grid_records_its_values_as_the_study_does():
    choice = CategoricalDistribution([1e-4, 3e-4, 1e-3])
    grid, _ = exhaust_finite(build_space(PARSER.parse_overrides(["lr.learning_rate=choice(1e-4,3e-4,1e-3)"])), 3)
    old_grid = FloatDistribution(1e-4, 1e-3)  # a study whose grid recorded numbers on a range (before, or a comma list)
    assert grid.grid_distributions(recorded={"lr.learning_rate": old_grid}) == {"lr.learning_rate": old_grid}
    comma = build_space(PARSER.parse_overrides(["lr.learning_rate=1e-4,1e-3"]))  # a comma list after a choice
    assert comma.grid_distributions(recorded={"lr.learning_rate": choice}) == {"lr.learning_rate": choice}
    log = build_space(PARSER.parse_overrides(["schedule.max_steps=8,16"]))
    assert log.grid_distributions(recorded={"schedule.max_steps": IntDistribution(1, 99, log=True)}) == {
        "schedule.max_steps": IntDistribution(8, 16, log=True)}
    other = build_space(PARSER.parse_overrides(["lr.learning_rate=2e-4,5e-4"]))  # no kind holds both: refused later
    assert other.grid_distributions(recorded={"lr.learning_rate": choice}) == {
        "lr.learning_rate": FloatDistribution(2e-4, 5e-4)}


@pytest.mark.parametrize("dists,drawn,tried,expected", [
    ({"k": IntDistribution(4, 8, step=2)}, {"k": 6}, [{"k": 4}], {"k": 6}),  # a new point stands
    ({"k": IntDistribution(4, 8, step=2)}, {"k": 6}, [{"k": 6}], {"k": 8}),  # the next point not tried
    ({"k": IntDistribution(4, 8, step=2)}, {"k": 8}, [{"k": 8}, {"k": 4}], {"k": 6}),  # wrapping around
    ({"k": IntDistribution(4, 8, step=2)}, {"k": 8}, [{"k": 4}, {"k": 6}, {"k": 8}], {"k": 8}),  # all tried
    ({"k": FloatDistribution(0.05, 0.15, step=0.05)}, {"k": 0.15000000000000002}, [{"k": 0.15}], {"k": 0.05}),
    ({"k": CategoricalDistribution(["a", "b", "c"])}, {"k": "a"}, [{"k": "a"}, {"k": "b"}], {"k": "c"}),
    ({"a": CategoricalDistribution(["x", "y"]), "b": IntDistribution(1, 2)}, {"a": "x", "b": 2},
     [{"a": "x", "b": 2}, {"a": "y", "b": 1}], {"a": "y", "b": 2}),  # the last key fastest
    ({"k": IntDistribution(1, 10**9)}, {"k": 5}, [{"k": 5}, {"k": 6}], {"k": 7}),  # a billion points, not listed
])
def test_a_draw_of_a_tried_point_moves_to_the_next_untried_one(dists, drawn, tried, expected):
    assert untried(dists, drawn, tried) == expected


def test_same_value_forgives_a_float_step_rounding_only():
    assert same_value(0.15, 0.15000000000000002) and same_value(3, 3.0) and same_value("a", "a")
    assert not same_value(0.15, 0.16) and not same_value(True, 1) and not same_value("1", 1)


@pytest.mark.parametrize("text,key_value,line", [
    ("schedule.max_steps=interval(10,20)", 500, r"schedule.max_steps takes whole numbers \(int\), but "
     r"interval\(10.0,20.0\) samples floats such as 15\.0; write schedule.max_steps='int\(interval\(10,20\)\)'"),
    ("schedule.max_steps=interval(2,7)", 500, r"interval\(2.0,7.0\) samples floats such as 4\.5; write "),
    ("schedule.max_steps=tag(log, interval(10,20))", 500, r"'tag\(log, int\(interval\(10,20\)\)\)'"),
    ("schedule.max_steps=range(10.0,30.0,10.0)", 500, r"takes int values, but range\(10.0,30.0,10.0\) gives 10.0"),
    ("schedule.max_steps=choice(10,abc)", 500, r"takes int values, but choice\(10,abc\) gives abc \(str\)"),
])
def test_a_sampled_value_that_does_not_fit_its_key_is_refused(text, key_value, line):
    from omegaconf import OmegaConf

    from sweeper.config import ScheduleConfig
    from sweeper.typefit import check

    cfg = OmegaConf.create({"schedule": OmegaConf.structured(ScheduleConfig(max_steps=key_value))})
    with pytest.raises(ValueError, match=line):
        check(build_space(PARSER.parse_overrides([text])), cfg)
    check(build_space(PARSER.parse_overrides(["schedule.max_steps=int(interval(10,20))"])), cfg)  # fits
    untyped = OmegaConf.create({"lr": {"learning_rate": 1e-4, "n": 3}})
    check(build_space(PARSER.parse_overrides(["lr.learning_rate=interval(1e-5,1e-3)"])), untyped)
    with pytest.raises(ValueError, match="lr.n takes whole numbers"):
        check(build_space(PARSER.parse_overrides(["lr.n=interval(1,5)"])), untyped)
