"""The training engine: `train()` runs a whole training into a run directory; `train_one_epoch()` is one pass.

A run directory holds config.yaml (the resolved config), metrics.csv (one row per epoch), best.pt (lowest validation
loss so far; the final weights when there is no validation split; with --ema-decay the averaged weights),
last.pt (every epoch, for --resume),
test_metrics.json (best.pt on the test split, as `evaluate --json` prints it) and run.json (provenance).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, distributed, transfer
from .checkpoint import (
    atomic_write_text,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    state_dict_mismatch,
    unwrap_state_dict,
)
from .config import TrainConfig, apply, to_yaml, validate
from .data import Splits, load_dataset, make_splits
from .data.pipeline import Augment, TensorLoader, normalize
from .device import autocast, resolve_device, resolve_precision, set_threads, tune_allocator
from .ema import WeightEMA
from .errors import CifarCnnError
from .evaluate import evaluate, predict_logits
from .metrics import classification_metrics
from .models import create_model
from .optim import build_optimizer
from .runinfo import now, provenance, write_run_json
from .schedules import lr_multiplier

if TYPE_CHECKING:
    from .progress import TrainProgress

METRICS_HEADER = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
RUN_FILES = ("config.yaml", "metrics.csv", "best.pt", "last.pt", "test_metrics.json", "run.json")


class DivergenceError(CifarCnnError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class RunPaths:
    """The files of a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def test_metrics(self) -> Path:
        return self.root / "test_metrics.json"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"


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


