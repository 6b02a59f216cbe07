"""Measure peak GPU memory of real training steps and compare with ``sweeper.memory.estimate``.

Builds a Qwen2.5-1.5B-shaped model from a ``Qwen2Config`` with random weights (nothing is downloaded),
saves it once to a temporary folder and loads it back the way ``sweeper.model.load`` does (bf16 weights,
SDPA attention; QLoRA through ``BitsAndBytesConfig`` nf4 + double quant, bf16 compute). Then, per
configuration, it runs warm-up steps, resets the peak statistics and runs measured steps of a plain
transformers-style loop: bf16 autocast forward with ``labels`` (the model's own loss), ``loss.backward()``,
``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. Full fine-tuning trains the bf16 weights
directly (the project loads bf16 weights for compute=bf16, so there is no fp32 master copy).

Needs a CUDA GPU, torch, transformers, peft (and bitsandbytes for QLoRA). Run from the repo root:

    python benchmarks/vram.py [--micro-batches 1 4 8] [--seq-len 1024] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from sweeper import memory  # noqa: E402

GIB = 2**30
QWEN25_15B = dict(
    model_type="qwen2",
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)


def build_checkpoint(folder: str, cfg: dict) -> None:
    config = Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def load(folder: str, method: str, r: int, gc_on: bool):
    kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cuda")
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        )
        if gc_on:
            model.enable_input_require_grads()  # as TRL does for PEFT + gradient checkpointing
        if method == "qlora":  # as TRL's SFTTrainer does for quantized models
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    model.train()
    return model


def make_optimizer(params, optim: str):
    if optim == "adamw_torch":  # transformers: torch.optim.AdamW, foreach on CUDA
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    if optim == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    if optim in ("adamw_8bit", "adamw_bnb_8bit"):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    raise ValueError(f"optim must be one of ['adamw_torch', 'adamw_torch_fused', 'adamw_8bit'], but got {optim!r}")


def saved_bytes(model, ids) -> int:
    """Bytes autograd saves for backward in one forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen.setdefault(s.data_ptr(), s.nbytes())
        except Exception:  # noqa: BLE001 - e.g. tensor subclasses without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def run_one(folder, method, optim, mb, seq, r, gc_on, warmup, steps, vocab):
    model = load(folder, method, r, gc_on)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim)
    ids = torch.randint(0, vocab, (mb, seq), device="cuda")
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    saved = saved_bytes(model, ids)  # the model, optimizer and batch go with this frame (step() closes over them)
    return dict(static=static / GIB, peak=peak / GIB, reserved=reserved / GIB, saved=saved / GIB, step_s=dt)


