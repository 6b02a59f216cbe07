"""Optional packages that none of a command's runs uses, kept out of its process.

transformers and TRL import wandb whenever it is installed (``transformers.integrations``, TRL's trainer base),
and PEFT imports bitsandbytes (``peft.helpers``), which compiles its kernels' wrappers with ``torch.compile`` as
it loads: together ~2.5 s of CPU in every process that trains, whether its runs track to W&B or load a 4-bit base
or not. Before the command's process first imports transformers, :func:`leave_out_unused` marks the ones that
none of its runs use as absent (``sys.modules[name] = None``: Python's own way to make an import fail; wandb when
no run tracks to W&B, bitsandbytes when no run loads a 4-bit base or uses one of its optimizers), so those
libraries take the path they take when the ``wandb`` or ``qlora`` extra is not installed, for the rest of the
process.

Only a command's own processes do this (:func:`allow`, called by :func:`sweeper.cli.main`, the entry of
``sft-sweep`` and ``python train.py``, and by the child that checks a GPU sweep's data, ``sweeper.sft``): code that imports sweeper in a process of its own (a test, a notebook, a
SLURM job) keeps every installed package. The first decision in a process holds: a sweep decides from all its
points (``sweeper.sweep.preflight.check_points``), before a single run (``sweeper.train.main``) would; a sweep
with a sampled dimension keeps everything, since its points are not known in advance.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

__all__ = ["allow", "leave_out_unused"]

_allowed = False
_decided = False
_UNKNOWN = object()


def allow() -> None:
    """This process is a command's own: :func:`leave_out_unused` may act in it."""
    global _allowed
    _allowed = True


def _value(cfg: DictConfig, key: str) -> Any:
    """The value at ``key``, or :data:`_UNKNOWN` where it cannot be read (checked, with its one-line error, later)."""
    try:
        return OmegaConf.select(cfg, key, default=_UNKNOWN, throw_on_missing=True)
    except Exception:
        return _UNKNOWN


def _used(cfgs: list[DictConfig]) -> dict[str, bool]:
    """Whether any run uses each package; a value that cannot be read counts as a use."""
    tracking = [_value(c, "tracking.backend") for c in cfgs]
    four_bit = [_value(c, "precision.load_in_4bit") for c in cfgs]
    optims = [_value(c, "lr.optim") for c in cfgs]
    return {"wandb": any(v is _UNKNOWN or v == "wandb" for v in tracking),
            "bitsandbytes": any(v is _UNKNOWN or bool(v) for v in four_bit)
            or any(not isinstance(v, str) or _bnb_optimizer(v) for v in optims)}


def _bnb_optimizer(name: str) -> bool:
    """Whether transformers' optimizer ``name`` comes from bitsandbytes (``adamw_bnb_8bit``, ``paged_adamw_32bit``,
    ``lion_8bit``, ``rmsprop_bnb``, ``ademamix_8bit`` ...)."""
    name = name.lower()
    return "bnb" in name or "8bit" in name or "paged" in name or name.startswith(("lion", "ademamix", "rmsprop_"))


def leave_out_unused(cfgs: Iterable[DictConfig] | None) -> list[str]:
    """Mark wandb and bitsandbytes absent in this process when none of ``cfgs`` (every run the process may
    train; None: not known) uses them; the names left out. Once per process, only where :func:`allow` was
    called, and only before transformers is imported (after it, the libraries have chosen already)."""
    global _decided
    if not _allowed or _decided:
        return []
    _decided = True
    if cfgs is None or "transformers" in sys.modules:
        return []
    out = [name for name, used in _used(list(cfgs)).items() if not used and name not in sys.modules]
    for name in out:
        sys.modules[name] = None  # type: ignore[assignment]
    return out
