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


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`; a clear error naming the choices if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CifarCnnError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """Build the registered model `name` with `num_classes` outputs; unknown keyword arguments are an error."""
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
