"""batch=auto on a real GPU: does the fitted micro-batch use the free memory, and never OOM?

    python benchmarks/batch_auto.py --work /tmp/batch_auto --out /tmp/batch_auto.md   # on a CUDA machine

Builds a Qwen2.5-1.5B-shaped model (random init, bf16; the offline tiny tokenizer, so nothing is
downloaded), then runs the real trial path (`python train.py -m ... batch=auto`) on banking77 with
packing at 1024 tokens, so every micro-batch is full length. Scenarios: LoRA and full fine-tuning on
a free GPU, and LoRA while another process holds 40 GiB (the shared box). For each it records the
micro-batch chosen, the estimate, the probe's peak, the training peak, and the share of the free
memory the training peak used.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIOS = [
    ("LoRA, free GPU", ["peft=lora", "lr=lora"], 0),
    ("LoRA, 40 GiB held by another process", ["peft=lora", "lr=lora"], 40),
    ("full fine-tuning, free GPU", ["peft=none", "lr=full"], 0),
]


def build_model(dest: Path, cache: Path) -> None:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from sweeper.model import build_tiny

    tok = AutoTokenizer.from_pretrained(build_tiny(OmegaConf.load(ROOT / "conf/model/tiny.yaml").tiny, cache))
    shape = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/qwen2.5-1.5b.yaml").shape)
    config = Qwen2Config(**shape, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    del model
    torch.cuda.empty_cache()


def hold(gib: int) -> subprocess.Popen:
    code = ("import torch,sys,time; x=torch.empty(int(%d*2**30),dtype=torch.uint8,device='cuda'); "
            "print('held',flush=True); time.sleep(3600)") % gib
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=ROOT / ".data" / "banking77.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", type=int, default=48, help="batch.auto.target_effective_batch")
    a = ap.parse_args()
    import optuna
    import torch
    import transformers

    a.work.mkdir(parents=True, exist_ok=True)
    model_dir = a.work / "q15"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, a.work / "cache")
    storage = f"sqlite:///{a.work}/optuna.db"
    rows = []
    for i, (name, extra, held_gib) in enumerate(SCENARIOS):
        neighbour = hold(held_gib) if held_gib else None
        try:
            cmd = [sys.executable, str(ROOT / "train.py"), "-m", "seed=42", "model=qwen2.5-1.5b",
                   f"model.path={model_dir}", "model.name=q15", "data=banking77", f"data.train_path={a.data}",
                   "data.packing=true", "data.max_length=1024", "batch=auto", f"batch.auto.target_effective_batch={a.target}",
                   f"batch.auto.max_micro_batch={a.target}", "schedule.max_steps=6", "eval.eval_steps=6",
                   "eval.save_best=false", "report_to=none", f"paths.output_dir={a.work}",
                   f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name=auto{a.target}-{i}", *extra]
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**__import__("os").environ, "TQDM_DISABLE": "1"})
            wall = time.time() - t0
        finally:
            if neighbour:
                neighbour.kill()
                neighbour.wait()
        if proc.returncode != 0:
            print(proc.stderr[-4000:])
        [t] = optuna.load_study(study_name=f"auto{a.target}-{i}", storage=storage).trials
        u, b = t.user_attrs, t.user_attrs.get("batch_auto") or {}
        used = u.get("peak_gpu_gib")
        probes = ", ".join(f"{p['micro_batch']}: {p.get('with_states_gib', p['peak_gib'])}" for p in b.get("probes", []))
        rows.append(
            f"| {name} | {t.state.name} | {b.get('free_gib')} | {b.get('budget_gib')} | "
            f"{b.get('estimate_micro_batch')} ({b.get('estimate_gib')} GiB) | {probes} | {u.get('micro_batch')} x "
            f"{u.get('grad_accum')} | {used} | {used / b['free_gib']:.0%} | {len(u.get('oom_retries') or [])} | {wall:.0f} s |"
            if used and b.get("free_gib") else f"| {name} | {t.state.name} | {u.get('error', '')[:300]} |")
    header = [
        f"### target effective batch {a.target}",
        "",
        f"Device: {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Qwen2.5-1.5B-shaped model (random init, bf16), banking77 packed "
        f"to 1024 tokens, target effective batch {a.target}, memory_fraction 0.9, 6 optimizer steps each.",
        "",
        f"Command: `python benchmarks/batch_auto.py --work /tmp/batch_auto --out $OUT/batch_auto.md --target {a.target}` "
        "(on the device, after installing the wheels the README lists)",
        "",
        "| scenario | state | free GiB | budget GiB | estimate's micro-batch | probes (micro: peak + states GiB) "
        "| chosen micro x accum | training peak GiB | training peak / free | OOM retries | wall |",
        "|---|---|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    text = "\n".join(header + rows) + "\n"
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
