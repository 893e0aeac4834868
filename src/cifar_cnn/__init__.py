"""cifar-cnn: train, evaluate, explain, export and serve convolutional image classifiers, CIFAR-10 first.

The public API that the command line uses and a notebook can call too:

    from cifar_cnn import train, train_and_report, evaluate_checkpoint, load_checkpoint, create_model, resolve_config
"""

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# The names below are imported on first use (PEP 562), so that `import cifar_cnn` and torch-free parts such as
# `cifar-cnn predict --onnx` work where torch is not installed.
_LAZY = {
    "load_checkpoint": "checkpoint",
    "model_from_checkpoint": "checkpoint",
    "TrainConfig": "config",
    "resolve_config": "config",
    "evaluate_checkpoint": "evaluate",
    "train": "engine",
    "TrainResult": "engine",
    "train_and_report": "workflow",
    "EvalResult": "evaluate",
    "CifarCnnError": "errors",
    "evaluate": "evaluate",
    "create_model": "models",
    "list_models": "models",
    "register_model": "models",
}

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .config import TrainConfig, resolve_config
    from .engine import TrainResult, train
    from .errors import CifarCnnError
    from .evaluate import EvalResult, evaluate, evaluate_checkpoint
    from .models import create_model, list_models, register_model
    from .workflow import train_and_report


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CifarCnnError",
    "EvalResult",
    "TrainResult",
    "TrainConfig",
    "__version__",
    "create_model",
    "evaluate",
    "evaluate_checkpoint",
    "list_models",
    "load_checkpoint",
    "model_from_checkpoint",
    "register_model",
    "resolve_config",
    "train",
    "train_and_report",
]
