"""What a source holds, before decoding: its class names and one `store.Entry` per image, in canonical order
(split, class, then natural order of the names), for every form of source: image-folder trees (a folder or an
archive), a folder with a labels file, and the official CIFAR python files (already decoded arrays)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import CifarCnnError
from .dataset import Dataset
from .images import MAX_FILE_BYTES, image_extensions, printable
from .labels import carve_test_split, read_labels
from .sources import (
    SPLITS,
    _checked_members,
    _open_tar,
    _read_tar_member,
    _tree_entry,
    check_member_name,
    check_member_size,
    natural_key,
    zlib_error,
)
from .store import SPLIT_CODES, Entry, tree_files

# The images of a compressed tar archive are held in memory until decoded (a gzip stream cannot be read at random);
# beyond this total the archive is refused with advice to extract it. Uncompressed .tar and .zip members are read
# from the file when decoded, one at a time.
MAX_ARCHIVE_MEMORY = 2 * 2**30
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


@dataclass
class Catalog:
    """A source's classes and images to decode; `skipped`: label rows left out (--skip-bad)."""

    classes: list[str]
    entries: list[Entry]
    skipped: list[str] = field(default_factory=list)
    has_val: bool = False
    notes: list[str] = field(default_factory=list)  # lines worth telling the user, kept with the store


Item = tuple[str, str, str, "Path | Callable[[], bytes]", bool, str]  # split, class, name, load, skippable, sort key


def _ordered(items: list[Item], classes: list[str]) -> list[Entry]:
    """Entries sorted by split, class and the natural order of their sort keys (paths), whatever order they were
    listed in."""
    label = {c: i for i, c in enumerate(classes)}
    items.sort(key=lambda it: (SPLIT_CODES[it[0]], label[it[1]], natural_key(it[5])))
    return [Entry(name, load, label[cls], SPLIT_CODES[split], skip) for split, cls, name, load, skip, _ in items]


def _check_tree(by_split: dict[str, dict[str, int]], where: str) -> list[str]:
    """The class names of an image-folder tree (train/'s class folders), after checking its layout."""
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
    return classes


def _tree_catalog(found: Iterable[tuple[str, str, str, Path | Callable[[], bytes]]], where: str) -> Catalog:
    """Class names and file names are made printable (a non-UTF-8 name's bytes shown as \\xNN) here, once: they
    end up in messages, checkpoints, JSON and reports."""
    items = [(split, printable(cls), printable(name), load, False, name) for split, cls, name, load in found]
    by_split: dict[str, dict[str, int]] = {}
    for split, cls, *_ in items:
        by_split.setdefault(split, {}).setdefault(cls, 0)
        by_split[split][cls] += 1
    classes = _check_tree(by_split, where)
    return Catalog(classes, _ordered(items, classes), has_val="val" in by_split)


def tree_folder(root: Path) -> Catalog:
    """An image-folder tree on disk: ROOT/{train,test[,val]}/<class>/<image>. Images in sub-folders of a class folder
    belong to that class; links to folders (a class folder that is a link) are followed, a link loop is not."""
    exts, found = image_extensions(), []
    for split in SPLITS:
        for path in tree_files(root / split):
            hit = _tree_entry(PurePosixPath(path.relative_to(root).as_posix()), exts)
            if hit is not None:
                found.append((hit[0], hit[1], str(path), path))
    return _tree_catalog(found, str(root))


def tree_archive(path: Path) -> Catalog:
    """An image-folder tree inside a .tar, .tar.gz or .zip archive (nothing is extracted). Only image members are
    read, each after its declared size is checked (MAX_FILE_BYTES): zip and uncompressed tar members when decoded,
    those of a compressed tar (read front to back) into memory first, up to MAX_ARCHIVE_MEMORY in all."""
    exts = image_extensions()
    if zipfile.is_zipfile(path):
        return _tree_catalog(_zip_found(path, exts), str(path))
    with open(path, "rb") as f:
        plain = not f.read(6).startswith(COMPRESSED_MAGIC)
    found, held = [], 0
    with _open_tar(path) as tf:
        for m in _checked_members(tf, path):
            hit = _tree_entry(check_member_name(m.name, path), exts) if m.isfile() else None
            if hit is None:
                continue  # not an image of the tree: never read
            check_member_size(m.size, m.name, path, MAX_FILE_BYTES)
            if plain and not m.issparse():
                load = _range_reader(path, m.offset_data, m.size, f"{path}:{m.name}")
            else:
                held += m.size
                if held > MAX_ARCHIVE_MEMORY:
                    raise CifarCnnError(
                        f"{path}: its images add up to more than {MAX_ARCHIVE_MEMORY / 2**30:.0f} GiB, too much to "
                        "hold in memory from a compressed archive; extract it and pass the folder"
                    )
                load = lambda b=_read_tar_member(tf, m, path): b  # noqa: E731
            found.append((hit[0], hit[1], f"{path}:{m.name}", load))
    return _tree_catalog(found, str(path))


