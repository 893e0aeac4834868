"""Explanations: which pixels of an image a model's answer rests on, as a heat map over the model's input, and the
tests that say whether a map can be trusted.

    from cifar_cnn.explain import Explainer
    ex = Explainer.from_checkpoint("runs/a/best.pt")
    report = ex.explain_files(["photos/"], method="gradcam")     # maps over the centre crop, labels as predict gives
    maps = ex.maps(images, "saliency")                           # uint8 (N, 3, S, S) -> float32 (N, S, S) in [0, 1]

Methods (each map is non-negative and scaled so its largest value is 1; higher means more important):
- gradcam: Grad-CAM (Selvaraju et al., 2017) on the last spatial feature map of the network (the last module, in
  the order modules finish, whose output is an (N, C, h, w) tensor with h x w > 1; `layer` names another), ReLU of
  the channel-weighted activations, upsampled bilinearly to the input size;
- saliency: |d score / d pixel| (Simonyan et al., 2014), the largest over the three channels;
- integrated-gradients: (x - x0) times the gradient averaged along the straight path from a grey image x0 (128) to x
  (Sundararajan et al., 2017; 32 steps, midpoint rule), summed over channels; its positive part, the pixels whose
  difference from grey raised the class's logit (by completeness, the sum over all pixels is, up to the 32-step
  approximation, the logit's rise from the grey image; greying a negative pixel would, to first order, raise it).
The score is the target class's logit on the plain view (no test-time augmentation); the label and probability
reported beside a map are predict's (with the checkpoint's TTA and temperature), and the target class is predict's
label unless one is given.

Faithfulness: `deletion_test` greys the fraction of pixels a map ranks highest and measures how much predict's
probability for the predicted class falls, against greying a random fraction shaped like the map's own: the top of
its phase-randomized surrogate (same power spectrum, random phases; scattered grey dots hurt a CNN far more than grey
regions, whatever they cover, so only like can be compared with like). It reports four more baselines: random maps
at the map's resolution (single pixels for gradients, Grad-CAM's h x w upsampled), single random pixels whatever the
map, one centre-weighted map for every image, and each image greyed by the next image's map (same method and grain,
but not about this image). A map that ignores the image (the centre map) passes
against random regions but not against the next image's map, and fails `randomization_check`, which compares maps of
the model with those of a copy with re-initialized weights (Adebayo et al., 2018): a map that explains the model must
change when the weights are destroyed.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .choices import EXPLAIN_METHODS, check_choice
from .data.pipeline import resize_batch
from .data.preprocess import normalize
from .errors import CifarCnnError
from .predict import Predictor
from .predict_core import find_images

GREY = 128  # the value deleted pixels get, and integrated gradients' baseline image
IG_STEPS = 32
DELETE_FRACTION = 0.2


# --------------------------------------------------------------------------------------------------- the layer


def spatial_layers(model: nn.Module, size: int) -> list[str]:
    """Names of the modules whose output is a spatial feature map (N, C, h, w) with h x w > 1, in the order they
    finish during a forward pass on a (1, 3, size, size) image (so a block comes after the layers inside it; a
    module called more than once, such as a shared pooling layer, at its last call, which Grad-CAM then reads)."""
    seen: list[str] = []
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if torch.is_tensor(output) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
                seen.append(name)

        return hook

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=_device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(reversed(seen)))[::-1]  # a module called twice counts once, at its last finish


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def gradcam_layer(model: nn.Module, size: int, layer: str | None = None) -> str:
    """The layer Grad-CAM reads: `layer` when given (checked), else the last spatial feature map."""
    names = dict(model.named_modules())
    candidates = spatial_layers(model, size)
    if layer is not None:
        if layer not in names or not layer:
            near = ", ".join(candidates[-4:]) or "none"
            raise CifarCnnError(f"--layer {layer!r}: the model has no such module; its last spatial layers are {near}")
        if layer not in candidates:
            raise CifarCnnError(
                f"--layer {layer!r} does not output a spatial feature map (N, C, h, w), so Grad-CAM cannot use it; "
                f"pick one of {', '.join(candidates[-4:]) or 'none'}, or use --method saliency"
            )
        return layer
    if not candidates:
        raise CifarCnnError(
            "this model has no spatial feature map (N, C, h, w) for Grad-CAM; use --method saliency or "
            "integrated-gradients"
        )
    return candidates[-1]


# --------------------------------------------------------------------------------------------------- the methods


def _scale(maps: torch.Tensor) -> np.ndarray:
    """Non-negative maps (N, H, W), each divided by its largest value (all-zero maps stay zero), as float32."""
    peak = maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    return (maps / peak).clamp(0, 1).float().cpu().numpy()


def _scores(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(x).float().gather(1, targets[:, None]).sum()


def gradcam(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: str) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) for normalized images x (N, 3, H, W), not yet scaled."""
    module = dict(model.named_modules())[layer]
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.enable_grad():
            score = _scores(model, x, targets)
            activation = captured[-1]
            (grad,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.float()).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()


