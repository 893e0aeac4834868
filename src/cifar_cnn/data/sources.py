"""Readers for every supported form of a data set, each returning a `Dataset` of uint8 arrays.

Forms: the official CIFAR-10 python batches (a folder or the .tar.gz), and image-folder trees
`ROOT/{train,test[,val]}/<class>/<image>` as a folder or a .tar/.tar.gz/.zip archive. Images are always stored in
canonical order, sorted by class with the within-class order kept, so everything downstream (splits, shuffles) is the
same whichever form the data came in.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import CifarCnnError
from .images import decode_image, image_extensions

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# per-channel mean and std of the CIFAR-10 training images (0..1 pixels): the models' and recipes' default normalization
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
OFFICIAL_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_TEST_BATCH = "test_batch"
OFFICIAL_META = "batches.meta"
OFFICIAL_DIRNAME = "cifar-10-batches-py"
SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """A whole data set in memory: uint8 images (N, 3, H, W), int64 labels (N,), class names in label order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    val_images: np.ndarray | None = None  # only when the source has its own validation split (a val/ folder)
    val_labels: np.ndarray | None = None

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the decoded data: class names, image counts per split and a SHA-256 of every array (about
        0.15 s for CIFAR-10). A run records it, so resuming or testing on other data than it trained on is caught."""
        digest = hashlib.sha256()
        for name, array in sorted(self.arrays().items()):
            digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
        counts = {"train": len(self.train_labels), "test": len(self.test_labels)}
        if self.val_labels is not None:
            counts["val"] = len(self.val_labels)
        return {"classes": list(self.classes), "counts": counts, "sha256": digest.hexdigest()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name, as stored in the decode cache."""
        out = {
            "train_images": self.train_images,
            "train_labels": self.train_labels,
            "test_images": self.test_images,
            "test_labels": self.test_labels,
        }
        if self.val_images is not None:
            out.update(val_images=self.val_images, val_labels=self.val_labels)
        return out


