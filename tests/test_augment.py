"""cifar_cnn.data.augment against independent references: every op equals Pillow (ImageOps, ImageEnhance,
Image.transform, Image.rotate) pixel for pixel, plus cases worked by hand; the policies draw from torchvision's tables
(written out here by hand); random erasing, Mixup and CutMix keep timm's rules; the soft-target loss equals torch's
cross-entropy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from cifar_cnn.data.augment import (
    AUGMENT_OPS,
    OPS,
    from_pixels,
    mix_batch,
    rand_augment,
    random_erasing,
    smoothed_one_hot,
    soft_target_cross_entropy,
    to_pixels,
    trivial_augment,
)
from cifar_cnn.data.preprocess import normalize
from cifar_cnn.errors import CifarCnnError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, h, w, 3) images of varied brightness and contrast, one with a constant channel, so autocontrast and
    equalize meet narrow, wide and flat histograms."""
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, 200, (n, 1, 1, 1))
    span = rng.integers(1, 256, (n, 1, 1, 1))
    images = np.clip(lo + rng.random((n, h, w, 3)) * span, 0, 255).astype(np.uint8)
    images[0, :, :, 1] = 77
    return images


def as_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float pixels (n, 3, h, w), the ops' input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def as_images(pixels: torch.Tensor) -> np.ndarray:
    assert torch.equal(pixels, pixels.round()) and pixels.min() >= 0 and pixels.max() <= 255  # on the uint8 grid
    return pixels.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def pillow_affine(coeffs: Callable[[float], tuple]) -> Callable[[Image.Image, float], Image.Image]:
    return lambda im, m: im.transform(im.size, Image.AFFINE, coeffs(m), resample=Image.NEAREST, fillcolor=0)


# Pillow's own implementation of each op; shears about the top-left corner (torchvision's RandAugment: center=[0, 0])
PILLOW = {
    "identity": lambda im, m: im,
    "shear_x": pillow_affine(lambda m: (1, m, 0, 0, 1, 0)),
    "shear_y": pillow_affine(lambda m: (1, 0, 0, m, 1, 0)),
    "translate_x": pillow_affine(lambda m: (1, 0, -int(m), 0, 1, 0)),
    "translate_y": pillow_affine(lambda m: (1, 0, 0, 0, 1, -int(m))),
    "rotate": lambda im, m: im.rotate(m, resample=Image.NEAREST),
    "brightness": lambda im, m: ImageEnhance.Brightness(im).enhance(m),
    "color": lambda im, m: ImageEnhance.Color(im).enhance(m),
    "contrast": lambda im, m: ImageEnhance.Contrast(im).enhance(m),
    "sharpness": lambda im, m: ImageEnhance.Sharpness(im).enhance(m),
    "posterize": lambda im, m: ImageOps.posterize(im, int(m)),
    "solarize": lambda im, m: ImageOps.solarize(im, m),
    "autocontrast": lambda im, m: ImageOps.autocontrast(im),
    "equalize": lambda im, m: ImageOps.equalize(im),
}
ENHANCE = [0.0, 0.1, 0.55, 1.0, 1.99, 3.5]  # blend factors: degenerate, between, the image, extrapolated (clipped)
MAGNITUDES = {
    "identity": [0.0] * 6,
    "shear_x": [0.0, 0.3, -0.27, 0.99, -0.99, 0.2],
    "shear_y": [0.0, 0.3, -0.27, 0.99, -0.99, 0.2],
    "translate_x": [0.0, 3.0, -5.0, 4.9, -14.5, 40.0],
    "translate_y": [0.0, 3.0, -5.0, 4.9, -14.5, 40.0],
    "rotate": [9.0, -30.0, 45.0, 90.0, -135.0, 180.0],  # 45 puts many pixels on rounding boundaries; 90, 180 exact
    "brightness": ENHANCE,
    "color": ENHANCE,
    "contrast": ENHANCE,
    "sharpness": ENHANCE,
    "posterize": [8, 7, 4, 2, 1, 3],
    "solarize": [255.0, 0.0, 128.0, 178.5, 8.5, 300.0],
    "autocontrast": [0.0] * 6,
    "equalize": [0.0] * 6,
}


