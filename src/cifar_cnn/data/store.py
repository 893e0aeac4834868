"""The decode cache: a data set decoded once into one flat file of uint8 pixels in the data home, memory-mapped.

A store is a folder `<home>/cache/store-<key>/` holding `pixels.u8` (every image's (3, h, w) bytes, one after the
other, in canonical order: split, class, name), `index.npz` (where each image starts, its stored shape, label and
split, the class names, and `meta`: format, completeness, fingerprint, skipped rows) and, while decoding,
`status.u8` (one byte per image: 0 to do, 1 done, 2 unreadable and skipped). Images are stored at their own aspect
ratio with the shorter side min(their own, the training size) (`images.stored_shape`).

Decoding runs on all cores (Pillow releases the GIL), a chunk of images at a time; an interrupted decode continues
where it stopped. Processes that want the same store at once (DDP ranks, tune workers, two trainings) take a lock on
`store-<key>.lock`: one decodes, the others wait and then read. A store that is truncated or was written by another
format is rebuilt, with a message.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import CifarCnnError
from .dataset import ImageSet, crop_resize, fingerprint_of
from .images import decode_stored, probe_size, stored_shape

STORE_FORMAT = 2
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CHUNK = 256  # images decoded per task (and per status write)
PENDING, DONE, SKIPPED = 0, 1, 2


@dataclass(frozen=True)
class Entry:
    """One image to store: `name` for messages, `load` its file, its bytes (a callable) or an already decoded
    (3, h, w) uint8 array; `skippable`: a decoding failure skips it (--skip-bad) instead of stopping."""

    name: str
    load: Path | Callable[[], bytes] | np.ndarray
    label: int
    split: int
    skippable: bool = False


@dataclass
class Store:
    """An opened store: pixels (memory map or array), per-image starts, shapes, labels, splits; classes; meta."""

    pixels: np.ndarray
    starts: np.ndarray
    shapes: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(3 * (self.shapes[:, 0].astype(np.int64) * self.shapes[:, 1]).sum())

    def split(self, name: str, size: int) -> tuple[ImageSet, np.ndarray]:
        """(images, labels) of one split as an ImageSet (no pixels read)."""
        idx = np.flatnonzero(self.splits == SPLIT_CODES[name])
        return ImageSet(self.pixels, self.starts, self.shapes, idx, size), self.labels[idx]


# --------------------------------------------------------------------------------------------------------------------
# reading


def _source_bytes(entry: Entry) -> bytes | Path:
    return entry.load if isinstance(entry.load, Path) else entry.load()  # type: ignore[operator]


def _probe(entry: Entry) -> tuple[int, int]:
    if isinstance(entry.load, np.ndarray):
        return int(entry.load.shape[1]), int(entry.load.shape[2])
    return probe_size(_source_bytes(entry), entry.name)


def _decode(entry: Entry, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(entry.load, np.ndarray):
        arr = entry.load
        if arr.shape[1:] == tuple(shape):
            return arr
        return crop_resize(arr, (0, 0, arr.shape[1], arr.shape[2]), shape[0]) if shape[0] == shape[1] else arr
    return decode_stored(_source_bytes(entry), shape, entry.name)


def read_store(folder: Path, stamp: str) -> Store | str:
    """The complete store in `folder` decoded from the source as it is now (`stamp`), or why it cannot be used (''
    when there is none). Its pixels are memory-mapped."""
    index, pixels = folder / "index.npz", folder / "pixels.u8"
    if not index.is_file():
        return ""
    try:
        with np.load(index, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("starts", "shapes", "labels", "splits", "classes")}
    except Exception as exc:  # a damaged npz raises many types
        return f"its index is unreadable ({type(exc).__name__})"
    if meta.get("format") != STORE_FORMAT:
        return f"it was written by another version of cifar-cnn (cache format {meta.get('format')}, not {STORE_FORMAT})"
    if meta.get("stamp") != stamp:
        return "the source changed since it was decoded"
    want = int(meta["pixel_bytes"])
    have = pixels.stat().st_size if pixels.is_file() else -1
    if have != want:
        return f"its pixel file is truncated ({have} of {want} bytes)"
    data = np.memmap(pixels, dtype=np.uint8, mode="r") if want else np.zeros(0, np.uint8)
    _random_access(data)
    classes = [str(c) for c in arrays.pop("classes")]
    return Store(data, arrays["starts"], arrays["shapes"], arrays["labels"], arrays["splits"], classes, meta)


def _random_access(pixels: np.ndarray) -> None:
    """Tell the kernel that the memory map is read at random (batches in shuffled order): no read-ahead. With a
    large read-ahead (8 MiB on this benchmark machine) every image read would pull megabytes that the page cache,
    limited to less than the data, evicts before they are used: 470x more read than needed, 4x slower training."""
    mm = getattr(pixels, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)


# --------------------------------------------------------------------------------------------------------------------
# writing


def plan_shapes(entries: list[Entry], size: int, threads: int) -> tuple[np.ndarray, list[str]]:
    """Stored (h, w) of every entry from its header; (0, 0) and a message for a skippable entry that fails."""
    shapes = np.zeros((len(entries), 2), dtype=np.int64)

    def probe(lo: int) -> list[str]:
        skipped = []
        for i in range(lo, min(lo + CHUNK, len(entries))):
            try:
                shapes[i] = stored_shape(*_probe(entries[i]), size)
            except CifarCnnError as exc:
                if not entries[i].skippable:
                    raise
                skipped.append(str(exc))
        return skipped

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # one task per chunk: memory stays flat
        return shapes, [m for part in pool.map(probe, range(0, len(entries), CHUNK)) for m in part]


def starts_of(shapes: np.ndarray) -> np.ndarray:
    """Where each image of stored `shapes` (n, 2) starts in the flat pixel buffer."""
    sizes = 3 * shapes[:, 0].astype(np.int64) * shapes[:, 1]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else sizes


def _index_bytes(arrays: dict[str, np.ndarray], classes: list[str], meta: dict[str, Any]) -> Callable:
    def write(f: Any) -> None:
        np.savez(f, classes=np.array(classes, dtype=str), meta=np.array(json.dumps(meta)), **arrays)

    return write


@dataclass
class Build:
    """A store being written: the plan (entries, shapes, starts), the pixel buffer and each image's status."""

    entries: list[Entry]
    shapes: np.ndarray
    starts: np.ndarray
    pixels: np.ndarray
    status: np.ndarray
    status_file: Path | None = None
    skipped_file: Path | None = None  # why images were skipped while decoding, one line each (kept across resumes)
    messages: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decode_chunk(self, lo: int, hi: int) -> None:
        messages = []
        for i in range(lo, hi):
            if self.status[i] != PENDING:
                continue
            h, w = (int(v) for v in self.shapes[i])
            if h == 0:
                self.status[i] = SKIPPED
                continue
            try:
                image = _decode(self.entries[i], (h, w))
            except CifarCnnError as exc:
                if not self.entries[i].skippable:
                    raise
                messages.append(str(exc))
                self.status[i] = SKIPPED
                continue
            self.pixels[self.starts[i] : self.starts[i] + 3 * h * w] = image.reshape(-1)
            self.status[i] = DONE
        with self._lock:
            self.messages += messages
            if self.skipped_file is not None and messages:  # before the status: no skip without its reason
                with open(self.skipped_file, "a", encoding="utf-8", errors="backslashreplace") as f:
                    f.write("".join(m.replace("\n", " ") + "\n" for m in messages))
            if self.status_file is not None:  # after the pixels: a chunk marked done is in the page cache
                with open(self.status_file, "r+b") as f:
                    os.pwrite(f.fileno(), self.status[lo:hi].tobytes(), lo)

    def run(self, threads: int, log: Callable[[str], None], what: str) -> None:
        todo = [lo for lo in range(0, len(self.entries), CHUNK) if (self.status[lo : lo + CHUNK] == PENDING).any()]
        done_before = len(self.entries) - sum(min(CHUNK, len(self.entries) - lo) for lo in todo)
        if done_before:
            log(f"continuing the interrupted decode of {what}: {done_before} of {len(self.entries)} images done")
        pool = ThreadPoolExecutor(max_workers=max(1, threads))
        try:
            futures = [pool.submit(self.decode_chunk, lo, min(lo + CHUNK, len(self.entries))) for lo in todo]
            _wait_with_progress(futures, len(self.entries), done_before, log)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _wait_with_progress(futures: list, total: int, done_before: int, log: Callable[[str], None]) -> None:
    """Wait for the chunks in order (an error in one stops the decode), saying how far it is every ~10%."""
    step, t0 = max(1, len(futures) // 10), time.perf_counter()
    for k, future in enumerate(futures):
        future.result()
        if len(futures) > 10 and (k + 1) % step == 0:
            n = min(total, done_before + (k + 1) * CHUNK)
            log(f"decoding: {n}/{total} images ({100 * n // total}%, {time.perf_counter() - t0:.0f}s)")


@contextmanager
def locked(lock_file: Path, what: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file`; says so when another process holds it and this one waits."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            log(f"waiting for another process that is decoding {what} into the cache")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _finish(build: Build, classes: list[str], size: int, meta: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """The final index arrays (unreadable images dropped) and meta (fingerprint, skipped rows). A store left with no
    image, or with a class that lost all its training images to skipping, is refused."""
    keep = np.flatnonzero(build.status == DONE)
    arrays = {
        "starts": build.starts[keep],
        "shapes": build.shapes[keep].astype(np.int32),
        "labels": np.array([build.entries[i].label for i in keep], dtype=np.int64),
        "splits": np.array([build.entries[i].split for i in keep], dtype=np.int8),
    }
    trained = np.bincount(arrays["labels"][arrays["splits"] == SPLIT_CODES["train"]], minlength=len(classes))
    if not len(keep) or not trained.all():
        empty = classes[int(np.argmin(trained))] if len(keep) else "any class"
        raise CifarCnnError(
            f"no readable training image of {empty!r} is left after skipping unreadable files; "
            "fix or replace those images, or remove their rows"
        )
    store = Store(build.pixels, arrays["starts"], arrays["shapes"], arrays["labels"], arrays["splits"], classes)
    meta = {**meta, "complete": True, "skipped": sorted(meta.get("skipped", []) + build.messages)}
    meta["fingerprint"] = store_fingerprint(store, size)
    return arrays, meta


def store_fingerprint(store: Store, size: int) -> dict[str, Any]:
    """`Dataset.fingerprint` of the data in a store (see `fingerprint_of`)."""
    arrays: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for name, code in SPLIT_CODES.items():
        idx = np.flatnonzero(store.splits == code)
        if name == "val" and not len(idx):
            continue
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = store.split(name, size)
        counts[name] = len(idx)
    return fingerprint_of(arrays, store.classes, counts)


def build_store(
    folder: Path,
    entries: list[Entry],
    classes: list[str],
    size: int,
    *,
    stamp: str,
    threads: int,
    what: str,
    log: Callable[[str], None],
    skipped: list[str] | None = None,
    notes: list[str] | None = None,
) -> None:
    """Decode `entries` into a store in `folder` (continuing an interrupted decode of the same plan of the same
    source, `stamp`); `skipped`: what was left out before decoding (label rows naming missing files); `notes`:
    lines to tell whoever loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    status_file, pixels_file, skipped_file = folder / "status.u8", folder / "pixels.u8", folder / "skipped.txt"
    plan = _load_plan(folder, entries, stamp)
    if plan is None:
        for f in (folder / "index.npz", pixels_file, status_file, skipped_file):
            f.unlink(missing_ok=True)
        shapes, unreadable = plan_shapes(entries, size, threads)
        starts = starts_of(shapes)
        total = int(3 * (shapes[:, 0] * shapes[:, 1]).sum())
        meta = {"format": STORE_FORMAT, "count": len(entries), "names": _names_key(entries), "stamp": stamp}
        meta |= {"pixel_bytes": total, "skipped": list(skipped or []) + unreadable, "notes": list(notes or [])}
        with open(pixels_file, "wb") as f:
            _reserve(f.fileno(), total)
        np.zeros(len(entries), dtype=np.uint8).tofile(status_file)
        atomic_write_bytes(folder / "plan.npz", _index_bytes({"starts": starts, "shapes": shapes}, classes, meta))
    else:
        starts, shapes, meta = plan
    status = np.fromfile(status_file, dtype=np.uint8)
    pixels = np.memmap(pixels_file, dtype=np.uint8, mode="r+") if meta["pixel_bytes"] else np.zeros(0, np.uint8)
    build = Build(entries, shapes, starts, pixels, status, status_file, skipped_file)
    build.run(threads, log, what)
    if isinstance(pixels, np.memmap):
        pixels.flush()
    earlier = skipped_file.read_text(encoding="utf-8", errors="replace").splitlines() if skipped_file.is_file() else []
    build.messages = sorted(set(earlier) | set(build.messages))  # reasons from an interrupted run's chunks too
    arrays, meta = _finish(build, classes, size, meta)
    atomic_write_bytes(folder / "index.npz", _index_bytes(arrays, classes, meta))
    for f in (status_file, folder / "plan.npz", skipped_file):
        f.unlink(missing_ok=True)


def _reserve(fd: int, total: int) -> None:
    """Reserve the pixel file's blocks now, so a full disk fails here and not as SIGBUS in a memory map later (where
    the platform or file system cannot, the file is only extended)."""
    try:
        if total:
            os.posix_fallocate(fd, 0, total)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, total)


def build_in_memory(
    entries: list[Entry],
    classes: list[str],
    size: int,
    *,
    threads: int,
    what: str,
    log: Callable[[str], None],
    check_fits: Callable[[int], None] = lambda nbytes: None,
    skipped: list[str] | None = None,
    notes: list[str] | None = None,
) -> Store:
    """The same decode with the pixels in memory (no data home to write to); `check_fits(bytes)` may refuse it
    after the headers are read, before anything is decoded."""
    shapes, unreadable = plan_shapes(entries, size, threads)
    total = int(3 * (shapes[:, 0] * shapes[:, 1]).sum())
    check_fits(total)
    build = Build(entries, shapes, starts_of(shapes), np.empty(total, np.uint8), np.zeros(len(entries), np.uint8))
    build.run(threads, log, what)
    meta = {"format": STORE_FORMAT, "skipped": list(skipped or []) + unreadable, "notes": list(notes or [])}
    arrays, meta = _finish(build, classes, size, meta)
    return Store(build.pixels, arrays["starts"], arrays["shapes"], arrays["labels"], arrays["splits"], classes, meta)


def _names_key(entries: list[Entry]) -> str:
    digest = hashlib.sha256()
    for e in entries:
        digest.update(f"{e.name}\0{e.label}\0{e.split}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _load_plan(folder: Path, entries: list[Entry], stamp: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """The plan of an interrupted decode of these same entries of the same source, if there is one to continue."""
    plan, status = folder / "plan.npz", folder / "status.u8"
    if not (plan.is_file() and status.is_file() and (folder / "pixels.u8").is_file()):
        return None
    try:
        with np.load(plan, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            starts, shapes = z["starts"], z["shapes"]
    except Exception:
        return None
    ok = meta.get("format") == STORE_FORMAT and meta.get("names") == _names_key(entries) and meta.get("stamp") == stamp
    ok = ok and status.stat().st_size == len(entries) and (folder / "pixels.u8").stat().st_size == meta["pixel_bytes"]
    return (starts, shapes, meta) if ok else None


def files_stamp(paths: Iterable[Path], root: Path | None = None) -> str:
    """A digest of the (name, size, modification time) of files: it changes whenever their content likely has."""
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            digest.update(f"{p}\0missing\n".encode("utf-8", "surrogatepass"))
            continue
        name = os.path.relpath(p, root) if root is not None else str(p)
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def tree_files(root: Path) -> Iterator[Path]:
    """Every file under `root` (anything that is not a folder: links, FIFOs and devices too, for the decoder to
    refuse by name), in a fixed order. Links to folders are followed, except a link back to a folder it is inside
    (a loop): two links to one folder list its files twice, under each."""
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(root, frozenset())]
    while stack:
        folder, above = stack.pop()
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        inside = above | {(st.st_dev, st.st_ino)}
        subfolders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if not is_dir:
                yield Path(entry.path)
                continue
            try:
                sub = entry.stat()
            except OSError:
                continue
            if (sub.st_dev, sub.st_ino) not in inside:
                subfolders.append(Path(entry.path))
        stack.extend((sub, inside) for sub in reversed(subfolders))


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files (`.<name>.<random>.tmp`, see cifar_cnn.atomic) that a writer killed in the middle
    of a write left in a store's folder. Called with the store's lock held: no live writer of this store exists."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def store_folder(home: Path, key: list) -> Path:
    """The store's folder for a key (the source, the image size and the options that shape the data)."""
    return home / "cache" / f"store-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}"


def remove_store(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
