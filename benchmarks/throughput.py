"""Throughput of plain TRL against our trial path, on one GPU, same model, data and effective batch.

    # CPU, toy scale: every code path end to end (tiny model, fp32, no Liger), ~3 minutes on 2 cores
    python benchmarks/throughput.py --smoke --out /tmp/tp-smoke --learning-check --profile

    # one H100, from the repo root (wheels in /tmp/site, gsm8k copied to .data/gsm8k/): both workloads, three
    # arms, learning check on gsm8k; ~8-9 minutes (model build, 6 arms of 20 steps, (b)/(c) of gsm8k 40 steps)
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/throughput.py --out outputs/throughput --data-root .data \
        --learning-check --results $OUT/throughput.md --json $OUT/throughput.json

    # a lever that changes numerics: (b) and (c) with it, three seeds each, the check on their mean eval losses
    python3 benchmarks/throughput.py --out outputs/throughput --arms c --workloads gsm8k --learning-check \
        --learning-repeats 3 --ours-overrides "speed.lora_fused=true"

    # our arm with extra overrides (e.g. the speed group), or the profile of arm (c), on their own
    python3 benchmarks/throughput.py --out outputs/throughput --arms c --workloads gsm8k --ours-overrides "speed=plain"
    python3 benchmarks/throughput.py --out outputs/throughput --arms c --workloads synthetic --profile

The model (``<out>/model``) is built once per ``--out`` and reused; every run writes under ``<out>/<run id>/``
and a ``partial.json`` (and ``--json``) after each arm, so a run cut short keeps what it measured.

Arms, each in its own subprocess (its own peak memory and caches; an OOM is recorded and the run goes on):

- (a) plain TRL, padded: ``SFTTrainer(model, args=SFTConfig(per_device_train_batch_size=8,
  gradient_accumulation_steps=2, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
  bf16=True, max_length=1024, packing=False, assistant_only_loss=True, activation_checkpointing=False,
  logging_steps=1, max_steps=N, report_to=[], seed=42), peft_config=LoraConfig(r=16, lora_alpha=32,
  lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))``, model in bf16 with SDPA.
  ``activation_checkpointing=False`` is set explicitly: TRL's default is True.
- (b) the same with ``packing=True`` (TRL: BFD packing + padding-free) and Liger's layer kernels applied
  before the model is loaded (``apply_liger_kernel_to_qwen2(rope, rms_norm, swiglu,
  fused_linear_cross_entropy=True)``; skipped with a note where there is no CUDA).
- (c) our trial path: ``python train.py -m ...`` on the same model directory and data, read back from the
  Optuna trial's user attrs, plus the wall time of the whole subprocess.

Both plain arms also set ``data_seed=0`` and load the JSONL shuffled with seed 0, as the trial path does, so
all arms see the rows in the same order (it changes nothing about speed).

Timing: every arm uses the trial path's step timer (``sweeper.speed.measurement_callbacks``, switched on by
``SFT_SWEEP_STEP_TIMES``): a timestamp at every optimizer step (``on_step_end``, after
``torch.cuda.synchronize()``) with the cumulative non-padding tokens fed
(``include_num_input_tokens_seen="non_padding"``). The first ``--warmup-steps`` steps are excluded. Where the
file is missing, (c)'s figures fall back to its attrs (tokens_seen / train_runtime, which include the warm-up
steps and the final evaluation).

Everything heavy is imported inside functions; the children are this file run as
``python benchmarks/throughput.py _worker <kind> <spec.json>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
H100_BF16_DENSE_TFLOPS = 989.0
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936)
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=None)  # None: the tokenizer's vocab rounded up to 64
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
ARM_NAMES = {"a": "(a) plain TRL, padded", "b": "(b) plain TRL, packing + Liger", "c": "(c) our trial path"}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S} +{time.time() - T0:5.0f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def make_synthetic(tok, n_rows: int, seed: int, median: int, cap: int, sigma: float = 0.6) -> list[dict]:
    """Rows whose total token length (chat template included) is lognormal with ``median``, capped at ``cap``;
    the user turn ~25% and the assistant ~75% of the content tokens. Text is random whole-word tokens of the
    tokenizer (``Ġword`` tokens, so decoding and re-encoding gives the same tokens)."""
    rng = random.Random(seed)
    words = sorted(t for t in tok.get_vocab() if t.startswith("Ġ") and len(t) > 1 and t[1:].isalpha())
    overhead = len(_chat_ids(tok, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]))
    rows = []
    for _ in range(n_rows):
        total = min(cap, max(overhead + 4, round(median * math.exp(sigma * rng.gauss(0.0, 1.0)))))
        content = total - overhead
        user = max(1, round(0.25 * content))
        text = [tok.convert_tokens_to_string([rng.choice(words) for _ in range(k)]) for k in (user, content - user)]
        rows.append({"messages": [{"role": "user", "content": text[0]}, {"role": "assistant", "content": text[1]}]})
    return rows


def length_stats(tok, rows: list[dict]) -> dict:
    """Realised token lengths (chat template applied) and the assistant's share of the content tokens."""
    lengths, shares = [], []
    for row in rows:
        lengths.append(len(_chat_ids(tok, row["messages"])))
        parts = [len(tok(m["content"])["input_ids"]) for m in row["messages"]]
        shares.append(parts[-1] / max(sum(parts), 1))
    lengths.sort()
    return {"rows": len(rows), "median": statistics.median(lengths), "p90": lengths[int(0.9 * (len(lengths) - 1))],
            "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
            "assistant_share": round(sum(shares) / len(shares), 3)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_workload(name: str, args, model_dir: Path, out: Path) -> dict:
    """Write ``<out>/data/<name>/{train,eval}.jsonl``: ``--eval-rows`` held-out rows, the rest trains."""
    d = out / "data" / name
    d.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(model_dir)
    if name == "synthetic":
        rows = make_synthetic(tok, args.rows + args.eval_rows, seed=0, median=args.synthetic_median,
                              cap=args.max_length)
        source = (f"synthetic: {args.rows} train + {args.eval_rows} eval rows, lognormal total length "
                  f"(median {args.synthetic_median}, sigma 0.6, cap {args.max_length}), random word tokens, seed 0")
    elif name == "gsm8k":
        path = _data_root(args) / "gsm8k" / "train.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"gsm8k: {path} not found; pass --data-root (the folder holding gsm8k/train.jsonl)")
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        random.Random(0).shuffle(rows)
        rows = rows[:args.rows + args.eval_rows]
        source = f"gsm8k train.jsonl ({path}): {len(rows) - args.eval_rows} train + {args.eval_rows} eval rows (seeded split)"
    else:
        raise ValueError(f"unknown workload {name!r}; choose synthetic or gsm8k")
    evals, train = rows[:args.eval_rows], rows[args.eval_rows:]
    _write_jsonl(d / "train.jsonl", train)
    _write_jsonl(d / "eval.jsonl", evals)
    stats = length_stats(tok, train)
    log(f"{name}: {source}; realised train tokens/row (tiny BPE tokenizer, template included): median "
        f"{stats['median']}, p90 {stats['p90']}, max {stats['max']}, mean {stats['mean']}, assistant share "
        f"{stats['assistant_share']:.0%}")
    return {"name": name, "source": source, "train": str(d / "train.jsonl"), "eval": str(d / "eval.jsonl"),
            "train_rows": len(train), "eval_rows": len(evals), "token_stats": stats}


def _data_root(args) -> Path:
    root = Path(args.data_root)
    if not root.is_absolute():
        root = (Path.cwd() / root).resolve()
    if not (root / "gsm8k").is_dir() and (ROOT / ".data" / "gsm8k").is_dir():
        return ROOT / ".data"  # the device machine's copy inside the repo
    return root


# ------------------------------------------------------------------------------------ child workers


def worker_build(spec: dict) -> dict:
    """Qwen2 model of the given shape (random init) + the offline tiny tokenizer, saved to spec['dest']."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from sweeper.model import build_tiny

    tok = AutoTokenizer.from_pretrained(str(build_tiny(OmegaConf.load(ROOT / "conf/model/tiny.yaml").tiny,
                                                       spec["cache"])))
    tok.model_max_length = spec["max_position_embeddings"]
    shape = dict(spec["shape"])
    if shape["vocab_size"] is None:
        shape["vocab_size"] = -(-len(tok) // 64) * 64
    assert shape["vocab_size"] >= len(tok)
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=spec["max_position_embeddings"],
                         rope_theta=1000000.0, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(spec["dest"])
    tok.save_pretrained(spec["dest"])
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "embedding_params": model.get_input_embeddings().weight.numel(),
            "vocab_size": shape["vocab_size"], "tokenizer_vocab": len(tok)}


def worker_matmul(spec: dict) -> dict:
    """Measured dense matmul rate: n^3 matmul (bf16 on CUDA, fp32 on CPU), mean of 10 after 3 warm-ups."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype = spec["n"], torch.bfloat16 if cuda else torch.float32
    dev = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    return {"n": n, "dtype": str(dtype), "mean_s": mean, "tflops": 2 * n**3 / mean / 1e12,
            "device": torch.cuda.get_device_name() if cuda else "CPU"}


def _apply_liger(wanted: bool) -> dict:
    """Liger's per-layer kernels, patched into transformers' Qwen2 module before the model is built. Where it
    cannot be applied (no CUDA, not installed, an error) arm (b) runs without it and says so."""
    import torch

    if not wanted:
        note = "Liger NOT applied: --no-liger (or a first attempt with Liger failed); arm (b) ran without it"
    elif not torch.cuda.is_available():
        note = "Liger NOT applied: no CUDA device (liger-kernel's Triton kernels need a GPU); arm (b) ran without it"
    else:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2  # lazy: not installed on CPU machines

            apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
            return {"applied": True, "note": "Liger applied: rope, rms_norm, swiglu, fused_linear_cross_entropy"}
        except Exception as e:  # noqa: BLE001 - recorded in the results, the arm goes on without Liger
            note = f"Liger NOT applied: {type(e).__name__}: {e}; arm (b) ran without it"
    print(note, flush=True)
    return {"applied": False, "note": note}


def _liger_check(model) -> dict:
    """Which Qwen2 pieces really run Liger code (a patch can silently not take, e.g. with hub kernels)."""
    from transformers.models.qwen2 import modeling_qwen2

    base = model.model
    return {"rms_norm": type(base.norm).__module__.startswith("liger"),
            "swiglu": type(base.layers[0].mlp).__module__.startswith("liger"),
            "rope": getattr(modeling_qwen2.apply_rotary_pos_emb, "__module__", "").startswith("liger"),
            # TRL 1.16 replaces the forward with its own fused LM head (chunked log-probs, no logits) and calls
            # the backbone directly, so Liger's fused linear cross-entropy forward is never reached in training
            "flce_forward_patched": type(model).forward.__module__.startswith("liger")}


def worker_arm(spec: dict) -> dict:
    """Arm (a) or (b): plain TRL on the prepared JSONL. Saves the adapter when spec['save_adapter']."""
    liger = _apply_liger(spec["liger"]) if spec["arm"] == "b" else None  # before any Qwen2 module is built
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sweeper.speed import measurement_callbacks  # the trial path's own step timer, so every arm is timed alike

    Path(spec["step_times"]).unlink(missing_ok=True)  # a re-run (b without Liger) starts a fresh file
    os.environ["SFT_SWEEP_STEP_TIMES"] = spec["step_times"]
    cuda = torch.cuda.is_available()
    cache = str(Path(spec["dir"]) / "cache" / "datasets")
    # the trial path loads the file, then shuffles with data.seed=0; do the same so every arm sees one order
    train = datasets.load_dataset("json", data_files=spec["train"], split="train", cache_dir=cache).shuffle(seed=0)
    evals = None
    if spec["evaluate"]:
        evals = datasets.load_dataset("json", data_files=spec["eval"], split="train", cache_dir=cache)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    result: dict = {"liger": liger}
    if liger and liger["applied"]:
        result["liger"]["check"] = _liger_check(model)
        print(f"liger check: {result['liger']['check']}", flush=True)
    args = SFTConfig(
        output_dir=str(Path(spec["dir"]) / "trainer"),
        per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec.get("learning_rate", 2e-4), lr_scheduler_type="cosine", warmup_steps=0.03,
        bf16=cuda, max_length=spec["max_length"], packing=spec["packing"], assistant_only_loss=True,
        activation_checkpointing=False,  # TRL's default is True; the comparison runs without it
        logging_steps=1, max_steps=spec["steps"], report_to=[], seed=spec.get("seed", 42),
        data_seed=0,  # as the trial path (data.seed), so the sampler's order matches
        include_num_input_tokens_seen="non_padding", save_strategy="no", disable_tqdm=True,
        use_cpu=not cuda, per_device_eval_batch_size=spec["micro_batch"],
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok,
                         peft_config=LoraConfig(**LORA), callbacks=measurement_callbacks())
    result["prepared_train_rows"] = len(trainer.train_dataset)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        output = trainer.train()
    except torch.OutOfMemoryError as e:
        return {**result, "status": "OOM", "error": str(e)[:500]}
    state = trainer.state
    result.update(
        status="COMPLETE", steps_trained=state.global_step, tokens_seen=int(state.num_input_tokens_seen),
        train_runtime_s=round(float(output.metrics["train_runtime"]), 2),
        peak_gpu_gib=round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
        train_curve=[[h["step"], h["loss"]] for h in state.log_history if "loss" in h],
        micro_batch=spec["micro_batch"], grad_accum=spec["grad_accum"])
    if spec["evaluate"]:
        result["eval_loss"] = float(trainer.evaluate()["eval_loss"])  # TRL's own eval loss, on the eval rows
    if spec["save_adapter"]:
        trainer.save_model(str(Path(spec["dir"]) / "adapter"))
        result["adapter"] = str(Path(spec["dir"]) / "adapter")
    return result


def worker_eval(spec: dict) -> dict:
    """The learning check's one evaluator: token-weighted mean NLL over the assistant tokens (the chat
    template's generation mask) of the held-out rows, unpacked, right-padded batches, on the base model alone
    and on the base model + each saved adapter. Bf16 weights under bf16 autocast on CUDA, fp32 on CPU."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    with open(spec["eval"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    examples = []
    for row in rows:
        enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"])[:spec["max_length"]], list(enc["assistant_masks"])[:spec["max_length"]]
        examples.append((ids, [i if m else -100 for i, m in zip(ids, mask)]))
    pad = tok.pad_token_id

    def evaluate(adapter: str | None) -> dict:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32,
                                                     attn_implementation="sdpa").to(dev)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        nll, count = 0.0, 0
        bs = spec["batch_size"]
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            for i in range(0, len(examples), bs):
                chunk = examples[i:i + bs]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk], device=dev)
                att = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk], device=dev)
                lab = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk], device=dev)
                logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
                target = lab[:, 1:]
                nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
                del logits
        del model
        if cuda:
            torch.cuda.empty_cache()
        return {"loss": nll / max(count, 1), "tokens": count, "adapter": adapter}

    return {"rows": len(examples), **{name: evaluate(path) for name, path in spec["adapters"].items()}}


WORKERS = {"build": worker_build, "matmul": worker_matmul, "arm": worker_arm, "eval": worker_eval}


def run_worker(kind: str, spec: dict, work: Path, timeout: float | None = None) -> dict:
    """Run one worker in a child process; returns its result, or {'status': 'OOM' | 'FAIL', ...}."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / f"{kind}.spec.json", work / f"{kind}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=1))
    result_path.unlink(missing_ok=True)
    logf = work / f"{kind}.log"
    t = time.perf_counter()
    with logf.open("w") as f:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_worker", kind, str(spec_path)],
                                  cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_child_env(), timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t
    text = logf.read_text(errors="replace")
    if rc == 0 and result_path.is_file():
        return {**json.loads(result_path.read_text()), "wall_s": round(wall, 1), "log": str(logf)}
    status = "OOM" if "out of memory" in text.lower() else "FAIL"
    tail = "\n".join(text.strip().splitlines()[-15:])
    log(f"{kind} child {status} (rc={rc}); log {logf}; tail:\n{tail}")
    return {"status": status, "error": tail[-800:], "wall_s": round(wall, 1), "log": str(logf)}


