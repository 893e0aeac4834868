"""`--data SOURCE` -> a `Dataset` in memory (through the decode cache), and its train/validation/test splits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CifarCnnError
from .cache import cache_path, load_cached, save_cached
from .download import ARCHIVE_NAME, ensure_cifar10
from .sources import (
    OFFICIAL_DIRNAME,
    OFFICIAL_TRAIN_BATCHES,
    Dataset,
    archive_is_official,
    read_image_archive,
    read_image_folder,
    read_official_archive,
    read_official_folder,
)
from .split import stratified_split, stratified_subset

DEFAULT_SOURCE = "cifar10"
HOME_ENV = "CIFAR_CNN_HOME"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.bz2", ".tar.xz")


def data_home() -> Path:
    """Where downloads and the decode cache live: $CIFAR_CNN_HOME, default ~/.cache/cifar-cnn."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "cifar-cnn").expanduser()


@dataclass(frozen=True)
class DataSource:
    """Where a run's images come from, as recorded with the run (checkpoint and run.json): 'cifar10' (the official
    files in the data home) or an absolute path, plus the options that shape the data (none yet; label files and
    label sets add theirs here), so that resume, report and export load the same data from any working directory."""

    path: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, data: str | Path | DataSource) -> DataSource:
        """The record of a `--data` argument: relative paths made absolute, 'cifar10' kept as it is."""
        if isinstance(data, DataSource):
            return data
        text = str(data)
        if text == DEFAULT_SOURCE:
            return cls(DEFAULT_SOURCE)
        return cls(str(Path(text).expanduser().absolute()))

    @classmethod
    def from_dict(cls, record: Any) -> DataSource | None:
        """The record as stored by `to_dict`, or None when it is missing or not one (an older run)."""
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            return None
        options = record.get("options") if isinstance(record.get("options"), dict) else {}
        return cls(record["path"], dict(options))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "options": dict(self.options)}

    def __str__(self) -> str:
        return self.path


def check_same_data(recorded: dict[str, Any] | None, found: dict[str, Any], what: str, given: str | None) -> None:
    """Refuse data whose fingerprint (`Dataset.fingerprint`) differs from the one a run recorded; `what` names the
    run's file and source, `given` the --data that was passed (None: the run's own recorded source was used)."""
    if not recorded or recorded == found:
        return
    if recorded.get("classes") != found.get("classes"):
        diff = f"classes {recorded.get('classes')} there, {found.get('classes')} here"
    elif recorded.get("counts") != found.get("counts"):
        diff = f"image counts {recorded.get('counts')} there, {found.get('counts')} here"
    else:
        diff = "the same classes and counts but other images (content hash differs)"
    if given is None:
        raise CifarCnnError(
            f"{what}: its recorded data source now decodes to other data than it was trained on ({diff}); restore "
            "those files, or pass --data with a copy of the original data"
        )
    raise CifarCnnError(
        f"--data {given}: not the data {what} was trained on ({diff}); drop --data to use the run's own source"
    )


def _resolve(source: str, home: Path, log: Callable[[str], None]) -> tuple[str, Path]:
    """(kind, path) for a source; kind is 'official-dir', 'official-archive', 'image-dir' or 'image-archive'."""
    if source == DEFAULT_SOURCE:
        return "official-dir", ensure_cifar10(home, log)
    path = Path(source).expanduser()
    if not path.exists():
        raise CifarCnnError(
            f"--data {source}: no such file or folder; give 'cifar10', a CIFAR-10 python archive or folder, "
            "or an image-folder tree or archive"
        )
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise CifarCnnError(f"--data {source}: not a folder or a .tar/.tar.gz/.zip archive")
        return ("archive", path)  # official or image tree: decided on a cache miss (it needs a scan)
    if (path / OFFICIAL_TRAIN_BATCHES[0]).exists():
        return "official-dir", path
    if (path / OFFICIAL_DIRNAME).is_dir():
        return "official-dir", path / OFFICIAL_DIRNAME
    if (path / ARCHIVE_NAME).is_file():
        return "archive", path / ARCHIVE_NAME
    if (path / "train").is_dir():
        return "image-dir", path
    raise CifarCnnError(
        f"--data {source}: found neither CIFAR-10 batches ({OFFICIAL_DIRNAME}/, data_batch_1, {ARCHIVE_NAME}) "
        "nor an image-folder tree (train/<class>/...) in this folder"
    )


def load_dataset(
    source: str | DataSource = DEFAULT_SOURCE,
    image_size: int = 32,
    *,
    home: Path | None = None,
    threads: int | None = None,
    use_cache: bool = True,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Load a whole data set as uint8 arrays, decoding it only the first time (then from the cache)."""
    home = home or data_home()
    source = str(source)
    kind, path = _resolve(source, home, log)
    cache_file = cache_path(home, path, image_size)
    if use_cache and (ds := load_cached(cache_file)) is not None:
        return ds
    t0 = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    if kind == "archive":
        kind = "official-archive" if archive_is_official(path) else "image-archive"
    if kind.startswith("official") and image_size != 32:
        raise CifarCnnError(
            f"--data {source}: official CIFAR-10 images are 32x32 but the model needs {image_size}x{image_size}"
        )
    readers = {
        "official-dir": lambda: read_official_folder(path),
        "official-archive": lambda: read_official_archive(path),
        "image-dir": lambda: read_image_folder(path, image_size, threads),
        "image-archive": lambda: read_image_archive(path, image_size, threads),
    }
    ds = readers[kind]()
    log(
        f"decoded {path} ({kind}): {len(ds.train_labels)} train, {len(ds.test_labels)} test images, "
        f"{len(ds.classes)} classes in {time.perf_counter() - t0:.1f}s"
    )
    if use_cache:
        try:
            save_cached(cache_file, ds)
        except OSError as exc:
            log(f"warning: could not write the decode cache {cache_file} ({exc}); continuing without it")
    return ds


@dataclass
class Splits:
    """Arrays for one run: training images, validation images (may be empty) and test images."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def make_splits(ds: Dataset, val_split: float, seed: int, subset: int | None = None) -> Splits:
    """Take `subset` training images (stratified) if asked, then hold out `val_split` of them (stratified), both
    fixed by `seed`. A data set with its own validation images (a val/ folder) keeps those instead."""
    x, y = ds.train_images, ds.train_labels
    if subset:
        idx = stratified_subset(y, subset, seed)
        x, y = x[idx], y[idx]
    if ds.val_images is not None:
        vx, vy = ds.val_images, ds.val_labels
    else:
        train_idx, val_idx = stratified_split(y, val_split, seed)
        x, y, vx, vy = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    return Splits(x, y, vx, vy, ds.test_images, ds.test_labels, list(ds.classes))
