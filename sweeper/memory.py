"""Peak GPU memory estimate for one fine-tuning step of a Llama/Qwen2-style decoder.

Pure arithmetic on a Hugging Face config dict: no torch import, so it is cheap to call while planning a
sweep on a CPU box. All sizes are GiB (2**30 bytes). The numbers model what one process on one GPU holds
at its peak, for the loading choices this project makes (``sweeper.model.load``) and a plain
``transformers``/TRL training step (autocast forward, ``loss.backward()``, ``optimizer.step()``,
``optimizer.zero_grad(set_to_none=True)``):

* ``compute="bf16"``: weights are loaded in bf16, so full fine-tuning is pure bf16 (bf16 grads and bf16
  AdamW states: ``torch.optim.AdamW`` keeps its states in the parameter's dtype) and there is no fp32
  master copy. ``compute="fp16"`` or ``"fp32"``: weights are fp32 (fp16 masters cannot be trained with the
  AMP grad scaler); under fp16 autocast, the fp16 copies of the linear weights are saved for backward and
  counted with the activations.
* LoRA on a bf16/fp16 base: PEFT upcasts the adapters to fp32 (``autocast_adapter_dtype=True``), so their
  grads and AdamW states are fp32. QLoRA: TRL casts the adapters to bf16. QLoRA base linears are NF4 with
  double quantisation (block 64, 8-bit absmax, fp32 second-level absmax per 256 blocks); embeddings, norms
  and the LM head stay in the load dtype. bitsandbytes' 4-bit matmul saves no input for backward.
* Activations are the tensors autograd saves (checked with ``torch.autograd.graph.saved_tensors_hooks``):
  autograd saves an input only when the gradient that needs it is required, so a frozen base linear keeps
  no copy of its input, while each LoRA branch keeps its dropout mask (1 byte/element) and its
  compute-dtype input. Attention is SDPA (flash/efficient kernel: q, k, v, output and a fp32 log-sum-exp,
  no seq x seq matrix). Gradient checkpointing keeps each layer's input and recomputes one layer at a time.
* Logits follow the model's own loss (``ForCausalLMLoss``): bf16 logits, a fp32 upcast and the fp32
  log-softmax. At the start of backward, log-softmax's output, its incoming gradient and its result are all
  alive: 12 bytes per token per vocab entry. TRL >= 1.16's ``SFTTrainer`` uses a fused, tiled LM head that
  never materialises these logits, so for such runs ``logits_gib`` is an upper bound.
* The peak is the larger of two moments. End of forward / start of backward: weights, optimizer states,
  all activations and the logits (gradients are absent, because they are set to None after each optimizer
  step, unless ``grad_accum > 1`` keeps them across micro-batches). Optimizer step: weights, states,
  gradients and the step's temporaries (``adamw_torch``'s foreach path allocates one parameter-sized
  ``sqrt(exp_avg_sq)``; the fused and 8-bit kernels work in place). ``total_gib`` is that peak plus
  ``overhead_gib``, so it is not the sum of the parts.
* ``overhead_gib`` = 0.5 GiB CUDA context + 5% of the modelled peak for the caching allocator's
  fragmentation. ``torch.cuda.max_memory_allocated()`` sees neither: compare it with ``allocated_gib``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CONTEXT_GIB", "MemoryEstimate", "count_params", "estimate"]

GIB = 2**30
METHODS = ("full", "lora", "qlora")
COMPUTES = ("bf16", "fp16", "fp32")
# transformers OptimizerNames -> (state bytes per trainable param in fp32-param terms, kind)
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "sgd",
)
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONTEXT_GIB = 0.5  # CUDA context + cuBLAS/cuDNN handles, outside the caching allocator
FRAGMENTATION = 0.05  # caching allocator slack, as a fraction of the modelled peak
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Modelled peak GPU memory of one training step, in GiB (2**30 bytes)."""

    weights_gib: float  # base weights (4-bit packed + quant constants for qlora)
    adapters_gib: float  # LoRA A/B params (0 for full)
    gradients_gib: float  # grads of trainable params
    optimizer_gib: float  # optimizer states (AdamW: 2 states in the param dtype; 8-bit AdamW: 2 bytes/param)
    activations_gib: float  # tensors saved for backward (micro_batch, seq_len, activation_checkpointing)
    logits_gib: float  # logits + loss at their peak (vocab x tokens, fp32 upcast in the loss)
    overhead_gib: float  # CUDA context (0.5 GiB) + 5% allocator fragmentation
    total_gib: float  # modelled peak + overhead (not the sum of the parts: see the module docstring)
    step_temp_gib: float = 0.0  # optimizer step temporaries (foreach AdamW's sqrt(exp_avg_sq))
    allocated_gib: float = 0.0  # what torch.cuda.max_memory_allocated() should read (total - overhead)

    def parts(self) -> dict[str, float]:
        """Every field by name, in GiB."""
        return asdict(self)


