"""The report as a document: sections of paragraphs, notes, tables and figures, rendered to self-contained HTML
(figures embedded) and to Markdown (figures beside it)."""

from __future__ import annotations

import base64
import html
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

FIG_DIR = "report_figures"


@dataclass
class Section:
    id: str
    title: str
    parts: list[tuple] = field(default_factory=list)  # ("p", text) | ("note", text) | ("table", head, rows) | ("fig", file, caption) | ("md", text)

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def note(self, text: str) -> None:
        self.parts.append(("note", text))

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        self.parts.append(("table", head, rows))

    def fig(self, file: str, caption: str) -> None:
        self.parts.append(("fig", file, caption))


def fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def agg(values: list[float | None], digits: int = 3, pct: bool = False) -> str:
    """One value as is, several as mean ± std; None/NaN left out."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return "–"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    d = 1 if pct else digits
    mean = statistics.fmean(vals) * scale
    if len(vals) == 1:
        return f"{mean:.{d}f}{unit}"
    return f"{mean:.{d}f} ± {statistics.stdev(vals) * scale:.{d}f}{unit}"


def colour(i: int) -> str:
    return f"C{i % 10}"


def pyplot():
    import matplotlib.pyplot as plt

    return plt



CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
nav{font-size:.9em;margin:.6em 0 1em}nav a{margin-right:1em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{background:#fff4e0;border-left:4px solid #e0a040;padding:.4em .8em}code{background:#f4f4f4;padding:0 .2em}
.cfg{font-size:.85em}
"""


def _inline_html(text: str) -> str:
    """Escape, then `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list[Section], figdir: Path) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        out.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
        for part in s.parts:
            if part[0] == "p":
                cls = ' class="cfg"' if part[1].startswith("Config: ") else ""
                out.append(f"<p{cls}>{_inline_html(part[1])}</p>")
            elif part[0] == "note":
                out.append(f'<p class="note">{_inline_html(part[1])}</p>')
            elif part[0] == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in part[1])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in part[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif part[0] == "fig":
                data = base64.b64encode((figdir / part[1]).read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{_inline_html(part[2])}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(v: object) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_md(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    out.append(" · ".join(f"[{s.title}](#{s.id})" for s in sections))
    out.append("")
    for s in sections:
        out += [f'<a id="{s.id}"></a>', f"## {s.title}", ""]
        for part in s.parts:
            if part[0] == "p":
                out += [part[1], ""]
            elif part[0] == "note":
                out += [f"> **Note:** {part[1]}", ""]
            elif part[0] == "table":
                out.append("| " + " | ".join(_md_cell(h) for h in part[1]) + " |")
                out.append("|" + "---|" * len(part[1]))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in part[2]]
                out.append("")
            elif part[0] == "fig":
                out += [f"![{s.title}]({FIG_DIR}/{part[1]})", "", f"*{part[2]}*", ""]
    return "\n".join(out) + "\n"
