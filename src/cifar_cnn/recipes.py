"""Named presets of the one training engine. A recipe is only a set of config values; config file and command line
override them. Each says which images it trains on and how best.pt is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def recipe_values(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise CifarCnnError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return dict(RECIPES[name].values)


def list_recipes() -> list[Recipe]:
    return list(RECIPES.values())
