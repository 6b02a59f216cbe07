"""benchmarks/wsd_search.py's fair baseline and a search's answer, on crafted curves: the cosine grid as a user
runs it (early stopping applied to full curves) and what a WSD search hands the user (its branches and its
trunk's best state before its cooldown)."""

from __future__ import annotations

from benchmarks.wsd_search import answer, early_stopped

# a cosine run of 1,500 steps over-fitting after its best at step 500, and one of 500 still falling at its end
LONG = [(50 * (i + 1), v) for i, v in enumerate([0.9, 0.6, 0.4, 0.3, 0.25, 0.24, 0.23, 0.225, 0.22, 0.218,
                                                 0.23, 0.24, 0.25, 0.26, 0.27, 0.28, 0.29])]
SHORT = [(50 * (i + 1), 0.5 - 0.02 * i) for i in range(10)]


def test_early_stopping_ends_each_run_where_transformers_would_and_keeps_its_best():
    cos = {1500: {"value": 0.218, "runtime_s": 150.0}, 500: {"value": 0.32, "runtime_s": 50.0}}
    es = early_stopped(cos, {1500: LONG, 500: SHORT}, patience=5)
    # the best at step 500, then 5 evaluations without a new best: stopped at step 750
    assert es[1500] == {"value": 0.218, "steps": 750, "best_step": 500, "end": 0.27, "runtime_s": 75.0}
    assert es[500]["steps"] == 500 and es[500]["value"] == SHORT[-1][1]  # never stalled: its full length
    assert early_stopped(cos, {1500: LONG, 500: SHORT}, patience=3)[1500]["steps"] == 650
    # a threshold: an evaluation better by no more than it counts as no improvement
    assert early_stopped(cos, {1500: LONG, 500: SHORT}, patience=5, threshold=0.01)[1500]["steps"] < 750


def test_a_searchs_answer_is_its_branches_and_its_trunks_best_state_where_that_is_better():
    branches = {500: {"value": 0.2298, "best_step": 500, "end": 0.2298}}
    out = answer(branches, (500, 0.2193))  # the demo's: the trunk at step 500, constant LR
    assert out[500] == {"value": 0.2193, "best_step": 500, "end": None, "trunk": True}
    assert answer(branches, (500, 0.25)) == branches  # a worse state at a branch's length changes nothing
    worse = answer(branches, (450, 0.25))  # at another length it stands beside the branches, and does not win
    assert worse[450]["trunk"] and min(worse, key=lambda s: worse[s]["value"]) == 500
    assert answer(branches, (350, 0.2255))[350]["trunk"] and answer(branches, (350, 0.2255))[500] == branches[500]
    assert answer(branches, None) == branches


def test_a_stored_search_replayed_under_the_trunk_rules_stops_where_the_table_says(tmp_path):
    """benchmarks/wsd_runs/cpu-banking77_sample: the 3-point search trained under stop_after_worse only (3,400
    steps), replayed under the no-win and stall rules of conf/: the trunk stops at step 1,300 (1,700 steps with the
    cooldowns), and its best state up to there is step 1,050, which is the search's answer (RESULTS.md)."""
    import shutil
    from pathlib import Path

    import optuna

    from benchmarks.wsd_search import replay_no_win

    db = tmp_path / "wsd3.db"
    shutil.copy(Path(__file__).resolve().parents[1] / "benchmarks/wsd_runs/cpu-banking77_sample/banking77_sample-wsd3.db", db)
    study = optuna.load_study(study_name="banking77_sample-wsd3", storage=f"sqlite:///{db}")
    per, totals = replay_no_win(study, patience=3, margin=0.1, es_patience=5)
    assert totals["stored_steps"] == 3400 and totals["steps"] == 1700
    assert totals["no_win"].startswith("trunk stopped at step 1300: no later branch can win")
    step, value = totals["trunk_best"]
    assert sorted(per) == [500, 1500] and step == 1050 and round(value, 4) == 0.4422
    won = answer(per, totals["trunk_best"])
    assert min(won, key=lambda s: won[s]["value"]) == 1050 and won[1050]["trunk"]
