"""Model registry and the architectures registered in it (importing this package registers them all)."""

from . import airbench, resnet, seed_cnn  # noqa: F401  (importing registers them)
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
