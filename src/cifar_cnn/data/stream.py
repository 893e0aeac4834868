"""The streaming tensor pipeline: training batches read from an `ImageSet` (images at their own sizes, in memory or
memory-mapped from the decode cache) a batch at a time, so memory does not grow with the data set.

Each image of a batch is cropped (random-resized-crop when `crop_scale` is set, else the centred square, as for
evaluation) and resized to the training size; then the batch is normalized and augmented on the tensor exactly as
`TensorLoader` does for an in-memory split. The next batch is read in a background thread while the current one
trains. Randomness comes from (seed, epoch, step) only, so resuming mid-epoch and sharding give the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .dataset import ImageSet
from .pipeline import Augment, TensorLoader, to_tensor
from .preprocess import normalize


def random_resized_boxes(
    shapes: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    tries: int = 10,
) -> np.ndarray:
    """(n, 4) boxes (top, left, h, w), one per image of stored `shapes` (n, 2): a random area fraction in `scale`
    and aspect ratio w/h (log-uniform) in `ratio`, placed uniformly; after `tries` misses, the centred crop with the
    ratio clamped (torchvision's RandomResizedCrop)."""
    n = len(shapes)
    h, w = shapes[:, 0].astype(np.float64), shapes[:, 1].astype(np.float64)
    area = (h * w)[:, None]
    target = area * rng.uniform(scale[0], scale[1], (n, tries))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries)))
    cw, ch = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    fits = (cw >= 1) & (ch >= 1) & (cw <= w[:, None]) & (ch <= h[:, None])
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    ok = fits[rows, first]
    ch, cw = ch[rows, first], cw[rows, first]
    # fallback: the whole image cut to the nearest allowed aspect ratio, centred
    in_ratio = w / h
    fw = np.where(in_ratio < ratio[0], w, np.where(in_ratio > ratio[1], np.rint(h * ratio[1]), w))
    fh = np.where(in_ratio < ratio[0], np.rint(w / ratio[0]), h)
    ch, cw = np.where(ok, ch, np.minimum(fh, h)), np.where(ok, cw, np.minimum(fw, w))
    top = np.where(ok, np.floor(rng.random(n) * (h - ch + 1)), (h - ch) // 2)
    left = np.where(ok, np.floor(rng.random(n) * (w - cw + 1)), (w - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1).astype(np.int64)


class StreamLoader(TensorLoader):
    """A TensorLoader whose images stay uint8 in an ImageSet and are cropped, resized, normalized (to `dtype` on
    `device`) and augmented a batch at a time."""

    def __init__(
        self,
        images: ImageSet,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        crop_scale: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] = (0.75, 4 / 3),
        shuffle: bool = False,
        sampler: str = "shuffle",
        drop_last: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        size: int | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__(
            images,  # type: ignore[arg-type]
            to_tensor(np.asarray(labels)).to(device),
            batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            augment=augment,
            seed=seed,
            size=size,
            mean=mean,
            std=std,
            num_classes=num_classes,
        )
        self.dtype, self.device = dtype, torch.device(device)
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio

    def pixels(self, epoch: int, step: int, idx: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, S, S) of the images at `idx` as this step crops them."""
        boxes = None
        if self.crop_scale is not None:
            rng = np.random.default_rng([self.seed, epoch, step, 7])
            boxes = random_resized_boxes(self.images.stored_shapes()[idx], self.crop_scale, self.crop_ratio, rng)
        return self.images.crops(idx, boxes)

    def sample(self, n: int) -> torch.Tensor:
        """The first n training images as the model sees them in evaluation (centre crop), normalized."""
        x = normalize(torch.from_numpy(self.images[: min(n, len(self.images))]), self.mean, self.std)
        return x.to(self.dtype)  # as the in-memory loader holds them

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        order = self.order(epoch).cpu().numpy()

        def read(step: int) -> np.ndarray:
            return self.pixels(epoch, step, order[step * self.batch_size : (step + 1) * self.batch_size])

        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(read, start) if start < len(self) else None
            for step in range(start, len(self)):
                u8 = ahead.result()  # type: ignore[union-attr]
                ahead = pool.submit(read, step + 1) if step + 1 < len(self) else None
                idx = torch.from_numpy(order[step * self.batch_size : (step + 1) * self.batch_size])
                x = normalize(torch.from_numpy(u8).to(self.device), self.mean, self.std).to(self.dtype)
                idx = idx.to(self.device)
                yield step, *self.prepared(x, self.labels[idx], idx, epoch, step)