def saliency(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|d score / d x|, the largest over channels: (N, H, W)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_scores(model, x, targets), x)
    return grad.abs().amax(1)


def integrated_gradients(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, baseline: torch.Tensor, steps: int = IG_STEPS
) -> torch.Tensor:
    """Sum over channels of (x - x0) * mean gradient on the path x0 -> x, signed: (N, H, W)."""
    total = torch.zeros_like(x)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        point = (baseline + alpha * (x - baseline)).detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_scores(model, point, targets), point)
        total += grad
    return ((x - baseline) * total / steps).sum(1)  # signed: the caller keeps the positive part


# --------------------------------------------------------------------------------------------------- the explainer


@dataclass
class ExplanationReport:
    """One explanation per image that could be read (`path`, `label`, `probability`, `method`, `map`, and `png` when
    written), and one error per file or path that could not."""

    explanations: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"explanations": self.explanations, "errors": self.errors}


class Explainer:
    """Heat maps for a `Predictor`'s model, at its input size, for the class predict gives (or a chosen one)."""

    def __init__(self, predictor: Predictor, layer: str | None = None, batch_size: int = 64) -> None:
        self.predictor = predictor
        self.model = predictor.model
        self.size = predictor.input_size
        self.layer_override = layer
        self.batch_size = max(1, min(batch_size, predictor.batch_size))
        self._layer: str | None = None
        self._grains: dict[str, tuple[int, int]] = {}  # layer -> its output's h x w at the input size
        if layer is not None:
            self._layer = gradcam_layer(self.model, self.size, layer)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        layer: str | None = None,
        tta: str | None = None,
        threads: int | None = None,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> Explainer:
        return cls(Predictor.from_checkpoint(path, tta=tta, threads=threads, device=device), layer, batch_size)

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def layer(self) -> str:
        """The layer Grad-CAM reads (found on first use)."""
        if self._layer is None:
            self._layer = gradcam_layer(self.model, self.size)
        return self._layer

    def resolution(self, method: str) -> tuple[int, int]:
        """The h x w a method's maps are made at before any upsampling: Grad-CAM's layer's (one probe, in eval mode,
        remembered), else the input size."""
        if self.check_method(method) != "gradcam":
            return (self.size, self.size)
        layer = self.layer()
        if layer not in self._grains:
            module = dict(self.model.named_modules())[layer]
            shapes: list[tuple[int, int]] = []
            handle = module.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape[-2:])))
            was_training = self.model.training
            try:
                with torch.no_grad():
                    self.model.eval()(torch.zeros(1, 3, self.size, self.size, device=self.predictor.device))
            finally:
                handle.remove()
                self.model.train(was_training)
            self._grains[layer] = shapes[-1]
        return self._grains[layer]

    def check_method(self, method: str) -> str:
        """`method` if it is known and this model supports it (Grad-CAM needs a spatial feature map)."""
        check_choice(method, EXPLAIN_METHODS, "--method")
        if method == "gradcam":
            self.layer()
        return method

    def target_index(self, target: str | int | None) -> int | None:
        """A class given by name or index -> its index (None: predict's label)."""
        if target is None:
            return None
        names = self.classes
        if isinstance(target, str) and target in names:
            return names.index(target)
        text = str(target).strip()
        if text.isdecimal() and text.isascii() and int(text) < len(names):
            return int(text)
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise CifarCnnError(
            f"--target-class {str(target)[:40]!r} is not one of the model's classes ({shown}) "
            f"or an index 0..{len(names) - 1}"
        )

    def _batch_maps(self, images: np.ndarray, method: str, targets: np.ndarray) -> np.ndarray:
        p = self.predictor
        device = p.device
        x = normalize(torch.from_numpy(np.ascontiguousarray(images)).to(device), p.mean, p.std)
        held = x.shape[-2:]
        x = resize_batch(x, self.size)  # images held smaller than the model's input (a data set's split) upscaled
        t = torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(device)
        if method == "gradcam":
            raw = gradcam(self.model, x, t, self.layer())
        elif method == "saliency":
            raw = saliency(self.model, x, t)
        else:
            grey = torch.full((1, 3, self.size, self.size), GREY, dtype=torch.uint8, device=device)
            raw = integrated_gradients(self.model, x, t, normalize(grey, p.mean, p.std))
        if raw.shape[-2:] != held:  # the map over the image as it was given
            raw = F.interpolate(raw[:, None].float(), size=tuple(held), mode="bilinear", align_corners=False)[:, 0]
        return _scale(raw.clamp(min=0))

    def maps(self, images: np.ndarray, method: str = "gradcam", targets: Sequence[int] | None = None) -> np.ndarray:
        """Float32 maps (N, H, W) in [0, 1] for uint8 images (N, 3, H, W) (decoded as predict decodes them: H = W =
        the model's input size; smaller images, as a data set's split may hold them, are upscaled for the model and
        their maps scaled back), for `targets` (class indices; default: predict's label of each image)."""
        self.check_method(method)
        images = np.asarray(images)
        if targets is None:
            targets = self.predictor.logits(images).argmax(1)
        targets = np.asarray(targets, dtype=np.int64)
        was_training = self.model.training
        self.model.eval()
        try:
            out = [
                self._batch_maps(images[i : i + self.batch_size], method, targets[i : i + self.batch_size])
                for i in range(0, len(images), self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.size, self.size), np.float32)

    def explain(
        self, images: np.ndarray, method: str = "gradcam", target: str | int | None = None, top_k: int = 3
    ) -> list[dict[str, Any]]:
        """For uint8 images (N, 3, S, S): predict's rows (label, probability, top_k) with the explained class
        (`target`, its probability) and the map (S, S) as a float32 array under `map`."""
        rows = self.predictor.predict(images, top_k=top_k)
        index = self.target_index(target)
        targets = [index if index is not None else self.classes.index(r["label"]) for r in rows]
        maps = self.maps(images, method, targets)
        probs = self.predictor.probabilities(images) if index is not None else None
        for i, (row, m) in enumerate(zip(rows, maps)):
            row["method"] = method
            row["target"] = self.classes[targets[i]]
            row["target_probability"] = float(probs[i, targets[i]]) if probs is not None else row["probability"]
            row["map"] = m
        return rows

    def explain_files(
        self, paths: Iterable[str | Path], method: str = "gradcam", target: str | int | None = None
    ) -> tuple[ExplanationReport, list[np.ndarray]]:
        """Explain files and folders as predict reads them; returns the report (maps as float32 arrays) and the
        decoded images, in the report's order. Unreadable files become errors."""
        self.check_method(method)
        self.target_index(target)
        files, errors = find_images(paths)
        report = ExplanationReport(errors=errors)
        images: list[np.ndarray] = []
        for start in range(0, len(files), self.batch_size):
            decoded, names = self.predictor.decode_files(files[start : start + self.batch_size], report.errors)
            if not decoded:
                continue
            batch = np.stack(decoded)
            for name, row in zip(names, self.explain(batch, method, target)):
                report.explanations.append({"path": name, **row})
            images.extend(decoded)
        return report, images