def test_the_op_list_is_torchvisions() -> None:
    assert set(AUGMENT_OPS) == set(OPS) == set(PILLOW) and len(AUGMENT_OPS) == 14


@pytest.mark.parametrize("shape", [(11, 13), (12, 12), (24, 26)])  # odd and even, square (Pillow's 90-degree path)
@pytest.mark.parametrize("name", AUGMENT_OPS)
def test_each_op_equals_pillow_pixel_for_pixel(name: str, shape: tuple[int, int]) -> None:
    """Exactly, with no tolerance: the geometric ops too (their coordinates follow Pillow's 16.16 fixed point)."""
    magnitudes = MAGNITUDES[name]
    images = sample_images(len(magnitudes), *shape, seed=AUGMENT_OPS.index(name) * 100 + shape[1])
    ours = as_images(OPS[name](as_pixels(images), torch.tensor(magnitudes, dtype=torch.float64)))
    for i, (image, m) in enumerate(zip(images, magnitudes)):
        expected = np.asarray(PILLOW[name](Image.fromarray(image), m))
        mismatched = int((ours[i] != expected).any(-1).sum())
        assert mismatched == 0, f"{name}({m}) on image {i}: {mismatched} pixels differ from Pillow"


def test_ops_take_one_shared_magnitude_or_one_per_image() -> None:
    pixels = as_pixels(sample_images(3, 8, 9))
    assert torch.equal(OPS["rotate"](pixels, 30.0), OPS["rotate"](pixels, torch.full((3,), 30.0)))
    with pytest.raises(CifarCnnError, match="one per image"):
        OPS["rotate"](pixels, torch.ones(2))
    with pytest.raises(CifarCnnError, match="1..8 bits"):
        OPS["posterize"](pixels, 0)


def grey(values: list[list[float]]) -> torch.Tensor:
    """A (1, 3, H, W) pixel tensor with the same values in every channel."""
    return torch.tensor(values, dtype=torch.float32).expand(1, 3, -1, -1).clone()


def test_histogram_ops_by_hand() -> None:
    row = grey([[100, 128, 200]])
    assert OPS["posterize"](row, 4)[0, 0].tolist() == [[96, 128, 192]]  # 200 = 0b11001000 -> 0b11000000
    assert OPS["solarize"](row, 128)[0, 0].tolist() == [[100, 127, 55]]  # at or above the threshold: 255 - v
    stretched = OPS["autocontrast"](grey([[10, 15, 20]]))
    assert stretched[0, 0].tolist() == [[0, 127, 255]]  # 15 -> int(127.5)
    flat = torch.cat([grey([[10, 15, 20]])[:, :2], torch.full((1, 1, 1, 3), 50.0)], dim=1)
    assert OPS["autocontrast"](flat)[0, 2].tolist() == [[50, 50, 50]]  # a constant channel is left alone
    # 1024 pixels, half 10 and half 20: step = (1024 - 512) // 255 = 2; 10 -> 1 // 2 = 0, 20 -> 513 // 2 clipped
    halves = grey([[10.0] * 32] * 16 + [[20.0] * 32] * 16)
    assert set(OPS["equalize"](halves).unique().tolist()) == {0, 255}
    assert torch.equal(OPS["equalize"](grey([[10, 15, 20]])), grey([[10, 15, 20]]))  # too few pixels: step 0


def test_enhance_ops_by_hand() -> None:
    image = as_pixels(sample_images(1, 5, 6))
    assert OPS["brightness"](image, 0.0).eq(0).all()  # factor 0: black
    assert OPS["brightness"](grey([[255]]), 0.5).eq(127).all()  # 127.5, truncated as Pillow's blend does
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert OPS["color"](red, 0.0).flatten().tolist() == [76, 76, 76]  # L = 0.299 * 255 = 76.2
    assert OPS["contrast"](grey([[0, 255]]), 0.0).eq(128).all()  # mean grey 127.5, rounded half up
    dot = grey([[0, 0, 0], [0, 255, 0], [0, 0, 0]])
    blurred = OPS["sharpness"](dot, 0.0)
    assert blurred[0, 0].tolist() == [[0, 0, 0], [0, 98, 0], [0, 0, 0]]  # 5 * 255 / 13 = 98.1; border kept


