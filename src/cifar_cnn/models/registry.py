"""Model registry: architectures registered by name, created by name.

Each entry keeps the defaults that belong with the architecture (input size, normalization) beside the builder, so a
checkpoint only needs the name and the arguments to rebuild the network.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..data.sources import CIFAR10_MEAN, CIFAR10_STD
from ..errors import CifarCnnError


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of one architecture."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: int  # side of the square input image, in pixels
    mean: tuple[float, float, float]  # default per-channel normalization mean (of images scaled to 0..1)
    std: tuple[float, float, float]  # default per-channel normalization std
    description: str
    any_input_size: bool = False  # True: works with any image size (e.g. global pooling); else only input_size


_REGISTRY: dict[str, ModelInfo] = {}


@dataclass(frozen=True)
class ModelFamily:
    """Models named by a prefix rather than registered one by one (`hf:ORG/NAME`): `info(name, record)` and
    `build(num_classes, name=, classes=, pretrained=, record=)` answer for every name with the prefix. `record` is
    what a checkpoint saved of the model (its `model.hf` entry), so a checkpoint needs no files to rebuild it."""

    prefix: str
    info: Callable[..., ModelInfo]
    build: Callable[..., nn.Module]
    description: str


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(
    prefix: str, info: Callable[..., ModelInfo], build: Callable[..., nn.Module], description: str
) -> None:
    """Register a family of models named `prefix` + a reference (see ModelFamily)."""
    if prefix in _FAMILIES:
        raise ValueError(f"model family {prefix!r} is already registered")
    _FAMILIES[prefix] = ModelFamily(prefix, info, build, description)


def family_of(name: str) -> ModelFamily | None:
    """The family a model name belongs to, or None for a registered model."""
    return next((f for p, f in _FAMILIES.items() if name.startswith(p)), None)


def list_families() -> list[ModelFamily]:
    return [_FAMILIES[p] for p in sorted(_FAMILIES)]


def register_model(
    name: str,
    *,
    input_size: int = 32,
    mean: tuple[float, float, float] = CIFAR10_MEAN,
    std: tuple[float, float, float] = CIFAR10_STD,
    any_input_size: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a builder `fn(num_classes=..., **kwargs) -> nn.Module` under `name`.

    `any_input_size` says the network accepts images of any side, not only `input_size`.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        doc = (inspect.getdoc(builder) or "").strip().splitlines()
        _REGISTRY[name] = ModelInfo(
            name, builder, input_size, tuple(mean), tuple(std), doc[0] if doc else "", any_input_size
        )
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str, record: dict | None = None) -> ModelInfo:
    """The registry entry for `name` (of a family: from its files, or from a checkpoint's `record` of the model); a
    clear error naming the choices if there is none."""
    family = family_of(name)
    if family is not None:
        return family.info(name, record)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CifarCnnError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create_model(
    name: str,
    num_classes: int = 10,
    *,
    classes: list[str] | None = None,
    pretrained: bool = False,
    record: dict | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build the model `name` with `num_classes` outputs; unknown keyword arguments are an error.

    For a family's model (hf:...): `classes` names the outputs (its own head is kept when they are its labels),
    `pretrained` loads its published weights, `record` rebuilds it from a checkpoint. Registered models have no
    pretrained weights (start them from a checkpoint with --init-from)."""
    family = family_of(name)
    if family is not None:
        if kwargs:
            raise CifarCnnError(f"model {name!r} takes no model arguments (got {', '.join(sorted(kwargs))})")
        return family.build(num_classes, name=name, classes=classes, pretrained=pretrained, record=record)
    info = model_info(name)
    params = inspect.signature(info.builder).parameters
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        accepted = sorted(k for k in params if k != "num_classes")
        raise CifarCnnError(
            f"model {name!r} takes no argument {', '.join(unknown)}; it accepts: {', '.join(accepted) or 'none'}"
        )
    try:
        return info.builder(num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CifarCnnError(f"model {name!r}: bad arguments {kwargs}: {exc}") from None
