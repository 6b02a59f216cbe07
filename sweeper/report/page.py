"""``report.html``: the report's markdown rendered by markdown-it-py into one self-contained page, each
study's curves embedded as a ``data:`` PNG (:func:`report_html`)."""

from __future__ import annotations

import base64
import functools
import html
from typing import Any, Sequence

__all__ = ["markdown_html", "report_html"]

# report.html: the same markdown, rendered. markdown-it-py with raw HTML off (any "<" in a study name, an error
# or a label is shown as text) and links and images off (user text cannot add markup that fetches anything);
# only the curves come in, as data: URIs. The Content-Security-Policy makes the browser hold the page to that.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1440px;
  margin:2em auto;padding:0 1.5em}
h1,h2{border-bottom:1px solid #d0d7de;padding-bottom:.3em}
h2{margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d0d7de;padding:4px 7px;vertical-align:top}
th{background:#f6f8fa;vertical-align:bottom}
tbody tr:nth-child(even){background:#fafbfc}
code{font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:88%;
  background:#eff1f3;padding:.1em .35em;border-radius:4px;overflow-wrap:anywhere}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:1em;overflow-x:auto;line-height:1.4}
pre code{background:none;padding:0;font-size:13px;overflow-wrap:normal}
li{margin:.3em 0}
figure{margin:1em 0}
img{max-width:100%;height:auto;border:1px solid #d0d7de}
"""


@functools.cache
def _markdown_renderer() -> Any:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "image", "autolink"])


def markdown_html(text: str) -> str:
    """HTML of one study's markdown (:func:`study_report`): tables, bold, lists, code blocks; any HTML in it is
    escaped, not passed through."""
    return _markdown_renderer().render(text)


def report_html(sections: Sequence[tuple[str, str, bytes]]) -> str:
    """The self-contained ``report.html`` for ``(study name, markdown, curves PNG)`` sections: each study's
    rendered markdown followed by its curves, embedded as base64."""
    body = []
    for name, text, png in sections:
        img = base64.b64encode(png).decode("ascii")
        body.append(f"<section>\n{markdown_html(text)}<figure><img alt=\"{html.escape(name)} curves\" "
                    f"src=\"data:image/png;base64,{img}\"></figure>\n</section>\n")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>sft-sweep report</title><style>{_CSS}</style></head>\n"
            "<body>\n<h1>sft-sweep report</h1>\n" + "".join(body) + "</body></html>\n")
