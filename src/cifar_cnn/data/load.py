"""`--data SOURCE` -> a `Dataset` in memory (through the decode cache), and its train/validation/test splits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..choices import LABEL_SETS, STORAGE_MODES, check_choice
from ..errors import CifarCnnError
from . import catalog
from .catalog import Catalog
from .dataset import Dataset, Images, take
from .download import ARCHIVE_NAME, ensure_cifar10, ensure_cifar100
from .labels import read_labels
from .sources import (
    CIFAR100_ARCHIVE,
    CIFAR100_DIRNAME,
    OFFICIAL_DIRNAME,
    OFFICIAL_TRAIN_BATCHES,
    archive_is_cifar100,
    archive_is_official,
    read_cifar100_archive,
    read_cifar100_folder,
    read_official_archive,
    read_official_folder,
)
from .split import stratified_split, stratified_subset
from .store import (
    SPLIT_CODES,
    Store,
    build_in_memory,
    build_store,
    files_stamp,
    locked,
    read_store,
    remove_store,
    store_folder,
    tree_files,
)

DEFAULT_SOURCE = "cifar10"
DEFAULT_TEST_SPLIT = 0.2  # with a labels file that has no split column
# the named official sets: the kind of source they are and what fetches them into the data home
OFFICIAL_SETS: dict[str, tuple[str, Callable[[Path, Callable[[str], None]], Path]]] = {
    "cifar10": ("official-dir", ensure_cifar10),
    "cifar100": ("cifar100-dir", ensure_cifar100),
}
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

    path: str  # '' (with `storage` set): the run's recorded source, used with this storage
    options: dict[str, Any] = field(default_factory=dict)
    storage: str = "auto"  # in memory or memory-mapped (STORAGE_MODES): how to hold it, not part of the record

    @classmethod
    def of(
        cls,
        data: str | Path | DataSource,
        *,
        labels: str | Path | None = None,
        label_set: str | None = None,
        skip_bad: bool = False,
        test_split: float | None = None,
        storage: str = "auto",
    ) -> DataSource:
        """The record of a `--data` argument and the options that go with it: relative paths made absolute,
        'cifar10' and 'cifar100' kept as they are; only options that change the data are recorded."""
        if isinstance(data, DataSource):
            return data
        check_choice(storage, STORAGE_MODES, "--image-storage")
        text = str(data)
        if not text:
            if labels:
                raise CifarCnnError("--labels FILE goes with --data DIR, the folder its paths start from; add --data")
            return cls("", storage=storage)
        path = text if text in OFFICIAL_SETS else str(Path(text).expanduser().absolute())
        options: dict[str, Any] = {}
        if labels:
            options["labels"] = str(Path(labels).expanduser().absolute())
            if test_split is not None:
                options["test_split"] = float(test_split)
        if label_set and check_choice(label_set, LABEL_SETS, "--label-set") != "fine":
            options["label_set"] = label_set
        if skip_bad:
            options["skip_bad"] = True
        return cls(path, options, storage)

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


def _resolve(source: DataSource, home: Path, log: Callable[[str], None]) -> tuple[str, Path]:
    """(kind, path) for a source; kind is 'official-dir', 'cifar100-dir', 'labelled-dir', 'image-dir' or
    'archive' (official, CIFAR-100 or an image tree: decided on a cache miss, as it needs a scan)."""
    given = source.path
    if given in OFFICIAL_SETS:
        if source.options.get("labels"):
            raise CifarCnnError(f"--labels goes with --data DIR, a folder of images; not with --data {given}")
        return OFFICIAL_SETS[given][0], OFFICIAL_SETS[given][1](home, log)
    path = Path(given).expanduser()
    if not path.exists():
        raise CifarCnnError(
            f"--data {given}: no such file or folder; give 'cifar10' or 'cifar100', a CIFAR python archive or "
            "folder, or an image-folder tree or archive"
        )
    if source.options.get("labels"):
        if not path.is_dir():
            raise CifarCnnError(f"--data {given}: with --labels, --data is the folder the labels' paths start from")
        return "labelled-dir", path
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise CifarCnnError(f"--data {given}: not a folder or a .tar/.tar.gz/.zip archive")
        return "archive", path
    for kind, marker, target in (
        ("official-dir", OFFICIAL_TRAIN_BATCHES[0], "."),
        ("official-dir", OFFICIAL_DIRNAME, OFFICIAL_DIRNAME),
        ("archive", ARCHIVE_NAME, ARCHIVE_NAME),
        ("cifar100-dir", f"{CIFAR100_DIRNAME}/train", CIFAR100_DIRNAME),
        ("cifar100-dir", "meta", "."),
        ("archive", CIFAR100_ARCHIVE, CIFAR100_ARCHIVE),
    ):
        if (path / marker).exists():
            return kind, (path / target if target != "." else path)
    if (path / "train").is_file():  # a cifar-100-python folder missing its meta: the reader says so
        return "cifar100-dir", path
    if (path / "train").is_dir():
        return "image-dir", path
    raise CifarCnnError(
        f"--data {given}: found neither CIFAR batches ({OFFICIAL_DIRNAME}/, data_batch_1, {ARCHIVE_NAME}, "
        f"{CIFAR100_DIRNAME}/) nor an image-folder tree (train/<class>/...) in this folder"
    )


def _catalog(kind: str, path: Path, source: DataSource) -> tuple[str, Catalog]:
    """(the kind found, what the source holds) for a resolved source."""
    label_set = source.options.get("label_set", "fine")
    if kind == "archive":
        kind = (
            "official-archive"
            if archive_is_official(path)
            else "cifar100-archive"
            if archive_is_cifar100(path)
            else "image-archive"
        )
    if label_set != "fine" and not kind.startswith("cifar100"):
        raise CifarCnnError(
            f"--label-set {label_set}: only CIFAR-100 has a coarse label set; --data {source} is not it"
        )
    readers: dict[str, Callable[[], Catalog]] = {
        "official-dir": lambda: catalog.official(read_official_folder(path)),
        "official-archive": lambda: catalog.official(read_official_archive(path)),
        "cifar100-dir": lambda: catalog.official(read_cifar100_folder(path, label_set)),
        "cifar100-archive": lambda: catalog.official(read_cifar100_archive(path, label_set)),
        "image-dir": lambda: catalog.tree_folder(path),
        "image-archive": lambda: catalog.tree_archive(path),
        "labelled-dir": lambda: catalog.labelled_folder(
            path,
            Path(source.options["labels"]),
            skip_bad=bool(source.options.get("skip_bad")),
            test_split=float(source.options.get("test_split", DEFAULT_TEST_SPLIT)),
        ),
    }
    return kind, readers[kind]()


def _store_key(path: Path, source: DataSource, size: int) -> list:
    """What names a source's store: its path, the image size and the options that shape the data."""
    shaping = {k: v for k, v in source.options.items()}
    if "labels" in shaping:
        shaping.setdefault("test_split", DEFAULT_TEST_SPLIT)
    return [str(path.resolve()), size, sorted(shaping.items())]


