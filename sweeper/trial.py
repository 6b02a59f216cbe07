"""One trial: composed config -> data -> model -> SFTConfig + SFTTrainer -> best eval metric.

    python train.py schedule=under          # one trial, no study
    python train.py -m schedule=under,sweet # each job reports into its own Optuna trial

This is the only module that imports TRL (transformers also in model, speed and wsd). It talks to
the study through a ``reporter`` (``sweeper.study.TrialReporter``) so that it never imports Optuna.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import disk
from sweeper import gpu as gpu_mod
from sweeper import inject
from sweeper import model as model_mod
from sweeper import speed as speed_mod
from sweeper.plan import Plan, make_plan

log = logging.getLogger(__name__)


# SFTConfig fields the report's ready-to-paste snippet repeats (TRL's own names)
_SNIPPET_KEYS = (
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
    "bf16", "fp16", "max_length", "packing", "assistant_only_loss", "completion_only_loss",
    "activation_checkpointing", "eval_steps", "seed",
)


class DivergedError(RuntimeError):
    """Raised when a logged loss is NaN or infinite."""


@dataclass
class Segment:
    """One training segment of a longer search (``sweeper.wsd``), run through :func:`_run`.

    ``_run`` then writes into ``output_dir`` instead of the job directory, replaces these SFTConfig
    fields after ``build_sft_config`` (e.g. the WSD scheduler, ``save_strategy="no"``), resumes from
    ``resume`` (model, optimizer, scheduler, RNG and global step), adds ``callbacks``, runs without
    early stopping, evaluates the last step only when ``final_eval``, writes the segment's
    ``trainer_state.json`` (its whole log history, restored part included) into ``output_dir``, and
    leaves the results (the trial attrs of a normal run) in ``results``.
    """

    output_dir: Path
    args: dict = field(default_factory=dict)
    resume: str | None = None
    callbacks: list = field(default_factory=list)
    final_eval: bool = True
    results: dict = field(default_factory=dict)


def _job_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (tests calling run() directly)
        path = Path(cfg.paths.output_dir) / "runs" / "direct"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _choices() -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: v for k, v in HydraConfig.get().runtime.choices.items()
                if v is not None and not k.startswith("hydra/")}
    except ValueError:
        return {}


def preflight(cfg: DictConfig) -> data_mod.Splits:
    """Every check that needs no model: config rules and the data. Raises before any GPU time."""
    try:
        config_mod.validate(cfg)
        gpu_mod.check_precision(str(cfg.precision.compute), str(cfg.precision.name))
        resolve_speed(cfg, model_mod.resolve_compute(cfg.precision.compute))  # e.g. varlen without a GPU
        check_folders(cfg)
        return data_mod.load(cfg.data, cfg.paths.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        raise config_mod.InputError.wrap(e) from e


def check_folders(cfg: DictConfig) -> None:
    """The output and cache folders can be written (one line naming the key if not)."""
    disk.check_writable(cfg.paths.output_dir, "paths.output_dir")
    disk.check_writable(cfg.paths.cache_dir, "paths.cache_dir")


def resolve_speed(cfg: DictConfig, compute: str) -> dict:
    """The ``speed`` group decided for this machine (see ``sweeper/speed.py``)."""
    import torch

    return speed_mod.resolve(cfg.speed, cuda=torch.cuda.is_available(), compute=compute, optim=str(cfg.lr.optim))


def build_sft_config(cfg: DictConfig, *, output_dir: Path, compute: str, data_format: str,
                     micro_batch: int | None = None, grad_accum: int | None = None,
                     eval_batch: int | None = None, speed: dict | None = None) -> Any:
    """Map the composed config onto TRL's SFTConfig (names are TRL's own). ``micro_batch`` and
    ``grad_accum`` replace the batch group's values (OOM retries); ``speed`` is the resolved
    ``speed`` group (resolved here when not given)."""
    import torch
    from trl import SFTConfig

    if compute == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            f"precision={cfg.precision.name} (fp16 mixed precision) needs a CUDA GPU, and none is visible; "
            "pick precision=auto (fp32 on CPU) or precision=fp32"
        )
    e, b, lr, s = cfg.eval, cfg.batch, cfg.lr, cfg.schedule
    completion = cfg.data.loss_on == "completion"
    direction = config_mod.metric_direction(e.metric)
    speed = speed if speed is not None else resolve_speed(cfg, compute)
    return SFTConfig(
        output_dir=str(output_dir),
        seed=int(cfg.seed),
        data_seed=int(cfg.data.seed),
        # schedule
        max_steps=int(s.max_steps) if s.max_steps is not None else -1,
        num_train_epochs=float(s.num_train_epochs) if s.num_train_epochs is not None else 1.0,
        # batch
        per_device_train_batch_size=int(micro_batch or b.per_device_train_batch_size),
        gradient_accumulation_steps=int(grad_accum or b.gradient_accumulation_steps),
        per_device_eval_batch_size=int(eval_batch or b.per_device_eval_batch_size),
        activation_checkpointing=bool(b.activation_checkpointing),
        # lr
        learning_rate=float(lr.learning_rate),
        lr_scheduler_type=str(lr.lr_scheduler_type),
        warmup_steps=float(lr.warmup_steps) if lr.warmup_steps < 1 else int(lr.warmup_steps),
        weight_decay=float(lr.weight_decay),
        max_grad_norm=float(lr.max_grad_norm),
        # precision
        bf16=compute == "bf16",
        fp16=compute == "fp16",
        use_cpu=not torch.cuda.is_available(),
        # data (TRL)
        max_length=int(cfg.data.max_length),
        packing=bool(cfg.data.packing),
        assistant_only_loss=completion and data_format == "messages",
        completion_only_loss=completion if data_format == "prompt_completion" else None,
        # evaluation, early stopping, checkpoints
        eval_strategy="steps",
        eval_steps=int(e.eval_steps),
        metric_for_best_model=str(e.metric),
        greater_is_better=direction == "maximize",
        save_strategy="best" if e.save_best else "no",
        save_total_limit=1,
        load_best_model_at_end=False,
        logging_steps=int(e.logging_steps),
        logging_nan_inf_filter=False,  # a NaN loss must show, so the run fails as diverged
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        include_num_input_tokens_seen="non_padding",
        **speed_mod.sft_config_kwargs(speed),  # optim, padding_free, torch_compile, dataloader workers
    )


def label_set(splits: data_mod.Splits) -> list[str] | None:
    """The distinct answers when they form a label set (classification-style data), else None
    (generative data, e.g. gsm8k). See :func:`label_decision`."""
    return label_decision(splits)[0]


def label_decision(splits: data_mod.Splits) -> tuple[list[str] | None, str]:
    """``(labels, why)``: the distinct answers when they form a label set — one short answer (at most 8
    words) per row and few distinct values (at most 30% of the rows, 500 at most) — over **all** train
    rows (before ``data.max_train_rows``: a subsample shows fewer rows per label), else None; ``why``
    says what was found, for the log and the report."""
    rows = splits.all_train if splits.all_train is not None else splits.train
    answers = []
    column = rows["messages"] if splits.format == "messages" else rows["completion"]
    for i, value in enumerate(column):
        if splits.format == "messages":
            turns = [m["content"] for m in value if m["role"] == "assistant"]
            if len(turns) != 1:
                return None, f"row {i + 1} has {len(turns)} assistant turns (a label set has one answer per row)"
            answers.append(str(turns[0]).strip())
        else:
            answers.append((value if isinstance(value, str) else value[-1]["content"]).strip())
    distinct = set(answers)
    limit = max(2, min(500, int(0.3 * len(answers))))
    longest = max((len(a.split()) for a in distinct), default=0)
    if len(distinct) > limit:
        return None, (f"{len(distinct)} distinct answers in {len(answers)} train rows, more than a label set's "
                      f"{limit} (30% of the rows, 500 at most)")
    if longest > 8:
        return None, f"answers up to {longest} words long (a label has at most 8)"
    return sorted(distinct), f"{len(distinct)} distinct answers of at most {longest} words in {len(answers)} train rows"


def _accuracy_callback(cfg: DictConfig, splits: data_mod.Splits, tokenizer: Any, decision: dict) -> Any:
    """Label accuracy by greedy generation on up to ``eval.accuracy_rows`` eval rows, added to the
    evaluation's metrics as ``eval_accuracy`` (before early stopping and best-checkpoint tracking read
    them). None when off, or when ``auto`` and the answers are not a label set. ``decision`` receives
    ``on`` and ``why`` (stored on the trial as ``accuracy``)."""
    mode = cfg.eval.accuracy
    labels, why = label_decision(splits) if mode != "off" else (None, "eval.accuracy=off")
    decision["why"] = why
    if mode == "off" or (mode == "auto" and labels is None):
        if cfg.eval.metric == "eval_accuracy":
            raise config_mod.InputError(
                f"eval.metric=eval_accuracy, but the answers of {cfg.data.name} are not a label set ({why}); "
                "set eval.accuracy=on to score exact matches anyway, or eval.metric=eval_loss")
        decision["on"] = False
        log.info("accuracy: off (eval.accuracy=%s): %s", mode, why)
        return None
    decision["on"] = True
    log.info("accuracy: on (eval.accuracy=%s): %s", mode, why)
    import torch
    from transformers import TrainerCallback

    rows = splits.eval.select(range(min(len(splits.eval), int(cfg.eval.accuracy_rows))))
    prompts, targets = [], []
    for row in rows:
        if splits.format == "messages":
            msgs = list(row["messages"])
            prompts.append(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"])
            targets.append(str(msgs[-1]["content"]).strip())
        else:
            prompts.append(tokenizer(row["prompt"])["input_ids"])
            c = row["completion"]
            targets.append((c if isinstance(c, str) else c[-1]["content"]).strip())
    longest = max(len(tokenizer(t)["input_ids"]) for t in targets) + 2  # + end of turn
    batch_size = int(cfg.batch.per_device_eval_batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    class AccuracyCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            was_training = model.training
            model.eval()
            correct = 0
            with torch.no_grad():
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
            log.info("step %d: eval_accuracy %.4f (%d of %d rows)", state.global_step, correct / len(prompts),
                     correct, len(prompts))

    log.info("accuracy: greedy generation on %d eval rows against %s labels", len(prompts),
             len(labels) if labels else "free-form")
    return AccuracyCallback()


def _make_callbacks(cfg: DictConfig, reporter: Any, tracker: dict, early_stopping: bool = True) -> list:
    from transformers import EarlyStoppingCallback, TrainerCallback

    metric = str(cfg.eval.metric)
    maximize = config_mod.metric_direction(metric) == "maximize"

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
    if early_stopping and cfg.eval.early_stopping_patience is not None:
        stopper = EarlyStoppingCallback(
            early_stopping_patience=int(cfg.eval.early_stopping_patience),
            early_stopping_threshold=float(cfg.eval.early_stopping_threshold),
        )
        tracker["stopper"] = stopper
        callbacks.append(stopper)
    return callbacks


def _plan(cfg: DictConfig, trainer: Any, splits: data_mod.Splits, args: Any) -> tuple[Plan, int]:
    """The plan on the prepared train set (after TRL's truncation drops and packing)."""
    prepared_rows = len(trainer.train_dataset)
    dropped = len(splits.train) - prepared_rows if not cfg.data.packing else 0
    if dropped > 0:
        log.warning(
            "%d of %d train rows lost all their loss tokens to truncation at data.max_length=%d and were "
            "dropped; raise data.max_length to keep them", dropped, len(splits.train), cfg.data.max_length,
        )
    plan = plan_for(cfg, splits, trainer.train_dataset, args.per_device_train_batch_size,
                    args.gradient_accumulation_steps, max(args.world_size, 1))
    return plan, prepared_rows


def _thin(points: list, most: int) -> list:
    """At most ``most`` points, evenly spaced, always keeping the last."""
    if len(points) <= most:
        return points
    stride = math.ceil(len(points) / most)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _mean_tokens(dataset: Any) -> float:
    if dataset is None or len(dataset) == 0 or "input_ids" not in dataset.column_names:
        return 0.0
    return sum(len(x) for x in dataset["input_ids"]) / len(dataset)


def _median_tokens(dataset: Any) -> float | None:
    """Median tokens per prepared train row (per packed sequence with packing); None untokenised."""
    if dataset is None or len(dataset) == 0 or "input_ids" not in dataset.column_names:
        return None
    import statistics

    return float(statistics.median(len(x) for x in dataset["input_ids"]))


def _peft_config(cfg: DictConfig) -> Any:
    if cfg.peft.name != "lora":
        return None
    from peft import LoraConfig

    target = cfg.peft.target_modules
    return LoraConfig(
        r=int(cfg.peft.r), lora_alpha=int(cfg.peft.lora_alpha), lora_dropout=float(cfg.peft.lora_dropout),
        target_modules=OmegaConf.to_object(target) if OmegaConf.is_list(target) else target,
        task_type="CAUSAL_LM",
    )


def prepare_for_plan(cfg: DictConfig, splits: data_mod.Splits) -> tuple[Any, int]:
    """The train set exactly as a trial's SFTTrainer will iterate it (tokenised, truncation drops,
    packing) and the prepared eval rows, without loading the model's weights: TRL prepares the data
    with the real tokenizer and args; a one-layer stand-in model of the same vocabulary fills the
    trainer's model slot. The ``datasets`` cache makes the trial's own preparation a cache hit."""
    import tempfile

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import SFTTrainer

    tokenizer = model_mod.load_tokenizer(cfg.model, cfg.paths.cache_dir)
    stand_in = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=max(int(cfg.data.max_length), 8)))
    with tempfile.TemporaryDirectory() as tmp:
        args = build_sft_config(cfg, output_dir=Path(tmp), compute="fp32" if not torch.cuda.is_available() else
                                model_mod.resolve_compute(cfg.precision.compute), data_format=splits.format)
        args.report_to = []
        trainer = SFTTrainer(model=stand_in, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
                             processing_class=tokenizer)
        return trainer.train_dataset, len(trainer.eval_dataset)


