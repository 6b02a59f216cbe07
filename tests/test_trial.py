"""Real SFTTrainer runs of the tiny offline model on CPU, through sweeper.trial.run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from sweeper.trial import run

from .conftest import FAST, SHARED_DATA
from .helpers import Recorder, fast


@pytest.mark.slow
def test_run_returns_the_best_eval_loss_not_the_last(compose_cfg, monkeypatch):
    import transformers
    from trl.trainer import base_trainer

    calls = {"card": 0, "save": 0}  # TRL's model card before each save: rendered once per trainer (sft.card_once)
    card, save = base_trainer.generate_model_card, transformers.Trainer._save_checkpoint

    def counted_card(*args, **kwargs):
        calls["card"] += 1
        return card(*args, **kwargs)

    def counted_save(self, *args, **kwargs):
        calls["save"] += 1
        return save(self, *args, **kwargs)

    monkeypatch.setattr(base_trainer, "generate_model_card", counted_card)
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", counted_save)
    rec = Recorder()
    value = run(compose_cfg(*FAST, "schedule.max_steps=10"), reporter=rec)
    steps = [s for s, _ in rec.reports]
    assert steps == [4, 8, 10]  # 10 is not a multiple of 4: the final step is evaluated too
    assert value == min(v for _, v in rec.reports)
    a = rec.attrs
    assert a["best_value"] == value and a["best_step"] in steps
    assert a["max_steps"] == 10 and a["steps_trained"] == 10 and a["stopped_early_step"] is None
    assert a["effective_batch"] == 4 and a["samples_seen"] == 40
    assert a["tokens_seen"] > 0 and a["epochs_trained"] > 0
    assert a["plan"]["steps_per_epoch"] == math.ceil(108 / 4)  # 120 demo rows - 10% eval
    ckpt = Path(a["best_checkpoint"])
    assert ckpt.is_dir() and ckpt.name == f"checkpoint-{a['best_step']}"
    assert len(list(ckpt.parent.glob("checkpoint-*"))) == 1  # only the best is kept
    assert calls["save"] >= 2 and calls["card"] == 1, calls
    assert "generated_from_trainer" in (ckpt.parent / "README.md").read_text()


@pytest.mark.slow
def test_early_stopping_stops_a_run_whose_eval_loss_rises(compose_cfg):
    # 16 rows at a high constant LR: memorised within ~25 steps, then the eval loss turns up (it stops at 40);
    # accuracy by generation is off, as it plays no part in stopping
    rec = Recorder()
    run(compose_cfg(*FAST, "schedule.max_steps=400", "eval.eval_steps=5", "eval.early_stopping_patience=3",
                    "lr.learning_rate=1e-2", "lr.lr_scheduler_type=constant_with_warmup", "eval.accuracy=off",
                    "batch.per_device_train_batch_size=8", "data.demo_rows=200", "data.max_train_rows=16"),
        reporter=rec)
    a = rec.attrs
    assert a["stopped_early_step"] is not None and a["stopped_early_step"] < 400
    after = [v for s, v in rec.reports if s > a["best_step"]]
    assert len(after) == 3 and min(after) >= a["best_value"]  # patience 3: three evals without improvement


@pytest.mark.slow
def test_trains_on_real_banking77_rows(compose_cfg):
    path = SHARED_DATA / "banking77" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    rec = Recorder()
    value = run(compose_cfg(*FAST, "data=banking77_sample", f"data.train_path={path}"), reporter=rec)
    assert math.isfinite(value)
    first, last = rec.reports[0][1], rec.reports[-1][1]
    assert last < first  # it learns something in 12 steps
    a = rec.attrs
    assert a["train_rows"] == 400 and a["eval_rows"] == 80
    assert len(a["accuracy_curve"]) == 3  # 77 intent labels: accuracy by generation at each evaluation
    # the plan counts the prepared rows: TRL drops rows whose answer truncation cut off entirely
    assert a["plan"]["steps_per_epoch"] == math.ceil(a["prepared_train_rows"] / 4)


@pytest.mark.slow
def test_lora_path_saves_an_adapter(compose_cfg):
    rec = Recorder()
    value = run(compose_cfg(*FAST, "peft=lora", "lr=lora"), reporter=rec)
    assert math.isfinite(value)
    ckpt = Path(rec.attrs["best_checkpoint"])
    assert (ckpt / "adapter_config.json").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.slow
def test_prompt_completion_rows_train(compose_cfg, tmp_path):
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(60)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = Recorder()
    assert math.isfinite(run(compose_cfg(*FAST, "data=jsonl", f"data.train_path={path}"), reporter=rec))
    assert rec.attrs["plan"]["effective_batch"] == 4


@pytest.mark.slow
def test_batch_auto_without_a_gpu_uses_the_preset_and_says_so(compose_cfg, caplog):
    caplog.set_level(logging.INFO, logger="sweeper")
    rec = Recorder()
    run(compose_cfg("batch=auto", *fast("batch.")), reporter=rec)
    assert rec.attrs["batch_auto"] == {"mode": "no GPU: preset"}
    assert (rec.attrs["micro_batch"], rec.attrs["grad_accum"], rec.attrs["effective_batch"]) == (8, 2, 16)
    assert "batch=auto: no GPU visible" in caplog.text


@pytest.mark.slow
def test_label_accuracy_by_generation_is_measured_at_each_evaluation(compose_cfg):
    rec = Recorder()
    run(compose_cfg(*FAST, "schedule.max_steps=8"), reporter=rec)
    curve = rec.attrs["accuracy_curve"]
    assert [s for s, _ in curve] == [4, 8] and all(0.0 <= v <= 1.0 for _, v in curve)
    assert rec.attrs["best_accuracy"] == max(v for _, v in curve)


@pytest.mark.slow
def test_accuracy_as_the_objective_is_maximised(compose_cfg):
    rec = Recorder()
    value = run(compose_cfg(*FAST, "schedule.max_steps=8", "eval.metric=eval_accuracy"), reporter=rec)
    assert value == rec.attrs["best_accuracy"] == max(v for _, v in rec.reports)


def test_trls_mean_token_accuracy_as_the_objective_keeps_the_eval_loss_beside_it(compose_cfg):
    rec = Recorder()
    value = run(compose_cfg(*FAST, "schedule.max_steps=8", "eval.accuracy=off",
                            "eval.metric=eval_mean_token_accuracy"), reporter=rec)
    assert [s for s, _ in rec.reports] == [4, 8] and all(0.0 <= v <= 1.0 for _, v in rec.reports)
    assert value == max(v for _, v in rec.reports)  # maximised
    loss = rec.attrs["loss_curve"]
    assert [s for s, _ in loss] == [4, 8] and all(v > 1.0 for _, v in loss)  # eval loss, not the accuracy
    assert (rec.attrs["best_loss"], rec.attrs["best_loss_step"]) == min((v, s) for s, v in loss)
    assert rec.attrs["token_accuracy_curve"] is None  # the objective's own curve is the token accuracy


def test_label_set_detection_on_real_data(compose_cfg):
    from sweeper import data as data_mod
    from sweeper.callbacks import label_set

    for name, expect in (("banking77", 77), ("gsm8k", None)):
        path = SHARED_DATA / name / "train.jsonl"
        if not path.exists():
            pytest.skip(f"shared data not found at {path}")
        cfg = compose_cfg("data=jsonl", f"data.train_path={path}", "data.max_train_rows=2000")
        labels = label_set(data_mod.load(cfg.data, cfg.paths.cache_dir))
        assert (len(labels) if labels else None) == expect
    with pytest.raises(ValueError, match="are not a label set"):
        run(compose_cfg(*FAST, "data=jsonl", f"data.train_path={SHARED_DATA}/gsm8k/train.jsonl",
                        "data.max_train_rows=50", "eval.metric=eval_accuracy"), reporter=Recorder())


def test_label_set_is_found_on_all_train_rows_not_the_subsample(compose_cfg):
    from sweeper import data as data_mod
    from sweeper.callbacks import label_decision

    path = SHARED_DATA / "clinc150" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    cfg = compose_cfg("data=jsonl", f"data.train_path={path}", "data.max_train_rows=400")
    splits = data_mod.load(cfg.data, cfg.paths.cache_dir)
    answers = {m["content"] for row in splits.train["messages"] for m in row if m["role"] == "assistant"}
    assert len(answers) > 0.3 * 400  # these 400 rows alone do not look like a label set
    labels, why = label_decision(splits)
    assert labels is not None and len(labels) >= 150 and "distinct answers of at most" in why
    gsm = compose_cfg("data=jsonl", f"data.train_path={SHARED_DATA}/gsm8k/train.jsonl", "data.max_train_rows=400")
    labels, why = label_decision(data_mod.load(gsm.data, gsm.paths.cache_dir))
    assert labels is None and "distinct answers in 7" in why and "train rows, more than a label set's" in why


def _splits(rows, fmt, detected=None):
    import datasets

    from sweeper import data as data_mod

    ds = datasets.Dataset.from_list(rows)
    return data_mod.Splits(train=ds, eval=ds, format=fmt, source="rows", detected=detected or fmt)


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


LABELS = ["greet", "bye", "thanks"]


@pytest.mark.parametrize("rows,fmt,detected,labels,why", [
    ([{"messages": _user(f"q{i}") + _assistant(LABELS[i % 3])} for i in range(30)], "messages", None, LABELS, "3 distinct"),
    ([{"prompt": f"q{i}", "completion": LABELS[i % 3]} for i in range(30)], "prompt_completion", None, LABELS,
     "3 distinct"),
    ([{"prompt": _user(f"q{i}"), "completion": _assistant(LABELS[i % 3])} for i in range(30)], "prompt_completion",
     None, LABELS, "3 distinct"),
    # the answer is the completion's assistant turn, not whatever message ends it
    ([{"prompt": _user(f"q{i}"), "completion": _assistant(LABELS[i % 3]) + _user("ok")} for i in range(30)],
     "prompt_completion", None, None, "row 1's completion ends with a user message"),
    ([{"messages": _user(f"q{i}") + _assistant(LABELS[i % 3]) + _user("ok")} for i in range(30)], "messages", None,
     None, "row 1 ends with a user message"),
    ([{"prompt": _user(f"q{i}"), "completion": _assistant("a") + _assistant("b")} for i in range(30)],
     "prompt_completion", None, None, "row 1's completion has 2 assistant turns"),
    # one answer for every row, and language modeling, are no label set
    ([{"prompt": f"q{i}", "completion": "yes"} for i in range(30)], "prompt_completion", None, None,
     "1 distinct answer in 30 train rows (a label set has at least 2"),
    ([{"prompt": "", "completion": LABELS[i % 3]} for i in range(30)], "prompt_completion", "text", None,
     "plain 'text' rows (language modeling)"),
], ids=["messages", "prompt/completion text", "prompt/completion messages", "completion ending with a user turn",
        "messages ending with a user turn", "two answers", "one answer for all", "text rows"])
def test_label_set_decision_for_each_row_format(rows, fmt, detected, labels, why):
    from sweeper.callbacks import label_decision

    found, said = label_decision(_splits(rows, fmt, detected))
    assert found == (sorted(labels) if labels else None) and why in said, said


def test_accuracy_prompts_of_conversational_prompt_completion_rows_are_tokenised_as_trl_does(compose_cfg):
    """The chat template up to the answer, with the generation prompt: the same ids as the messages row."""
    from sweeper.callbacks import _prompt_and_target
    from sweeper.model import load_tokenizer

    cfg = compose_cfg()
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    system = [{"role": "system", "content": "classify"}]
    conv = {"prompt": system + _user("book a flight to paris"), "completion": _assistant("book_flight")}
    ids, target = _prompt_and_target(conv, "prompt_completion", tokenizer)
    chat = {"messages": conv["prompt"] + conv["completion"]}
    assert (ids, target) == _prompt_and_target(chat, "messages", tokenizer)
    assert ids == list(tokenizer.apply_chat_template(conv["prompt"], add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
    assert target == "book_flight"


@pytest.mark.slow
def test_conversational_prompt_completion_rows_train_with_accuracy(compose_cfg, tmp_path):
    rows = [{"prompt": _user(f"message {i} about {LABELS[i % 3]}"), "completion": _assistant(LABELS[i % 3])}
            for i in range(60)]
    path = tmp_path / "intents.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = Recorder()
    assert math.isfinite(run(compose_cfg(*FAST, "data=jsonl", f"data.train_path={path}"), reporter=rec))
    assert rec.attrs["accuracy"]["on"] and len(rec.attrs["accuracy_curve"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["eval_loss", "eval_accuracy"])
def test_a_resumed_run_keeps_the_accuracy_measured_before_its_checkpoint(compose_cfg, tmp_path, metric):
    """Accuracy by generation is measured after the trainer logs an evaluation; the checkpoint's log history holds
    it too, so a run resumed from a checkpoint reports the whole accuracy curve and its best (and, with
    eval.metric=eval_accuracy, the objective's curve and best step) as the run that never stopped."""
    overrides = (*FAST, "schedule.max_steps=8", "eval.eval_steps=2", f"eval.metric={metric}",
                 "eval.early_stopping_patience=null", f"paths.output_dir={tmp_path}")
    whole = Recorder()
    run(compose_cfg(*overrides), reporter=whole)
    assert [s for s, _ in whole.attrs["accuracy_curve"]] == [2, 4, 6, 8]
    # the checkpoints kept: the best and the last (one, when the last is the best: resumed with nothing to train)
    checkpoints = sorted(tmp_path.rglob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    resumed = Recorder()
    resumed.resume_checkpoint = lambda: str(checkpoints[0])
    run(compose_cfg(*overrides), reporter=resumed)
    for key in ("accuracy_curve", "best_accuracy", "best_accuracy_step", "best_step"):
        assert resumed.attrs[key] == whole.attrs[key], (key, resumed.attrs[key], whole.attrs[key])
