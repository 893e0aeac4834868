"""Data sources: official batches (both pickle encodings, folder and archive), CIFAR-100 (folder and archive, fine and
coarse labels), image folders and archives, the decode cache, conversions back and forth, and the shared JPEG
archive."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_cnn.data import load_dataset
from cifar_cnn.data.images import decode_image
from cifar_cnn.data.sources import (
    CIFAR100_DIRNAME,
    Dataset,
    archive_is_cifar100,
    archive_is_official,
    canonical_order,
    read_cifar100_archive,
    read_cifar100_folder,
    read_official_folder,
)
from cifar_cnn.errors import CifarCnnError

from .conftest import CLASSES, make_images, make_tar, make_zip, py2_dumps, write_official_batches
from .data_writers import Cifar100Written, write_cifar100, write_image_folder, write_official


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


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-100 (official python format): train, test, meta in cifar-100-python/, fine or coarse labels


def by_class(images: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical order computed independently: class 0's images in file order, then class 1's, ..."""
    idx = np.concatenate([np.flatnonzero(labels == c) for c in range(num_classes)])
    return images[idx], labels[idx]


def expected_cifar100(w: Cifar100Written, label_set: str) -> Dataset:
    names = w.fine_names if label_set == "fine" else w.coarse_names
    train_y = w.train_fine if label_set == "fine" else w.train_coarse
    test_y = w.test_fine if label_set == "fine" else w.test_coarse
    tx, ty = by_class(w.train_images, train_y, len(names))
    sx, sy = by_class(w.test_images, test_y, len(names))
    return Dataset(tx, ty, sx, sy, list(names))


@pytest.fixture
def c100(tmp_path: Path) -> Cifar100Written:
    """A small CIFAR-100 (2 train, 1 test image per fine class) in an extracted cifar-100-python/ folder."""
    return write_cifar100(tmp_path / "holder" / CIFAR100_DIRNAME)


