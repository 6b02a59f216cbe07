"""The speed group: auto decides per machine, no GPU-only flag reaches a CPU run, and the varlen
attention computes what SDPA computes (on a GPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sweeper import spec as spec_mod
from sweeper import speed
from sweeper.sft import build_sft_config
from sweeper.trial import preflight, run

from .conftest import FAST
from .helpers import Recorder


def test_auto_resolves_to_the_plain_path_on_cpu(compose_cfg):
    cfg = compose_cfg()
    got = speed.resolve(cfg.speed, cuda=False, compute="fp32", optim="adamw_torch")
    assert got == {"name": "auto", "attention": "sdpa", "padding_free": False, "liger": False,
                   "optim": "adamw_torch", "compile": False, "lora_upcast": True,
                   "lora_fused": False, "graphs": False, "dataloader_num_workers": 0}
    # compile is not GPU-only: asked for on CPU, it is honoured (Inductor's CPU backend), never dropped silently
    for mode in ("regional", True):
        asked = speed.resolve(compose_cfg(f"speed.compile={str(mode).lower()}").speed, cuda=False, compute="fp32",
                              optim="adamw_torch")
        assert asked["compile"] == mode


def test_graphs_auto_is_on_for_lora_on_unquantized_weights_on_a_cuda_gpu(compose_cfg):
    from sweeper import spec as spec_mod

    group = compose_cfg("speed.graphs=auto").speed
    on = dict(cuda=True, compute="bf16", optim="adamw_torch")
    assert speed.resolve(group, **on)["graphs"] is True
    assert speed.resolve(compose_cfg().speed, **on)["graphs"] is True  # speed=auto, the default, has graphs=auto
    assert speed.resolve(group, **on, quantized=True)["graphs"] is False  # QLoRA: not measured with the graphs
    assert speed.resolve(group, **on, lora=False)["graphs"] is False  # full fine-tuning: the optimizer dominates
    assert speed.resolve(group, **{**on, "compute": "fp32"})["graphs"] is False  # no varlen attention
    assert speed.resolve(group, **{**on, "cuda": False})["graphs"] is False
    assert speed.resolve(compose_cfg("speed.graphs=true").speed, **on, quantized=True, lora=False)["graphs"] is True
    # the run's own method and precision reach the decision
    assert spec_mod.resolve_speed(compose_cfg("speed.graphs=auto", "precision=bf16", "peft=lora"), "bf16",
                                 cuda=True)["graphs"]
    assert not spec_mod.resolve_speed(compose_cfg("speed.graphs=auto", "precision=bf16", "peft=none"), "bf16",
                                      cuda=True)["graphs"]
    assert not spec_mod.resolve_speed(compose_cfg("speed.graphs=auto", "precision=qlora4", "peft=lora"), "bf16",
                                      cuda=True)["graphs"]


def test_auto_turns_the_fast_path_on_for_a_cuda_gpu(compose_cfg):
    cfg = compose_cfg()
    got = speed.resolve(cfg.speed, cuda=True, compute="bf16", optim="adamw_torch")
    assert got["attention"] == "varlen" and got["padding_free"] is True
    assert got["optim"] == "adamw_torch_fused"
    assert got["lora_upcast"] is False  # LoRA layers skip PEFT's fp32 input cast under bf16 autocast
    assert got["lora_fused"] is True  # on by default for a CUDA GPU under bf16 autocast
    assert speed.resolve(compose_cfg("speed.lora_fused=false").speed, cuda=True, compute="bf16",
                         optim="adamw_torch")["lora_fused"] is False
    assert speed.resolve(cfg.speed, cuda=True, compute="fp32", optim="adamw_torch")["lora_fused"] is False
    assert speed.resolve(compose_cfg("speed.lora_fused=auto").speed, cuda=False, compute="bf16",
                         optim="adamw_torch")["lora_fused"] is False
    assert got["compile"] is False  # regional compile gained 0-7% for ~35-55 s of compilation: opt-in
    assert got["liger"] == speed._liger_available()
    # a compiled model runs without Liger's kernels (they break the graph; Inductor fuses the same ops)
    for mode in ("regional", True):
        compiled = speed.resolve(compose_cfg(f"speed.compile={str(mode).lower()}").speed, cuda=True, compute="bf16",
                                 optim="adamw_torch")
        assert compiled["compile"] == mode and compiled["liger"] is False
    # fp32 compute on a GPU: flash attention cannot run, so SDPA (and no padding-free rows)
    fp32 = speed.resolve(cfg.speed, cuda=True, compute="fp32", optim="adamw_torch")
    assert fp32["attention"] == "sdpa" and fp32["padding_free"] is False
    # only adamw_torch has a fused twin; another optimizer is kept
    assert speed.resolve(cfg.speed, cuda=True, compute="bf16", optim="sgd")["optim"] == "sgd"
    plain = speed.resolve(compose_cfg("speed=plain").speed, cuda=True, compute="bf16", optim="adamw_torch")
    assert plain["attention"] == "sdpa" and not plain["liger"] and plain["optim"] == "adamw_torch"
    assert not plain["lora_fused"]


def test_gpu_only_choices_are_refused_on_cpu_before_any_model_loads(compose_cfg):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(ValueError, match=r"speed\.attention=varlen needs a CUDA GPU"):
        preflight(compose_cfg("speed.attention=varlen"))
    with pytest.raises(ValueError, match=r"speed\.liger=true needs a CUDA GPU"):
        preflight(compose_cfg("speed.liger=true"))
    with pytest.raises(ValueError, match=r"speed\.padding_free must be auto, true or false"):
        preflight(compose_cfg("speed.padding_free=maybe"))


def test_the_data_check_on_cpu_keeps_gpu_only_choices_for_trials_on_a_gpu(compose_cfg):
    """The sweep's data check runs in a child that sees no GPU: a GPU-only choice the trials will honour
    is kept there (and the rows are prepared padding-free, as the trials will), not refused."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU side")
    cfg = compose_cfg("speed.attention=varlen", "speed.liger=true")
    got = spec_mod.for_preparation(cfg).speed
    assert got["attention"] == "varlen" and got["padding_free"] is True and got["liger"] is True
    with pytest.raises(ValueError, match=r"speed\.attention=varlen needs a CUDA GPU"):
        spec_mod.resolve(cfg)


