"""Training one segment of a run: :func:`train_segment` is an outer retry loop around
:func:`_attempt`, one training read top to bottom (model, SFTConfig, callbacks, trainer, plan, train,
results).

The loop retries in two cases, both keeping the effective batch: ``batch=auto``'s probe chose another
micro-batch than the estimate (build again at that size), and CUDA out-of-memory (``retry_on_oom``: the
next smaller micro-batch that divides the effective batch, down to 1, from the segment's start).

A plain run is one segment of the whole schedule in the job directory, resumed from the retried trial's
checkpoint; :mod:`sweeper.wsd` runs the segments of a search (trunk pieces and cooldown branches).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import batching, callbacks, inject, interrupt, sft, tracking
from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import gpu as gpu_mod
from sweeper import model as model_mod
from sweeper import speed as speed_mod
from sweeper.reporter import Reporter
from sweeper.spec import RunSpec

__all__ = ["Segment", "quiet_libraries", "train_segment"]

log = logging.getLogger(__name__)


@dataclass
class Segment:
    """One training segment: written into ``output_dir``; ``args`` replace SFTConfig fields after
    :func:`sweeper.sft.build_sft_config` (e.g. ``save_strategy="no"``); resumed from ``resume`` (model, optimizer,
    scheduler, RNG and global step); ``callbacks`` added; the last step evaluated when ``final_eval``;
    with ``save_state`` the segment's ``trainer_state.json`` (its whole log history, restored part
    included) is written into ``output_dir``. An out-of-memory retry starts again from ``resume`` when
    ``retry_resumes`` (a search segment must), else from step 0 (a plain run). The results (the trial
    attrs of a run) land in ``results``."""

    output_dir: Path
    args: dict = field(default_factory=dict)
    resume: str | None = None
    callbacks: list = field(default_factory=list)
    final_eval: bool = True
    save_state: bool = False
    retry_resumes: bool = True
    results: dict = field(default_factory=dict)


class _Refit(Exception):
    """The probe chose another micro-batch: build the trainer again at that size."""

    def __init__(self, micro: int, accum: int) -> None:
        super().__init__(f"micro-batch {micro} x accumulation {accum}")
        self.micro, self.accum = micro, accum


class _OutOfMemory(Exception):
    def __init__(self, step: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.step, self.error = step, error


@dataclass
class _Batching:
    """What the attempts of one segment share: ``batch=auto``'s decision, the OOM retries, the timings."""

    info: dict | None = None  # the trial's ``batch_auto`` attr
    probe_key: str | None = None  # set while the probe is still to run
    oom_retries: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)  # the trial's ``timing`` attr: the probe's time outlives its attempt

    @property
    def fitted(self) -> bool:
        return self.info is not None and self.info["mode"] == "fitted"


def _fit(spec: RunSpec) -> tuple[RunSpec, _Batching]:
    """batch=auto: the estimate's micro-batch, or the one this worker already probed for these shapes."""
    if not spec.batch.auto:
        return spec, _Batching()
    micro, accum, info = batching.fit(spec)
    state = _Batching(info=info)
    if info["mode"] == "fitted" and spec.batch_config.auto.probe:
        key = batching.probe_key(spec, info)
        if key in batching.PROBED:  # a later trial of this worker with the same shapes: no second probe
            micro, accum, first = batching.PROBED[key]
            info.update(probes=f"reused the probed micro-batch of {first} in this worker", micro_batch=micro)
            info.pop("_states_gib", None)
        else:
            state.probe_key = key
    return spec.with_batch(micro, accum), state


