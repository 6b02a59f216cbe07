"""How fast a trial's steps run (``speed`` config group), never what they compute.

Every choice here keeps the rows of each optimizer step, the loss and the effective batch as
they are; only the kernels and the bookkeeping change. ``auto`` turns on what helps on a CUDA GPU
and leaves CPU runs on the plain path, so no GPU-only flag ever reaches a CPU run:

- ``attention=varlen``: flash attention over the packed (padding-free) rows of a micro-batch,
  one causal block per row, through ``torch.ops.aten._flash_attention_forward`` with TRL's
  ``cu_seq_lens``. Without it transformers runs SDPA with a block-diagonal mask over the whole
  flattened micro-batch, whose cost grows with its square. Batches without ``cu_seq_lens``
  (generation, padded batches) fall back to SDPA.
- ``padding_free``: the rows of a micro-batch are concatenated into one sequence, so no compute
  goes to pad tokens (TRL's padding-free collator; ``data.packing=true`` implies it).
- ``liger``: Liger's RMSNorm, RoPE and SwiGLU kernels, applied to the model instance (TRL's
  ``use_liger_kernel`` is deprecated; its fused LM head already replaces Liger's fused loss). ``auto``
  leaves them off when ``compile`` is on: they break the compiled graph, and Inductor fuses the same ops.
- ``fused_optimizer``: ``adamw_torch`` becomes ``adamw_torch_fused`` (one kernel per step).
- ``lora_upcast``: PEFT casts every LoRA layer's input to the adapters' dtype (fp32), a copy of the
  activations per adapted linear and step that autocast then casts back to bf16/fp16 for the matmul.
  ``auto`` skips that round trip while autocast is on (the adapters stay fp32, the optimizer's update is
  the same; the matmul sees the same bf16 values) and keeps PEFT's cast wherever autocast is off (e.g.
  the accuracy metric's generation), so no dtype mismatch can arise.
- ``lora_fused``: each LoRA linear adds its adapters' product into the base layer's output inside one
  matrix multiply (``addmm_`` with the scaling as its ``alpha``) instead of PEFT's separate scale and add over
  the whole output (two passes over a tokens x out_features tensor forward and one backward, per adapted
  linear and step). The adapters, their dropout and the loss are PEFT's; only the rounding differs (one
  rounding of the sum instead of three). ``auto``: on under bf16/fp16 autocast on CUDA; any layer or call it
  does not cover (DoRA and other variants, LoRA biases, several active adapters, merged weights, no autocast)
  runs PEFT's own forward. ``speed=auto`` turns it on (``lora_fused: auto``): +9% tokens/s on an H200,
  learning check over two seeds 1.55% from plain TRL (a default must stay within 2%).
- ``graphs``: the model's forward and backward (every decoder block and TRL's fused LM head) captured as CUDA
  graphs per token bucket and replayed, and the step's reads of GPU values (TRL's metrics, the tokens seen,
  blocking batch copies) deferred to the trainer's logging: two launches instead of thousands per
  micro-batch, and a host that runs ahead of the GPU, for steps the host cannot launch fast enough
  (:mod:`sweeper.graphs`). Needs CUDA, padding-free rows with varlen attention, no compile.
- ``compile``: ``true`` is ``torch.compile`` of the whole model (TRL's ``torch_compile``; about a minute
  per trial); ``regional`` compiles each repeated decoder block in place, so one block's graph serves
  every layer (accelerate's regional compilation), with dynamic shapes (a packed micro-batch's length
  changes every step), and fuses LoRA's cast, dropout, scale and add; the
  Inductor cache (``TORCHINDUCTOR_CACHE_DIR``; ``paths.cache_dir``/inductor unless set) lets later sweeps
  reuse the compiled kernels. A worker runs its trials in one process, so compilation is paid once per worker:
  its later trials' blocks reuse the compiled graphs from their first step. Not GPU-only: asked for on CPU,
  it is honoured (Inductor's CPU backend; ``auto`` never turns it on). Off by default: with ``lora_fused``
  on, it gained 0-7% tokens/s on an H200 (``benchmarks/RESULTS.md``, round 4) for ~35-55 s of compilation.

Measured on an H100 (1.5B-shaped Qwen2, LoRA r16, 16 packed rows of 1,024 tokens per step):
SDPA 10.0k tokens/s, varlen + Liger 25.1k, + micro-batch 16 without accumulation and the fused
optimizer 33.2k, + compile 42.0k after 74 s of compilation (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweeper.config import SpeedConfig

__all__ = ["VARLEN", "COMPILE_CHOICES", "apply_to_model", "apply_to_trainer", "attn_implementation", "compile_blocks", "describe", "measurement_callbacks",
           "fuse_lora", "register_varlen", "resolve", "sft_config_kwargs", "skip_lora_upcast", "varlen_attention"]

log = logging.getLogger(__name__)

VARLEN = "sft_varlen"  # the name registered with transformers' AttentionInterface
_LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                  "fused_linear_cross_entropy": False}  # TRL's fused LM head computes the loss


COMPILE_CHOICES = (False, True, "regional")  # speed.compile: off, the whole model, each decoder block


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # not installed, or no triton/GPU
        return False
    return True


def resolve(group: SpeedConfig, *, cuda: bool, compute: str, optim: str, strict: bool = True, lora: bool = True,
            quantized: bool = False) -> dict:
    """The concrete settings for this machine: ``auto`` decided, every value explicit.

    ``group`` is the ``speed`` config group (:class:`sweeper.config.SpeedConfig`); ``compute`` is the
    resolved precision (varlen flash attention needs bf16 or fp16 activations);
    ``optim`` is the configured optimizer (only ``adamw_torch`` has a fused twin); ``lora``: the run trains LoRA
    adapters (not full fine-tuning) and ``quantized``: on 4-bit base weights (QLoRA) -- ``graphs=auto`` is on
    only for LoRA on unquantized weights, the case it was measured on. ``strict=False`` keeps an
    explicit GPU-only choice instead of refusing it on a machine without one (the data's preparation, checked
    on CPU for trials that will run on a GPU and refuse it there)."""
    def pick(key: str, on: bool) -> bool:
        value = getattr(group, key)
        return on if value == "auto" else bool(value)

    half = compute in ("bf16", "fp16")
    attention = str(group.attention)
    if attention == "auto":
        attention = "varlen" if cuda and half else "sdpa"
    if strict and attention == "varlen" and not (cuda and half):
        raise ValueError(
            f"speed.attention=varlen needs a CUDA GPU and bf16/fp16 compute (here: "
            f"{'CUDA' if cuda else 'no GPU'}, {compute}); use speed.attention=auto or sdpa")
    liger = str(group.liger)
    compile_ = group.compile if group.compile in COMPILE_CHOICES else bool(group.compile)
    if liger == "auto":
        # Liger's Triton kernels split a compiled graph (RoPE) or fail to trace with dynamic shapes (RMSNorm);
        # Inductor fuses the same norm, RoPE and SwiGLU itself, so a compiled model runs without them
        use_liger = cuda and _liger_available() and not compile_
    else:
        use_liger = bool(group.liger)
        if strict and use_liger and not (cuda and _liger_available()):
            raise ValueError("speed.liger=true needs a CUDA GPU and liger-kernel (pip install -e '.[kernels]'); "
                             "use speed.liger=auto or false")
    fused = pick("fused_optimizer", cuda) and optim == "adamw_torch"
    padding_free = pick("padding_free", attention == "varlen")
    graphs_can_run = cuda and attention == "varlen" and padding_free and not compile_
    graphs = pick("graphs", graphs_can_run and lora and not quantized)
    if strict and graphs and not graphs_can_run:
        raise ValueError(
            "speed.graphs=true needs a CUDA GPU, padding-free rows with varlen attention and speed.compile=false "
            f"(here: {'CUDA' if cuda else 'no GPU'}, attention={attention}, padding_free={padding_free}, "
            f"compile={compile_}); use speed.graphs=auto or false")
    return {
        "name": str(group.name),
        "attention": attention,
        "padding_free": padding_free,
        "liger": use_liger,
        "optim": "adamw_torch_fused" if fused else optim,
        "compile": compile_,
        "lora_upcast": pick("lora_upcast", not half),
        "lora_fused": pick("lora_fused", cuda and half),
        "graphs": graphs,
        "dataloader_num_workers": int(group.dataloader_num_workers),
    }


def attn_implementation(speed: dict) -> str | None:
    """The ``attn_implementation`` the speed group asks for (``model.load`` lets a configured
    ``model.attn_implementation`` win over it); None: transformers' default (SDPA)."""
    if speed["attention"] == "varlen":
        register_varlen()
        return VARLEN
    return speed["attention"] if speed["attention"] != "sdpa" else None


