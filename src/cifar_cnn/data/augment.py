"""Augmentation for small data sets, on normalized batches: RandAugment and TrivialAugment (torchvision's op list and
magnitude tables, every op equal to Pillow's), random erasing (timm's "pixel" mode), and Mixup / CutMix with soft
targets (timm's batch mode) with the loss that reads them.

Every random choice comes from the `torch.Generator` passed in, never from global state, so a batch is rebuilt exactly
from (seed, epoch, step) like the rest of the tensor pipeline. The policies are vectorized: each image draws its own
ops and magnitudes, and each op runs once per batch on the images that drew it.

The single ops work on pixel tensors: float (N, 3, H, W) holding whole numbers 0..255 (`to_pixels` makes them from a
normalized batch, `from_pixels` goes back). They reproduce Pillow's integer results, including its truncations, so
the tests compare them with Pillow image by image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..choices import LOSS_REDUCTIONS, check_choice
from ..errors import CifarCnnError
from .preprocess import scaled_stats

AUGMENT_OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)  # torchvision's RandAugment / TrivialAugmentWide op list, in its order
_ENHANCE_OPS = ("brightness", "color", "contrast", "sharpness")  # the policies pass them 1 + magnitude
_ERASE_ATTEMPTS = 10  # timm and torchvision try 10 boxes before giving up on an image

# ---------------------------------------------------------------------------------------------------------------------
# the pixel grid


def _scaled_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """`preprocess.scaled_stats` as tensors on `device`, so `from_pixels` gives bit for bit what `preprocess.normalize`
    gives."""
    m, s = scaled_stats(mean, std)
    return torch.from_numpy(m).to(device), torch.from_numpy(s).to(device)


def to_pixels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalized images (any float dtype) -> float32 pixels rounded to the uint8 grid 0..255, as Pillow would hold
    them."""
    m, s = _scaled_stats(mean, std, x.device)
    return (x.float() * s + m).round_().clamp_(0.0, 255.0)