def train_segment(spec: RunSpec, splits: data_mod.Splits, segment: Segment, reporter: Reporter) -> dict:
    """Train ``segment`` of ``spec`` and return its results (also in ``segment.results``)."""
    import torch

    started = time.perf_counter()
    spec, batch_state = _fit(spec)
    resume = segment.resume
    while True:
        try:
            return _attempt(spec, splits, segment, reporter, resume, batch_state, started)
        except _Refit as r:
            spec = spec.with_batch(r.micro, r.accum)
        except _OutOfMemory as oom:
            smaller = batching.smaller_micro_batch(spec.batch.micro, spec.batch.accum)
            if not spec.retry_on_oom or smaller is None:
                raise RuntimeError(
                    f"CUDA out of memory at step {oom.step} with micro-batch {spec.batch.micro} x accumulation "
                    f"{spec.batch.accum}" + ("" if spec.retry_on_oom else " (retry_on_oom=false)")
                    + f": {oom.error}") from oom.error
            spec = spec.with_batch(*smaller)
            batch_state.oom_retries.append({"at_step": oom.step, "micro_batch": smaller[0], "grad_accum": smaller[1]})
            log.warning("CUDA out of memory at step %d; retrying from the start with micro-batch %d x "
                        "accumulation %d (effective batch unchanged)", oom.step, *smaller)
            resume = segment.resume if segment.retry_resumes else None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _attempt(spec: RunSpec, splits: data_mod.Splits, segment: Segment, reporter: Reporter, resume: str | None,
             batch_state: _Batching, started: float) -> dict:
    import torch

    out, timing = Path(segment.output_dir), batch_state.timing
    if spec.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")

    # the model, with this machine's kernels
    t = time.perf_counter()
    try:
        model, tokenizer, compute = model_mod.load(spec.model, spec.precision, spec.paths.cache_dir,
                                                   attn_implementation=speed_mod.attn_implementation(spec.speed))
    except ValueError as e:  # model.path: not loadable (each says why and what to do)
        raise config_mod.InputError.wrap(e) from e
    speed_mod.apply_to_model(model, spec.speed)
    timing["model_load_s"] = round(time.perf_counter() - t, 2)
    ahead = model_mod.took_ahead()
    if ahead is not None:  # read while the sweep's command waited for its data check (model.read_ahead)
        timing["model_read_ahead_s"] = round(ahead, 2)

    # TRL's config, and the callbacks that track, report and stop the run
    args = sft.build_sft_config(spec, output_dir=out, data_format=splits.format, fitted=batch_state.fitted,
                                rows=len(splits.train))
    if segment.args:
        args = dataclasses.replace(args, **segment.args)
    tracker: dict = {}
    if resume:
        callbacks.restore_tracker(tracker, resume, spec.metric, spec.maximize)
    trainer_callbacks, accuracy_decision = _callbacks(spec, splits, tokenizer, reporter, tracker, segment)

    # the trainer; TRL tokenises and packs here (the datasets cache makes that once per sweep)
    t = time.perf_counter()
    trainer = sft.make_trainer(model, tokenizer, args, splits, spec.peft, trainer_callbacks)
    speed_mod.apply_to_trainer(trainer, spec.speed, spec.paths.cache_dir)
    inject.attach(trainer)
    callbacks.replace_progress(trainer, spec)
    timing["prepare_s"] = round(time.perf_counter() - t, 2)

    # batch=auto: real probes on the longest rows; another size means building again at that size
    if batch_state.probe_key is not None:
        probed = _probe(trainer, spec, reporter, batch_state)
        if probed != spec.batch.micro:
            del trainer, model
            gpu_mod.free_cuda_cache()  # a collection first: speed.graphs' captured graphs hold the model in a cycle
            target = int(spec.batch_config.auto.target_effective_batch)
            raise _Refit(probed, target // probed)

    # the plan on the prepared data, and what the trial records before training
    plan = _record_plan(spec, splits, trainer, args, out, reporter, batch_state, compute, accuracy_decision, resume)

    # train
    ended = _ended_at(resume, args.max_steps, tracker) if resume else None
    if ended is not None:  # the trainer would train one step past max_steps from there
        log.info("resuming from %s: the run's last step (%d), evaluated there; nothing is left to train", resume,
                 ended.global_step)
        state, output = ended, None
    else:
        if resume:
            log.info("resuming from %s", resume)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError as e:
            step = trainer.state.global_step
            trainer = model = None  # freed before the retry  # noqa: F841
            raise _OutOfMemory(step, e) from e
        state = trainer.state
    if tracker.get("last_eval_step") != state.global_step and segment.final_eval:
        trainer.evaluate()  # the run's final point, when max_steps is not a multiple of eval_steps

    # results
    results = _results(spec, state, output, tracker, plan.effective_batch, timing, started, segment.final_eval)
    reporter.set_attrs({k: v for k, v in results.items() if k != "curve"})
    segment.results = results
    if segment.save_state:
        state.save_to_json(str(out / "trainer_state.json"))
    return results


def _ended_at(checkpoint: str, max_steps: int, tracker: dict) -> Any:
    """The trainer state of ``checkpoint`` when it is the run's end (its last step, evaluated there: a run stopped
    after its final save, before its result was recorded), else None."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    ended = max_steps > 0 and state.global_step >= max_steps and tracker.get("last_eval_step") == state.global_step
    return state if ended else None


def _probe(trainer: Any, spec: RunSpec, reporter: Reporter, batch_state: _Batching) -> int:
    """``batch=auto``'s probe ladder on the built trainer: the micro-batch that fits, remembered for the
    sweep's later trials of the same shape (``batching.PROBED``)."""
    t = time.perf_counter()
    info = batch_state.info
    probed = batching.probe_ladder(trainer, spec, spec.batch.micro, info, info.pop("_states_gib"))
    batch_state.timing["batch_probe_s"] = round(time.perf_counter() - t, 2)
    target = int(spec.batch_config.auto.target_effective_batch)
    owner = f"trial {reporter.number}" if reporter.number is not None else "a run"
    batching.PROBED[batch_state.probe_key] = (probed, target // probed, owner)
    batch_state.probe_key = None
    return probed


def _record_plan(spec: RunSpec, splits: data_mod.Splits, trainer: Any, args: Any, out: Path, reporter: Reporter,
                 batch_state: _Batching, compute: str, accuracy_decision: Any, resume: str | None) -> Any:
    """The plan on the prepared data (checked against the rows TRL kept), logged, and what the trial records
    before it trains; returns the plan."""
    timing = batch_state.timing
    try:  # before the plan, which needs a row to plan
        sft.check_kept(spec.data, splits, len(trainer.train_dataset), len(trainer.eval_dataset),
                       lambda: trainer.processing_class)
    except ValueError as e:
        raise config_mod.InputError.wrap(e) from e
    plan, prepared_rows = sft.plan_on_trainer(spec, trainer, splits, args)
    log.info("plan: %s", plan.describe())
    for warning in plan.warnings():
        log.warning("plan: %s", warning)
    log.info("precision: %s; method: %s; speed: %s; job dir: %s", compute, spec.method,
             speed_mod.describe(spec.speed), out)
    ahead = timing.get("model_read_ahead_s")
    log.info("model load %.1f s%s, data preparation %.1f s", timing["model_load_s"],
             "" if ahead is None else f" (its weights read ahead during the sweep's checks: {ahead:.1f} s)",
             timing["prepare_s"])
    reporter.set_attrs({
        "plan": plan.as_dict(), "choices": _choices(), "run_dir": str(out), "train_rows": len(splits.train),
        "prepared_train_rows": prepared_rows, "eval_rows": len(splits.eval), "precision": compute,
        "max_steps": plan.max_steps, "effective_batch": plan.effective_batch,
        "median_tokens_per_row": sft.median_tokens(trainer.train_dataset),
        "micro_batch": spec.batch.micro, "grad_accum": spec.batch.accum, "oom_retries": batch_state.oom_retries,
        "batch_auto": batch_state.info, "timing": timing, "accuracy": accuracy_decision,
        "speed": {**spec.speed, "collator_padding_free": bool(getattr(trainer.data_collator, "padding_free", False))},
        "sft_config": {k: getattr(args, k) for k in sft.SNIPPET_KEYS},
        "resumed_from_checkpoint": resume, "worker": f"{socket.gethostname()}:{os.getpid()}",
        "slurm_job": _slurm_job(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    return plan


def _callbacks(spec: RunSpec, splits: data_mod.Splits, tokenizer: Any, reporter: Reporter, tracker: dict,
               segment: Segment) -> tuple[list, dict]:
    """The callbacks of one attempt, in order, and the accuracy decision (the trial's ``accuracy`` attr)."""
    trainer_callbacks = callbacks.make_callbacks(spec, reporter, tracker)
    trainer_callbacks += segment.callbacks
    accuracy_decision: dict = {}
    accuracy = callbacks.accuracy_callback(spec, splits, tokenizer, accuracy_decision)
    if accuracy is not None:
        trainer_callbacks.insert(0, accuracy)  # its metric must exist before the others read the metrics
    injected = inject.callback()
    if injected is not None:
        trainer_callbacks.append(injected)
    trainer_callbacks.append(interrupt.training_callback())  # a Ctrl-C a finalizer swallowed stops it within a step
    trainer_callbacks += speed_mod.measurement_callbacks()
    trainer_callbacks += tracking.callbacks(segment.output_dir, reporter)  # tracking=mlflow|wandb: the curves
    return trainer_callbacks, accuracy_decision


def _results(spec: RunSpec, state: Any, output: Any, tracker: dict, effective_batch: int, timing: dict,
             started: float, final_eval: bool) -> dict:
    """What a trained segment records (the trial attrs of a run), from the trainer's state and the tracker."""
    import torch

    best = tracker.get("best")
    if best is None and final_eval:  # a search's early segment may end before one
        raise RuntimeError("no evaluation ran; check eval.eval_steps and the eval split")
    stopper = tracker.get("stopper")
    stopped_early = (stopper is not None and state.global_step < state.max_steps
                     and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience)
    results = {
        "best_value": best,
        "best_step": tracker.get("best_step"),
        "steps_trained": state.global_step,
        "epochs_trained": round(float(state.epoch or 0.0), 4),
        "samples_seen": state.global_step * effective_batch,
        "tokens_seen": int(state.num_input_tokens_seen or 0),
        "stopped_early_step": state.global_step if stopped_early else None,
        "train_runtime_s": round(float(output.metrics.get("train_runtime", 0.0)), 2) if output is not None else 0.0,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "best_checkpoint": state.best_model_checkpoint,
        # job_s: this segment from its start to here (no process start: a sweep runs its trials in one process)
        "timing": {**timing, "eval_s": round(tracker.get("eval_s", 0.0), 2),
                   "job_s": round(time.perf_counter() - started, 2)},
        "curve": tracker.get("curve", []),
        "train_curve": callbacks.thin(tracker.get("train_curve", []), 300),  # for the report's diagnosis
        "accuracy_curve": tracker.get("accuracy_curve"),
        "best_accuracy": tracker.get("best_accuracy"),
        "best_accuracy_step": tracker.get("best_accuracy_step"),
        # eval loss beside a task-metric objective, and TRL's mean token accuracy (callbacks.BESIDE)
        **{k: tracker.get(k) for names in callbacks.BESIDE.values() for k in names[:3]},
    }
    log.info("best %s %s at step %s of %d%s", spec.metric, "–" if best is None else f"{best:.4f}",
             results["best_step"], state.global_step, f" (stopped early at {state.global_step})" if stopped_early else "")
    return results


def _choices() -> dict[str, str]:
    """The config group options this job ran (Hydra's choices), without Hydra's own."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: v for k, v in HydraConfig.get().runtime.choices.items()
                if v is not None and not k.startswith("hydra/")}
    except ValueError:
        return {}


def _slurm_job() -> str | None:
    """This process's SLURM job id as squeue/scancel name it (``<array>_<task>`` in a job array), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


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
