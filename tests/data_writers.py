"""Test helper: writing a data set back out as official CIFAR-10 python batches or as an image-folder tree.

Used to hand CIFAR-style data to other tools and to check the readers: reading what these write gives back the same
arrays, bit for bit (image folders in a lossless format).
"""

from __future__ import annotations

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
