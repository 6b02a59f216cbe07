"""How the report writes numbers: :func:`fmt` (``–`` for missing), :func:`si` (``2.00M``), :func:`count`
(``1,234``)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["count", "fmt", "si"]


def fmt(x: Any, spec: str = "") -> str:
    """``x`` for a table cell: ``–`` for None, a float with ``spec`` (default ``.4f``; inf/nan as words)."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec or ".4f") if math.isfinite(x) else str(x)
    return str(x)


def si(n: float) -> str:
    """``n`` with a k/M/G suffix and two decimals (``2.00M``); below 1,000 a whole number."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def count(n: float | None) -> str:
    """A whole count with thousands separators; ``–`` for None."""
    return "–" if n is None else f"{n:,.0f}"
