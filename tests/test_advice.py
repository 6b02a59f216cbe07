"""What the report says from what the study knows, on crafted values: the final rank of a stopped trunk
(sweeper.halving.joint_table), the proposed grids (sweeper.advice), the train/eval gap
(sweeper.generalisation)."""

from __future__ import annotations

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