def _stamp(kind: str, path: Path, source: DataSource) -> str:
    """A digest of the source's files as they are now (names, sizes, modification times): only the files that make
    the data, so a run directory written inside the data folder does not make it stale."""
    if path.is_file():
        return files_stamp([path])
    if kind == "image-dir":
        return files_stamp((f for split in ("train", "val", "test") for f in tree_files(path / split)), path)
    if kind == "labelled-dir":
        labels = Path(source.options["labels"])
        table = read_labels(path, labels, skip_bad=True)
        return files_stamp([labels]) + files_stamp(table.listed, path)
    return files_stamp(tree_files(path), path)


def _cgroup_limits() -> list[int]:
    """The memory limits of this process's cgroups: v2 memory.max, v1 memory.limit_in_bytes (where they are set)."""
    found = []
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in groups:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):
            files = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        for f in files:
            try:
                text = f.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number
                found.append(int(text))
    return found


def memory_budget() -> int:
    """Bytes this process may use: its cgroup's memory limit if one is set, and at most the memory available now."""
    limits = _cgroup_limits()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else 8 << 30


def keep_in_memory(store_bytes: int, storage: str) -> bool:
    """Whether decoded images stay in memory: forced by `storage`, else when 5x their size (the training split is
    normalized to floats) is under half of what the process may use, shared with the other processes of this
    machine that torchrun started ($LOCAL_WORLD_SIZE)."""
    check_choice(storage, STORAGE_MODES, "--image-storage")
    if storage != "auto":
        return storage == "memory"
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return 5 * store_bytes < memory_budget() // (2 * processes)