def from_pixels(
    pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Pixels 0..255 -> normalized images as `dtype`, the formula of `preprocess.normalize`."""
    m, s = _scaled_stats(mean, std, pixels.device)
    return ((pixels.float() - m) / s).to(dtype)


def _per_image(value: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    """A magnitude for each of `n` images as a float64 (n,) tensor: a scalar is shared, a tensor holds one per image."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, n)):
        raise CifarCnnError(f"an augmentation op got {t.numel()} magnitudes for {n} images; give one or one per image")
    return t.reshape(-1).expand(n)


# ---------------------------------------------------------------------------------------------------------------------
# geometric ops: Pillow's Image.transform(AFFINE, resample=NEAREST, fillcolor=0)


def _pillow_fixed(v: torch.Tensor) -> torch.Tensor:
    """Pillow's FIX macro: a float64 coordinate term as 16.16 fixed point, floor(v * 65536 + 0.5), in int64."""
    return torch.floor(v * 65536.0 + 0.5).long()


def _affine_nearest(img: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Pillow's affine transform with nearest sampling and fill 0, one row (a, b, c, d, e, f) of `coeffs` per image:
    output pixel (x, y) takes input pixel floor(a (x+.5) + b (y+.5) + c, d (x+.5) + e (y+.5) + f), black outside.

    The coordinates are summed in 16.16 fixed point, as Pillow's nearest-neighbour affine path does (affine_fixed in
    Geometry.c), so pixels on a rounding boundary (a 45 degree rotation has many) land where Pillow's do. Pillow takes
    that path whenever the transformed corners lie within 32768 pixels, true for these ops on any image below 16k
    pixels a side; its scale-only path (translations) gives the same pixels for whole-pixel shifts."""
    n, c, h, w = img.shape
    k = coeffs.to(img.device, torch.float64).view(n, 6, 1, 1).unbind(1)
    a0, a1, a3, a4 = (_pillow_fixed(k[i]) for i in (0, 1, 3, 4))
    a2 = _pillow_fixed(k[2] + k[0] * 0.5 + k[1] * 0.5)  # the start of row 0 at pixel centre (0.5, 0.5)
    a5 = _pillow_fixed(k[5] + k[3] * 0.5 + k[4] * 0.5)
    xs = torch.arange(w, device=img.device).view(1, 1, w)
    ys = torch.arange(h, device=img.device).view(1, h, 1)
    sx = (a2 + ys * a1 + xs * a0) >> 16  # an arithmetic shift: floor, for negative values too
    sy = (a5 + ys * a4 + xs * a3) >> 16
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    index = sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)
    out = img.flatten(2).gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=img.dtype, device=img.device))


def _coeff_rows(rows: list[list[float]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, device=device).view(-1, 6)


def shear_x(img: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Horizontal shear about the top-left corner, AutoAugment's and torchvision's convention (torchvision's
    RandAugment shears with center=[0, 0]): Pillow's affine (1, factor, 0, 0, 1, 0), row y moves left by
    factor * (y + 0.5)."""
    f = _per_image(factor, len(img), img.device).tolist()
    return _affine_nearest(img, _coeff_rows([[1.0, v, 0.0, 0.0, 1.0, 0.0] for v in f], img.device))


def shear_y(img: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Vertical shear about the top-left corner: Pillow's affine (1, 0, 0, factor, 1, 0); see `shear_x`."""
    f = _per_image(factor, len(img), img.device).tolist()
    return _affine_nearest(img, _coeff_rows([[1.0, 0.0, 0.0, v, 1.0, 0.0] for v in f], img.device))


def translate_x(img: torch.Tensor, pixels: torch.Tensor | float) -> torch.Tensor:
    """Shift right by `pixels` (truncated to whole pixels toward zero, as torchvision's int()), filling with black."""
    t = torch.trunc(_per_image(pixels, len(img), img.device)).tolist()
    return _affine_nearest(img, _coeff_rows([[1.0, 0.0, -v, 0.0, 1.0, 0.0] for v in t], img.device))


def translate_y(img: torch.Tensor, pixels: torch.Tensor | float) -> torch.Tensor:
    """Shift down by `pixels` (truncated to whole pixels toward zero), filling with black."""
    t = torch.trunc(_per_image(pixels, len(img), img.device)).tolist()
    return _affine_nearest(img, _coeff_rows([[1.0, 0.0, 0.0, 0.0, 1.0, -v] for v in t], img.device))


def _rotation_coeffs(degrees: float, width: int, height: int) -> list[float]:
    """The inverse affine matrix of Pillow's `Image.rotate(degrees)` about the centre (w/2, h/2), step by step as
    Pillow computes it (cos and sin rounded to 15 decimals, so 90 and 180 degrees are exact)."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return [a, b, (a * -cx + b * -cy + 0.0) + cx, d, e, (d * -cx + e * -cy + 0.0) + cy]


def rotate(img: torch.Tensor, degrees: torch.Tensor | float) -> torch.Tensor:
    """Counter-clockwise rotation about the image centre, corners filled with black: Pillow's
    `Image.rotate(degrees, resample=NEAREST)`, as torchvision's RandAugment calls it."""
    angles = _per_image(degrees, len(img), img.device).tolist()
    h, w = img.shape[-2:]
    return _affine_nearest(img, _coeff_rows([_rotation_coeffs(a, w, h) for a in angles], img.device))


# ---------------------------------------------------------------------------------------------------------------------
# colour ops: PIL.ImageEnhance, a blend of the image with a degenerate one


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Pillow's `Image.blend(degenerate, img, factor)`: degenerate + factor (img - degenerate) in float32 steps (the
    factor is a C float there), clamped to 0..255 and truncated, as its C code casts to UINT8."""
    alpha = _per_image(factor, len(img), img.device).to(torch.float32).view(-1, 1, 1, 1)
    return (degenerate + alpha * (img - degenerate)).clamp_(0.0, 255.0).floor_()


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion, (N, 1, H, W): the fixed-point form of L = 0.299 R + 0.587 G + 0.114 B that its C
    code uses, (19595 R + 38470 G + 7471 B + 2**15) >> 16, in exact integers."""
    r, g, b = img.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1).to(img.dtype)


