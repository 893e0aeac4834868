"""One epoch of training (`train_one_epoch`) and what it needs: the optimizer and the LR schedule of a config.

A step: set each parameter group's LR from the schedule, forward under autocast, cross-entropy in float32, backward
(through the fp16 loss scaler when there is one), optimizer step, running totals. Everything else a run does around
the steps (EMA, progress, probes, stop requests) is the caller's `on_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import CLASS_WEIGHTS, check_choice
from ..config import TrainConfig
from ..data.pipeline import TensorLoader
from ..device import autocast
from ..errors import CifarCnnError
from ..hooks import EpochTotals
from ..optim import build_optimizer
from ..schedules import lr_multiplier


class DivergenceError(CifarCnnError):
    """The loss became NaN or infinite."""


def optimizer_for(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> Any:
    """The optimizer a config asks for (see optim.build_optimizer for the parameter groups)."""
    return build_optimizer(
        model,
        config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        head_lr_factor=config.head_lr_factor,
        muon_lr=config.muon_lr,
        muon_momentum=config.muon_momentum,
        early_steps=round(config.early_params_epochs * steps_per_epoch),
    )


def make_lr_fn(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Step -> multiplier of the peak LR, for this config."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    step_size = max(1, round(config.step_epochs * steps_per_epoch))

    def fn(step: int) -> float:
        return lr_multiplier(
            step, total, config.schedule, warmup, config.final_lr_fraction, step_size, config.step_gamma
        )

    return fn


def loss_weights(mode: str, labels: np.ndarray, num_classes: int, device: torch.device | str) -> torch.Tensor | None:
    """Per-class weights of the training loss (float32 on `device`), or None for unweighted ("none").

    "auto": inverse class frequency, w_c = N / (C * n_c) for N training images, C classes and n_c images of class c,
    so every class carries the same total weight and the mean weight over the training images is 1 (the loss keeps
    its scale, and so does the LR that suits it).
    """
    check_choice(mode, CLASS_WEIGHTS, "class_weights")
    if mode == "none":
        return None
    labels = np.asarray(labels).astype(np.int64, copy=False)
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise CifarCnnError(f"a training label is {labels.max()}, but there are only {num_classes} classes")
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise CifarCnnError(
            f"class_weights=auto: class index {', '.join(map(str, empty))} has no training images, so its inverse "
            "frequency is infinite: remove the class or add training images of it (or train with class_weights=none)"
        )
    weights = len(labels) / (num_classes * counts.astype(np.float64))
    return torch.tensor(weights, dtype=torch.float32, device=device)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its small gradients underflow to zero otherwise); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def set_lrs(optimizer: Any, peak_lrs: list[float], global_step: int, scale: float) -> None:
    """Each group at its peak LR times the schedule's multiplier; 'early' groups decay linearly to 0 on their own."""
    for group, peak in zip(optimizer.param_groups, peak_lrs):
        decay = group.get("decay_steps")
        group["lr"] = peak * (max(0.0, 1.0 - global_step / decay) if decay else scale)


def backward_and_step(optimizer: Any, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> bool:
    """Backward and optimizer step; with a loss scaler a step whose gradients overflowed is skipped (and the scale
    falls). Returns whether the weights were updated."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale  # the scale only falls when the step was skipped


def batch_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch: cross-entropy, optionally class-weighted; a weighted "mean" is the weighted sum
    over the batch's image count (see `train_one_epoch` for why not over the sum of the weights)."""
    if class_weights is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction=reduction)
    total = F.cross_entropy(logits, y, weight=class_weights, label_smoothing=label_smoothing, reduction="sum")
    return total / len(y) if reduction == "mean" else total


def train_one_epoch(
    model: nn.Module,
    loader: TensorLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    lr_fn: Callable[[int], float],
    peak_lrs: list[float],
    device: torch.device,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    loss_reduction: str = "mean",
    channels_last: bool = False,
    start_step: int = 0,
    totals: EpochTotals | None = None,
    on_step: Callable[[int, EpochTotals], bool] | None = None,
    loss_weight: Callable[[int, int], float] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    class_weights: torch.Tensor | None = None,
) -> tuple[EpochTotals, int]:
    """Train over one epoch's batches from `start_step`; returns the epoch's totals and the next step to run.

    `on_step(step, totals)` is called after every optimizer step; if it returns True the epoch stops early (an
    interrupt), and the returned step is where a resumed run continues. `loss_weight(step, n)` scales the loss of a
    batch of n images before backward (distributed shards; see cifar_cnn.distributed). `scaler` (fp16) scales the
    loss for backward and skips steps whose gradients overflowed.

    `class_weights` (see `loss_weights`) weights each image's cross-entropy by its class's weight. With the mean
    reduction the weighted sum is divided by the batch's image count, not by the sum of its weights (PyTorch's
    weighted mean): the count is what the distributed `loss_weight` rescales by, so N processes stay exactly the one
    process run, and as the weights average 1 over the training set the loss keeps its scale (and is an unbiased
    estimate of the weighted loss of the whole set). The epoch's reported training loss is then this weighted loss.
    """
    model.train()
    totals = totals or EpochTotals()
    steps_per_epoch = len(loader)
    for step, x, y in loader.batches(epoch, start_step):
        global_step = epoch * steps_per_epoch + step
        set_lrs(optimizer, peak_lrs, global_step, lr_fn(global_step))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        loss = batch_loss(logits.float(), y, label_smoothing, loss_reduction, class_weights)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                "training diverged: lower the learning rate (--lr) and train again"
            )
        backward_and_step(optimizer, loss * loss_weight(step, len(y)) if loss_weight is not None else loss, scaler)
        totals.loss_sum += loss.item() * (len(y) if loss_reduction == "mean" else 1)
        totals.correct += int((logits.argmax(1) == y).sum().item())
        totals.seen += len(y)
        if on_step is not None and on_step(step, totals):
            return totals, step + 1
    return totals, steps_per_epoch
