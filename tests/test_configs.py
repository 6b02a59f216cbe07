"""Every option of every group composes, passes validation and maps onto TRL's SFTConfig."""

from __future__ import annotations

import logging

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from sweeper import config as config_mod
from sweeper import spec as spec_mod
from sweeper.model import resolve_compute
from sweeper.sft import build_sft_config

from .conftest import CONF, FAST

GROUPS = ["model", "data", "batch", "schedule", "lr", "precision", "peft"]
# options that need a value only the user can give
REQUIRED = {("data", "jsonl"): ["data.train_path=rows.jsonl"], ("data", "hub"): ["data.train_path=org/set"],
            ("model", "hub"): ["model.path=org/model", "model.name=org-model"]}


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_builds_sft_config(compose_cfg, tmp_path, group, option):
    extra = ["peft=lora"] if (group, option) == ("precision", "qlora4") else []
    cfg = compose_cfg(f"{group}={option}", *REQUIRED.get((group, option), []), *extra)
    assert cfg.hydra.runtime.choices[group] == option
    config_mod.validate(cfg)
    compute = resolve_compute(cfg.precision.compute)
    if compute == "fp16":
        pytest.skip("fp16 mixed precision needs a CUDA GPU")
    spec = spec_mod.build(cfg, compute=compute, speed=spec_mod.resolve_speed(cfg, compute))
    args = build_sft_config(spec, output_dir=tmp_path, data_format="messages")
    assert args.per_device_train_batch_size == cfg.batch.per_device_train_batch_size
    assert args.learning_rate == cfg.lr.learning_rate
    assert args.max_length == cfg.data.max_length
    assert args.eval_steps == cfg.eval.eval_steps
    assert args.bf16 is (compute == "bf16")


def test_the_fast_debug_preset_is_what_the_tests_run(compose_cfg):
    from omegaconf import OmegaConf

    preset, listed, plain = compose_cfg("+debug=fast", hydra=False), compose_cfg(*FAST, hydra=False), compose_cfg(hydra=False)
    assert OmegaConf.to_container(preset) == OmegaConf.to_container(listed) != OmegaConf.to_container(plain)
    assert (preset.schedule.max_steps, preset.report_to) == (12, "none")
    config_mod.validate(preset)


def test_presets_hold_the_documented_values(compose_cfg):
    steps = {o: compose_cfg(f"schedule={o}").schedule.max_steps for o in ("under", "sweet", "over")}
    assert steps == {"under": 500, "sweet": 1500, "over": 3000}
    assert compose_cfg("schedule=epochs3").schedule.num_train_epochs == 3
    batches = {o: (compose_cfg(f"batch={o}").batch.per_device_train_batch_size,
                   compose_cfg(f"batch={o}").batch.gradient_accumulation_steps)
               for o in ("conservative", "balanced", "aggressive", "memory_constrained")}
    assert batches == {"conservative": (4, 4), "balanced": (8, 2), "aggressive": (12, 1), "memory_constrained": (2, 8)}
    lora = compose_cfg("model=qwen2.5-1.5b")
    assert (lora.lr.learning_rate, lora.lr.lr_scheduler_type, lora.lr.warmup_steps, lora.peft.name) == (2e-4, "cosine", 0.03, "lora")
    assert compose_cfg("lr=full").lr.learning_rate == 2e-5


def test_tiny_model_trains_all_weights_unless_told_otherwise(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.peft.name, cfg.lr.learning_rate) == ("tiny", "none", 1e-3)
    cfg = compose_cfg("peft=lora", "lr=lora")
    assert (cfg.peft.name, cfg.lr.learning_rate) == ("lora", 2e-4)


