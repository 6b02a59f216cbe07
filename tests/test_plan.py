"""Plan arithmetic, hand-checked."""

import pytest

from sweeper.plan import make_plan


def test_seed_example_epochs_to_steps():
    # 10,000 rows, micro-batch 4 x accumulation 8 x 2 GPUs = 64 rows/step -> 157 steps/epoch
    p = make_plan(train_rows=10_000, micro_batch=4, grad_accum=8, n_gpus=2, num_train_epochs=3)
    assert (p.effective_batch, p.steps_per_epoch, p.max_steps) == (64, 157, 471)


def test_seed_example_steps_to_epochs():
    p = make_plan(train_rows=10_000, micro_batch=4, grad_accum=8, n_gpus=2, max_steps=1000)
    assert p.epochs == pytest.approx(6.37, abs=0.01)  # 1000 / 157
    assert p.samples == 64_000


def test_user_question_1500_steps_on_7000_rows():
    # "1,500 steps on 7,000 rows with batch 8x2 on one GPU is how many epochs?" -> 438 steps/epoch, 3.42
    p = make_plan(train_rows=7_000, micro_batch=8, grad_accum=2, max_steps=1500, mean_tokens_per_row=200, warmup=0.03)
    assert p.steps_per_epoch == 438
    assert p.epochs == pytest.approx(3.42, abs=0.01)
    assert p.tokens_per_step == 3200
    assert p.warmup_steps == 45  # ceil(0.03 * 1500)


def test_warmup_in_steps_and_bad_rows():
    assert make_plan(train_rows=10, micro_batch=1, grad_accum=1, max_steps=100, warmup=7).warmup_steps == 7
    with pytest.raises(ValueError, match="train_rows must be >= 1"):
        make_plan(train_rows=0, micro_batch=1, grad_accum=1, max_steps=1)


def test_fit_micro_batch_keeps_the_effective_batch_exact():
    from sweeper.plan import fit_micro_batch

    per_row = lambda m: 2.0 + 1.5 * m  # noqa: E731  GiB: fixed part + activations per row
    # budget 11.5 GiB fits 6 rows, but 6 and 5 do not divide 16: 4 x 4
    assert fit_micro_batch(16, 16, 11.5, per_row) == (4, 4, 8.0)
    assert fit_micro_batch(16, 16, 100.0, per_row) == (16, 1, 26.0)
    assert fit_micro_batch(12, 8, 100.0, per_row) == (6, 2, 11.0)  # capped by max_micro_batch, divides 12
    assert fit_micro_batch(16, 16, 3.0, per_row) is None  # not even one row fits


def test_oom_steps_down_through_divisors():
    from sweeper.trial import _smaller_micro_batch

    assert _smaller_micro_batch(8, 2) == (4, 4)
    assert _smaller_micro_batch(6, 2) == (3, 4)
    assert _smaller_micro_batch(3, 4) == (2, 6)
    assert _smaller_micro_batch(1, 16) is None