def test_cifar100_writer_is_the_official_format(c100: Cifar100Written) -> None:
    """Python 2 opcodes and the official keys, read back with a plain unpickler as other CIFAR-100 code does."""
    blob = (c100.path / "train").read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(blob)}
    assert "BINUNICODE" not in ops and "SHORT_BINUNICODE" not in ops and b"numpy.core.multiarray" in blob
    d = pickle.loads(blob, encoding="bytes")
    assert set(d) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (200, 3072)
    # row layout: the red plane (first 1024 values) is the fine label, the green plane the index within the class
    assert (d[b"data"][:, :1024] == np.array(d[b"fine_labels"])[:, None]).all()
    assert d[b"coarse_labels"] == c100.fine_to_coarse[d[b"fine_labels"]].tolist()
    meta = pickle.loads((c100.path / "meta").read_bytes(), encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20
    assert np.bincount(c100.fine_to_coarse).tolist() == [5] * 20


@pytest.mark.parametrize("label_set", ["fine", "coarse"])
def test_cifar100_folder_and_parent(c100: Cifar100Written, label_set: str) -> None:
    want = expected_cifar100(c100, label_set)
    ds = read_cifar100_folder(c100.path, label_set)
    assert_same(ds, want)
    assert ds.classes == (c100.fine_names if label_set == "fine" else c100.coarse_names)  # meta's order, not sorted
    assert_same(read_cifar100_folder(c100.path.parent, label_set), want)  # the folder holding cifar-100-python/


def test_cifar100_fine_labels_and_pixels_land_together(c100: Cifar100Written) -> None:
    """In canonical order image i of fine class c is the i-th image of c in the file: red = c, green = i."""
    ds = read_cifar100_folder(c100.path, "fine")
    assert ds.train_labels.tolist() == np.repeat(np.arange(100), 2).tolist()
    assert ds.test_labels.tolist() == list(range(100))
    assert (ds.train_images[:, 0] == ds.train_labels[:, None, None]).all()
    assert ds.train_images[:, 1, 0, 0].tolist() == [0, 1] * 100
    assert (ds.test_images[:, 1] == 0).all()


def test_cifar100_coarse_is_consistent_with_fine(c100: Cifar100Written) -> None:
    """Every image read with coarse labels carries its fine class in its pixels: that class's superclass must be its
    label, each superclass holds its 5 fine classes' images, and fine classes keep their file order inside it."""
    fine = read_cifar100_folder(c100.path, "fine")
    coarse = read_cifar100_folder(c100.path, "coarse")
    pixel_fine = coarse.train_images[:, 0, 0, 0].astype(np.int64)
    assert coarse.train_labels.tolist() == c100.fine_to_coarse[pixel_fine].tolist()
    assert (
        np.bincount(coarse.train_labels).tolist() == [10] * 20 and np.bincount(coarse.test_labels).tolist() == [5] * 20
    )
    # the same images, only grouped differently
    assert sorted(map(bytes, coarse.train_images)) == sorted(map(bytes, fine.train_images))
    assert np.array_equal(coarse.test_images, by_class(c100.test_images, c100.test_coarse, 20)[0])


@pytest.mark.parametrize("label_set", ["fine", "coarse"])
def test_cifar100_archive(tmp_path: Path, label_set: str) -> None:
    w = write_cifar100(tmp_path / "cifar-100-python.tar.gz", seed=5)
    assert_same(read_cifar100_archive(w.path, label_set), expected_cifar100(w, label_set))
    # the same content extracted reads the same
    with tarfile.open(w.path) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    assert_same(read_cifar100_folder(tmp_path / "x", label_set), read_cifar100_archive(w.path, label_set))


def test_archive_kind_detection(tmp_path: Path, official_dir: Path, tiny_arrays: dict) -> None:
    c100 = write_cifar100(tmp_path / "c100.tar.gz").path
    c10 = make_tar(official_dir, tmp_path / "cifar-10-python.tar.gz")
    images = make_tar(write_image_folder(expected(tiny_arrays), tmp_path / "imgs"), tmp_path / "imgs.tar.gz")
    flat = make_tar(write_cifar100(tmp_path / "flat").path, tmp_path / "flat.tar", "w", arcname=".")
    assert (archive_is_cifar100(c100), archive_is_official(c100)) == (True, False)
    assert (archive_is_cifar100(c10), archive_is_official(c10)) == (False, True)
    assert (archive_is_cifar100(images), archive_is_official(images)) == (False, False)
    assert archive_is_cifar100(flat)  # ./train beside ./meta, without the cifar-100-python/ folder
    assert not archive_is_cifar100(make_zip(tmp_path / "flat", tmp_path / "flat.zip"))
    # a lone file named train (an image tree's stray file) is not enough
    lone = tmp_path / "lone"
    (lone / "train").mkdir(parents=True)
    (lone / "sub").mkdir()
    (lone / "sub" / "train").write_bytes(b"x")
    (lone / "meta").write_bytes(b"x")
    assert not archive_is_cifar100(make_tar(lone, tmp_path / "lone.tar.gz"))


def test_cifar100_unknown_label_set(c100: Cifar100Written) -> None:
    for read in (read_cifar100_folder, read_cifar100_archive):
        with pytest.raises(CifarCnnError, match=r"must be one of fine, coarse, got 'medium'"):
            read(c100.path, "medium")


def _py2(d: dict) -> bytes:
    return py2_dumps({k.encode(): v for k, v in d.items()})


def _c100_file(n: int = 3, **override: object) -> dict:
    d = {"data": np.zeros((n, 3072), np.uint8), "fine_labels": [0] * n, "coarse_labels": [0] * n}
    d.update(override)
    return {k: v for k, v in d.items() if v is not None}


class _Gadget:
    def __reduce__(self):
        return (os.system, ("true",))


C100_BAD = {
    "missing-train": ("train", None, "fine", "missing train; the official CIFAR-100 set has train, test and meta"),
    "missing-meta": ("meta", None, "coarse", "missing meta; the official CIFAR-100 set has train, test and meta"),
    "garbage": ("test", b"\x00garbage" * 10, "fine", "test: not a readable CIFAR-100 python file"),
    "not-a-dict": ("train", pickle.dumps([1, 2], protocol=2), "fine", "train: expected a pickled dict"),
    "code-gadget": ("train", pickle.dumps({"data": _Gadget()}, protocol=2), "fine", r"posix\.system"),
    "no-fine-labels": ("train", _py2(_c100_file(fine_labels=None)), "fine", "needs a 'data' array and 'fine_labels'"),
    "fine-out-of-range": ("test", _py2(_c100_file(fine_labels=[0, 100, 1])), "fine", "fine_labels must be in 0..99"),
    "coarse-out-of-range": ("test", _py2(_c100_file(coarse_labels=[20, 0, 1])), "coarse", "in 0..19"),
    "negative": ("train", _py2(_c100_file(coarse_labels=[-1, 0, 1])), "coarse", r"found -1\.\.1"),
    "label-count": ("train", _py2(_c100_file(fine_labels=[0, 1])), "fine", "'fine_labels' must be 3 integers"),
    "wrong-width": ("train", _py2(_c100_file(data=np.zeros((3, 1024), np.uint8))), "fine", r"\(n, 3072\)"),
    "float-pixels": ("test", _py2(_c100_file(data=np.zeros((3, 3072), np.float32))), "fine", "must be uint8"),
    "no-coarse-names": ("meta", _py2({"fine_label_names": [b"a"] * 100}), "coarse", "expected 'coarse_label_names'"),
}


@pytest.mark.parametrize("case", sorted(C100_BAD))
@pytest.mark.parametrize("form", ["folder", "archive"])
def test_cifar100_bad_files_are_one_line_errors(c100: Cifar100Written, tmp_path: Path, case: str, form: str) -> None:
    name, blob, label_set, fragment = C100_BAD[case]
    target = c100.path / name
    if blob is None:
        target.unlink()
    else:
        target.write_bytes(blob)
    source = c100.path if form == "folder" else make_tar(c100.path, tmp_path / "c.tar.gz")
    read = read_cifar100_folder if form == "folder" else read_cifar100_archive
    with pytest.raises(CifarCnnError, match=fragment) as info:
        read(source, label_set)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(source) in message
    if blob is not None and case != "code-gadget":
        assert f"{source}/{name}" in message  # the file at fault


def test_cifar100_other_label_set_still_reads(c100: Cifar100Written) -> None:
    """A bad coarse label set does not stop the fine one (only the labels asked for are checked)."""
    d = pickle.loads((c100.path / "test").read_bytes(), encoding="latin1")
    d["coarse_labels"] = [99] * len(d["coarse_labels"])
    (c100.path / "test").write_bytes(py2_dumps(d))
    assert_same(read_cifar100_folder(c100.path, "fine"), expected_cifar100(c100, "fine"))
    with pytest.raises(CifarCnnError, match="coarse_labels must be in 0..19"):
        read_cifar100_folder(c100.path, "coarse")


@pytest.mark.parametrize("bad_name", ["../escape", "/abs/escape", "cifar-100-python/../../escape"])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
@pytest.mark.parametrize("first", [True, False])
def test_cifar100_unsafe_archive_member_refused(
    c100: Cifar100Written, tmp_path: Path, bad_name: str, mode: str, first: bool
) -> None:
    """The reader refuses the archive wherever the bad member is; the detector, which stops at the first sign of
    CIFAR-100, refuses it when it comes first."""
    archive = tmp_path / ("unsafe.tar" if mode == "w" else "unsafe.tar.gz")
    info = tarfile.TarInfo(bad_name)
    info.size = 2
    with tarfile.open(archive, mode) as tf:
        if first:
            tf.addfile(info, io.BytesIO(b"hi"))
        tf.add(c100.path, arcname=CIFAR100_DIRNAME)
        if not first:
            tf.addfile(info, io.BytesIO(b"hi"))
    for check in (read_cifar100_archive, archive_is_cifar100) if first else (read_cifar100_archive,):
        with pytest.raises(CifarCnnError, match="refusing archive member .*unsafe"):
            check(archive)
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_cifar100_truncated_archive(tmp_path: Path) -> None:
    archive = write_cifar100(tmp_path / "cifar-100-python.tar.gz").path
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CifarCnnError, match="truncated"):
        read_cifar100_archive(archive)


def test_cifar10_reader_unchanged_by_the_refactor(official_dir: Path, tiny_arrays: dict) -> None:
    """CIFAR-10 still reads without batches.meta (the class names are known), and its messages say CIFAR-10."""
    (official_dir / "batches.meta").unlink()
    assert_same(read_official_folder(official_dir), expected(tiny_arrays))
    (official_dir / "data_batch_2").write_bytes(b"\x00junk")
    with pytest.raises(CifarCnnError, match="data_batch_2: not a readable CIFAR-10 python file"):
        read_official_folder(official_dir)
