"""Fetching the official CIFAR-10 archive: download with md5 check, then a safe extraction."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ..atomic import atomic_write_bytes
from ..errors import CifarCnnError
from .sources import OFFICIAL_DIRNAME, OFFICIAL_TEST_BATCH, OFFICIAL_TRAIN_BATCHES, check_member_name

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
URL_ENV = "CIFAR_CNN_CIFAR10_URL"  # a mirror, or a test server on 127.0.0.1
MD5_ENV = "CIFAR_CNN_CIFAR10_MD5"  # the md5 of what that mirror serves, if it is not the official file
ARCHIVE_NAME = "cifar-10-python.tar.gz"

NO_NETWORK_HINT = (
    "with no network, point --data at a local copy: cifar-10-python.tar.gz, its extracted cifar-10-batches-py/ "
    "folder, or an image-folder tree or archive (train/<class>/..., test/<class>/...)"
)


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, log: Callable[[str], None] = print, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` atomically (cifar_cnn.atomic); the file is kept only if its md5 matches."""

    def fetch(out: IO[bytes]) -> None:
        h = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            while block := resp.read(1 << 20):
                h.update(block)
                out.write(block)
        if h.hexdigest() != md5:
            raise CifarCnnError(
                f"download from {url} has md5 {h.hexdigest()}, expected {md5}: the file is corrupt or not CIFAR-10; "
                f"try again or use another mirror (${URL_ENV})"
            )

    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {url}")
    try:
        atomic_write_bytes(dest, fetch)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CifarCnnError(f"could not download CIFAR-10 from {url} ({reason}); {NO_NETWORK_HINT}") from None
    return dest


def safe_extract(archive: Path, dest: Path, keep: Callable[[str], bool]) -> None:
    """Extract the regular files of `archive` that `keep` accepts into `dest`, refusing unsafe member names.

    Members are written to a temporary folder beside `dest` first and moved into place at the end, so an archive
    that fails half-way leaves nothing behind.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".extract-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    rel = check_member_name(member.name, archive)
                    if not member.isfile() or not keep(rel.as_posix()):
                        continue  # links, devices and unwanted files are never written
                    target = tmp.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(member)
                    with open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CifarCnnError(
                f"{archive}: archive is corrupt or truncated ({exc}); delete it and download again"
            ) from None
        for top in tmp.iterdir():
            final = dest / top.name
            if final.exists():
                shutil.rmtree(final)
            os.replace(top, final)


def official_folder_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in (*OFFICIAL_TRAIN_BATCHES, OFFICIAL_TEST_BATCH))


def ensure_cifar10(home: Path, log: Callable[[str], None] = print) -> Path:
    """The official batches folder in `home`, downloaded (from $CIFAR_CNN_CIFAR10_URL or the official URL),
    md5-checked and extracted if it is not there yet."""
    folder = home / OFFICIAL_DIRNAME
    if official_folder_complete(folder):
        return folder
    url = os.environ.get(URL_ENV, OFFICIAL_URL)
    md5 = os.environ.get(MD5_ENV, OFFICIAL_MD5)
    archive = home / ARCHIVE_NAME
    if not (archive.is_file() and md5_of(archive) == md5):
        download(url, archive, md5, log=log)
    safe_extract(archive, home, keep=lambda name: name.startswith(OFFICIAL_DIRNAME + "/"))
    if not official_folder_complete(folder):
        raise CifarCnnError(f"{archive}: does not contain {OFFICIAL_DIRNAME}/ with data_batch_1..5 and test_batch")
    return folder
