"""Self-contained HTML reports: figures embedded as base64 PNG, no external assets."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oneepoch.io import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.verdict{font-size:1.1em;padding:.6em 1em;border-radius:6px;background:#f4f4f4;margin:.4em 0}
.yes{background:#fde2e1}.no{background:#e3f5e1}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}
img{max-width:100%}
.badge{display:inline-block;min-width:3em;text-align:center;font-weight:bold;font-size:.8em;
padding:.05em .4em;border-radius:3px;color:#fff;margin-right:.3em}
.badge.pass{background:#2e7d32}.badge.fail{background:#c62828}
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def img(path: str | Path, alt: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}f}"
    return esc(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    h = "".join(f"<th>{esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c, digits)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def badge(ok: bool) -> str:
    """A PASS / FAIL label (plain letters, styled: every font has them, unlike check-mark
    emoji)."""
    return f'<span class="badge {"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>'


def verdict_box(line: str) -> str:
    cls = "yes" if ": yes" in line else "no" if ": no" in line else ""
    return f'<div class="verdict {cls}">{esc(line)}</div>'


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A full HTML page: ``sections`` are (heading, inner HTML) pairs."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"]
    for head, inner in sections:
        parts.append(f"<h2>{esc(head)}</h2>{inner}" if head else inner)
    parts.append("</body></html>")
    return "".join(parts)


def write_page(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    path = Path(path)
    return atomic_write_text(path, page(title, sections))
