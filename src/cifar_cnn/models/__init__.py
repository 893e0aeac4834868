"""Model registry and the architectures registered in it (importing this package registers them all)."""

from . import seed_cnn  # noqa: F401  (registers seed_cnn)
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