def test_geometric_ops_by_hand() -> None:
    square = grey([[1, 2], [3, 4]])
    assert OPS["rotate"](square, 90.0)[0, 0].tolist() == [[2, 4], [1, 3]]  # counter-clockwise
    assert OPS["rotate"](square, -90.0)[0, 0].tolist() == [[3, 1], [4, 2]]
    assert OPS["rotate"](square, 180.0)[0, 0].tolist() == [[4, 3], [2, 1]]
    assert OPS["translate_x"](grey([[1, 2, 3]]), 1.0)[0, 0].tolist() == [[0, 1, 2]]  # right, black fill
    assert OPS["translate_y"](grey([[1], [2], [3]]), -1.9)[0, 0].tolist() == [[2], [3], [0]]  # up 1: truncated
    # about the top-left corner: row y samples x + 0.5 + factor * (y + 0.5), so factor 1 shifts row 0 by 1, row 1 by 2
    assert OPS["shear_x"](grey([[1, 2, 3], [4, 5, 6]]), 1.0)[0, 0].tolist() == [[2, 3, 0], [6, 0, 0]]


def test_pixels_round_trip_through_the_normalization_of_preprocess() -> None:
    images = torch.from_numpy(sample_images(4, 9, 10)).permute(0, 3, 1, 2).contiguous()
    x = normalize(images, MEAN, STD)
    assert torch.equal(to_pixels(x, MEAN, STD), images.float())
    assert torch.equal(from_pixels(images.float(), MEAN, STD, torch.float32), x)  # bit for bit


# ---------------------------------------------------------------------------------------------------------------------
# the policies


