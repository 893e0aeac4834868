"""Atomic file writes (temporary file in the same folder, fsync, rename), without torch so every part can use them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows.

    On Linux it is the `Umask:` line of /proc/self/status. Elsewhere it is read with the os.umask(0)/os.umask(old)
    pair, which briefly sets the umask to 0 (a thread creating a file at that moment would get a too-open mode).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0)
    os.umask(old)
    return old


def new_file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write a file through a temporary file in the same folder, fsync it, then rename it over `path`.

    `write(f)` writes the content to the open binary file `f`. A crash or full disk at any moment leaves either the
    old complete file or the new complete one. The new file gets the mode open() would give it (0o666 less the
    umask), not mkstemp's 0o600, also when it replaces a file with another mode.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), new_file_mode())
            else:  # pragma: no cover - Windows before Python 3.13
                os.chmod(tmp, new_file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
