"""Building a run's state: data, loader, model (with EMA and transfer settings), optimizer, loss scaler, LR schedule,
and the position to start from (a fresh start, or exactly where a resumed checkpoint stood)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import presets, transfer
from ..checkpoint import state_dict_mismatch
from ..config import TrainConfig, apply, validate
from ..data import DataSource, Splits, check_same_data, load_dataset, make_splits
from ..data.dataset import ImageSet
from ..data.pipeline import Augment, TensorLoader, normalize_split, resize_batch
from ..data.stream import StreamLoader
from ..device import compute_dtype, resolve_device, resolve_precision
from ..distributed import DistContext
from ..ema import WeightEMA
from ..errors import CifarCnnError
from ..hooks import EpochTotals
from ..models import create_model
from ..rundir import recorded_fingerprint, recorded_source, resolve_source
from .loop import loss_weights, make_lr_fn, make_scaler, optimizer_for


def resume_config(checkpoint: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config stored in a checkpoint, with command-line overrides (e.g. more --epochs) applied. Overrides that
    would change which training images are held out for calibration are refused."""
    config = apply(TrainConfig(), dict(checkpoint["config"]), "checkpoint config")
    resumed = validate(apply(config, dict(overrides or {}), "command line"))
    for key in ("calibrate", "calibration_images"):
        if getattr(resumed, key) != getattr(config, key):
            raise CifarCnnError(
                f"--{key.replace('_', '-')} cannot change on --resume: it would change which training images the run "
                "holds out; calibrate the finished run with `cifar-cnn calibrate RUN_DIR/best.pt` instead"
            )
    for key in ("subset", "max_train_images"):
        if getattr(resumed, key) != getattr(config, key):
            raise CifarCnnError(
                f"--{key.replace('_', '-')} cannot change on --resume: it would change which images the run trains "
                f"on (it has {getattr(config, key)}); start a new run for other images"
            )
    return resumed


@dataclass
class RunData:
    """What a run trains and validates on: its source, splits and normalization."""

    source: DataSource
    fingerprint: dict[str, Any]
    splits: Splits
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stats_from: str  # 'model', 'config' or 'dataset'
    skipped: list[str] = field(default_factory=list)  # label rows left out (--skip-bad): the command exits 1

    def record(self) -> dict[str, Any]:
        """The data-source record a run keeps in its checkpoints and run.json: path, options, fingerprint."""
        return {**self.source.to_dict(), "fingerprint": self.fingerprint}


@dataclass
class RunState:
    """Everything the fit loop works with. `model` is the bare network being trained; `train_model` is what runs
    the steps (DDP-wrapped, compiled); `eval_model` is what validation and best.pt use (the EMA average, if any)."""

    config: TrainConfig
    dist: DistContext
    device: torch.device
    precision: str
    channels_last: bool
    data: RunData
    loader: Any
    model: nn.Module
    train_model: nn.Module
    eval_model: nn.Module
    ema: WeightEMA | None
    optimizer: Any
    peak_lrs: list[float]
    scaler: torch.amp.GradScaler | None
    lr_fn: Callable[[int], float]
    transferred: dict[str, Any] | None = None
    class_weights: torch.Tensor | None = None  # per-class loss weights (config.class_weights), on the device
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0  # epochs completed
    start_step: int = 0  # steps of the next epoch already done (a checkpoint saved inside an epoch)
    totals: EpochTotals | None = None  # that epoch's running totals
    best_val_loss: float = math.inf
    body_frozen: bool = False  # inside the first freeze_epochs: only the head trains (see enter_phase)
    stopped_early: int = 0  # the epoch after which patience stopped the run (0: it did not)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def set_mode(self, model: nn.Module) -> None:
        """Training mode for an epoch of `model` (the training module: DDP-wrapped or compiled); a frozen body stays
        in eval mode (see transfer.train_mode), set on the bare model, whose module names the head's name matches."""
        model.train()
        if self.body_frozen:
            transfer.train_mode(self.model, transfer.check_head(self.model, self.config.model), frozen=True)


