"""speed.graphs: micro-batches padded into token buckets keep their real rows, loss tokens and boundaries; the
backbone replayed as CUDA graphs computes what the eager backbone computes (on a GPU)."""

from __future__ import annotations

import pytest
import torch

from sweeper import graphs, speed
from sweeper.trial import preflight


def test_graphs_need_padding_free_varlen_rows_on_a_gpu_and_no_compile(compose_cfg):
    auto = speed.resolve(compose_cfg().speed, cuda=True, compute="bf16", optim="adamw_torch")
    assert auto["graphs"] is True  # on by default for LoRA on a CUDA GPU (benchmarks/RESULTS.md, round 12)
    got = speed.resolve(compose_cfg("speed.graphs=true").speed, cuda=True, compute="bf16", optim="adamw_torch")
    assert got["graphs"] is True and got["padding_free"] is True and got["attention"] == "varlen"
    on = speed.resolve(compose_cfg("speed.graphs=auto").speed, cuda=True, compute="bf16", optim="adamw_torch")
    assert on["graphs"] is True
    for overrides, compute in ((["speed.graphs=true"], "fp32"),
                               (["speed.graphs=true", "speed.padding_free=false"], "bf16"),
                               (["speed.graphs=true", "speed.attention=sdpa"], "bf16"),
                               (["speed.graphs=true", "speed.compile=regional"], "bf16")):
        with pytest.raises(ValueError, match=r"speed\.graphs=true needs"):
            speed.resolve(compose_cfg(*overrides).speed, cuda=True, compute=compute, optim="adamw_torch")
        # auto turns it off where it cannot run
        auto_off = [o.replace("graphs=true", "graphs=auto") for o in overrides]
        assert speed.resolve(compose_cfg(*auto_off).speed, cuda=True, compute=compute,
                             optim="adamw_torch")["graphs"] is False
    assert speed.resolve(compose_cfg("speed.graphs=auto").speed, cuda=False, compute="bf16",
                         optim="adamw_torch")["graphs"] is False
    with pytest.raises(ValueError, match=r"speed\.graphs must be auto, true or false"):
        preflight(compose_cfg("speed.graphs=sometimes"))


def _padding_free_batch(lengths: list[int], pad_id: int = 0, vocab: int = 100, seed: int = 0) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": (torch.randint(1, vocab, (n,), generator=g)).tolist()} for n in lengths]
    return collator.torch_call(rows)


