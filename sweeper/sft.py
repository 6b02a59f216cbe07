"""TRL, in one place: the SFTConfig of a run, its PEFT config, the trainer, and the data exactly as the
trainer will iterate it (for the plan and the pre-flight)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from sweeper import config as config_mod
from sweeper import data as data_mod
from sweeper import extras
from sweeper import gpu as gpu_mod
from sweeper import model as model_mod
from sweeper import spec as spec_mod
from sweeper import speed as speed_mod
from sweeper.config import PeftConfig
from sweeper.plan import Plan, make_plan
from sweeper.spec import RunSpec

__all__ = ["PREPARATION_MODULES", "SNIPPET_KEYS", "build_sft_config", "check_kept", "check_prepared_data", "import_ahead", "make_trainer", "median_tokens", "peft_config", "truncation_drops",
           "plan_for", "plan_on_trainer", "prepare_for_plan"]

log = logging.getLogger(__name__)

# SFTConfig fields the report's ready-to-paste snippet repeats (TRL's own names)
SNIPPET_KEYS = (
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
    "bf16", "fp16", "max_length", "packing", "assistant_only_loss", "completion_only_loss",
    "activation_checkpointing", "eval_steps", "seed",
)


def dataset_procs(rows: int | None) -> int | None:
    """Processes for TRL's tokenisation of ``rows`` train rows (``dataset_num_proc``): one per 1,000 rows, at
    most 8 and half this machine's cores; None (one process) below two. The same count everywhere on one
    machine, so that a trial finds the sweep's pre-flight preparation in the ``datasets`` cache (whose files
    depend on it)."""
    procs = min(8, (os.cpu_count() or 1) // 2, (rows or 0) // 1000)
    return procs if procs >= 2 else None


def build_sft_config(spec: RunSpec, *, output_dir: Path, data_format: str, fitted: bool = False,
                     rows: int | None = None) -> Any:
    """TRL's SFTConfig of ``spec`` (names are TRL's own): its schedule, batch, compute and speed settings
    and the groups it keeps. ``fitted``: batch=auto fitted the micro-batch, so the eval batch is the same
    (eval logits must fit too). ``rows``: the train rows, which set the tokenising processes
    (:func:`dataset_procs`)."""
    import torch
    from trl import SFTConfig

    if spec.compute == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            f"precision={spec.precision.name} (fp16 mixed precision) needs a CUDA GPU, and none is visible; "
            "pick precision=auto (fp32 on CPU) or precision=fp32"
        )
    e, b, lr, s, data = spec.eval, spec.batch, spec.lr, spec.schedule, spec.data
    completion = data.loss_on == "completion"
    return SFTConfig(
        output_dir=str(output_dir),
        seed=spec.seed,  # also the order of the train rows in batches (data_seed left None follows it)
        # schedule
        max_steps=int(s.max_steps) if s.max_steps is not None else -1,
        num_train_epochs=float(s.num_train_epochs) if s.num_train_epochs is not None else 1.0,
        lr_scheduler_type=s.lr_scheduler_type,
        lr_scheduler_kwargs=dict(s.lr_scheduler_kwargs),
        warmup_steps=s.warmup_steps,
        # batch
        per_device_train_batch_size=b.micro,
        gradient_accumulation_steps=b.accum,
        per_device_eval_batch_size=b.micro if fitted else int(b.eval_batch or spec.batch_config.per_device_eval_batch_size),
        activation_checkpointing=bool(spec.batch_config.activation_checkpointing),
        # lr
        learning_rate=float(s.learning_rate if s.learning_rate is not None else lr.learning_rate),
        weight_decay=float(lr.weight_decay),
        max_grad_norm=float(lr.max_grad_norm),
        # precision
        bf16=spec.compute == "bf16",
        fp16=spec.compute == "fp16",
        use_cpu=not torch.cuda.is_available(),
        # data (TRL)
        max_length=int(data.max_length),
        packing=bool(data.packing),
        dataset_num_proc=dataset_procs(rows),
        assistant_only_loss=completion and data_format == "messages",
        completion_only_loss=completion if data_format == "prompt_completion" else None,
        # evaluation, early stopping, checkpoints
        eval_strategy="steps",
        eval_steps=int(e.eval_steps),
        metric_for_best_model=spec.metric,
        greater_is_better=spec.maximize,
        save_strategy="best" if e.save_best else "no",
        save_total_limit=1,
        load_best_model_at_end=False,
        logging_steps=int(e.logging_steps),
        logging_nan_inf_filter=False,  # a NaN loss must show, so the run fails as diverged
        report_to=[] if spec.report_to == "none" else [spec.report_to],
        include_num_input_tokens_seen="non_padding",
        **speed_mod.sft_config_kwargs(spec.speed),  # optim, padding_free, torch_compile, dataloader workers
    )


def peft_config(peft: PeftConfig) -> Any:
    """PEFT's LoraConfig of the ``peft`` group; None for full fine-tuning (``peft=none``)."""
    if peft.name != "lora":
        return None
    from peft import LoraConfig

    target = peft.target_modules
    return LoraConfig(
        r=int(peft.r), lora_alpha=int(peft.lora_alpha), lora_dropout=float(peft.lora_dropout),
        target_modules=list(target) if target is not None and not isinstance(target, str) else target,
        task_type="CAUSAL_LM",
    )