def register_varlen() -> None:
    """Register :func:`varlen_attention` with transformers under the name ``sft_varlen``, with SDPA's
    mask builder (used only by the SDPA fallback)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Causal flash attention per packed row (``cu_seq_lens_q`` from TRL's padding-free collator);
    SDPA for batches without it. Inputs are (batch, heads, tokens, head_dim); grouped-query heads
    are handled by the kernel."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or not query.is_cuda or kwargs.get("sliding_window"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    longest = kwargs.get("max_length_q")  # kept symbolic under torch.compile: int() would pin each value
    if longest is None:
        longest = t
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu.to(torch.int32), cu.to(torch.int32), longest, longest, float(dropout), True, False, scale=scaling,
    )[0]
    return out.view(b, t, h, d), None


def apply_to_model(model: Any, speed: dict) -> None:
    """Liger's per-layer kernels on the loaded model (before PEFT wraps it)."""
    if not speed["liger"]:
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **_LIGER_KERNELS)


def sft_config_kwargs(speed: dict) -> dict:
    """The SFTConfig fields that carry the resolved settings."""
    kwargs: dict[str, Any] = {
        "optim": speed["optim"],
        "dataloader_num_workers": speed["dataloader_num_workers"],
        "torch_compile": speed["compile"] is True,
    }
    if speed.get("graphs", False):  # batches copied (from the trainer's pinned memory) without waiting for the GPU
        kwargs["accelerator_config"] = {"non_blocking": True}
    return kwargs


