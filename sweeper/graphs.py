"""Training steps whose decoder runs as CUDA graphs (``speed.graphs``).

A small unpacked micro-batch (~5.6k tokens of gsm8k) leaves an H200 waiting on the host: the step launches
~4,100 kernels (every LoRA linear is a handful forward and backward) and the host needs ~0.2 s for what the GPU
runs in ~0.1 s (``benchmarks/RESULTS.md``, rounds 4-5). Here the model's backbone (embeddings, every decoder
block and the final norm: everything but the LM head and the loss) is captured, eagerly, without
compilation, as two CUDA graphs, one for its forward and one for its backward, and each later step of the same
shape replays them: two launches instead of thousands.

- **Shapes**: a graph holds fixed shapes, so the padding-free collator's micro-batches are padded up to a
  multiple of :data:`GRAPH_BUCKET` tokens (:class:`BucketedCollator`): one extra row of pad tokens carrying no
  loss (``-100`` labels, positions from 0, its own causal block, not counted as seen tokens) and the row
  boundaries ``cu_seq_lens`` filled up to a multiple of :data:`GRAPH_SLOTS` entries with empty rows. Each bucket
  runs eagerly the first time it is seen, then is captured once (a warm-up forward and backward on a side stream,
  then the capture) and replayed from then on. All buckets share one memory pool (their replays never overlap).
- **Gradients**: the backward graph adds into each trainable parameter's ``.grad``, which must therefore stay
  at one address: the parameters get fixed gradient buffers, zeroed (or filled with an eager micro-batch's
  gradient) before each replay, so a trainer's ``zero_grad(set_to_none=True)`` and gradient accumulation work as
  with eager steps.
- **What stays eager**: the LM head and the loss (TRL's fused head picks the labelled tokens, a data-dependent
  shape), evaluation and generation (no gradient), a micro-batch with an attention mask (not padding-free),
  gradient checkpointing (it replays the forward with saved RNG state), the first micro-batch of each bucket, and a
  forward that comes before the previous replay's backward (the buckets' activations share one pool).

The numbers: the loss, the gradients and the rows of each step are the eager path's, up to bf16 rounding; with
LoRA dropout on, each replay draws new masks from the same generator (its draws differ from eager's).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["GRAPH_BUCKET", "GRAPH_SLOTS", "BucketedCollator", "GraphedBackbone", "bucket_batch", "install"]

GRAPH_BUCKET = 1024  # a micro-batch's tokens are padded up to a multiple of this (one capture per multiple)
GRAPH_SLOTS = 32  # ... and its row boundaries (cu_seq_lens) up to a multiple of this many entries


class BucketedCollator:
    """A padding-free collator whose micro-batches come in few shapes (see the module's docstring); the loss,
    its token count and the tokens seen are those of the real rows."""

    def __init__(self, collator: Any, bucket: int = GRAPH_BUCKET, slots: int = GRAPH_SLOTS) -> None:
        self.collator, self.bucket, self.slots = collator, bucket, slots

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collator, name)

    def __call__(self, examples: list) -> dict:
        return bucket_batch(self.collator(examples), self.collator.pad_token_id, self.bucket, self.slots)


def bucket_batch(batch: dict, pad_token_id: int, bucket: int, slots: int) -> dict:
    """``batch`` (TRL's padding-free collation: one row of ``t`` tokens with ``cu_seq_lens_q``) padded as
    :class:`BucketedCollator` says, ``max_length`` set to the padded length (an upper bound the flash kernel
    accepts); other batches are returned as they are."""
    ids = batch.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1 or "cu_seq_lens_q" not in batch:
        return batch
    t = ids.shape[1]
    padded = -(-t // bucket) * bucket
    extra = padded - t
    cu = batch["cu_seq_lens_q"].to(torch.int32)
    out = dict(batch)
    if extra:
        fill = {"input_ids": pad_token_id, "labels": -100}
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, t):
                if key == "position_ids":
                    tail = torch.arange(extra, dtype=value.dtype)[None]
                elif key == "seq_idx":
                    tail = value.new_full((1, extra), cu.numel() - 1)
                else:
                    tail = value.new_full((1, extra), fill.get(key, 0))
                out[key] = torch.cat([value, tail], dim=1)
        cu = torch.cat([cu, cu.new_tensor([padded])])
    entries = -(-cu.numel() // slots) * slots
    cu = torch.cat([cu, cu.new_full((entries - cu.numel(),), padded)])
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
    out["max_length_q"] = out["max_length_k"] = padded
    return out


def install(trainer: Any) -> GraphedBackbone | None:
    """Pad the trainer's micro-batches into buckets and replay its model's backbone as CUDA graphs; None (and
    nothing changed) when the model has no separate backbone to capture."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        log.info("speed.graphs: %s has no backbone apart from its head; steps run eagerly", type(base).__name__)
        return None
    trainer.data_collator = BucketedCollator(trainer.data_collator)
    return GraphedBackbone(backbone)


_KEYS_WITHOUT_GRAPHS = ("attention_mask", "inputs_embeds", "past_key_values", "output_attentions",
                        "output_hidden_states")


class GraphedBackbone:
    """Replaces ``backbone.forward``: a training forward of a bucketed padding-free micro-batch replays the
    captured graphs of its shape; every other call runs the backbone's own forward."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone
        self.eager = backbone.forward
        self.params = [p for p in backbone.parameters() if p.requires_grad]
        self.grads: list | None = None
        self.entries: dict = {}
        self.seen: set = set()
        self.pool = None
        self.anchor = None
        self.replays = 0
        self.pending: _Entry | None = None  # the replayed forward whose backward is still to come
        backbone.forward = self.forward

    def key(self, args: tuple, kwargs: dict) -> tuple | None:
        """The shape signature of a call the graphs can serve, None for one they cannot."""
        ids = kwargs.get("input_ids")
        if (args or not torch.is_grad_enabled() or not self.backbone.training or not self.params
                or getattr(self.backbone, "gradient_checkpointing", False)
                or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _KEYS_WITHOUT_GRAPHS)
                or not torch.is_tensor(ids) or not ids.is_cuda or ids.dim() != 2 or ids.shape[0] != 1
                or kwargs.get("use_cache") or not torch.is_tensor(kwargs.get("cu_seq_lens_q"))):
            return None
        sig = []
        for name in sorted(kwargs):
            value = kwargs[name]
            if torch.is_tensor(value):
                if value.device != ids.device:
                    return None
                sig.append((name, tuple(value.shape), value.dtype))
            elif value is None or isinstance(value, (bool, int, float, str)):
                sig.append((name, value))
            else:
                return None
        return tuple(sig)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key = self.key(args, kwargs)
        if key is None:
            return self.eager(*args, **kwargs)
        entry = self.entries.get(key)
        if entry is None:
            if key not in self.seen:  # its first micro-batch runs eagerly (and warms up its kernels)
                self.seen.add(key)
                return self.eager(**kwargs)
            entry = self.entries[key] = self.capture(kwargs)
        if entry is _EAGER or self.pending is not None:
            # a replay whose backward has not run yet keeps its activations in the shared pool, which this
            # replay would overwrite (two forwards before their backwards): run this one eagerly
            return self.eager(**kwargs)
        for name, value in kwargs.items():
            if name in entry.inputs:
                entry.inputs[name].copy_(value, non_blocking=True)
        self.replays += 1
        hidden = _Replay.apply(entry, self.anchor)
        return entry.output_type(last_hidden_state=hidden)

    def attach_grads(self) -> None:
        """Point every trainable parameter's ``.grad`` at its fixed buffer: zeroed where the trainer dropped
        the gradient, holding the eager gradient where an eager micro-batch made a new one."""
        zero, dst, src = [], [], []
        for p, g in zip(self.params, self.grads):
            current = p.grad
            if current is g:
                continue
            if current is None:
                zero.append(g)
            else:
                dst.append(g)
                src.append(current)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)
        if dst:
            torch._foreach_copy_(dst, src)

    def capture(self, kwargs: dict) -> Any:
        """The bucket's captured graphs; :data:`_EAGER` (and a warning) when the capture fails, e.g. on an op
        that waits for the GPU, so the bucket keeps running eagerly instead of failing the trial."""
        try:
            return self._capture(kwargs)
        except RuntimeError as e:  # torch.AcceleratorError is one
            torch.cuda.synchronize()
            log.warning("speed.graphs: the backbone could not be captured for %s tokens (%s); that bucket runs "
                        "eagerly", tuple(kwargs["input_ids"].shape)[1], str(e).splitlines()[0])
            return _EAGER

    def _capture(self, kwargs: dict) -> _Entry:
        device = kwargs["input_ids"].device
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
            self.pool = torch.cuda.graph_pool_handle()
            self.anchor = torch.zeros((), device=device, requires_grad=True)
        inputs = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}
        static = {**kwargs, **inputs}
        half = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
                    enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        # warm-up on a side stream (the capture's own lazy initialisations), leaving .grad untouched
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            with torch.autocast(**half):
                out = self.eager(**static).last_hidden_state
            torch.autograd.grad(out, self.params, torch.ones_like(out), allow_unused=True)
        torch.cuda.current_stream(device).wait_stream(side)
        del out
        self.attach_grads()  # the backward graph adds into these addresses
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward, pool=self.pool, capture_error_mode="thread_local"):
            with torch.autocast(**half):
                result = self.eager(**static)
        hidden = result.last_hidden_state
        grad = torch.empty_like(hidden)
        with torch.cuda.graph(backward, pool=self.pool, capture_error_mode="thread_local"):
            torch.autograd.backward(hidden, grad)
        hidden = hidden.detach()
        log.info("speed.graphs: captured the backbone's forward and backward for %s tokens (%d captured)",
                 tuple(kwargs["input_ids"].shape)[1], len(self.entries) + 1)
        return _Entry(self, inputs, forward, backward, hidden, grad, type(result))


_EAGER = object()  # a bucket whose capture failed: it runs eagerly


class _Entry:
    """One bucket's graphs, their static inputs, output and output gradient."""

    def __init__(self, owner: GraphedBackbone, inputs: dict, forward: Any, backward: Any, hidden: Any, grad: Any,
                 output_type: type) -> None:
        self.owner, self.inputs, self.forward, self.backward = owner, inputs, forward, backward
        self.hidden, self.grad, self.output_type = hidden, grad, output_type


class _Replay(torch.autograd.Function):
    """The backbone's forward graph as an autograd op whose backward replays the backward graph (which adds the
    parameters' gradients into their ``.grad`` buffers itself)."""

    @staticmethod
    def forward(ctx: Any, entry: _Entry, anchor: Any) -> Any:
        entry.forward.replay()
        entry.owner.pending = entry
        ctx.entry = entry
        return entry.hidden.clone()

    @staticmethod
    def backward(ctx: Any, grad: Any) -> tuple:
        entry = ctx.entry
        entry.grad.copy_(grad)
        entry.owner.attach_grads()
        entry.backward.replay()
        entry.owner.pending = None
        return None, None
