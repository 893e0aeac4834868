"""The decode cache: round trip, what invalidates the key, corrupt files, and file modes under the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cifar_cnn import atomic
from cifar_cnn.data.cache import cache_path, load_cached, save_cached
from cifar_cnn.data.sources import Dataset


def make_dataset(with_val: bool = False, size: int = 8) -> Dataset:
    rng = np.random.default_rng(7)
    ds = Dataset(
        train_images=rng.integers(0, 256, (12, 3, size, size), dtype=np.uint8),
        train_labels=np.array([0, 1, 2] * 4, dtype=np.int64),
        test_images=rng.integers(0, 256, (6, 3, size, size), dtype=np.uint8),
        test_labels=np.array([2, 1, 0] * 2, dtype=np.int64),
        classes=["cat", "dog", "frog"],
    )
    if with_val:
        ds.val_images = rng.integers(0, 256, (3, 3, size, size), dtype=np.uint8)
        ds.val_labels = np.array([1, 0, 2], dtype=np.int64)
    return ds


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.classes == b.classes
    assert a.arrays().keys() == b.arrays().keys()
    for name, arr in a.arrays().items():
        other = b.arrays()[name]
        assert other.dtype == arr.dtype and other.shape == arr.shape and np.array_equal(other, arr), name


@pytest.mark.parametrize("with_val", [False, True])
def test_round_trip(tmp_path: Path, with_val: bool) -> None:
    ds = make_dataset(with_val)
    file = tmp_path / "home" / "cache" / "decoded-x.npz"
    save_cached(file, ds)  # creates the missing parent folders
    loaded = load_cached(file)
    assert loaded is not None
    assert_same(ds, loaded)
    assert (loaded.val_images is None) is (not with_val)
    assert sorted(p.name for p in file.parent.iterdir()) == ["decoded-x.npz"]  # no temporary file left


def test_key_follows_size_mtime_and_image_size(tmp_path: Path) -> None:
    home = tmp_path / "home"
    src = tmp_path / "data.tar.gz"
    src.write_bytes(b"abcd")
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    key = cache_path(home, src, 32)
    assert key.parent == home / "cache" and key.name.startswith("decoded-") and key.suffix == ".npz"
    assert cache_path(home, src, 32) == key  # deterministic
    assert cache_path(home, src, 64) != key  # image size
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_001_000_000_000))
    moved = cache_path(home, src, 32)
    assert moved != key  # mtime
    src.write_bytes(b"abcde")
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_001_000_000_000))
    assert cache_path(home, src, 32) not in (key, moved)  # size


def test_key_of_a_folder_follows_its_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    root = tmp_path / "imgs"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "0.png").write_bytes(b"x")
    key = cache_path(home, root, 32)
    (root / "train" / "cat" / "1.png").write_bytes(b"y")
    assert cache_path(home, root, 32) != key


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04 truncated zip"])
def test_corrupt_cache_gives_none(tmp_path: Path, content: bytes) -> None:
    file = tmp_path / "decoded-bad.npz"
    file.write_bytes(content)
    assert load_cached(file) is None


def test_truncated_cache_gives_none(tmp_path: Path) -> None:
    file = tmp_path / "decoded-t.npz"
    save_cached(file, make_dataset())
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert load_cached(file) is None


def test_missing_cache_gives_none(tmp_path: Path) -> None:
    assert load_cached(tmp_path / "nothing.npz") is None


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_cache_file_mode_honours_umask(tmp_path: Path, set_umask: Callable[[int], None], mask: int, mode: int) -> None:
    set_umask(mask)
    file = tmp_path / "cache" / "decoded-m.npz"
    save_cached(file, make_dataset())
    assert stat.S_IMODE(file.stat().st_mode) == mode


def test_write_error_propagates_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    file = tmp_path / "cache" / "decoded-e.npz"
    with pytest.raises(OSError, match="No space"):
        save_cached(file, make_dataset())
    monkeypatch.undo()
    assert list(file.parent.iterdir()) == []
