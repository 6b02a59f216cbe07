"""The TrainerCallbacks of a run, built from its :class:`sweeper.spec.RunSpec`: the objective (best value,
reports to the study, pruning, divergence), early stopping, label accuracy by generation, and the one
progress bar per trial with the metrics in ``train.log``. Two kinds live elsewhere: fault injection for
the tests (:mod:`sweeper.inject`) and the benchmarks' step timer and profiler (:mod:`sweeper.speed`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper.reporter import Reporter

if TYPE_CHECKING:
    from sweeper.spec import RunSpec

__all__ = ["BESIDE", "DivergedError", "accuracy_callback", "check_accuracy_metric", "label_decision", "label_set",
           "make_callbacks", "metrics_logger", "replace_progress", "restore_tracker", "thin"]

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """Raised when a logged loss is NaN or infinite."""


def label_set(splits: data_mod.Splits) -> list[str] | None:
    """The distinct answers when they form a label set (classification-style data), else None
    (generative data, e.g. gsm8k). See :func:`label_decision`."""
    return label_decision(splits)[0]


def label_decision(splits: data_mod.Splits) -> tuple[list[str] | None, str]:
    """``(labels, why)``: the distinct answers when they form a label set — one short answer (at most 8
    words) per row, the row's last message (or its completion) and its only assistant turn, and few distinct
    values (at least 2; at most 30% of the rows, 500 at most) — over **all** train rows (before
    ``data.max_train_rows``: a subsample shows fewer rows per label), else None; ``why`` says what was
    found, for the log and the report. Plain ``text`` rows (language modeling) have no answers."""
    if splits.detected == "text":
        return None, "plain 'text' rows (language modeling) have no answer to score"
    rows = splits.all_train if splits.all_train is not None else splits.train
    answers = []
    column = rows["messages"] if splits.format == "messages" else rows["completion"]
    for i, value in enumerate(column):
        if isinstance(value, str):
            answers.append(value.strip())
            continue
        where = "" if splits.format == "messages" else "'s completion"
        turns = [m for m in value if m["role"] == "assistant"]
        if len(turns) != 1:
            return None, f"row {i + 1}{where} has {len(turns)} assistant turns (a label set has one answer per row)"
        if value[-1]["role"] != "assistant":
            return None, (f"row {i + 1}{where} ends with a {value[-1]['role']} message, not its answer (a label set's "
                          "answer is the last message)")
        answers.append(str(turns[0]["content"]).strip())
    distinct = set(answers)
    limit = max(2, min(500, int(0.3 * len(answers))))
    longest = max((len(a.split()) for a in distinct), default=0)
    if len(distinct) < 2:
        return None, (f"{len(distinct)} distinct answer in {len(answers)} train rows (a label set has at least 2: "
                      "one answer for every row scores nothing)")
    if len(distinct) > limit:
        return None, (f"{len(distinct)} distinct answers in {len(answers)} train rows, more than a label set's "
                      f"{limit} (30% of the rows, 500 at most)")
    if longest > 8:
        return None, f"answers up to {longest} words long (a label has at most 8)"
    return sorted(distinct), f"{len(distinct)} distinct answers of at most {longest} words in {len(answers)} train rows"


def _prompt_and_target(row: dict, fmt: str, tokenizer: Any) -> tuple[list[int], str]:
    """One eval row as the prompt's token ids and the answer to match, as TRL tokenises the row: chat messages
    (``messages``, or a conversational prompt/completion) through the chat template up to the last message,
    with the generation prompt; a plain prompt as it is."""
    if fmt == "messages":
        msgs = list(row["messages"])
    elif isinstance(row["prompt"], str):
        c = row["completion"]
        return tokenizer(row["prompt"])["input_ids"], (c if isinstance(c, str) else c[-1]["content"]).strip()
    else:
        msgs = list(row["prompt"]) + list(row["completion"])
    ids = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    return list(ids), str(msgs[-1]["content"]).strip()


def check_accuracy_metric(metric: str, mode: str, data_name: str, splits: data_mod.Splits) -> None:
    """Raise :class:`sweeper.config.InputError` (one line) when ``eval.metric=eval_accuracy`` has no accuracy to
    read: ``eval.accuracy=auto`` on answers that are not a label set (:func:`label_decision`), or ``off``. The sweep's
    pre-flight calls it on the data it loads, before any study exists; a run checks it again as it starts."""
    if metric != "eval_accuracy" or mode == "on":
        return  # on: exact matches scored whatever the answers
    labels, why = label_decision(splits) if mode == "auto" else (None, f"eval.accuracy={mode}")
    if labels is None:
        raise config_mod.InputError(
            f"eval.metric=eval_accuracy, but the answers of {data_name} are not a label set ({why}); "
            "set eval.accuracy=on to score exact matches anyway, or eval.metric=eval_loss")


def accuracy_callback(spec: RunSpec, splits: data_mod.Splits, tokenizer: Any, decision: dict) -> Any:
    """Label accuracy by greedy generation on up to ``eval.accuracy_rows`` eval rows, added to the
    evaluation's metrics as ``eval_accuracy`` (before early stopping and best-checkpoint tracking read
    them). None when off, or when ``auto`` and the answers are not a label set. ``decision`` receives
    ``on`` and ``why`` (stored on the trial as ``accuracy``)."""
    mode = spec.eval.accuracy
    labels, why = label_decision(splits) if mode != "off" else (None, "eval.accuracy=off")
    decision["why"] = why
    if mode == "off" or (mode == "auto" and labels is None):
        check_accuracy_metric(spec.metric, mode, spec.data.name, splits)
        decision["on"] = False
        log.info("accuracy: off (eval.accuracy=%s): %s", mode, why)
        return None
    decision["on"] = True
    log.info("accuracy: on (eval.accuracy=%s): %s", mode, why)
    import torch
    from transformers import TrainerCallback

    rows = splits.eval.select(range(min(len(splits.eval), int(spec.eval.accuracy_rows))))
    prompts, targets = [], []
    for row in rows:
        ids, target = _prompt_and_target(row, splits.format, tokenizer)
        prompts.append(ids)
        targets.append(target)
    longest = max(len(tokenizer(t)["input_ids"]) for t in targets) + 2  # + end of turn
    batch_size = int(spec.batch_config.per_device_eval_batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    class AccuracyCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            was_training = model.training
            model.eval()
            correct = 0
            # eager: compiled decoder blocks (speed.compile=regional) would compile again for every decoding shape
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                for i in range(0, len(prompts), batch_size):
                    chunk = prompts[i:i + batch_size]
                    width = max(len(p) for p in chunk)
                    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
                    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, do_sample=False,
                                         pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
                    for j, seq in enumerate(out[:, width:]):
                        text = tokenizer.decode(seq, skip_special_tokens=True).strip()
                        correct += text == targets[i + j]
            if was_training:
                model.train()
            if metrics is not None:
                metrics["eval_accuracy"] = correct / len(prompts)
            # the trainer logged this evaluation before its callbacks ran: its entry gets the accuracy too, so that a
            # checkpoint's log history holds it and a resumed run restores it (restore_tracker)
            entry = state.log_history[-1] if state.log_history else {}
            if entry.get("step") == state.global_step and any(k.startswith("eval_") for k in entry):
                entry["eval_accuracy"] = correct / len(prompts)
            log.info("step %d: eval_accuracy %.4f (%d of %d rows)", state.global_step, correct / len(prompts),
                     correct, len(prompts))

    log.info("accuracy: greedy generation on %d eval rows against %s labels", len(prompts),
             len(labels) if labels else "free-form")
    return AccuracyCallback()


def make_callbacks(spec: RunSpec, reporter: Reporter | None, tracker: dict) -> list:
    """The objective's callback (best value and step, a report per evaluation, pruning, divergence) into
    ``tracker``, and early stopping when ``spec.early_stopping`` and a patience is set."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    metric, maximize, e = spec.metric, spec.maximize, spec.eval

    class ObjectiveCallback(TrainerCallback):
        """Track the best metric, report each evaluation to the trial, honour pruning, catch NaN."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise DivergedError(f"diverged at step {state.global_step}: train loss is {loss}")
            if loss is not None:
                tracker.setdefault("train_curve", []).append([state.global_step, round(float(loss), 5)])

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(metric)
            if value is None:
                raise ValueError(f"eval.metric={metric!r} is not among the evaluation metrics {sorted(metrics or {})}")
            step = state.global_step
            tracker["last_eval_step"] = step
            tracker["eval_s"] = tracker.get("eval_s", 0.0) + float((metrics or {}).get("eval_runtime", 0.0))
            acc = (metrics or {}).get("eval_accuracy")
            if acc is not None:
                tracker.setdefault("accuracy_curve", []).append([step, float(acc)])
                if acc > tracker.get("best_accuracy", -1.0):
                    tracker["best_accuracy"], tracker["best_accuracy_step"] = float(acc), step
            tracker.setdefault("curve", []).append([step, float(value)])
            _track_beside(tracker, metric, metrics or {}, step)
            if not math.isfinite(value):
                raise DivergedError(f"diverged at step {step}: {metric} is {value}")
            best = tracker.get("best")
            if best is None or (value > best if maximize else value < best):
                tracker["best"], tracker["best_step"] = float(value), step
            if reporter is not None:
                reporter.report(float(value), step)
                if reporter.should_prune():
                    reporter.prune(step)

    callbacks = [ObjectiveCallback()]
    if spec.early_stopping and e.early_stopping_patience is not None:
        stopper = EarlyStoppingCallback(
            early_stopping_patience=int(e.early_stopping_patience),
            early_stopping_threshold=float(e.early_stopping_threshold),
        )
        tracker["stopper"] = stopper
        callbacks.append(stopper)
    return callbacks


# the metrics kept beside the objective, each as a curve and its best: eval loss when the objective is a task
# metric, and TRL's mean token accuracy of the completion tokens (logged at evaluation as eval_mean_token_accuracy)
BESIDE = {"eval_loss": ("loss_curve", "best_loss", "best_loss_step", False),
          "eval_mean_token_accuracy": ("token_accuracy_curve", "best_token_accuracy", "best_token_accuracy_step", True)}


def _track_beside(tracker: dict, metric: str, metrics: dict, step: int) -> None:
    """Record the :data:`BESIDE` metrics of one evaluation into ``tracker`` (not the objective's own)."""
    for key, (curve, best, best_step, maximize) in BESIDE.items():
        v = metrics.get(key)
        if key == metric or v is None or not math.isfinite(float(v)):
            continue
        tracker.setdefault(curve, []).append([step, float(v)])
        if tracker.get(best) is None or (v > tracker[best] if maximize else v < tracker[best]):
            tracker[best], tracker[best_step] = float(v), step


def thin(points: list, most: int) -> list:
    """At most ``most`` points, evenly spaced, always keeping the last."""
    if len(points) <= most:
        return points
    stride = math.ceil(len(points) / most)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def metrics_logger() -> logging.Logger:
    """``sweeper.metrics``: every logged train/eval metric, into the job's log file (``train.log``) only,
    not the console, which keeps one progress bar per trial."""
    mlog = logging.getLogger("sweeper.metrics")
    mlog.setLevel(logging.INFO)
    mlog.propagate = False
    mlog.handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return mlog


def replace_progress(trainer: Any, spec: RunSpec) -> None:
    """Swap transformers' progress printer (a bar per evaluation, a metrics dict per log line on the
    console) for one bar per trial (steps, last loss and eval metric) and the metrics in ``train.log``."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    mlog = metrics_logger()
    label = f"trial {spec.trial_number}" if spec.trial_number is not None else "run"
    shown = ("loss", spec.metric, "eval_accuracy")

    class TrialProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=label, unit="step", position=1,
                            leave=False, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            mlog.info("step %d: %s", state.global_step, " ".join(
                f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()))
            if self.bar is not None:
                self.bar.set_postfix({k: round(float(logs[k]), 4) for k in shown if k in logs}, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    trainer.add_callback(TrialProgress())


def restore_tracker(tracker: dict, checkpoint: str, metric: str, maximize: bool) -> None:
    """Seed the curves and best values (the objective's, the accuracy by generation's and the :data:`BESIDE` metrics')
    from a checkpoint's log history (resumed runs)."""
    import json

    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    for entry in state.get("log_history", []):
        if "loss" in entry and "step" in entry:
            tracker.setdefault("train_curve", []).append([int(entry["step"]), round(float(entry["loss"]), 5)])
        if "step" in entry and any(k in entry for k in BESIDE):
            _track_beside(tracker, metric, entry, int(entry["step"]))
        if "step" in entry and "eval_accuracy" in entry:  # written by accuracy_callback
            acc, step = float(entry["eval_accuracy"]), int(entry["step"])
            tracker.setdefault("accuracy_curve", []).append([step, acc])
            if acc > tracker.get("best_accuracy", -1.0):
                tracker["best_accuracy"], tracker["best_accuracy_step"] = acc, step
        if metric in entry:
            value, step = float(entry[metric]), int(entry["step"])
            tracker.setdefault("curve", []).append([step, value])
            tracker["last_eval_step"] = step  # a run resumed at its last step is not evaluated there again
            best = tracker.get("best")
            if best is None or (value > best if maximize else value < best):
                tracker["best"], tracker["best_step"] = value, step
