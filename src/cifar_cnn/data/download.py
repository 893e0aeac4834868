"""Fetching an official archive (CIFAR-10 or CIFAR-100, python format): download with md5 check, then a safe
extraction into the data home."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..atomic import atomic_write_bytes
from ..errors import CifarCnnError
from .sources import (
    CIFAR100_ARCHIVE,
    CIFAR100_DIRNAME,
    CIFAR100_FILES,
    OFFICIAL_DIRNAME,
    OFFICIAL_TEST_BATCH,
    OFFICIAL_TRAIN_BATCHES,
    check_member_name,
    zlib_error,
)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
URL_ENV = "CIFAR_CNN_CIFAR10_URL"  # a mirror, or a test server on 127.0.0.1
MD5_ENV = "CIFAR_CNN_CIFAR10_MD5"  # the md5 of what that mirror serves, if it is not the official file
ARCHIVE_NAME = "cifar-10-python.tar.gz"


@dataclass(frozen=True)
class OfficialSet:
    """One official python-format archive: where it is served, how to check it, what it unpacks to."""

    name: str  # "CIFAR-10", in messages
    url: str  # the official download address
    md5: str  # md5 of the official archive
    url_env: str  # environment variable naming a mirror (or a test server on 127.0.0.1) instead of `url`
    md5_env: str  # environment variable with the md5 of what that mirror serves, if it is not the official file
    archive_name: str  # the archive's file name in the data home
    dirname: str  # the folder the archive unpacks to, in the data home
    required_files: tuple[str, ...]  # what that folder must hold to count as complete

    def no_network_hint(self) -> str:
        return (
            f"with no network, point --data at a local copy: {self.archive_name}, its extracted {self.dirname}/ "
            "folder, or an image-folder tree or archive (train/<class>/..., test/<class>/...)"
        )


CIFAR10 = OfficialSet(
    "CIFAR-10",
    OFFICIAL_URL,
    OFFICIAL_MD5,
    URL_ENV,
    MD5_ENV,
    ARCHIVE_NAME,
    OFFICIAL_DIRNAME,
    (*OFFICIAL_TRAIN_BATCHES, OFFICIAL_TEST_BATCH),  # batches.meta is optional: the reader knows the class names
)
CIFAR100 = OfficialSet(
    "CIFAR-100",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    "CIFAR_CNN_CIFAR100_URL",
    "CIFAR_CNN_CIFAR100_MD5",
    CIFAR100_ARCHIVE,
    CIFAR100_DIRNAME,
    CIFAR100_FILES,
)

NO_NETWORK_HINT = CIFAR10.no_network_hint()


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    md5: str,
    log: Callable[[str], None] = print,
    timeout: float = 30.0,
    *,
    spec: OfficialSet = CIFAR10,
) -> Path:
    """Download `url` to `dest` atomically (cifar_cnn.atomic); the file is kept only if its md5 matches.
    `spec` names the data set and its mirror variable in messages."""

    def fetch(out: IO[bytes]) -> None:
        h = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            while block := resp.read(1 << 20):
                h.update(block)
                out.write(block)
        if h.hexdigest() != md5:
            raise CifarCnnError(
                f"download from {url} has md5 {h.hexdigest()}, expected {md5}: the file is corrupt or not "
                f"{spec.name}; try again or use another mirror (${spec.url_env}, with ${spec.md5_env} if its file "
                "differs)"
            )

    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {spec.name} from {url}")
    try:
        atomic_write_bytes(dest, fetch)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CifarCnnError(
            f"could not download {spec.name} from {url} ({reason}); {spec.no_network_hint()}; "
            f"or set ${spec.url_env} to a reachable mirror"
        ) from None
    return dest


def safe_extract(archive: Path, dest: Path, keep: Callable[[str], bool], required: Iterable[str] = ()) -> None:
    """Extract the regular files of `archive` that `keep` accepts into `dest`, refusing unsafe member names.

    Members are written to a temporary folder beside `dest` first and moved into place only when all of them, and
    every `required` file (a path relative to `dest`), are there; an archive that fails half-way leaves nothing behind.
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
        except (tarfile.TarError, OSError, EOFError, zlib_error()) as exc:
            raise CifarCnnError(
                f"{archive}: archive is corrupt or truncated ({exc}); delete it and download again"
            ) from None
        missing = [name for name in required if not tmp.joinpath(name).is_file()]
        if missing:
            raise CifarCnnError(f"{archive}: does not contain {', '.join(missing)}; delete it and download again")
        for top in tmp.iterdir():
            final = dest / top.name
            if final.exists():
                shutil.rmtree(final)
            os.replace(top, final)


def official_folder_complete(folder: Path, spec: OfficialSet = CIFAR10) -> bool:
    return all((folder / n).is_file() for n in spec.required_files)


def ensure_official(spec: OfficialSet, home: Path, log: Callable[[str], None] = print) -> Path:
    """The extracted folder of `spec` in `home`, downloaded (from $`spec.url_env` or the official URL), md5-checked
    and extracted if it is not there yet."""
    folder = home / spec.dirname
    if official_folder_complete(folder, spec):
        return folder
    url = os.environ.get(spec.url_env) or spec.url
    md5 = os.environ.get(spec.md5_env) or spec.md5
    archive = home / spec.archive_name
    if not (archive.is_file() and md5_of(archive) == md5):
        download(url, archive, md5, log=log, spec=spec)
    required = [f"{spec.dirname}/{name}" for name in spec.required_files]
    safe_extract(archive, home, keep=lambda name: name.startswith(spec.dirname + "/"), required=required)
    return folder


def ensure_cifar10(home: Path, log: Callable[[str], None] = print) -> Path:
    """The official CIFAR-10 batches folder in `home` (see `ensure_official`)."""
    return ensure_official(CIFAR10, home, log)


def ensure_cifar100(home: Path, log: Callable[[str], None] = print) -> Path:
    """The official CIFAR-100 folder (`cifar-100-python/`: train, test, meta) in `home` (see `ensure_official`)."""
    return ensure_official(CIFAR100, home, log)
