"""What keeps `cifar-cnn serve` up under hostile or careless clients (issue 16): its resource limits in one place.

- `ServeLimits`: how many connections, how long a request's header and body may take, how many uploads are decoded
  at once and how many may wait for that.
- `guarded_protocol`: uvicorn's h11 protocol with a deadline for each phase a client controls (the header from the
  connection's start or the end of the previous answer; the body from the end of the header) and a connection cap
  that closes the longest-waiting such connection to make room, so half-sent requests cannot hold the server's file
  descriptors (uvicorn alone only times out idle keep-alive connections).
- `DecodeSlots`: at most `max_decodes` uploads read and decoded at once (the memory bound), at most `max_waiting`
  waiting in turn; beyond that 503 with Retry-After.
- `HostCheck`: the Host header against the names the server answers to (DNS rebinding).
- `bind_socket`, `raise_fd_limit`, `quiet_accept_errors`: the listening socket bound before anything is announced,
  enough file descriptors for the connection cap, and one log line (not a traceback per attempt) if accept() fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import CifarCnnError

BACKLOG = 2048  # uvicorn's default backlog of pending connections
FD_RESERVE = 64  # descriptors beyond the connection cap: the model, logs, decode temp files, Python's own
ACCEPT_LOG_EVERY_S = 10.0  # at most one "cannot accept" line per this many seconds
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class ServeLimits:
    """Resource limits of the server (the command-line options of the same names)."""

    max_connections: int = 512  # open connections at most; beyond it the longest-waiting half-sent one is closed
    header_timeout: float = 10.0  # seconds a client has to send a complete request header
    body_timeout: float = 60.0  # seconds a client has to send the body once the header is in (10 MB at 170 kB/s)
    max_decodes: int = 2  # uploads read and decoded at once: the serve memory bound is about this x one decode
    max_waiting: int = 16  # uploads waiting for a decode slot; one more gets 503 with Retry-After

    def __post_init__(self) -> None:
        checks = [
            ("--max-connections", self.max_connections, self.max_connections >= 1),
            ("--header-timeout", self.header_timeout, self.header_timeout > 0),
            ("--body-timeout", self.body_timeout, self.body_timeout > 0),
            ("--max-decodes", self.max_decodes, self.max_decodes >= 1),
            ("--max-waiting", self.max_waiting, self.max_waiting >= 0),
        ]
        for name, value, ok in checks:
            if not ok:
                raise CifarCnnError(f"{name} must be positive, got {value}")


def one_line(text: str, limit: int = 300) -> str:
    """`text` as one printable line of valid UTF-8: control characters (a newline in a file name) and line separators
    escaped as cifar_cnn.names does (`\\x0a`, `\\u2028`), lone surrogates as `\\udcNN`, at most `limit` chars."""
    text = CONTROL.sub(_escaped, str(text)).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def detail_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error answer of the server: {"detail": one line}."""
    return JSONResponse({"detail": one_line(detail)}, status_code=status, headers=headers)


# -- slow clients ------------------------------------------------------------------------------------------------


