"""Bad-input catalogue rows for images, archives, folders and file names: size budgets after resizing, archive members,
non-regular files, links, EXIF (issue 16). Gathered by test_bad_input.py; the row types and builders are in
bad_input_kit.py."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .bad_input_kit import Case, Env, HttpCase, good_tree_files, png_header_only


def _strip_png() -> bytes:
    """A 1 x 1,000,000 PNG (3,955 bytes): its shorter side resized to the model's would make it enormous."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1_000_000), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _png16_header(width: int, height: int) -> bytes:
    """A 16-bit grey PNG header claiming width x height (the pixel guard refuses it before decoding)."""
    blob = bytearray(png_header_only(width, height))
    blob[24:26] = bytes([16, 0])  # bit depth 16, colour type 0 (grey)
    blob[29:33] = struct.pack(">I", zlib.crc32(bytes(blob[12:29])))
    return bytes(blob)


def _tree_with(e: Env, name: str, make: Callable[[Path], None]) -> Path:
    root = e.tree(good_tree_files(), name)
    make(root / "train" / "a")
    return root


def _sparse_tar(e: Env) -> Path:
    """An image-folder tar whose member train/a/huge.png declares 2 GB; the data is a hole of a sparse file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for rel, blob in good_tree_files().items():
            info = tarfile.TarInfo(rel)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        huge = tarfile.TarInfo("train/a/huge.png")
        huge.size = 2 * 2**30
        members = buf.getvalue()[: tf.offset] + huge.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    path = e.tmp / "huge-member.tar"
    with open(path, "wb") as f:
        f.write(members)
        f.seek(2 * 2**30, os.SEEK_CUR)
        f.write(b"\0" * 1024)
    return path


def _official_batch_link(e: Env) -> Path:
    folder = e.tmp / "official_zero"
    folder.mkdir()
    for f in e.official.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "data_batch_3").unlink()
    (folder / "data_batch_3").symlink_to("/dev/zero")
    return folder


def _labels_fifo(e: Env) -> list[str]:
    root = e.tree({"img/a.png": good_tree_files()["train/a/0.png"]}, "lf")
    os.mkfifo(e.tmp / "labels.csv")
    return ["data", "--data", str(root), "--labels", str(e.tmp / "labels.csv")]


CASES: list[Case] = [
    (
        "image-extreme-aspect",
        "images",
        "a 1 x 1,000,000 PNG of 3,955 bytes (its shorter side resized to 32 would make 32 x 32,000,000)",
        lambda e: ["data", "--data", str(e.tree({**good_tree_files(), "train/a/strip.png": _strip_png()}, "strip"))],
        "strip.png: image of 1x1000000 pixels has an extreme aspect ratio",
    ),
    (
        "image-16bit-huge",
        "images",
        "a 16-bit grey PNG whose header claims 7000 x 7000 pixels",
        lambda e: ["data", "--data", str(e.tree({**good_tree_files(), "train/b/deep.png": _png16_header(7000, 7000)}))],
        "deep.png: image of 7000x7000 pixels is larger than the limit",
    ),
    (
        "image-fifo",
        "images",
        "a FIFO named .png in a class folder (reading it would wait forever)",
        lambda e: ["data", "--data", str(_tree_with(e, "fifo", lambda d: os.mkfifo(d / "pipe.png")))],
        "pipe.png: not a regular file (a FIFO)",
    ),
    (
        "image-dev-zero-link",
        "images",
        "a link to /dev/zero named .png in a class folder (reading it would never end)",
        lambda e: ["data", "--data", str(_tree_with(e, "zero", lambda d: (d / "zero.png").symlink_to("/dev/zero")))],
        "zero.png: not a regular file (a character device)",
    ),
    (
        "archive-member-2gb",
        "images",
        "an image-folder tar whose member declares 2 GB (a sparse file: nothing is written)",
        lambda e: ["data", "--data", str(_sparse_tar(e))],
        "huge-member.tar:train/a/huge.png: archive member of 2,147,483,648 bytes is larger than the limit",
    ),
    (
        "official-batch-dev-zero",
        "data",
        "an official folder whose data_batch_3 is a link to /dev/zero",
        lambda e: ["data", "--data", str(_official_batch_link(e))],
        "data_batch_3: not a regular file (a character device)",
    ),
    (
        "labels-fifo",
        "data",
        "--labels naming a FIFO",
        _labels_fifo,
        "labels.csv: not a regular file (a FIFO)",
    ),
]
HTTP_CASES: list[HttpCase] = []
