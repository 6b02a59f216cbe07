"""`python -m sweeper plan`: what each run of a sweep would do, before any GPU time.

    python -m sweeper plan schedule=under,sweet,over
    python -m sweeper plan schedule=under,sweet,over data=banking77 model=qwen2.5-1.5b batch=aggressive

Takes the same overrides as ``python train.py -m``: comma lists, ``choice`` and ``range`` expand
into one row each; an ``interval`` is planned at both ends. A sweep over several datasets or models
(``data=a,b``) prints one block per study. Each row is computed on the prepared
dataset (tokenised by TRL with the model's tokenizer; with packing, packed sequences), so steps
per epoch are what the trainer will really run.

Preparing a large dataset takes a while (TRL tokenises, and with packing packs, every row): a line on
stderr names each dataset as it is prepared, and on a terminal the ``datasets`` progress bars show.
Without the model's tokenizer (a hub id offline and not cached) the rows are planned unprepared:
tokens show as "–" and a note says why.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from typing import Any

from sweeper import interrupt, records

__all__ = ["main", "plan_rows", "render"]

log = logging.getLogger(__name__)


def _expand(overrides: list[str]) -> list[list[str]]:
    """Override lists, one per planned row."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    from sweeper.space import translate

    axes: list[list[str]] = []
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.get_key_element()
        if not ov.is_sweep_override():
            axes.append([ov.input_line])
        elif isinstance(ov.value(), IntervalSweep):
            axes.append([f"{key}={ov.value().start!r}", f"{key}={ov.value().end!r}"])
        else:
            _, pairs = translate(ov, grid_sampler=True)
            axes.append([f"{key}={text}" for _, text in pairs])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def plan_rows(overrides: list[str], config_dir: str | None = None) -> list[dict]:
    """Compose each row's config (the shipped groups, and ``config_dir``'s as ``--config-dir`` adds them),
    prepare its data, and plan it. Raises on bad input."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from sweeper import config as config_mod
    from sweeper import data as data_mod
    from sweeper import identity, userconf
    from sweeper import spec as spec_mod
    from sweeper.gpu import pin_one, visible_gpus
    from sweeper.model import check_path, load_tokenizer, model_shape, resolve_compute
    from sweeper.plan import estimate_memory
    from sweeper.sft import check_kept, plan_for, prepare_for_plan, truncation_drops

    config_mod.register()
    gpus = visible_gpus()  # every visible GPU, for the fit table
    pin_one()  # TRL prepares the data in a stand-in SFTTrainer, which refuses several visible GPUs
    rows, prepared_cache = [], {}
    for row_overrides in _expand(overrides):
        GlobalHydra.instance().clear()
        with userconf.initialize(config_dir):
            cfg = compose(config_name="config", overrides=row_overrides, return_hydra_config=True)
        OmegaConf.set_readonly(cfg, False)
        config_mod.validate(cfg)  # first: it names keys left ??? (model=hub without model.name) in one line
        check_path(cfg.model)
        storage_url = str(cfg.hydra.sweeper.storage)
        study_name = identity.study_name(cfg)
        compute = resolve_compute(cfg.precision.compute)
        if compute == "fp32" and cfg.precision.compute == "auto":
            compute = "bf16"  # plan for the GPU the run will get, not for this machine's CPU
        spec = spec_mod.build(cfg, compute=compute, speed=None)  # speed: decided where the data is prepared
        key = (repr(dict(cfg.data)), repr(dict(cfg.model)), repr(dict(cfg.precision)))
        if key not in prepared_cache:
            splits = data_mod.load(spec.data, spec.paths.cache_dir)
            data_mod.check_train_size(splits, spec.batch_config, gpu=bool(gpus))
            note = None
            _say(f"preparing {cfg.data.name} with the model's tokenizer ({len(splits.train):,} train rows, "
                 f"{len(splits.eval):,} eval rows{', packed' if cfg.data.packing else ''})…")
            started = time.perf_counter()
            try:
                prepared, eval_rows = prepare_for_plan(spec_mod.for_preparation(cfg), splits)
            except ValueError as e:  # no tokenizer offline: plan on rows, say what is missing
                if "tokenizer" not in str(e) or cfg.data.packing:
                    raise
                prepared, eval_rows = splits.train, len(splits.eval)
                note = f"tokens unknown, rows planned unprepared: {e}"
                _say(f"planning {cfg.data.name} on unprepared rows: no tokenizer (see the note below the table)")
            else:
                _say(f"prepared {cfg.data.name} in {time.perf_counter() - started:.0f} s: {len(prepared):,} "
                     f"{'packed sequences' if cfg.data.packing else 'rows'}")
                check_kept(cfg.data, splits, len(prepared), eval_rows,  # as the sweep refuses it
                           lambda: load_tokenizer(spec.model, spec.paths.cache_dir))
            prepared_cache[key] = (splits, prepared, eval_rows, model_shape(spec.model, spec.paths.cache_dir), note)
        splits, prepared, eval_rows, shape, note = prepared_cache[key]
        plan = plan_for(spec, prepared)
        if "input_ids" in prepared.column_names:
            lengths = [len(x) for x in prepared["input_ids"]]
            seq_len = int(cfg.data.max_length) if cfg.data.packing else min(max(lengths), int(cfg.data.max_length))
        else:
            seq_len = int(cfg.data.max_length)
        est = estimate_memory(spec.training, shape, spec.batch.micro, seq_len, spec.compute, spec.batch.accum)
        fits = [g.index for g in gpus if est is not None and est.total_gib <= g.free_gib]
        tps = measured_throughput(storage_url, study_name)
        wall_s = plan.tokens / tps if tps and plan.tokens else None
        rows.append({
            "overrides": row_overrides, "cfg": cfg, "plan": plan, "study": study_name, "rows": len(splits.train),
            "prepared_rows": len(prepared), "eval_rows": eval_rows, "seq_len": seq_len, "memory": est,
            "gpus": gpus, "fits_on": fits, "wall_s": wall_s, "tokens_per_s": tps,
            "tokens_known": "input_ids" in prepared.column_names,
            "warnings": plan.warnings() + list(splits.notes) + ([note] if note else [])
            + ([w] if (w := truncation_drops(len(splits.train), len(prepared), cfg.data)) else []),
        })
    GlobalHydra.instance().clear()
    _note_other_settings(rows)
    return rows


def _note_other_settings(rows: list[dict]) -> None:
    """Warn on each row whose unswept settings no earlier trial of its study ran: the sweep would refuse
    it (see ``sweeper.identity``), so the plan says so, naming the keys."""
    from sweeper import fingerprint, identity

    configs = [identity.result_config(r["cfg"], fingerprint.data_content(r["cfg"].data, r["cfg"].paths.cache_dir))
               for r in rows]
    for r, config in zip(rows, configs):
        cfg, name = r["cfg"], r["study"]
        swept = identity.varying([c for c, o in zip(configs, rows) if o["study"] == name])  # within its study
        ran = _study_configs(str(cfg.hydra.sweeper.storage), name)
        if not ran or any(not identity.differences([c], config, swept) for c in ran):
            continue
        r["warnings"].append(
            f"study {name!r} ran other settings ({identity.describe_differences(identity.differences(ran, config, swept))}): "
            "the sweep would refuse this; name a new study with hydra.sweeper.study_name=... or add to it with "
            "hydra.sweeper.allow_config_change=true")


def _study_configs(storage_url: str, study_name: str) -> list[dict]:
    """The settings each trial of a study ran (``config`` system attr); [] when there is no such study."""
    import optuna

    from sweeper.storage import open_storage, sqlite_path

    db = sqlite_path(storage_url)
    if db is not None and not db.exists():
        return []
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    except (KeyError, ValueError):
        return []
    return [t.system_attrs[records.CONFIG] for t in study.get_trials(deepcopy=False) if records.CONFIG in t.system_attrs]


def _say(line: str) -> None:
    """Progress for the user, on stderr (stdout holds the plan itself)."""
    print(line, file=sys.stderr, flush=True)


def measured_throughput(storage_url: str, study_name: str) -> float | None:
    """Median real tokens/s of the finished trials of a study (None when there are none yet)."""
    import statistics

    import optuna

    from sweeper.storage import open_storage, sqlite_path

    db = sqlite_path(storage_url)
    if db is not None and not db.exists():
        return None
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    except (KeyError, ValueError):
        return None
    rates = [t.user_attrs["tokens_seen"] / t.user_attrs["train_runtime_s"]
             for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
             if t.user_attrs.get("train_runtime_s") and t.user_attrs.get("tokens_seen")]
    return statistics.median(rates) if rates else None


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def render(rows: list[dict]) -> str:
    """The plan as text: a table of the runs and a note on each; for a sweep over several datasets (or
    models), one block per study, in the sweep's order, each headed by the study it runs into."""
    studies = list(dict.fromkeys(r["study"] for r in rows))
    if len(studies) <= 1:
        lines = [_render_block(rows)]
    else:
        lines = []
        for name in studies:
            mine = [r for r in rows if r["study"] == name]
            cfg = mine[0]["cfg"]
            lines += [f"## study {name}: data {cfg.data.name}, model {cfg.model.name}, {len(mine)} run(s)", "",
                      _render_block(mine), ""]
    if rows and rows[0]["gpus"]:
        lines.append("")
        lines.append("GPUs now: " + "; ".join(f"{g.index} {g.name}: {g.free_gib:.1f} of {g.total_gib:.1f} GiB free"
                                              for g in rows[0]["gpus"]))
    return "\n".join(lines).rstrip("\n")