def test_sft_config_carries_the_resolved_choices(compose_cfg, tmp_path):
    cfg = compose_cfg()
    fast = {"name": "auto", "attention": "varlen", "padding_free": True, "liger": True,
            "optim": "adamw_torch_fused", "compile": True, "lora_upcast": False, "dataloader_num_workers": 2}
    args = build_sft_config(spec_mod.build(cfg, compute="fp32", speed=fast), output_dir=tmp_path, data_format="messages")
    assert args.optim == "adamw_torch_fused" and args.torch_compile
    assert args.dataloader_num_workers == 2
    assert not args.accelerator_config.non_blocking  # accelerate's default: each batch copy waits
    graphed = build_sft_config(spec_mod.build(cfg, compute="fp32", speed={**fast, "compile": False, "graphs": True}),
                               output_dir=tmp_path, data_format="messages")
    assert graphed.accelerator_config.non_blocking  # speed.graphs: batch copies do not wait (from pinned memory)
    plain_spec = spec_mod.build(cfg, compute="fp32", speed=spec_mod.resolve_speed(cfg, "fp32"))
    plain = build_sft_config(plain_spec, output_dir=tmp_path, data_format="messages")
    assert plain.optim == "adamw_torch" and not plain.torch_compile


@pytest.mark.slow
def test_padding_free_rows_compute_what_padded_rows_compute(compose_cfg):
    """speed.padding_free concatenates a micro-batch's rows (no pad tokens; SDPA with a block mask on
    CPU, the varlen kernel on a GPU): the eval losses of the run equal the padded run's."""
    runs = {}
    for pf in ("false", "true"):
        rec = Recorder()
        run(compose_cfg(*FAST, "schedule.max_steps=8", "data.max_length=48", f"speed.padding_free={pf}"), reporter=rec)
        assert rec.attrs["speed"]["padding_free"] is rec.attrs["speed"]["collator_padding_free"] is (pf == "true")
        runs[pf] = rec
    padded, free = runs["false"].reports, runs["true"].reports
    assert [s for s, _ in padded] == [s for s, _ in free] == [4, 8]
    for (_, a), (_, b) in zip(padded, free):
        assert abs(a - b) <= 1e-3 * abs(a)
    # rows longer than data.max_length were cut by TRL's preparation in both runs: same tokens seen
    assert runs["true"].attrs["tokens_seen"] == runs["false"].attrs["tokens_seen"]


