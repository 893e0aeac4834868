"""Data sources: official batches (both pickle encodings, folder and archive), image folders and archives, the
decode cache, conversions back and forth, and the shared JPEG archive."""

from __future__ import annotations

import os
import pickle
import pickletools
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_cnn.data import load_dataset
from cifar_cnn.data.cache import load_cached
from cifar_cnn.data.images import decode_image
from cifar_cnn.data.sources import Dataset, canonical_order
from cifar_cnn.errors import CifarCnnError

from .conftest import CLASSES, make_images, make_tar, make_zip, write_official_batches
from .data_writers import write_image_folder, write_official


def quiet(_: str) -> None:
    pass


def expected(tiny: dict) -> Dataset:
    """What any reader must return for the tiny arrays: classes sorted, within-class order kept."""
    tx, ty = canonical_order(tiny["train_x"], tiny["train_y"])
    sx, sy = canonical_order(tiny["test_x"], tiny["test_y"])
    return Dataset(tx, ty, sx, sy, list(CLASSES))


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.classes == b.classes
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert np.array_equal(x, y), name


def test_py2_fixture_is_a_real_python2_pickle(official_dir: Path) -> None:
    """The generated batch uses Python 2 opcodes, as the official files do: no unicode strings, numpy.core globals."""
    ops = {op.name for op, _, _ in pickletools.genops(official_dir.joinpath("data_batch_1").read_bytes())}
    assert "BINUNICODE" not in ops and "SHORT_BINUNICODE" not in ops
    assert {"SHORT_BINSTRING", "BINSTRING", "GLOBAL"} <= ops
    assert b"numpy.core.multiarray\n_reconstruct" in official_dir.joinpath("data_batch_1").read_bytes()
    # a plain Python 3 loader, as real CIFAR-10 code does it, reads it with encoding='bytes'
    d = pickle.loads(official_dir.joinpath("data_batch_1").read_bytes(), encoding="bytes")
    assert d[b"data"].shape == (120, 3072) and d[b"data"].dtype == np.uint8


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_official_folder_both_encodings(tmp_path: Path, tiny_arrays: dict, style: str) -> None:
    a = tiny_arrays
    folder = write_official_batches(tmp_path / "b", a["train_x"], a["train_y"], a["test_x"], a["test_y"], style=style)
    ds = load_dataset(str(folder), log=quiet)
    assert_same(ds, expected(a))


def test_official_layout_is_channel_planes(tmp_path: Path) -> None:
    """Row = 1024 red, 1024 green, 1024 blue values: check one hand-made image pixel by pixel."""
    x = np.zeros((10, 3, 32, 32), dtype=np.uint8)
    x[3, 0, 5, 7] = 200  # red at row 5, column 7 of image 3
    x[3, 2, 31, 0] = 77  # blue at the bottom-left corner
    y = np.arange(10)
    folder = write_official_batches(tmp_path / "b", np.repeat(x, 5, 0), np.repeat(y, 5), x, y)
    raw = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")["data"][3]
    assert raw[5 * 32 + 7] == 200 and raw[2 * 1024 + 31 * 32] == 77
    ds = load_dataset(str(folder), log=quiet)
    assert ds.test_images[3, 0, 5, 7] == 200 and ds.test_images[3, 2, 31, 0] == 77
    assert ds.test_labels.tolist() == list(range(10))


def test_official_archive_and_parent_folder(tmp_path: Path, official_dir: Path, tiny_arrays: dict) -> None:
    archive = make_tar(official_dir, tmp_path / "cifar-10-python.tar.gz")
    assert_same(load_dataset(str(archive), log=quiet), expected(tiny_arrays))
    parent = tmp_path / "holder"
    parent.mkdir()
    shutil.copytree(official_dir, parent / "cifar-10-batches-py")
    assert_same(load_dataset(str(parent), log=quiet), expected(tiny_arrays))
    parent2 = tmp_path / "holder2"
    parent2.mkdir()
    shutil.copy(archive, parent2 / "cifar-10-python.tar.gz")
    assert_same(load_dataset(str(parent2), log=quiet), expected(tiny_arrays))


@pytest.mark.parametrize("kind", ["folder", "tar", "tar.gz", "zip"])
def test_image_folder_forms(tmp_path: Path, tiny_arrays: dict, kind: str) -> None:
    ds = expected(tiny_arrays)
    root = write_image_folder(ds, tmp_path / "imgs", fmt="png")
    source = {
        "folder": lambda: root,
        "tar": lambda: make_tar(root, tmp_path / "imgs.tar", "w", arcname="."),
        "tar.gz": lambda: make_tar(root, tmp_path / "imgs.tar.gz", "w:gz", arcname="cifar"),
        "zip": lambda: make_zip(root, tmp_path / "imgs.zip"),
    }[kind]()
    assert_same(load_dataset(str(source), log=quiet), ds)


