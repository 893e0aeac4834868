"""Training configuration: defaults < recipe < config file < command line, unknown keys and wrong types refused,
and a recipe's model arguments dropped when another model is chosen."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_cnn import resolve_config
from cifar_cnn.errors import CifarCnnError


def test_config_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.5\nbatch_size: 64\ntune: {trials: 3}\n")
    c = resolve_config("seed", f, {"lr": 0.1})
    assert (c.epochs, c.lr, c.batch_size, c.optimizer) == (7, 0.1, 64, "sgd")  # cli > file > recipe
    t = tmp_path / "c.toml"
    t.write_text('optimizer = "adamw"\nmean = [0.1, 0.2, 0.3]\n')
    c = resolve_config(None, t, {})
    assert c.optimizer == "adamw" and c.mean == (0.1, 0.2, 0.3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(CifarCnnError, match="unknown config key.*epoch"):
        resolve_config(None, bad, {})
    bad.write_text("epochs: three\n")
    with pytest.raises(CifarCnnError, match="'epochs' must be an integer"):
        resolve_config(None, bad, {})
    with pytest.raises(CifarCnnError, match="must be one of"):
        resolve_config(None, None, {"optimizer": "rmsprop"})


def test_switching_model_drops_the_recipes_model_args(tmp_path: Path) -> None:
    c = resolve_config("seed", None, {"model": "resnet18"})
    assert c.model == "resnet18" and c.model_args == {}  # seed_cnn's dropout would not fit resnet18
    c = resolve_config("seed", None, {"model": "resnet18", "model_args": {"width": 8}})
    assert c.model_args == {"width": 8}
    f = tmp_path / "c.yaml"
    f.write_text("model: airbench\n")
    assert resolve_config("seed", f, {}).model_args == {}
    assert resolve_config("seed", None, {"epochs": 2}).model_args == {"dropout": 0.25}  # same model: kept


def test_quoted_values_stay_short() -> None:
    """Every value an error message quotes goes through config.quoted: a prefix, whatever the value."""
    from cifar_cnn.config import quoted

    loop: list = []
    loop.append(loop)  # a list holding itself (YAML: &a [*a])
    assert quoted("x" * 100_000) == "'" + "x" * 59 + "..."
    assert quoted(10**5000).startswith("<a int too large") and len(quoted(loop)) <= 63
    assert quoted([[1] * 9] * 10**6) == "<a list too large to show>"
    assert quoted(0.5) == "0.5"


def test_limits_of_values_from_the_command_line() -> None:
    with pytest.raises(CifarCnnError, match=r"'seed' must be below 2\*\*63"):
        resolve_config(None, None, {"seed": 10**30})
    with pytest.raises(CifarCnnError, match="'lr' must be a number below 1e308"):
        resolve_config(None, None, {"lr": 10**400})
    with pytest.raises(CifarCnnError, match=r"image_size \(--image-size\) must be 0 \(the model's\) or 8\.\.1024"):
        resolve_config(None, None, {"model": "resnet18", "image_size": 5000})
    with pytest.raises(CifarCnnError, match="'recipe' must be a recipe name"):
        resolve_config(None, None, {"recipe": ["seed"]})
    assert resolve_config(None, None, {"model": "resnet18", "image_size": 1024}).image_size == 1024
