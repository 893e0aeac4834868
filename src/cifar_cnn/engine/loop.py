"""One epoch of training (`train_one_epoch`) and what it needs: the optimizer and the LR schedule of a config.

A step: set each parameter group's LR from the schedule, forward under autocast, cross-entropy in float32, backward
(through the fp16 loss scaler when there is one), and every `accum_steps` batches an optimizer update (gradients
clipped first when asked), running totals; none of it waits for the device (see `train_one_epoch`). Everything else
a run does around the updates (EMA, progress, probes, stop requests) is the caller's `on_step`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import CLASS_WEIGHTS, check_choice
from ..config import TrainConfig
from ..data.augment import soft_target_cross_entropy
from ..data.pipeline import TensorLoader
from ..device import autocast
from ..errors import CifarCnnError
from ..hooks import EpochTotals
from ..optim import build_optimizer
from ..schedules import lr_multiplier


class DivergenceError(CifarCnnError):
    """The loss became NaN or infinite."""


def divergence(loss: torch.Tensor, x: torch.Tensor, epoch: int, step: int) -> DivergenceError:
    """Why the loss is not finite, with the advice that fits: NaN or infinite inputs come from the normalization
    (a std so small that pixels / std overflow, a NaN mean), not from the learning rate."""
    where = f"at epoch {epoch + 1}, step {step + 1}"
    if not bool(torch.isfinite(x).all()):
        return DivergenceError(
            f"the training images hold NaN or infinite values after normalization {where}: check the mean and std "
            "(--mean/--std, the config file's mean/std, or the checkpoint's; std must not be near 0)"
        )
    return DivergenceError(
        f"the training loss became {loss.item()} {where}; training diverged: lower the learning rate (--lr) and "
        "train again"
    )


class LossWatch:
    """Which step's loss first stopped being finite, recorded on the device so that a step never waits for it.

    The host reads the record (`check`) after an epoch's first update (a run that diverges at once fails at once),
    at its end, when it stops early, and otherwise at most once every `every_s` seconds: on a GPU the steps queue up
    ahead of the host instead of stopping at every loss. A non-finite loss is then reported with the step it
    happened at, its batch rebuilt from the loader to tell bad inputs from a too high learning rate."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self._first: torch.Tensor | None = None  # step of the first non-finite loss, or -1
        self._loss: torch.Tensor | None = None  # that loss
        self._last_check = time.perf_counter()

    def record(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        new = (self._first < 0) & ~torch.isfinite(loss)
        self._first = torch.where(new, step, self._first)
        self._loss = torch.where(new, loss, self._loss)

    def due(self) -> bool:
        return time.perf_counter() - self._last_check >= self.every_s

    def check(self, loader: Any, epoch: int) -> None:
        """Raise the DivergenceError of the first non-finite loss recorded so far, if any (one host sync)."""
        self._last_check = time.perf_counter()
        if self._first is None:
            return
        step = int(self._first)
        if step >= 0:
            _, x, _ = next(iter(loader.batches(epoch, step)))
            raise divergence(self._loss, x, epoch, step)


def updates_per_epoch(steps_per_epoch: int, accum_steps: int) -> int:
    """Optimizer updates in an epoch of `steps_per_epoch` batches, `accum_steps` batches per update (the last update
    of an epoch may take fewer)."""
    return -(-steps_per_epoch // max(1, accum_steps))


def optimizer_for(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> Any:
    """The optimizer a config asks for (see optim.build_optimizer for the parameter groups). With freeze_epochs the
    head is a group of its own, and the body's groups start after the frozen epochs, warming up again."""
    updates = updates_per_epoch(steps_per_epoch, config.accum_steps)
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
        early_steps=round(config.early_params_epochs * updates),
        body_start=config.freeze_epochs * updates,
        body_warmup=round(config.unfreeze_warmup_epochs * updates),
    )


def make_lr_fn(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Optimizer update -> multiplier of the peak LR, for this config (`steps_per_epoch` batches per epoch)."""
    steps_per_epoch = updates_per_epoch(steps_per_epoch, config.accum_steps)
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
    """Each group at its peak LR times the schedule's multiplier; 'early' groups decay linearly to 0 on their own;
    groups with a `start_step` (a body frozen for the first epochs) are at 0 before it, then warm up linearly over
    their `warmup_steps`."""
    for group, peak in zip(optimizer.param_groups, peak_lrs):
        decay = group.get("decay_steps")
        lr = peak * (max(0.0, 1.0 - global_step / decay) if decay else scale)
        start = group.get("start_step", 0)
        if start:
            lr *= 0.0 if global_step < start else min(1.0, (global_step - start + 1) / max(1, group["warmup_steps"]))
        group["lr"] = lr


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Gradients of `loss` added to the parameters' (through the fp16 loss scaler when there is one)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def apply_update(
    optimizer: Any, scaler: torch.amp.GradScaler | None, clip_grad: float = 0.0, report: bool = True
) -> bool:
    """The optimizer step on the accumulated gradients, their global L2 norm first clipped to `clip_grad` (0: off;
    after unscaling them, with fp16). With a loss scaler a step whose gradients overflowed is skipped. Returns
    whether the weights were updated (with `report`; reading the scale waits for the device, so the training loop
    does not ask, and returns True then; fp16's GradScaler.step itself reads whether the gradients overflowed)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if scaler is None:
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        return True
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scale = scaler.get_scale() if report else 0.0
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale if report else True


def batch_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch: cross-entropy, optionally class-weighted; a weighted "mean" is the weighted sum
    over the batch's image count (see `train_one_epoch` for why not over the sum of the weights). Soft targets (N, C)
    (mixup/cutmix, label smoothing already folded in) take the soft-target cross-entropy, weighted alike."""
    if y.ndim == 2:
        return soft_target_cross_entropy(logits, y, class_weights, reduction)
    if class_weights is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction=reduction)
    total = F.cross_entropy(logits, y, weight=class_weights, label_smoothing=label_smoothing, reduction="sum")
    return total / len(y) if reduction == "mean" else total


def accumulation_group(step: int, accum_steps: int, steps: int) -> tuple[int, int]:
    """(first, last) batch of the update that batch `step` belongs to: groups of `accum_steps` from the epoch's
    start, the last one shorter when the epoch's batches do not divide."""
    first = step - step % accum_steps
    return first, min(first + accum_steps, steps) - 1


def _share(loader: Any, step: int, group: tuple[int, int], reduction: str) -> float:
    """Batch `step`'s share of its update's loss: its images over the group's (a mean over all the group's images,
    the K-times larger batch's); 1 with the sum reduction."""
    if reduction == "sum" or group[0] == group[1]:
        return 1.0
    sizes = [loader.global_batch_size(s) for s in range(group[0], group[1] + 1)]
    return sizes[step - group[0]] / sum(sizes)


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
    accum_steps: int = 1,
    clip_grad: float = 0.0,
    set_mode: Callable[[nn.Module], None] | None = None,
) -> tuple[EpochTotals, int]:
    """Train over one epoch's batches from `start_step`; returns the epoch's totals and the next batch to run.

    Every `accum_steps` batches make one optimizer update (gradients accumulated, each batch's mean loss weighted by
    its share of the group's images: the update of the K-times larger batch; under DDP the batches before the last
    of a group skip the all-reduce). The LR schedule counts updates. `on_step(step, totals)` is called after every
    update; if it returns True the epoch stops there (an interrupt, always between updates, so a resumed run
    continues exactly), and the returned step is where it continues. `loss_weight(step, n)` scales the loss of a
    batch of n images before backward (distributed shards; see cifar_cnn.distributed). `scaler` (fp16) scales the
    loss for backward and skips updates whose gradients overflowed; `clip_grad` clips the gradients' global norm.
    `set_mode(model)` puts the model in training mode (default `model.train()`; a frozen body stays in eval mode).

    `class_weights` (see `loss_weights`) weights each image's cross-entropy by its class's weight. With the mean
    reduction the weighted sum is divided by the batch's image count, not by the sum of its weights (PyTorch's
    weighted mean): the count is what the distributed `loss_weight` rescales by, so N processes stay exactly the one
    process run, and as the weights average 1 over the training set the loss keeps its scale (and is an unbiased
    estimate of the weighted loss of the whole set). The epoch's reported training loss is then this weighted loss.

    No step waits for the device: the batches are indexed and augmented where the images are, the totals are summed
    as tensors (read when an observer asks), and the divergence check reads its device-side record only now and then
    (`LossWatch`). `cifar_cnn.device.count_host_syncs` counts what does wait; tests/engine hold it at 0 per step.
    """
    (set_mode or nn.Module.train)(model)
    totals = totals or EpochTotals()
    # under DDP every rank must raise at the same step (else the others wait in the next all-reduce): only at the
    # points all ranks share (the first update, a stop, the epoch's end), never by each rank's own clock
    watch = LossWatch(every_s=float("inf") if hasattr(model, "no_sync") else 30.0)
    steps = len(loader)
    updates = updates_per_epoch(steps, accum_steps)
    for step, x, y in loader.batches(epoch, start_step):
        group = accumulation_group(step, accum_steps, steps)
        if step == group[0] or step == start_step:
            update = epoch * updates + step // accum_steps
            set_lrs(optimizer, peak_lrs, update, lr_fn(update))
            optimizer.zero_grad(set_to_none=True)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last = step == group[1]
        # DDP decides in the forward whether the backward all-reduces: both inside no_sync before a group's last batch
        sync = contextlib.nullcontext if last or not hasattr(model, "no_sync") else model.no_sync
        with sync(), autocast(device, precision):
            logits = model(x)
        loss = batch_loss(logits.float(), y, label_smoothing, loss_reduction, class_weights)
        watch.record(loss, step)
        weight = _share(loader, step, group, loss_reduction) * (loss_weight(step, len(y)) if loss_weight else 1.0)
        with sync():
            backward(loss * weight if weight != 1.0 else loss, scaler)
        hard = y.argmax(1) if y.ndim == 2 else y  # mixed targets: the larger share's class
        totals.add(
            loss.detach().double() * (len(y) if loss_reduction == "mean" else 1),
            (logits.argmax(1) == hard).sum(),
            len(y),
        )
        if not last:
            continue
        apply_update(optimizer, scaler, clip_grad, report=False)
        if watch.due() or step // accum_steps == start_step // accum_steps:  # and the first update: fail fast
            watch.check(loader, epoch)
        if on_step is not None and on_step(step, totals):
            watch.check(loader, epoch)
            return totals, step + 1
    watch.check(loader, epoch)
    return totals, steps
