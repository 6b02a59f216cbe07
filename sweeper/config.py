"""Typed schemas for the composed config (values live in ``conf/``, never here).

Each dataclass names the keys a group may set and their types; ``MISSING`` marks keys whose
value must come from a YAML file. The schema is registered with Hydra's ``ConfigStore`` as
``config_schema`` and is the first entry of ``conf/config.yaml``'s defaults list, so a misspelt
key or a value of the wrong type fails at compose time, before any model is loaded.

Rules that span several keys (e.g. warmup shorter than the run) are checked by :func:`validate`,
which every job calls (through :func:`sweeper.spec.resolve`) before touching data or a GPU. Below the
entry points the groups travel as instances of these dataclasses (:class:`sweeper.spec.RunSpec`).

Bad input is refused in one line: :class:`InputError` (Hydra prints its message, no traceback), and the words
of a Hydra or OmegaConf composition error joined into one line (:func:`one_line`, :func:`refusal_line`), the
same for the sweep, a single run and ``plan``.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.errors import CompactHydraException
from omegaconf import MISSING

__all__ = ["AutoBatchConfig", "BatchConfig", "Config", "DataConfig", "EvalConfig", "InputError", "LrConfig",
           "ModelConfig", "ModelShape", "PathsConfig", "PeftConfig", "PrecisionConfig", "ScheduleConfig",
           "SpeedConfig", "StudyRef", "TinyModelConfig", "WSD_DECAY_TYPES", "WsdConfig", "check_seeds",
           "metric_direction", "missing_line", "one_line", "refusal_line", "register", "validate", "wsd_branch_point",
           "wsd_warmup_steps"]


SWEEP_ID_ENV = "SFT_SWEEP_SWEEP_ID"  # the sweep id a worker process inherits from the command that started it


class InputError(CompactHydraException, ValueError):
    """Bad input (config, data, sweep): Hydra prints only its message, no traceback."""

    @classmethod
    def wrap(cls, exc: Exception) -> "InputError":
        err = cls(str(exc))
        err.__cause__ = exc
        return err


def missing_line(keys: list[str]) -> str:
    """The refusal of keys left ``???`` (``MISSING``): which to set, and how."""
    why = "model.name names the study, <data.name>-<model.name>" if "model.name" in keys else \
        "a required value of the option chosen"
    return (f"{', '.join(keys)} must be set, but {'is' if len(keys) == 1 else 'are'} ??? ({why}); "
            f"add {' '.join(k + '=...' for k in keys)} to the command")


_MISSING_VALUE = re.compile(r"Missing mandatory value: ([\w.]+)")


def one_line(text: str) -> str:
    """A composition error of Hydra's in one line: its sentences joined (a sentence said twice, once), OmegaConf's
    ``full_key``/``object_type`` details and Hydra's config search path left out, the available options of a group
    listed after it; a value left ``???`` said as :func:`missing_line` says it."""
    missing = _MISSING_VALUE.search(text)
    if missing:
        return missing_line([missing.group(1)])
    in_file = _in_config_file(text)
    if in_file:
        return in_file
    parts: list[str] = []
    options: list[str] = []
    in_search_path = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if line.startswith("Config search path:"):
            in_search_path = True
            continue
        if in_search_path and line.startswith("\t"):
            continue
        in_search_path = False
        if line.startswith("    ") and re.match(r"(full_key|object_type|reference_type)[:=]", stripped):
            continue
        if line.startswith("\t") and parts and parts[-1].startswith("Available options in"):
            options.append(stripped)
            continue
        if options:
            parts[-1] += " " + ", ".join(options)
            options = []
        if stripped.rstrip(".") not in parts:
            parts.append(stripped.rstrip("."))
    if options:
        parts[-1] += " " + ", ".join(options)
    return _near_key("; ".join(parts))


_IN_FILE = re.compile(r"^In '(?P<file>[^']+)': (?P<error>\w+) raised while composing config:\n(?P<what>[^\n]+)\n"
                      r"(?:.*\n)*?\s*full_key: (?P<key>\S+)\n(?:.*\n)*?\s*object_type=(?P<cls>\w+)")


def _in_config_file(text: str) -> str | None:
    """Hydra's report of a bad value or unknown key in a config file (a user's ``lr/mine.yaml``: ``In 'lr/mine':
    ValidationError raised while composing config``) as one line naming the file and the key, with the keys the
    group knows (and the close one) for an unknown key; None for any other error."""
    m = _IN_FILE.match(text if text.endswith("\n") else text + "\n")
    if not m:
        return None
    group = m["file"].split("/")[0]
    where = f"{m['file']}.yaml (a config file of group {group})"
    key = m["key"].removeprefix(f"{group}.")  # as the file writes it (a _global_ file: the whole key)
    if m["error"] == "ConfigKeyError":
        names = _schema_fields(m["cls"]) or []
        parent, _, leaf = key.rpartition(".")
        close = difflib.get_close_matches(leaf, names, n=1)
        near = f"; did you mean {'.'.join(filter(None, [parent, close[0]]))}?" if close else ""
        known = f" (known there: {', '.join(names)})" if names else ""
        return f"{where}: {key} is not a key of the config{near}{known}"
    return f"{where}: {key}: {m['what'].rstrip('.')}"


_UNKNOWN_KEY = re.compile(r"^Could not override '(?P<key>[^']+)'; To append to your config use (?P<plus>\+.+?); "
                          r"Key '(?P<leaf>[^']+)' not in '(?P<cls>\w+)'")


def _schema_fields(name: str) -> list[str] | None:
    """The fields of the schema dataclass ``name`` (ours, the sweeper plugin's, Hydra's), or None."""
    import dataclasses
    import importlib

    for module in ("sweeper.config", "hydra_plugins.sft_sweep.sft_sweep_sweeper", "hydra.conf"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None and dataclasses.is_dataclass(cls):
            return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    return None


def _near_key(line: str) -> str:
    """Hydra's refusal of an unknown key (``schedule.max_step=10``) with the close known key instead of its hint
    to add the key with ``+``, which the schema refuses next: ``did you mean schedule.max_steps=10?`` and the
    keys known there. Any other line as it is."""
    m = _UNKNOWN_KEY.match(line)
    names = _schema_fields(m["cls"]) if m else None
    if not m or not names:
        return line
    parts = m["key"].split(".")
    if m["leaf"] not in parts:
        return line
    at = parts.index(m["leaf"])
    close = difflib.get_close_matches(m["leaf"], names, n=1)
    known = f"known in {'.'.join(parts[:at]) or 'the config'}: {', '.join(names)}"
    rest = line[m.end():]
    if not close:
        return f"Could not override '{m['key']}': {m['key']} is not a key of the config; {known}{rest}"
    fixed = ".".join([*parts[:at], close[0], *parts[at + 1:]])
    value = m["plus"].split("=", 1)[1] if "=" in m["plus"] else "..."
    return (f"Could not override '{m['key']}': {'.'.join(parts[:at + 1])} is not a key of the config; did you mean "
            f"{fixed}={value}? ({known}){rest}")


def refusal_line(e: BaseException) -> str:
    """Bad input as the one line the sweep prints for it (Hydra's report of a composition error, its OmegaConf
    cause after it, through :func:`one_line`), for the commands that compose the config themselves (``plan``)."""
    from omegaconf.errors import OmegaConfBaseException

    text = str(e)
    if isinstance(e.__cause__, OmegaConfBaseException):
        text += "\n" + str(e.__cause__)
    if isinstance(e, OmegaConfBaseException) or isinstance(e.__cause__, OmegaConfBaseException) or "\n" in text:
        return one_line(text)
    return text


@dataclass
class _Shape:
    """Architecture numbers under their Hugging Face config names."""

    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    vocab_size: int = MISSING


@dataclass
class TinyModelConfig(_Shape):
    """Shape of the offline model built from a config (random init) when ``model.path`` is ``tiny``;
    ``vocab_size`` is the size of the byte-level BPE trained offline on the demo corpus."""

    max_position_embeddings: int = MISSING
    seed: int = MISSING


@dataclass
class ModelShape(_Shape):
    """Architecture numbers for planning when config.json is not at hand."""

    tie_word_embeddings: bool = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in study names and reports
    path: str = MISSING  # hub id, local directory, or "tiny" (built offline)
    dtype: str = MISSING  # auto | bf16 | fp16 | fp32: weights dtype; "auto" follows precision
    trust_remote_code: bool = MISSING
    attn_implementation: Optional[str] = None  # None: transformers' default (sdpa)
    tiny: Optional[TinyModelConfig] = None
    shape: Optional[ModelShape] = None  # for the plan's memory estimate without downloading config.json


@dataclass
class DataConfig:
    name: str = MISSING  # short name used in study names and reports
    train_path: str = MISSING  # .jsonl/.json/.csv/.parquet file, "demo", or a hub dataset id
    train_split: str = MISSING  # split name for hub datasets
    eval_path: Optional[str] = None  # None: split eval off train with eval_fraction
    eval_split: Optional[str] = None
    eval_fraction: float = MISSING  # share of train rows held out when eval_path is None
    max_train_rows: Optional[int] = None  # None: all rows; taken after the seeded shuffle
    max_eval_rows: Optional[int] = None
    seed: int = MISSING  # which rows: the eval_fraction split and the max_train_rows sample (top-level seed: their order)
    max_length: int = MISSING  # tokens; longer examples are truncated (TRL max_length)
    packing: bool = MISSING  # TRL bfd packing (+ padding-free)
    loss_on: str = MISSING  # completion | all: completion = assistant turns / completion column only
    demo_rows: Optional[int] = None  # rows generated for train_path=demo


@dataclass
class AutoBatchConfig:
    """batch=auto: fit the micro-batch to the GPU, keep the effective batch."""

    target_effective_batch: int = MISSING  # rows per optimizer step, kept exactly
    max_micro_batch: int = MISSING  # never try a larger micro-batch
    memory_fraction: float = MISSING  # share of the GPU's free memory the estimate may use
    probe: bool = MISSING  # confirm with real forward+backward probes on the longest prepared rows


@dataclass
class BatchConfig:
    per_device_train_batch_size: int = MISSING  # micro-batch, rows per forward pass
    gradient_accumulation_steps: int = MISSING  # micro-batches per optimizer step
    per_device_eval_batch_size: int = MISSING
    activation_checkpointing: bool = MISSING  # transformers 5 name of gradient checkpointing
    auto: Optional[AutoBatchConfig] = None  # batch=auto; the two values above are its CPU fallback


@dataclass
class HalvingConfig:
    """schedule.wsd.halving: successive halving of the learning rates' trunks at each candidate length."""

    rule: str = "successive_halving"  # successive_halving | none (every learning rate runs every length)
    eta: int = 3  # keep the best ceil(n / eta) of the n trunks at a length