def make_trainer(model: Any, tokenizer: Any, args: Any, splits: data_mod.Splits, peft: PeftConfig,
                 callbacks: list) -> Any:
    """TRL's SFTTrainer on the splits (TRL tokenises, truncates and packs; the datasets cache makes that
    once per sweep); its model card is written once (:func:`card_once`)."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
                         processing_class=tokenizer, peft_config=peft_config(peft), callbacks=callbacks)
    card_once(trainer)
    return trainer


def card_once(trainer: Any) -> None:
    """TRL writes its model card (``README.md`` in the job directory) before every checkpoint save, the same card
    each time (package versions read from their metadata, a template rendered: ~20 ms on a 2-core CPU, with the
    GPU idle, at each new best evaluation); the trainer now writes it at its first call with given arguments."""
    make, made = trainer.create_model_card, set()

    def create_model_card(*args: Any, **kwargs: Any) -> None:
        key = repr((args, sorted(kwargs.items())))
        if key not in made:
            make(*args, **kwargs)
            made.add(key)

    trainer.create_model_card = create_model_card


def _row_lengths(dataset: Any) -> Any:
    """Tokens per row of a tokenised dataset, as a numpy array, read from Arrow's list lengths (its rows' order and
    selection kept): a trial's plan reads them before its first step, with the GPU idle; reading the token lists
    into Python for its mean and its median took ~0.3 s per trial on gsm8k's 7,099 rows on a 2-core CPU."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)


def _mean_tokens(dataset: Any) -> float:
    if dataset is None or len(dataset) == 0 or "input_ids" not in dataset.column_names:
        return 0.0
    return int(_row_lengths(dataset).sum()) / len(dataset)


def median_tokens(dataset: Any) -> float | None:
    """Median tokens per prepared train row (per packed sequence with packing); None untokenised."""
    if dataset is None or len(dataset) == 0 or "input_ids" not in dataset.column_names:
        return None
    import numpy as np

    return float(np.median(_row_lengths(dataset)))