def _tiny_model(lora: bool = True, fused_head: bool = False, **config):
    """A 2-layer bf16 Qwen2 on the GPU with varlen attention (seed 0), with TRL's fused LM head if asked, and
    LoRA adapters on every linear whose B matrices are non-zero (so they change the output from the first step)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    speed.register_varlen()
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        attn_implementation=speed.VARLEN, **config)).to("cuda", torch.bfloat16)
    if fused_head:
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    if not lora:
        return base
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def test_bucketed_batches_keep_the_real_rows_their_loss_tokens_and_boundaries():
    """Padding a padding-free micro-batch for CUDA graphs adds only a row of pad tokens that carries no loss
    and empty rows after it: the real tokens, labels, positions and row boundaries are as collated."""
    lengths = [37, 200, 91]
    batch = _padding_free_batch(lengths)
    t = sum(lengths)
    got = graphs.bucket_batch(batch, 0, bucket=128, slots=8)
    padded = 384
    assert got["input_ids"].shape == got["labels"].shape == got["position_ids"].shape == (1, padded)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(got[key][:, :t], batch[key])
    assert (got["input_ids"][0, t:] == 0).all() and (got["labels"][0, t:] == -100).all()
    assert got["position_ids"][0, t:].tolist() == list(range(padded - t))  # its own causal block from 0
    assert (got["labels"] != -100).sum() == (batch["labels"] != -100).sum()  # the loss's tokens
    assert (got["input_ids"] != 0).sum() == (batch["input_ids"] != 0).sum()  # the tokens seen
    assert got["cu_seq_lens_q"].tolist() == [0, 37, 237, 328, 384, 384, 384, 384]  # empty rows to 8 entries
    assert got["cu_seq_lens_k"] is got["cu_seq_lens_q"] and got["max_length_q"] == got["max_length_k"] == padded
    if "seq_idx" in batch:
        assert got["seq_idx"].shape == (1, padded) and (got["seq_idx"][0, t:] == 3).all()
    # every length of a bucket gets the same shapes: one CUDA graph per bucket
    other = graphs.bucket_batch(_padding_free_batch([300, 5]), 0, bucket=128, slots=8)
    assert {k: tuple(v.shape) for k, v in other.items() if torch.is_tensor(v)} == \
        {k: tuple(v.shape) for k, v in got.items() if torch.is_tensor(v)}
    # a length on a bucket's edge gets no pad row; a padded batch (not padding-free) is left alone
    edge = graphs.bucket_batch(_padding_free_batch([100, 28]), 0, bucket=128, slots=8)
    assert edge["input_ids"].shape == (1, 128) and edge["cu_seq_lens_q"].tolist() == [0, 100, 128] + [128] * 5
    plain = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)}
    assert graphs.bucket_batch(plain, 0, bucket=128, slots=8) is plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and flash attention need a CUDA GPU")
def test_graphed_backbone_computes_what_the_eager_backbone_computes():
    """Two copies of a LoRA model train on the same bucketed micro-batches (two per optimizer step, the
    gradients dropped with set_to_none between steps): the copy whose backbone replays CUDA graphs has the
    eager copy's losses and gradients, step after step, while its parameters change; evaluation runs eagerly."""
    eager, graphed = _tiny_model(), _tiny_model()
    backbone = graphed.get_base_model().base_model
    replayer = graphs.GraphedModel(backbone)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (eager, graphed)]
    shapes = [[30, 20], [10, 40], [60, 3], [70, 40], [25, 25], [90, 30], [33, 17], [64, 40]]  # buckets 64, 128
    batches = []
    for i, lengths in enumerate(shapes):
        b = graphs.bucket_batch(_padding_free_batch(lengths, vocab=128, seed=i), 0, bucket=64, slots=8)
        batches.append({k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()})

    def loss_of(model, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            kw = {k: v for k, v in b.items() if k != "labels"}
            h = model.get_base_model().base_model(**kw, use_cache=False).last_hidden_state
            logits = model.get_base_model().lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=-100)

    for epoch in range(3):
        for step in range(0, len(batches), 2):
            losses = {}
            for name, model, opt in (("eager", eager, opts[0]), ("graphed", graphed, opts[1])):
                total = 0.0
                for b in batches[step:step + 2]:
                    loss = loss_of(model, b) / 2
                    loss.backward()
                    total += loss.item()
                    del loss  # a trainer keeps no autograd graph of an earlier step alive either
                losses[name] = total
                grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
                losses[name + "_grads"] = grads
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert abs(losses["eager"] - losses["graphed"]) <= 2e-3 * abs(losses["eager"]), (epoch, step, losses)
            for a, b in zip(losses["eager_grads"], losses["graphed_grads"]):
                assert (a - b).norm() <= 2e-2 * a.norm() + 1e-6, (epoch, step)
    assert len(replayer.entries) == 2 and replayer.replays >= 10  # two buckets, captured on their second use
    # two forwards before their backwards (the buckets share one pool): the second runs eagerly, both are right
    grads = {}
    for name, model in (("eager", eager), ("graphed", graphed)):
        first, second = loss_of(model, batches[0]), loss_of(model, batches[3])
        (first + second).backward()
        grads[name] = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
    for a, b in zip(grads["eager"], grads["graphed"]):
        assert (a - b).norm() <= 2e-2 * a.norm() + 1e-6
    assert replayer.pending is None
    before = replayer.replays
    with torch.no_grad():
        loss_of(graphed, batches[0])
    assert replayer.replays == before  # no gradient: the eager forward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and flash attention need a CUDA GPU")
def test_a_backbone_that_cannot_be_captured_keeps_training_eagerly(caplog):
    """An op that waits for the GPU inside the backbone (here a hook reading a value on the host) makes the
    capture fail: the model runs eagerly from then on, with a warning, the step's loss and gradients are still
    computed, and random ops (dropout) still work."""
    model = _tiny_model(lora=False)

    def wait_for_the_gpu(module, args):
        float(args[0].detach().sum())  # a host read of a GPU value: not allowed while capturing

    model.model.layers[1].register_forward_pre_hook(wait_for_the_gpu)
    replayer = graphs.GraphedModel(model.model)
    b = graphs.bucket_batch(_padding_free_batch([30, 20], vocab=128), 0, bucket=64, slots=8)
    b = {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}
    kw = {k: v for k, v in b.items() if k != "labels"}
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model.model(**kw, use_cache=False).last_hidden_state
        h.float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.parameters())
        model.zero_grad(set_to_none=True)
    assert replayer.replays == 0 and replayer.failed and not replayer.entries
    assert "backbone could not be captured for 64 tokens" in caplog.text
    # the failed capture left CUDA's random generator usable (dropout after it)
    assert torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5).sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and flash attention need a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "full, untied head"])