def canonical_order(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort by label: classes in label order, each class in its original order."""
    order = np.argsort(labels, kind="stable")
    return np.ascontiguousarray(images[order]), np.ascontiguousarray(labels[order])


# --------------------------------------------------------------------------------------------------------------------
# Official CIFAR-10 python batches (Python 2 pickles of numpy arrays)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else, so a crafted batch file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
        ("__builtin__", "bytes"),  # ... and empty bytes
        ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        if module == "__builtin__":
            module = "builtins"
        if module.startswith("numpy.core"):  # numpy >= 2 moved numpy.core to numpy._core
            try:
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _unpickle(blob: bytes, name: str) -> dict[str, object]:
    try:
        # latin1 is what numpy recommends for Python 2 pickles: py2 str keys become str, array bytes stay intact.
        obj = _BatchUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as exc:  # pickle raises many types on corrupt input
        raise CifarCnnError(f"{name}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CifarCnnError(f"{name}: expected a pickled dict, found {type(obj).__name__}; not a CIFAR-10 batch")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def read_official_batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One official batch -> images (n, 3, 32, 32) uint8 and labels (n,) int64, checked for shape and dtype."""
    d = _unpickle(blob, name)
    data = d.get("data")
    labels = d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise CifarCnnError(f"{name}: a CIFAR-10 batch needs a 'data' array and 'labels'; found keys {sorted(d)}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CifarCnnError(f"{name}: 'data' must be uint8 of shape (n, 3072), found {data.dtype} {tuple(data.shape)}")
    try:
        labels_arr = np.asarray(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    except Exception:
        labels_arr = np.asarray([], dtype=object)
    if labels_arr.ndim != 1 or labels_arr.dtype.kind not in "iu" or len(labels_arr) != len(data):
        raise CifarCnnError(
            f"{name}: 'labels' must be {len(data)} integers, found {labels_arr.dtype} {tuple(labels_arr.shape)}"
        )
    # Official row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels_arr.astype(np.int64)


def _official_classes(meta_blob: bytes | None, name: str) -> list[str]:
    if meta_blob is None:
        return list(CIFAR10_CLASSES)
    names = _unpickle(meta_blob, name).get("label_names")
    if not isinstance(names, list) or not names:
        raise CifarCnnError(f"{name}: expected 'label_names', a list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _assemble_official(read: Callable[[str], bytes | None], where: str) -> Dataset:
    parts = {}
    for name in (*OFFICIAL_TRAIN_BATCHES, OFFICIAL_TEST_BATCH):
        blob = read(name)
        if blob is None:
            raise CifarCnnError(
                f"{where}: missing {name}; the official CIFAR-10 set has data_batch_1..5 and test_batch"
            )
        parts[name] = read_official_batch(blob, f"{where}/{name}")
    classes = _official_classes(read(OFFICIAL_META), f"{where}/{OFFICIAL_META}")
    for name, (_, labels) in parts.items():
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise CifarCnnError(
                f"{where}/{name}: labels must be in 0..{len(classes) - 1}, found {labels.min()}..{labels.max()}"
            )
    train_x = np.concatenate([parts[n][0] for n in OFFICIAL_TRAIN_BATCHES])
    train_y = np.concatenate([parts[n][1] for n in OFFICIAL_TRAIN_BATCHES])
    train_x, train_y = canonical_order(train_x, train_y)
    test_x, test_y = canonical_order(*parts[OFFICIAL_TEST_BATCH])
    return Dataset(train_x, train_y, test_x, test_y, classes)


def read_official_folder(folder: Path) -> Dataset:
    """The extracted `cifar-10-batches-py/` folder."""

    def read(name: str) -> bytes | None:
        p = folder / name
        return p.read_bytes() if p.is_file() else None

    return _assemble_official(read, str(folder))


def read_official_archive(path: Path) -> Dataset:
    """`cifar-10-python.tar.gz`, read in memory (nothing is extracted)."""
    wanted = {*OFFICIAL_TRAIN_BATCHES, OFFICIAL_TEST_BATCH, OFFICIAL_META}
    blobs: dict[str, bytes] = {}
    with _open_tar(path) as tf:
        for member in _checked_members(tf, path):
            base = PurePosixPath(member.name).name
            if member.isfile() and base in wanted:
                blobs[base] = _read_tar_member(tf, member, path)
    return _assemble_official(blobs.get, str(path))


# --------------------------------------------------------------------------------------------------------------------
# Archives


def _open_tar(path: Path) -> tarfile.TarFile:
    if path.name.lower().endswith(".zip"):
        raise CifarCnnError(f"{path}: not a readable zip archive (truncated or corrupt); download or copy it again")
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
        raise CifarCnnError(f"{path}: not a readable tar archive ({reason}); download or copy it again") from None


def _read_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    try:
        f = tf.extractfile(member)
        return f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib_error()) as exc:
        raise CifarCnnError(f"{path}: archive is corrupt or truncated at {member.name} ({exc})") from None


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def check_member_name(name: str, archive: Path | str) -> PurePosixPath:
    """Refuse archive member names that are absolute or climb out with '..' (they could write outside a folder)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name):
        raise CifarCnnError(
            f"{archive}: refusing archive member {name!r} (absolute path or '..'); the archive is unsafe"
        )
    return PurePosixPath(*[part for part in p.parts if part not in ("", ".")])


def _checked_members(tf: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    try:
        for member in tf:
            check_member_name(member.name, path)
            yield member
    except (tarfile.TarError, OSError, EOFError, zlib_error()) as exc:
        raise CifarCnnError(f"{path}: archive is corrupt or truncated ({exc}); download or copy it again") from None


def archive_is_official(path: Path) -> bool:
    """Whether a tar archive holds official batches (a member named data_batch_1) rather than an image tree."""
    if zipfile.is_zipfile(path):
        return False
    with _open_tar(path) as tf:
        return any(PurePosixPath(m.name).name == OFFICIAL_TRAIN_BATCHES[0] for m in _checked_members(tf, path))


# --------------------------------------------------------------------------------------------------------------------
# Image-folder trees: ROOT/<split>/<class>/<image>


def natural_key(name: str) -> list[object]:
    """Sort key that orders 'img2' before 'img10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class _Entry:
    split: str
    cls: str
    name: str  # shown in messages


def _tree_entry(rel: PurePosixPath, exts: set[str]) -> tuple[str, str] | None:
    """(split, class) for a relative path `.../<split>/<class>/<file>` of an image file, else None."""
    parts = rel.parts
    if len(parts) < 3 or parts[-3] not in SPLITS or parts[-1].startswith("."):
        return None
    if PurePosixPath(parts[-1]).suffix.lower() not in exts:
        return None
    return parts[-3], parts[-2]


def _assemble_tree(entries: list[tuple[_Entry, Callable[[], bytes]]], where: str, size: int, threads: int) -> Dataset:
    by_split: dict[str, dict[str, list[tuple[_Entry, Callable[[], bytes]]]]] = {}
    for entry, load in entries:
        by_split.setdefault(entry.split, {}).setdefault(entry.cls, []).append((entry, load))
    for split in ("train", "test"):
        if split not in by_split:
            raise CifarCnnError(
                f"{where}: no images under {split}/; an image-folder data set needs "
                f"{split}/<class>/<image> files (found splits: {', '.join(sorted(by_split)) or 'none'})"
            )
    classes = sorted(by_split["train"])
    if len(classes) < 2:
        raise CifarCnnError(f"{where}: train/ has {len(classes)} class folder(s) with images; at least 2 are needed")
    for split, groups in by_split.items():
        extra = sorted(set(groups) - set(classes))
        if extra:
            raise CifarCnnError(f"{where}: {split}/ has class folders {extra} that train/ does not have")

    def decode_split(split: str) -> tuple[np.ndarray, np.ndarray]:
        items = []
        for label, cls in enumerate(classes):
            for entry, load in sorted(by_split[split].get(cls, []), key=lambda el: natural_key(el[0].name)):
                items.append((label, entry, load))
        out = np.empty((len(items), 3, size, size), dtype=np.uint8)

        def work(i: int) -> None:
            _, entry, load = items[i]
            out[i] = decode_image(load(), size, entry.name)

        # Pillow releases the GIL while decoding, so threads decode in parallel.
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(work, range(len(items)), chunksize=256))
        return out, np.array([label for label, _, _ in items], dtype=np.int64)

    for cls in classes:
        if not by_split["train"].get(cls):
            raise CifarCnnError(f"{where}: train/{cls}/ holds no images")
    train_x, train_y = decode_split("train")
    test_x, test_y = decode_split("test")
    ds = Dataset(train_x, train_y, test_x, test_y, list(classes))
    if "val" in by_split:
        ds.val_images, ds.val_labels = decode_split("val")
    return ds


def read_image_folder(root: Path, size: int, threads: int = 1) -> Dataset:
    """An image-folder tree on disk."""
    exts = image_extensions()
    entries = []
    for split in SPLITS:
        base = root / split
        if not base.is_dir():
            continue
        for dirpath, _, files in os.walk(base):
            for fname in files:
                path = Path(dirpath) / fname
                found = _tree_entry(PurePosixPath(path.relative_to(root).as_posix()), exts)
                if found is None:
                    continue
                entries.append((_Entry(found[0], found[1], str(path)), path.read_bytes))
    return _assemble_tree(entries, str(root), size, threads)


def _tree_from_members(members: Iterable[tuple[str, Callable[[], bytes]]], where: str) -> list:
    exts = image_extensions()
    entries = []
    for name, load in members:
        found = _tree_entry(check_member_name(name, where), exts)
        if found is not None:
            entries.append((_Entry(found[0], found[1], f"{where}:{name}"), load))
    return entries


def read_image_archive(path: Path, size: int, threads: int = 1) -> Dataset:
    """An image-folder tree inside a .tar, .tar.gz or .zip archive, read in memory (nothing is extracted)."""
    if zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
            members = []
            for info in zf.infolist():
                if not info.is_dir():
                    members.append((info.filename, (lambda i=info: zf.read(i))))
            entries = _tree_from_members(members, str(path))
            # zip members are read lazily during decoding; reading all first keeps errors in one place
            loaded = [(e, _bytes_loader(load())) for e, load in entries]
        except (zipfile.BadZipFile, OSError, EOFError, zlib_error()) as exc:
            raise CifarCnnError(f"{path}: zip archive is corrupt or truncated ({exc})") from None
        return _assemble_tree(loaded, str(path), size, threads)
    with _open_tar(path) as tf:
        blobs = [
            (m.name, _bytes_loader(_read_tar_member(tf, m, path))) for m in _checked_members(tf, path) if m.isfile()
        ]
    return _assemble_tree(_tree_from_members(blobs, str(path)), str(path), size, threads)


def _bytes_loader(blob: bytes) -> Callable[[], bytes]:
    return lambda: blob
