"""What a data source decodes to: a `Dataset` of splits, each split's images either a uint8 array (N, 3, S, S) in
memory (every image already at the training size S: CIFAR-10 at 32 px) or an `ImageSet` (images stored at their own
sizes, or memory-mapped from the decode cache), which gives the same uint8 (n, 3, S, S) batches when sliced.

Torch-free: the tensor pipeline (cifar_cnn.data.stream) crops and resizes from an ImageSet for training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

Images = Any  # np.ndarray (N, 3, S, S) or ImageSet


def canonical_order(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort by label: classes in label order, each class in its original order."""
    order = np.argsort(labels, kind="stable")
    return np.ascontiguousarray(images[order]), np.ascontiguousarray(labels[order])


def center_box(h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred square of side min(h, w): what evaluation sees."""
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A (3, h, w) uint8 image's `box` resized to (3, size, size) (bilinear, antialiased as in `images.py`)."""
    top, left, bh, bw = box
    part = image[:, top : top + bh, left : left + bw]
    if (bh, bw) == (size, size):
        return part
    im = Image.fromarray(np.ascontiguousarray(part.transpose(1, 2, 0)))
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1)


class ImageSet:
    """Images of one split held as one flat uint8 buffer (in memory, or a memory map of the decode cache): image i is
    `pixels[starts[i]:starts[i] + 3 h_i w_i]` reshaped to (3, h_i, w_i). `index` selects and orders the images this set
    shows (a split, a subset), without copying pixels. Slicing gives uint8 (n, 3, size, size) arrays, each image's
    centred square resized to `size`: the evaluation view. `crops` gives any boxes (training crops)."""

    def __init__(
        self, pixels: np.ndarray, starts: np.ndarray, shapes: np.ndarray, index: np.ndarray, size: int
    ) -> None:
        self.pixels, self.starts, self.shapes = pixels, starts, shapes
        self.index = np.asarray(index, dtype=np.int64)
        self.size = int(size)

    @classmethod
    def of_array(cls, images: np.ndarray) -> ImageSet:
        """A uint8 (N, 3, S, S) array as a set (no copy)."""
        n, _, h, w = images.shape
        flat = np.ascontiguousarray(images).reshape(-1)
        starts = np.arange(n, dtype=np.int64) * (3 * h * w)
        return cls(flat, starts, np.tile(np.array([[h, w]], np.int32), (n, 1)), np.arange(n), h)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.size, self.size)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.pixels, np.memmap)

    @property
    def uniform(self) -> bool:
        """Every image of this set is stored at exactly size x size (batches need no resizing)."""
        return bool(len(self) == 0 or np.all(self.shapes[self.index] == self.size))

    def take(self, idx: np.ndarray) -> ImageSet:
        """The images at positions `idx` of this set, as a set (no pixels copied)."""
        return ImageSet(self.pixels, self.starts, self.shapes, self.index[np.asarray(idx, dtype=np.int64)], self.size)

    def image(self, i: int) -> np.ndarray:
        """Image i of this set as stored, (3, h, w) uint8 (a view into the buffer)."""
        j = int(self.index[i])
        h, w = (int(v) for v in self.shapes[j])
        start = int(self.starts[j])
        return self.pixels[start : start + 3 * h * w].reshape(3, h, w)

    def stored_shapes(self) -> np.ndarray:
        """(n, 2) stored (h, w) of this set's images."""
        return self.shapes[self.index]

    def crops(self, positions: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
        """uint8 (n, 3, size, size): the images at `positions`, each `boxes[k]` = (top, left, h, w) of it (default:
        the centred square) resized to size. Uniform sets without boxes are read with one gather."""
        positions = np.asarray(positions, dtype=np.int64)
        if boxes is None and self.uniform:
            n = 3 * self.size * self.size
            flat = np.empty((len(positions), n), dtype=np.uint8)
            for k, start in enumerate(self.starts[self.index[positions]].tolist()):
                flat[k] = self.pixels[start : start + n]  # for a memory map: reads only these pages
            return flat.reshape(-1, 3, self.size, self.size)
        out = np.empty((len(positions), 3, self.size, self.size), dtype=np.uint8)
        for k, p in enumerate(positions):
            image = self.image(int(p))
            box = center_box(*image.shape[1:]) if boxes is None else tuple(int(v) for v in boxes[k])
            out[k] = crop_resize(image, box, self.size)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # images first, then within them: s[0, 1] is image 0's green channel
            return self[key[0]][(slice(None),) * (not isinstance(key[0], (int, np.integer))) + key[1:]]
        if isinstance(key, slice):
            return self.crops(np.arange(len(self))[key])
        if isinstance(key, (int, np.integer)):
            return self.crops(np.array([int(key)]))[0]
        return self.crops(np.asarray(key))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def take(images: Images, idx: np.ndarray) -> Images:
    """The images at `idx`: an array copy for arrays, a view (no pixels read) for an ImageSet."""
    return images.take(idx) if isinstance(images, ImageSet) else images[idx]


@dataclass
class Dataset:
    """A whole data set: uint8 images (N, 3, H, W) as arrays or ImageSets, int64 labels (N,), class names in label
    order. `notes` are lines worth telling the user (images upscaled, rows skipped); `skipped` lists label-file rows
    left out with --skip-bad (a command then ends with exit code 1)."""

    train_images: Images
    train_labels: np.ndarray
    test_images: Images
    test_labels: np.ndarray
    classes: list[str]
    val_images: Images | None = None  # only when the source has its own validation split (a val/ folder)
    val_labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stored_fingerprint: dict[str, Any] | None = None  # computed when the decode cache was written

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the decoded data: class names, image counts per split and a SHA-256 of every array (about
        0.15 s for CIFAR-10; recorded in the decode cache, so large sets are not read again). A run records it, so
        resuming or testing on other data than it trained on is caught."""
        if self.stored_fingerprint is not None:
            return dict(self.stored_fingerprint)
        counts = {"train": len(self.train_labels), "test": len(self.test_labels)}
        if self.val_labels is not None:
            counts["val"] = len(self.val_labels)
        return fingerprint_of(self.arrays(), list(self.classes), counts)

    def arrays(self) -> dict[str, Any]:
        """The images and labels by name."""
        out = {
            "train_images": self.train_images,
            "train_labels": self.train_labels,
            "test_images": self.test_images,
            "test_labels": self.test_labels,
        }
        if self.val_images is not None:
            out.update(val_images=self.val_images, val_labels=self.val_labels)
        return out


def fingerprint_of(arrays: dict[str, Any], classes: list[str], counts: dict[str, int]) -> dict[str, Any]:
    """{classes, counts, sha256} over the named arrays. An ImageSet whose images are all at its size is hashed as the
    array it equals (so where the pixels are held does not change the fingerprint); one of other sizes over its stored
    shapes and pixels."""
    digest = hashlib.sha256()
    for name, array in sorted(arrays.items()):
        if isinstance(array, ImageSet) and array.uniform:
            digest.update(f"{name}:|u1:{array.shape}".encode())
            for i in range(len(array)):
                digest.update(memoryview(np.ascontiguousarray(array.image(i))).cast("B"))
            continue
        if isinstance(array, ImageSet):
            digest.update(f"{name}:ragged:{len(array)}".encode())
            digest.update(np.ascontiguousarray(array.stored_shapes(), dtype=np.int64).tobytes())
            for i in range(len(array)):
                digest.update(memoryview(np.ascontiguousarray(array.image(i))).cast("B"))
            continue
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        if array.size:
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return {"classes": list(classes), "counts": dict(counts), "sha256": digest.hexdigest()}
