"""The in-memory tensor pipeline: normalize a whole split once, then batch and augment with tensor ops.

Randomness comes from generators derived from (seed, epoch, step), never from global state, so any batch of any epoch
can be rebuilt exactly: resuming mid-epoch or sharding across processes gives the same batches as a straight run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..choices import SAMPLERS, check_choice
from . import augment as augment_ops
from . import preprocess

_MIX = 1_000_003  # a prime to mix (seed, epoch, step) into one generator seed


def derived_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from a tuple of ints (e.g. seed, epoch, step)."""
    value = 0x9E3779B9
    for k in keys:
        value = (value * _MIX + int(k) + 1) % (1 << 63)
    g = torch.Generator(device=device)
    g.manual_seed(value)
    return g


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) numpy array -> uint8 tensor sharing its memory where possible."""
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))


def normalize_split(
    images: np.ndarray | torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chunk: int = 8192,
) -> torch.Tensor:
    """A whole split, uint8 (N, 3, H, W) -> normalized (`preprocess.normalize`) as `dtype` on `device`, computed in
    chunks to bound memory."""
    src = to_tensor(images)
    out = torch.empty(src.shape, dtype=dtype, device=device)
    for i in range(0, len(src), chunk):
        out[i : i + chunk] = preprocess.normalize(src[i : i + chunk].to(device), mean, std).to(dtype)
    return out


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (N, C, h, w) resized to size x size: bilinear, half-pixel centres (as Pillow's BILINEAR upscaling, which
    the decoder uses for files smaller than the model's input), antialiased when shrinking. Unchanged at that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = min(x.shape[-2:]) > size
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.to(x.dtype)


@dataclass(frozen=True)
class Augment:
    """Training augmentation, applied a batch at a time."""

    flip: bool = False  # random horizontal flip with probability 1/2
    translate: int = 0  # random shift of up to this many pixels each way (reflect-padded crop)
    cutout: int = 0  # side of a random square set to 0 (the mean colour after normalization); 0 = off
    alternate_flip: bool = False  # a fixed random half flipped, and every image flipped every other epoch (airbench)
    # small-data augmentation (cifar_cnn.data.augment), after the above
    auto_augment: str = "none"  # "randaugment" or "trivialaugment": photometric and geometric ops per image
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0  # probability of erasing one rectangle of an image (after resizing)
    mixup_alpha: float = 0.0  # mixup/cutmix of the final batch: the labels become soft targets
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0  # folded into the soft targets when mixing (as timm does)

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0 or self.cutout > 0 or self.alternate_flip

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(len(x), generator=g, device=g.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Each image shifted by its own (dy, dx) in [-pad, pad], borders filled by reflection."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, centred anywhere (clipped at the borders)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=g, device=g.device).to(x.device)
    cx = torch.randint(0, w, (n,), generator=g, device=g.device).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - size // 2)
    xs = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - size // 2)
    inside = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
    return x.masked_fill(inside[:, None], 0.0)


def augment_batch(x: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    if aug.flip:
        x = random_flip(x, g)
    if aug.translate > 0:
        x = random_translate(x, aug.translate, g)
    if aug.cutout > 0:
        x = random_cutout(x, aug.cutout, g)
    return x


def epoch_order(
    labels: torch.Tensor | np.ndarray, epoch: int, seed: int, *, shuffle: bool, sampler: str = "shuffle"
) -> torch.Tensor:
    """The sample order of one epoch: indices into `labels`, the same for every process and every resume.

    "shuffle": a permutation (or 0..N-1 without `shuffle`). "balanced": N draws with replacement, each class equally
    likely and images uniform within their class, so a minority class is seen as often as any other (its images
    repeat, majority images are skipped; `shuffle` does not apply). Classes absent from `labels` are not drawn. The
    draws come from a generator of (seed, epoch) alone, so a resumed or sharded run rebuilds exactly the same order.
    """
    labels = torch.as_tensor(labels)
    n = len(labels)
    if sampler == "shuffle":
        if not shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=derived_generator(seed, epoch, -1))
    check_choice(sampler, SAMPLERS, "sampler")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    present, counts = torch.unique(labels.to("cpu", torch.long), return_counts=True)
    by_class = torch.argsort(labels.to("cpu", torch.long), stable=True)  # indices grouped by class, classes ascending
    starts = torch.cumsum(counts, 0) - counts
    g = derived_generator(seed, epoch, -3)
    cls = torch.randint(0, len(present), (n,), generator=g)  # which class each draw comes from
    within = (torch.rand(n, generator=g, dtype=torch.float64) * counts[cls]).long()  # uniform within that class
    within = torch.minimum(within, counts[cls] - 1)  # guard against rounding up to the count
    return by_class[starts[cls] + within]


class TensorLoader:
    """Batches from a normalized in-memory split: shuffled per epoch and augmented per batch, reproducibly."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        sampler: str = "shuffle",
        size: int | None = None,
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
        num_classes: int = 0,
    ) -> None:
        """`size`: the model's input side, when the images are held smaller (batches are upscaled to it); `mean` and
        `std`: the images' normalization (RandAugment works on pixels); `num_classes`: for mixup/cutmix targets."""
        self.images, self.labels = images, labels
        # "balanced" draws classes equally often (with replacement); see epoch_order
        self.sampler = check_choice(sampler, SAMPLERS, "sampler")
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment = augment or Augment()
        self.seed = seed
        self.size, self.mean, self.std, self.num_classes = size, tuple(mean), tuple(std), num_classes
        if self.augment.mixing and num_classes < 2:
            raise ValueError("mixup/cutmix need num_classes")

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def global_batch_size(self, step: int) -> int:
        """Images in batch `step` (all processes together): batch_size, less for an epoch's last batch."""
        return min(self.batch_size, len(self.labels) - step * self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of one epoch (the same for every process and every resume); see `epoch_order`."""
        return epoch_order(self.labels, epoch, self.seed, shuffle=self.shuffle, sampler=self.sampler)

    def _base_flip(self, device: torch.device) -> torch.Tensor:
        """Which images are flipped in even epochs: drawn once (on the CPU, so every device draws the same), then
        kept on `device`."""
        mask = getattr(self, "_flip_mask", None)
        if mask is None or mask.device != device:
            g = derived_generator(self.seed, -2)
            self._flip_mask = (torch.rand(len(self.labels), generator=g) < 0.5).to(device)
        return self._flip_mask

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, images, labels) for steps start..len-1 of `epoch`."""
        order = self.order(epoch).to(self.images.device)
        for step in range(start, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield step, *self.prepared(self.images[idx], self.labels[idx], idx, epoch, step)

    def prepared(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) of batch `step` of `epoch` as the model trains on them: resized to the model's input when
        held smaller (so pixel sizes of the options are the model's), augmented (flips, shifts, cutout,
        RandAugment/TrivialAugment), randomly erased, then mixed (mixup/cutmix: the targets become soft, (N,
        classes)). Each stage draws from its own generator of (seed, epoch, step), so a batch is rebuilt exactly on
        resume and under torchrun."""
        aug = self.augment
        if self.size is not None:
            x = resize_batch(x, self.size)
        x = self.augmented(x, idx, epoch, step)
        if aug.auto_augment != "none":
            g = derived_generator(self.seed, epoch, step, 11, device=x.device)
            if aug.auto_augment == "randaugment":
                x = augment_ops.rand_augment(x, self.mean, self.std, g, aug.randaugment_ops, aug.randaugment_magnitude)
            else:
                x = augment_ops.trivial_augment(x, self.mean, self.std, g)
        if aug.random_erasing > 0:
            x = augment_ops.random_erasing(
                x, derived_generator(self.seed, epoch, step, 12, device=x.device), aug.random_erasing
            )
        if aug.mixing:
            x, y = augment_ops.mix_batch(
                x,
                y,
                self.num_classes,
                derived_generator(self.seed, epoch, step, 13, device=x.device),
                mixup_alpha=aug.mixup_alpha,
                cutmix_alpha=aug.cutmix_alpha,
                switch_prob=aug.mix_switch_prob,
                prob=aug.mix_prob,
                label_smoothing=aug.label_smoothing,
            )
        return x, y

    def augmented(self, x: torch.Tensor, idx: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The normalized batch of images `idx` (step `step` of `epoch`) with this loader's flips, shifts and
        cutout."""
        if self.augment.alternate_flip:
            # each image is seen flipped in exactly half of the epochs, unflipped in the other half
            flip = self._base_flip(x.device)[idx] ^ bool(epoch % 2)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if self.augment.active:
            x = augment_batch(x, self.augment, derived_generator(self.seed, epoch, step, device=x.device))
        return x
