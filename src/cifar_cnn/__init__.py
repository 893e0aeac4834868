"""cifar-cnn: train, evaluate, explain, export and serve convolutional image classifiers, CIFAR-10 first.

The public API that the command line uses and a notebook can call too:

    from cifar_cnn import train, evaluate_checkpoint, load_checkpoint, create_model, list_models, resolve_config
"""

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from .config import TrainConfig, resolve_config  # noqa: E402
from .engine import evaluate_checkpoint, train  # noqa: E402
from .errors import CifarCnnError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402

__all__ = [
    "CifarCnnError",
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
]
