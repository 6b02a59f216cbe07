"""The micro-batch of a run: ``batch=auto``'s fit on the GPU (memory estimate, then real probes on the
longest rows, cached per worker), and the next smaller micro-batch after a CUDA out-of-memory (the
effective batch unchanged)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sweeper import model as model_mod

if TYPE_CHECKING:
    from sweeper.spec import RunSpec

__all__ = ["PROBED", "fit", "probe_key", "probe_ladder", "smaller_micro_batch"]

log = logging.getLogger(__name__)


def smaller_micro_batch(micro: int, accum: int) -> tuple[int, int] | None:
    """The next micro-batch down that keeps micro x accumulation exactly (halving for powers of two)."""
    effective = micro * accum
    for m in range(micro // 2 if micro % 2 == 0 else micro - 1, 0, -1):
        if effective % m == 0:
            return m, effective // m
    return None


def fit(spec: RunSpec) -> tuple[int, int, dict]:
    """batch=auto on this process's one GPU (``run`` pinned it): the largest micro-batch whose
    estimated peak fits ``memory_fraction`` of the GPU's free memory and divides the target
    effective batch. Without a GPU: the preset."""
    from sweeper.gpu import visible_gpus
    from sweeper.plan import estimate_memory, fit_micro_batch

    a, b, training = spec.batch_config.auto, spec.batch_config, spec.training
    gpus = visible_gpus()
    if not gpus:
        log.info("batch=auto: no GPU visible, so the preset micro-batch %d x accumulation %d is used",
                    b.per_device_train_batch_size, b.gradient_accumulation_steps)
        return int(b.per_device_train_batch_size), int(b.gradient_accumulation_steps), {"mode": "no GPU: preset"}
    best = gpus[0]
    compute = model_mod.resolve_compute(spec.precision.compute)
    shape = model_mod.model_shape(spec.model, spec.paths.cache_dir)
    if shape is None:
        raise ValueError(f"batch=auto needs the model's shape: no config.json for model.path={spec.model.path!r}; "
                         "give a local path or set model.shape")
    seq_len = int(spec.data.max_length)
    budget = best.free_gib * float(a.memory_fraction)
    target = int(a.target_effective_batch)
    fit = fit_micro_batch(target, int(a.max_micro_batch), budget,
                          lambda m: estimate_memory(training, shape, m, seq_len, compute, target // m).total_gib)
    if fit is None:
        need = estimate_memory(training, shape, 1, seq_len, compute).total_gib
        raise ValueError(
            f"batch=auto: even micro-batch 1 at data.max_length={seq_len} needs ~{need:.1f} GiB, more than "
            f"{budget:.1f} GiB ({a.memory_fraction:.0%} of {best.free_gib:.1f} GiB free on GPU {best.index}); "
            "try precision=qlora4, batch.activation_checkpointing=true or a smaller data.max_length")
    micro, accum, est = fit
    states = estimate_memory(training, shape, micro, seq_len, compute, accum).optimizer_gib
    info = {"mode": "fitted", "gpu": best.index, "gpu_name": best.name, "free_gib": round(best.free_gib, 2),
            "budget_gib": round(budget, 2), "estimate_micro_batch": micro, "estimate_gib": round(est, 2),
            "_states_gib": states}  # optimizer states: allocated at the first step, after the probe
    log.info("batch=auto: GPU %d (%s) has %.1f GiB free; micro-batch %d x accumulation %d (estimated peak "
             "%.1f GiB of a %.1f GiB budget)", best.index, best.name, best.free_gib, micro, accum, est, budget)
    return micro, accum, info


# batch=auto probes already made in this process (a sweep worker runs its trials in one process):
# key -> (micro-batch, accumulation, which trial probed it)
PROBED: dict[str, tuple[int, int, str]] = {}


def probe_key(spec: RunSpec, info: dict) -> str:
    """What the probed micro-batch depends on: the GPU, the model, precision, adapters, data (its
    longest rows and length), batch and speed settings and the optimizer."""
    parts = [str(info.get("gpu")), str(info.get("gpu_name"))]
    parts += [repr(x) for x in (spec.model, spec.precision, spec.peft, spec.data, spec.batch_config, spec.speed)]
    parts.append(str(spec.lr.optim))
    return "\n".join(parts)


def probe(trainer: Any, micro: int) -> float:
    """One real forward+backward through the trainer's own path (collator, PEFT, TRL's fused LM head
    and loss mask) on the ``micro`` longest rows of the prepared train set (full packed sequences
    with packing): the worst batch the run will see. With ``speed.graphs`` the batch runs three times, as
    its bucket does in training (eagerly at its first use, then captured, then replayed), so that the peak
    holds the graphs' memory pool beside the eager allocations. The trainer's logged metrics and token count
    leave the probe out. Returns the peak allocated GiB; raises torch.OutOfMemoryError when it does not fit."""
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
    # TRL's loss counts the batch's tokens and keeps its metrics for the next log: the probe is no step of the run
    tokens = getattr(trainer, "_total_train_tokens", None)
    metrics = {mode: {k: list(v) for k, v in d.items()} for mode, d in getattr(trainer, "_metrics", {}).items()}
    try:
        # autocast as in training (accelerate wraps the model's forward only inside train()): without it
        # PEFT's fp32 adapters would run, and save activations, in fp32
        for _ in range(3 if getattr(trainer, "graphed", None) is not None else 1):
            with trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, dict(batch))  # a copy: TRL's loss pops keys of its own
            loss.backward()
            loss = None
    finally:
        model.zero_grad(set_to_none=True)
        batch = loss = None
        for mode, kept in metrics.items():
            trainer._metrics[mode].clear()
            trainer._metrics[mode].update(kept)
        if tokens is not None:
            trainer._total_train_tokens = tokens
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def probe_ladder(trainer: Any, spec: RunSpec, micro: int, info: dict, states_gib: float) -> int:
    """From the estimate's micro-batch, probe up the divisors of the target effective batch while
    the probe's peak plus the optimizer states fits the budget, or down until it does."""
    import torch

    a = spec.batch_config.auto
    target, seq_len, budget = int(a.target_effective_batch), int(spec.data.max_length), float(info["budget_gib"])
    divisors = [d for d in range(1, min(int(a.max_micro_batch), target) + 1) if target % d == 0]
    probes = info.setdefault("probes", [])

    def fits(m: int) -> bool:
        try:
            peak = probe(trainer, m)
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
