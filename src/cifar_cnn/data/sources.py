"""Readers for every supported form of a data set, each returning a `Dataset` of uint8 arrays.

Forms: the official CIFAR-10 python batches and CIFAR-100 python files (a folder or the .tar.gz), and image-folder trees
`ROOT/{train,test[,val]}/<class>/<image>` as a folder or a .tar/.tar.gz/.zip archive. Images are always stored in
canonical order, sorted by class with the within-class order kept, so everything downstream (splits, shuffles) is the
same whichever form the data came in.
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..choices import LABEL_SETS, check_choice
from ..errors import CifarCnnError
from .dataset import Dataset, canonical_order
from .images import MAX_FILE_BYTES, read_capped

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# per-channel mean and std of the CIFAR-10 training images (0..1 pixels): the models' and recipes' default normalization
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
OFFICIAL_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_TEST_BATCH = "test_batch"
OFFICIAL_META = "batches.meta"
OFFICIAL_DIRNAME = "cifar-10-batches-py"
CIFAR100_DIRNAME = "cifar-100-python"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"  # what the official server distributes
CIFAR100_TRAIN, CIFAR100_TEST, CIFAR100_META = "train", "test", "meta"
CIFAR100_FILES = (CIFAR100_TRAIN, CIFAR100_TEST, CIFAR100_META)
# label set -> (key of the labels in train and test, key of the class names in meta): 'fine_labels', ...
CIFAR100_LABEL_KEYS = {s: (f"{s}_labels", f"{s}_label_names") for s in LABEL_SETS}
SPLITS = ("train", "val", "test")
# An official python file is read whole (it is one pickle): CIFAR-100's `train` is 155 MB; anything this much larger
# is not one, and is refused before it is read (issue 16: a 2 GB member took 2.3 GB of memory).
MAX_BATCH_BYTES = 512 * 2**20


# --------------------------------------------------------------------------------------------------------------------
# Official CIFAR-10 and CIFAR-100 python files (Python 2 pickles of numpy arrays)


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
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR python file never holds")
        if module == "__builtin__":
            module = "builtins"
        if module.startswith("numpy.core"):  # numpy >= 2 moved numpy.core to numpy._core
            try:
                return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def _unpickle(blob: bytes, name: str, title: str = "CIFAR-10") -> dict[str, object]:
    """A pickled dict of a `title` python file, with str keys."""
    try:
        # latin1 is what numpy recommends for Python 2 pickles: py2 str keys become str, array bytes stay intact.
        obj = _BatchUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as exc:  # pickle raises many types on corrupt input
        raise CifarCnnError(f"{name}: not a readable {title} python file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CifarCnnError(f"{name}: expected a pickled dict, found {type(obj).__name__}; not a {title} file")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def read_official_batch(
    blob: bytes, name: str, labels_key: str = "labels", title: str = "CIFAR-10"
) -> tuple[np.ndarray, np.ndarray]:
    """One official batch -> images (n, 3, 32, 32) uint8 and labels (n,) int64, checked for shape and dtype.

    `labels_key` is 'labels' in CIFAR-10 batches, 'fine_labels' or 'coarse_labels' in CIFAR-100's train and test.
    """
    d = _unpickle(blob, name, title)
    data = d.get("data")
    labels = d.get(labels_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise CifarCnnError(f"{name}: a {title} batch needs a 'data' array and '{labels_key}'; found keys {sorted(d)}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CifarCnnError(f"{name}: 'data' must be uint8 of shape (n, 3072), found {data.dtype} {tuple(data.shape)}")
    try:
        labels_arr = np.asarray(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    except Exception:
        labels_arr = np.asarray([], dtype=object)
    if labels_arr.ndim != 1 or labels_arr.dtype.kind not in "iu" or len(labels_arr) != len(data):
        raise CifarCnnError(
            f"{name}: '{labels_key}' must be {len(data)} integers, found {labels_arr.dtype} {tuple(labels_arr.shape)}"
        )
    # Official row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels_arr.astype(np.int64)


@dataclass(frozen=True)
class _OfficialLayout:
    """Which files of an official python set hold what, and under which keys."""

    title: str  # "CIFAR-10" or "CIFAR-100", in messages
    train: tuple[str, ...]  # the files of the training split, concatenated in this order
    test: str  # the file of the test split
    meta: str  # the file with the class names
    labels_key: str  # key of the labels in the train and test files
    names_key: str  # key of the class names in the meta file
    contents: str  # the files a complete copy has, in messages
    default_classes: tuple[str, ...] = ()  # class names when the meta file is absent; empty: it is required


_CIFAR10_LAYOUT = _OfficialLayout(
    "CIFAR-10",
    OFFICIAL_TRAIN_BATCHES,
    OFFICIAL_TEST_BATCH,
    OFFICIAL_META,
    "labels",
    "label_names",
    "data_batch_1..5 and test_batch",
    CIFAR10_CLASSES,
)


def _cifar100_layout(label_set: str) -> _OfficialLayout:
    """CIFAR-100 read with its fine (100 classes) or coarse (20 superclasses) labels."""
    check_choice(label_set, LABEL_SETS, "the CIFAR-100 label set")
    labels_key, names_key = CIFAR100_LABEL_KEYS[label_set]
    contents = ", ".join(CIFAR100_FILES[:-1]) + f" and {CIFAR100_FILES[-1]}"
    return _OfficialLayout(
        "CIFAR-100", (CIFAR100_TRAIN,), CIFAR100_TEST, CIFAR100_META, labels_key, names_key, contents
    )


def _official_classes(meta_blob: bytes | None, name: str, layout: _OfficialLayout) -> list[str]:
    if meta_blob is None:
        return list(layout.default_classes)
    names = _unpickle(meta_blob, name, layout.title).get(layout.names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, bytes)) for n in names):
        raise CifarCnnError(f"{name}: expected '{layout.names_key}', a list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _assemble_official(read: Callable[[str], bytes | None], where: str, layout: _OfficialLayout) -> Dataset:
    """The data set from the files `read(name)` returns (None: absent), checked against each other."""
    required = (*layout.train, layout.test, *(() if layout.default_classes else (layout.meta,)))
    blobs = {name: read(name) for name in required}
    for name, blob in blobs.items():
        if blob is None:
            raise CifarCnnError(f"{where}: missing {name}; the official {layout.title} set has {layout.contents}")
    parts = {}
    for name in (*layout.train, layout.test):
        parts[name] = read_official_batch(blobs.pop(name), f"{where}/{name}", layout.labels_key, layout.title)
    meta = blobs.get(layout.meta) if layout.meta in blobs else read(layout.meta)
    classes = _official_classes(meta, f"{where}/{layout.meta}", layout)
    for name, (_, labels) in parts.items():
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise CifarCnnError(
                f"{where}/{name}: {layout.labels_key} must be in 0..{len(classes) - 1} "
                f"({len(classes)} names in {layout.meta}), found {labels.min()}..{labels.max()}"
            )
    train_x = np.concatenate([parts[n][0] for n in layout.train])
    train_y = np.concatenate([parts[n][1] for n in layout.train])
    train_x, train_y = canonical_order(train_x, train_y)
    test_x, test_y = canonical_order(*parts[layout.test])
    return Dataset(train_x, train_y, test_x, test_y, classes)


def _folder_files(folder: Path) -> Callable[[str], bytes | None]:
    def read(name: str) -> bytes | None:
        p = folder / name
        return read_capped(p, str(p), MAX_BATCH_BYTES) if p.exists() else None

    return read


def _archive_files(path: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """The regular members of a tar archive whose base name is in `wanted`, read in memory, by base name."""
    wanted = set(wanted)
    blobs: dict[str, bytes] = {}
    with _open_tar(path) as tf:
        for member in _checked_members(tf, path):
            base = PurePosixPath(member.name).name
            if member.isfile() and base in wanted:
                blobs[base] = _read_tar_member(tf, member, path, MAX_BATCH_BYTES)
    return blobs


def read_official_folder(folder: Path) -> Dataset:
    """The extracted `cifar-10-batches-py/` folder."""
    return _assemble_official(_folder_files(folder), str(folder), _CIFAR10_LAYOUT)


def read_official_archive(path: Path) -> Dataset:
    """`cifar-10-python.tar.gz`, read in memory (nothing is extracted)."""
    blobs = _archive_files(path, (*OFFICIAL_TRAIN_BATCHES, OFFICIAL_TEST_BATCH, OFFICIAL_META))
    return _assemble_official(blobs.get, str(path), _CIFAR10_LAYOUT)


def read_cifar100_folder(folder: Path, label_set: str = "fine") -> Dataset:
    """The extracted `cifar-100-python/` folder (or a folder holding it), with 'fine' or 'coarse' labels."""
    layout = _cifar100_layout(label_set)
    if not (folder / CIFAR100_TRAIN).is_file() and (folder / CIFAR100_DIRNAME).is_dir():
        folder = folder / CIFAR100_DIRNAME
    return _assemble_official(_folder_files(folder), str(folder), layout)


def read_cifar100_archive(path: Path, label_set: str = "fine") -> Dataset:
    """`cifar-100-python.tar.gz` with 'fine' or 'coarse' labels, read in memory (nothing is extracted)."""
    layout = _cifar100_layout(label_set)
    return _assemble_official(_archive_files(path, CIFAR100_FILES).get, str(path), layout)


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


def check_member_size(size: int, member: str, path: Path | str, max_bytes: int = MAX_FILE_BYTES) -> None:
    """Refuse an archive member whose declared size is over `max_bytes`, before a byte of it is read."""
    if size > max_bytes:
        raise CifarCnnError(
            f"{path}:{member}: archive member of {size:,} bytes is larger than the limit of {max_bytes:,} bytes; "
            "remove it from the archive"
        )


def _read_tar_member(
    tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path, max_bytes: int = MAX_FILE_BYTES
) -> bytes:
    """A regular member's bytes, its declared size checked against `max_bytes` first (the read stops there too)."""
    check_member_size(member.size, member.name, path, max_bytes)
    try:
        f = tf.extractfile(member)
        return f.read(max_bytes) if f is not None else b""
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