@dataclass
class WsdConfig:
    """schedule=wsd_search: one warmup-stable-decay trunk with a cooldown branch per candidate."""

    candidates: List[int] = MISSING  # step counts to compare; each branch is one trial
    decay_fraction: float = MISSING  # cooldown share of each candidate, in (0, 1)
    decay_type: str = MISSING  # linear | cosine | 1-sqrt (transformers' WSD decay types)
    stop_after_worse: Optional[int] = None  # stop the trunk after this many successive worse branches; None: never
    no_win_patience: Optional[int] = None  # evaluations for which no later branch could win before the trunk stops; None: never
    gain_margin: float = 0.0  # a later cooldown may gain this much more than the newest one did (0.1: 10%)
    learning_rates: Optional[List[float]] = None  # one trunk per learning rate (a joint search); None: lr.learning_rate
    halving: Optional[HalvingConfig] = None  # joint search: which trunks go on at each candidate length


@dataclass
class ScheduleConfig:
    max_steps: Optional[int] = None  # optimizer steps; None: use num_train_epochs
    num_train_epochs: Optional[float] = None  # used only when max_steps is None
    wsd: Optional[WsdConfig] = None  # schedule=wsd_search: candidates searched by one WSD trunk


@dataclass
class LrConfig:
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING  # cosine | constant_with_warmup | linear | ...
    warmup_steps: float = MISSING  # < 1: fraction of the run; >= 1: optimizer steps
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    optim: str = MISSING  # transformers optimizer name, e.g. adamw_torch


