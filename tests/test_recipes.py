"""The named training presets: the seed recipe is the teaching notebook's set-up, and every recipe is a valid
config that holds exactly the recipe's values."""

from __future__ import annotations

import pytest

from cifar_cnn import resolve_config
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.recipes import RECIPES, recipe_values


def test_seed_recipe_is_the_notebook() -> None:
    c = resolve_config("seed")
    assert (c.model, c.optimizer, c.lr, c.batch_size, c.momentum, c.val_split) == (
        "seed_cnn",
        "sgd",
        0.01,
        20,
        0.0,
        0.2,
    )
    assert c.mean == (0.5, 0.5, 0.5) and c.std == (0.5, 0.5, 0.5)
    assert not c.flip and c.translate == 0 and c.cutout == 0 and c.model_args == {"dropout": 0.25}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves_to_its_values(name: str) -> None:
    c = resolve_config(name)
    assert c.recipe == name
    held = c.to_dict()
    for key, value in recipe_values(name).items():
        want = [float(v) for v in value] if key in ("mean", "std") else value
        assert held[key] == want, key


def test_unknown_recipe_names_the_recipes() -> None:
    with pytest.raises(CifarCnnError, match="unknown recipe 'fastest'.*seed.*quick"):
        resolve_config("fastest")
