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
    from sweeper.batching import smaller_micro_batch as _smaller_micro_batch

    assert _smaller_micro_batch(8, 2) == (4, 4)
    assert _smaller_micro_batch(6, 2) == (3, 4)
    assert _smaller_micro_batch(3, 4) == (2, 6)
    assert _smaller_micro_batch(1, 16) is None


# --------------------------------------------------------------------------- advice in the warnings

def _named(warning):
    """(presets named as schedule=NAME, step counts named as schedule.max_steps=N) in one warning."""
    import re

    return re.findall(r"schedule=([\w.-]+) \(", warning), [int(n) for n in re.findall(r"schedule\.max_steps=(\d+)", warning)]


def test_200_step_run_is_not_told_to_try_the_500_step_preset():
    # the user's case: 200 steps x 16 rows on 400 rows = 8 epochs; schedule=under is 500 steps, longer
    p = make_plan(train_rows=400, micro_batch=8, grad_accum=2, max_steps=200)
    [w] = p.warnings()
    assert "consider fewer steps" in w and "schedule=under" not in w
    assert _named(w) == ([], [75])  # 3 epochs x 25 steps/epoch, as schedule=epochs3 would run
    assert "schedule.max_steps=75 (3 epochs, as schedule=epochs3)" in w


@pytest.mark.parametrize("rows", [50, 400, 7_000, 30_000, 200_000])
@pytest.mark.parametrize("steps", [20, 200, 500, 1500, 3000, 10_000])
def test_advice_points_the_way_it_says_for_any_length(rows, steps):
    from sweeper.plan import MAX_EPOCHS, MIN_EPOCHS, schedule_presets

    p = make_plan(train_rows=rows, micro_batch=8, grad_accum=2, max_steps=steps)
    length = {s.name: s.max_steps for s in schedule_presets()}
    for w in p.warnings():
        if "warmup" in w:
            continue
        shorter = "fewer steps" in w
        assert shorter or "more steps" in w, w
        presets, counts = _named(w)
        assert len(counts) == 1, w  # always one concrete step count
        for n in [length[name] for name in presets] + counts:
            assert (n < steps) if shorter else (n > steps), w
            assert MIN_EPOCHS <= n / p.steps_per_epoch <= MAX_EPOCHS, w


def test_too_short_run_names_only_presets_that_fit_the_data():
    # 100,000 rows at 16 rows/step = 6,250 steps/epoch: sweet (0.24 epoch) is still too short, over (0.48) fits
    p = make_plan(train_rows=100_000, micro_batch=8, grad_accum=2, max_steps=100)
    [w] = p.warnings()
    assert _named(w) == (["over"], [18_750])


@pytest.mark.parametrize("rows, steps, said", [
    (2_700, 50, "0.296 epochs sees less than ~0.3 of the data"),  # 0.2959: not "0.30 epochs ... less than ~0.3"
    (400, 126, "5.04 epochs is more than ~5 passes"),  # not "5.0 epochs is more than ~5"
    (2_700, 40, "0.24 epochs sees less than ~0.3 of the data"),  # apart from the bound: the usual digits
])
def test_an_epoch_count_near_a_bound_is_written_so_that_the_warning_reads_true(rows, steps, said):
    [w] = make_plan(train_rows=rows, micro_batch=8, grad_accum=2, max_steps=steps).warnings()
    assert w.startswith(said), w


def test_presets_are_read_from_conf_schedule(compose_cfg, tmp_path):
    from sweeper.plan import SchedulePreset, schedule_presets

    conf = {s.name: (s.max_steps, s.num_train_epochs) for s in schedule_presets()}
    for name, (steps, epochs) in conf.items():
        cfg = compose_cfg(f"schedule={name}").schedule
        assert (cfg.max_steps, cfg.num_train_epochs) == (steps, epochs)
    assert "wsd_search" not in conf and {"under", "sweet", "over", "epochs3"} <= set(conf)
    # other lengths in the folder -> other advice: nothing in Python repeats 500/1500/3000
    (tmp_path / "quick.yaml").write_text("max_steps: 50\nnum_train_epochs: null\n")
    (tmp_path / "twice.yaml").write_text("max_steps: null\nnum_train_epochs: 2\n")
    assert schedule_presets(tmp_path) == (SchedulePreset("quick", 50, None), SchedulePreset("twice", None, 2.0))
    [w] = make_plan(train_rows=400, micro_batch=8, grad_accum=2, max_steps=200).warnings(schedule_presets(tmp_path))
    assert _named(w) == (["quick"], [50]) and "(2 epochs, as schedule=twice)" in w


def test_token_counts_of_a_prepared_set_follow_its_rows():
    """The plan's mean and the recorded median tokens per row come from Arrow's list lengths: the rows a shuffle
    and a selection left, in their order (an even count's median is the mean of its middle two)."""
    import datasets

    from sweeper.sft import _mean_tokens, median_tokens

    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    ds = datasets.Dataset.from_dict({"input_ids": [[7] * n for n in lengths]})
    assert _mean_tokens(ds) == sum(lengths) / 1000
    assert median_tokens(ds) == 51.0
    sub = ds.shuffle(seed=3).select(range(4))  # an indices mapping over the table
    kept = sorted(len(x) for x in sub["input_ids"])
    assert median_tokens(sub) == (kept[1] + kept[2]) / 2 and _mean_tokens(sub) == sum(kept) / 4
    assert median_tokens(ds.remove_columns("input_ids")) is None and _mean_tokens(None) == 0.0
