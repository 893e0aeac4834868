"""Bad-input catalogue rows for the HTTP server: hostile uploads, Host header, slow clients, options of `cifar-cnn
serve` (issue 16). Gathered by test_bad_input.py; the row types and builders are in bad_input_kit.py.

What a row cannot express (memory under concurrent hostile uploads, half-open connections, 503 when busy, /docs)
is in tests/test_serve_hostile.py."""

from __future__ import annotations

import io
import socket
from typing import Any

from PIL import Image

from .bad_input_kit import Case, Env, HttpCase, upload

_held: list[socket.socket] = []  # ports held by a listening socket for the rest of the test session


def _taken_port(e: Env) -> str:
    """A loopback port some other socket is listening on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _held.append(sock)
    return str(sock.getsockname()[1])


def _serve(e: Env, *options: str) -> list[str]:
    return ["serve", str(e.run / "best.pt"), "--threads", "1", *options]


def raw_upload(filename: bytes, data: bytes = b"") -> dict[str, Any]:
    """POST /predict with a multipart body written by hand, so that `filename` reaches the server byte for byte
    (httpx percent-encodes control characters in file names; other clients do not)."""
    head = b'--x\r\nContent-Disposition: form-data; name=file; filename="' + filename + b'"\r\n\r\n'
    return {"content": head + data + b"\r\n--x--\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}}


def strip_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


CASES: list[Case] = [
    (
        "serve-port-in-use",
        "usage",
        "serve --port P where P is already taken (before: exit 3 after printing 'serving on ...')",
        lambda e: _serve(e, "--port", _taken_port(e)),
        "is already in use; stop what holds it or choose another --port",
    ),
    (
        "serve-host-not-here",
        "usage",
        "serve --host 203.0.113.7 (an address of no interface here)",
        lambda e: _serve(e, "--host", "203.0.113.7", "--port", "0"),
        "--host 203.0.113.7: cannot bind 203.0.113.7:0",
    ),
    (
        "serve-max-connections-zero",
        "usage",
        "serve --max-connections 0",
        lambda e: _serve(e, "--max-connections", "0"),
        "argument --max-connections: '0': expected a whole number of at least 1",
    ),
    (
        "serve-header-timeout-nan",
        "usage",
        "serve --header-timeout nan",
        lambda e: _serve(e, "--header-timeout", "nan"),
        "argument --header-timeout: 'nan': expected seconds between 0.01 and 3600",
    ),
    (
        "serve-body-timeout-negative",
        "usage",
        "serve --body-timeout -1",
        lambda e: _serve(e, "--body-timeout", "-1"),
        "argument --body-timeout: '-1': expected seconds between 0.01 and 3600",
    ),
    (
        "serve-max-decodes-zero",
        "usage",
        "serve --max-decodes 0",
        lambda e: _serve(e, "--max-decodes", "0"),
        "argument --max-decodes: '0': expected a whole number of at least 1",
    ),
    (
        "serve-max-waiting-negative",
        "usage",
        "serve --max-waiting -1",
        lambda e: _serve(e, "--max-waiting", "-1"),
        "argument --max-waiting: '-1': expected a whole number of at least 0",
    ),
    (
        "serve-allowed-hosts-empty",
        "usage",
        "serve --allowed-hosts ','",
        lambda e: _serve(e, "--allowed-hosts", ",", "--port", "0"),
        "--allowed-hosts: give host names separated by commas, or * for any",
    ),
]

HTTP_CASES: list[HttpCase] = [
    (
        "http-filename-newline",
        "http",
        "an empty upload whose file name holds a newline (before: a two-line detail)",
        lambda: raw_upload(b"a\nb.png"),
        400,
        "a\\x0ab.png: empty upload",
    ),
    (
        "http-filename-control-characters",
        "http",
        "a non-image whose file name holds NUL, ESC and U+2028",
        lambda: raw_upload(b"a\x00b\x1bc\xe2\x80\xa8d.png", b"not an image"),
        422,
        "a\\x00b\\x1bc\\u2028d.png: not a readable image",
    ),
    (
        "http-host-rebinding",
        "http",
        "Host: evil.example (DNS rebinding against a server on 127.0.0.1)",
        lambda: {**upload(b"x"), "headers": {"host": "evil.example"}},
        400,
        "Host header 'evil.example' is not one this server answers to",
    ),
    (
        "http-host-lookalike",
        "http",
        "Host: 127.0.0.1.evil.example:80 (a name that starts like the bound address)",
        lambda: {**upload(b"x"), "headers": {"host": "127.0.0.1.evil.example:80"}},
        400,
        "is not one this server answers to (127.0.0.1, ::1, localhost); see --allowed-hosts",
    ),
    (
        "http-strip-image",
        "http",
        "a 3 KB PNG of 1 x 200,000 pixels (resized to the model's size: 32 x 6,400,000)",
        lambda: upload(strip_png(1, 200_000), "strip.png"),
        422,
        "strip.png: image of 1x200000 pixels has an extreme aspect ratio",
    ),
]
