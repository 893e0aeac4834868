"""Shared fixtures: tiny generated data sets in every supported form, an isolated data home, the shared archive."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the long checks marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long check: run by hand with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty $CIFAR_CNN_HOME, so no test sees another's cache or download."""
    home = tmp_path / "home"
    monkeypatch.setenv("CIFAR_CNN_HOME", str(home))
    return home


@pytest.fixture
def set_umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test (`set_umask(0o027)`) and restore the original afterwards."""
    original = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask) and None
    finally:
        os.umask(original)


def make_images(per_class: int, num_classes: int = 10, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (N, 3, size, size) with labels in a shuffled, official-like class order.

    Each class gets a distinct mean colour so that a model can learn something from a few hundred images.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    base = np.random.default_rng(12345).integers(40, 216, size=(num_classes, 3, 1, 1))  # same colours in every split
    noise = rng.integers(-40, 40, size=(len(labels), 3, size, size))
    images = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2 did for CIFAR-10: str as (SHORT_)BINSTRING, numpy under numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_str(self, obj: str) -> None:  # Python 2 pickled its (byte) str type for names like '|' and 'u1'
        self.save_bytes(obj.encode("latin1"))

    dispatch[str] = save_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = pickle.whichmodule(obj, name or obj.__qualname__).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_official_batches(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    style: str = "py2",
    classes: list[str] = CLASSES,
) -> Path:
    """Official-format batches written independently of the package: 'py2' as the original files (bytes keys,
    BINSTRING data), 'py3' as a Python 3 re-save (str keys, protocol 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(labels)), 5)
    batches = [(f"data_batch_{i + 1}", images[idx], labels[idx]) for i, idx in enumerate(chunks)]
    batches.append(("test_batch", test_images, test_labels))
    for name, x, y in batches:
        if style == "py2":
            d = {
                b"batch_label": name.encode(),
                b"labels": [int(v) for v in y],
                b"data": x.reshape(len(x), -1),
                b"filenames": [f"{i}.png".encode() for i in range(len(y))],
            }
            blob = py2_dumps(d)
        else:
            d = {"batch_label": name, "labels": [int(v) for v in y], "data": x.reshape(len(x), -1)}
            blob = pickle.dumps(d, protocol=4)
        (folder / name).write_bytes(blob)
    meta = {b"label_names": [c.encode() for c in classes]} if style == "py2" else {"label_names": classes}
    (folder / "batches.meta").write_bytes(py2_dumps(meta) if style == "py2" else pickle.dumps(meta, protocol=4))
    return folder


@pytest.fixture
def tiny_arrays() -> dict[str, np.ndarray]:
    """60 train and 20 test images per class, in shuffled (official-like) order."""
    x, y = make_images(60, seed=1)
    tx, ty = make_images(20, seed=2)
    return {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty}


@pytest.fixture
def official_dir(tmp_path: Path, tiny_arrays: dict) -> Path:
    a = tiny_arrays
    return write_official_batches(
        tmp_path / "cifar-10-batches-py", a["train_x"], a["train_y"], a["test_x"], a["test_y"]
    )


def make_tar(src: Path, dest: Path, mode: str = "w:gz", arcname: str | None = None) -> Path:
    with tarfile.open(dest, mode) as tf:
        tf.add(src, arcname=arcname or src.name)
    return dest


def make_zip(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return dest


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m cifar_cnn ARGS` in a fresh process, as a user would."""
    src = str(ROOT / "src")
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "cifar_cnn", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        pytest.fail(f"the shared data archive is missing: {SHARED_ARCHIVE} (CI and the README expect it there)")
    return SHARED_ARCHIVE


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real tmpfs of a given size (tests run as root; file permissions would not stop root). Remount it read-only
    with `mount -o remount,ro`."""
    mounts = []

    def make(size_bytes: int) -> Path:
        mnt = tmp_path / f"disk{len(mounts)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mnt)], check=True)
        mounts.append(mnt)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
