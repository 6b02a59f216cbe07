"""When a WSD trunk stops because no later branch can win (sweeper.trunk_stop), on crafted curves."""

from __future__ import annotations

import pytest

from sweeper.trunk_stop import Branch, check, gain, smoothed, trunk_best


def _trunk(values, every=50):
    return [(every * (i + 1), v) for i, v in enumerate(values)]


# an over-fitting trunk: falls to 0.80 at step 300, then climbs 0.02 per evaluation
FALL = [1.40, 1.20, 1.05, 0.95, 0.86, 0.80]
RISE = [0.80 + 0.02 * k for k in range(1, 13)]
TRUNK = _trunk(FALL + RISE)
# the branch of 500 steps (branch point 400) cooled the trunk down from ~0.82 to 0.75: a gain of ~0.07
BRANCH = Branch(500, 400, 0.75)


def live(curve, branches, **kw):
    """The rule as the trunk runs it: after each evaluation, on the curve so far; the first stop."""
    for i in range(1, len(curve) + 1):
        stop = check(curve[:i], branches, **kw)
        if stop is not None:
            return stop
    return None


def test_smoothed_is_the_median_of_the_last_evaluations():
    assert smoothed(TRUNK, 300) == pytest.approx(0.86)  # median of 0.95, 0.86, 0.80
    assert smoothed(TRUNK, 325) == smoothed(TRUNK, 300)
    assert smoothed(TRUNK, 10) is None


def test_gain_is_the_trunk_at_the_branch_point_less_the_branch():
    assert gain(TRUNK, BRANCH) == pytest.approx(smoothed(TRUNK, 400) - 0.75)
    assert gain(TRUNK, BRANCH, maximize=True) == pytest.approx(0.75 - smoothed(TRUNK, 400))


def test_a_climbing_trunk_stops_once_its_bound_stays_above_the_best_branch():
    g = gain(TRUNK, BRANCH)
    stop = live(TRUNK, [BRANCH], patience=3, sigma=0.005)
    assert stop is not None and stop.step < TRUNK[-1][0]
    # at the step it stopped, and at the two evaluations before, trunk - gain > best + 2 sigma
    for s in (stop.step - 100, stop.step - 50, stop.step):
        assert smoothed(TRUNK, s) - g - 0.75 > 0.01
    # one evaluation earlier the rule had not yet seen 3 such evaluations
    earlier = [p for p in TRUNK if p[0] < stop.step]
    assert check(earlier, [BRANCH], patience=3, sigma=0.005) is None
    assert stop.best_steps == 500 and stop.best_value == 0.75 and stop.gain == pytest.approx(g)
    assert "no later branch can win" in stop.reason() and f"step {stop.step}" in stop.reason()
    assert stop.record()["rule"] == "no_win"


def test_a_falling_trunk_never_stops():
    falling = _trunk([1.4 - 0.03 * k for k in range(30)])
    assert check(falling, [Branch(500, 400, smoothed(falling, 400) - 0.05)], patience=1, sigma=0.0) is None


def test_noise_patience_and_margin_hold_it_back():
    assert check(TRUNK, [BRANCH], patience=None) is None  # null: never
    assert check(TRUNK, [], patience=1) is None  # no branch: no gain measured yet
    assert live(TRUNK, [BRANCH], patience=3, sigma=1.0) is None  # a rise inside the noise is no rise
    assert live(TRUNK, [BRANCH], patience=20, sigma=0.005) is None  # fewer evaluations than the patience
    quick = live(TRUNK, [BRANCH], patience=1, sigma=0.005)
    slow = live(TRUNK, [BRANCH], patience=1, sigma=0.005, margin=1.0)  # a later gain may be twice as large
    assert quick is not None and slow is not None and slow.step > quick.step


def test_the_newest_cooldowns_gain_bounds_a_later_one_and_the_best_branch_is_the_target():
    # an early branch gained much (at step 200 the trunk was at 1.05), the newest little: a later cooldown,
    # cut from a trunk that has stopped improving, gains about what the newest gained, not what the first did
    early = Branch(250, 200, 0.90)
    newest = Branch(500, 400, smoothed(TRUNK, 400) - 0.01)
    stop = live(TRUNK, [early, newest], patience=3, sigma=0.005)
    assert stop is not None and stop.gain == pytest.approx(0.01) and stop.best_steps == 500
    assert stop.bound == pytest.approx(smoothed(TRUNK, stop.step) - 0.01)
    # an early branch that is the best: the target is its value, and a lower target is passed no later
    best_early = Branch(250, 200, 0.70)
    later = live(TRUNK, [best_early, newest], patience=3, sigma=0.005)
    assert later is not None and later.best_steps == 250 and later.best_value == 0.70 and later.step <= stop.step
    # a negative gain (the cooldown did worse than the trunk) bounds at 0, not below
    worse = Branch(500, 400, smoothed(TRUNK, 400) + 0.05)
    assert live(TRUNK, [worse], patience=1, sigma=0.005).gain == 0.0