@pytest.mark.slow
def test_a_cpu_trial_records_its_speed_timing_and_step_times(compose_cfg, tmp_path, monkeypatch):
    times = tmp_path / "steps.jsonl"
    monkeypatch.setenv("SFT_SWEEP_STEP_TIMES", str(times))
    rec = Recorder()
    run(compose_cfg(*FAST, "schedule.max_steps=6"), reporter=rec)
    assert rec.attrs["speed"]["attention"] == "sdpa" and rec.attrs["speed"]["optim"] == "adamw_torch"
    timing = rec.attrs["timing"]
    assert timing["model_load_s"] > 0 and timing["prepare_s"] > 0 and timing["eval_s"] > 0
    rows = [json.loads(x) for x in times.read_text().splitlines()]
    lines = [x for x in rows if "step" in x]
    assert [x["step"] for x in lines] == list(range(1, 7))
    # evaluations (and the best checkpoint's saves) are stamped between the steps they follow
    events = [x for x in rows if "event" in x]
    assert {x["event"] for x in events} >= {"evaluate", "save"}
    assert all(set(x) == {"event", "t", "wall"} for x in events)
    assert all(b["t"] > a["t"] and b["tokens"] > a["tokens"] for a, b in zip(lines, lines[1:]))
    assert lines[-1]["tokens"] == rec.attrs["tokens_seen"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a CUDA GPU")
def test_varlen_attention_matches_sdpa_per_packed_row():
    """Three rows packed into one sequence, grouped-query heads (12 query, 2 key/value): the varlen
    kernel's output and gradients equal SDPA run on each row on its own."""
    torch.manual_seed(0)
    lengths = [37, 200, 91]
    t, h, hkv, d = sum(lengths), 12, 2, 128
    q = torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 37, 237, 328], device="cuda", dtype=torch.int32)

    class Module(torch.nn.Module):
        is_causal = True

    out, _ = speed.varlen_attention(Module(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                    max_length_q=200, max_length_k=200, scaling=d ** -0.5)
    refs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk = k[:, :, a:b].repeat_interleave(h // hkv, dim=1)
        vv = v[:, :, a:b].repeat_interleave(h // hkv, dim=1)
        refs.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], kk, vv, is_causal=True)
                    .transpose(1, 2))
    ref = torch.cat(refs, dim=1)
    assert out.shape == ref.shape == (1, t, h, d)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    grad = torch.randn_like(ref)
    g_out = torch.autograd.grad(out, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_out, g_ref):
        assert (a.float() - b.float()).abs().max().item() < 5e-2 * max(1.0, b.float().abs().max().item())


