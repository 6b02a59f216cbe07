"""Training steps whose model runs as CUDA graphs and whose host never waits for the GPU (``speed.graphs``).

A small unpacked micro-batch (~5.6k tokens of gsm8k) leaves an H200 waiting on the host: the step launches
~4,100 kernels (every LoRA linear is a handful forward and backward) and the host needs ~0.2 s for what the GPU
runs in ~0.1 s (``benchmarks/RESULTS.md``, rounds 4-6). Here the model's forward, TRL's fused LM head included,
is captured, eagerly, without compilation, as two CUDA graphs, one for the forward and one for the backward, and
each later micro-batch of the same shape replays them; and the step reads nothing back from the GPU, so the host
queues the next step's work while the GPU runs this one.

- **Shapes**: a graph holds fixed shapes, so the padding-free collator's micro-batches are padded up to a
  multiple of :data:`GRAPH_BUCKET` tokens (:class:`BucketedCollator`): one extra row of pad tokens carrying no
  loss (``-100`` labels, positions from 0, its own causal block, not counted as seen tokens) and the row
  boundaries ``cu_seq_lens`` filled up to a multiple of :data:`GRAPH_SLOTS` entries with empty rows. Each bucket
  runs eagerly the first time it is seen, then is captured once (a warm-up on a side stream, then the capture)
  and replayed from then on. All buckets share one memory pool (their replays never overlap).
- **The head**: TRL's fused head scores only the labelled positions (``hidden[mask]``, a shape known only on
  the GPU); inside a graph it scores every position instead (TRL's own path for devices without Triton) and
  zeroes the unlabelled ones: the same log-probabilities, entropy and accuracy per labelled token, for the
  head's work on the prompt tokens too.
- **Gradients**: the backward graph adds into each trainable parameter's ``.grad``, which must therefore stay
  at one address: the parameters get fixed gradient buffers, zeroed (or filled with an eager micro-batch's
  gradient) before each replay, so a trainer's ``zero_grad(set_to_none=True)`` and gradient accumulation work as
  with eager steps. Only the log-probabilities carry a gradient (the entropy and accuracy are metrics).
- **No reads back**: TRL's loss of the default path (``loss_type="nll"``, no ``compute_loss_func``) is computed
  the same way, but its per-step metrics (entropy, token accuracy) are kept on the GPU and averaged when the
  trainer logs, and the tokens seen are counted on the host when the micro-batch is collated (``num_tokens``:
  the real rows' tokens; ``num_input_tokens_seen``: their non-pad tokens, as the trainer counts them);
  batches are copied to the GPU without waiting (pinned memory, ``accelerator_config.non_blocking``).
- **What stays eager**: the first micro-batch of each bucket, a micro-batch with an attention mask (not
  padding-free), gradient checkpointing (it replays the forward with saved RNG state), MoE router losses, a
  forward that comes before the previous replay's backward (the buckets' activations share one pool), and,
  once a capture has failed (a warning says so), every call. Evaluation replays forward-only graphs of its own buckets.

The numbers: the loss, the gradients and the rows of each step are the eager path's, up to bf16 rounding; with
LoRA dropout on, each replay draws new masks from the same generator (its draws differ from eager's).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["GRAPH_BUCKET", "GRAPH_SLOTS", "TOKENS_KEY", "BucketedCollator", "GraphedModel", "bucket_batch",
           "install"]

GRAPH_BUCKET = 1024  # a micro-batch's tokens are padded up to a multiple of this (one capture per multiple)
GRAPH_SLOTS = 32  # ... and its row boundaries (cu_seq_lens) up to a multiple of this many entries
TOKENS_KEY = "num_tokens_collated"  # (real tokens, non-pad tokens) of a bucketed micro-batch, host ints


class BucketedCollator:
    """A padding-free collator whose micro-batches come in few shapes (see the module's docstring); the loss,
    its token count and the tokens seen are those of the real rows."""

    def __init__(self, collator: Any, bucket: int = GRAPH_BUCKET, slots: int = GRAPH_SLOTS) -> None:
        self.collator, self.bucket, self.slots = collator, bucket, slots

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collator, name)

    def __call__(self, examples: list) -> dict:
        batch = self.collator(examples)
        ids = batch.get("input_ids")
        counts = None
        if torch.is_tensor(ids) and ids.dim() == 2:
            counts = (ids.numel(), int((ids != self.collator.pad_token_id).sum()))
        out = bucket_batch(batch, self.collator.pad_token_id, self.bucket, self.slots)
        if counts is not None:
            out[TOKENS_KEY] = counts
        return out


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


def install(trainer: Any) -> GraphedModel | None:
    """Pad the trainer's micro-batches into buckets, replay its model's forward as CUDA graphs and take the
    host's reads of the GPU out of its steps; None (and nothing changed) when the model has no separate
    backbone to capture."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        log.info("speed.graphs: %s has no backbone apart from its head; steps run eagerly", type(base).__name__)
        return None
    trainer.data_collator = BucketedCollator(trainer.data_collator)
    _defer_reads(trainer)
    trainer.graphed = GraphedModel(backbone, base)  # batch=auto's probe runs a bucket until it replays
    return trainer.graphed


_KEYS_WITHOUT_GRAPHS = ("attention_mask", "inputs_embeds", "past_key_values", "output_attentions",
                        "output_hidden_states", "output_router_logits", "shift_labels")


@contextlib.contextmanager
def _every_position_scored():
    """TRL's fused head scoring every position (fixed shapes) instead of the labelled ones (``hidden[mask]``,
    which reads the mask's count back from the GPU and cannot be captured)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield
        return
    before = getattr(trl_utils, "_use_triton", None)
    if before is None:  # another TRL: a capture that reads back fails, and the model then runs eagerly
        yield
        return
    trl_utils._use_triton = lambda device: False
    try:
        yield
    finally:
        trl_utils._use_triton = before


class GraphedModel:
    """Replaces the backbone's ``forward`` and, where TRL added its fused LM head, the model's: a training or
    evaluation forward of a bucketed padding-free micro-batch replays the captured graphs of its shape (the
    backbone with the head for ``fused_lm_head=True`` calls, the backbone alone otherwise); every other call
    runs the model's own forward."""

    def __init__(self, backbone: Any, model: Any = None) -> None:
        self.backbone = backbone
        self.eager = backbone.forward
        # every trainable parameter a captured backward may reach: the head's too when it trains (full
        # fine-tuning of an untied head), whose gradient must then also land in a fixed buffer
        self.params = [p for p in (model if model is not None else backbone).parameters() if p.requires_grad]
        self.grads: list | None = None
        self.entries: dict = {}
        self.seen: set = set()
        self.pool = None
        self.anchor = None
        self.replays = 0
        self.pending: _Entry | None = None  # the replayed forward whose backward is still to come
        self.inside = False  # the model's forward is running the backbone itself (eagerly or capturing)
        self.failed = False  # a capture failed: everything runs eagerly
        backbone.forward = self.forward
        self.fused = None
        code = getattr(getattr(model.forward, "__func__", None), "__code__", None) if model is not None else None
        if code is not None and "fused_lm_head" in code.co_varnames:  # TRL's fused LM head
            self.fused = model.forward
            model.forward = self.model_forward

    def key(self, site: str, args: tuple, kwargs: dict) -> tuple | None:
        """The shape signature of a call the graphs can serve, None for one they cannot."""
        ids = kwargs.get("input_ids")
        grad = torch.is_grad_enabled()
        if (args or (grad and not self.params) or getattr(self.backbone, "gradient_checkpointing", False)
                or (site == "backbone" and not (grad and self.backbone.training))
                or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _KEYS_WITHOUT_GRAPHS)
                or not torch.is_tensor(ids) or not ids.is_cuda or ids.dim() != 2 or ids.shape[0] != 1
                or kwargs.get("use_cache") or not torch.is_tensor(kwargs.get("cu_seq_lens_q"))):
            return None
        sig = [site, grad, self.backbone.training]
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
        if self.inside:
            return self.eager(*args, **kwargs)
        entry = self.entry(self.key("backbone", args, kwargs), kwargs)
        if entry is None:
            return self.eager(*args, **kwargs)
        return entry.output_type(last_hidden_state=self.replay(entry, kwargs))

    def model_forward(self, *args: Any, fused_lm_head: bool = False, labels: Any = None,
                      num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        kwargs.pop(TOKENS_KEY, None)
        if not fused_lm_head or labels is None:
            return self.fused(*args, fused_lm_head=fused_lm_head, labels=labels,
                              num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        entry = self.entry(self.key("head", args, {**kwargs, "labels": labels}), {**kwargs, "labels": labels})
        if entry is None:
            self.inside = True
            try:
                return self.fused(*args, fused_lm_head=True, labels=labels, num_items_in_batch=num_items_in_batch,
                                  **kwargs)
            finally:
                self.inside = False
        log_probs = self.replay(entry, {**kwargs, "labels": labels})
        fields = {name: value.clone() for name, value in entry.extra.items()}
        mask = fields["label_mask"]
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return entry.output_type(loss=-log_probs.sum() / count, log_probs=log_probs, **fields)

    def entry(self, key: tuple | None, kwargs: dict) -> Any:
        """The bucket's captured graphs; None where this call runs eagerly."""
        if key is None or self.failed:
            return None
        entry = self.entries.get(key)
        if entry is None:
            if key not in self.seen:  # its first micro-batch runs eagerly (and warms up its kernels)
                self.seen.add(key)
                return None
            entry = self.capture(key, kwargs)
            if entry is None:
                return None
            self.entries[key] = entry
        if self.pending is not None:
            # a replay whose backward has not run yet keeps its activations in the shared pool, which this
            # replay would overwrite (two forwards before their backwards): run this one eagerly
            return None
        return entry

    def replay(self, entry: _Entry, kwargs: dict) -> Any:
        for name, value in kwargs.items():
            if name in entry.inputs:
                entry.inputs[name].copy_(value, non_blocking=True)
        self.replays += 1
        if entry.backward is None:  # no gradient (evaluation)
            entry.forward.replay()
            return entry.output.clone()
        return _Replay.apply(entry, self.anchor)

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

    def capture(self, key: tuple, kwargs: dict) -> _Entry | None:
        """The bucket's captured graphs; None (and a warning) when the capture fails, e.g. on an op that waits
        for the GPU: the model then runs eagerly from this call on, instead of failing the trial (an op that
        cannot be captured fails every bucket's capture alike)."""
        try:
            return self._capture(key[0], kwargs)
        except RuntimeError as e:  # torch.AcceleratorError is one
            torch.cuda.synchronize()
            self.failed = True
            self.entries.clear()  # no replay from now on: the earlier buckets' graphs and their pool go
            _end_rng_capture(kwargs["input_ids"].device)
            log.warning("speed.graphs: the %s could not be captured for %s tokens (%s); it runs eagerly from now "
                        "on", "backbone" if key[0] == "backbone" else "model",
                        tuple(kwargs["input_ids"].shape)[1], str(e).splitlines()[0])
            return None
        finally:
            self.inside = False

    def _run(self, site: str, static: dict) -> tuple:
        """One eager call of the site: (the output that carries the gradient, the other tensors, output type)."""
        if site == "backbone":
            result = self.eager(**static)
            return result.last_hidden_state, {}, type(result)
        self.inside = True
        with _every_position_scored():
            result = self.fused(**static, fused_lm_head=True)
        self.inside = False
        extra = {name: value for name, value in result.items()
                 if name not in ("loss", "log_probs") and torch.is_tensor(value)}
        return result.log_probs, extra, type(result)

    def _capture(self, site: str, kwargs: dict) -> _Entry:
        device = kwargs["input_ids"].device
        grad = torch.is_grad_enabled()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if grad and self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
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
                out = self._run(site, static)[0]
            if grad:
                torch.autograd.grad(out, self.params, torch.ones_like(out), allow_unused=True)
        torch.cuda.current_stream(device).wait_stream(side)
        del out
        if grad:
            self.attach_grads()  # the backward graph adds into these addresses
        forward = torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward, pool=self.pool, capture_error_mode="thread_local"):
            with torch.autocast(**half):
                output, extra, output_type = self._run(site, static)
        backward = grad_in = None
        if grad:
            backward, grad_in = torch.cuda.CUDAGraph(), torch.empty_like(output)
            with torch.cuda.graph(backward, pool=self.pool, capture_error_mode="thread_local"):
                torch.autograd.backward(output, grad_in)
        log.info("speed.graphs: captured the %s's %s for %s tokens (%d captured)",
                 "backbone" if site == "backbone" else "model",
                 "forward and backward" if grad else "forward (no gradient)",
                 tuple(kwargs["input_ids"].shape)[1], len(self.entries) + 1)
        return _Entry(self, inputs, forward, backward, output.detach(), grad_in,
                      {k: v.detach() for k, v in extra.items()}, output_type)


def _end_rng_capture(device: torch.device) -> None:
    """A capture that failed part-way leaves CUDA's random generator marked as capturing (the capture's end, which
    clears the mark, never ran), and every later random op (dropout) would fail: the generator gets a copy of its
    state, seed and offset, that is not marked."""
    generator = torch.cuda.default_generators[device.index if device.index is not None else
                                              torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())


class _Entry:
    """One bucket's graphs, their static inputs, outputs and output gradient."""

    def __init__(self, owner: GraphedModel, inputs: dict, forward: Any, backward: Any, output: Any, grad: Any,
                 extra: dict, output_type: type) -> None:
        self.owner, self.inputs, self.forward, self.backward = owner, inputs, forward, backward
        self.output, self.grad, self.extra, self.output_type = output, grad, extra, output_type


class _Replay(torch.autograd.Function):
    """A forward graph as an autograd op whose backward replays the backward graph (which adds the
    parameters' gradients into their ``.grad`` buffers itself)."""

    @staticmethod
    def forward(ctx: Any, entry: _Entry, anchor: Any) -> Any:
        entry.forward.replay()
        entry.owner.pending = entry
        ctx.entry = entry
        return entry.output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Any) -> tuple:
        entry = ctx.entry
        entry.grad.copy_(grad)
        entry.owner.attach_grads()
        entry.backward.replay()
        entry.owner.pending = None
        return None, None


