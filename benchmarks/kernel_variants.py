"""Which kernels pay off: one packed LoRA step of a 1.5B-shaped Qwen2 under each attention/kernel choice.

    python3 benchmarks/kernel_variants.py        # one CUDA GPU; ~3 minutes on an H100

A bare training loop (no Trainer) over synthetic packed micro-batches (BFD-style rows of up to 1,024
tokens, document lengths lognormal around 200), TRL's fused LM head for the loss, LoRA r16 on all
linear layers, bf16 autocast. Prints one JSON line per variant: real tokens/s, s/step, tokens/step,
peak GiB. It chose the defaults of ``speed=auto`` (sweeper/speed.py); figures in benchmarks/RESULTS.md.
The varlen attention here is the same function as ``sweeper.speed.varlen_attention``.
"""
import math, os, sys, time, json
import torch
print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
import transformers, peft, trl
print("transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, flush=True)
try:
    import torch.nn.attention.varlen as vl, inspect
    print("varlen_attn:", inspect.signature(vl.varlen_attn), flush=True)
except Exception as e:
    print("no varlen", e)
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sweeper.speed import register_varlen  # noqa: E402

register_varlen()

cfg = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=2048)
torch.manual_seed(0)
t0 = time.time()
with torch.device("cuda"):
    base = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
print(f"model built {time.time()-t0:.1f}s params {sum(p.numel() for p in base.parameters())/1e9:.3f}B", flush=True)
base.save_pretrained("/tmp/m15"); del base; torch.cuda.empty_cache()

import random
rng = random.Random(0)
def docs(n):
    return [min(1024, max(8, int(rng.lognormvariate(math.log(200), 0.8)))) for _ in range(n)]
def packed_batch(micro):
    # BFD-ish: fill rows of 1024 with docs
    pool = docs(micro * 12)
    pool.sort(reverse=True)
    bins = []
    for L in pool:
        for bn in bins:
            if sum(bn) + L <= 1024:
                bn.append(L); break
        else:
            bins.append([L])
    bins = bins[:micro]
    seqs = [L for bn in bins for L in bn]
    T = sum(seqs)
    ids = torch.randint(0, 5000, (1, T))
    pos = torch.cat([torch.arange(L) for L in seqs])[None]
    cu = torch.tensor([0] + list(torch.tensor(seqs).cumsum(0)), dtype=torch.int32)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max(seqs), "max_length_k": max(seqs)}, T

from peft import LoraConfig, get_peft_model
from trl.trainer.utils import add_fused_lm_head

def run(name, attn, liger, micro, accum, fused, compile_=False, steps=6, warm=2):
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    m = Qwen2ForCausalLM.from_pretrained("/tmp/m15", dtype=torch.bfloat16, attn_implementation=attn).cuda()
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=fused)
    fwd = m
    if compile_:
        fwd = torch.compile(m)
    batches = [packed_batch(micro) for _ in range(accum * (steps + warm))]
    torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
    times = []; toks = 0; bi = 0
    try:
        for s in range(steps + warm):
            t0 = time.perf_counter(); n = 0
            for a in range(accum):
                b, T = batches[bi]; bi += 1; n += T
                b = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in b.items()}
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = fwd(**b, fused_lm_head=True)
                    loss = -out.log_probs.sum() / out.label_mask.sum()
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(); opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(); dt = time.perf_counter() - t0
            if s >= warm:
                times.append(dt); toks += n
            else:
                print(f"  {name} warm step {s}: {dt:.2f}s", flush=True)
        r = {"name": name, "tok_s": toks / sum(times), "s_step": sum(times) / len(times), "tok_step": toks / len(times),
             "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}
    except torch.OutOfMemoryError:
        r = {"name": name, "oom": True}
    print(json.dumps(r), flush=True)
    del m, opt, fwd; torch.cuda.empty_cache()
    return r

res = []
res.append(run("sdpa micro8x2", "sdpa", False, 8, 2, False))
res.append(run("sdpa+liger micro8x2", "sdpa", True, 8, 2, False))
res.append(run("varlen+liger micro8x2", "sft_varlen", True, 8, 2, False))
res.append(run("varlen+liger micro16x1 fused", "sft_varlen", True, 16, 1, True))
res.append(run("varlen+liger micro8x2 fused", "sft_varlen", True, 8, 2, True))
res.append(run("varlen+liger micro16x1 fused compile", "sft_varlen", True, 16, 1, True, compile_=True, steps=6, warm=3))
print("DONE", flush=True)
