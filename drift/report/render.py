"""The two renderings of one document: self-contained HTML and Markdown with PNG files."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .document import Figure, Section, Table

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:0 auto;padding:1em 2em;
color:#1a1a1a;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{margin-top:1.8em;color:#0072B2}
nav ol{columns:2;font-size:.95em}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0;max-width:1100px}
th,td{border:1px solid #c8c8c8;padding:.25em .55em;text-align:left;vertical-align:top}th{background:#eef3f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}tr:nth-child(even) td{background:#fafafa}
pre{background:#f5f5f5;padding:.8em;overflow-x:auto;font-size:.85em;border:1px solid #ddd}
.note{background:#fdf3dc;border-left:4px solid #E69F00;padding:.4em .8em}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#333;margin-top:.3em}details summary{cursor:pointer;color:#0072B2}
.scroll{overflow-x:auto}
"""

# Records, once the page has loaded, how many images decoded: a headless browser check reads these attributes.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-images-loaded", String(ok));
});
"""

_NUM = re.compile(r"^-?(\d+(\.\d*)?(e[-+]?\d+)?|nan|inf)( \[.*\])?$")


def _html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)
    body = []
    for row in t.rows:
        cells = "".join(f'<td class="num">{e(c)}</td>' if _NUM.match(c) else f"<td>{e(c)}</td>" for c in row)
        body.append(f"<tr>{cells}</tr>")
    out = (f'<div class="scroll"><table id="{e(t.id)}"><caption>{e(t.caption)}</caption><thead><tr>{head}</tr>'
           f"</thead><tbody>{''.join(body)}</tbody></table></div>")
    if t.collapsed:
        out = f"<details><summary>{e(t.caption)} ({len(t.rows)} rows)</summary>{out}</details>"
    return out


def render_html(sections: Sequence[Section], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures as base64 PNG data URIs, a contents list."""
    e = html.escape
    nav = "".join(f'<li><a href="#{e(s.id)}">{e(s.title)}</a></li>' for s in sections)
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
             f'content="width=device-width, initial-scale=1"><title>{e(title)}</title><style>{_CSS}</style>'
             f"<script>{_SCRIPT}</script></head><body><h1>{e(title)}</h1><nav><ol>{nav}</ol></nav>"]
    for s in sections:
        parts.append(f'<section id="{e(s.id)}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_html_table(b))
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(f'<figure id="{e(b.id)}"><img src="data:image/png;base64,{data}" alt="{e(b.caption)}">'
                             f"<figcaption>{e(b.caption)}</figcaption></figure>")
            elif b.kind == "pre":
                pre = f"<pre>{e(b.text)}</pre>"
                if b.collapsed:
                    pre = f"<details><summary>show ({b.text.count(chr(10)) + 1} lines)</summary>{pre}</details>"
                parts.append(pre)
            elif b.kind == "h3":
                parts.append(f"<h3>{e(b.text)}</h3>")
            else:
                cls = ' class="note"' if b.kind == "note" else ""
                parts.append(f"<p{cls}>{e(b.text)}</p>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts)


_MD_SPECIAL = re.compile(r"([\\`*$~])|(?<!\S)_|_(?!\S)|\](?=\()")
_MD_LINE_START = re.compile(r"^(\s*)([#>+=-]|\d+[.)])")


def _md_inline(text: Any) -> str:
    """``text`` as literal inline Markdown: class names, ids and paths from the data never format, link or inject
    HTML. ``&``, ``<``, ``>`` become entities (an ``<img onerror=...>`` in a class name stays text); Markdown's
    inline syntax is backslash-escaped (``* ` $ ~ \\``, ``_`` next to a space or an end, the ``](`` of a
    link); newlines become spaces."""
    out = html.escape(str(text), quote=False).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), out)


def _md_text(text: Any) -> str:
    """A paragraph or heading as literal Markdown: :func:`_md_inline`, and a leading ``#``, ``-``, ``+``, ``=``,
    ``>`` or ``1.`` that would start a heading, list or quote is escaped too."""
    return _MD_LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), _md_inline(text))


def _md_cell(c: str) -> str:
    return _md_inline(c).replace("|", "\\|")


def _md_fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text`` (a class name with ``` cannot close it early)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(sections: Sequence[Section], title: str, figure_dir: str = "figures") -> str:
    """The same document as Markdown; figures are referenced as ``<figure_dir>/<figure id>.png``."""
    out = [f"# {_md_text(title)}", ""]
    for s in sections:
        out += [f"## {_md_text(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += [f"**{_md_inline(b.caption)}**", "", md_table(b.header, b.rows), ""]
            elif isinstance(b, Figure):
                # Alt text cannot hold brackets (one would end it); they read as parentheses there.
                alt = _md_inline(b.caption.replace("[", "(").replace("]", ")"))
                out += [f"![{alt}]({figure_dir}/{b.id}.png)", "", f"*{_md_inline(b.caption)}*", ""]
            elif b.kind == "pre":
                fence = _md_fence(b.text)
                out += [f"{fence}toml", b.text, fence, ""]
            elif b.kind == "h3":
                out += [f"### {_md_text(b.text)}", ""]
            else:
                out += [f"> **Note:** {_md_text(b.text)}" if b.kind == "note" else _md_text(b.text), ""]
    return "\n".join(out)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a report file through an exclusive ``<name>.tmp`` (never through a link) and an atomic rename; a
    failed write (disk full, read-only) removes the ``.tmp`` and raises one line naming the file
    (:func:`drift.safefile.write_atomic`)."""
    from ..safefile import write_atomic as write

    write(path, data, "report file")