def _open_or_build(
    kind: str, path: Path, source: DataSource, size: int, home: Path, storage: str, threads: int, log: Callable
) -> Store:
    """The source's store, decoding it first if the cache has none for the source as it is now. The store is read
    and, if need be, rebuilt under the lock, so processes starting together decode once."""
    folder = store_folder(home, _store_key(path, source, size))
    stamp = _stamp(kind, path, source)
    found = read_store(folder, stamp)
    if isinstance(found, Store):
        return _held(found, storage)
    t0 = time.perf_counter()
    try:
        with locked(folder.with_suffix(".lock"), str(path), log):
            found = read_store(folder, stamp)  # another process may have built it while this one waited
            if not isinstance(found, Store):
                if found:
                    log(f"decode cache {folder}: {found}; decoding the source again")
                kind, cat = _catalog(kind, path, source)
                what = f"{path} ({kind}, {len(cat.entries)} images)"
                build_store(
                    folder,
                    cat.entries,
                    cat.classes,
                    size,
                    stamp=stamp,
                    threads=threads,
                    what=what,
                    log=log,
                    skipped=cat.skipped,
                    notes=cat.notes,
                )
                log(f"decoded {what} into {folder} in {time.perf_counter() - t0:.1f}s")
                found = read_store(folder, stamp)
    except OSError as exc:
        return _without_cache(kind, path, source, size, home, storage, threads, log, folder, exc)
    if not isinstance(found, Store):
        raise CifarCnnError(f"decode cache {folder}: {found}; delete the folder and run again")
    return _held(found, storage)


def _without_cache(
    kind: str,
    path: Path,
    source: DataSource,
    size: int,
    home: Path,
    storage: str,
    threads: int,
    log: Callable,
    folder: Path,
    exc: OSError,
) -> Store:
    """The data home cannot take the store (read-only, full): decode into memory, with a warning, where it fits."""
    reason = exc.strerror or str(exc)
    remove_store(folder)  # a half-reserved pixel file would keep a full disk full
    if storage == "disk":
        raise CifarCnnError(
            f"data home {home}: cannot write the decode cache there ({reason}); --on-disk needs it: set "
            f"${HOME_ENV} to a writable folder with room for the decoded images"
        ) from None
    log(f"warning: cannot write the decode cache under {home} ({reason}); decoding into memory")

    def check_fits(nbytes: int) -> None:
        if not keep_in_memory(nbytes, storage):
            raise CifarCnnError(
                f"data home {home}: cannot write the decode cache there ({reason}) and the decoded images "
                f"({nbytes / 2**30:.1f} GiB) do not fit in memory; set ${HOME_ENV} to a writable folder"
            )

    kind, cat = _catalog(kind, path, source)
    what = f"{path} ({kind}, {len(cat.entries)} images)"
    return build_in_memory(
        cat.entries,
        cat.classes,
        size,
        threads=threads,
        what=what,
        log=log,
        check_fits=check_fits,
        skipped=cat.skipped,
        notes=cat.notes,
    )


def _held(store: Store, storage: str) -> Store:
    """The store with its pixels read into memory when they are to stay there, else memory-mapped as opened."""
    if isinstance(store.pixels, np.memmap) and keep_in_memory(store.nbytes, storage):
        store.pixels = np.fromfile(store.pixels.filename, dtype=np.uint8)  # one sequential read
    return store


def held_size(store: Store, size: int) -> int:
    """The side images are held at: `size`, or their own smaller side when every image is one smaller square (32 px
    CIFAR images for a 224 px model stay 32 px; batches are upscaled on the tensor pipeline, see
    `cifar_cnn.data.pipeline.resize_batch`)."""
    if not len(store.shapes):
        return size
    side = int(store.shapes[0, 0])
    return side if side < size and bool(np.all(store.shapes == side)) else size


def _dataset(store: Store, size: int) -> Dataset:
    """The data set a store holds: in-memory arrays when every image is size x size (or one smaller square, see
    `held_size`), else ImageSets."""
    requested, size = size, held_size(store, size)
    parts = {name: store.split(name, size) for name in SPLIT_CODES}
    if not len(parts["test"][1]):
        raise CifarCnnError(
            "the data has no test images: give the labels a split column with test rows, or more rows per class "
            "(a class needs 2 rows for one to be held out)"
        )
    for name, (images, labels) in list(parts.items()):
        if not isinstance(store.pixels, np.memmap) and images.uniform:
            parts[name] = (images[:] if len(images) else np.zeros((0, 3, size, size), np.uint8), labels)
    (trx, try_), (vx, vy), (tex, tey) = parts["train"], parts["val"], parts["test"]
    has_val = bool(len(vy))
    ds = Dataset(trx, try_, tex, tey, list(store.classes), vx if has_val else None, vy if has_val else None)
    ds.skipped = list(store.meta.get("skipped", []))
    ds.notes = list(store.meta.get("notes", [])) + _size_notes(store, size, requested)
    ds.stored_fingerprint = store.meta.get("fingerprint")
    return ds