def apply_to_trainer(trainer: Any, speed: dict, cache_dir: str | None = None) -> None:
    """What changes the built trainer's model and collator:

    - padding-free rows without packing: TRL 1.16 refuses ``padding_free=True`` with ``max_length``
      unless packing ("max_length is not enforced"), yet its own preparation truncates every row to
      ``max_length`` when not packing (``SFTTrainer._prepare_dataset``), so the rows the collator
      concatenates are already cut;
    - ``lora_upcast=false``: LoRA layers skip PEFT's input cast while autocast is on;
    - ``lora_fused``: LoRA linears add their adapters' product inside one ``addmm_`` (:func:`fuse_lora`);
    - ``compile=regional``: each repeated decoder block compiled in place, with Inductor's cache under
      ``cache_dir``/inductor unless the user set ``TORCHINDUCTOR_CACHE_DIR``;
    - ``graphs``: micro-batches padded into token buckets, the model replayed as CUDA graphs and the step's
      reads of the GPU deferred to logging (:mod:`sweeper.graphs`)."""
    collator = trainer.data_collator
    if speed["padding_free"] and not getattr(collator, "padding_free", True):
        collator.padding_free = True
        trainer.padding_free = True
    if not speed.get("lora_upcast", True):
        skip_lora_upcast(trainer.model)
    if speed.get("lora_fused", False):
        fuse_lora(trainer.model)
    if speed.get("graphs", False):
        from sweeper import graphs

        graphs.install(trainer)
    if speed["compile"] == "regional":
        if cache_dir and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.path.abspath(cache_dir), "inductor")
        compile_blocks(trainer.model)


class _UpcastOutsideAutocast:
    """Stands for PEFT's ``cast_input_dtype_enabled`` flag of a LoRA layer: true (cast the input to the
    adapters' dtype, PEFT's default) only while autocast is off on the input's device type."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type

    def __bool__(self) -> bool:
        import torch

        return not torch.is_autocast_enabled(self.device_type)


def skip_lora_upcast(model: Any) -> int:
    """Make every LoRA layer of ``model`` skip its input cast while autocast is on; returns how many
    layers were changed (0: no LoRA layer, e.g. full fine-tuning)."""
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # PEFT missing: nothing to change
        return 0
    device_type = next(model.parameters()).device.type
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = _UpcastOutsideAutocast(device_type)
            n += 1
    return n


def fuse_lora(model: Any) -> int:
    """Give every plain LoRA linear of ``model`` (PEFT's ``lora.Linear``; not its quantised or other layer
    classes) the fused forward of :func:`_fused_lora_forward`; returns how many layers were changed (0: no
    LoRA layer, e.g. full fine-tuning)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except Exception:  # PEFT missing: nothing to change
        return 0
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


