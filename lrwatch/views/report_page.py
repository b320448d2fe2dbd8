"""The files ``lrwatch report`` writes: a picture, or one self-contained HTML page.

The HTML page embeds the PNG (base64) and lists every finding and decision in a table, with the
full message and reason the picture can only abbreviate; it needs no server and no other file,
so it can be attached to a ticket or mailed.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from lrwatch.errors import ConfigError
from lrwatch.views.plot import ReportData, draw, report_data

PICTURE_SUFFIXES = (".png", ".svg", ".pdf")
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin-top: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.critical td:first-child { border-left: 4px solid #d62728; }
tr.warning td:first-child { border-left: 4px solid #ff7f0e; }
tr.decision td { background: #f7f7ff; }
"""


def write_report(run_dir: Path, out: Path, *, config: Any = None) -> ReportData:
    """Write the report of ``run_dir`` to ``out`` (.png/.svg/.pdf, or .html); return its data."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (*PICTURE_SUFFIXES, ".html", ".htm"):
        raise ConfigError(f"{out}: write a .png, .svg, .pdf or .html report")
    data = report_data(Path(run_dir), config=config)
    if suffix in PICTURE_SUFFIXES:
        draw(data, out)
    else:
        out.write_text(page(data), encoding="utf-8")
    return data


def page(data: ReportData) -> str:
    """The HTML page: title, the embedded PNG, then the table of findings and decisions."""
    buf = io.BytesIO()
    draw(data, buf, fmt="png")
    image = base64.b64encode(buf.getvalue()).decode("ascii")
    title = html.escape(f"lrwatch report: {data.run}")
    source = "the daemon's audit log" if data.source == "audit" else "a replay of the analyzer"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            f"<p>Decisions come from {source}. Series: "
            + html.escape(", ".join(f"{k} = {v}" for k, v in data.tags.items()))
            + "</p>",
            f'<img alt="lrwatch report plot" src="data:image/png;base64,{image}">',
            _table(data),
            "</body></html>",
        ]
    )


def _table(data: ReportData) -> str:
    if not data.markers:
        return "<p>No findings and no decisions.</p>"
    rows = ["<table><tr><th>#</th><th>step</th><th>what</th><th>status</th><th>detail</th></tr>"]
    for m in data.markers:
        status = m.severity
        if m.applied is not None:
            status = "applied" if m.applied else "recommended"
        cells = (m.label, str(m.step), m.what, status, m.detail or m.reason)
        css = m.severity if m.kind == "finding" else "decision"
        rows.append(
            f'<tr class="{css}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)
