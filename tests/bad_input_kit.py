"""What the bad-input catalogue's rows are made of: the environment a command-line case gets (Env), the row types,
and small builders of bad files and requests. The rows live in test_bad_input.py and in the bad_input_*.py modules
it gathers (one per area), so each area's cases sit together."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image


@dataclass
class Env:
    tmp: Path
    official: Path  # a good official-format folder
    run: Path  # a finished run whose files must survive every bad command
    monkeypatch: pytest.MonkeyPatch  # environment variables a case sets (undone after it)

    def official_with(self, name: str, blob: bytes) -> Path:
        """A copy of the good official folder with one file replaced."""
        folder = self.tmp / f"official_{name}_{hashlib.md5(blob).hexdigest()[:8]}"
        folder.mkdir()
        for f in self.official.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / name).write_bytes(blob)
        return folder

    def tree(self, files: dict[str, bytes], name: str = "tree") -> Path:
        root = self.tmp / name
        for rel, blob in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)
        return root

    def offline(self, argv: list[str]) -> list[str]:
        """`argv`, run with HF_HUB_OFFLINE=1 (undone after the test): the hub is never asked."""
        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return argv

    def train_into_run(self, *args: str) -> list[str]:
        """A train command aimed at the finished run with --overwrite: bad input must be caught before it is touched."""
        return ["train", "--out", str(self.run), "--overwrite", "--epochs", "1", "--threads", "1", *args]


def png(size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def good_tree_files(classes=("a", "b")) -> dict[str, bytes]:
    return {f"{split}/{c}/{i}.png": png() for split in ("train", "test") for c in classes for i in range(2)}


def ckpt_file(e: Env, name: str, obj=None, blob: bytes | None = None) -> Path:
    path = e.tmp / name
    if blob is not None:
        path.write_bytes(blob)
    else:
        torch.save(obj, path)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels followed by a tiny IDAT: a decompression bomb in 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


MIB = 1024 * 1024  # the catalogue's server runs with --max-upload-mb 1


def upload(data: bytes, name: str = "image.png", **params: str) -> dict[str, Any]:
    """httpx.request arguments for POST /predict with `data` as the multipart `file` field."""
    return {"files": {"file": (name, data, "application/octet-stream")}, "params": params}


def streamed_body(total: int) -> dict[str, Any]:
    """A multipart body of `total` bytes sent chunked, with no Content-Length for the server to check first."""
    head = b"--x\r\nContent-Disposition: form-data; name=file; filename=stream.jpg\r\n\r\n"
    chunks = [head] + [b"0" * 65536] * (total // 65536)
    return {"content": iter(chunks), "headers": {"content-type": "multipart/form-data; boundary=x"}}


# (id, area, what, argv builder, fragment the message must contain)
Case = tuple[str, str, str, Callable[[Env], list[str]], str]

# (id, area, what, request builder (httpx.request arguments; POST /predict unless it says), status, message fragment)
HttpCase = tuple[str, str, str, Callable[[], dict[str, Any]], int, str]
