"""What the report says from what the study knows, on crafted values: the final rank of a stopped trunk
(sweeper.halving.joint_table), the proposed grids (sweeper.advice), the train/eval gap
(sweeper.generalisation)."""

from __future__ import annotations

import pytest

from sweeper.halving import joint_table


def _trunk(values: dict[int, float], stopped: str | None = None) -> dict:
    return {"branches": [{"max_steps": s, "value": v, "status": "done"} for s, v in values.items()],
            "wsd_trunk": {"rungs": {str(s): v for s, v in values.items()}}, "stopped_reason": stopped,
            "best_value": None if stopped else min(values.values()), "wsd_optimizer_steps": 100}


def test_a_stopped_trunks_reason_states_its_final_rank_and_the_best_rate_as_the_table_shows_them():
    # when 1e-3 was stopped only 1e-4 had recorded its 500-step branch: it ranked 2 of 3 then (1e-4 best);
    # 3e-4 recorded a better value afterwards, so the table shows 3e-4 best and 1e-3 third
    decision_time = ("stopped at the 500-step rung by successive halving (eta=3): its branch's eval_loss 0.2118 "
                     "ranks 2 of 3 learning rates there, and only the best 1 go on (best: lr=0.0001, 0.1430)")
    trunks = {1e-4: _trunk({500: 0.1430}, "stopped at the 500-step rung by successive halving"),
              3e-4: _trunk({500: 0.1145, 1500: 0.1100}),
              1e-3: _trunk({500: 0.2118}, decision_time)}
    text = joint_table(trunks, [500, 1500], "eval_loss", maximize=False)
    line = next(ln for ln in text.splitlines() if ln.startswith("- lr=0.001:"))
    final, _, then = line.partition("; when it was stopped, ")
    assert "ranks 3 of 3 learning rates at 500 steps (best: lr=0.0003, 0.1145)" in final
    assert then == decision_time  # the decision-time view follows, marked as such
    assert "ranks 2 of 3" not in final
    other = next(ln for ln in text.splitlines() if ln.startswith("- lr=0.0001:"))
    assert "ranks 2 of 3 learning rates at 500 steps (best: lr=0.0003, 0.1145)" in other


def test_a_maximised_metric_ranks_the_highest_first():
    trunks = {1e-4: _trunk({8: 0.5}, "stopped"), 3e-4: _trunk({8: 0.9, 16: 0.95})}
    text = joint_table(trunks, [8, 16], "eval_accuracy", maximize=True)
    assert "ranks 2 of 2 learning rates at 8 steps (best: lr=0.0003, 0.9000)" in text


# --------------------------------------------------------------------------- proposals (sweeper.advice)

from sweeper.advice import between, peak, prune_measured  # noqa: E402


def test_a_peak_is_a_best_step_strictly_inside_the_curve_or_its_stable_part():
    rising = [(100, 1.0), (200, 0.8), (300, 0.7), (400, 0.75), (500, 0.8)]
    assert peak(rising) == 300
    assert peak(rising[:3]) is None  # best at the end: no peak
    assert peak(rising, until=300) is None and peak(rising, until=400) == 300  # a trunk before its branch point
    assert peak([(s, -v) for s, v in rising], maximize=True) == 300


def test_lengths_measured_worse_are_never_proposed():
    assert prune_measured([1500, 2000, 2500, 3000], {1500: 0.72, 3000: 0.85}, 0.72) == [1500, 2000, 2500]
    assert prune_measured([8, 16], {16: 0.4}, 0.9, maximize=True) == [8]


def test_between_uses_thirds_without_a_peak_and_narrows_around_one():
    grid, m = between(1500, 3000, 50, {1500: 0.72, 3000: 0.85}, 0.72)
    assert (grid, m) == ([2000, 2500], None)
    grid, m = between(1500, 3000, 50, {1500: 0.72, 3000: 0.85}, 0.72, peaks=[600, 1300, 2100])
    assert (grid, m) == ([1800, 2100, 2550], 2100)
    # a peak at or below the winner says nothing about the interval
    assert between(1500, 3000, 50, {}, 0.72, peaks=[1300])[1] is None
    # a length inside measured worse is dropped; all measured: nothing new to run
    assert between(1500, 3000, 50, {2100: 0.9}, 0.72, peaks=[2100])[0] == [1800, 2550]
    assert between(100, 150, 50, {}, 0.7)[0] == []


