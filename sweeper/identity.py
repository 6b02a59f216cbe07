"""What a trial trained, as the study compares it: the composed config flattened to dotted keys,
without the keys that cannot change its result. Pure: no Optuna, no torch.

A study holds the trials of one dataset and model that differ only in what is being searched. Its
sweeper records every trial's :func:`result_config`; a new command into the study then

- refuses (:func:`differences`) when a setting it does not sweep differs from every earlier trial's
  (``data.max_train_rows=800`` after 400 rows, ``lr.learning_rate=3e-4`` after 1e-3): old results must
  never be served as new. ``hydra.sweeper.study_name=...`` starts a new study;
  ``hydra.sweeper.allow_config_change=true`` adds the new config to this one.
- counts a grid point as done only when a trial of the very same config covers it (:func:`same_run`),
  so a follow-up grid (``schedule.max_steps=700,800`` after ``100,300,600``) or a WSD search with other
  candidates runs its own points.

The ``schedule`` group is what a study searches, so it never makes a config "different"; it only
tells runs apart. Keys ignored everywhere: paths, the study's own bookkeeping, logging, checkpoint
saving, speed kernels, OOM retry, and how the effective batch is split into micro-batches (the
effective batch itself counts); the accuracy probe unless it is the objective; ``data.demo_rows``
unless the data is the generated demo. The data files count by their content as well as their path
(``data.train_content``/``data.eval_content``, :mod:`sweeper.fingerprint`): a file edited in place is a
different setting.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["SEARCHED", "default_study_name", "study_name_problem", "describe_differences", "differences", "result_config", "same_run",
           "study_name", "varying"]

IGNORED = ("paths.", "study.", "speed.", "hydra.", "batch.", "tracking.", "report_to", "retry_on_oom",
           "eval.save_best", "eval.logging_steps")
SEARCHED = ("schedule.",)  # what a study is about: differs between runs, never between studies
EFFECTIVE_BATCH = "batch.effective_batch"
CONTENT = ("data.train_content", "data.eval_content")  # digests of the data files (sweeper.fingerprint)


def study_name(cfg: Any) -> str:
    """The study a composed config's runs belong to: ``hydra.sweeper.study_name`` when set, else
    ``<data.name>-<model.name>`` (one study per dataset and model)."""
    hydra = cfg.get("hydra")
    named = hydra.sweeper.get("study_name") if hydra is not None and "sweeper" in hydra else None
    return str(named) if named else default_study_name(cfg)


def default_study_name(cfg: Any) -> str:
    """``<data.name>-<model.name>``: the study a single-dataset sweep of ``cfg`` would create."""
    return f"{cfg.data.name}-{cfg.model.name}"


def study_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a study and its folder (``outputs/sweeps/<study>``), or None: any letters,
    digits, spaces and punctuation, but no path separator, control character or ``.``/``..``, at most 200
    characters."""
    bad = next((c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    if not name.strip() or name in (".", "..") or bad is not None or len(name) > 200:
        return (f"it holds {bad!r}" if bad is not None else "it is empty" if not name.strip()
                else "it is longer than 200 characters" if len(name) > 200 else "it is a relative folder name")
    return None


def result_config(cfg: Any, data_content: dict[str, str] | None = None) -> dict[str, Any]:
    """The composed config (``DictConfig``) as dotted keys -> plain values, resolved, without the
    ignored keys; the batch as its effective size (``batch.effective_batch``); plus ``data_content``, the
    digests of the data files (:func:`sweeper.fingerprint.data_content`: ``data.train_content``,
    ``data.eval_content``), so that a file changed in place is a changed setting."""
    out = {k: v for k, v in run_config(cfg).items() if not k.startswith(IGNORED)}
    if str(cfg.eval.metric) != "eval_accuracy":  # the accuracy probe does not change an eval_loss value
        out.pop("eval.accuracy", None)
        out.pop("eval.accuracy_rows", None)
    if cfg.data.get("train_path") != "demo":  # the generated demo's size means nothing to other data
        out.pop("data.demo_rows", None)
    b = cfg.batch
    out[EFFECTIVE_BATCH] = (int(b.auto.target_effective_batch) if b.get("auto") is not None
                            else int(b.per_device_train_batch_size) * int(b.gradient_accumulation_steps))
    out.update(data_content or {})
    return out


def run_config(cfg: Any) -> dict[str, Any]:
    """The composed config as dotted keys -> plain values, resolved, every key but ``hydra``: what one run
    does, including how it runs (``speed``, the micro-batch), which :func:`result_config` leaves out."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    return dict(_flatten(node))


def joint_group(settings: dict[str, Any]) -> str:
    """The id of a joint WSD search (``schedule.wsd.learning_rates``) that a run of ``settings``
    (:func:`result_config`) belongs to: its settings but its own learning rate, hashed, so that every
    rate's trunk of one search names the same group."""
    import hashlib
    import json

    rest = {k: v for k, v in settings.items() if k != "lr.learning_rate"}
    return hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


def varying(configs: list[dict]) -> set[str]:
    """Keys whose values differ among ``configs`` (a command's own grid points)."""
    keys = set().union(*configs) if configs else set()
    return {k for k in keys if len({repr(c.get(k)) for c in configs}) > 1}


def differences(study_configs: list[dict], command: dict, skip: set[str]) -> dict[str, tuple[list, Any]]:
    """Keys (not in ``skip``, not searched) whose value in ``command`` is not what the study's trials
    ran: ``{key: (the study's values, this command's value)}``."""
    out: dict[str, tuple[list, Any]] = {}
    for key, value in command.items():
        if key in skip or key.startswith(SEARCHED):
            continue
        seen = []
        for c in study_configs:
            if key in c and c[key] != value and c[key] not in seen:
                seen.append(c[key])
        if seen:
            out[key] = (seen, value)
    missing = {k for c in study_configs for k in c} - set(command) - skip
    for key in sorted(k for k in missing if not k.startswith(SEARCHED)):
        out[key] = (sorted({repr(c[key]) for c in study_configs if key in c}), None)
    return out


def describe_differences(diff: dict[str, tuple[list, Any]], most: int = 6) -> str:
    items = [f"{k}: {', '.join(map(str, old))} in the study, {new} now" for k, (old, new) in sorted(diff.items())]
    more = f" (and {len(items) - most} more)" if len(items) > most else ""
    changed = [k.removesuffix("_content") + "_path" for k in sorted(diff) if k.endswith("_content")]
    note = (f" ({' and '.join(changed)} names a file whose content changed since those trials ran)"
            if changed and not any(k in diff for k in changed) else "")
    return "; ".join(items[:most]) + more + note


def same_run(trial_config: dict | None, point_config: dict, skip: Iterable[str] = ()) -> bool:
    """Whether a trial that recorded ``trial_config`` ran ``point_config`` (None: a trial from before
    configs were recorded, which counts by its params alone; a trial recorded before data contents were,
    by the rest of its config). ``skip``: keys (with the keys under them: ``lr`` skips ``lr.*``) that are not
    compared, because one of the two configs does not hold their value (a sampled trial records its command's
    config, before the draw) and the trial's params decide them."""
    if trial_config is None:
        return True
    skip = tuple(skip)
    keys = set(trial_config) | {k for k in point_config if k not in CONTENT or k in trial_config}
    return all(trial_config.get(k) == point_config.get(k) for k in keys
               if not any(k == s or k.startswith(s + ".") for s in skip))