def prepare_for_plan(spec: RunSpec, splits: data_mod.Splits) -> tuple[Any, int]:
    """The train set exactly as a trial's SFTTrainer will iterate it (tokenised, truncation drops,
    packing) and the prepared eval rows, without loading the model's weights: TRL prepares the data
    with the real tokenizer and the SFTConfig of ``spec`` (see :func:`sweeper.spec.for_preparation`); a
    one-layer stand-in model of the same vocabulary fills the trainer's model slot. The ``datasets``
    cache makes the trial's own preparation a cache hit."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import SFTTrainer

    tokenizer = model_mod.load_tokenizer(spec.model, spec.paths.cache_dir)
    stand_in = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=max(int(spec.data.max_length), 8)))
    with tempfile.TemporaryDirectory() as tmp:
        args = build_sft_config(spec, output_dir=Path(tmp), data_format=splits.format, rows=len(splits.train))
        args.report_to = []
        trainer = SFTTrainer(model=stand_in, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
                             processing_class=tokenizer)
        return trainer.train_dataset, len(trainer.eval_dataset)


def plan_for(spec: RunSpec, prepared: Any, micro: int | None = None, accum: int | None = None,
             n_gpus: int = 1) -> Plan:
    """The plan of ``spec`` on its prepared train set (``micro``/``accum``: the batch it trains with,
    default ``spec.batch``); a WSD search is planned as its trunk, the longest candidate."""
    s = spec.schedule
    return make_plan(
        train_rows=len(prepared),
        micro_batch=int(micro or spec.batch.micro),
        grad_accum=int(accum or spec.batch.accum),
        n_gpus=n_gpus,
        max_steps=s.max_steps if spec.wsd is None else max(spec.wsd.candidates),
        num_train_epochs=s.num_train_epochs if spec.wsd is None else None,
        mean_tokens_per_row=_mean_tokens(prepared),
        warmup=float(spec.lr.warmup_steps),
    )


def truncation_drops(rows: int, prepared: int, data: Any) -> str | None:
    """Why TRL's preparation kept fewer train rows than the data has (unpacked rows only: packing changes the
    count by design); None when it kept them all."""
    dropped = rows - prepared if not data.packing else 0
    if dropped <= 0:
        return None
    return (f"{dropped} of {rows} train rows lost all their loss tokens to truncation at data.max_length="
            f"{data.max_length} and were dropped; raise data.max_length to keep them")


def plan_on_trainer(spec: RunSpec, trainer: Any, splits: data_mod.Splits, args: Any) -> tuple[Plan, int]:
    """The plan on the prepared train set (after TRL's truncation drops and packing)."""
    prepared_rows = len(trainer.train_dataset)
    note = truncation_drops(len(splits.train), prepared_rows, spec.data)
    if note:
        log.warning("%s", note)
    plan = plan_for(spec, trainer.train_dataset, args.per_device_train_batch_size,
                    args.gradient_accumulation_steps, max(args.world_size, 1))
    return plan, prepared_rows


def check_prepared_data(cfg: DictConfig, splits: data_mod.Splits) -> None:
    """The sweep's pre-flight of TRL's preparation (``sweeper.sweep.preflight`` calls it with a composed config):
    ValueError when truncation at ``data.max_length`` leaves no train or no eval row (see
    :func:`sweeper.data.check_prepared`). With a GPU visible, the sweeper must not touch CUDA before it
    pins its own GPU (building a trainer does), so the check then runs in a child process that sees no
    GPU (:class:`sweeper.datacheck.DataCheck`); if that child fails for another reason, each trial checks it
    itself."""
    if not gpu_mod.visible_gpus():
        _check_prepared(spec_mod.for_preparation(cfg), splits)
        return
    from sweeper.datacheck import DataCheck

    DataCheck(cfg).wait()


def _check_prepared(spec: RunSpec, splits: data_mod.Splits) -> None:
    prepared, eval_rows = prepare_for_plan(spec, splits)
    check_kept(spec.data, splits, len(prepared), eval_rows,
               lambda: model_mod.load_tokenizer(spec.model, spec.paths.cache_dir))


def prompt_lengths(rows: Any, fmt: str, tokenizer: Any) -> list[int]:
    """The tokens before each row's first loss token, as TRL tokenises it: a conversation through the chat template
    up to its first assistant turn, with the generation prompt; a plain prompt as it is."""
    lengths = []
    for row in rows:
        if fmt == "messages" or not isinstance(row["prompt"], str):
            msgs = list(row["messages"]) if fmt == "messages" else list(row["prompt"])
            first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
            ids = tokenizer.apply_chat_template(msgs[:first], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer(row["prompt"])["input_ids"]
        lengths.append(len(ids))
    return lengths


def check_kept(data: Any, splits: data_mod.Splits, train_rows: int, eval_rows: int, tokenizer: Callable[[], Any]
               ) -> None:
    """:func:`sweeper.data.check_prepared` on the rows TRL kept; its refusal names the data.max_length that keeps
    them, measured with the model's tokenizer (``tokenizer()`` returns it; called only then)."""
    def prompt_tokens(rows: Any) -> list[int]:
        return prompt_lengths(rows, splits.format, tokenizer())

    data_mod.check_prepared(splits, data, train_rows, eval_rows, prompt_tokens)


CONFIG_WAIT_S = 900  # the data check's child waits this long for its config, then ends


def import_ahead(*modules: str) -> None:
    """Import ``modules`` now (a process that will need them imports them while it waits on something else);
    a failure is left to the code that needs them, which reports it."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            log.debug("importing %s ahead failed: %s", name, e)


# what :func:`prepare_for_plan` imports: TRL's trainer, transformers' stand-in model, datasets
PREPARATION_MODULES = ("datasets", "trl.trainer.sft_trainer", "transformers.models.qwen2.modeling_qwen2")


def _check_in_child(source: str) -> int:
    """``python -m sweeper.sft -`` (the config's YAML on stdin, :mod:`sweeper.datacheck`) or ``python -m
    sweeper.sft CONFIG.yaml``: :func:`check_prepared_data` of a resolved config on CPU; exit 2 with the one line
    on stderr when the data cannot be trained on; exit 3 when stdin ends, or stays empty for
    :data:`CONFIG_WAIT_S`, with no config (a command that checks no data: the child ends rather than wait
    idle). The process is the command's own: the optional packages stay out of it (the check tracks nothing and
    loads no 4-bit base: ~2.5 s of imports), and it imports what the check needs before it reads the config
    (which the command sends once it has composed it)."""
    extras.allow()
    extras.leave_out_unused([])
    got: list[str] = []
    if source == "-":  # read beside the imports: the command's write never waits on a full pipe
        import threading

        reader = threading.Thread(target=lambda: got.append(sys.stdin.read()), daemon=True)
        reader.start()
    import_ahead(*PREPARATION_MODULES)
    if source == "-":
        reader.join(CONFIG_WAIT_S)
        text = got[0] if got else ""
    else:
        text = Path(source).read_text()
    if not text.strip():  # the command ended the child's stdin, or sent nothing in time (a sweeper of its own)
        print("no config reached the data check's child", file=sys.stderr)
        return 3
    cfg = OmegaConf.merge(OmegaConf.structured(config_mod.Config), OmegaConf.create(text))
    try:
        spec = spec_mod.for_preparation(cfg)
        _check_prepared(spec, data_mod.load(spec.data, spec.paths.cache_dir))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_check_in_child(sys.argv[1]))
