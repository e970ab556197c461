"""Strings from a run (paths, names, manifest values, event reasons) made safe to print in a terminal.

Two dangers: rich markup (``runs/sweep[lr]`` would print as ``runs/sweep``, ``[/]`` raises ``MarkupError``,
``[link=…]`` renders as a live hyperlink) and raw control characters (an ESC sequence in a manifest string can
recolour, move the cursor or retitle the terminal; bidirectional overrides can reorder what is shown). Every
string the CLI prints that a user or a file controls goes through :func:`safe_markup` (when it is embedded in a
markup string) or :func:`safe_text` (a :class:`rich.text.Text`, never parsed as markup).
"""
from __future__ import annotations

import unicodedata
from typing import Any

from rich.markup import escape
from rich.text import Text

__all__ = ["clean", "safe_markup", "safe_text"]

# Bidirectional embedding/override/isolate controls (Unicode category Cf) that can reorder displayed text.
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def clean(value: Any) -> str:
    """``str(value)`` with every control character (C0, DEL, C1, bidi controls) shown as a visible escape
    (``\\x1b``, ``\\u202e``) instead of reaching the terminal; newlines and tabs become spaces."""
    text = str(value)
    out = []
    for char in text:
        if char in "\n\t":
            out.append(" ")
        elif unicodedata.category(char) == "Cc" or char in _BIDI:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def safe_markup(value: Any) -> str:
    """:func:`clean` and escaped for rich markup: safe to embed in ``f"[bold]{…}[/bold]"`` (trailing backslashes
    are doubled, so a closing tag after them stays a tag and they print as they are). Prefer :func:`safe_text`
    where the string ends the output."""
    text = clean(value)
    trailing = len(text) - len(text.rstrip("\\"))
    return escape(text.rstrip("\\")) + "\\" * (2 * trailing)


def safe_text(value: Any, style: str = "") -> Text:
    """A :class:`rich.text.Text` of :func:`clean` (rich never parses a ``Text`` as markup)."""
    return Text(clean(value), style=style)
