"""The decode cache: a data set decoded once into uint8 arrays and stored as an .npz file in the data home.

The key covers the source's path, its size and modification time (for a folder: of every file in it), the image size
and the cache format, so changing the source invalidates the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from .sources import Dataset

CACHE_FORMAT = 1


def source_fingerprint(path: Path) -> list:
    """What changes whenever the source's content is likely to have changed."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    rows = []
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(dirpath, name))
            rows.append((os.path.relpath(os.path.join(dirpath, name), path), st.st_size, st.st_mtime_ns))
    return [hashlib.sha256(json.dumps(rows).encode()).hexdigest()]


def cache_path(home: Path, path: Path, image_size: int) -> Path:
    key = json.dumps([CACHE_FORMAT, str(path.resolve()), source_fingerprint(path), image_size])
    return home / "cache" / f"decoded-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def load_cached(file: Path) -> Dataset | None:
    """The cached data set, or None if there is none or it cannot be read (then it is rebuilt)."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return Dataset(classes=[str(c) for c in arrays.pop("classes")], **arrays)
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None


def save_cached(file: Path, ds: Dataset) -> None:
    """Write atomically (a temporary file in the same folder, then rename), with the mode the umask allows.

    An OSError (read-only or full disk) reaches the caller, which carries on without the cache.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, lambda f: np.savez(f, classes=np.array(ds.classes, dtype=str), **ds.arrays()))
