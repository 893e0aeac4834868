"""File names as the package shows them: one function for every place a path reaches a person or a file.

A POSIX file name is any bytes but "/" and NUL; Python hands names that are not UTF-8 over as strings with surrogate
escapes ('caf\\udce9.png' for b'caf\\xe9.png'), which a UTF-8 file, a terminal, a strict JSON parser or an HTML page
cannot hold. `shown(name)` turns every name into plain printable Unicode the same way everywhere (predict's lines,
its JSON and CSV, the server, logs, error messages, the report): each byte that is not UTF-8 and each control
character (a tab, a newline, an escape code) becomes the four characters `\\xNN`. Names that are valid UTF-8
without control characters are unchanged.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Any

# C0 controls, DEL and C1 controls: a newline would split a one-line message, an escape code would drive a terminal
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}


def shown(name: str | bytes | PurePath) -> str:
    """`name` (a path, its str with surrogate escapes, or its bytes) as printable Unicode: bytes that are not UTF-8
    and control characters as `\\xNN` (see the module's docstring)."""
    raw = os.fspath(name)
    if isinstance(raw, str):
        if raw.isprintable():  # the common case: nothing to escape
            return raw
        raw = raw.encode("utf-8", "surrogateescape") if _escapable(raw) else raw.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROLS)


def shown_text(text: str) -> str:
    """A message that may hold names not passed through `shown` (a log line, an error): its surrogate escapes as
    `\\xNN`, so it can be written to any UTF-8 stream or file; line breaks and everything else are kept."""
    if text.isascii() or not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return text
    encoded = text.encode("utf-8", "surrogateescape") if _escapable(text) else text.encode("utf-8", "backslashreplace")
    return encoded.decode("utf-8", "backslashreplace")


def _escapable(text: str) -> bool:
    """Whether every surrogate in `text` is a surrogate escape of one byte (U+DC80..U+DCFF), as os.fsdecode makes."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def shown_strings(obj: Any) -> Any:
    """`obj` (JSON-like: dicts, lists, tuples, scalars) with every string, keys included, passed through `shown`: safe
    to write as UTF-8 and to parse with a strict JSON parser (json.dumps would write a lone surrogate as \\udce9)."""
    if isinstance(obj, str):
        return shown(obj)
    if isinstance(obj, dict):
        return {shown(k) if isinstance(k, str) else k: shown_strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [shown_strings(v) for v in obj]
    return obj