def test_graphed_model_with_trls_fused_head_computes_what_the_eager_model_computes(method):
    """With TRL's fused LM head inside the graphs (every position scored, the unlabelled ones zeroed), a LoRA
    model's, and a fully fine-tuned model's whose head is its own trained weight, log-probabilities, entropy,
    top-1 hits, loss and gradients (the head's included) equal the eager model's (which scores only the labelled
    positions) over several optimizer steps, and evaluation replays forward-only graphs with the eager model's
    numbers."""
    def build():
        return _tiny_model(lora=method == "lora", fused_head=True, tie_word_embeddings=method == "lora")

    eager, graphed = build(), build()
    base = graphed.get_base_model() if method == "lora" else graphed
    replayer = graphs.GraphedModel(base.base_model, base)
    if method != "lora":  # the head trains, apart from the backbone: its gradient is the graphs' too
        assert any(p is graphed.lm_head.weight for p in replayer.params)
    assert replayer.fused is not None
    lr = 0.5 if method == "lora" else 0.05  # a step of every weight: smaller, so bf16 rounding stays small
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (eager, graphed)]
    shapes = [[30, 20], [10, 40], [60, 3], [70, 40], [25, 25], [90, 30]]  # buckets 64, 128
    batches = []
    for i, lengths in enumerate(shapes):
        b = graphs.bucket_batch(_padding_free_batch(lengths, vocab=128, seed=i), 0, bucket=64, slots=8)
        b["labels"][0, :5] = -100  # a prompt: positions without loss
        batches.append({k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()})

    def forward(model, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(**b, use_cache=False, fused_lm_head=True)

    for epoch in range(3):
        for step in range(0, len(batches), 2):
            got = {}
            for name, model, opt in (("eager", eager, opts[0]), ("graphed", graphed, opts[1])):
                model.train()
                sums = []
                for b in batches[step:step + 2]:
                    out = forward(model, b)
                    (out.loss / 2).backward()
                    with torch.no_grad():  # a trainer keeps no autograd graph of an earlier step alive either
                        sums.append(torch.stack([out.loss.float(), out.entropy.float().sum(),
                                                 out.is_top1.float().sum(), out.label_mask.float().sum()]))
                    del out
                got[name] = torch.stack(sums).cpu()
                got[name + "_grads"] = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert torch.allclose(got["eager"], got["graphed"], rtol=5e-3, atol=1e-2), (epoch, step, got)
            for a, b in zip(got["eager_grads"], got["graphed_grads"]):
                assert (a - b).norm() <= 2e-2 * a.norm() + 1e-6, (epoch, step)
    assert replayer.replays >= 8 and len(replayer.entries) == 2
    assert {key[0] for key in replayer.entries} == {"head"}  # the backbone alone was never captured
    for model in (eager, graphed):
        model.eval()
    with torch.no_grad():
        for _ in range(3):
            want, have = forward(eager, batches[1]), forward(graphed, batches[1])
            assert torch.allclose(want.log_probs.float(), have.log_probs.float(), atol=2e-2)
            assert torch.equal(want.label_mask, have.label_mask)
    assert any(key[1] is False for key in replayer.entries)  # evaluation's own forward-only graph


def _chat_rows(longest: int) -> list[dict]:
    """32 chat rows of random words (seed 0), the user turn 2 to ``longest`` words long."""
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel"]
    return [{"messages": [{"role": "user", "content": " ".join(words[int(i)] for i in
                                                               torch.randint(0, 8, (int(n),), generator=g))},
                          {"role": "assistant", "content": " ".join(words[::-1][: int(n) % 7 + 1])}]}
            for n in torch.randint(2, longest, (32,), generator=g)]


@pytest.mark.slow
def test_a_step_that_reads_nothing_back_logs_what_trl_logs(compose_cfg, tmp_path):
    """The bucketed collator with the deferred reads (speed.graphs' step, here on CPU where nothing is
    captured) trains the same run as TRL's own collator and loss: the same logged loss, entropy, token
    accuracy, tokens (``num_tokens``: the real rows' tokens, not the pad row's) and non-pad tokens seen."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sweeper import model as model_mod

    from .conftest import FAST

    cfg = compose_cfg(*FAST)
    path = model_mod.build_tiny(cfg.model.tiny, cfg.paths.cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    rows = _chat_rows(30)

    def train(deferred: bool) -> list:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path)
        args = SFTConfig(output_dir=str(tmp_path / str(deferred)), max_steps=6, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, logging_steps=2, learning_rate=1e-2, report_to=[],
                         use_cpu=True, include_num_input_tokens_seen="non_padding", assistant_only_loss=True,
                         seed=0, save_strategy="no")
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        trainer.data_collator.padding_free = True
        if deferred:
            trainer.data_collator = graphs.BucketedCollator(trainer.data_collator, bucket=64, slots=8)
            graphs._defer_reads(trainer)
        trainer.train()
        return [entry for entry in trainer.state.log_history if "loss" in entry]

    want, have = train(False), train(True)
    assert len(want) == len(have) == 3
    for a, b in zip(want, have):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert isinstance(b[key], float) and b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
        assert b["num_tokens"] == a["num_tokens"] and b["num_input_tokens_seen"] == a["num_input_tokens_seen"]
    assert have[-1]["num_input_tokens_seen"] > 0


def _tiny_trainer(compose_cfg, tmp_path, cuda: bool = False):
    """A real SFTTrainer of the project's tiny model on 32 chat rows (bf16 with varlen attention on a GPU, fp32
    on CPU), padding-free, with speed.graphs installed."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sweeper import model as model_mod

    from .conftest import FAST

    cfg = compose_cfg(*FAST)
    path = model_mod.build_tiny(cfg.model.tiny, cfg.paths.cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    rows = _chat_rows(60)
    kwargs = {}
    if cuda:
        speed.register_varlen()
        kwargs = dict(dtype=torch.bfloat16, attn_implementation=speed.VARLEN)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=[], use_cpu=not cuda, bf16=cuda, assistant_only_loss=True, padding_free=cuda,
                     save_strategy="no", max_length=None)  # TRL: padding-free rows unpacked are not truncated
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.data_collator.padding_free = True
    replayer = graphs.install(trainer)
    assert replayer is not None and trainer.graphed is replayer
    return trainer