def _zip_found(path: Path, exts: set[str]) -> list[tuple[str, str, str, Callable[[], bytes]]]:
    found = []
    try:
        zf = zipfile.ZipFile(path)
        for info in zf.infolist():
            hit = None if info.is_dir() else _tree_entry(check_member_name(info.filename, path), exts)
            if hit is not None:
                check_member_size(info.file_size, info.filename, path, MAX_FILE_BYTES)
                found.append((hit[0], hit[1], f"{path}:{info.filename}", _zip_reader(zf, info, path)))
    except (zipfile.BadZipFile, OSError, EOFError, zlib_error()) as exc:
        raise CifarCnnError(f"{path}: zip archive is corrupt or truncated ({exc})") from None
    return found


def _range_reader(path: Path, offset: int, size: int, name: str) -> Callable[[], bytes]:
    """Reads `size` bytes at `offset` of an uncompressed tar archive when called: no member is held in memory."""

    def read() -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as exc:
            raise CifarCnnError(f"{printable(name)}: cannot read ({exc.strerror or exc})") from None
        if len(data) != size:
            raise CifarCnnError(f"{printable(name)}: archive is truncated; download or copy it again")
        return data

    return read


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Callable[[], bytes]:
    """Reads a member when called, at most MAX_FILE_BYTES whatever its header claims."""

    def read() -> bytes:
        try:
            with zf.open(info) as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except (zipfile.BadZipFile, OSError, EOFError, zlib_error()) as exc:
            raise CifarCnnError(f"{path}: zip archive is corrupt or truncated at {info.filename} ({exc})") from None
        if len(data) > MAX_FILE_BYTES:
            raise CifarCnnError(f"{path}:{info.filename}: archive member is larger than {MAX_FILE_BYTES:,} bytes")
        return data

    return read


def labelled_folder(root: Path, labels_file: Path, *, skip_bad: bool, test_split: float) -> Catalog:
    """A folder of images named by a labels file (CSV or JSON lines, see cifar_cnn.data.labels). Rows without a
    split are training rows; when no row is a test row, `test_split` of each class's training rows is held out as
    the test split (chosen by the hash of each row's path: the same rows whatever else the file lists)."""
    table = read_labels(root, labels_file, skip_bad=skip_bad)
    splits = [r.split or "train" for r in table.rows]
    notes = []
    if "test" not in splits:
        train = [i for i, sp in enumerate(splits) if sp == "train"]
        label = {c: i for i, c in enumerate(table.classes)}
        labels = np.array([label[table.rows[i].label] for i in train], dtype=np.int64)
        _, test = carve_test_split(labels, [table.rows[i].rel for i in train], test_split)
        for k in test:
            splits[train[k]] = "test"
        which = "has no test rows" if table.has_splits else "have no split column"
        notes.append(
            f"the labels {which}: {len(test)} of {len(train)} training rows ({test_split:.0%} of each class, chosen "
            "by path) are the test split"
        )
    items = [(sp, r.label, f"{r.where}: {r.rel}", r.path, skip_bad, r.rel) for sp, r in zip(splits, table.rows)]
    catalog = Catalog(list(table.classes), _ordered(items, list(table.classes)), list(table.skipped), notes=notes)
    catalog.has_val = "val" in splits
    return catalog


def official(ds: Dataset) -> Catalog:
    """The official python files, already decoded to arrays by cifar_cnn.data.sources."""
    entries = []
    for split in ("train", "val", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if images is None:
            continue
        code = SPLIT_CODES[split]
        entries += [Entry(f"{split}[{i}]", images[i], int(y), code) for i, y in enumerate(np.asarray(labels))]
    return Catalog(list(ds.classes), entries, has_val=ds.val_images is not None)