@dataclass
class PrecisionConfig:
    name: str = MISSING
    compute: str = MISSING  # auto | bf16 | fp16 | fp32: autocast/weights dtype
    load_in_4bit: bool = MISSING  # QLoRA: bitsandbytes 4-bit base weights (needs peft=lora)
    bnb_4bit_quant_type: Optional[str] = None  # set by precision=qlora4 (nf4)
    bnb_4bit_use_double_quant: Optional[bool] = None


@dataclass
class PeftConfig:
    name: str = MISSING  # lora | none (full fine-tuning)
    r: Optional[int] = None
    lora_alpha: Optional[int] = None
    lora_dropout: Optional[float] = None
    target_modules: Any = None  # list of module names or "all-linear"


@dataclass
class SpeedConfig:
    """How fast steps run, never what they compute (``sweeper/speed.py``); ``auto``: on where it helps."""

    name: str = MISSING
    attention: str = MISSING  # auto | varlen | sdpa | eager: auto = varlen on a CUDA GPU in bf16/fp16, else sdpa
    padding_free: Any = MISSING  # auto | true | false: concatenate a micro-batch's rows, no pad tokens
    liger: Any = MISSING  # auto | true | false: Liger's RMSNorm/RoPE/SwiGLU kernels (CUDA, liger-kernel installed)
    fused_optimizer: Any = MISSING  # auto | true | false: adamw_torch -> adamw_torch_fused on CUDA
    compile: Any = MISSING  # false | true: torch.compile the whole model | regional: each decoder block in place
    lora_upcast: Any = MISSING  # auto | true | false: PEFT's cast of each LoRA layer's input to the adapters' fp32
    lora_fused: Any = MISSING  # auto | true | false: a LoRA linear's scale and add inside one addmm_ (autocast)
    graphs: Any = MISSING  # auto | true | false: the model's forward and backward (LM head included) replayed as CUDA graphs
    dataloader_num_workers: int = MISSING  # collation in worker processes; 0: in the training loop