def _get(model_config: Mapping[str, Any], key: str) -> int:
    value = model_config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"model_config[{key!r}] must be a positive int, but got {value!r}")
    return value


def _dims(model_config: Mapping[str, Any]) -> dict[str, int]:
    if not isinstance(model_config, Mapping):
        raise ValueError(f"model_config must be a mapping (a Hugging Face config as a dict), but got {type(model_config).__name__}")
    d = {k: _get(model_config, k) for k in _REQUIRED}
    heads = d["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or d["hidden_size"] // heads
    d["q_dim"] = heads * head_dim
    d["kv_dim"] = int(kv_heads) * head_dim
    return d


def _has_qkv_bias(model_config: Mapping[str, Any]) -> bool:
    # Qwen2 always has q/k/v biases; Llama-style configs say so with attention_bias.
    return model_config.get("model_type") == "qwen2" or "qwen2" in str(model_config.get("architectures", "")).lower() or bool(
        model_config.get("attention_bias", False)
    )


def _linear_shapes(d: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder block."""
    h, i, q, kv = d["hidden_size"], d["intermediate_size"], d["q_dim"], d["kv_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _param_split(model_config: Mapping[str, Any]) -> tuple[int, int]:
    """(block linear weight params, all other params) of the model."""
    d = _dims(model_config)
    h, layers, vocab = d["hidden_size"], d["num_hidden_layers"], d["vocab_size"]
    linear = layers * sum(a * b for a, b in _linear_shapes(d).values())
    bias = (d["q_dim"] + 2 * d["kv_dim"]) if _has_qkv_bias(model_config) else 0
    per_layer_other = bias + 2 * h  # q/k/v biases + two RMSNorm weights
    embeddings = vocab * h * (1 if model_config.get("tie_word_embeddings", False) else 2)
    return linear, layers * per_layer_other + embeddings + h  # + final norm


def count_params(model_config: Mapping[str, Any]) -> int:
    """Number of parameters of a Llama/Qwen2-style decoder (tied embeddings counted once)."""
    linear, other = _param_split(model_config)
    return linear + other


def _targets(lora_targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(lora_targets, str):
        if lora_targets == "all-linear":
            return LINEAR_TARGETS
        lora_targets = [lora_targets]
    names = tuple(lora_targets)
    bad = [t for t in names if t not in LINEAR_TARGETS]
    if not names or bad:
        raise ValueError(
            f"lora_targets must be 'all-linear' or a non-empty list drawn from {list(LINEAR_TARGETS)}, "
            f"but got {lora_targets!r}"
        )
    return names


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, but got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, but got {value!r}")


def estimate(
    model_config: Mapping[str, Any],
    *,
    method: str,
    compute: str,
    optim: str,
    activation_checkpointing: bool,
    micro_batch: int,
    seq_len: int,
    lora_r: int = 16,
    lora_targets: str | Sequence[str] = "all-linear",
    lora_dropout: float = 0.05,
    grad_accum: int = 1,
) -> MemoryEstimate:
    """Estimate the peak GPU memory (GiB = 2**30 bytes) of one training step; see the module docstring.

    Args:
        model_config: Hugging Face config as a dict (hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings; optional head_dim).
        method: "full", "lora" or "qlora" (4-bit NF4 base, LoRA on top).
        compute: "bf16", "fp16" or "fp32" autocast precision.
        optim: a transformers optimizer name, see ``OPTIMIZERS``.
        activation_checkpointing: gradient checkpointing of every decoder layer.
        micro_batch: sequences per forward/backward on this GPU.
        seq_len: tokens per sequence (padded length).
        lora_r: LoRA rank (ignored for "full").
        lora_targets: "all-linear" or names among ``LINEAR_TARGETS`` (ignored for "full").
        lora_dropout: LoRA dropout; above 0 each LoRA branch saves its own mask and input copy.
        grad_accum: micro-batches per optimizer step; above 1 the gradients stay alive through forward.
    """
    _choice("method", method, METHODS)
    _choice("compute", compute, COMPUTES)
    _choice("optim", optim, OPTIMIZERS)
    if not isinstance(activation_checkpointing, bool):
        raise ValueError(f"activation_checkpointing must be a bool, but got {activation_checkpointing!r}")
    _positive_int("micro_batch", micro_batch)
    _positive_int("seq_len", seq_len)
    _positive_int("grad_accum", grad_accum)
    if method != "full":
        _positive_int("lora_r", lora_r)
        if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a float in [0, 1), but got {lora_dropout!r}")
    if method == "qlora" and compute == "fp32":
        raise ValueError("compute must be one of ['bf16', 'fp16'] for method='qlora', but got 'fp32'")
    targets = _targets(lora_targets) if method != "full" else ()

    d = _dims(model_config)
    h, i, q, kv = d["hidden_size"], d["intermediate_size"], d["q_dim"], d["kv_dim"]
    layers, vocab, heads = d["num_hidden_layers"], d["vocab_size"], d["num_attention_heads"]
    linear, other = _param_split(model_config)
    c = _BYTES[compute]  # autocast compute bytes
    w = 2 if compute == "bf16" else 4  # load dtype bytes (fp16 runs keep fp32 masters)
    tokens = micro_batch * seq_len
    shapes = _linear_shapes(d)

    # --- parameters -------------------------------------------------------------------------------
    if method == "qlora":
        # NF4: 0.5 B/param + 8-bit absmax per 64 + fp32 absmax per 64*256 (double quant)
        weights = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + other * w
    else:
        weights = (linear + other) * w
    n_adapter = layers * sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
    if method == "full":
        trainable, tdtype = linear + other, w
    elif method == "lora":
        trainable, tdtype = n_adapter, 4  # PEFT upcasts adapters to fp32
    else:
        trainable, tdtype = n_adapter, 2  # TRL casts QLoRA adapters to bf16
    adapters = n_adapter * tdtype
    gradients = trainable * tdtype
    if optim in ("adamw_torch", "adamw_torch_fused"):
        optimizer = 2 * trainable * tdtype  # exp_avg, exp_avg_sq in the param dtype
    elif optim == "paged_adamw_32bit":
        optimizer = 2 * trainable * 4
    elif optim == "sgd":
        optimizer = 0.0  # transformers' "sgd" has no momentum buffer
    else:  # bitsandbytes 8-bit AdamW: 2 x 1 byte + fp32 absmax per 256-element block, per state
        optimizer = 2 * trainable * (1 + 4 / 256)
    step_temp = trainable * tdtype if optim == "adamw_torch" else 0.0

    # --- activations (bytes per token) ---------------------------------------------------------------
    norm_full = 4 * h + 2 * c * h + 8  # fp32 upcast input, normalised input (weight grad), output, rsqrt
    attention = c * (2 * q + 2 * kv) + 4 * heads  # SDPA: q, k, v, output + fp32 log-sum-exp
    if method == "full":
        per_layer = 2 * norm_full + attention + 4 * c * i  # MLP: gate, up, silu(gate), product
        final = norm_full
    else:
        norm_frozen = 4 * h + 8  # frozen weight: the normalised input and output are not kept
        per_layer = 2 * norm_frozen + attention + 3 * c * i  # MLP: gate, up, silu(gate)
        branch = c + (1 if lora_dropout > 0 else 0)  # compute-dtype input copy + bool dropout mask
        per_layer += sum(branch * shapes[t][0] + c * lora_r for t in targets)
        final = 4 * h + 8
    if activation_checkpointing:
        # each layer's input is kept; backward recomputes (and holds) one layer at a time
        act_bytes = tokens * (layers * c * h + per_layer + final)
    else:
        act_bytes = tokens * (layers * per_layer + final)
    if method == "full" and compute == "fp16":
        act_bytes += linear * c  # autocast's cached fp16 copies of trainable fp32 weights
    elif method == "lora" and compute == "fp16":
        act_bytes += linear * c  # fp16 copies of frozen fp32 base weights, saved by each matmul
    if method == "lora" and c < 4:
        act_bytes += n_adapter * c  # autocast copies of the fp32 adapters
    logits_bytes = tokens * vocab * 12  # fp32 log-softmax output + its grad in + its grad out

    # --- peak ---------------------------------------------------------------------------------------
    static = weights + adapters + optimizer
    held_grads = gradients if grad_accum > 1 else 0.0
    forward_peak = act_bytes + logits_bytes + held_grads
    step_peak = gradients + step_temp
    allocated = static + max(forward_peak, step_peak)
    overhead = CONTEXT_GIB * GIB + FRAGMENTATION * allocated
    g = 1 / GIB
    return MemoryEstimate(
        weights_gib=weights * g,
        adapters_gib=adapters * g,
        gradients_gib=gradients * g,
        optimizer_gib=optimizer * g,
        activations_gib=act_bytes * g,
        logits_gib=logits_bytes * g,
        overhead_gib=overhead * g,
        total_gib=(allocated + overhead) * g,
        step_temp_gib=step_temp * g,
        allocated_gib=allocated * g,
    )