def plan_for(cfg: DictConfig, splits: data_mod.Splits, prepared: Any, micro: int | None = None,
             accum: int | None = None, n_gpus: int = 1) -> Plan:
    """The plan of a composed config on its prepared train set."""
    return make_plan(
        train_rows=len(prepared),
        micro_batch=int(micro or cfg.batch.per_device_train_batch_size),
        grad_accum=int(accum or cfg.batch.gradient_accumulation_steps),
        n_gpus=n_gpus,
        # schedule=wsd_search: the trunk, i.e. the longest candidate
        max_steps=cfg.schedule.max_steps if cfg.schedule.get("wsd") is None else max(cfg.schedule.wsd.candidates),
        num_train_epochs=cfg.schedule.num_train_epochs,
        mean_tokens_per_row=_mean_tokens(prepared),
        warmup=float(cfg.lr.warmup_steps),
    )


def _smaller_micro_batch(micro: int, accum: int) -> tuple[int, int] | None:
    """The next micro-batch down that keeps micro x accumulation exactly (halving for powers of two)."""
    effective = micro * accum
    for m in range(micro // 2 if micro % 2 == 0 else micro - 1, 0, -1):
        if effective % m == 0:
            return m, effective // m
    return None


def _auto_batch(cfg: DictConfig) -> tuple[int, int, dict]:
    """batch=auto on this process's one GPU (``run`` pinned it): the largest micro-batch whose
    estimated peak fits ``memory_fraction`` of the GPU's free memory and divides the target
    effective batch. Without a GPU: the preset."""
    from sweeper.gpu import visible_gpus
    from sweeper.plan import fit_micro_batch, memory_estimate

    a, b = cfg.batch.auto, cfg.batch
    gpus = visible_gpus()
    if not gpus:
        log.info("batch=auto: no GPU visible, so the preset micro-batch %d x accumulation %d is used",
                    b.per_device_train_batch_size, b.gradient_accumulation_steps)
        return int(b.per_device_train_batch_size), int(b.gradient_accumulation_steps), {"mode": "no GPU: preset"}
    best = gpus[0]
    compute = model_mod.resolve_compute(cfg.precision.compute)
    shape = model_mod.model_shape(cfg.model, cfg.paths.cache_dir)
    if shape is None:
        raise ValueError(f"batch=auto needs the model's shape: no config.json for model.path={cfg.model.path!r}; "
                         "give a local path or set model.shape")
    seq_len = int(cfg.data.max_length)
    budget = best.free_gib * float(a.memory_fraction)
    target = int(a.target_effective_batch)
    fit = fit_micro_batch(target, int(a.max_micro_batch), budget,
                          lambda m: memory_estimate(cfg, shape, m, seq_len, compute, target // m).total_gib)
    if fit is None:
        need = memory_estimate(cfg, shape, 1, seq_len, compute).total_gib
        raise ValueError(
            f"batch=auto: even micro-batch 1 at data.max_length={seq_len} needs ~{need:.1f} GiB, more than "
            f"{budget:.1f} GiB ({a.memory_fraction:.0%} of {best.free_gib:.1f} GiB free on GPU {best.index}); "
            "try precision=qlora4, batch.activation_checkpointing=true or a smaller data.max_length")
    micro, accum, est = fit
    states = memory_estimate(cfg, shape, micro, seq_len, compute, accum).optimizer_gib
    info = {"mode": "fitted", "gpu": best.index, "gpu_name": best.name, "free_gib": round(best.free_gib, 2),
            "budget_gib": round(budget, 2), "estimate_micro_batch": micro, "estimate_gib": round(est, 2),
            "_states_gib": states}  # optimizer states: allocated at the first step, after the probe
    log.info("batch=auto: GPU %d (%s) has %.1f GiB free; micro-batch %d x accumulation %d (estimated peak "
             "%.1f GiB of a %.1f GiB budget)", best.index, best.name, best.free_gib, micro, accum, est, budget)
    return micro, accum, info


# batch=auto probes already made in this process (a sweep worker runs its trials in one process):
# key -> (micro-batch, accumulation, which trial probed it)
_PROBED: dict[str, tuple[int, int, str]] = {}


def _probe_key(cfg: DictConfig, info: dict) -> str:
    """What the probed micro-batch depends on: the GPU, the model, precision, adapters, data (its
    longest rows and length), batch and speed settings and the optimizer."""
    parts = [str(info.get("gpu")), str(info.get("gpu_name"))]
    parts += [OmegaConf.to_yaml(cfg[k]) for k in ("model", "precision", "peft", "data", "batch", "speed")]
    parts.append(str(cfg.lr.optim))
    return "\n".join(parts)


def _probe(trainer: Any, micro: int) -> float:
    """One real forward+backward through the trainer's own path (collator, PEFT, TRL's fused LM head
    and loss mask) on the ``micro`` longest rows of the prepared train set (full packed sequences
    with packing): the worst batch the run will see. Returns the peak allocated GiB; raises
    torch.OutOfMemoryError when it does not fit."""
    import torch

    model = trainer.model
    model.train()
    ds = trainer.train_dataset
    lengths = [len(x) for x in ds["input_ids"]]
    longest = sorted(range(len(ds)), key=lambda i: -lengths[i])[:micro]
    rows = [ds[i] for i in longest]
    rows = (rows * (micro // max(len(rows), 1) + 1))[:micro]  # fewer rows than a micro-batch: repeat them
    batch = trainer.data_collator(rows)
    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        # autocast as in training (accelerate wraps the model's forward only inside train()): without it
        # PEFT's fp32 adapters would run, and save activations, in fp32
        with trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, batch)
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        batch = loss = None
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _probe_ladder(trainer: Any, cfg: DictConfig, micro: int, info: dict, states_gib: float) -> int:
    """From the estimate's micro-batch, probe up the divisors of the target effective batch while
    the probe's peak plus the optimizer states fits the budget, or down until it does."""
    import torch

    a = cfg.batch.auto
    target, seq_len, budget = int(a.target_effective_batch), int(cfg.data.max_length), float(info["budget_gib"])
    divisors = [d for d in range(1, min(int(a.max_micro_batch), target) + 1) if target % d == 0]
    probes = info.setdefault("probes", [])

    def fits(m: int) -> bool:
        try:
            peak = _probe(trainer, m)
        except torch.OutOfMemoryError:
            probes.append({"micro_batch": m, "peak_gib": "OOM"})
            torch.cuda.empty_cache()
            return False
        probes.append({"micro_batch": m, "peak_gib": round(peak, 2), "with_states_gib": round(peak + states_gib, 2)})
        return peak + states_gib <= budget

    i = divisors.index(micro)
    if fits(divisors[i]):
        while i + 1 < len(divisors) and fits(divisors[i + 1]):
            i += 1
    else:
        while True:
            if i == 0:
                raise RuntimeError(f"batch=auto: even micro-batch 1 at data.max_length={seq_len} does not fit "
                                   f"{budget:.1f} GiB on the GPU (probes: {probes})")
            i -= 1
            if fits(divisors[i]):
                break
    log.info("batch=auto: probes %s -> micro-batch %d", probes, divisors[i])
    return divisors[i]


def _metrics_logger() -> logging.Logger:
    """``sweeper.metrics``: every logged train/eval metric, into the job's log file (``train.log``) only,
    not the console, which keeps one progress bar per trial."""
    mlog = logging.getLogger("sweeper.metrics")
    mlog.setLevel(logging.INFO)
    mlog.propagate = False
    mlog.handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return mlog


def _replace_progress(trainer: Any, cfg: DictConfig) -> None:
    """Swap transformers' progress printer (a bar per evaluation, a metrics dict per log line on the
    console) for one bar per trial (steps, last loss and eval metric) and the metrics in ``train.log``."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    mlog = _metrics_logger()
    label = f"trial {cfg.study.trial_number}" if cfg.study.trial_number is not None else "run"
    shown = ("loss", str(cfg.eval.metric), "eval_accuracy")

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


def _restore_tracker(tracker: dict, checkpoint: str, metric: str, maximize: bool) -> None:
    """Seed the curve and best value from a checkpoint's log history (resumed runs)."""
    import json

    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    for entry in state.get("log_history", []):
        if "loss" in entry and "step" in entry:
            tracker.setdefault("train_curve", []).append([int(entry["step"]), round(float(entry["loss"]), 5)])
        if metric in entry:
            value, step = float(entry[metric]), int(entry["step"])
            tracker.setdefault("curve", []).append([step, value])
            best = tracker.get("best")
            if best is None or (value > best if maximize else value < best):
                tracker["best"], tracker["best_step"] = value, step


class _DropNotes(logging.Filter):
    """Library notes the user can do nothing about (they describe this tool's own choices)."""

    NOTES = ("load_best_model_at_end",)  # EarlyStoppingCallback: we keep the best checkpoint ourselves

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTES)


def quiet_libraries() -> None:
    """No nested progress bars from datasets' map and the weight loader (the trial keeps its own bar),
    and no library notes the user cannot act on."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for name in ("transformers", "transformers.trainer_callback"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotes) for f in logger.filters):
            logger.addFilter(_DropNotes())


def run(cfg: DictConfig, reporter: Any = None) -> float:
    """See :func:`_run` (``schedule=wsd_search``: :func:`sweeper.wsd.search`); closes the job's own
    connection to the study however the run ends."""
    from sweeper import passwords

    passwords.scrub_saved_config(_job_dir(cfg))  # Hydra saved the command line: no storage password in it
    quiet_libraries()
    try:
        gpu_mod.pin_one()  # one trial, one GPU: before anything initialises CUDA
    except ValueError as e:
        raise config_mod.InputError.wrap(e) from e
    if gpu_mod.cuda_initialised():  # a worker's earlier trial: give its cached blocks back, so that NVML's free
        import gc               # memory (batch=auto's budget) does not count them as taken

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    own = None
    if reporter is None and cfg.study.trial_number is not None:
        from sweeper.study import TrialReporter

        reporter = own = TrialReporter.from_job(cfg)
    try:
        if cfg.schedule.get("wsd") is not None:
            from sweeper import wsd

            return wsd.search(cfg, reporter, job_dir=_job_dir(cfg))
        return _run(cfg, reporter)
    except (DivergedError, config_mod.InputError):
        raise
    except Exception as e:
        full = disk.disk_full(e, _job_dir(cfg), "paths.output_dir")
        if full is not None:
            raise full from e
        raise
    finally:
        if own is not None:
            own.close()


def _run(cfg: DictConfig, reporter: Any = None, segment: Segment | None = None) -> float:
    """Train one configuration and return the best value of ``eval.metric`` over the run.

    In a multirun the sweeper fills ``cfg.study``; the job then reports every evaluation to its
    own trial and stores the plan and results as user attrs. Raises on bad input before
    loading the model. A trial re-run after its worker died resumes from its newest checkpoint.
    On CUDA out-of-memory (``retry_on_oom``) the run restarts with the next smaller micro-batch that
    divides the effective batch (half, for powers of two) and the matching accumulation, so the
    effective batch is unchanged, down to micro-batch 1. ``batch=auto`` fits the micro-batch first.
    With a ``segment`` (see :class:`Segment`) it trains that segment of a longer search instead.
    """
    import torch
    from trl import SFTTrainer

    job_started = time.perf_counter()
    splits = preflight(cfg)
    resume = reporter.resume_checkpoint() if reporter is not None and hasattr(reporter, "resume_checkpoint") else None
    job_dir = _job_dir(cfg)
    if segment is not None:
        resume, job_dir = segment.resume, Path(segment.output_dir)
    if cfg.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(job_dir / "tensorboard")
    micro, accum = int(cfg.batch.per_device_train_batch_size), int(cfg.batch.gradient_accumulation_steps)
    auto_info: dict | None = None
    probe_key = None
    if cfg.batch.auto is not None:
        micro, accum, auto_info = _auto_batch(cfg)
        if auto_info["mode"] == "fitted" and cfg.batch.auto.probe:
            probe_key = _probe_key(cfg, auto_info)
            if probe_key in _PROBED:  # a later trial of this worker with the same shapes: no second probe
                micro, accum, first = _PROBED[probe_key]
                auto_info.update(probes=f"reused the probed micro-batch of {first} in this worker", micro_batch=micro)
                auto_info.pop("_states_gib", None)
    oom_retries: list[dict] = []
    metric = str(cfg.eval.metric)
    maximize = config_mod.metric_direction(metric) == "maximize"
    speed = resolve_speed(cfg, model_mod.resolve_compute(cfg.precision.compute))
    timing: dict = {}
    while True:
        started = time.perf_counter()
        model, tokenizer, compute = model_mod.load(cfg.model, cfg.precision, cfg.paths.cache_dir,
                                                   attn_implementation=speed_mod.attn_implementation(speed))
        speed_mod.apply_to_model(model, speed)
        timing["model_load_s"] = round(time.perf_counter() - started, 2)
        fitted = auto_info is not None and auto_info["mode"] == "fitted"
        args = build_sft_config(cfg, output_dir=job_dir, compute=compute, data_format=splits.format,
                                micro_batch=micro, grad_accum=accum,
                                eval_batch=micro if fitted else None, speed=speed)  # eval logits must fit too
        if segment is not None and segment.args:
            import dataclasses

            args = dataclasses.replace(args, **segment.args)
        tracker: dict = {}
        if resume:
            _restore_tracker(tracker, resume, metric, maximize)
        callbacks = _make_callbacks(cfg, reporter, tracker, early_stopping=segment is None)
        if segment is not None:
            callbacks += segment.callbacks
        accuracy_decision: dict = {}
        accuracy = _accuracy_callback(cfg, splits, tokenizer, accuracy_decision)
        if accuracy is not None:
            callbacks.insert(0, accuracy)  # its metric must exist before the others read the metrics
        injected = inject.callback()
        if injected is not None:
            callbacks.append(injected)
        callbacks += speed_mod.measurement_callbacks()
        started = time.perf_counter()
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
            processing_class=tokenizer, peft_config=_peft_config(cfg), callbacks=callbacks,
        )
        speed_mod.apply_to_trainer(trainer, speed)
        inject.attach(trainer)
        _replace_progress(trainer, cfg)
        # TRL's tokenisation and packing: the datasets cache (by fingerprint) makes it once per sweep
        timing["prepare_s"] = round(time.perf_counter() - started, 2)
        if fitted and cfg.batch.auto.probe and "probes" not in auto_info:
            started = time.perf_counter()
            probed = _probe_ladder(trainer, cfg, micro, auto_info, auto_info.pop("_states_gib"))
            timing["batch_probe_s"] = round(time.perf_counter() - started, 2)
            _PROBED[probe_key] = (probed, int(cfg.batch.auto.target_effective_batch) // probed,
                                  f"trial {cfg.study.trial_number}" if cfg.study.trial_number is not None else "a run")
            if probed != micro:  # rebuild at the probed size (args and dataloader depend on it)
                micro, accum = probed, int(cfg.batch.auto.target_effective_batch) // probed
                del trainer, model
                torch.cuda.empty_cache()
                continue
        plan, prepared_rows = _plan(cfg, trainer, splits, args)
        try:
            data_mod.check_prepared(splits, cfg.data, prepared_rows, len(trainer.eval_dataset))
        except ValueError as e:
            raise config_mod.InputError.wrap(e) from e
        log.info("plan: %s", plan.describe())
        for warning in plan.warnings():
            log.warning("plan: %s", warning)
        log.info("precision: %s; method: %s; speed: %s; job dir: %s", compute, cfg.peft.name,
                 speed_mod.describe(speed), job_dir)
        log.info("model load %.1f s, data preparation %.1f s", timing["model_load_s"], timing["prepare_s"])
        if reporter is not None:
            reporter.set_attrs({"plan": plan.as_dict(), "choices": _choices(), "run_dir": str(job_dir),
                                "train_rows": len(splits.train), "prepared_train_rows": prepared_rows,
                                "median_tokens_per_row": _median_tokens(trainer.train_dataset),
                                "eval_rows": len(splits.eval), "precision": compute,
                                "max_steps": plan.max_steps, "effective_batch": plan.effective_batch,
                                "micro_batch": micro, "grad_accum": accum, "oom_retries": oom_retries,
                                "batch_auto": auto_info, "timing": timing, "accuracy": accuracy_decision,
                                "speed": {**speed, "collator_padding_free": bool(
                                    getattr(trainer.data_collator, "padding_free", False))},
                                "sft_config": {k: getattr(args, k) for k in _SNIPPET_KEYS},
                                "resumed_from_checkpoint": resume,
                                "worker": f"{socket.gethostname()}:{os.getpid()}",
                                "slurm_job": _slurm_job(),
                                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
        if resume:
            log.info("resuming from %s", resume)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            output = trainer.train(resume_from_checkpoint=resume)
            break
        except torch.OutOfMemoryError as e:
            step = trainer.state.global_step
            del trainer, model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = _smaller_micro_batch(micro, accum)
            if not cfg.retry_on_oom or smaller is None:
                raise RuntimeError(
                    f"CUDA out of memory at step {step} with micro-batch {micro} x accumulation {accum}"
                    + ("" if cfg.retry_on_oom else " (retry_on_oom=false)") + f": {e}"
                ) from e
            micro, accum = smaller
            oom_retries.append({"at_step": step, "micro_batch": micro, "grad_accum": accum})
            log.warning("CUDA out of memory at step %d; retrying from the start with micro-batch %d x "
                        "accumulation %d (effective batch unchanged)", step, micro, accum)
            resume = segment.resume if segment is not None else None

    state = trainer.state
    if tracker.get("last_eval_step") != state.global_step and (segment is None or segment.final_eval):
        trainer.evaluate()  # the run's final point, when max_steps is not a multiple of eval_steps

    stopper = tracker.get("stopper")
    stopped_early = (
        stopper is not None
        and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
        and state.global_step < state.max_steps
    )
    best = tracker.get("best")
    if best is None and (segment is None or segment.final_eval):  # a search's early segment may end before one
        raise RuntimeError("no evaluation ran; check eval.eval_steps and the eval split")
    results = {
        "best_value": best,
        "best_step": tracker.get("best_step"),
        "steps_trained": state.global_step,
        "epochs_trained": round(float(state.epoch or 0.0), 4),
        "samples_seen": state.global_step * plan.effective_batch,
        "tokens_seen": int(state.num_input_tokens_seen or 0),
        "stopped_early_step": state.global_step if stopped_early else None,
        "train_runtime_s": round(float(output.metrics.get("train_runtime", 0.0)), 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "best_checkpoint": state.best_model_checkpoint,
        # job_s: this trial from its start to here (no process start: a sweep runs its trials in one process)
        "timing": {**timing, "eval_s": round(tracker.get("eval_s", 0.0), 2),
                   "job_s": round(time.perf_counter() - job_started, 2)},
        "curve": tracker.get("curve", []),
        "train_curve": _thin(tracker.get("train_curve", []), 300),  # for the report's diagnosis
        "accuracy_curve": tracker.get("accuracy_curve"),
        "best_accuracy": tracker.get("best_accuracy"),
        "best_accuracy_step": tracker.get("best_accuracy_step"),
    }
    log.info(
        "best %s %s at step %s of %d%s", cfg.eval.metric, _fmt4(best), results["best_step"], state.global_step,
        f" (stopped early at {state.global_step})" if stopped_early else "",
    )
    if reporter is not None:
        reporter.set_attrs({k: v for k, v in results.items() if k != "curve"})
    if segment is not None:
        segment.results = results
        state.save_to_json(str(job_dir / "trainer_state.json"))
    return float(best) if best is not None else math.nan


def _slurm_job() -> str | None:
    """This process's SLURM job id as squeue/scancel name it (``<array>_<task>`` in a job array), or None."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _fmt4(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"
