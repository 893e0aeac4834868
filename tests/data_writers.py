"""Test helper: writing a data set back out as official CIFAR-10 python batches or as an image-folder tree, and
writing a small CIFAR-100 in its official python format.

Used to hand CIFAR-style data to other tools and to check the readers: reading what these write gives back the same
arrays, bit for bit (image folders in a lossless format).
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_cnn.data.sources import OFFICIAL_META, OFFICIAL_TEST_BATCH, OFFICIAL_TRAIN_BATCHES, Dataset
from cifar_cnn.errors import CifarCnnError

from .conftest import py2_dumps


def write_official(ds: Dataset, folder: Path) -> Path:
    """Write `ds` as data_batch_1..5, test_batch and batches.meta, in the official files' own pickle format."""
    if ds.image_size != 32:
        raise CifarCnnError(
            f"official CIFAR-10 batches hold 32x32 images, this data set has {ds.image_size}x{ds.image_size}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(ds.train_labels)), len(OFFICIAL_TRAIN_BATCHES))
    batches = [(name, ds.train_images[idx], ds.train_labels[idx]) for name, idx in zip(OFFICIAL_TRAIN_BATCHES, chunks)]
    batches.append((OFFICIAL_TEST_BATCH, ds.test_images, ds.test_labels))
    for name, images, labels in batches:
        d = {"batch_label": name, "labels": [int(v) for v in labels], "data": images.reshape(len(images), -1)}
        (folder / name).write_bytes(py2_dumps(d))
    meta = {"label_names": list(ds.classes), "num_cases_per_batch": len(chunks[0]), "num_vis": 3072}
    (folder / OFFICIAL_META).write_bytes(py2_dumps(meta))
    return folder


def write_image_folder(ds: Dataset, root: Path, fmt: str = "png") -> Path:
    """Write `ds` as ROOT/{train,test[,val]}/<class>/NNNN.<fmt>, numbered in within-class order."""
    splits = [("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)]
    if ds.val_images is not None:
        splits.append(("val", ds.val_images, ds.val_labels))
    for split, images, labels in splits:
        for c, name in enumerate(ds.classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(images[labels == c]):
                Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{k:04d}.{fmt}")
    return root


@dataclass
class Cifar100Written:
    """What `write_cifar100` wrote, in file order: the arrays a reader must give back (after sorting by class)."""

    path: Path  # the cifar-100-python folder, or the .tar.gz holding it
    train_images: np.ndarray  # (N, 3, 32, 32) uint8
    train_fine: np.ndarray  # (N,) int64
    train_coarse: np.ndarray
    test_images: np.ndarray
    test_fine: np.ndarray
    test_coarse: np.ndarray
    fine_names: list[str]  # in label order, as in meta
    coarse_names: list[str]
    fine_to_coarse: np.ndarray  # (num_fine,): the superclass of each fine class


def _cifar100_split(
    per_class: int, fine_to_coarse: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images whose red plane is their fine label and green plane their index within the class (blue: noise),
    in a shuffled order, as the official files are."""
    fine = np.repeat(np.arange(len(fine_to_coarse)), per_class)
    rng.shuffle(fine)
    images = rng.integers(0, 256, size=(len(fine), 3, 32, 32), dtype=np.uint8)
    images[:, 0] = fine[:, None, None]
    within = np.zeros(len(fine), dtype=np.int64)
    for c in range(len(fine_to_coarse)):
        idx = np.flatnonzero(fine == c)
        within[idx] = np.arange(len(idx))
    images[:, 1] = (within % 256)[:, None, None]
    return images, fine.astype(np.int64), fine_to_coarse[fine].astype(np.int64)


def _cifar100_file(split: str, images: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> bytes:
    """One train or test file as the official one is: a Python 2 pickle with (byte) str keys."""
    d = {
        b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(len(fine))],
        b"batch_label": f"{split}ing batch 1 of 1".encode(),
        b"fine_labels": [int(v) for v in fine],
        b"coarse_labels": [int(v) for v in coarse],
        b"data": images.reshape(len(images), -1),
    }
    return py2_dumps(d)


def write_cifar100(
    dest: Path, n_train_per_class: int = 2, n_test_per_class: int = 1, num_coarse: int = 20, seed: int = 0
) -> Cifar100Written:
    """A CIFAR-100 in the official python format: `dest` is the cifar-100-python folder itself, or a .tar.gz that
    gets cifar-100-python/{train,test,meta} (and a stray file, as the real archive has).

    100 fine classes, each in one of `num_coarse` superclasses (100 / num_coarse fine classes each, assigned at
    random); class names deliberately not in alphabetical order, so a reader must keep meta's order.
    """
    rng = np.random.default_rng(seed)
    fine_to_coarse = rng.permutation(np.repeat(np.arange(num_coarse), 100 // num_coarse))
    train = _cifar100_split(n_train_per_class, fine_to_coarse, rng)
    test = _cifar100_split(n_test_per_class, fine_to_coarse, rng)
    fine_names = [f"fine_{(37 * c) % 100:02d}" for c in range(100)]
    coarse_names = [f"coarse_{(7 * c) % num_coarse:02d}" for c in range(num_coarse)]
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    files = {"train": _cifar100_file("train", *train), "test": _cifar100_file("test", *test), "meta": py2_dumps(meta)}
    if dest.name.endswith(".tar.gz"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:gz") as tf:
            for name, blob in {**files, "file.txt~": b"stray editor backup"}.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    else:
        dest.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (dest / name).write_bytes(blob)
    return Cifar100Written(dest, *train, *test, fine_names, coarse_names, fine_to_coarse)