def normalized_batch(n: int = 12, h: int = 16, w: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    images = torch.from_numpy(sample_images(n, h, w, seed=7)).permute(0, 3, 1, 2).contiguous()
    return normalize(images, MEAN, STD).to(dtype)


POLICIES = {
    "randaugment": lambda x, g, **kw: rand_augment(x, MEAN, STD, g, **kw),
    "trivialaugment": lambda x, g, **kw: trivial_augment(x, MEAN, STD, g, **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_policies_are_reproducible_from_the_generator(policy: str, dtype: torch.dtype) -> None:
    x = normalized_batch(dtype=dtype)
    before = x.clone()
    first = POLICIES[policy](x, gen(1))
    assert first.dtype == dtype and first.shape == x.shape
    assert torch.equal(first, POLICIES[policy](x, gen(1)))
    assert not torch.equal(first, POLICIES[policy](x, gen(2)))
    assert not torch.equal(first, x) and torch.equal(x, before)  # something changed, and not the input


IDENTITY_AT_ZERO = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
IDENTITY_AT_ZERO += ("brightness", "color", "contrast", "sharpness", "posterize")  # factor 1, 8 bits


def test_magnitude_zero_of_the_identity_like_ops_keeps_the_batch() -> None:
    x = normalized_batch()
    out = rand_augment(x, MEAN, STD, gen(3), num_ops=3, magnitude=0, ops=IDENTITY_AT_ZERO)
    assert torch.equal(out, x)  # normalized uint8 pixels come back bit for bit
    half = normalized_batch(dtype=torch.bfloat16)
    out = rand_augment(half, MEAN, STD, gen(3), num_ops=3, magnitude=0, ops=IDENTITY_AT_ZERO)
    # bf16 carries 8 bits: the input sits up to half a grey level off the pixel grid, the output rounds again
    torch.testing.assert_close(out.float(), half.float(), rtol=2**-7, atol=0.5 / (255 * min(STD)))
    assert torch.equal(trivial_augment(x, MEAN, STD, gen(3), ops=("identity",)), x)


# (policy, op, keyword arguments, the magnitudes one image may get, from torchvision's documented tables)
TABLE_CASES = [
    ("randaugment", "rotate", {"magnitude": 9}, [9.0, -9.0]),  # 0..30 degrees over 31 bins
    ("randaugment", "translate_x", {"magnitude": 30}, [14, -14]),  # 150 / 331 * 32 = 14.5 px, whole pixels
    ("randaugment", "posterize", {"magnitude": 9}, [7]),  # round(8 - 9 / 7.5)
    ("randaugment", "posterize", {"magnitude": 30}, [4]),  # 8..4 bits
    ("randaugment", "solarize", {"magnitude": 9}, [178.5]),  # 255 - 9 * 8.5
    ("randaugment", "brightness", {"magnitude": 30}, [1.9, 0.1]),  # 1 +- 0.9
    ("trivialaugment", "rotate", {}, [s * 4.5 * k for k in range(31) for s in (1, -1)]),  # 0..135 degrees
    ("trivialaugment", "solarize", {}, [255 - 8.5 * k for k in range(31)]),
    ("trivialaugment", "posterize", {}, [8, 7, 6, 5, 4, 3, 2]),
]


@pytest.mark.parametrize(("policy", "name", "kwargs", "allowed"), TABLE_CASES)
def test_each_image_gets_the_op_at_a_magnitude_of_torchvisions_table(
    policy: str, name: str, kwargs: dict, allowed: list[float]
) -> None:
    """With one op allowed, every image equals Pillow's op at one of the table's magnitudes, and signed ops are seen
    with both signs: the draws are per image and the tables are torchvision's."""
    images = sample_images(24, 32, 32, seed=11)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), MEAN, STD)
    num_ops = {"num_ops": 1} if policy == "randaugment" else {}
    out = as_images(to_pixels(POLICIES[policy](x, gen(5), ops=(name,), **num_ops, **kwargs), MEAN, STD))
    seen = set()
    for image, ours in zip(images, out):
        matches = [m for m in allowed if np.array_equal(np.asarray(PILLOW[name](Image.fromarray(image), m)), ours)]
        assert matches, f"{policy} {name}: an image matches none of the magnitudes {allowed}"
        seen.add(matches[0])
    if len(allowed) == 2:
        assert seen == set(allowed)  # both signs drawn


def test_each_image_draws_its_own_ops() -> None:
    """Across a batch, rand_augment with a rotation and a solarization applies the two to different images."""
    images = sample_images(24, 16, 16, seed=3)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), MEAN, STD)
    out = as_images(to_pixels(rand_augment(x, MEAN, STD, gen(0), 1, 30, ops=("rotate", "solarize")), MEAN, STD))
    kinds = []
    for image, ours in zip(images, out):
        rotated = any(np.array_equal(np.asarray(PILLOW["rotate"](Image.fromarray(image), a)), ours) for a in (30, -30))
        solarized = np.array_equal(np.asarray(ImageOps.solarize(Image.fromarray(image), 0.0)), ours)
        assert rotated or solarized
        kinds.append(rotated)
    assert 0 < sum(kinds) < len(kinds)


def test_policies_refuse_bad_arguments() -> None:
    x = normalized_batch(2, 4, 4)
    with pytest.raises(CifarCnnError, match="augmentation op"):
        rand_augment(x, MEAN, STD, gen(0), ops=("invert",))
    with pytest.raises(CifarCnnError, match="magnitude"):
        rand_augment(x, MEAN, STD, gen(0), magnitude=31)
    with pytest.raises(CifarCnnError, match="at least one op"):
        trivial_augment(x, MEAN, STD, gen(0), ops=())


# ---------------------------------------------------------------------------------------------------------------------
# random erasing


def test_random_erasing_with_p_zero_changes_nothing() -> None:
    x = torch.randn(16, 3, 20, 20, generator=gen(0))
    assert torch.equal(random_erasing(x, gen(1), p=0.0), x)


