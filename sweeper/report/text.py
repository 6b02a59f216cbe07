"""How the report writes numbers and user text: :func:`fmt` (``–`` for missing), :func:`si` (``2.00M``),
:func:`count` (``1,234``); user text (names, paths, errors) as markdown text (:func:`escape`), as a table cell
(:func:`cell`) and as a code span (:func:`code`), so that no character of a name changes the markdown
around it and a copied command or path is the one that ran."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["cell", "code", "count", "escape", "fmt", "si"]

# markdown's inline specials; "_" only where it can open or close emphasis (not inside a word: my_data stays)
_SPECIAL = re.compile(r"[\\`*\[\]<>|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


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


def escape(text: Any) -> str:
    """``text`` as literal markdown text: a backslash before each character that markdown would read as markup
    (backslash, backtick, ``*``, ``[``, ``]``, ``<``, ``>``, ``|``, and ``_`` outside a word)."""
    return _SPECIAL.sub(lambda m: "\\" + m.group(0), str(text))


def cell(markdown: str) -> str:
    """Markdown (already escaped where it is user text) for a table cell: ``|`` escaped everywhere, code spans
    included (GitHub's and markdown-it's tables read ``\\|`` inside a code span as ``|``)."""
    return re.sub(r"(?<!\\)\|", r"\\|", markdown)


def code(text: str) -> str:
    """``text`` as a code span, shown exactly: the fence is one backtick longer than the longest run of
    backticks inside, with a space on each side when the text begins or ends with a backtick (markdown strips
    those two spaces)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"