def set_resolution(state: RunState, epoch: int, log: Callable[[str], None]) -> None:
    """Progressive resizing (config.patch_epochs): the airbench whitening layer on 2x2 patches for the first epochs,
    at full resolution from then on (also right when a resumed run starts)."""
    n = state.config.patch_epochs
    if not n:  # (config validation allows it for airbench only)
        return
    k = state.model.whiten.kernel_size[0]
    stride = k if epoch < n else 1
    if state.model.whiten.stride != (stride, stride):
        state.model.set_whiten_stride(stride)
        log(
            f"epoch {epoch + 1}: "
            + (f"{k}x{k} patches (1/{k * k} of the pixels)" if stride > 1 else "full resolution from here")
        )


def at_full_resolution(model: nn.Module) -> contextlib.AbstractContextManager:
    """Validation and probes see the net as it is saved, at full resolution, also during patch epochs (so a patch
    epoch is judged by what best.pt would hold)."""
    return model.full_resolution() if hasattr(model, "full_resolution") else contextlib.nullcontext()


def enter_phase(state: RunState, epoch: int, log: Callable[[str], None]) -> None:
    """Freeze the body for the first `freeze_epochs` epochs and unfreeze it after (also right when a resumed run
    starts). The training module is wrapped again when the set of trained parameters changes: DDP registers the
    parameters that need gradients when it wraps a model, and a compiled model was traced with the old ones."""
    if state.config.freeze_backbone:  # frozen for the whole run (transfer.prepare_model), before the optimizer
        state.body_frozen = True
        return
    frozen = epoch < state.config.freeze_epochs
    if frozen == state.body_frozen:
        return
    transfer.set_body_frozen(state.model, transfer.check_head(state.model, state.config.model), frozen)
    state.body_frozen = frozen
    state.train_model = training_module(state.model, state.config, state.dist, state.device)
    if frozen:
        n = state.config.freeze_epochs
        log(f"the first {n} epoch{'s' * (n > 1)}: training the head alone (the body is frozen, in eval mode)")
    else:
        log(
            f"epoch {epoch + 1}: the whole network trains from here (the body's LR warms up over "
            f"{state.config.unfreeze_warmup_epochs:g} epochs)"
        )


def training_module(model: nn.Module, config: TrainConfig, dist: DistContext, device: torch.device) -> nn.Module:
    """What runs the training steps: the model, DDP-wrapped under torchrun, compiled with config.compile."""
    wrapped = dist.wrap(model, device)
    return torch.compile(wrapped) if config.compile else wrapped


DATA_KEYS = ("label_set", "test_split")  # config keys that shape the data: fixed for a run's life


def load_run_data(
    config: TrainConfig,
    data: str | DataSource | None,
    ckpt: dict[str, Any] | None,
    resume: str | Path | None,
    *,
    home: Path | None,
    threads: int | None,
    log: Callable[[str], None],
) -> RunData:
    """The run's data: `data`, else (resuming) the source the checkpoint recorded, else 'cifar10'. Resuming on data
    that differs from what the run trained on (classes, counts, content) is refused."""
    run_dir = Path(resume).parent if ckpt is not None and resume else None
    for key in DATA_KEYS if ckpt is not None else ():
        if key in ckpt.get("config", {}) and getattr(config, key) != ckpt["config"][key]:
            raise CifarCnnError(
                f"{resume}: --{key.replace('_', '-')} {getattr(config, key)} would change the data the run trains on "
                f"(it has {ckpt['config'][key]}); start a new run for other data"
            )
    if data is not None and not isinstance(data, DataSource):  # a path: with the config's data options
        data = DataSource.of(data, label_set=config.label_set, test_split=config.test_split)
    source = resolve_source(data, ckpt, run_dir)
    if config.image_storage != "auto":
        source = dataclasses.replace(source, storage=config.image_storage)
    record = model_record(ckpt)
    input_size = presets.resolve_input_size(config, record)
    ds = load_dataset(source, input_size, home=home, threads=threads, log=log)
    fingerprint = ds.fingerprint()
    if ckpt is not None:
        if list(ckpt["classes"]) != list(ds.classes):
            raise CifarCnnError(f"{resume}: its classes {ckpt['classes']} differ from the data's {ds.classes}")
        recorded = recorded_source(ckpt, run_dir)
        given = str(source) if data is not None and data.path else None
        check_same_data(recorded_fingerprint(ckpt), fingerprint, f"{resume} (source {recorded})", given)
    splits = make_splits(
        ds, config.val_split, config.seed, config.subset, config.calibration_holdout(), config.max_train_images
    )
    if len(splits.train_labels) == 0:  # before anything is computed from the (empty) training split
        raise CifarCnnError(
            f"val_split {config.val_split} holds out all {len(splits.val_labels)} training images for validation, "
            "leaving none to train on: lower --val-split"
        )
    mean, std, stats_from = presets.resolve_normalization(config, splits.classes, splits.train_images, record)
    return RunData(source, fingerprint, splits, input_size, mean, std, stats_from, list(ds.skipped))


