"""HTML building blocks of the report: escaping, number formatting, embedded figures, tables, notes."""
from __future__ import annotations

import base64
import html
import json
from typing import Any

import numpy as np

__all__ = ["esc", "fmt", "img", "interval_text", "json_text", "missing", "note", "table"]


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included), after ``str``."""
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, caption: str = "") -> str:
    """A figure embedded as base64 PNG; ``caption`` is HTML (escape run strings before)."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{cap}</figure>'


def missing(text: str) -> str:
    """A note saying what is missing and how to get it (``text`` is HTML)."""
    return f'<div class="missing">{text}</div>'


def note(text: str) -> str:
    """A plain-language opening of a section (``text`` is HTML)."""
    return f'<p class="intro">{text}</p>'


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not np.isfinite(value) else f"{value:.{digits}g}"
    return esc(value)


def table(header: list[str] | None, rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def interval_text(interval: tuple[int | None, int | None] | None) -> str:
    if not interval:
        return "—"
    low, high = interval
    return f"{'…' if low is None else low} – {'…' if high is None else high}"


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