def test_lora_layers_skip_their_input_cast_only_under_autocast():
    """speed.lora_upcast=false: under bf16 autocast the loss and every adapter gradient equal PEFT's cast
    path (the matmuls see the same bf16 values); outside autocast the cast is kept, so a bf16 input still
    meets fp32 adapters without a dtype error."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)

    def build():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]

    cast, skip = build(), build()
    assert speed.skip_lora_upcast(skip) == 14  # 7 adapted linears per layer
    (l1, g1), (l2, g2) = step(cast), step(skip)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert next(p for n, p in skip.named_parameters() if "lora_A" in n).dtype == torch.float32
    with torch.no_grad():
        assert skip(input_ids=ids).logits.dtype == torch.bfloat16  # no autocast: PEFT's cast still applies


def test_fused_lora_layers_compute_what_peft_computes():
    """speed.lora_fused: under bf16 autocast the loss and every adapter gradient are as close to the fp32
    computation as PEFT's own forward is (only the rounding differs); LoRA's dropout draws the same masks;
    outside autocast PEFT's own forward runs, bit for bit."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)

    def build(dtype, dropout=0.0):
        torch.manual_seed(0)
        model = get_peft_model(Qwen2ForCausalLM(cfg).to(dtype), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():  # lora_B starts at zero: give it values, so the adapters' product counts
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        return model

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model, autocast=True):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.float() for p in model.parameters() if p.requires_grad]

    peft_path, fused = build(torch.bfloat16), build(torch.bfloat16)
    speed.skip_lora_upcast(peft_path)
    assert speed.fuse_lora(fused) == 14  # 7 adapted linears per layer
    ref_loss, ref = step(build(torch.float32), autocast=False)
    (l1, g1), (l2, g2) = step(peft_path), step(fused)

    def err(grads):
        return max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref))

    assert len(g2) == len(ref) == 28
    assert abs(l2 - ref_loss) <= 2 * abs(l1 - ref_loss) + 1e-3
    assert err(g2) <= 1.5 * err(g1)
    assert err([2 * g for g in g1]) > 10 * err(g2)  # a gradient off by the scaling fails the check above

    # LoRA's dropout: the same masks (same draws in the same order) as PEFT's forward
    layer = build(torch.bfloat16, dropout=0.5).base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)

    def out(fuse):
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (speed._fused_lora_forward(layer, x) if fuse else type(layer).forward(layer, x)).float()

    assert (out(True) - out(False)).norm() <= 1e-2 * out(False).norm()
    layer.eval()
    assert (out(True) - out(False)).norm() <= 1e-2 * out(False).norm()
    with torch.no_grad():  # no autocast: PEFT's forward, bit for bit
        assert torch.equal(peft_path(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_profile_gaps_lays_the_gpus_idle_time_at_the_functions_door():
    """benchmarks/profile_gaps.py on a crafted timeline (microseconds): two kernels busy 40 of a 100 ms window,
    a Python function of 30 ms of which 25 hold no kernel, and a sync call."""
    from benchmarks.profile_gaps import analyse

    main, other, ms = {"pid": 1, "tid": 1}, {"pid": 1, "tid": 2}, 1000

    def ev(cat, name, ts, dur, where=main):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts * ms, "dur": dur * ms, **where}

    events = [ev("cpu_op", "aten::mm", 0, 10), ev("cpu_op", "aten::mm", 50, 10),
              ev("cuda_runtime", "cudaLaunchKernel", 1, 2), ev("cuda_runtime", "cudaStreamSynchronize", 90, 10),
              ev("kernel", "gemm", 5, 20, {"pid": 0, "tid": 7}), ev("kernel", "gemm", 60, 20, {"pid": 0, "tid": 7}),
              ev("python_function", "trainer.py(1): collate", 20, 30),
              ev("python_function", "threading.py(1): wait", 0, 100, other)]
    text = analyse(events)
    assert "window 100.0 ms; GPU busy 40.0 ms = 40.0%; 2 GPU kernels/copies" in text
    assert "cudaStreamSynchronize: 1 calls, 10.0 ms" in text and "1 launches" in text
    line = next(x for x in text.splitlines() if "collate" in x)
    assert line.split()[:4] == ["25.0", "idle", "30.0", "wall"]  # 20-25 ms held the first kernel's end
    assert "threading.py" not in text  # another thread's waiting is not the main thread's work


def test_gpu_busy_counts_the_steps_alone_without_evaluations_and_saves():
    """benchmarks/gpu_busy.py: the step stamps of two trials split into the spans between consecutive steps,
    less those an evaluation or a save fell into, and less the gap from one trial to the next."""
    from benchmarks.gpu_busy import busy, step_spans, trials_of

    steps = [{"step": s, "t": t} for s, t in [(1, 0.0), (2, 1.0), (3, 2.0), (4, 5.0), (1, 9.0), (2, 10.0)]]
    runs = trials_of(steps)
    assert [len(r) for r in runs] == [4, 2]
    events = [{"event": "evaluate", "t": 4.0}, {"event": "save", "t": 4.5}]
    assert step_spans(runs, events) == [(0.0, 1.0), (1.0, 2.0), (9.0, 10.0)]
    # NVML samples: busy 90 inside the steps, 10 during the evaluation, 0 between the trials
    samples = [(0.5, [90]), (1.5, [90]), (3.0, [10]), (4.2, [10]), (7.0, [0]), (9.5, [90])]
    assert busy(samples, step_spans(runs, events)) == 90.0
    assert busy(samples, [(r[0]["t"], r[-1]["t"]) for r in runs]) == 58.0
    # the idle seconds by window: the command ran from -1.0 to 12.0 (samples: idle before, busy after the last step)
    from benchmarks.gpu_busy import idle_budget

    samples = [(-0.5, [0]), *samples, (11.0, [50])]
    assert idle_budget(samples, -1.0, 12.0, runs) == {
        "before_first_step": [1.0, 1.0], "between_trials": [[4.0, 4.0]], "after_last_step": [2.0, 1.0],
        "training": [6.0, 2.6]}  # trial 0: 5 s at 50% busy (2.5 s idle); trial 1: 1 s at 90% (0.1 s)
    assert idle_budget([], -1.0, 12.0, runs) == {  # no NVML (a CPU run): the windows, no idle figure
        "before_first_step": [1.0, None], "between_trials": [[4.0, None]], "after_last_step": [2.0, None],
        "training": [6.0, None]}
    # around the evaluation (between steps 3 at 2.0 and 4 at 5.0): 2 s to its stamp, 0.5 s of save, 0.5 s on
    from benchmarks.gpu_busy import evaluation_gaps

    assert evaluation_gaps(runs, events) == {"evaluate": {"n": 1, "median_s": 2.0}, "save": {"n": 1, "median_s": 0.5},
                                             "to_next_step": {"n": 1, "median_s": 0.5}}
    late = [{"event": "evaluate", "t": 1.5}, {"event": "evaluate", "t": 4.0}]  # evaluations without a save
    assert evaluation_gaps(runs, late) == {"evaluate": {"n": 2, "median_s": 1.25}, "save": {"n": 0, "median_s": None},
                                           "to_next_step": {"n": 2, "median_s": 0.75}}


def test_trl_tokenises_a_large_train_set_in_several_processes(compose_cfg, tmp_path, monkeypatch):
    """TRL's preparation (``dataset_num_proc``) uses one process per 1,000 train rows, at most 8 and half the
    cores, and a single process for small sets or small machines (where a pool costs more than it saves)."""
    from sweeper import sft

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [sft.dataset_procs(n) for n in (None, 120, 1999, 2000, 7099, 100_000)] == [None, None, None, 2, 7, 8]
    spec = spec_mod.build(compose_cfg(), compute="fp32", speed=spec_mod.resolve_speed(compose_cfg(), "fp32"))
    assert build_sft_config(spec, output_dir=tmp_path, data_format="messages", rows=7099).dataset_num_proc == 7
    assert build_sft_config(spec, output_dir=tmp_path, data_format="messages").dataset_num_proc is None
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # this CI machine's size: one process
    assert sft.dataset_procs(100_000) is None
