"""The closed sets of option values live in cifar_cnn.choices: check_choice accepts them and refuses anything else
with a message naming the option and the choices, and the config fields and the command line offer exactly them."""

from __future__ import annotations

import argparse

import pytest

from cifar_cnn.choices import (
    AUTO_AUGMENTS,
    CLASS_WEIGHTS,
    DEVICES,
    LABEL_SETS,
    LOSS_REDUCTIONS,
    NORMALIZE_MODES,
    OPTIMIZERS,
    PRECISIONS,
    SAMPLERS,
    SCHEDULES,
    STORAGE_MODES,
    TTA_MODES,
    check_choice,
)
from cifar_cnn.cli import build_parser
from cifar_cnn.config import FIELDS, field_choices
from cifar_cnn.errors import CifarCnnError

CONFIG_CHOICES = {
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "loss_reduction": LOSS_REDUCTIONS,
    "device": DEVICES,
    "precision": PRECISIONS,
    "tta": TTA_MODES,
    "normalize": NORMALIZE_MODES,
    "label_set": LABEL_SETS,
    "class_weights": CLASS_WEIGHTS,
    "sampler": SAMPLERS,
    "image_storage": STORAGE_MODES,
    "auto_augment": AUTO_AUGMENTS,
}


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_check_choice_accepts_the_choices_and_names_option_and_choices_when_refusing() -> None:
    for mode in TTA_MODES:
        assert check_choice(mode, TTA_MODES, "--tta") == mode
    with pytest.raises(CifarCnnError) as err:
        check_choice("mirror", TTA_MODES, "--tta")
    message = str(err.value)
    assert message.startswith("--tta must be one of") and "'mirror'" in message
    assert all(mode in message for mode in TTA_MODES)
    with pytest.raises(CifarCnnError, match=r"^precision must be one of auto, fp32, bf16, fp16, got 'FP32'$"):
        check_choice("FP32", PRECISIONS, "precision")  # case matters


def test_every_config_field_with_choices_uses_the_shared_tuples() -> None:
    with_choices = {name: field_choices(name) for name in FIELDS if field_choices(name) is not None}
    assert with_choices == CONFIG_CHOICES  # a new field with choices must take them from cifar_cnn.choices too
    assert field_choices("tta") == TTA_MODES and field_choices("precision") == PRECISIONS
    assert field_choices("device") == DEVICES and field_choices("schedule") == SCHEDULES
    assert field_choices("optimizer") == OPTIMIZERS


def test_the_command_line_offers_the_same_choices() -> None:
    evaluate = subcommand("evaluate")
    assert tuple(option(evaluate, "--tta").choices) == TTA_MODES
    assert tuple(option(evaluate, "--precision").choices) == PRECISIONS
    train = subcommand("train")
    for name, choices in CONFIG_CHOICES.items():
        flag = "--" + name.replace("_", "-")
        assert tuple(option(train, flag).choices) == choices, flag