def test_random_erasing_with_p_one_erases_one_rectangle_per_image() -> None:
    """Each image has exactly one changed rectangle; its area fraction lies in `scale` and its aspect in `ratio` up to
    the rounding of each side by at most half a pixel (timm rounds the sides); the fill is standard-normal noise."""
    x = torch.randn(200, 3, 32, 32, generator=gen(0))
    scale, ratio = (0.02, 1 / 3), (0.3, 3.3)
    out = random_erasing(x, gen(2), p=1.0, scale=scale, ratio=ratio)
    assert torch.equal(out, random_erasing(x, gen(2), p=1.0, scale=scale, ratio=ratio))
    noise, shapes = [], []
    for before, after in zip(x, out):
        changed = (after != before).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert len(rows) > 0, "an image was not erased"
        box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        h, w = len(rows), len(cols)
        assert changed.sum() == h * w and changed[box].all()  # a full rectangle, nothing outside it
        assert (after[:, box[0], box[1]] != before[:, box[0], box[1]]).all()  # every channel of it
        area = 32 * 32
        assert (h + 0.5) * (w + 0.5) >= scale[0] * area and (h - 0.5) * (w - 0.5) <= scale[1] * area
        assert (h + 0.5) / (w - 0.5) >= ratio[0] and (h - 0.5) / (w + 0.5) <= ratio[1]
        noise.append(after[:, box[0], box[1]].flatten())
        shapes.append((h, w))
    values = torch.cat(noise)
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05 and len(set(shapes)) > 20
    # the aspect is log-uniform on (0.3, 3.3), symmetric about 1: tall and wide boxes about equally often
    tall, wide = sum(h > w for h, w in shapes), sum(h < w for h, w in shapes)
    assert 0.4 < tall / (tall + wide) < 0.6


def test_random_erasing_skips_an_image_when_no_box_fits() -> None:
    """On a 2x2 image a box of 90..100 % of the area needs a side of 2, which never fits (sides must be smaller)."""
    x = torch.randn(8, 3, 2, 2, generator=gen(0))
    assert torch.equal(random_erasing(x, gen(1), p=1.0, scale=(0.9, 1.0)), x)


def test_random_erasing_with_p_half_erases_about_half() -> None:
    x = torch.randn(400, 1, 16, 16, generator=gen(0))
    erased = (random_erasing(x, gen(4), p=0.5) != x).flatten(1).any(1).float().mean()
    assert 0.42 < erased < 0.58


# ---------------------------------------------------------------------------------------------------------------------
# Mixup / CutMix


def mix_inputs(n: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct continuous images, and labels that differ from the reversed batch's at every position."""
    return torch.randn(n, 3, 16, 16, generator=gen(0)), torch.arange(n) % classes


def lam_from_targets(targets: torch.Tensor, y: torch.Tensor, classes: int, smoothing: float) -> float:
    off = smoothing / classes
    on = 1 - smoothing + off
    lams = (targets[torch.arange(len(y)), y] - off) / (on - off)
    assert torch.allclose(lams, lams[0], atol=1e-6)  # one lam for the whole batch
    return float(lams[0])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("mixup_alpha", "cutmix_alpha"), [(0.0, 0.0), (0.4, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_targets_are_soft_and_sum_to_one(mixup_alpha: float, cutmix_alpha: float, smoothing: float) -> None:
    x, y = mix_inputs()
    for seed in range(4):
        _, targets = mix_batch(x, y, 10, gen(seed), mixup_alpha, cutmix_alpha, label_smoothing=smoothing)
        assert targets.shape == (8, 10) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert targets.min() >= 0


def test_smoothed_one_hot_is_timms() -> None:
    targets = smoothed_one_hot(torch.tensor([2, 0]), 4, 0.2)
    expected = torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]])  # off 0.2 / 4, on 1 - 0.2 + off
    torch.testing.assert_close(targets, expected)


def test_mixup_blends_each_image_with_the_reversed_batch() -> None:
    x, y = mix_inputs()
    before = x.clone()
    lams = []
    for seed in range(5):
        mixed, targets = mix_batch(x, y, 10, gen(seed), mixup_alpha=0.4, label_smoothing=0.1)
        lam = lam_from_targets(targets, y, 10, 0.1)
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
        lams.append(lam)
    assert torch.equal(x, before) and len(set(lams)) == 5 and all(0 < lam < 1 for lam in lams)


def test_cutmix_takes_one_minus_lam_of_the_pixels_from_the_reversed_batch() -> None:
    x, y = mix_inputs()
    boxes = set()
    for seed in range(8):
        mixed, targets = mix_batch(x, y, 10, gen(seed), cutmix_alpha=1.0)
        lam = lam_from_targets(targets, y, 10, 0.0)
        from_flip = (mixed == x.flip(0)).all(1)
        assert ((mixed == x).all(1) | from_flip).all()  # every pixel is one or the other
        assert torch.equal(from_flip, from_flip[:1].expand_as(from_flip))  # the same box in every image
        box = from_flip[0]
        assert abs(box.float().mean().item() - (1 - lam)) < 1e-9  # lam corrected to the clipped box
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows):
            assert box.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        boxes.add(box.sum().item())
    assert len(boxes) > 3


