"""Model registry and the architectures registered in it (importing this package registers them all, and the hf:
family of Hugging Face image classifiers, whose transformers import waits until one is used)."""

from . import airbench, hf, resnet, seed_cnn  # noqa: F401  (importing registers them)
from .registry import (
    ModelFamily,
    ModelInfo,
    create_model,
    family_of,
    list_families,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "ModelFamily",
    "ModelInfo",
    "create_model",
    "family_of",
    "list_families",
    "list_models",
    "model_info",
    "register_model",
]