def _fused_lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """PEFT's LoRA forward, ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, as ``base(x).addmm_(
    lora_A(dropout(x)), lora_B.weight.T, alpha=scaling)`` under autocast; PEFT's own forward otherwise."""
    import torch

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or not torch.is_autocast_enabled(x.device.type)
            or getattr(self.lora_A[name], "bias", None) is not None
            or getattr(self.lora_B[name], "bias", None) is not None):
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    result = self.base_layer(flat)
    h = torch.nn.functional.linear(self.lora_dropout[name](flat), self.lora_A[name].weight)
    result.addmm_(h, self.lora_B[name].weight.to(result.dtype).t(), alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


def compile_blocks(model: Any) -> int:
    """Compile, in place, every block of the model's repeated blocks (a ``ModuleList`` of one class: the
    decoder layers), so one compiled graph serves every layer and the module's parameters and state
    dict keep their names. Returns how many blocks were compiled; 0 when the model has no repeated
    blocks (then nothing is compiled)."""
    import torch

    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and \
                all(type(m) is type(module[0]) for m in module):
            for block in module:
                # dynamic: a packed micro-batch's length changes every step; one graph serves every length
                block.compile(dynamic=True)
                n += 1
            break  # the outermost repeated blocks only
    log.info("speed.compile=regional: %d %s blocks compiled in place", n,
             type(module[0]).__name__ if n else "(no repeated)")
    return n


def describe(speed: dict) -> str:
    return (f"attention={speed['attention']} padding_free={speed['padding_free']} liger={speed['liger']} "
            f"optim={speed['optim']} lora_upcast={speed.get('lora_upcast', True)} "
            f"lora_fused={speed.get('lora_fused', False)} graphs={speed.get('graphs', False)} "
            f"compile={speed['compile']}")


# --------------------------------------------------------------------------- measurement hooks


def measurement_callbacks() -> list:
    """Benchmark hooks, off unless the environment asks (``benchmarks/throughput.py`` sets them):

    - ``SFT_SWEEP_STEP_TIMES=<file>``: one JSON line per optimizer step, ``{"step", "t", "wall", "tokens"}``,
      ``t`` (``time.perf_counter``) and ``wall`` (``time.time``) of the moment the GPU finished the step (a
      CUDA event; no synchronise per step, so the stamps leave the GPU's busy time as it is), ``tokens`` the
      non-pad tokens seen so far; and one line ``{"event": "evaluate" | "save", "t", "wall"}`` after each
      evaluation and checkpoint save, so a reader can tell the steps' time from the time between them.
    - ``SFT_SWEEP_PROFILE=<dir>``: ``torch.profiler`` over two steady-state steps (after step 5;
      ``SFT_SWEEP_PROFILE_START`` and ``SFT_SWEEP_PROFILE_STEPS`` move and widen the window); writes
      ``profile.txt`` (the ops by CUDA time) and ``trace.json.gz`` (the timeline, for
      ``benchmarks/profile_gaps.py``) into the folder; ``SFT_SWEEP_PROFILE_STACK=1`` records the Python
      functions too, so the GPU's idle time can be laid at a function's door.
    """
    out = []
    times, prof_dir = os.environ.get("SFT_SWEEP_STEP_TIMES"), os.environ.get("SFT_SWEEP_PROFILE")
    if not times and not prof_dir:
        return out
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    if times:
        class StepTimes(TrainerCallback):
            """Stamps taken on the GPU's timeline (CUDA events, read back at each evaluation, save and the end)
            so that the stamps themselves never make the host wait for the GPU; host clocks on CPU."""

            def on_train_begin(self, args, state, control, **kwargs):
                self.pending: list = []
                sync()
                self.t0, self.w0 = time.perf_counter(), time.time()
                self.ref = None
                if torch.cuda.is_available():
                    self.ref = torch.cuda.Event(enable_timing=True)
                    self.ref.record()

            def _stamp(self, line: dict) -> None:
                event = None
                if self.ref is not None:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                else:
                    line.update(t=time.perf_counter(), wall=time.time())
                self.pending.append((line, event))

            def _flush(self) -> None:
                if self.ref is not None and self.pending:
                    self.pending[-1][1].synchronize()
                with open(times, "a") as f:  # opened per flush: an evaluation after training ends writes too
                    for line, event in self.pending:
                        if event is not None:
                            dt = self.ref.elapsed_time(event) / 1000
                            line.update(t=self.t0 + dt, wall=self.w0 + dt)
                        f.write(json.dumps(line) + "\n")
                self.pending = []

            def on_step_end(self, args, state, control, **kwargs):
                self._stamp({"step": state.global_step, "tokens": int(state.num_input_tokens_seen or 0)})

            def _event(self, name: str) -> None:
                self._stamp({"event": name})
                self._flush()

            def on_evaluate(self, args, state, control, **kwargs):
                self._event("evaluate")

            def on_save(self, args, state, control, **kwargs):
                self._event("save")

            def on_train_end(self, args, state, control, **kwargs):
                self._flush()

        out.append(StepTimes())
    if prof_dir:
        class Profile(TrainerCallback):
            start = int(os.environ.get("SFT_SWEEP_PROFILE_START") or 5)
            length = int(os.environ.get("SFT_SWEEP_PROFILE_STEPS") or 2)

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == self.start:
                    sync()
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    self.prof = torch.profiler.profile(activities=acts,
                                                       with_stack=os.environ.get("SFT_SWEEP_PROFILE_STACK") == "1")
                    self.prof.__enter__()
                elif state.global_step == self.start + self.length and hasattr(self, "prof"):
                    sync()
                    self.prof.__exit__(None, None, None)
                    key = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
                    os.makedirs(prof_dir, exist_ok=True)
                    with open(os.path.join(prof_dir, "profile.txt"), "w") as f:
                        f.write(self.prof.key_averages().table(sort_by=key, row_limit=25))
                    trace = os.path.join(prof_dir, "trace.json")
                    self.prof.export_chrome_trace(trace)
                    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.remove(trace)
                    del self.prof

        out.append(Profile())
    return out