def brightness(img: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """`ImageEnhance.Brightness`: blend with black (0 gives black, 1 the image)."""
    return _blend(torch.zeros_like(img), img, factor)


def color(img: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """`ImageEnhance.Color`: blend with the image's grayscale (0 gives grey, 1 the image, above 1 more saturated)."""
    return _blend(_grayscale(img).expand_as(img), img, factor)


def contrast(img: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """`ImageEnhance.Contrast`: blend with a flat image of the mean grey level, rounded half up as Pillow does."""
    gray = _grayscale(img).to(torch.int64)
    mean = gray.sum(dim=(1, 2, 3), keepdim=True).double() / gray[0].numel()  # Pillow: integer sum / count, a double
    return _blend(torch.floor(mean + 0.5).to(img.dtype).expand_as(img), img, factor)


def _smooth(img: torch.Tensor) -> torch.Tensor:
    """Pillow's `ImageFilter.SMOOTH`, the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 rounded to the nearest
    integer, with the one-pixel border copied unchanged. Summed from shifted slices rather than a convolution so the
    sums stay exact integers on any backend (no TF32, no Winograd); n / 13 is never a tie, so rounding is exact."""
    h, w = img.shape[-2:]
    out = img.clone()
    if h < 3 or w < 3:
        return out
    total = 4 * img[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + img[..., dy : h - 2 + dy, dx : w - 2 + dx]
    out[..., 1:-1, 1:-1] = torch.floor(total / 13 + 0.5)
    return out


def sharpness(img: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """`ImageEnhance.Sharpness`: blend with the smoothed image (0 blurs, 1 keeps, 2 sharpens); the border is kept."""
    return _blend(_smooth(img), img, factor)


# ---------------------------------------------------------------------------------------------------------------------
# histogram ops: PIL.ImageOps


def identity(img: torch.Tensor, magnitude: torch.Tensor | float | None = None) -> torch.Tensor:
    """The image unchanged (the magnitude is ignored; it is there so every op takes the same arguments)."""
    return img


def posterize(img: torch.Tensor, bits: torch.Tensor | float) -> torch.Tensor:
    """`ImageOps.posterize`: keep the top `bits` (1..8, truncated to an integer) of each 8-bit value."""
    b = torch.trunc(_per_image(bits, len(img), img.device))
    if ((b < 1) | (b > 8)).any():
        raise CifarCnnError(f"posterize keeps 1..8 bits of each value (as Pillow), got {b.tolist()}")
    mask = (256 - torch.pow(2.0, 8 - b)).to(torch.uint8).view(-1, 1, 1, 1)  # 8 bits: 255, 4 bits: 240, 1 bit: 128
    return torch.bitwise_and(img.to(torch.uint8), mask).to(img.dtype)


def solarize(img: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """`ImageOps.solarize`: invert every value at or above `threshold` (v -> 255 - v), keep those below."""
    t = _per_image(threshold, len(img), img.device).view(-1, 1, 1, 1)  # compared in float64, as Python compares
    return torch.where(img < t, img, 255.0 - img)


def _apply_lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map each value through its channel's table, lut (N * C, 256) int64, as Pillow's `Image.point` does."""
    n, c, h, w = img.shape
    values = img.to(torch.int64).reshape(n * c, h * w)
    return lut.gather(1, values).view(n, c, h, w).to(img.dtype)


def autocontrast(img: torch.Tensor, magnitude: torch.Tensor | float | None = None) -> torch.Tensor:
    """`ImageOps.autocontrast` (no cutoff): each channel stretched from its own min..max to 0..255 through Pillow's
    table int(v * scale + offset), in the same float64 steps; a constant channel is left unchanged."""
    n, c = img.shape[:2]
    lo = img.amin(dim=(2, 3)).double().view(n * c, 1)
    hi = img.amax(dim=(2, 3)).double().view(n * c, 1)
    flat = hi <= lo
    scale = torch.full_like(lo, 255.0) / torch.where(flat, 1.0, hi - lo)  # not 255.0 / t: torch takes 1/t first
    offset = -lo * scale
    ramp = torch.arange(256, device=img.device, dtype=torch.float64)
    lut = torch.trunc(ramp * scale + offset).clamp_(0.0, 255.0).long()
    return _apply_lut(img, torch.where(flat, ramp.long(), lut))


def equalize(img: torch.Tensor, magnitude: torch.Tensor | float | None = None) -> torch.Tensor:
    """`ImageOps.equalize`, Pillow's per-channel algorithm: step = (pixels - count of the highest value) // 255; a value
    v maps to (step // 2 + pixels below v) // step, clipped at 255; a channel with step 0 is left unchanged."""
    n, c, h, w = img.shape
    values = img.to(torch.int64).reshape(n * c, h * w)
    offsets = 256 * torch.arange(n * c, device=img.device).view(-1, 1)
    hist = torch.bincount((values + offsets).flatten(), minlength=256 * n * c).view(n * c, 256)
    last = hist.gather(1, values.amax(dim=1, keepdim=True))  # pixels holding the channel's highest value
    step = (h * w - last) // 255
    below = torch.cumsum(hist, dim=1) - hist
    lut = torch.div(step // 2 + below, step.clamp(min=1), rounding_mode="floor").clamp_(max=255)
    return _apply_lut(img, torch.where(step > 0, lut, torch.arange(256, device=img.device)))


OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "identity": identity,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
    "rotate": rotate,
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    "sharpness": sharpness,
    "posterize": posterize,
    "solarize": solarize,
    "autocontrast": autocontrast,
    "equalize": equalize,
}  # each takes (pixels (n, 3, H, W), one magnitude per image) and returns new pixels


# ---------------------------------------------------------------------------------------------------------------------
# the policies


def _rand_augment_space(num_bins: int, height: int, width: int) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision's RandAugment magnitude table, op -> (magnitude of each bin, signed), from the same float32
    `torch.linspace` calls (ops without a magnitude hold zeros). Solarize is on the 0..255 scale."""
    return {
        "shear_x": (torch.linspace(0.0, 0.3, num_bins), True),
        "shear_y": (torch.linspace(0.0, 0.3, num_bins), True),
        "translate_x": (torch.linspace(0.0, 150.0 / 331.0 * width, num_bins), True),
        "translate_y": (torch.linspace(0.0, 150.0 / 331.0 * height, num_bins), True),
        "rotate": (torch.linspace(0.0, 30.0, num_bins), True),
        **{name: (torch.linspace(0.0, 0.9, num_bins), True) for name in _ENHANCE_OPS},
        "posterize": ((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int(), False),
        "solarize": (torch.linspace(255.0, 0.0, num_bins), False),
    }


def _trivial_augment_space(num_bins: int) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision's TrivialAugmentWide magnitude table (wider ranges than RandAugment's), as `_rand_augment_space`."""
    return {
        "shear_x": (torch.linspace(0.0, 0.99, num_bins), True),
        "shear_y": (torch.linspace(0.0, 0.99, num_bins), True),
        "translate_x": (torch.linspace(0.0, 32.0, num_bins), True),
        "translate_y": (torch.linspace(0.0, 32.0, num_bins), True),
        "rotate": (torch.linspace(0.0, 135.0, num_bins), True),
        **{name: (torch.linspace(0.0, 0.99, num_bins), True) for name in _ENHANCE_OPS},
        "posterize": ((8 - (torch.arange(num_bins) / ((num_bins - 1) / 6))).round().int(), False),
        "solarize": (torch.linspace(255.0, 0.0, num_bins), False),
    }


def _tables(
    space: dict[str, tuple[torch.Tensor, bool]], ops: tuple[str, ...], num_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(magnitudes (len(ops), num_bins) float64, signed (len(ops),) bool) for the ops in `ops`, in their order."""
    rows = [space.get(name, (torch.zeros(num_bins), False)) for name in ops]
    return torch.stack([r[0].double() for r in rows]), torch.tensor([r[1] for r in rows])


def _check_ops(ops: tuple[str, ...]) -> tuple[str, ...]:
    ops = tuple(ops)
    if not ops:
        raise CifarCnnError("an augmentation policy needs at least one op; give some of " + ", ".join(AUGMENT_OPS))
    for name in ops:
        check_choice(name, AUGMENT_OPS, "augmentation op")
    return ops


def _apply_grouped(
    pixels: torch.Tensor, choice: torch.Tensor, magnitude: torch.Tensor, ops: tuple[str, ...]
) -> torch.Tensor:
    """Image i gets op ops[choice[i]] with magnitude[i]; each op runs once on the images that drew it (in place)."""
    choice = choice.cpu()
    for k, name in enumerate(ops):
        picked = (choice == k).nonzero().flatten()
        if name == "identity" or len(picked) == 0:
            continue
        picked = picked.to(pixels.device)
        arg = magnitude.index_select(0, picked)
        if name in _ENHANCE_OPS:
            arg = 1.0 + arg  # torchvision: the enhance factor is 1 + magnitude
        pixels.index_copy_(0, picked, OPS[name](pixels.index_select(0, picked), arg))
    return pixels


def _draw_signs(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """-1 or +1, each with probability 1/2 (torchvision negates a signed magnitude when rand <= 0.5)."""
    flip = torch.rand(shape, generator=g, device=g.device) <= 0.5
    return 1.0 - 2.0 * flip.double()


def rand_augment(
    x: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    g: torch.Generator,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
    *,
    ops: tuple[str, ...] = AUGMENT_OPS,
) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020) as torchvision's: each image applies `num_ops` ops drawn uniformly from `ops`
    (with repeats), all at bin `magnitude` of `num_magnitude_bins`, each signed op negated with probability 1/2.
    `x` is a normalized batch (N, 3, H, W); the ops run on its pixels rounded to 0..255 and the result comes back
    normalized, in x's dtype."""
    ops = _check_ops(ops)
    if num_ops < 0 or not 0 <= magnitude < num_magnitude_bins:
        raise CifarCnnError(
            f"RandAugment needs num_ops >= 0 and 0 <= magnitude < num_magnitude_bins, got num_ops={num_ops}, "
            f"magnitude={magnitude}, num_magnitude_bins={num_magnitude_bins}"
        )
    n, _, h, w = x.shape
    choice = torch.randint(len(ops), (num_ops, n), generator=g, device=g.device)
    sign = _draw_signs((num_ops, n), g)
    table, signed = _tables(_rand_augment_space(num_magnitude_bins, h, w), ops, num_magnitude_bins)
    pixels = to_pixels(x, mean, std)
    for slot in range(num_ops):
        c = choice[slot].cpu()
        mag = table[c, magnitude] * torch.where(signed[c], sign[slot].cpu(), 1.0)
        pixels = _apply_grouped(pixels, c, mag.to(x.device), ops)
    return from_pixels(pixels, mean, std, x.dtype)


def trivial_augment(
    x: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    g: torch.Generator,
    *,
    num_magnitude_bins: int = 31,
    ops: tuple[str, ...] = AUGMENT_OPS,
) -> torch.Tensor:
    """TrivialAugment (Müller & Hutter 2021) as torchvision's TrivialAugmentWide: each image applies one op drawn
    uniformly from `ops` at its own uniformly drawn magnitude bin, a signed op negated with probability 1/2.
    Normalized batch in, normalized batch out (see `rand_augment`)."""
    ops = _check_ops(ops)
    if num_magnitude_bins < 1:
        raise CifarCnnError(f"TrivialAugment needs num_magnitude_bins >= 1, got {num_magnitude_bins}")
    n = len(x)
    choice = torch.randint(len(ops), (n,), generator=g, device=g.device).cpu()
    bins = torch.randint(num_magnitude_bins, (n,), generator=g, device=g.device).cpu()
    sign = _draw_signs((n,), g).cpu()
    table, signed = _tables(_trivial_augment_space(num_magnitude_bins), ops, num_magnitude_bins)
    mag = table[choice, bins] * torch.where(signed[choice], sign, 1.0)
    pixels = _apply_grouped(to_pixels(x, mean, std), choice, mag.to(x.device), ops)
    return from_pixels(pixels, mean, std, x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# random erasing


def _uniform(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """float64 draws uniform in [0, 1) on the generator's device."""
    return torch.rand(shape, generator=g, device=g.device, dtype=torch.float64)


def _erase_boxes(
    n: int, height: int, width: int, g: torch.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[torch.Tensor, ...]:
    """timm's box draw for each of n images: up to 10 tries of an area uniform in `scale` of the image and an aspect
    log-uniform in `ratio`, sides rounded (half to even, as Python's round); the first box that fits (side < image
    side) wins. Returns (fits, top, left, box height, box width), (n,) each, on the generator's device."""
    area = height * width
    tries = (n, _ERASE_ATTEMPTS)
    target = scale[0] + (scale[1] - scale[0]) * _uniform(tries, g)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _uniform(tries, g))
    box_h = torch.round(torch.sqrt(target * area * aspect)).long()
    box_w = torch.round(torch.sqrt(target * area / aspect)).long()
    ok = (box_h < height) & (box_w < width)
    first = ok.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    # timm: top = randint(0, H - h) inclusive, left likewise
    top = (_uniform((n,), g) * (height - box_h + 1)).long()
    left = (_uniform((n,), g) * (width - box_w + 1)).long()
    return ok.any(dim=1), top, left, box_h, box_w


def random_erasing(
    x: torch.Tensor,
    g: torch.Generator,
    p: float = 0.25,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020) as timm's RandomErasing(mode="pixel", max_count=1): with probability `p` an
    image gets one rectangle (area fraction in `scale`, aspect h/w log-uniform in `ratio`, up to 10 tries, skipped if
    none fits) filled with per-pixel standard-normal noise, which is natural on a normalized batch."""
    if not 0.0 <= p <= 1.0 or not 0.0 < scale[0] <= scale[1] or not 0.0 < ratio[0] <= ratio[1]:
        raise CifarCnnError(
            f"random erasing needs 0 <= p <= 1, 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got p={p}, "
            f"scale={scale}, ratio={ratio}"
        )
    n, c, h, w = x.shape
    chosen = torch.rand(n, generator=g, device=g.device) < p
    fits, top, left, box_h, box_w = _erase_boxes(n, h, w, g, scale, ratio)
    erase = (chosen & fits).to(x.device)
    top, left, box_h, box_w = (t.to(x.device).view(n, 1) for t in (top, left, box_h, box_w))
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= top) & (rows < top + box_h)
    in_cols = (cols >= left) & (cols < left + box_w)
    inside = (in_rows[:, :, None] & in_cols[:, None, :] & erase.view(n, 1, 1)).unsqueeze(1)
    picked = erase.nonzero().flatten()
    noise = torch.randn((len(picked), c, h, w), generator=g, device=g.device).to(x.device, x.dtype)
    out = x.clone()
    out[picked] = torch.where(inside[picked], noise, x[picked])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Mixup / CutMix and the soft-target loss


def smoothed_one_hot(y: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """timm's smoothed one-hot targets (N, num_classes) float32: off = smoothing / num_classes on every class, and
    on = 1 - smoothing + off on the label, so each row sums to one (the targets of torch's label_smoothing)."""
    off = smoothing / num_classes
    targets = torch.full((len(y), num_classes), off, dtype=torch.float32, device=y.device)
    return targets.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def _beta(alpha: float, g: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha), from a numpy Generator seeded by an integer drawn from `g` (torch's own gamma
    sampler takes no generator), so the draw is fixed by g's state."""
    seed = int(torch.randint(0, 2**62, (), generator=g, device=g.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _mix_params(
    g: torch.Generator, mixup_alpha: float, cutmix_alpha: float, switch_prob: float, prob: float
) -> tuple[float, bool]:
    """timm's per-batch draw: (lam, use_cutmix); lam = 1 leaves the batch unmixed."""
    if (mixup_alpha <= 0.0 and cutmix_alpha <= 0.0) or float(torch.rand((), generator=g, device=g.device)) >= prob:
        return 1.0, False
    if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
        use_cutmix = float(torch.rand((), generator=g, device=g.device)) < switch_prob
    else:
        use_cutmix = cutmix_alpha > 0.0
    return _beta(cutmix_alpha if use_cutmix else mixup_alpha, g), use_cutmix


def _cutmix_box(height: int, width: int, lam: float, g: torch.Generator) -> tuple[tuple[int, int, int, int], float]:
    """timm's rand_bbox and correct_lam: a box of sides int(side * sqrt(1 - lam)) centred at a uniform pixel, clipped
    at the borders; lam corrected to 1 - (the box's real area) / (image area). Returns ((y0, y1, x0, x1), lam)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (), generator=g, device=g.device))
    cx = int(torch.randint(0, width, (), generator=g, device=g.device))
    y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def _check_mix_args(
    num_classes: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float, prob: float, smoothing: float
) -> None:
    problems = []
    if num_classes < 1:
        problems.append(f"num_classes >= 1 (got {num_classes})")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        problems.append(f"mixup_alpha, cutmix_alpha >= 0 (got {mixup_alpha}, {cutmix_alpha})")
    if not (0.0 <= switch_prob <= 1.0 and 0.0 <= prob <= 1.0):
        problems.append(f"switch_prob and prob in 0..1 (got {switch_prob}, {prob})")
    if not 0.0 <= smoothing < 1.0:
        problems.append(f"0 <= label_smoothing < 1 (got {smoothing})")
    if problems:
        raise CifarCnnError("Mixup/CutMix needs " + "; ".join(problems))


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    g: torch.Generator,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) as timm's Mixup in batch mode: with probability `prob` the
    batch is mixed with itself reversed (x.flip(0), y.flip(0)) at one lam ~ Beta(alpha, alpha), by CutMix with
    probability `switch_prob` when both alphas are > 0. Mixup: lam x + (1 - lam) x.flip(0); CutMix: one box pasted
    from x.flip(0), lam corrected to the box's real area. Returns (images, soft targets (N, num_classes) float32); the
    targets are the smoothed one-hot labels mixed with the same lam. `x` is not modified; unmixed, it comes back."""
    _check_mix_args(num_classes, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing)
    targets = smoothed_one_hot(y, num_classes, label_smoothing)
    lam, use_cutmix = _mix_params(g, mixup_alpha, cutmix_alpha, switch_prob, prob)
    if lam == 1.0:
        return x, targets
    if use_cutmix:
        (y0, y1, x0, x1), lam = _cutmix_box(x.shape[-2], x.shape[-1], lam, g)
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
    else:
        mixed = x * lam + x.flip(0) * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy against soft targets, in float32: per image -sum_c w_c t_c log_softmax(logits)_c (w = 1 without
    class weights), averaged ("mean") or summed ("sum") over the batch. With weights, "mean" divides by the batch
    size, not by the summed weights as F.cross_entropy(weight=...) does: soft targets have no single class to weigh."""
    check_choice(reduction, LOSS_REDUCTIONS, "reduction")
    t = targets.float()
    if class_weights is not None:
        t = t * class_weights.to(t.device, torch.float32)
    per_image = -(t * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    return per_image.mean() if reduction == "mean" else per_image.sum()
