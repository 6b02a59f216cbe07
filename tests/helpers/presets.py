"""The test presets of ``conf/debug`` as command-line overrides.

A test passes ``*fast()`` where a user would type ``+debug=fast``: the same values from the same file, as
plain ``key=value`` overrides so a test can leave one out (``fast("schedule.max_steps")`` when a sweep
sets the step count itself) or set one again after them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"

__all__ = ["fast", "preset"]


def preset(name: str) -> list[str]:
    """``conf/debug/<name>.yaml`` as ``key=value`` overrides, in the file's order."""
    cfg = OmegaConf.load(CONF / "debug" / f"{name}.yaml")

    def leaves(node, prefix=""):
        for key, value in node.items():
            if OmegaConf.is_dict(value):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={'null' if value is None else value}"

    return list(leaves(cfg))


def fast(*without: str) -> list[str]:
    """``+debug=fast`` as overrides, less the keys in ``without`` (a key, or a group such as ``batch.``)."""
    return [o for o in preset("fast") if not any(o.split("=", 1)[0].startswith(w) for w in without)]