@dataclass
class EvalConfig:
    eval_steps: int = MISSING  # optimizer steps between evaluations (also the curve's resolution)
    metric: str = MISSING  # objective reported to Optuna; the trial's value is its best over the run
    early_stopping_patience: Optional[int] = None  # evaluations without improvement; None: off
    early_stopping_threshold: float = MISSING  # minimum improvement that resets patience
    save_best: bool = MISSING  # keep the best checkpoint (only that one) in the job directory
    accuracy: str = MISSING  # auto | on | off: label accuracy by greedy generation at each evaluation
    accuracy_rows: int = MISSING  # eval rows scored for accuracy (generation is slower than the loss)
    logging_steps: int = MISSING


@dataclass
class StudyRef:
    """Filled in by the sweeper for each job of a multirun; both null in a single run."""

    name: Optional[str] = None
    trial_number: Optional[int] = None


@dataclass
class TrackingConfig:
    """Trials copied into a tracker besides the study (``sweeper/tracking``); credentials never here."""

    backend: str = MISSING  # none | mlflow | wandb
    uri: Optional[str] = None  # mlflow: the tracking server; null: $MLFLOW_TRACKING_URI
    project: Optional[str] = None  # wandb: null: $WANDB_PROJECT, else sft-sweep
    entity: Optional[str] = None  # wandb: the team or user; null: $WANDB_ENTITY or the key's default
    mode: Optional[str] = None  # wandb: online | offline; null: $WANDB_MODE, else online


@dataclass
class PathsConfig:
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr: LrConfig = field(default_factory=LrConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyRef = field(default_factory=StudyRef)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = MISSING
    retry_on_oom: bool = MISSING  # halve micro-batch, double accumulation (effective batch kept), down to 1
    report_to: str = MISSING  # none | tensorboard


# file (or folder) names that say which split a file holds, not which dataset
_SPLIT_NAMES = frozenset({"train", "training", "eval", "evaluation", "validation", "valid", "val", "dev", "test",
                          "data", "dataset", "all", "full"})


def dataset_name(path: Any) -> str:
    """The name ``data=jsonl`` gives the dataset of ``data.train_path`` (the study is ``<data.name>-<model.name>``):
    the file's name without its extensions (``my_rows.jsonl`` -> ``my_rows``), or, for a file named after a
    split, the nearest folder above it that is not (``clinc150/train.jsonl`` -> ``clinc150``), so that datasets
    laid out as ``<name>/train.jsonl`` each get their own study."""
    from pathlib import PurePath

    p = PurePath(str(path))
    stem = p.name.split(".")[0]
    if stem.lower() not in _SPLIT_NAMES:
        return stem
    return next((f for f in reversed(p.parent.parts) if f not in ("/", ".", "..") and f.lower() not in _SPLIT_NAMES),
                stem)


def register() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("stem"):  # data/jsonl.yaml: name a dataset after its file
        OmegaConf.register_new_resolver("stem", dataset_name)
    if not OmegaConf.has_resolver("first_set"):  # the sweep folder: study_name if set, else <data>-<model>
        OmegaConf.register_new_resolver("first_set", lambda *xs: next((x for x in xs if x is not None), None))


_COMPUTE = ("auto", "bf16", "fp16", "fp32")
_LOSS_ON = ("completion", "all")
_PEFT = ("lora", "none")
_ATTENTION = ("auto", "varlen", "sdpa", "eager")
# eval_mean_token_accuracy: TRL's share of completion tokens predicted right (top-1), logged at every evaluation
_METRICS = {"eval_loss": "minimize", "eval_accuracy": "maximize", "eval_mean_token_accuracy": "maximize"}


def metric_direction(metric: str) -> str:
    """Optuna direction for an objective metric name."""
    if metric not in _METRICS:
        raise ValueError(
            f"eval.metric must be one of {sorted(_METRICS)}, but got {metric!r}; "
            f"set eval.metric=eval_loss"
        )
    return _METRICS[metric]


WSD_DECAY_TYPES = ("linear", "cosine", "1-sqrt")
MAX_STEPS = 10_000_000  # optimizer steps of one run: months at any speed; more is a typo (1e12) or an overflow
MAX_EPOCHS = 10_000
MAX_SEED = 2**32 - 1  # numpy's seed range (transformers' set_seed seeds numpy too)


def wsd_warmup_steps(cfg: Any) -> int:
    """schedule=wsd_search: the one warmup length (optimizer steps) of the trunk and every branch:
    ``lr.warmup_steps`` when >= 1, else that fraction of the smallest candidate (rounded up, as
    transformers rounds a warmup ratio)."""
    import math

    w = float(cfg.lr.warmup_steps)
    return int(w) if w >= 1 else math.ceil(w * min(cfg.schedule.wsd.candidates))


def wsd_branch_point(steps: int, decay_fraction: float) -> int:
    """Where the cooldown of a ``steps``-long WSD branch starts: steps - round(decay_fraction * steps)."""
    return steps - round(decay_fraction * steps)


def _validate_learning_rates(w: Any) -> None:
    """schedule.wsd.learning_rates (null, or distinct positive numbers) and schedule.wsd.halving."""
    import math

    from sweeper.halving import RULES

    rates = w.get("learning_rates")
    if rates is not None:
        rates = list(rates)
        if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0
                            for r in rates):
            raise ValueError(f"schedule.wsd.learning_rates must be null or a non-empty list of positive numbers, but "
                             f"got {rates}; e.g. schedule.wsd.learning_rates=[1e-4,2e-4,4e-4]")
        if len({float(r) for r in rates}) != len(rates):
            raise ValueError(f"schedule.wsd.learning_rates must not repeat a rate, but got {rates}; list each "
                             "learning rate once")
    h = w.get("halving")
    if h is not None:
        if h.rule not in RULES:
            raise ValueError(f"schedule.wsd.halving.rule must be one of {list(RULES)}, but got {h.rule!r}; set "
                             "schedule.wsd.halving.rule=successive_halving")
        if isinstance(h.eta, bool) or not isinstance(h.eta, int) or h.eta < 2:
            raise ValueError(f"schedule.wsd.halving.eta must be an integer >= 2 (keep the best 1/eta at each "
                             f"length), but got {h.eta}; set schedule.wsd.halving.eta=3")


