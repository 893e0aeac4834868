"""The training engine: `train()` runs a whole training into a run directory (see cifar_cnn.rundir for its files).

state.py         build a run's state: data, loader, model, EMA, optimizer, loss scaler, resume position
loop.py          one epoch of steps (`train_one_epoch`), the optimizer and LR schedule of a config
checkpointer.py  best.pt / last.pt payloads
run.py           `train()`: the fit loop, validation, checkpoints, the final test
"""

from ..hooks import EpochTotals
from .loop import DivergenceError, make_lr_fn, optimizer_for, train_one_epoch
from .run import TrainResult, train
from .state import resume_config

__all__ = [
    "DivergenceError",
    "EpochTotals",
    "TrainResult",
    "make_lr_fn",
    "optimizer_for",
    "resume_config",
    "train",
    "train_one_epoch",
]