def dump_saved(folder_unused: str, out: str) -> None:
    """List every tensor autograd saves in one forward of a 2-layer model of the same width (diagnostic)."""
    cfg = dict(QWEN25_15B, num_hidden_layers=2)
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(folder, cfg)
        for method in ("full", "lora", "qlora"):
            model = load(folder, method, 16, False)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            seen: dict[int, tuple] = {}

            def pack(t):
                s = t.untyped_storage()
                if s.data_ptr() not in params and s.data_ptr() not in seen:
                    seen[s.data_ptr()] = (tuple(t.shape), str(t.dtype), s.nbytes(), t.grad_fn is not None)
                return t

            ids = torch.randint(0, cfg["vocab_size"], (1, 1024), device="cuda")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            lines.append(f"== {method}: {sum(v[2] for v in seen.values())} bytes")
            lines += [repr(v) for v in seen.values()]
            del loss, model
            gc.collect()
            torch.cuda.empty_cache()
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def table(records: list[dict], args, cmd: str, device: str, versions: str) -> str:
    cfg = dict(QWEN25_15B)
    rows = []
    for rec in records:
        method, mb, gc_on, m = rec["method"], rec["micro_batch"], rec["gc"], rec["measured"]
        est = memory.estimate(
            cfg, method=method, compute="bf16", optim=args.optim, activation_checkpointing=gc_on,
            micro_batch=mb, seq_len=args.seq_len, lora_r=16,
        )
        rec["estimate"] = est.parts()
        name = f"{method}{' +ckpt' if gc_on else ''}"
        if m is None:
            rows.append(f"| {name} | {mb} | {est.allocated_gib:.2f} | OOM | – | – | {est.total_gib:.2f} | – | – |")
            continue
        err = (est.allocated_gib - m["peak"]) / m["peak"] * 100
        rows.append(
            f"| {name} | {mb} | {est.allocated_gib:.2f} | {m['peak']:.2f} | {err:+.1f}% | {m['reserved']:.2f} "
            f"| {est.total_gib:.2f} | {m['static']:.2f} / {est.weights_gib + est.adapters_gib + est.optimizer_gib:.2f} "
            f"| {m['saved']:.2f} / {est.activations_gib:.2f} |"
        )
    header = [
        "## VRAM estimate vs measured",
        "",
        f"- device: {device}; {versions}",
        f"- command: `{cmd}`",
        f"- model: Qwen2.5-1.5B shape ({memory.count_params(cfg) / 1e9:.3f}B params, random init), seq_len "
        f"{args.seq_len}, optim {args.optim}, bf16 autocast, LoRA r16 alpha32 dropout0.05 on all block linears, "
        f"{args.warmup} warm-up + {args.steps} measured steps, each configuration in its own process",
        "- est alloc = `estimate(...).allocated_gib` (modelled peak, no overhead); measured = "
        "`torch.cuda.max_memory_allocated()` over the measured steps; err = (est - measured) / measured; "
        "est total adds the 0.5 GiB CUDA context + 5% fragmentation allowance (compare with reserved + context)",
        "- static = allocated before a step (weights + adapters + optimizer states), measured / estimated; "
        "saved = bytes autograd saved in one forward (saved_tensors_hooks, unique storages), measured / "
        "estimated activations",
        "",
        "| config | micro-batch | est alloc GiB | measured peak alloc GiB | err | measured reserved GiB | est total GiB | static GiB meas / est | saved acts GiB meas / est |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora", "full"])
    ap.add_argument("--optim", default="adamw_torch")
    ap.add_argument("--extra-gc", action="store_true", help="also run lora and full with gradient checkpointing at the largest micro-batch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    ap.add_argument("--json", default=None, help="also write the raw measurements here")
    ap.add_argument("--from-json", default=None, help="re-tabulate a --json file with the current estimator")
    ap.add_argument("--dump-saved", default=None, help="write a listing of saved tensors (2-layer model) here")
    ap.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.from_json:  # re-tabulate recorded measurements with the current estimator (no GPU needed)
        with open(args.from_json) as f:
            saved = json.load(f)
        text = table(saved["records"], args, saved["command"], saved["device"], saved["versions"])
        print(text)
        with open(args.out, "w") as f:
            f.write(text)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/vram.py needs a CUDA GPU; none is visible")
    if args.one:  # child process: one configuration, JSON on the last line
        method, mb, gc_on = args.one[0], int(args.one[1]), args.one[2] == "1"
        try:
            m = run_one(args.folder, method, args.optim, mb, args.seq_len, 16, gc_on, args.warmup, args.steps,
                        QWEN25_15B["vocab_size"])
        except torch.cuda.OutOfMemoryError:
            m = None
        print(json.dumps(m))
        return
    if args.dump_saved:
        dump_saved("", args.dump_saved)
    runs = [(m, mb, False) for m in args.methods for mb in args.micro_batches]
    if args.extra_gc:
        runs += [(m, max(args.micro_batches), True) for m in ("lora", "full") if m in args.methods]
    records = []
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(folder, dict(QWEN25_15B))
        for method, mb, gc_on in runs:
            child = [sys.executable, os.path.abspath(__file__), "--one", method, str(mb), "1" if gc_on else "0",
                     "--folder", folder, "--optim", args.optim, "--seq-len", str(args.seq_len),
                     "--warmup", str(args.warmup), "--steps", str(args.steps)]
            proc = subprocess.run(child, capture_output=True, text=True)
            try:
                m = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                sys.exit(f"child {child} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
            records.append(dict(method=method, micro_batch=mb, gc=gc_on, measured=m))
            print(method, mb, gc_on, m, flush=True)
    cmd = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    device = torch.cuda.get_device_name(0)
    versions = (f"date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
                f"transformers {transformers.__version__}")
    text = table(records, args, cmd, device, versions)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(records=records, command=cmd, device=device, versions=versions), f, indent=1)


if __name__ == "__main__":
    main()