def model_record(ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a checkpoint recorded of a model family's network (an hf: model's config and preprocessing), if any."""
    return ckpt["model"].get("hf") if ckpt is not None else None


def build_loader(config: TrainConfig, data: RunData, precision: str, device: torch.device, dist: DistContext) -> Any:
    """The training batches: a split held in memory at the training size is normalized once in the compute precision
    (half the bytes with bf16) and batched with tensor ops; images at other sizes, memory-mapped ones and
    random-resized crops are read, cropped and normalized a batch at a time (cifar_cnn.data.stream). Under torchrun,
    this rank's shard of every global batch."""
    images, labels = data.splits.train_images, data.splits.train_labels
    common = dict(
        shuffle=True,
        sampler=config.sampler,
        drop_last=config.drop_last,
        augment=augment_of(config),
        seed=config.seed,
        size=data.input_size,
        num_classes=len(data.splits.classes),
    )
    if isinstance(images, np.ndarray) and config.crop_scale is None:
        train_x = normalize_split(images, data.mean, data.std, compute_dtype(precision), device)
        loader: TensorLoader = TensorLoader(
            train_x, torch.from_numpy(labels).to(device), config.batch_size, mean=data.mean, std=data.std, **common
        )
    else:
        if isinstance(images, np.ndarray):  # in memory at the training size, but cropped per step
            images = ImageSet.of_array(images)
        loader = StreamLoader(
            images,
            labels,
            config.batch_size,
            mean=data.mean,
            std=data.std,
            dtype=compute_dtype(precision),
            device=device,
            crop_scale=config.crop_scale,
            crop_ratio=config.crop_ratio,
            **common,
        )
    if len(loader) == 0:
        raise CifarCnnError(
            f"batch_size {config.batch_size} is larger than the {len(labels)} training images and drop_last drops "
            f"the one incomplete batch: use --batch-size {len(labels)} or less, or --no-drop-last"
        )
    if config.accum_steps > len(loader):
        raise CifarCnnError(
            f"accum_steps {config.accum_steps} is more than the {len(loader)} batches of an epoch ({len(labels)} "
            f"training images, batch_size {config.batch_size}): lower --accum-steps to at most {len(loader)}"
        )
    return dist.shard(loader)


def augment_of(config: TrainConfig) -> Augment:
    """The training augmentation a config asks for (the one place that maps config fields to it)."""
    return Augment(
        config.flip,
        config.translate,
        config.cutout,
        config.alternate_flip,
        auto_augment=config.auto_augment,
        randaugment_ops=config.randaugment_ops,
        randaugment_magnitude=config.randaugment_magnitude,
        random_erasing=config.random_erasing,
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        mix_prob=config.mix_prob,
        mix_switch_prob=config.mix_switch_prob,
        label_smoothing=config.label_smoothing,
    )