# --------------------------------------------------------------------------- train/eval gap (sweeper.generalisation)

from sweeper.generalisation import gap, note, train_at  # noqa: E402

# eval every 50 steps: falls to 0.80 at step 300, then rises to 0.95; train loss logged every 10 steps falls to 0.02
EVAL = [(50 * (i + 1), v) for i, v in enumerate([2.0, 1.4, 1.1, 0.9, 0.82, 0.80, 0.83, 0.86, 0.90, 0.95])]
TRAIN = [(10 * (i + 1), max(0.02, 2.2 - 0.05 * i)) for i in range(50)]


def test_the_train_loss_at_an_eval_step_is_the_mean_logged_in_its_interval():
    assert train_at(TRAIN, 300, 50) == sum(v for s, v in TRAIN if 250 < s <= 300) / 5
    assert train_at([(100, 1.0)], 150, 10) == 1.0  # logged less often than evaluated: the last one before
    assert train_at([(100, 1.0)], 50, 50) is None


def test_a_memorising_run_gets_the_gap_at_its_best_and_end_and_what_helps():
    g = gap(EVAL, TRAIN, sigma=0.01)
    assert (g.best_step, g.end_step, g.memorising) == (300, 500, True)
    assert g.train_best == train_at(TRAIN, 300, 50) and g.train_end == pytest.approx(0.02)
    text = note(g, epochs_per_step=0.1)
    assert "at the best step 300: train loss" in text and "eval loss 0.8000" in text
    assert "at the end, step 500: train loss 0.0200, eval loss 0.9500 (gap +0.9300)" in text
    assert "The model is memorising the training rows" in text and "rose +0.1500 after step 300" in text
    for remedy in ("fewer epochs (stop near step 300 (30.0 epochs))", "more data", "a lower learning rate", "dropout"):
        assert remedy in text


def test_no_memorising_without_a_rise_above_the_noise_or_with_train_close_to_eval():
    assert not gap(EVAL, TRAIN, sigma=0.1).memorising  # a rise of 0.15 inside 2 sigma
    close = [(s, v * 0.9) for s, v in EVAL for _ in [0]]  # train loss near the eval loss: no gap to speak of
    g = gap(EVAL, [(s, v) for s, v in close], sigma=0.01)
    assert not g.memorising and "memorising" not in note(g)
    assert gap(EVAL[:1], TRAIN, 0.01) is None and gap(EVAL, [], 0.01) is None


# --------------------------------------------------------------------------- loss and task metric steps

from sweeper.advice import metric_steps  # noqa: E402

LOSS = [(50, 1.2), (100, 0.9), (150, 0.95), (200, 1.0)]
TOKACC = [(50, 0.40), (100, 0.55), (150, 0.58), (200, 0.60)]


def test_both_steps_and_which_one_the_recommendation_uses():
    by_task = metric_steps("eval_mean_token_accuracy", LOSS, "eval_mean_token_accuracy", TOKACC)
    assert by_task == ("Loss and task metric: lowest eval_loss 0.9000 at step 100; best eval_mean_token_accuracy "
                       "60.0% at step 200 (later than the loss's). The recommendation uses eval_mean_token_accuracy "
                       "(eval.metric), so its step 200.")
    by_loss = metric_steps("eval_loss", LOSS, "eval_mean_token_accuracy", TOKACC)
    assert by_loss.endswith("The recommendation uses eval_loss (eval.metric), so its step 100; to choose by the "
                            "task, set eval.metric=eval_mean_token_accuracy.")
    assert metric_steps("eval_loss", LOSS, "eval_accuracy", []) is None