def _defer_reads(trainer: Any) -> None:
    """TRL's loss of the default path, with its per-micro-batch metrics kept on the GPU until the trainer logs
    and the tokens seen taken from the collator's host counts (:data:`TOKENS_KEY`): a step that never waits for
    the GPU. Every other loss (``compute_loss_func``, label smoothing, DFT, MoE router losses, several
    processes, outputs asked for) is TRL's own."""
    compute_loss, track, log_metrics = trainer.compute_loss, trainer._track_num_input_tokens, trainer.log

    def fast_compute_loss(model: Any, inputs: dict, return_outputs: bool = False,
                          num_items_in_batch: Any = None) -> Any:
        counts = inputs.pop(TOKENS_KEY, None)
        t = trainer
        if (return_outputs or getattr(t, "compute_loss_func", None) is not None
                or getattr(t, "label_smoother", None) is not None or getattr(t.args, "loss_type", "nll") != "nll"
                or getattr(t, "aux_loss_enabled", False) or t.accelerator.num_processes != 1
                or not hasattr(t, "_metrics") or "labels" not in inputs):
            return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        mode = "train" if t.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        valid = outputs.label_mask.sum()
        num_tokens = valid if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        for name, per_token in (("entropy", outputs.entropy), ("mean_token_accuracy", outputs.is_top1)):
            if per_token is not None:
                t._metrics[mode][name].append(per_token.detach().sum() / valid.clamp(min=1))
        if mode == "train":
            t._total_train_tokens += counts[0] if counts else inputs["input_ids"].numel()
        t._metrics[mode]["num_tokens"] = [t._total_train_tokens]
        return loss

    def track_num_input_tokens(inputs: dict) -> None:
        counts = inputs.get(TOKENS_KEY)
        how = trainer.args.include_num_input_tokens_seen
        if counts is None or how in ("no", False):
            return track(inputs)
        trainer.state.num_input_tokens_seen += counts[1] if how == "non_padding" else counts[0]

    def log(logs: dict, *args: Any, **kwargs: Any) -> None:
        _read_metrics(trainer._metrics)
        return log_metrics(logs, *args, **kwargs)

    trainer.compute_loss = fast_compute_loss
    trainer._track_num_input_tokens = track_num_input_tokens
    trainer.log = log


def _read_metrics(metrics: dict) -> None:
    """The metrics kept on the GPU as host floats, read back in one go."""
    where = [(values, i) for per_mode in metrics.values() for values in per_mode.values()
             for i, v in enumerate(values) if torch.is_tensor(v)]
    if not where:
        return
    read = torch.stack([values[i].float() for values, i in where]).tolist()
    for (values, i), value in zip(where, read):
        values[i] = value
