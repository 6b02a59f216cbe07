"""Hydra sweep grammar -> grid axes and Optuna distributions, checked against Hydra's own expansion."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sweeper.space import build_space, translate
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
    ("data.eval_fraction=range(0.1,0.4,0.1)", "dist", CategoricalDistribution([0.1, 0.2, 0.3])),
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
    assert list(dist.choices) == [0.1, 0.2, 0.3]
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