def build_model(
    config: TrainConfig,
    data: RunData,
    sample: Callable[[], torch.Tensor],
    ckpt: dict[str, Any] | None,
    resume: str | Path | None,
    log: Callable[[str], None],
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The network with its initial weights: the checkpoint's when resuming, else seeded (and initialized from the
    data, or from --init-from). Returns (model, transfer summary)."""
    torch.manual_seed(config.seed)  # initial weights
    model = create_model(
        config.model,
        num_classes=len(data.splits.classes),
        classes=data.splits.classes,
        # a resumed run's weights come from its checkpoint, an --init-from run's from that one
        pretrained=config.pretrained and ckpt is None and not config.init_from,
        record=model_record(ckpt),
        **config.model_args,
    )
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model_state"])
        except RuntimeError as exc:
            raise CifarCnnError(
                f"{resume}: weights do not fit model {config.model!r} ({state_dict_mismatch(exc)})"
            ) from None
    elif hasattr(model, "init_from_data"):  # e.g. airbench's whitening layer, computed from training images
        model.init_from_data(sample().float().cpu())
    if hasattr(model, "check_input_size"):  # hf: models of a fixed size refuse others here, before the run starts
        model.check_input_size(data.input_size)
    transferred = transfer.prepare_model(model, config, data.splits.classes, load_weights=ckpt is None, log=log)
    return model, transferred


def restore_position(state: RunState, ckpt: dict[str, Any], resume: str | Path | None) -> None:
    """Set the state to where the checkpoint stood: optimizer, scaler, EMA, history, epoch, step, totals, RNG."""
    try:
        state.optimizer.load_state_dict(ckpt["optimizer_state"])
    except (ValueError, KeyError) as exc:
        raise CifarCnnError(f"{resume}: optimizer state does not fit {state.config.optimizer!r} ({exc})") from None
    if state.scaler is not None and ckpt.get("scaler_state"):
        state.scaler.load_state_dict(ckpt["scaler_state"])
    if state.ema is not None and ckpt.get("ema_state"):
        state.ema.load_state_dict(ckpt["ema_state"])
    state.history = [dict(row) for row in ckpt.get("history", [])]
    state.start_epoch = int(ckpt["epoch"])
    state.start_step = int(ckpt.get("batch_in_epoch", 0))
    if ckpt.get("epoch_totals") and state.dist.is_main:
        state.totals = EpochTotals(**ckpt["epoch_totals"])
    state.best_val_loss = float(ckpt.get("best_val_loss", math.inf))
    torch.set_rng_state(ckpt["rng_state"]["torch"])
    if state.device.type == "cuda" and "cuda" in ckpt["rng_state"]:
        torch.cuda.set_rng_state(ckpt["rng_state"]["cuda"], state.device)


def check_augment_fits(config: TrainConfig, size: int) -> None:
    """Augmentation values the images are too small for (found here, before anything is trained or written)."""
    if config.translate >= size:
        raise CifarCnnError(
            f"translate {config.translate}: shifts must be smaller than the {size}-pixel images; use at most "
            f"{max(size // 8, 1)} or so (config key translate)"
        )


def build_run_state(
    config: TrainConfig,
    data: str | DataSource | None,
    dist: DistContext,
    *,
    ckpt: dict[str, Any] | None = None,
    resume: str | Path | None = None,
    home: Path | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> RunState:
    """Everything a run needs before its first step, from a config (and a checkpoint to resume from)."""
    device = dist.local_device(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    channels_last = config.channels_last and precision != "fp32"
    run_data = load_run_data(config, data, ckpt, resume, home=home, threads=threads, log=log)
    check_augment_fits(config, run_data.input_size)
    loader = build_loader(config, run_data, precision, device, dist)
    model, transferred = build_model(config, run_data, lambda: _images_of(loader), ckpt, resume, log)
    model = dist.prepare_model(model, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if ckpt is not None and ckpt.get("config", {}).get("ema_decay", 0) > 0 and ckpt.get("ema_state") is None:
        raise CifarCnnError(
            f"{resume}: holds the averaged (EMA) weights of its run, not the trained ones; resume from its last.pt"
        )
    # an average of the weights (config.ema_decay) is what validation, best.pt and the test use; rank 0 keeps it
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 and dist.is_main else None
    optimizer = optimizer_for(model, config, len(loader))
    train_model = training_module(model, config, dist, device)
    state = RunState(
        config=config,
        dist=dist,
        device=device,
        precision=precision,
        channels_last=channels_last,
        data=run_data,
        loader=loader,
        model=model,
        train_model=train_model,
        eval_model=ema.module if ema is not None else model,
        ema=ema,
        optimizer=optimizer,
        peak_lrs=[g["lr"] for g in optimizer.param_groups],
        scaler=make_scaler(device, precision),
        lr_fn=make_lr_fn(config, len(loader)),
        transferred=transferred,
        class_weights=loss_weights(
            config.class_weights, run_data.splits.train_labels, len(run_data.splits.classes), device
        ),
    )
    if ckpt is not None:
        restore_position(state, ckpt, resume)
    dist.seed_rank(config.seed, state.start_epoch, state.start_step)
    return state


def _images_of(loader: Any, n: int = 5000) -> torch.Tensor:
    """The first n normalized training images behind a loader (or behind the loader a distributed shard wraps)."""
    inner = getattr(loader, "loader", loader)
    x = inner.sample(n) if isinstance(inner, StreamLoader) else inner.images[:n]
    return resize_batch(x, inner.size) if inner.size is not None else x