def _child_env() -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), str(ROOT)] if p)
    return env


def _worker_main(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[kind](spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------ arm (c)


def run_ours(args, workload: dict, model_dir: Path, arm_dir: Path, steps: int, *, save: bool, eval_rows: int,
             profile_dir: Path | None = None, tag: str = "c", extra: list[str] = (), seed: int = 42) -> dict:
    """Arm (c): ``python train.py -m ...`` as a subprocess; results from the Optuna trial's user attrs."""
    import optuna

    arm_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{args.out}/optuna.db"
    study = f"tp-{workload['name']}-{tag}-{RUN_ID}"
    step_times = arm_dir / "step_times.jsonl"
    step_times.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"seed={seed}", "model=qwen2.5-1.5b", f"model.path={model_dir}",
           "model.name=bench", "data=jsonl", f"data.train_path={workload['train']}",
           f"data.eval_path={workload['eval']}", f"data.max_eval_rows={eval_rows}",
           f"data.max_length={args.max_length}", f"data.packing={str(args.ours_packing).lower()}",
           f"batch.per_device_train_batch_size={args.micro_batch}",
           f"batch.gradient_accumulation_steps={args.grad_accum}",
           f"batch.per_device_eval_batch_size={args.micro_batch}", f"schedule.max_steps={steps}",
           f"eval.eval_steps={steps}", "eval.accuracy=off", f"eval.save_best={str(save).lower()}",
           "eval.logging_steps=1", "report_to=none", f"precision={'fp32' if args.smoke else 'bf16'}",
           f"paths.output_dir={arm_dir}", f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}",
           # one datasets cache for every (c) run of this benchmark, as for the trials of one sweep: the first
           # run tokenises and packs, later runs of the same data find it by fingerprint
           f"paths.cache_dir={args.out}/cache-ours", *extra, *shlex.split(args.ours_overrides)]
    env = dict(_child_env(), SFT_SWEEP_STEP_TIMES=str(step_times))
    if profile_dir is not None:
        env["SFT_SWEEP_PROFILE"] = str(profile_dir)
    logf = arm_dir / "train.log"
    t = time.perf_counter()
    with logf.open("w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t
    text = logf.read_text(errors="replace")
    base = {"wall_s": round(wall, 1), "log": str(logf), "command": shlex.join(cmd[1:]),
            "step_times": str(step_times) if step_times.is_file() else None}
    try:
        trials = optuna.load_study(study_name=study, storage=storage).trials
    except Exception as e:  # noqa: BLE001 - the study may not exist if the command failed at compose time
        trials, base["error"] = [], f"{type(e).__name__}: {e}"
    if proc.returncode != 0 or len(trials) != 1 or trials[0].state.name != "COMPLETE":
        u = trials[0].user_attrs if trials else {}
        err = u.get("error") or base.get("error") or "\n".join(text.strip().splitlines()[-15:])
        status = "OOM" if "out of memory" in str(err).lower() else "FAIL"
        log(f"arm (c) {status} (rc={proc.returncode}, state {trials[0].state.name if trials else None}); "
            f"log {logf}; {str(err)[-800:]}")
        return {**base, "status": status, "error": str(err)[-800:]}
    from sweeper.report import attrs

    u = attrs(trials[0])  # user attrs, and the plan kept as a system attr
    keep = ("tokens_seen", "train_runtime_s", "steps_trained", "peak_gpu_gib", "micro_batch", "grad_accum",
            "effective_batch", "oom_retries", "run_dir", "best_checkpoint", "plan", "precision", "timing", "speed",
            "batch_auto")
    curve = sorted(trials[0].intermediate_values.items())  # every evaluation the job reported, by step
    return {**base, "status": "COMPLETE", "value": trials[0].value, "eval_curve": curve, **{k: u.get(k) for k in keep}}


def print_profile(profile_dir: Path) -> str | None:
    """Top-15 CUDA-time ops from the key_averages table the trial path saves under SFT_SWEEP_PROFILE."""
    files = sorted(profile_dir.rglob("*.txt")) if profile_dir.is_dir() else []
    if not files:
        log(f"profile: no key_averages text file under {profile_dir} (the trial path does not honour "
            "SFT_SWEEP_PROFILE yet); nothing to print")
        return None
    lines = files[0].read_text(errors="replace").splitlines()
    # a torch.profiler table: separator, header, separator, rows..., separator, totals
    seps = [i for i, line in enumerate(lines) if line.startswith("---")]
    body = lines[:seps[1] + 1] + lines[seps[1] + 1:][:15] if len(seps) >= 2 else lines[:20]
    text = "\n".join(body)
    log(f"profile of arm (c) from {files[0]} (top 15 by CUDA time):\n{text}")
    return text


# ---------------------------------------------------------------------------------------- figures


def read_step_times(path: str | None) -> list[dict]:
    if not path or not Path(path).is_file():
        return []
    with open(path) as f:  # the optimizer steps' stamps (evaluation and save events left out)
        return [row for row in map(json.loads, filter(str.strip, f)) if "step" in row]


def steady_state(points: list[dict], warmup: int) -> dict | None:
    """Figures over the steps after ``warmup``: from the end of step ``warmup`` (or the last recorded step
    before it) to the last step."""
    points = sorted(points, key=lambda p: p["step"])
    start = [p for p in points if 1 <= p["step"] <= warmup]
    if not start or points[-1]["step"] <= start[-1]["step"]:
        return None
    s, e = start[-1], points[-1]
    steps, dt, tokens = e["step"] - s["step"], e["t"] - s["t"], e["tokens"] - s["tokens"]
    return {"timed_steps": steps, "tokens_per_s": tokens / dt, "tokens_per_step": tokens / steps,
            "s_per_step": dt / steps, "source": f"step times, steps {s['step'] + 1}-{e['step']}"}


def arm_figures(res: dict, warmup: int, n_params: dict, matmul_tflops: float | None) -> dict:
    """Throughput figures of one arm's result (steady state from step times, else the trial's attrs)."""
    if res.get("status") != "COMPLETE":
        return {}
    fig = steady_state(read_step_times(res.get("step_times")), warmup)
    if fig is None and res.get("train_runtime_s") and res.get("steps_trained"):
        fig = {"timed_steps": res["steps_trained"], "tokens_per_s": res["tokens_seen"] / res["train_runtime_s"],
               "tokens_per_step": res["tokens_seen"] / res["steps_trained"],
               "s_per_step": res["train_runtime_s"] / res["steps_trained"],
               "source": "attrs: tokens_seen / train_runtime_s (includes warm-up steps and the final eval)"}
    if fig is None:
        return {}
    tps = fig["tokens_per_s"]
    fig["mfu_989"] = 6 * n_params["total"] * tps / (H100_BF16_DENSE_TFLOPS * 1e12)
    fig["mfu_989_no_emb"] = 6 * n_params["no_embedding"] * tps / (H100_BF16_DENSE_TFLOPS * 1e12)
    fig["mfu_measured"] = 6 * n_params["total"] * tps / (matmul_tflops * 1e12) if matmul_tflops else None
    if res.get("train_runtime_s") is not None:
        fig["overhead_s"] = res["wall_s"] - res["train_runtime_s"]
    return fig


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def tables(report: dict) -> str:
    lines = ["| workload | arm | status | micro × accum | packing | steps (timed) | real tokens/s | tokens/step "
             "| s/step | peak GiB | MFU vs 989 TF (N / N−emb) | MFU vs measured matmul | wall s | train_runtime s "
             "| wall − train_runtime s | timing |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    ratios = []
    for w in report["workloads"]:
        figs = {}
        for arm, res in w["arms"].items():
            f = res.get("figures") or {}
            figs[arm] = f
            mb = f"{res.get('micro_batch', '?')} × {res.get('grad_accum', '?')}"
            steps = f"{res.get('steps_trained', '–')} ({f.get('timed_steps', '–')})"
            lines.append(
                f"| {w['name']} | {ARM_NAMES[arm]} | {res.get('status')} | {mb} | {res.get('packing')} | {steps} "
                f"| {_num(f.get('tokens_per_s'), ',.0f')} | {_num(f.get('tokens_per_step'), ',.0f')} "
                f"| {_num(f.get('s_per_step'), '.3f')} | {_num(res.get('peak_gpu_gib'), '.2f')} "
                f"| {_pct(f.get('mfu_989'))} / {_pct(f.get('mfu_989_no_emb'))} | {_pct(f.get('mfu_measured'))} "
                f"| {_num(res.get('wall_s'), '.1f')} | {_num(res.get('train_runtime_s'), '.1f')} "
                f"| {_num(f.get('overhead_s'), '.1f')} | {f.get('source', res.get('error', ''))[:120]} |")
        c = figs.get("c", {}).get("tokens_per_s")
        for other in ("a", "b"):
            o = figs.get(other, {}).get("tokens_per_s")
            if c and o:
                caveat = (" ((c) from its attrs: includes warm-up steps and the eval, so not like for like)"
                          if figs["c"]["source"].startswith("attrs") else "")
                ratios.append(f"- {w['name']}: (c)/({other}) real tokens/s = {c / o:.2f}x{caveat}")
    return "\n".join(lines) + "\n\n" + ("\n".join(ratios) if ratios else "- ratios: not available (an arm is missing)")


def learning_text(lc: dict | None) -> str:
    if not lc:
        return ""
    if lc.get("status") != "done":
        return f"**Learning check**: {lc.get('status')}: {lc.get('error', '')}"
    e = lc["eval"]
    return "\n".join([
        f"**Learning check** ({lc['workload']}, arms (b) and (c), packing on both, micro-batch "
        f"{lc['micro_batch']} × accumulation {lc['grad_accum']}, {lc['steps']} steps): one evaluator "
        f"(token-weighted mean NLL over the assistant tokens of {e['rows']} held-out rows, unpacked, on the saved "
        f"adapters; (c)'s from its `checkpoint-{lc['steps']}`)",
        "",
        "| model | eval loss (common evaluator) | eval loss logged by its own trainer | tokens seen |",
        "|---|---:|---:|---:|",
        f"| base, no adapter | {e['base']['loss']:.5f} | – | 0 |",
        f"| (b) plain TRL | {e['b']['loss']:.5f} | {_num(lc.get('b_logged_eval_loss'), '.4f')} | {lc['b_tokens']:,} |",
        f"| (c) our trial path | {e['c']['loss']:.5f} | {_num(lc.get('c_logged_eval_loss'), '.4f')} | {lc['c_tokens']:,} |",
        "",
        *([f"Seeds {', '.join(map(str, lc['seeds']))} (the table shows seed {lc['seeds'][0]}): (b) "
           f"{' / '.join(f'{x:.5f}' for x in lc['b_losses'])}, mean {lc['b_mean']:.5f}, spread "
           f"{100 * lc['b_spread']:.2f}%; (c) {' / '.join(f'{x:.5f}' for x in lc['c_losses'])}, mean "
           f"{lc['c_mean']:.5f}, spread {100 * lc['c_spread']:.2f}%. The check compares the means.", ""]
          if len(lc.get("seeds") or []) > 1 else []),
        f"Relative difference |c − b| / b = {100 * lc['rel_diff']:.2f}% → **{'PASS' if lc['pass'] else 'FAIL'}** "
        f"(≤ 2%). Tokens seen differ by {100 * lc['tokens_rel_diff']:.2f}%. Loss drop from the base model: "
        f"(b) {lc['b_drop']:.5f}, (c) {lc['c_drop']:.5f}.",
    ])


# -------------------------------------------------------------------------------------------- main


RUN_ID = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder: model, data, arm logs, optuna.db")
    ap.add_argument("--workloads", nargs="+", default=["synthetic", "gsm8k"], choices=["synthetic", "gsm8k"])
    ap.add_argument("--arms", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 20; smoke 4)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="first steps left out of the timing (default 5; smoke 1)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default 8; smoke 2")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=None, help="default 1024; smoke 256")
    ap.add_argument("--rows", type=int, default=None, help="train rows per workload (default 7000; smoke 160)")
    ap.add_argument("--eval-rows", type=int, default=None, help="held-out rows (default 200; smoke 16)")
    ap.add_argument("--synthetic-median", type=int, default=None, help="median row length in tokens (default 200; smoke 120)")
    ap.add_argument("--data-root", default=os.environ.get("SFT_SWEEP_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
                    help="folder holding gsm8k/train.jsonl (default $SFT_SWEEP_SHARED_DATA or ../shared/data; "
                         "falls back to .data/ in the repo)")
    ap.add_argument("--no-liger", action="store_true", help="arm (b) without Liger's kernels")
    ap.add_argument("--ours-overrides", default="", help='extra overrides for arm (c), e.g. "speed=plain" or "speed.compile=true"')
    ap.add_argument("--ours-packing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                    help="data.packing of arm (c) (default true)")
    ap.add_argument("--learning-check", action="store_true",
                    help="(b) and (c) on --learning-workload run --learning-steps and are evaluated by one evaluator")
    ap.add_argument("--learning-workload", default=None, help="default: gsm8k if selected, else the first workload")
    ap.add_argument("--learning-steps", type=int, default=None, help="default 40; smoke 6")
    ap.add_argument("--learning-repeats", type=int, default=1,
                    help="seeds of (b) and (c) in the learning check (42, 43, ...); it compares their mean eval losses")
    ap.add_argument("--learning-lr", type=float, default=2e-3,
                    help="learning rate of (b) and (c) in the learning check: LoRA on a random-init model barely "
                         "moves the loss at 2e-4, so the check runs where it does move (same rate on both arms)")
    ap.add_argument("--profile", action="store_true",
                    help="an extra short run of arm (c) with SFT_SWEEP_PROFILE set; prints its top-15 CUDA ops")
    ap.add_argument("--matmul-n", type=int, default=None, help="default 8192; smoke 512")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, fp32, few steps: every code path on CPU")
    ap.add_argument("--results", type=Path, default=None, help="append a markdown section to this file")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    a = ap.parse_args(argv)
    defaults = dict(steps=(4, 20), warmup_steps=(1, 5), micro_batch=(2, 8), max_length=(256, 1024),
                    rows=(160, 7000), eval_rows=(16, 200), synthetic_median=(120, 200), learning_steps=(6, 40),
                    matmul_n=(512, 8192))
    for key, (smoke, full) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, smoke if a.smoke else full)
    a.out = a.out.resolve()
    if a.warmup_steps < 1:
        ap.error("--warmup-steps must be >= 1 (the timing starts at the end of the last warm-up step)")
    if a.warmup_steps >= a.steps:
        ap.error(f"--warmup-steps ({a.warmup_steps}) must be less than --steps ({a.steps})")
    if a.learning_check:
        a.learning_workload = a.learning_workload or ("gsm8k" if "gsm8k" in a.workloads else a.workloads[0])
        if a.learning_workload not in a.workloads:
            ap.error(f"--learning-workload {a.learning_workload} is not among --workloads {a.workloads}")
        if not a.ours_packing:
            ap.error("--learning-check compares (b) and (c) at equal packing: it needs --ours-packing true")
        if a.learning_steps <= a.warmup_steps:
            ap.error("--learning-steps must exceed --warmup-steps (its runs are timed too)")
    if a.learning_repeats < 1:
        ap.error(f"--learning-repeats {a.learning_repeats}: give 1 or more seeds")
    return a


def main(args: argparse.Namespace) -> dict:
    from importlib import metadata

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join([os.path.relpath(Path(sys.argv[0]).resolve(), ROOT)] + sys.argv[1:])
    log(f"throughput benchmark {RUN_ID}: {command}")

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    versions = {p: version(p) for p in ("torch", "transformers", "trl", "peft", "liger-kernel")}

    # model (once per out dir and shape)
    model_dir = args.out / ("model-smoke" if args.smoke else "model")
    shape = SMOKE_SHAPE if args.smoke else QWEN25_15B
    info_path = model_dir / "build.json"
    if info_path.is_file() and json.loads(info_path.read_text()).get("shape") == shape:
        build = json.loads(info_path.read_text())
        log(f"model: reusing {model_dir}")
    else:
        log(f"model: building {'tiny smoke' if args.smoke else 'Qwen2.5-1.5B'}-shaped model (random init) in {model_dir}")
        build = run_worker("build", {"dest": str(model_dir), "cache": str(args.out / "cache"), "shape": shape,
                                     "max_position_embeddings": max(4096, args.max_length)}, args.out / "build")
        if "params" not in build:
            sys.exit(f"model build failed: {build.get('error')}")
        build["shape"] = shape
        info_path.write_text(json.dumps(build, indent=1))
    n_params = {"total": build["params"], "no_embedding": build["params"] - build["embedding_params"]}
    log(f"model: N = {_count(n_params['total'])} parameters with the (tied) embedding counted once, "
        f"{_count(n_params['no_embedding'])} without it; vocab {build['vocab_size']} (tokenizer {build['tokenizer_vocab']})")

    log(f"matmul: {args.matmul_n}^3, mean of 10 after 3 warm-ups")
    mm = run_worker("matmul", {"n": args.matmul_n}, args.out / "matmul")
    matmul_tflops = mm.get("tflops")
    device = mm.get("device", "unknown")
    log(f"matmul: {_num(matmul_tflops, '.3g')} TFLOP/s ({mm.get('dtype')}) on {device}")

    report: dict = {"run_id": RUN_ID, "command": command, "date": datetime.date.today().isoformat(),
                    "device": device, "versions": versions, "smoke": args.smoke, "params": n_params,
                    "model": {"shape": shape, **build}, "matmul": mm, "workloads": [],
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    report["learning_check"] = None
    for name in args.workloads:
        try:
            workload = prepare_workload(name, args, model_dir, args.out)
        except FileNotFoundError as e:
            log(f"{name}: skipped: {e}")
            report["workloads"].append({"name": name, "error": str(e), "arms": {}})
            continue
        is_learning = args.learning_check and name == args.learning_workload
        arms = sorted(set(args.arms) | ({"b", "c"} if is_learning else set()))
        results: dict = {}
        report["workloads"].append({**workload, "arms": results})
        for arm in arms:
            steps = args.learning_steps if is_learning and arm in "bc" else args.steps
            arm_dir = args.out / RUN_ID / name / arm
            log(f"{name} {ARM_NAMES[arm]}: {steps} steps, micro-batch {args.micro_batch} × {args.grad_accum}")
            results[arm] = run_arm(args, arm, workload, model_dir, arm_dir, steps, is_learning, n_params,
                                   matmul_tflops)
            save_partial(report, args)
        if is_learning:
            repeats = report["workloads"][-1]["learning_repeats"] = []
            for seed in range(43, 42 + args.learning_repeats):  # more seeds of (b) and (c): the check compares means
                log(f"{name}: learning check, seed {seed} of (b) and (c)")
                repeats.append({"seed": seed, **{arm: run_arm(
                    args, arm, workload, model_dir, args.out / RUN_ID / name / f"{arm}-seed{seed}", args.learning_steps,
                    True, n_params, matmul_tflops, seed) for arm in "bc"}})
                save_partial(report, args)
            report["learning_check"] = learning_check(args, model_dir, workload, results, repeats)
            save_partial(report, args)

    if args.profile:
        w = next((w for w in report["workloads"] if w.get("train")), None)
        if w is not None:
            pdir = args.out / RUN_ID / "profile"
            steps = max(args.warmup_steps + 5, 9)  # the trial path profiles steps 6 and 7
            log(f"profile: arm (c) on {w['name']}, {steps} steps, SFT_SWEEP_PROFILE={pdir}")
            prof = run_ours(args, w, model_dir, args.out / RUN_ID / w["name"] / "c-profile", steps, save=False,
                            eval_rows=min(args.eval_rows, 4 * args.micro_batch), profile_dir=pdir, tag="profile")
            prof["figures"] = arm_figures(prof, args.warmup_steps, n_params, matmul_tflops)
            report["profile"] = {"status": prof.get("status"), "dir": str(pdir), "table": print_profile(pdir),
                                 "run": prof}

    text = render(report)
    print("\n" + text, flush=True)
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + text)
        log(f"appended the section to {args.results}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.json}")
    log("done")
    return report


def run_arm(args, arm: str, workload: dict, model_dir: Path, arm_dir: Path, steps: int, is_learning: bool,
            n_params: int, matmul_tflops, seed: int = 42) -> dict:
    """One arm's run (its own subprocess) with its figures; ``is_learning``: the learning check's (b) or (c),
    which keeps its adapter and trains at ``--learning-lr``; ``seed``: the run's seed (adapters' init, dropout)."""
    if arm in "ab":
        spec = {"dir": str(arm_dir), "model_dir": str(model_dir), "train": workload["train"],
                "eval": workload["eval"], "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
                "max_length": args.max_length, "packing": arm == "b", "arm": arm,
                "liger": arm == "b" and not args.no_liger, "steps": steps,
                "step_times": str(arm_dir / "step_times.jsonl"),
                "evaluate": is_learning and arm == "b", "save_adapter": is_learning and arm == "b",
                "learning_rate": args.learning_lr if is_learning else 2e-4, "seed": seed}
        res = run_worker("arm", spec, arm_dir)
        if arm == "b" and spec["liger"] and res.get("status") == "FAIL":
            log("arm (b) failed with Liger; running it again without Liger (recorded in the notes)")
            first = res
            res = run_worker("arm", {**spec, "liger": False}, arm_dir / "no-liger")
            if res.get("liger"):
                res["liger"]["note"] = f"Liger run FAILED ({first.get('error', '')[-300:]}); re-run without Liger"
        res.update(packing=arm == "b", step_times=spec["step_times"])
    else:
        res = run_ours(args, workload, model_dir, arm_dir, steps, save=is_learning,
                       eval_rows=args.eval_rows if is_learning else min(args.eval_rows, 4 * args.micro_batch),
                       extra=[f"lr.learning_rate={args.learning_lr}"] if is_learning else [],
                       tag="c" if seed == 42 else f"c-seed{seed}", seed=seed)
        res["packing"] = args.ours_packing
        if res.get("status") == "COMPLETE" and not res.get("step_times"):
            log("arm (c): no step-times file (the trial path does not honour SFT_SWEEP_STEP_TIMES yet): "
                "its figures come from the trial's attrs and include warm-up steps and the final eval")
    res["seed"] = seed
    res["figures"] = arm_figures(res, args.warmup_steps, n_params, matmul_tflops)
    f = res["figures"]
    log(f"{workload['name']} {ARM_NAMES[arm]}{'' if seed == 42 else f' (seed {seed})'}: {res.get('status')}; " + (
        f"{f['tokens_per_s']:,.0f} real tokens/s, {f['s_per_step']:.3f} s/step, {f['tokens_per_step']:,.0f} "
        f"tokens/step, peak {res.get('peak_gpu_gib')} GiB, wall {res.get('wall_s')} s ({f['source']})"
        if f else str(res.get("error", ""))[:300]))
    return res


def save_partial(report: dict, args) -> None:
    """Everything measured so far, after every arm (a run cut short by a time limit keeps its figures)."""
    path = args.out / RUN_ID / "partial.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))


def _checkpoint(c: dict) -> str | None:
    """(c)'s saved adapter: its best checkpoint, else the last ``checkpoint-*`` in its run folder."""
    if c.get("best_checkpoint"):
        return c["best_checkpoint"]
    found = sorted(Path(c.get("run_dir") or "/nonexistent").glob("checkpoint-*"))
    return str(found[-1]) if found else None


def learning_check(args, model_dir: Path, workload: dict, results: dict, repeats: list | tuple = ()) -> dict:
    """(b) and (c) evaluated by one evaluator; with ``--learning-repeats N`` each arm ran N seeds and the check
    compares the two arms' mean eval losses (one run of a short, high-LR training is noisy)."""
    b, c = results.get("b", {}), results.get("c", {})
    if b.get("status") != "COMPLETE" or c.get("status") != "COMPLETE":
        return {"status": "not run", "error": f"(b) {b.get('status')}, (c) {c.get('status')}"}
    if c.get("micro_batch") != args.micro_batch or c.get("grad_accum") != args.grad_accum:
        log(f"learning check: (c) ran {c.get('micro_batch')} × {c.get('grad_accum')} (overrides or an OOM retry), "
            f"not {args.micro_batch} × {args.grad_accum}: compare at the tokens seen below")
    ckpt = _checkpoint(c)
    if not ckpt:
        return {"status": "not run", "error": f"no checkpoint-* in (c)'s run dir {c.get('run_dir')}"}
    adapters, seeds = {"base": None, "b": b["adapter"], "c": ckpt}, [b.get("seed", 42)]
    for r in repeats:
        rb, rc = r.get("b", {}), r.get("c", {})
        if rb.get("status") == "COMPLETE" and rc.get("status") == "COMPLETE" and _checkpoint(rc):
            adapters[f"b-seed{r['seed']}"], adapters[f"c-seed{r['seed']}"] = rb["adapter"], _checkpoint(rc)
            seeds.append(r["seed"])
        else:
            log(f"learning check: seed {r['seed']} left out: (b) {rb.get('status')}, (c) {rc.get('status')}")
    log(f"learning check: one evaluator on {workload['eval_rows']} held-out rows: base, (b) and (c) of seeds {seeds}")
    ev = run_worker("eval", {"model_dir": str(model_dir), "eval": workload["eval"], "max_length": args.max_length,
                             "batch_size": 4, "adapters": adapters},
                    args.out / RUN_ID / workload["name"] / "learning-eval")
    if "b" not in ev:
        return {"status": "evaluator failed", "error": ev.get("error")}
    b_losses = [ev[k]["loss"] for k in adapters if k == "b" or k.startswith("b-seed")]
    c_losses = [ev[k]["loss"] for k in adapters if k == "c" or k.startswith("c-seed")]
    lb, lc = statistics.fmean(b_losses), statistics.fmean(c_losses)
    c_logged = dict(c.get("eval_curve") or []).get(c.get("steps_trained"))
    out = {"status": "done", "workload": workload["name"], "steps": args.learning_steps,
           "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "eval": ev,
           "b_tokens": b["tokens_seen"], "c_tokens": c["tokens_seen"],
           "tokens_rel_diff": abs(c["tokens_seen"] - b["tokens_seen"]) / max(b["tokens_seen"], 1),
           "b_logged_eval_loss": b.get("eval_loss"), "c_logged_eval_loss": c_logged,
           "seeds": seeds, "b_losses": b_losses, "c_losses": c_losses, "b_mean": lb, "c_mean": lc,
           "b_spread": (max(b_losses) - min(b_losses)) / lb, "c_spread": (max(c_losses) - min(c_losses)) / lc,
           "rel_diff": abs(lc - lb) / lb, "b_drop": ev["base"]["loss"] - lb, "c_drop": ev["base"]["loss"] - lc}
    out["pass"] = out["rel_diff"] <= 0.02
    means = " (means of seeds " + ", ".join(map(str, seeds)) + ")" if len(seeds) > 1 else ""
    log(f"learning check: eval loss base {ev['base']['loss']:.4f}, (b) {lb:.4f}, (c) {lc:.4f}{means}: "
        f"{100 * out['rel_diff']:.2f}% apart -> {'PASS' if out['pass'] else 'FAIL'}")
    return out


def render(report: dict) -> str:
    v = report["versions"]
    s = report["settings"]
    n = report["params"]
    mm = report["matmul"]
    notes = [
        f"- model: {'tiny smoke shape' if report['smoke'] else 'Qwen2.5-1.5B shape'} {report['model']['shape']}, "
        f"random init, tied embeddings, vocab {report['model']['vocab_size']} (tokenizer: the offline tiny byte-level "
        f"BPE, {report['model']['tokenizer_vocab']} tokens; ids above it are never used, the LM head keeps its real "
        f"cost); N = {_count(n['total'])} with the embedding counted once, {_count(n['no_embedding'])} without",
        f"- LoRA r16 alpha32 dropout0.05 all-linear on every arm; max_length {s['max_length']}; micro-batch "
        f"{s['micro_batch']} × accumulation {s['grad_accum']}; {s['steps']} steps per arm, first {s['warmup_steps']} "
        "left out of the timing" + (f"; the learning-check workload's (b) and (c) ran {s['learning_steps']} steps"
                                     if s["learning_check"] else ""),
        "- real tokens = non-padding tokens fed (`include_num_input_tokens_seen=\"non_padding\"`), timed from the end "
        "of the last warm-up step to the end of the last step, with a CUDA sync at each step end",
        f"- MFU = 6·N·tokens/s over {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s (H100 SXM dense bf16) and over the measured "
        f"matmul rate ({_num(mm.get('tflops'), '.3g')} TFLOP/s, {mm.get('n')}³ {mm.get('dtype')}, mean of 10 after 3 "
        "warm-ups). 6·N counts a full backward; LoRA skips the frozen weights' gradients (~4·N of real work) and "
        "attention FLOPs are not counted, so read MFU as a relative figure",
        "- (a)/(b) wall = whole child process (imports, data preparation, model load, training); (c) wall = the whole "
        "`python train.py -m` subprocess; wall − train_runtime is the overhead outside the training loop",
        f"- arm (c) overrides: `{s['ours_overrides'] or '(none)'}`, data.packing={s['ours_packing']}",
    ]
    notes.append("- (b) and Liger: TRL 1.16's SFTTrainer replaces the model's forward with its own fused LM head "
                 "(chunked log-probs; loss, entropy and token accuracy come from it, never from logits) and calls the "
                 "backbone directly, so Liger's fused linear cross-entropy forward is not reached in training; its "
                 "RMSNorm, SwiGLU and RoPE kernels are (see the check below)")
    for w in report["workloads"]:
        if w.get("error"):
            notes.append(f"- {w['name']}: skipped: {w['error']}")
        if w.get("token_stats"):
            t = w["token_stats"]
            notes.append(f"- {w['name']}: {w['source']}; tokens/row median {t['median']}, p90 {t['p90']}, max "
                         f"{t['max']}, assistant share {t['assistant_share']:.0%}")
        b = (w.get("arms") or {}).get("b") or {}
        if b.get("liger"):
            notes.append(f"- {w['name']} (b) Liger: {b['liger'].get('note')}; check {b['liger'].get('check', '–')}")
        c = (w.get("arms") or {}).get("c") or {}
        if c and c.get("status") == "COMPLETE" and not c.get("step_times"):
            notes.append(f"- {w['name']} (c): no SFT_SWEEP_STEP_TIMES file; figures from the trial's attrs")
    if report.get("profile"):
        notes.append(f"- profile: {'printed above' if report['profile'].get('table') else 'no key_averages file'} "
                     f"({report['profile']['dir']})")
    parts = [
        f"## Throughput: plain TRL vs our trial path{' (CPU smoke, not a measurement)' if report['smoke'] else ''}",
        "",
        f"- device: {report['device']}; date: {report['date']}; torch {v['torch']}; transformers {v['transformers']}; "
        f"trl {v['trl']}; peft {v['peft']}; liger-kernel {v['liger-kernel']}",
        f"- command: `{report['command']}`",
        *notes,
        "",
        tables(report),
        "",
        learning_text(report.get("learning_check")),
    ]
    parts += ["", overhead_text(report)]
    if report.get("profile", {}).get("table"):
        parts += ["", "Profile of arm (c), top 15 ops by CUDA time:", "", "```", report["profile"]["table"], "```"]
    return "\n".join(parts).rstrip() + "\n"


SWEET_STEPS, SWEET_EVAL_STEPS = 1500, 50  # schedule=sweet and eval.eval_steps in conf/


def projected_overhead(res: dict) -> dict | None:
    """Orchestration overhead of a ``sweet`` trial (1,500 steps, an evaluation every 50) from one short (c)
    run: its fixed costs (process start, model load, data preparation, study bookkeeping, first-step warm-up:
    wall − steady steps − evaluations) plus 30 evaluations at the measured cost each, over the whole."""
    f, t = res.get("figures") or {}, res.get("timing") or {}
    if res.get("status") != "COMPLETE" or not f.get("s_per_step") or not res.get("steps_trained"):
        return None
    n_evals = max(len(res.get("eval_curve") or []), 1)
    eval_each = float(t.get("eval_s", 0.0)) / n_evals
    fixed = res["wall_s"] - res["steps_trained"] * f["s_per_step"] - float(t.get("eval_s", 0.0))
    evals = SWEET_STEPS // SWEET_EVAL_STEPS * eval_each
    steps = SWEET_STEPS * f["s_per_step"]
    return {"fixed_s": fixed, "eval_each_s": eval_each, "evals_s": evals, "steps_s": steps,
            "fraction": (fixed + evals) / (fixed + evals + steps)}


def overhead_text(report: dict) -> str:
    rows = ["**Orchestration of the trial path** (each `python train.py -m` run of arm (c); data preparation is "
            "TRL's tokenisation and packing, cached by the `datasets` fingerprint in one cache for all (c) runs, "
            "so a later run of the same data shows the second trial's preparation time)", "",
            "| run | wall s | model load s | data preparation s | evaluation s | steady s/step | projected `sweet` "
            "overhead (fixed + 30 evals) / trial |", "|---|---:|---:|---:|---:|---:|---|"]
    runs = [(f"{w['name']} (c)", (w.get("arms") or {}).get("c")) for w in report["workloads"]]
    if report.get("profile", {}).get("run"):
        runs.append(("profile run (c), same data again", report["profile"]["run"]))
    for name, res in runs:
        if not res or res.get("status") != "COMPLETE":
            continue
        t, p = res.get("timing") or {}, projected_overhead(res)
        proj = (f"{p['fixed_s']:.0f} s + {p['evals_s']:.0f} s of {p['fixed_s'] + p['evals_s'] + p['steps_s']:.0f} s "
                f"= **{100 * p['fraction']:.1f}%**" if p else "–")
        rows.append(f"| {name} | {_num(res.get('wall_s'), '.1f')} | {_num(t.get('model_load_s'), '.1f')} "
                    f"| {_num(t.get('prepare_s'), '.2f')} | {_num(t.get('eval_s'), '.1f')} "
                    f"| {_num((res.get('figures') or {}).get('s_per_step'), '.3f')} | {proj} |")
    rows += ["", f"Projection: a `sweet` trial runs {SWEET_STEPS} steps at the measured steady s/step with "
             f"{SWEET_STEPS // SWEET_EVAL_STEPS} evaluations; the fixed part (process start, imports, model load, "
             "preparation, batch=auto probe, study writes, first-step warm-up, the final save) is taken as "
             "measured in the short run."]
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        main(parse_args())