def _render_block(rows: list[dict]) -> str:
    lines = [
        "| run | eff. batch | steps/epoch | steps | epochs | samples | tokens/step | tokens | warmup | eval/save every "
        "| peak VRAM est. | fits on GPU | est. time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        p, cfg, est = r["plan"], r["cfg"], r["memory"]
        save = "best only" if cfg.eval.save_best else "never"
        vram = f"{est.total_gib:.1f} GiB" if est is not None else "unknown"
        if not r["gpus"]:
            fits = "no GPU visible"
        elif est is None:
            fits = "?"
        else:
            fits = ",".join(str(i) for i in r["fits_on"]) or "none"
        tokens_step, tokens = (_fmt_int(p.tokens_per_step), _fmt_int(p.tokens)) if r["tokens_known"] else ("–", "–")
        lines.append(
            f"| {' '.join(r['overrides']) or '(defaults)'} | {p.effective_batch} | {p.steps_per_epoch} | {p.max_steps} "
            f"| {p.epochs:.2f} | {_fmt_int(p.samples)} | {tokens_step} | {tokens} "
            f"| {p.warmup_steps} | {cfg.eval.eval_steps} / {save} | {vram} | {fits} | {_fmt_time(r['wall_s'])} |"
        )
    lines.append("")
    for r in rows:
        cfg, est = r["cfg"], r["memory"]
        prepared = f"{r['prepared_rows']:,} prepared {'packed sequences' if cfg.data.packing else 'rows'}" \
            f" (max {r['seq_len']} tokens)" if r["tokens_known"] else "not tokenised (no tokenizer)"
        head = f"- {' '.join(r['overrides']) or '(defaults)'}: {cfg.data.name} has {r['rows']:,} train rows -> " \
               f"{prepared}, {r['eval_rows']:,} eval rows; model {cfg.model.name}, " \
               f"{_method_name(cfg)}, micro-batch {cfg.batch.per_device_train_batch_size} x " \
               f"accumulation {cfg.batch.gradient_accumulation_steps}"
        lines.append(head)
        if est is not None:
            parts = ", ".join(f"{k.removesuffix('_gib')} {v:.2f}" for k, v in est.parts().items() if k != "total_gib")
            lines.append(f"  - VRAM (GiB): {parts}")
        else:
            lines.append(f"  - VRAM: unknown: no config.json for model.path={cfg.model.path!r} offline; "
                         "give a local path or add model.shape")
        if r["tokens_per_s"]:
            lines.append(f"  - time: {r['tokens_per_s']:,.0f} tokens/s measured by finished trials of this study")
        for w in r["warnings"]:
            lines.append(f"  - warning: {w}")
    return "\n".join(lines)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _method_name(cfg: Any) -> str:
    from sweeper.plan import finetune_method

    method = finetune_method(bool(cfg.precision.load_in_4bit), str(cfg.peft.name))
    return {"qlora": "QLoRA (4-bit)", "lora": "LoRA", "full": "full fine-tuning"}[method]


def main(overrides: list[str], config_dir: str | None = None) -> int:
    import os

    from hydra.errors import HydraException

    if sys.stderr.isatty():  # show the datasets/TRL progress bars of data preparation on a terminal
        os.environ.pop("TQDM_DISABLE", None)  # set by `python -m sweeper` for its other commands
    from sweeper import passwords

    # the secrets the overrides carry (a storage password, a secret-named env_set value): masked in what it prints
    secrets = (*passwords.split_secret_overrides(overrides)[1].values(),
               *passwords.secret_values({}, next((o.split("=", 1)[1] for o in overrides
                                                  if o.lstrip("+~").startswith("hydra.sweeper.storage=")), None)))
    passwords.install_log_filter(secrets)
    from sweeper.config import refusal_line

    try:
        rows = plan_rows(overrides, config_dir)
    except (ValueError, FileNotFoundError, HydraException) as e:  # bad input: the sweep's one line
        print(passwords.mask_secrets(f"error: {refusal_line(e)}", secrets), file=sys.stderr)
        return 2
    interrupt.honour()  # a Ctrl-C swallowed while the data was prepared (a finalizer, TRL's worker pool): no plan
    print(passwords.mask_secrets(render(rows), secrets))
    return 0