def test_misspelt_key_is_one_clear_error(compose_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("batch.per_device_train_batchsize=4")
    assert "per_device_train_batchsize" in str(e.value)


def test_wrong_type_is_one_clear_error(compose_cfg):
    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        compose_cfg("schedule.max_steps=lots")
    assert "max_steps" in str(e.value) or "max_steps" in str(e.value.__cause__)


def test_unknown_group_option_names_the_valid_ones(compose_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("schedule=forever")
    msg = str(e.value)
    assert "forever" in msg and "sweet" in msg


@pytest.mark.parametrize("overrides,needle", [
    (["schedule.max_steps=0"], "schedule.max_steps must be positive, but got 0"),
    (["schedule.max_steps=10", "lr.warmup_steps=20"], "lr.warmup_steps (20 steps) must be shorter than schedule.max_steps (10)"),
    (["schedule.max_steps=null"], "set exactly one of schedule.max_steps and schedule.num_train_epochs"),
    (["data.eval_fraction=1.5"], "data.eval_fraction must be between 0 and 1"),
    (["precision=qlora4", "peft=none"], "add peft=lora"),
    (["eval.metric=accuracy"], "eval.metric must be one of ['eval_accuracy', 'eval_loss', 'eval_mean_token_accuracy'], but got 'accuracy'"),
    (["batch.gradient_accumulation_steps=0"], "batch.gradient_accumulation_steps must be >= 1"),
])
def test_cross_key_rules_say_rule_value_fix(compose_cfg, overrides, needle):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError) as e:
        config_mod.validate(cfg)
    assert needle in str(e.value)


def test_schema_rejects_unknown_top_level_key(compose_cfg):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("learning_rate=1e-4")


@pytest.mark.parametrize("override,needle", [
    ("+schedule.max_stepz=20", "schedule.max_stepz is not a key of the config (added with +, so Hydra accepted it); "
                               "did you mean schedule.max_steps?"),
    ("+foo=1", "foo is not a key of the config"),
    ("+model.tiny.hidden=8", "model.tiny.hidden is not a key of the config"),
])
def test_keys_added_with_plus_are_refused(compose_cfg, override, needle):
    from sweeper.config import validate

    with pytest.raises(ValueError) as e:
        validate(compose_cfg(override))
    assert needle in str(e.value)


def test_an_interrupted_tiny_model_build_leaves_no_half_written_folder(compose_cfg, tmp_path, monkeypatch):
    """A Ctrl-C (or a full disk) while the tiny model is saved: nothing is left beside the cache, and the next
    build succeeds."""
    from transformers import PreTrainedTokenizerFast

    from sweeper.model import build_tiny

    cfg = compose_cfg()
    real = PreTrainedTokenizerFast.save_pretrained

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_tiny(cfg.model.tiny, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name] == []
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", real)
    out = build_tiny(cfg.model.tiny, tmp_path / "cache")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_weights_read_ahead_are_taken_once_by_a_load_that_asks_for_them(compose_cfg, monkeypatch):
    """sweeper.model.read_ahead (a GPU sweep's command, while its data check runs): the weights are read in a
    thread; the next load with the same path, dtype and attention takes them, a load that asks differently drops
    them, and the read itself never asks CUDA anything (this process pins its GPU later)."""
    import torch

    from sweeper import model as model_mod

    cfg = compose_cfg("precision=fp32")
    asked = []
    for name in ("is_available", "device_count", "_lazy_init", "is_bf16_supported", "current_device",
                 "get_device_capability"):  # each asks the driver (is_initialized only reads a flag)
        real = getattr(torch.cuda, name)
        monkeypatch.setattr(torch.cuda, name, lambda *a, _r=real, _n=name, **k: asked.append(_n) or _r(*a, **k))
    model_mod.read_ahead(cfg.model, cfg.precision, cfg.paths.cache_dir, "fp32")
    ahead = model_mod._ahead["next"]
    assert ahead.done.wait(60) and ahead.model is not None and asked == []
    monkeypatch.undo()
    loaded, tokenizer, compute = model_mod.load(cfg.model, cfg.precision, cfg.paths.cache_dir)
    assert compute == "fp32" and ahead.model is None and model_mod.took_ahead() > 0  # handed over
    again, _, _ = model_mod.load(cfg.model, cfg.precision, cfg.paths.cache_dir)  # once only: read anew
    assert again is not loaded and model_mod.took_ahead() is None
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))
    model_mod.read_ahead(cfg.model, cfg.precision, cfg.paths.cache_dir, "fp32", "eager")  # another attention
    other, _, _ = model_mod.load(cfg.model, cfg.precision, cfg.paths.cache_dir)
    assert model_mod.took_ahead() is None and "next" not in model_mod._ahead  # dropped, not kept for later
    model_mod.read_ahead(cfg.model, compose_cfg("precision=qlora4").precision, cfg.paths.cache_dir, "bf16")
    assert "next" not in model_mod._ahead  # a 4-bit base is quantised as it loads, on the GPU


def test_weights_are_read_ahead_only_within_half_the_hosts_available_memory(compose_cfg, monkeypatch, caplog):
    """read_ahead sizes the weights from the model's config in the dtype asked for (the loaded model's own bytes)
    and reads nothing when they exceed half of what the host can give (MemAvailable), or when either is unknown:
    the data check's child tokenises meanwhile, and the first trial reads the weights itself."""
    import torch

    from sweeper import model as model_mod

    cfg = compose_cfg("precision=fp32")
    need = model_mod._weights_bytes(cfg.model, cfg.paths.cache_dir, torch.float32)
    loaded, _, _ = model_mod.load(cfg.model, cfg.precision, cfg.paths.cache_dir)
    assert need == sum(p.numel() * p.element_size() for p in loaded.parameters())  # tied embeddings once
    assert model_mod._weights_bytes(cfg.model, cfg.paths.cache_dir, torch.bfloat16) == need // 2
    assert model_mod.host_available_bytes() > 0  # this Linux host's /proc/meminfo
    for available, reads in ((2 * need - 1, False), (None, False), (2 * need, True)):
        monkeypatch.setattr(model_mod, "host_available_bytes", lambda a=available: a)
        with caplog.at_level(logging.INFO, logger="sweeper.model"):
            caplog.clear()
            model_mod.read_ahead(cfg.model, cfg.precision, cfg.paths.cache_dir, "fp32")
        assert ("next" in model_mod._ahead) is reads
        assert ("model not read ahead" in caplog.text) is not reads
        model_mod.load(cfg.model, cfg.precision, cfg.paths.cache_dir)  # takes (or finds no) weights read ahead
    assert "next" not in model_mod._ahead