@dataclass
class EpochTotals:
    """Running sums of one epoch, kept in checkpoints so an epoch resumed in the middle reports the same numbers."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen}


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
) -> tuple[EpochTotals, int]:
    """Train over one epoch's batches from `start_step`; returns the epoch's totals and the next step to run.

    `on_step(step, totals)` is called after every optimizer step; if it returns True the epoch stops early (an
    interrupt), and the returned step is where a resumed run continues. `loss_weight(step, n)` scales the loss of a
    batch of n images before backward (distributed shards; see cifar_cnn.distributed).
    """
    model.train()
    totals = totals or EpochTotals()
    steps_per_epoch = len(loader)
    step = start_step
    for step, x, y in loader.batches(epoch, start_step):
        global_step = epoch * steps_per_epoch + step
        scale = lr_fn(global_step)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            decay = group.get("decay_steps")  # early parameters: their own linear decay to 0
            group["lr"] = peak * (max(0.0, 1.0 - global_step / decay) if decay else scale)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction=loss_reduction)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                "training diverged: lower the learning rate (--lr) and train again"
            )
        optimizer.zero_grad(set_to_none=True)
        (loss * loss_weight(step, len(y)) if loss_weight is not None else loss).backward()
        optimizer.step()
        totals.loss_sum += loss.item() * (len(y) if loss_reduction == "mean" else 1)
        totals.correct += int((logits.argmax(1) == y).sum().item())
        totals.seen += len(y)
        if on_step is not None and on_step(step, totals):
            return totals, step + 1
    return totals, steps_per_epoch


def _read_history(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(row) for row in ckpt.get("history", [])]


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv atomically from the history (so a kill never leaves a torn or duplicated row)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRICS_HEADER)
    for row in history:
        writer.writerow(["" if row.get(k) is None else row[k] for k in METRICS_HEADER])
    atomic_write_text(path, buf.getvalue())


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless resuming or told to overwrite. Changes nothing."""
    if out.exists() and not out.is_dir():
        raise CifarCnnError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise CifarCnnError(
            f"--out {out}: folder is not empty; pass --resume {out / 'last.pt'} to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> RunPaths:
    """Create the run directory (after everything else was checked, so bad input never touches an old run)."""
    check_out_dir(out, resume=resume, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarCnnError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if overwrite and not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return RunPaths(out)


def resume_config(checkpoint: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config stored in a checkpoint, with command-line overrides (e.g. more --epochs) applied."""
    stored = {k: (tuple(v) if k in ("mean", "std") and v is not None else v) for k, v in checkpoint["config"].items()}
    config = apply(TrainConfig(), stored, "checkpoint config")
    return validate(apply(config, dict(overrides or {}), "command line"))


def _input_arrays(splits: Splits) -> dict[str, int]:
    return {"train": len(splits.train_labels), "val": len(splits.val_labels), "test": len(splits.test_labels)}


def train(
    config: TrainConfig,
    data: str = "cifar10",
    out: str | Path = "runs/run",
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
    command: list[str] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: TrainProgress | None = None,
    evaluate_test: bool = True,
    probe: Callable[[nn.Module, int, int], None] | None = None,
) -> dict[str, Any]:
    """Train `config` on `data` into the run directory `out`; returns test metrics and the run's paths.

    With `resume` (a last.pt), training continues exactly where that checkpoint stood: same weights, optimizer and
    schedule state, RNG state, epoch and position inside the epoch. `should_stop()` is polled after every step; when
    it returns True a resumable last.pt is written and training stops (status 'interrupted'). `progress` (see
    cifar_cnn.progress: a bar, TensorBoard) is told when each epoch starts, after each step and when each epoch ends.
    `evaluate_test=False` skips the final test evaluation (hyper-parameter search selects on validation only).
    `probe(model, steps_done, steps_per_epoch)` is called after every optimizer step with the weights that would be
    saved (benchmarks measure test accuracy during training with it; it must leave the model as it found it).
    Under torchrun this process joins the data-parallel group; only rank 0 writes (see cifar_cnn.distributed).
    """
    started = time.perf_counter()
    tune_allocator()
    ckpt = load_checkpoint(resume) if resume else None
    dist = distributed.init_from_env(resolve_device(config.device))  # torchrun: join the group; else one process
    if dist.is_main:
        check_out_dir(Path(out), resume=ckpt is not None, overwrite=overwrite)
    else:  # only rank 0 speaks and writes
        log, progress, probe = (lambda _: None), None, None
    should_stop = dist.agreed(should_stop)  # every rank stops at the same step
    if threads is None and ckpt is not None and ckpt.get("threads"):
        # the same thread count as before keeps float reductions in the same order: a bit-identical continuation
        threads = min(int(ckpt["threads"]), os.cpu_count() or 1)
    set_threads(threads)
    device = dist.local_device(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    channels_last = config.channels_last and precision != "fp32"
    input_size = transfer.resolve_input_size(config)

    ds = load_dataset(data, input_size, home=home, threads=threads, log=log)
    splits = make_splits(ds, config.val_split, config.seed, config.subset or None)
    mean, std, stats_from = transfer.resolve_normalization(config, splits.classes, splits.train_images)
    if ckpt is not None and list(ckpt["classes"]) != list(splits.classes):
        raise CifarCnnError(f"{resume}: its classes {ckpt['classes']} differ from the data's {splits.classes}")
    num_classes = len(splits.classes)

    # The training split lives in memory normalized once, in the compute precision (half the bytes with bf16).
    store_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    train_x = normalize(splits.train_images, mean, std, store_dtype, device)
    train_y = torch.from_numpy(splits.train_labels).to(device)
    loader = TensorLoader(
        train_x,
        train_y,
        config.batch_size,
        shuffle=True,
        drop_last=config.drop_last,
        augment=Augment(config.flip, config.translate, config.cutout, config.alternate_flip),
        seed=config.seed,
    )
    if len(loader) == 0:
        raise CifarCnnError(f"batch_size {config.batch_size} is larger than the {len(train_y)} training images")
    loader = dist.shard(loader)  # this rank's slice of every global batch

    torch.manual_seed(config.seed)  # initial weights
    model = create_model(config.model, num_classes=num_classes, **config.model_args)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model_state"])
        except RuntimeError as exc:
            raise CifarCnnError(
                f"{resume}: weights do not fit model {config.model!r} ({state_dict_mismatch(exc)})"
            ) from None
    elif hasattr(model, "init_from_data"):  # e.g. airbench's whitening layer, computed from training images
        model.init_from_data(train_x[:5000].float().cpu())
    transferred = transfer.prepare_model(model, config, splits.classes, load_weights=ckpt is None, log=log)
    model = dist.prepare_model(model, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # an average of the weights (config.ema_decay) is what validation, best.pt and the test use; rank 0 keeps it
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 and dist.is_main else None
    if ckpt is not None and ckpt.get("config", {}).get("ema_decay", 0) > 0 and ckpt.get("ema_state") is None:
        raise CifarCnnError(
            f"{resume}: holds the averaged (EMA) weights of its run, not the trained ones; resume from its last.pt"
        )
    if ema is not None and ckpt is not None and ckpt.get("ema_state"):
        ema.load_state_dict(ckpt["ema_state"])
    eval_model = ema.module if ema is not None else model
    optimizer = optimizer_for(model, config, len(loader))
    peak_lrs = [g["lr"] for g in optimizer.param_groups]
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer_state"])
        except (ValueError, KeyError) as exc:
            raise CifarCnnError(f"{resume}: optimizer state does not fit {config.optimizer!r} ({exc})") from None
    train_model = dist.wrap(model, device)
    train_model = torch.compile(train_model) if config.compile else train_model
    lr_fn = make_lr_fn(config, len(loader))

    history = _read_history(ckpt) if ckpt else []
    start_epoch = int(ckpt["epoch"]) if ckpt else 0  # epochs completed
    start_step = int(ckpt.get("batch_in_epoch", 0)) if ckpt else 0
    totals = EpochTotals(**ckpt["epoch_totals"]) if ckpt and ckpt.get("epoch_totals") and dist.is_main else None
    best_val_loss = float(ckpt.get("best_val_loss", math.inf)) if ckpt else math.inf
    if ckpt is not None:
        torch.set_rng_state(ckpt["rng_state"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng_state"]:
            torch.cuda.set_rng_state(ckpt["rng_state"]["cuda"], device)
    dist.seed_rank(config.seed, start_epoch, start_step)

    if dist.is_main:
        paths = prepare_out_dir(Path(out), resume=ckpt is not None, overwrite=overwrite)
    else:
        paths = RunPaths(Path(out))
    run = provenance(device, precision, command)
    run.update(data=data, images=_input_arrays(splits), resumed_from=str(resume) if resume else None)
    run.update(normalization=stats_from)
    if dist.active:
        run["distributed"] = dist.describe()
    if transferred:
        run["transfer"] = transferred
    if ckpt is not None and paths.run_json.is_file():
        try:
            previous = json.loads(paths.run_json.read_text())
            run["start_time"] = previous.get("start_time", run["start_time"])
            run["resumes"] = previous.get("resumes", 0) + 1
        except (OSError, ValueError):
            pass
    if dist.is_main:
        atomic_write_text(paths.config, to_yaml(config))
        write_run_json(paths.run_json, run)
        write_metrics_csv(paths.metrics, history)  # on resume: cut back to the checkpoint's epoch

    log(f"config ({config.recipe} recipe):\n" + "\n".join("  " + line for line in to_yaml(config).splitlines()))
    log(
        f"data {data}: {len(splits.train_labels)} train, {len(splits.val_labels)} validation, "
        f"{len(splits.test_labels)} test images, {num_classes} classes; device {device}, precision {precision}, "
        f"threads {torch.get_num_threads()}"
    )
    if ckpt is not None:
        log(f"resuming from {resume}: epoch {start_epoch + 1}, step {start_step}")

    common = dict(
        model={"name": config.model, "args": dict(config.model_args)},
        classes=list(splits.classes),
        num_classes=num_classes,
        input_size=input_size,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        tta=config.tta,
        config=config.to_dict(),
        package_version=__version__,
        torch_version=str(torch.__version__),
        threads=torch.get_num_threads(),
    )

    def rng_state() -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def payload(
        epoch: int, batch_in_epoch: int, metrics: dict, note: str, epoch_totals: EpochTotals | None, final: bool = False
    ) -> dict:
        """A checkpoint: `final` ones (best.pt) hold the weights that are evaluated (the average, with EMA); the
        others hold the trained weights and the average beside them, to resume from."""
        if final and ema is not None:
            note += f" (exponential moving average of the weights, decay {ema.decay})"
        return {
            **common,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "step": epoch * len(loader) + batch_in_epoch,
            "metrics": metrics,
            "history": [dict(r) for r in history],
            "best_val_loss": best_val_loss,
            "model_state": unwrap_state_dict(eval_model if final else model),
            "ema_state": ema.state_dict() if ema is not None and not final else None,
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": {"schedule": config.schedule, "step": epoch * len(loader) + batch_in_epoch},
            "rng_state": rng_state(),
            "epoch_totals": epoch_totals.as_dict() if epoch_totals else None,
            "created": now(),
            "note": note,
        }

    interrupted = False

    def stopping(step: int = 0, t: EpochTotals | None = None) -> bool:
        if ema is not None and t is not None:
            ema.update(model)
        if progress is not None and t is not None:
            progress.step(step, t)
        if probe is not None and t is not None:
            probe(eval_model, epoch * len(loader) + step + 1, len(loader))
        return should_stop is not None and should_stop()

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        if progress is not None:
            progress.epoch_start(epoch, config.epochs, len(loader), start_step, config.batch_size)
        totals, next_step = train_one_epoch(
            train_model,
            loader,
            optimizer,
            epoch=epoch,
            lr_fn=lr_fn,
            peak_lrs=peak_lrs,
            device=device,
            precision=precision,
            label_smoothing=config.label_smoothing,
            loss_reduction=config.loss_reduction,
            channels_last=channels_last,
            start_step=start_step,
            totals=totals,
            on_step=stopping,
            loss_weight=dist.loss_weight(loader, config.loss_reduction),
        )
        start_step = 0
        if dist.active:  # the epoch's totals over all ranks
            loss_sum, correct, seen = dist.all_sum([totals.loss_sum, totals.correct, totals.seen])
            totals = EpochTotals(loss_sum, int(correct), int(seen))
        if next_step < len(loader):  # interrupted inside the epoch
            if dist.is_main:
                save_checkpoint(paths.last, payload(epoch, next_step, {}, "interrupted inside an epoch", totals))
            interrupted = True
            log(
                f"interrupted at epoch {epoch + 1}, step {next_step}/{len(loader)}; resume with: "
                f"cifar-cnn train --resume {paths.last}"
            )
            break
        if not dist.is_main:  # rank 0 validates and writes; the others go on to the next epoch's all-reduce
            totals = None
            if stopping():
                interrupted = True
                break
            continue
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": totals.loss_sum / max(1, totals.seen),
            "train_acc": totals.correct / max(1, totals.seen),
            "val_loss": None,
            "val_acc": None,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if len(splits.val_labels):
            val = evaluate(
                eval_model,
                splits.val_images,
                splits.val_labels,
                splits.classes,
                mean=mean,
                std=std,
                batch_size=config.eval_batch_size,
                device=device,
                precision=precision,
                channels_last=channels_last,
            )
            row.update(val_loss=val["loss"], val_acc=val["accuracy"])
            if not math.isfinite(val["loss"]):
                raise DivergenceError(
                    f"the validation loss became {val['loss']} after epoch {epoch + 1}; training diverged: lower the "
                    f"learning rate (--lr) and train again ({paths.best} still holds the best finite weights)"
                )
        row["seconds"] = round(time.perf_counter() - t0, 3)
        totals = None
        history.append(row)
        improved = row["val_loss"] is not None and row["val_loss"] < best_val_loss
        if improved:
            best_val_loss = row["val_loss"]
        metrics = {k: row[k] for k in METRICS_HEADER}
        if improved:
            save_checkpoint(paths.best, payload(epoch + 1, 0, metrics, "lowest validation loss so far", None, True))
        elif row["val_loss"] is None:
            note = "final weights (no validation split)"
            save_checkpoint(paths.best, payload(epoch + 1, 0, metrics, note, None, True))
        save_checkpoint(paths.last, payload(epoch + 1, 0, metrics, "end of epoch", None))
        write_metrics_csv(paths.metrics, history)
        if progress is not None:
            progress.epoch_end(row)
        log(
            f"epoch {epoch + 1}/{config.epochs}"
            f"  train loss {_fmt(row['train_loss'])} acc {_fmt(row['train_acc'], True)}"
            f"  val loss {_fmt(row['val_loss'])} acc {_fmt(row['val_acc'], True)}  lr {row['lr']:.3g}"
            f"  {row['seconds']:.1f}s" + ("  [best]" if improved else "")
        )
        if stopping():
            interrupted = True
            log(f"interrupted after epoch {epoch + 1}; resume with: cifar-cnn train --resume {paths.last}")
            break

    result: dict[str, Any] = {"run_dir": str(paths.root), "interrupted": interrupted, "history": history}
    if not dist.is_main:
        dist.finish()
        return result
    if not interrupted and evaluate_test:
        if not paths.best.is_file():
            raise CifarCnnError(f"{paths.best}: missing; the run has no best checkpoint to test")
        test = evaluate_checkpoint(
            paths.best,
            data,
            split="test",
            device=config.device,
            precision=config.precision,
            batch_size=config.eval_batch_size,
            home=home,
            dataset_splits=splits,
        )
        atomic_write_text(paths.test_metrics, json.dumps(test, indent=2) + "\n")
        log(
            f"test accuracy {_fmt(test['accuracy'], True)} (loss {test['loss']:.4f}, tta {test['tta']}) "
            f"with {paths.best}, {time.perf_counter() - started:.1f}s in all"
        )
        result["test_metrics"] = test
    run.update(
        end_time=now(),
        status="interrupted" if interrupted else "finished",
        seconds=round(time.perf_counter() - started, 3),
    )
    write_run_json(paths.run_json, run)
    dist.finish()
    return result


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str = "cifar10",
    *,
    split: str = "test",
    tta: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1000,
    threads: int | None = None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
    dataset_splits: Splits | None = None,
    with_logits: bool = False,
) -> Any:
    """Evaluate a checkpoint on a split of `data`; the validation split is rebuilt from the checkpoint's config.

    Returns the metrics dict (`evaluate --json`), or (metrics, logits) with `with_logits`, for callers such as the
    report that also need the per-image predictions of the same forward pass."""
    if split not in ("test", "val", "train"):
        raise CifarCnnError(f"--split must be test, val or train, got {split!r}")
    set_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    channels_last = prec != "fp32" and bool(ckpt.get("config", {}).get("channels_last", True))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    splits = dataset_splits
    if splits is None:
        ds = load_dataset(data, int(ckpt["input_size"]), home=home, threads=threads, log=log)
        cfg = ckpt.get("config", {})
        splits = make_splits(ds, float(cfg.get("val_split", 0.2)), int(cfg.get("seed", 0)), cfg.get("subset") or None)
    if list(splits.classes) != list(ckpt["classes"]):
        raise CifarCnnError(
            f"{checkpoint}: trained on classes {list(ckpt['classes'])} but the data has {list(splits.classes)}"
        )
    images, labels = {
        "test": (splits.test_images, splits.test_labels),
        "val": (splits.val_images, splits.val_labels),
        "train": (splits.train_images, splits.train_labels),
    }[split]
    if len(labels) == 0:
        raise CifarCnnError(f"the {split} split of {data} is empty (the checkpoint was trained with val_split 0?)")
    mode = tta or ckpt.get("tta", "none")
    logits = predict_logits(
        model,
        images,
        tuple(ckpt["mean"]),
        tuple(ckpt["std"]),
        batch_size=batch_size,
        device=dev,
        precision=prec,
        tta=mode,
        channels_last=channels_last,
    )
    result = classification_metrics(logits, torch.from_numpy(np.asarray(labels)), list(ckpt["classes"]))
    result.update(tta=mode, split=split, checkpoint=str(checkpoint), epoch=ckpt.get("epoch"), precision=prec)
    return (result, logits) if with_logits else result