def test_roundtrip_folder_official_folder_bit_exact(tmp_path: Path, tiny_arrays: dict) -> None:
    original = expected(tiny_arrays)
    folder = write_image_folder(original, tmp_path / "a")
    from_folder = load_dataset(str(folder), log=quiet)
    official = write_official(from_folder, tmp_path / "official")
    # read it back both with the package and with a plain unpickler, as other tools would
    as_bytes = pickle.loads((official / "test_batch").read_bytes(), encoding="bytes")
    as_latin1 = pickle.loads((official / "test_batch").read_bytes(), encoding="latin1")
    assert np.array_equal(as_bytes[b"data"].reshape(-1, 3, 32, 32), original.test_images)
    assert np.array_equal(as_latin1["data"].reshape(-1, 3, 32, 32), original.test_images)
    assert as_latin1["labels"] == original.test_labels.tolist()
    from_official = load_dataset(str(official), log=quiet)
    assert_same(from_official, original)
    again = load_dataset(str(write_image_folder(from_official, tmp_path / "b")), log=quiet)
    assert_same(again, original)


def test_image_folder_other_sizes_and_modes_resized(tmp_path: Path) -> None:
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls, mode in (("a", "L"), ("b", "RGBA")):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 255, size=(48, 64, 4 if mode == "RGBA" else 1), dtype=np.uint8).squeeze()
                Image.fromarray(arr, mode=mode).save(root / split / cls / f"{i}.png")
    (root / "train" / "a" / "notes.txt").write_text("not an image, skipped")
    ds = load_dataset(str(root), image_size=32, log=quiet)
    assert ds.train_images.shape == (6, 3, 32, 32) and ds.classes == ["a", "b"]
    # grayscale -> three equal channels
    assert np.array_equal(ds.train_images[0, 0], ds.train_images[0, 1])


def test_resize_center_crop_matches_pillow_reference() -> None:
    """A 64x48 image: shorter side 48 -> 32 (so 43x32), then the centre 32x32, computed independently with Pillow."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    buf = Path("/tmp") / f"cc_resize_{os.getpid()}.png"
    Image.fromarray(arr).save(buf)
    ours = decode_image(buf.read_bytes(), 32)
    ref = Image.fromarray(arr).resize((43, 32), Image.BILINEAR).crop((5, 0, 37, 32))
    assert np.array_equal(ours, np.asarray(ref).transpose(2, 0, 1))
    buf.unlink()


def test_decode_cache_second_load_fast_and_invalidated(tmp_path: Path, tiny_arrays: dict, data_home: Path) -> None:
    root = write_image_folder(expected(tiny_arrays), tmp_path / "imgs")
    messages: list[str] = []
    load_dataset(str(root), log=messages.append)
    assert any("decoded" in m for m in messages)
    assert len(list((data_home / "cache").glob("decoded-*.npz"))) == 1
    messages.clear()
    t0 = time.perf_counter()
    ds = load_dataset(str(root), log=messages.append)
    assert messages == [] and time.perf_counter() - t0 < 2.0  # from the cache: nothing decoded
    # change one image: the cache entry no longer applies and the new pixels are read
    target = root / "test" / "airplane" / "0000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    ds2 = load_dataset(str(root), log=messages.append)
    assert any("decoded" in m for m in messages)
    assert ds2.test_images[0].sum() == 0 and ds.test_images[0].sum() > 0


def test_corrupt_cache_is_rebuilt(tmp_path: Path, tiny_arrays: dict, data_home: Path) -> None:
    root = write_image_folder(expected(tiny_arrays), tmp_path / "imgs")
    load_dataset(str(root), log=quiet)
    cache = next((data_home / "cache").glob("decoded-*.npz"))
    cache.write_bytes(b"garbage")
    assert load_cached(cache) is None  # unreadable: the loader must decode the source again
    assert_same(load_dataset(str(root), log=quiet), expected(tiny_arrays))
    rebuilt = load_cached(cache)  # and write a good cache in its place
    assert rebuilt is not None
    assert_same(rebuilt, expected(tiny_arrays))


def test_val_folder_is_used(tmp_path: Path, tiny_arrays: dict) -> None:
    ds = expected(tiny_arrays)
    ds.val_images, ds.val_labels = ds.test_images[:30], ds.test_labels[:30]
    loaded = load_dataset(str(write_image_folder(ds, tmp_path / "v")), log=quiet)
    assert loaded.val_images is not None and np.array_equal(loaded.val_labels, np.sort(ds.val_labels))


def test_shared_archive_matches_its_readme(shared_archive: Path) -> None:
    """The real JPEG copy: 50,000 + 10,000 images, 5,000 / 1,000 per class, official class order."""
    ds = load_dataset(str(shared_archive), log=quiet)
    assert ds.classes == CLASSES
    assert ds.train_images.shape == (50000, 3, 32, 32) and ds.test_images.shape == (10000, 3, 32, 32)
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    # train/cat/0000.jpg is the first cat image, decoded the same way by Pillow directly
    import tarfile

    with tarfile.open(shared_archive) as tf:
        name = next(n for n in tf.getnames() if n.endswith("train/cat/0000.jpg"))
        blob = tf.extractfile(name).read()
    assert np.array_equal(ds.train_images[3 * 5000], decode_image(blob, 32))


@pytest.mark.parametrize("n", [1, 37, 500])
def test_make_images_helper_sane(n: int) -> None:
    x, y = make_images(n, num_classes=3)
    assert x.shape == (3 * n, 3, 32, 32) and np.bincount(y).tolist() == [n] * 3


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CifarCnnError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nope"), log=quiet)
