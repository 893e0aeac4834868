"""Named presets of the one training engine. A recipe is only a set of config values; config file and command line
override them. Each says which images it trains on and how best.pt is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data.sources import CIFAR10_MEAN, CIFAR10_STD
from .errors import CifarCnnError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str  # one line: what it is for, its split and its rule for best.pt
    values: dict[str, Any]


RECIPES: dict[str, Recipe] = {}


def _add(name: str, summary: str, **values: Any) -> None:
    RECIPES[name] = Recipe(name, summary, values)


_add(
    "seed",
    "the teaching notebook: seed_cnn, SGD lr 0.01, batch 20, 10 epochs, inputs in [-1, 1], no augmentation; "
    "trains on 80% of the training images, best.pt = lowest validation loss",
    model="seed_cnn",
    model_args={"dropout": 0.25},
    epochs=10,
    batch_size=20,
    optimizer="sgd",
    lr=0.01,
    momentum=0.0,
    nesterov=False,
    weight_decay=0.0,
    schedule="constant",
    val_split=0.2,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    flip=False,
    translate=0,
    cutout=0,
    tta="none",
)


# The airbench-style recipes share one optimizer set-up (values found by a sweep of 40 variants x 3-6 seeds on the JPEG
# copy; the README's Recipes section gives the figures). The loss is summed over the batch, so `lr` is per image;
# conv filters use Muon.


def _airbench(batch_size: int, **values: Any) -> dict[str, Any]:
    base = dict(
        model="airbench",
        batch_size=batch_size,
        optimizer="muon",
        lr=0.053,  # Nesterov SGD for BN shifts and the whitening bias
        head_lr_factor=0.67 / 0.053,  # the head learns ~13x faster
        momentum=0.85,
        nesterov=True,
        weight_decay=2e-6 * batch_size / 0.053,  # 2e-6 per image and step, at the base LR
        muon_lr=0.24,
        muon_momentum=0.6,
        early_params_epochs=3.0,
        label_smoothing=0.2,
        loss_reduction="sum",
        schedule="linear",
        warmup_epochs=0.0,
        final_lr_fraction=0.0,
        val_split=0.0,  # trains on all 50,000 images: best.pt is the final weights (and says so)
        drop_last=True,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        flip=False,
        alternate_flip=True,
        translate=2,
        cutout=0,
        tta="flip-translate",
        eval_batch_size=2000,
    )
    base.update(values)
    return base


_add(
    "instant",
    "the notebook's ~67% in about 12 s on a 2-core CPU: small airbench net on 2x2 patches (widths 32-128-128, depth 3, "
    "16 x 16 after the whitening layer), one pass over at most 25,000 training images, batch 500; best.pt = final "
    "weights; flip TTA",
    **_airbench(
        500,
        model_args={"widths": [32, 128, 128], "depth": 3, "whiten_stride": 2},
        epochs=1,
        max_train_images=25000,
        tta="flip",
    ),
)
_add(
    "quick",
    "about 88.6% in about 3 minutes on a CPU: small airbench net (widths 32-128-128, depth 3), 6 epochs, batch 1000; "
    "trains on all 50,000 images, best.pt = final weights; flip TTA",
    # flip-only TTA: the 6-view TTA adds ~15 s on 2 CPU cores for +0.2 points, and quick has a 3-minute budget
    **_airbench(1000, model_args={"widths": [32, 128, 128], "depth": 3}, epochs=6, tta="flip"),
)
_add(
    "fast",
    "about 91% in minutes on a CPU: airbench net (widths 64-256-256), 12 epochs, batch 2000; trains on all "
    "50,000 images, best.pt = final weights; flip+translate TTA",
    **_airbench(2000, model_args={"widths": [64, 256, 256], "depth": 2}, epochs=12),
)
_add(
    "accurate",
    "about 93% (hours on a CPU, a minute on a GPU): wide airbench net (widths 128-384-512, depth 3), 40 epochs, "
    "batch 1000, translate 4, cutout 12; trains on all 50,000 images, best.pt = final weights; flip+translate TTA",
    **_airbench(1000, model_args={"widths": [128, 384, 512], "depth": 3}, epochs=40, translate=4, cutout=12),
)


def recipe_values(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise CifarCnnError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return dict(RECIPES[name].values)


def list_recipes() -> list[Recipe]:
    return list(RECIPES.values())
