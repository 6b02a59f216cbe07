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
