"""Does a sampled value fit its config key? Checked against the composed config before any trial exists.

    python train.py -m 'schedule.max_steps=interval(10,20)'   # refused: max_steps is an int; int(interval(10,20))

Hydra merges a trial's sampled value into the config only when its job starts; a float for an int key (a
schema ``int``, or a key whose value is a whole number) fails there, at every re-run of the same command.
:func:`check` compares each distribution with its key's node first and raises one line naming the key, what
it samples and the override that fits. Pure: a distribution and a composed config in, a message out.
"""

from __future__ import annotations

from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, ValueNode

from sweeper.space import SweepSpace, distribution_text, finite_values, value_text

__all__ = ["check", "key_type", "misfit"]


def key_type(cfg: DictConfig, key: str) -> type | None:
    """The type the key's value must have: the schema's (int, float, bool), or for an untyped key holding a
    whole number, int; None when any value goes (a string, a config group, a key the config lacks)."""
    parent_key, _, leaf = key.lstrip("+~").rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return None
    node = parent._get_node(leaf)
    if not isinstance(node, ValueNode):
        return None
    for kind, t in ((IntegerNode, int), (FloatNode, float), (BooleanNode, bool)):
        if isinstance(node, kind):
            return t
    value = node._value()
    if isinstance(value, int) and not isinstance(value, bool):
        return int
    return None


def _fits(value: Any, want: type) -> bool:
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, bool)


def misfit(key: str, dist: optuna.distributions.BaseDistribution, want: type | None) -> str | None:
    """The one line refusing ``dist`` for a key whose values must be ``want``, or None when it fits."""
    if want is None:
        return None
    D = optuna.distributions
    if isinstance(dist, D.FloatDistribution) and dist.step is None and want is int:
        lo, hi = int(dist.low), int(dist.high)
        wrap = f"tag(log, int(interval({lo},{hi})))" if dist.log else f"int(interval({lo},{hi}))"
        such = f"{(dist.low + dist.high) / 2:g}"
        such += ".0" if such.lstrip("-").isdigit() else ""  # a float as a float: 4.0, not 4
        return (f"{key} takes whole numbers (int), but {distribution_text(dist)} samples floats such as "
                f"{such}; write {key}='{wrap}' (or range({lo},{hi + 1}))")
    values = finite_values(dist)
    if values is None:  # a continuous float for a float key
        return None
    bad = [v for v in values if not _fits(v, want)]
    if not bad:
        return None
    return (f"{key} takes {want.__name__} values, but {distribution_text(dist)} gives {value_text(bad[0])} "
            f"({type(bad[0]).__name__}); give {want.__name__} values only")


def check(space: SweepSpace, cfg: DictConfig) -> None:
    """Raise ValueError (one line) for the first distribution of ``space`` that does not fit its key in the
    composed config ``cfg``."""
    for key, dist in space.distributions.items():
        line = misfit(key, dist, key_type(cfg, key))
        if line:
            raise ValueError(line)