def _tar_files_match(path: Path, hit: Callable[[PurePosixPath, set[PurePosixPath]], bool]) -> bool:
    """Whether `hit(member, earlier_members)` holds for a regular file of a tar archive (False for a zip).

    The scan stops at the first hit, so a large archive is read only as far as needed."""
    if zipfile.is_zipfile(path):
        return False
    seen: set[PurePosixPath] = set()
    with _open_tar(path) as tf:
        for member in _checked_members(tf, path):
            if member.isfile():
                name = PurePosixPath(member.name)
                if hit(name, seen):
                    return True
                seen.add(name)
    return False


def archive_is_official(path: Path) -> bool:
    """Whether a tar archive holds official CIFAR-10 batches (a member named data_batch_1) rather than an image tree."""
    return _tar_files_match(path, lambda name, _: name.name == OFFICIAL_TRAIN_BATCHES[0])


def archive_is_cifar100(path: Path) -> bool:
    """Whether a tar archive holds the official CIFAR-100 files: a member `train` with a `meta` beside it."""

    def hit(name: PurePosixPath, seen: set[PurePosixPath]) -> bool:
        other = {CIFAR100_TRAIN: CIFAR100_META, CIFAR100_META: CIFAR100_TRAIN}.get(name.name)
        return other is not None and name.with_name(other) in seen

    return _tar_files_match(path, hit)


# --------------------------------------------------------------------------------------------------------------------
# Image-folder trees: ROOT/<split>/<class>/<image>


def natural_key(name: str) -> list[object]:
    """Sort key that orders 'img2' before 'img10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _tree_entry(rel: PurePosixPath, exts: set[str]) -> tuple[str, str] | None:
    """(split, class) for a relative path `[...]/<split>/<class>/[<sub-folders>/]<file>` of an image file, else None.

    The split is the first part named train, val or test with a class folder below it; images in sub-folders of a
    class folder belong to that class. Hidden files and anything under a hidden sub-folder are left out."""
    parts = rel.parts
    at = next((i for i, part in enumerate(parts[:-2]) if part in SPLITS), None)
    if at is None or any(part.startswith(".") for part in parts[at + 2 :]):
        return None
    if PurePosixPath(parts[-1]).suffix.lower() not in exts:
        return None
    return parts[at], parts[at + 1]