def test_a_maximised_metric_mirrors_the_rule():
    acc = [(s, 2.0 - v) for s, v in TRUNK]  # accuracy rises, then falls
    stop = live(acc, [Branch(500, 400, 2.0 - 0.75)], patience=3, maximize=True, sigma=0.005,
                metric="eval_accuracy")
    ref = live(TRUNK, [BRANCH], patience=3, sigma=0.005)
    assert stop is not None and stop.step == ref.step and "eval_accuracy" in stop.reason()


def test_the_noise_defaults_to_the_reports_estimate_of_the_trunk():
    from sweeper.report import noise_estimate

    stop = live(TRUNK, [BRANCH], patience=3)
    seen = [p for p in TRUNK if p[0] <= stop.step]  # the curve when it stopped
    assert stop.sigma == pytest.approx(noise_estimate([seen]).sigma)


# a trunk that reached its best (0.45 at step 550) and then drifts up slowly, less than twice its noise
PLATEAU = _trunk([1.40, 1.00, 0.80, 0.60, 0.50, 0.47, 0.46, 0.455, 0.452, 0.451, 0.45,
                  0.452, 0.453, 0.455, 0.456, 0.457, 0.458, 0.459, 0.460, 0.461, 0.462])
# its 600-step branch (branch point 480 -> the trunk near 0.452) did not gain: 0.454
FLAT = Branch(600, 480, 0.454)


def test_a_stalled_trunk_stops_at_early_stoppings_patience_when_its_bound_is_no_better():
    from sweeper.trunk_stop import stalled_for

    assert stalled_for(PLATEAU[:11]) == 0 and stalled_for(PLATEAU[:14]) == 3
    # by more than 0.01: 0.455 (step 400) is the last best, 0.452 ... 0.455 after it are six evaluations
    assert stalled_for(PLATEAU[:14], threshold=0.01) == 6
    stop = live(PLATEAU, [FLAT], patience=3, sigma=0.01, es_patience=5)
    # five evaluations after the best (step 550): at step 800; the 2-sigma rule alone never stops this trunk
    assert stop is not None and stop.step == 800 and stop.stalled_for == 5
    assert live(PLATEAU, [FLAT], patience=3, sigma=0.01) is None
    assert stop.bound == pytest.approx(smoothed(PLATEAU, 800) - stop.gain) and stop.bound >= FLAT.value
    assert "has not improved on its best eval_loss for 5 evaluations (eval.early_stopping_patience or more)" in stop.reason()
    assert "no better than the best branch (max_steps=600, 0.4540)" in stop.reason()
    # a larger patience waits longer; none (early stopping off) leaves only the 2-sigma rule
    assert live(PLATEAU, [FLAT], patience=3, sigma=0.01, es_patience=8).step == 950
    assert live(PLATEAU, [FLAT], patience=3, sigma=0.01, es_patience=None) is None


def test_a_stalled_trunk_goes_on_while_a_cooldown_could_still_win():
    # the newest cooldown gained 0.05 and a later one may gain 10% more: a branch cut from this plateau could
    # still reach below the best branch, so the stalled trunk goes on until it has climbed that much more
    # (with no margin its bound is no better five evaluations after its best, and it stops there)
    gained = Branch(600, 480, smoothed(PLATEAU, 480) - 0.05)
    assert live(PLATEAU, [gained], patience=3, sigma=0.01, es_patience=5).step == 800
    later = live(PLATEAU, [gained], patience=3, sigma=0.01, es_patience=5, margin=0.1)
    assert later.step == 1000 and later.bound >= gained.value > smoothed(PLATEAU, 950) - 1.1 * later.gain
    # a trunk that keeps setting new bests never stalls, however small the steps
    falling = _trunk([1.0 - 0.001 * k for k in range(30)])
    assert live(falling, [Branch(500, 400, 0.99)], patience=30, sigma=0.0, es_patience=2) is None


def test_a_stalled_maximised_trunk_mirrors_the_rule():
    acc = [(s, 2.0 - v) for s, v in PLATEAU]
    stop = live(acc, [Branch(600, 480, 2.0 - 0.454)], patience=3, sigma=0.01, es_patience=5, maximize=True,
                metric="eval_accuracy")
    assert stop is not None and stop.step == 800 and "eval_accuracy" in stop.reason()


def test_the_trunks_best_state_is_its_best_evaluation_before_its_own_cooldown():
    assert trunk_best(TRUNK) == (300, 0.80)
    assert trunk_best(TRUNK, until=250) == (250, 0.86)  # only up to its branch point (or a stop)
    cooled = TRUNK + [(950, 0.70)]  # its own cooldown, after the branch point 900, is not a constant-LR state
    assert trunk_best(cooled, until=900) == (300, 0.80)
    assert trunk_best([(50, 0.5), (100, 0.4), (150, 0.4)]) == (100, 0.4)  # the first of equal values
    assert trunk_best([(50, 0.5), (100, 0.9)], maximize=True) == (100, 0.9)
    assert trunk_best([], until=100) is None and trunk_best(TRUNK, until=10) is None