def _set_by(cfg: Any, key: str) -> str | None:
    """The option of the command that sets ``key`` (``+debug=fast`` sets ``schedule.max_steps``), as the command
    wrote it, for a message: the last chosen config file of the ``_global_`` package that gives ``key`` a value.
    None when the command line sets ``key`` itself, or no chosen file does, or the choices are not at hand."""
    from pathlib import Path

    from omegaconf import OmegaConf

    hydra = cfg.hydra if "hydra" in cfg else None
    if hydra is None:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.instance().cfg.hydra if HydraConfig.initialized() else None
    if hydra is None:
        return None
    try:
        given = {o.lstrip("+~").split("=", 1)[0]: o for o in hydra.overrides.task}
        if key in given:
            return None
        folders = [Path(src.path) for src in hydra.runtime.config_sources if src.schema == "file"]
        found = None
        for group, option in hydra.runtime.choices.items():
            if option is None or group.startswith("hydra"):
                continue
            path = next((f / group / f"{option}.yaml" for f in folders if (f / group / f"{option}.yaml").is_file()),
                        None)
            text = path.read_text(encoding="utf-8") if path is not None else ""
            if "@package _global_" in text and OmegaConf.select(OmegaConf.create(text), key) is not None:
                found = given.get(group, f"{group}={option}")
        return found
    except Exception:  # a file that does not parse here: the message goes without its origin
        return None