def test_switch_prob_chooses_between_mixup_and_cutmix() -> None:
    x, y = mix_inputs()
    for seed in range(4):
        mixed, _ = mix_batch(x, y, 10, gen(seed), mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.0)
        assert (mixed != x).all()  # mixup: every pixel blended
        mixed, _ = mix_batch(x, y, 10, gen(seed), mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
        assert ((mixed == x) | (mixed == x.flip(0))).all()  # cutmix: pixels copied


def test_prob_zero_leaves_the_batch_unmixed_with_smoothed_targets() -> None:
    x, y = mix_inputs()
    mixed, targets = mix_batch(x, y, 10, gen(0), mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1)
    assert torch.equal(mixed, x)
    torch.testing.assert_close(targets, smoothed_one_hot(y, 10, 0.1))
    unmixed = sum(torch.equal(mix_batch(x, y, 10, gen(s), mixup_alpha=1.0, prob=0.5)[0], x) for s in range(200))
    assert 70 < unmixed < 130


def test_lam_follows_the_beta_distribution() -> None:
    """Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)); 2000 draws put both within a few standard errors."""
    x, y = torch.randn(2, 1, 1, 1), torch.tensor([0, 1])
    alpha = 0.4
    lams = torch.tensor([mix_batch(x, y, 2, gen(s), mixup_alpha=alpha)[1][0, 0].item() for s in range(2000)])
    assert abs(lams.mean() - 0.5) < 0.025
    assert abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.012


def test_mix_batch_is_reproducible_and_refuses_bad_arguments() -> None:
    x, y = mix_inputs()
    a = mix_batch(x, y, 10, gen(9), mixup_alpha=0.8, cutmix_alpha=1.0)
    b = mix_batch(x, y, 10, gen(9), mixup_alpha=0.8, cutmix_alpha=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(CifarCnnError, match="mixup_alpha"):
        mix_batch(x, y, 10, gen(0), mixup_alpha=-1.0)
    with pytest.raises(CifarCnnError, match="label_smoothing"):
        mix_batch(x, y, 10, gen(0), label_smoothing=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# the soft-target loss


def test_soft_target_cross_entropy_equals_torchs_cross_entropy() -> None:
    logits = torch.randn(16, 10, generator=gen(0)) * 3
    y = torch.randint(0, 10, (16,), generator=gen(1))
    onehot = F.one_hot(y, 10).float()
    torch.testing.assert_close(soft_target_cross_entropy(logits, onehot), F.cross_entropy(logits, y))
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, onehot, reduction="sum"), F.cross_entropy(logits, y, reduction="sum")
    )
    weights = torch.rand(10, generator=gen(2)) + 0.5
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, onehot, weights),
        F.cross_entropy(logits, y, weight=weights, reduction="sum") / 16,
    )
    smoothed = smoothed_one_hot(y, 10, 0.1)  # torch's label_smoothing mixes in the same uniform targets
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, smoothed), F.cross_entropy(logits, y, label_smoothing=0.1)
    )
    half = soft_target_cross_entropy(logits.bfloat16(), onehot)  # computed in float32 from the bf16 values
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, F.cross_entropy(logits.bfloat16().float(), y), rtol=1e-6, atol=1e-6)
    with pytest.raises(CifarCnnError, match="reduction"):
        soft_target_cross_entropy(logits, onehot, reduction="none")


def test_module_draws_no_global_randomness() -> None:
    """Every draw comes from the generator passed in: the global RNG state is untouched."""
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    x, y = mix_inputs()
    rand_augment(x[:, :, :8, :8] * 0, MEAN, STD, gen(0))
    trivial_augment(x * 0, MEAN, STD, gen(0))
    random_erasing(x, gen(0), p=1.0)
    mix_batch(x, y, 10, gen(0), mixup_alpha=1.0, cutmix_alpha=1.0)
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)
