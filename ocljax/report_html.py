"""The report as one self-contained HTML page: the comparison tables (built from the same
``Table``/``Cell`` data as the Markdown), their notes, the plots embedded as base64 PNG data
URIs (so the page can be moved or mailed alone), and the command of each run."""

from __future__ import annotations

import base64
import html
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocljax.report import Cell, Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
tbody tr:nth-child(even) { background: #fafafa; }
.blind { color: #777; font-size: 0.9em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
"""


def inline(text: str) -> str:
    """Escape ``text`` and render its Markdown ``**bold**`` and `` `code` `` spans."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def cell(c: Cell, tag: str = "td") -> str:
    """One table cell; a bold cell's text in ``<strong>``, its note in a ``blind`` span."""
    text = html.escape(c.text)
    if c.bold:
        text = f"<strong>{text}</strong>"
    if c.note:
        text += f' <span class="blind">{html.escape(c.note)}</span>'
    return f"<{tag}>{text}</{tag}>"


def table(t: Table) -> str:
    """A benchmark's heading and its table."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.head)
    body = "\n".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in t.rows)
    return (f"<h3>{html.escape(t.benchmark)}</h3>\n<table>\n<thead><tr>{head}</tr></thead>\n"
            f"<tbody>\n{body}\n</tbody>\n</table>")


def image(path: Path, caption: str) -> str:
    """A figure with the PNG at ``path`` embedded as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure id="{html.escape(Path(path).stem)}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{data}">\n'
            f"<figcaption>{html.escape(Path(path).name)}: {html.escape(caption)}</figcaption>"
            "</figure>")


def render(
    tables: list[Table], note: str, commands: list[tuple[str, list[str]]],
    images: list[tuple[Path, str]], title: str = "ocljax report",
) -> str:
    """The whole page: ``tables`` with ``note`` (Markdown inline spans), the ``(png path,
    caption)`` plots, and the ``(run_dir, argv)`` commands."""
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Results</h2>"]
    parts += [table(t) for t in tables] or ["<p><em>No rows.</em></p>"]
    if note:
        parts.append(f'<p class="note">{inline(note)}</p>')
    if images:
        parts.append("<h2>Plots</h2>")
        parts += [image(p, caption) for p, caption in images]
    if commands:
        parts.append("<h2>Commands</h2>")
        for run_dir, argv in commands:
            cmd = shlex.join(argv) if argv else "(not recorded)"
            parts.append(f"<p><code>{html.escape(run_dir)}</code></p>\n"
                         f"<pre><code>{html.escape(cmd)}</code></pre>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")