def guarded_protocol(limits: ServeLimits) -> type:
    """uvicorn's H11Protocol with header/body deadlines and the connection cap of `limits` (see the module doc)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline: asyncio.TimerHandle | None = None
            self._phase: str | None = None
            self._since = time.monotonic()
            if self._make_room():
                self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm(None)
            super().connection_lost(exc)

        def _waiting_phase(self) -> str | None:
            """'header' or 'body' while the server waits for this client, None while the app answers it."""
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                return "body"
            if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                return "header"
            return None

        def _watch(self) -> None:
            phase = None if self.transport.is_closing() else self._waiting_phase()
            if phase != self._phase:
                self._arm(phase)

        def _arm(self, phase: str | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._phase, self._since = phase, time.monotonic()
            if phase is not None:
                timeout = limits.header_timeout if phase == "header" else limits.body_timeout
                self._deadline = self.loop.call_later(timeout, self._expire)

        def _expire(self) -> None:
            """Too slow: the connection is closed (a body cut short reaches the app as a disconnect)."""
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> bool:
            """Under the cap, or room made by closing the connection that has waited longest for its client;
            False (this one closed) when every connection has a request the app is answering."""
            if len(self.connections) <= limits.max_connections:
                return True
            waiting = [c for c in self.connections if c is not self and getattr(c, "_phase", None) is not None]
            if waiting:
                oldest = min(waiting, key=lambda c: c._since)
                oldest._arm(None)
                oldest.transport.close()
                return True
            self.transport.close()
            return False

    return GuardedH11Protocol


def raise_fd_limit(max_connections: int, log: Callable[[str], None] = print) -> int:
    """Raise this process's soft RLIMIT_NOFILE so that `max_connections` fit (plus FD_RESERVE); the connection cap
    that fits under the hard limit (a warning when that is less than asked)."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        fit = max(1, soft - FD_RESERVE)
        log(
            f"warning: --max-connections {max_connections} needs {need} file descriptors, the limit is {soft}; "
            f"serving at most {fit} connections (raise `ulimit -n` for more)"
        )
        return fit
    return max_connections


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every failed accept() when descriptors run out (thousands a second, hundreds of
    MB of log); log one line every ACCEPT_LOG_EVERY_S instead. Other errors go to the default handler."""
    last = [0.0]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            now = time.monotonic()
            if now - last[0] >= ACCEPT_LOG_EVERY_S:
                last[0] = now
                log.warning(
                    "cannot accept connections: %s; retrying (lower --max-connections or raise ulimit -n)",
                    exc.strerror or exc,
                )
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


# -- memory: decodes at once ---------------------------------------------------------------------------------------


class Busy(Exception):
    """Every decode slot is taken and the waiting line is full."""


class DecodeSlots:
    """At most `limits.max_decodes` holders at once, at most `limits.max_waiting` waiting in line (FIFO)."""

    def __init__(self, limits: ServeLimits) -> None:
        self.size = limits.max_decodes
        self.max_waiting = limits.max_waiting
        self.waiting = 0
        self.busy = 0  # requests refused with 503
        self._semaphore: asyncio.Semaphore | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:  # created on the server's event loop
            self._semaphore = asyncio.Semaphore(self.size)
        if self._semaphore.locked() and self.waiting >= self.max_waiting:
            self.busy += 1
            raise Busy(
                f"server busy: {self.size} uploads are being decoded and {self.waiting} are waiting; retry in a moment"
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


# -- Host header ---------------------------------------------------------------------------------------------------


def parse_allowed_hosts(text: str | None, host: str) -> frozenset[str] | None:
    """The Host names the server answers to: `text` ('a,b', '*' for any: None) if given, else those of the bound
    address `host` (with localhost's names for a loopback one); a wildcard address (0.0.0.0, ::) allows any."""
    if text is not None:
        names = [n.strip().lower().strip("[]") for n in text.split(",") if n.strip()]
        if not names:
            raise CifarCnnError("--allowed-hosts: give host names separated by commas, or * for any")
        return None if "*" in names else frozenset(names)
    bound = host.strip("[]").lower()
    if bound in WILDCARDS:
        return None
    if bound == "localhost" or _is_loopback(bound):
        return frozenset({bound, *LOOPBACK_NAMES})
    return frozenset({bound})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: bytes) -> str:
    """The name of a Host header without its port: b'127.0.0.1:8000' -> '127.0.0.1', b'[::1]:80' -> '::1'."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class HostCheck:
    """ASGI middleware: a request whose Host header is not one of `allowed` gets 400 with a one-line detail, so a web
    page on another name that resolves to this address (DNS rebinding) cannot use the API from a browser."""

    def __init__(self, app: ASGIApp, allowed: Collection[str] | None, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.allowed = allowed
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            header = dict(scope.get("headers") or []).get(b"host", b"")
            if host_name(header) not in self.allowed:
                self.on_reject()
                shown = one_line(header.decode("latin-1"), 60) or "(none)"
                names = ", ".join(sorted(self.allowed))
                detail = f"Host header {shown!r} is not one this server answers to ({names}); see --allowed-hosts"
                await detail_response(400, detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the listening socket ------------------------------------------------------------------------------------------


def url_host(host: str) -> str:
    """`host` as it goes in a URL: IPv6 addresses in brackets (http://[::]:8000/)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or a one-line CifarCnnError naming the address (in use, not allowed, no such
    host), so that nothing says "serving on ..." for a port the server cannot have."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(BACKLOG)  # listening now: the port is this server's from here on
    except OSError as exc:
        sock.close()
        where = f"{url_host(bare)}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise CifarCnnError(
                f"--port {port}: {where} is already in use; stop what holds it or choose another --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise CifarCnnError(
                f"--port {port}: not allowed to bind {where} (ports below 1024 need privileges)"
            ) from None
        reason = exc.strerror or str(exc)
        raise CifarCnnError(f"--host {host}: cannot bind {where} ({reason}); give an address of this machine") from None
    return sock
