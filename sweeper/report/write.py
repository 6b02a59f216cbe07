"""The report's files for a storage: ``summary.md``, one PNG per study and ``report.html``
(:func:`write_report`)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Sequence

import optuna

from sweeper import identity
from sweeper.report.figures import plot_curves
from sweeper.report.markdown import datasets_section, study_report
from sweeper.report.page import report_html
from sweeper.report.text import escape

__all__ = ["png_names", "write_report"]


def write_report(storage: Any, out_dir: Path, study_names: Sequence[str] | None = None,
                 url: str | None = None) -> dict[str, Path]:
    """Write ``summary.md``, ``<study>.png`` (:func:`png_names`) and ``report.html`` (markdown rendered, PNGs embedded) under
    ``out_dir``; with several studies both open with the table of datasets and ``datasets.png``. ``storage``:
    the opened storage; ``url``: its URL as the commands the report proposes name it (None: the default
    storage, which they leave out)."""
    summaries = optuna.get_all_study_summaries(storage=storage)
    names = list(dict.fromkeys(study_names)) if study_names else [s.study_name for s in summaries]  # each once
    known = {s.study_name for s in summaries}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"--study {missing[0]!r} is not in the storage; studies there: {sorted(known) or 'none'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    md_parts, sections = [], []
    studies = [optuna.load_study(study_name=name, storage=storage) for name in names]
    if len(studies) > 1 and all(len(s.directions) == 1 for s in studies):  # a front has no one best trial
        text = datasets_section(studies, out_dir / "datasets.png", url)
        md_parts.append(text)
        sections.append(("datasets", text.rsplit("\n\n![", 1)[0], (out_dir / "datasets.png").read_bytes()))
    pngs = png_names(names)
    for name, study in zip(names, studies):
        text = study_report(study, url)
        png = plot_curves(study, out_dir / pngs[name])
        md_parts.append(text + f"\n\n![{escape(name)} curves]({_destination(png.name)})\n")
        sections.append((name, text, png.read_bytes()))
    md = "# sft-sweep report\n\n" + "\n".join(md_parts)
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    (out_dir / "report.html").write_text(report_html(sections), encoding="utf-8")
    return {"markdown": out_dir / "summary.md", "html": out_dir / "report.html"}


def png_names(names: Sequence[str]) -> dict[str, str]:
    """A PNG file name for each study: ``<study>.png``, unless the name cannot be one file's name in the report's
    folder (a path separator or control character, ``.``/``..``, over 200 bytes: a storage may hold studies other
    tools named) or it is taken (``datasets.png``, the table of datasets' figure): then its letters, digits and
    ``.+-`` with a short hash of the whole name."""
    out: dict[str, str] = {}
    taken = {"datasets.png"}
    for name in names:
        plain = identity.study_name_problem(name) is None and len(name.encode()) <= 200  # a file name's bytes
        file = f"{name}.png"
        if not plain or file in taken:
            stem = re.sub(r"[^\w.+-]+", "_", name)[:80].strip("._") or "study"
            file = f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.png"
        out[name] = file
        taken.add(file)
    return out


def _destination(name: str) -> str:
    """A file name as a markdown link destination: as it is when plain, else in ``<...>`` (spaces and
    parentheses allowed there), with ``<``, ``>`` and backslashes escaped."""
    if re.fullmatch(r"[\w.+-]+", name):
        return name
    return "<" + re.sub(r"([<>\\])", r"\\\1", name) + ">"