def _size_notes(store: Store, size: int, requested: int) -> list[str]:
    if size < requested:
        notes = [f"images are {size} px: held at that size, batches upscaled to {requested} px on the tensor pipeline"]
    else:
        small = int((store.shapes.min(axis=1) < size).sum()) if len(store.shapes) else 0
        notes = [f"{small} images are smaller than {size} px on their shorter side and are upscaled to it"] * bool(
            small
        )
    if isinstance(store.pixels, np.memmap):
        notes.append(f"decoded images ({store.nbytes / 2**30:.2f} GiB) are memory-mapped from {store.pixels.filename}")
    return notes


def load_dataset(
    source: str | DataSource = DEFAULT_SOURCE,
    image_size: int = 32,
    *,
    home: Path | None = None,
    threads: int | None = None,
    storage: str | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """A whole data set, decoding it only the first time (into the decode cache, `cifar_cnn.data.store`); then
    memory-mapped from there, or read into memory when it fits (`storage`: auto, memory, disk; default: the
    source's)."""
    home = home or data_home()
    source = DataSource.of(source)
    storage = storage or source.storage
    kind, path = _resolve(source, home, log)
    threads = threads or os.cpu_count() or 1
    store = _open_or_build(kind, path, source, image_size, home, storage, threads, log)
    ds = _dataset(store, image_size)
    for note in ds.notes:
        log(note)
    if ds.skipped:
        log(f"skipped {len(ds.skipped)} unreadable or missing image(s) (--skip-bad); the first: {ds.skipped[0]}")
    return ds


@dataclass
class Splits:
    """Arrays for one run: training images, validation images (may be empty) and test images; and, for a run that
    trains on all images but calibrates its confidence, the training images held out for that (see make_splits)."""

    train_images: Images
    train_labels: np.ndarray
    val_images: Images
    val_labels: np.ndarray
    test_images: Images
    test_labels: np.ndarray
    classes: list[str]
    calibration_images: Images = None
    calibration_labels: np.ndarray | None = None

    def held_out(self) -> tuple[Images, np.ndarray]:
        """The held-out training images a temperature is fitted on: the validation split, or with none, the
        calibration slice (empty arrays when there is neither)."""
        if len(self.val_labels) or self.calibration_labels is None:
            return self.val_images, self.val_labels
        return self.calibration_images, self.calibration_labels


def training_subset(subset: int, max_train_images: int, available: int) -> int | None:
    """How many training images a run takes (stratified), None for all: `subset` exactly (config.subset), else at most
    `max_train_images` of the `available` ones (0: no cap)."""
    if subset:
        return subset
    return max_train_images if 0 < max_train_images < available else None


def make_splits(
    ds: Dataset,
    val_split: float,
    seed: int,
    subset: int | None = None,
    calibration: int = 0,
    max_train_images: int = 0,
) -> Splits:
    """Take `subset` training images (stratified) if asked, or at most `max_train_images` (see training_subset), then
    hold out `val_split` of them (stratified), both fixed by `seed`. A data set with its own validation images (a
    val/ folder) keeps those instead. With no validation images at all, `calibration` > 0 holds out that many
    training images (stratified, fixed by `seed`) for fitting a softmax temperature (`train --calibrate`); they are
    not trained on."""
    x, y = ds.train_images, ds.train_labels
    subset = training_subset(subset or 0, max_train_images, len(y))
    if subset:
        idx = stratified_subset(y, subset, seed)
        x, y = take(x, idx), y[idx]
    if ds.val_images is not None:
        vx, vy = ds.val_images, ds.val_labels
    else:
        train_idx, val_idx = stratified_split(y, val_split, seed)
        x, y, vx, vy = take(x, train_idx), y[train_idx], take(x, val_idx), y[val_idx]
    if calibration <= 0 or len(vy):
        return Splits(x, y, vx, vy, ds.test_images, ds.test_labels, list(ds.classes))
    if calibration >= len(y):
        raise CifarCnnError(
            f"calibration_images {calibration} leaves nothing to train on: there are {len(y)} training images; "
            "use fewer, or a validation split (--val-split)"
        )
    held = stratified_subset(y, calibration, seed, purpose=3)
    keep = np.setdiff1d(np.arange(len(y)), held)
    return Splits(
        take(x, keep), y[keep], vx, vy, ds.test_images, ds.test_labels, list(ds.classes), take(x, held), y[held]
    )