def _validate_wsd(cfg: Any) -> None:
    s, w = cfg.schedule, cfg.schedule.wsd
    if s.max_steps is not None or s.num_train_epochs is not None:
        got, fix = [], []
        for key, value in (("max_steps", s.max_steps), ("num_train_epochs", s.num_train_epochs)):
            by = _set_by(cfg, f"schedule.{key}") if value is not None else None
            got.append(f"{key}={value}" + (f" (from {by})" if by else ""))
            fix += [f"schedule.{key}=null"] if value is not None else []
        raise ValueError(
            f"schedule.wsd searches the length itself, so schedule.max_steps and schedule.num_train_epochs must "
            f"be null, but got {', '.join(got)}; set {' '.join(fix)} and give the lengths in "
            "schedule.wsd.candidates=[...]")
    cands = list(w.candidates)
    if any(isinstance(c, int) and c > MAX_STEPS for c in cands):
        raise ValueError(f"schedule.wsd.candidates must be at most {MAX_STEPS:,} steps each, but got {cands}; "
                         "e.g. schedule.wsd.candidates=[500,1500,3000]")
    if not cands or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cands):
        raise ValueError(f"schedule.wsd.candidates must be a non-empty list of positive integers (steps), but got "
                         f"{cands}; e.g. schedule.wsd.candidates=[500,1500,3000]")
    if len(set(cands)) != len(cands):
        raise ValueError(f"schedule.wsd.candidates must not repeat a step count, but got {cands}; "
                         f"e.g. schedule.wsd.candidates=[{','.join(str(c) for c in sorted(set(cands)))}]")
    if not 0.0 < w.decay_fraction < 1.0:
        raise ValueError(f"schedule.wsd.decay_fraction must be between 0 and 1 (exclusive), but got "
                         f"{w.decay_fraction}; set schedule.wsd.decay_fraction=0.2")
    if w.decay_type not in WSD_DECAY_TYPES:
        raise ValueError(f"schedule.wsd.decay_type must be one of {list(WSD_DECAY_TYPES)}, but got "
                         f"{w.decay_type!r}; set schedule.wsd.decay_type=1-sqrt")
    if w.stop_after_worse is not None and w.stop_after_worse < 1:
        raise ValueError(f"schedule.wsd.stop_after_worse must be >= 1 or null (never stop the trunk), but got "
                         f"{w.stop_after_worse}; set schedule.wsd.stop_after_worse=2")
    _validate_learning_rates(w)
    patience = w.get("no_win_patience")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"schedule.wsd.no_win_patience must be an integer >= 1 (trunk evaluations) or null (never "
                         f"stop on it), but got {patience}; set schedule.wsd.no_win_patience=3")
    margin = w.get("gain_margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin <= 10:
        raise ValueError(f"schedule.wsd.gain_margin must be a number from 0 to 10 (0.1: a later cooldown may gain "
                         f"10% more than the newest one), but got {margin}; set schedule.wsd.gain_margin=0.1")
    points = sorted((wsd_branch_point(c, w.decay_fraction), c) for c in cands)
    for (p, c), (q, d) in zip(points, points[1:]):
        if p >= q:
            raise ValueError(f"schedule.wsd.candidates {c} and {d} branch at steps {p} and {q} (decay_fraction="
                             f"{w.decay_fraction}): branch points must strictly increase; space the candidates "
                             "further apart or lower schedule.wsd.decay_fraction")
    first, warm = points[0], wsd_warmup_steps(cfg)
    if first[0] < 1 or warm >= first[0]:
        raise ValueError(f"lr.warmup_steps ({warm} steps) must be shorter than the first WSD branch point "
                         f"({first[0]}, candidate {first[1]} with decay_fraction={w.decay_fraction}); lower "
                         "lr.warmup_steps or raise the smallest schedule.wsd.candidates")


def _unknown_keys(node: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys that no schema dataclass declares (``+schedule.max_stepz=20`` gets past Hydra's struct
    mode): ``[(dotted key, the keys known there)]``; the ``hydra`` node is Hydra's own."""
    import dataclasses

    from omegaconf import OmegaConf

    cls = OmegaConf.get_type(node)
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else None
    out = []
    for key in node.keys():
        if not prefix and key == "hydra":
            continue
        if names is not None and key not in names:
            out.append((f"{prefix}{key}", names))
            continue
        child = node._get_node(key)
        if OmegaConf.is_dict(child) and not child._is_none() and not child._is_missing():
            out.extend(_unknown_keys(child, f"{prefix}{key}."))
    return out


def validate(cfg: Any) -> None:
    """Check rules that span keys; raise one ValueError that says rule, value and fix."""
    from omegaconf import OmegaConf

    unknown = _unknown_keys(cfg)
    if unknown:
        import difflib

        key, known = unknown[0]
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
        hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
        raise ValueError(f"{key} is not a key of the config (added with +, so Hydra accepted it){hint}; "
                         f"known here: {', '.join(known)}")
    missing = sorted(OmegaConf.missing_keys(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    if missing:
        raise ValueError(missing_line(missing))
    for key, value in (("data.name", cfg.data.name), ("model.name", cfg.model.name)):
        if not str(value).strip():
            raise ValueError(f"{key} must not be empty: it names the study (<data.name>-<model.name>), its folder and "
                             f"the report's rows; e.g. {key}={'mydata' if key == 'data.name' else 'qwen2.5-1.5b'}")
    _validate_schedule(cfg)
    _validate_training(cfg)
    _validate_eval(cfg)
    _validate_speed(cfg)
    from sweeper import tracking

    tracking.check(cfg)  # the tracker's package installed, no password in tracking.uri


def _validate_schedule(cfg: Any) -> None:
    """The schedule: one of max_steps and num_train_epochs, in range (a WSD search: its own rules)."""
    s = cfg.schedule
    if s.get("wsd") is not None:
        _validate_wsd(cfg)
    elif (s.max_steps is None) == (s.num_train_epochs is None):
        raise ValueError(
            "schedule: set exactly one of schedule.max_steps and schedule.num_train_epochs, but got "
            f"max_steps={s.max_steps}, num_train_epochs={s.num_train_epochs}; pick schedule=sweet "
            "or schedule=epochs3"
        )
    if s.max_steps is not None and s.max_steps <= 0:
        raise ValueError(
            f"schedule.max_steps must be positive, but got {s.max_steps}; pick schedule=sweet "
            "or set schedule.max_steps=1500"
        )
    if s.max_steps is not None and s.max_steps > MAX_STEPS:
        raise ValueError(
            f"schedule.max_steps must be at most {MAX_STEPS:,} (months of training at any speed), but got "
            f"{s.max_steps:,}; pick schedule=sweet or set schedule.max_steps=1500")
    if s.num_train_epochs is not None and s.num_train_epochs <= 0:
        raise ValueError(
            f"schedule.num_train_epochs must be positive, but got {s.num_train_epochs}; "
            "pick schedule=epochs3"
        )
    if s.num_train_epochs is not None and s.num_train_epochs > MAX_EPOCHS:
        raise ValueError(f"schedule.num_train_epochs must be at most {MAX_EPOCHS:,}, but got {s.num_train_epochs:g}; "
                         "pick schedule=epochs3")


def check_seeds(cfg: Any) -> None:
    """``seed`` and ``data.seed`` in numpy's range; a sweep checks them before its sampler takes ``seed``."""
    for key, seed in (("seed", cfg.seed), ("data.seed", cfg.data.seed)):
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"{key} must be between 0 and {MAX_SEED} (numpy's seed range), but got {seed}; "
                             f"e.g. {key}=42")


def _validate_training(cfg: Any) -> None:
    """Seeds, warmup and learning rate, batch, data, precision and method."""
    s = cfg.schedule
    check_seeds(cfg)
    w = cfg.lr.warmup_steps
    if w < 0:
        raise ValueError(f"lr.warmup_steps must be >= 0, but got {w}; set lr.warmup_steps=0.03")
    if w >= 1 and s.max_steps is not None and w >= s.max_steps:
        raise ValueError(
            f"lr.warmup_steps ({w:g} steps) must be shorter than schedule.max_steps ({s.max_steps}); "
            "use a fraction such as lr.warmup_steps=0.03 or raise schedule.max_steps"
        )
    if cfg.lr.learning_rate <= 0:
        raise ValueError(
            f"lr.learning_rate must be positive, but got {cfg.lr.learning_rate}; pick lr=lora or lr=full"
        )
    if SWEEP_ID_ENV not in os.environ:  # a sweep's worker: the command checked every point before it started
        _validate_transformers_names(cfg.lr)
    for key, least, what in (("weight_decay", 0, "0: none"), ("max_grad_norm", 0, "0: no clipping")):
        value = cfg.lr[key]
        if not value >= least:
            raise ValueError(f"lr.{key} must be >= {least} ({what}), but got {value}; pick lr=lora or lr=full")
    peft = cfg.peft
    if peft.name == "lora":
        if peft.r is not None and peft.r < 1:
            raise ValueError(f"peft.r (the LoRA rank) must be >= 1, but got {peft.r}; e.g. peft.r=16")
        if peft.lora_alpha is not None and peft.lora_alpha <= 0:
            raise ValueError(f"peft.lora_alpha must be positive, but got {peft.lora_alpha}; e.g. peft.lora_alpha=32")
        if peft.lora_dropout is not None and not 0 <= peft.lora_dropout < 1:
            raise ValueError(f"peft.lora_dropout must be in [0, 1), but got {peft.lora_dropout}; e.g. "
                             "peft.lora_dropout=0.05")
    b = cfg.batch
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        if getattr(b, key) < 1:
            raise ValueError(f"batch.{key} must be >= 1, but got {getattr(b, key)}; pick batch=balanced")
    d = cfg.data
    if d.eval_path is None and not 0.0 < d.eval_fraction < 1.0:
        raise ValueError(
            f"data.eval_fraction must be between 0 and 1 (exclusive) when data.eval_path is null, "
            f"but got {d.eval_fraction}; set data.eval_fraction=0.1 or give data.eval_path"
        )
    if d.loss_on not in _LOSS_ON:
        raise ValueError(f"data.loss_on must be one of {list(_LOSS_ON)}, but got {d.loss_on!r}")
    if d.max_length < 8:
        raise ValueError(f"data.max_length must be >= 8 tokens, but got {d.max_length}")
    p = cfg.precision
    if p.compute not in _COMPUTE:
        raise ValueError(
            f"precision.compute must be one of {list(_COMPUTE)}, but got {p.compute!r}; pick precision=auto"
        )
    if cfg.model.dtype not in _COMPUTE:
        raise ValueError(f"model.dtype must be one of {list(_COMPUTE)}, but got {cfg.model.dtype!r}")
    if cfg.peft.name not in _PEFT:
        raise ValueError(f"peft must be one of {list(_PEFT)}, but got {cfg.peft.name!r}; pick peft=lora")
    if p.load_in_4bit and (p.bnb_4bit_quant_type is None or p.bnb_4bit_use_double_quant is None):
        raise ValueError(f"precision={p.name} loads 4-bit weights and must set precision.bnb_4bit_quant_type "
                         "and precision.bnb_4bit_use_double_quant; pick precision=qlora4")
    if p.load_in_4bit and cfg.peft.name != "lora":
        raise ValueError(
            f"precision={p.name} loads 4-bit weights, which can only be trained through adapters, "
            f"but peft={cfg.peft.name}; add peft=lora"
        )
    a = b.auto
    if a is not None:
        if a.target_effective_batch < 1 or a.max_micro_batch < 1:
            raise ValueError(
                f"batch.auto.target_effective_batch and batch.auto.max_micro_batch must be >= 1, but got "
                f"{a.target_effective_batch} and {a.max_micro_batch}")
        if not 0.1 <= a.memory_fraction <= 0.98:
            raise ValueError(f"batch.auto.memory_fraction must be in [0.1, 0.98], but got {a.memory_fraction}")


def _validate_transformers_names(lr: Any) -> None:
    """lr.lr_scheduler_type and lr.optim: names transformers knows (its ``SchedulerType``, ``OptimizerNames``),
    checked here rather than when the trainer is built (imports transformers, which every caller uses next)."""
    import difflib

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, value, names in (("lr.lr_scheduler_type", lr.lr_scheduler_type, SchedulerType),
                              ("lr.optim", lr.optim, OptimizerNames)):
        valid = [n.value for n in names]
        if value not in valid:
            close = difflib.get_close_matches(str(value), valid, n=1)
            hint = f"; did you mean {key}={close[0]}?" if close else ""
            raise ValueError(f"{key} must be one of transformers' {names.__name__} ({', '.join(valid)}), but got "
                             f"{value!r}{hint}")


def _validate_eval(cfg: Any) -> None:
    """Evaluation cadence, early stopping, the metric and the accuracy metric."""
    e = cfg.eval
    if e.eval_steps < 1:
        raise ValueError(f"eval.eval_steps must be >= 1, but got {e.eval_steps}; set eval.eval_steps=50")
    if e.logging_steps < 1:
        raise ValueError(f"eval.logging_steps must be >= 1 (optimizer steps between train-loss logs), but got "
                         f"{e.logging_steps}; set eval.logging_steps=10")
    if e.early_stopping_patience is not None and e.early_stopping_patience < 1:
        raise ValueError(
            f"eval.early_stopping_patience must be >= 1 or null (off), but got {e.early_stopping_patience}"
        )
    threshold = e.early_stopping_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"eval.early_stopping_threshold must be >= 0 (the least improvement of eval.metric that "
                         f"resets the patience), but got {threshold}; set eval.early_stopping_threshold=0.0")
    metric_direction(e.metric)
    if e.accuracy not in ("auto", "on", "off"):
        raise ValueError(f"eval.accuracy must be one of ['auto', 'on', 'off'], but got {e.accuracy!r}")
    if e.metric == "eval_accuracy" and e.accuracy == "off":
        raise ValueError("eval.metric=eval_accuracy needs the accuracy metric, but eval.accuracy=off; "
                         "set eval.accuracy=on (or auto for classification data)")
    if e.accuracy_rows < 1:
        raise ValueError(f"eval.accuracy_rows must be >= 1, but got {e.accuracy_rows}")


def _validate_speed(cfg: Any) -> None:
    """The ``speed`` group's choices and ``report_to``."""
    sp = cfg.speed
    if sp.attention not in _ATTENTION:
        raise ValueError(f"speed.attention must be one of {list(_ATTENTION)}, but got {sp.attention!r}; "
                         "pick speed=auto")
    if sp.compile not in (False, True, "regional"):
        raise ValueError(f"speed.compile must be false, true (the whole model) or regional (each decoder block), "
                         f"but got {sp.compile!r}")
    for key in ("padding_free", "liger", "fused_optimizer", "lora_upcast", "lora_fused", "graphs"):
        if sp[key] not in ("auto", True, False):
            raise ValueError(f"speed.{key} must be auto, true or false, but got {sp[key]!r}")
    if sp.dataloader_num_workers < 0:
        raise ValueError(f"speed.dataloader_num_workers must be >= 0, but got {sp.dataloader_num_workers}")
    if cfg.report_to not in ("none", "tensorboard"):
        raise ValueError(f"report_to must be 'none' or 'tensorboard', but got {cfg.report_to!r}")