# --------------------------------------------------------------------------------------------------- faithfulness


def top_mask(maps: np.ndarray, fraction: float = DELETE_FRACTION, seed: int = 0) -> np.ndarray:
    """Boolean masks (N, H, W) of the round(fraction * H * W) pixels each map ranks highest. Ties are broken at random
    (seeded): pixels a map leaves at 0 (ReLU, a positive part) are equal, and taking them in raster order would grey
    a band at the top of the image."""
    n, h, w = maps.shape
    k = int(round(fraction * h * w))
    tiebreak = np.random.default_rng(seed).random((n, h * w))
    order = np.lexsort((tiebreak, -maps.reshape(n, -1)), axis=-1)[:, :k]
    mask = np.zeros((n, h * w), dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(n, h, w)


def grey_out(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Copies of uint8 images (N, 3, H, W) with the masked pixels set to grey (128) in every channel."""
    out = images.copy()
    out[np.broadcast_to(masks[:, None], out.shape)] = GREY
    return out


def random_maps(n: int, size: int, seed: int = 0, resolution: tuple[int, int] | None = None) -> np.ndarray:
    """Uniform noise maps (n, size, size): greying their top pixels greys a random set. With `resolution` (h, w)
    smaller than size, the noise is drawn at h x w and upsampled bilinearly as Grad-CAM's maps are, so the random set
    is made of regions of the same grain as such a map's."""
    h, w = resolution or (size, size)
    noise = np.random.default_rng(seed).random((n, h, w), dtype=np.float32)
    if (h, w) == (size, size):
        return noise
    up = F.interpolate(torch.from_numpy(noise)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


def surrogate_maps(maps: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each map's phase-randomized surrogate (Theiler et al., 1992): the same power spectrum, so the same spatial
    structure (blobs of the same size for Grad-CAM, fine grain for gradients), with random phases, so it is about
    nothing in the image. Greying its top pixels greys a random set shaped like the map's own."""
    n, h, w = maps.shape
    centred = maps - maps.mean(axis=(1, 2), keepdims=True)
    amplitude = np.abs(np.fft.rfft2(centred))
    phase = np.angle(np.fft.rfft2(np.random.default_rng(seed).standard_normal((n, h, w))))
    return np.fft.irfft2(amplitude * np.exp(1j * phase), s=(h, w)).astype(np.float32)


def centre_map(size: int) -> np.ndarray:
    """One map for every image: a Gaussian bump at the centre (sigma = size / 4), the 'objects sit in the middle'
    prior that a useful explanation must beat."""
    r = np.arange(size) - (size - 1) / 2
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    return np.exp(-d2 / (2 * (size / 4) ** 2)).astype(np.float32)


def in_blocks(maps: np.ndarray, block: int) -> np.ndarray:
    """Maps averaged over block x block squares (each pixel gets its square's mean), with a tiny fixed ramp that
    breaks ties between equal squares in raster order; block 1 leaves the maps as they are."""
    if block <= 1:
        return maps
    n, h, w = maps.shape
    if h % block or w % block:
        raise CifarCnnError(f"the maps' size {h}x{w} is not a multiple of the block size {block}")
    means = maps.reshape(n, h // block, block, w // block, block).mean((2, 4))
    means = means - 1e-9 * np.arange(means[0].size, dtype=np.float64).reshape(means.shape[1:])
    return np.repeat(np.repeat(means, block, 1), block, 2)


def deletion_drop(
    predictor: Predictor,
    images: np.ndarray,
    maps: np.ndarray,
    fraction: float = DELETE_FRACTION,
    block: int = 1,
    before: np.ndarray | None = None,
) -> float:
    """Mean fall of predict's probability for each image's predicted class when the pixels `maps` ranks highest
    (`fraction` of them; with `block` > 1, whole block x block squares ranked by their mean) are greyed, in
    probability points (0..100). `before`: predict's probabilities of the untouched images, when already known."""
    before = predictor.probabilities(images) if before is None else before
    labels = before.argmax(1)
    after = predictor.probabilities(grey_out(images, top_mask(in_blocks(maps, block), fraction)))
    rows = np.arange(len(images))
    return float(100 * (before[rows, labels] - after[rows, labels]).mean())


class DeletionBaselines:
    """What the deletion test measures once per set of images and reuses for every method: predict's probabilities
    of the untouched images and the drop of each baseline (random maps at a grain, the centre map). Bound to those
    images (checked by a digest), so it cannot give another set's figures."""

    def __init__(self, predictor: Predictor, images: np.ndarray) -> None:
        self.predictor = predictor
        self.digest = _digest(images)
        self.before = predictor.probabilities(images)
        self.drops: dict[tuple[Any, ...], float] = {}

    def drop(self, images: np.ndarray, key: tuple[Any, ...], make: Callable[[], np.ndarray], **how: Any) -> float:
        """The drop of the baseline `key` (built by `make` on first use), with `how` (fraction, block)."""
        if _digest(images) != self.digest:
            raise ValueError("DeletionBaselines: these are not the images its figures were measured on")
        key = (*key, *sorted(how.items()))
        if key not in self.drops:
            self.drops[key] = deletion_drop(self.predictor, images, make(), before=self.before, **how)
        return self.drops[key]


def _digest(images: np.ndarray) -> str:
    data = np.ascontiguousarray(images)
    return hashlib.sha1(data.tobytes()).hexdigest() + str(data.shape)


def deletion_test(
    explainer: Explainer,
    images: np.ndarray,
    method: str,
    fraction: float = DELETE_FRACTION,
    seed: int = 0,
    maps: np.ndarray | None = None,
    block: int = 1,
    resolution: tuple[int, int] | None = None,
    baselines: DeletionBaselines | None = None,
) -> dict[str, Any]:
    """The deletion test for one method on uint8 images: the probability drop when the map's top `fraction` of
    pixels are greyed, against a random `fraction` shaped like the map's own (its `surrogate_maps`: `margin`, the
    test's verdict), against a random fraction drawn at the map's resolution (`margin_vs_grain`), random single
    pixels (`margin_vs_pixels`), a centre-weighted map (`margin_vs_centre`) and the next image's map
    (`margin_vs_other_image`), in points (higher: more faithful). The resolution is the method's
    (`Explainer.resolution`); `maps` passes maps computed elsewhere, with their `resolution` (default: single
    pixels), as a test does with noise to show the test can tell. `block` > 1 deletes block x block squares instead
    of pixels, for the map and all baselines alike. `baselines` reuses what was measured on these images before."""
    if maps is None:
        maps = explainer.maps(images, method)
        resolution = explainer.resolution(method)
    size = maps.shape[-1]
    grain = tuple(min(int(r), size) for r in (resolution or (size, size)))
    known = baselines or DeletionBaselines(explainer.predictor, images)
    how = dict(fraction=fraction, block=block)
    drop = deletion_drop(explainer.predictor, images, maps, before=known.before, **how)
    shaped = deletion_drop(explainer.predictor, images, surrogate_maps(maps, seed), before=known.before, **how)
    at_grain = known.drop(images, ("random", grain, seed), lambda: random_maps(len(images), size, seed, grain), **how)
    pixels = known.drop(images, ("random", (size, size), seed), lambda: random_maps(len(images), size, seed), **how)
    centre = known.drop(images, ("centre",), lambda: np.broadcast_to(centre_map(size), maps.shape), **how)
    other = deletion_drop(explainer.predictor, images, np.roll(maps, 1, axis=0), before=known.before, **how)
    return {
        "method": method,
        "num_images": int(len(images)),
        "fraction": fraction,
        "block": block,
        "resolution": list(grain),
        "drop": drop,
        "surrogate_drop": shaped,
        "random_drop": at_grain,
        "pixel_random_drop": pixels,
        "centre_drop": centre,
        "other_image_drop": other,
        "margin": drop - shaped,
        "margin_vs_grain": drop - at_grain,
        "margin_vs_pixels": drop - pixels,
        "margin_vs_centre": drop - centre,
        "margin_vs_other_image": drop - other,
    }


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation between maps a[i] and b[i] (average ranks for ties), one value per image; a
    constant map (no ranking at all) correlates 0 with anything."""

    def ranks(m: np.ndarray) -> np.ndarray:
        flat = m.reshape(len(m), -1)
        out = np.empty_like(flat, dtype=np.float64)
        for i, row in enumerate(flat):
            _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
            ends = np.cumsum(counts)
            out[i] = (ends - (counts - 1) / 2.0)[inverse]
        return out

    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1), 0.0)


def randomized_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of `model` with every weight re-initialized (each module's own reset_parameters, seeded)."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return clone.eval()


def randomization_check(
    explainer: Explainer,
    images: np.ndarray,
    method: str,
    seed: int = 0,
    map_fn: Callable[[Explainer, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Spearman rank correlation between the maps of the model and of a re-initialized copy, for the same target
    classes: near 1 means the map does not depend on what the model learned. `map_fn(explainer, images, targets)`
    computes maps another way (a test gives one that ignores the model, to show the check can tell)."""
    targets = explainer.predictor.logits(images).argmax(1)
    compute = map_fn or (lambda ex, x, t: ex.maps(x, method, t))
    trained = compute(explainer, images, targets)
    p = explainer.predictor
    twin = Predictor(randomized_model(p.model, seed), p.classes, p.mean, p.std, p.input_size, device=p.device)
    rho = rank_correlation(trained, compute(Explainer(twin, explainer.layer_override), images, targets))
    return {
        "method": method,
        "num_images": int(len(images)),
        "spearman_mean": float(rho.mean()),
        "spearman_median": float(np.median(rho)),
    }


# --------------------------------------------------------------------------------------------------- pictures


def heat_colors(maps: np.ndarray) -> np.ndarray:
    """Maps in [0, 1] (..., H, W) -> RGB uint8 (..., H, W, 3) with the 'inferno' colour map."""
    from matplotlib import colormaps  # imported only when a picture is drawn

    return (colormaps["inferno"](np.clip(maps, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A uint8 image (3, H, W) with its map (H, W) in [0, 1] blended on top: (H, W, 3) uint8."""
    rgb = image.transpose(1, 2, 0).astype(np.float32)
    colours = heat_colors(heat).astype(np.float32)
    return (rgb * (1 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)


def explanation_png(image: np.ndarray, row: dict[str, Any], path: Path, scale: int = 0) -> None:
    """One PNG: the image, the map over it, and predict's top-3 classes with probabilities (atomically)."""
    from PIL import Image, ImageDraw

    from .atomic import atomic_write_bytes

    size = image.shape[-1]
    scale = scale or max(1, 192 // size)
    side = size * scale
    base = Image.fromarray(image.transpose(1, 2, 0)).resize((side, side), Image.NEAREST)
    heat = Image.fromarray(overlay(image, np.asarray(row["map"], dtype=np.float32))).resize((side, side), Image.NEAREST)
    text_w = 220
    canvas = Image.new("RGB", (2 * side + text_w + 24, max(side, 110) + 16), "white")
    canvas.paste(base, (8, 8))
    canvas.paste(heat, (side + 16, 8))
    draw = ImageDraw.Draw(canvas)
    x0, y = 2 * side + 24, 10
    draw.text((x0, y), f"{row['method']} for {row.get('target', row['label'])}", fill="black")
    for t in row.get("top_k", [])[:3]:
        y += 22
        bar = int(150 * t["probability"])
        draw.rectangle((x0, y + 12, x0 + bar, y + 18), fill=(31, 119, 180))
        draw.text((x0, y), f"{t['label'][:22]}  {100 * t['probability']:.1f}%", fill="black")
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