def test_batch_autos_probe_is_no_step_of_the_run(compose_cfg, tmp_path):
    """batch=auto's probe runs the trainer's own loss (three times with speed.graphs, as a bucket's first use, its
    capture and a replay): the tokens it counts and the metrics it keeps are left out of the run's logs, and it
    leaves no gradient behind."""
    from sweeper import batching

    trainer = _tiny_trainer(compose_cfg, tmp_path)
    trainer._metrics["train"]["entropy"].append(1.5)  # what the run had kept before, as if a step had run
    trainer._total_train_tokens = 7
    calls = []
    loss = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: calls.append(1) or loss(*a, **k)
    peak = batching.probe(trainer, 4)
    if not torch.cuda.is_available():
        assert peak == 0.0  # no GPU: no peak to read
    assert len(calls) == 3
    assert trainer._total_train_tokens == 7 and dict(trainer._metrics["train"]) == {"entropy": [1.5]}
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and flash attention need a CUDA GPU")
def test_batch_autos_probe_with_graphs_holds_their_memory(compose_cfg, tmp_path):
    """With speed.graphs, batch=auto's probe captures and replays its bucket, so its peak holds the graphs' pool
    beside the eager allocations: above the eager probe's, and no training step of the same rows goes above it."""
    from sweeper import batching

    eager = _tiny_trainer(compose_cfg, tmp_path / "eager", cuda=True)
    eager.graphed = None  # the same trainer, its probe eager only
    eager_peak = batching.probe(eager, 8)
    trainer = _tiny_trainer(compose_cfg, tmp_path / "graphs", cuda=True)
    peak = batching.probe(trainer, 8)
    assert len(trainer.graphed.entries) == 1 and trainer.graphed.replays == 2  # captured at the second run
    assert peak > eager_peak
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    assert torch.cuda.max_memory_allocated() / 2**30 <= peak + 0.05  # + the optimizer states of a tiny model
