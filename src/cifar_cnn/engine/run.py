"""`train()`: a whole training run into a run directory. Build the state, fit epoch by epoch (EMA, progress, probes
and stop requests called explicitly after every step), validate, checkpoint, and test best.pt at the end."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..atomic import atomic_write_text
from ..calibrate import calibrate_checkpoint
from ..checkpoint import load_checkpoint
from ..config import TrainConfig, to_yaml
from ..data import DataSource
from ..device import resolve_device, set_threads, tune_allocator
from ..errors import CifarCnnError, Stopped
from ..evaluate import EvalResult, evaluate_checkpoint, predict_logits
from ..hooks import EpochTotals, StopRequest, TrainProgress
from ..rundir import (
    METRICS_HEADER,
    RunLock,
    RunPaths,
    check_out_dir,
    drop_previous_run,
    move_previous_run_aside,
    now,
    provenance,
    read_run_json,
    replaces_a_run,
    restore_previous_run,
    write_metrics_csv,
    write_run_json,
)
from .checkpointer import Checkpointer
from .loop import DivergenceError, batch_loss, train_one_epoch
from .state import RunState, at_full_resolution, build_run_state, enter_phase, set_resolution

Probe = Callable[[nn.Module, int, int], None]


@dataclass
class TrainResult(Mapping):
    """What `train()` returns: the run directory, whether it was interrupted, the epochs' rows, and the test of
    best.pt (`test_metrics` as in test_metrics.json; `test` with the logits, for the report). Reads like a dict
    of run_dir, interrupted, history and test_metrics."""

    run_dir: str
    interrupted: bool
    history: list[dict[str, Any]]
    test: EvalResult | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def test_metrics(self) -> dict[str, Any] | None:
        return self.test.metrics if self.test is not None else None

    def to_dict(self) -> dict[str, Any]:
        out = {"run_dir": self.run_dir, "interrupted": self.interrupted, "history": self.history}
        if self.test is not None:
            out["test_metrics"] = self.test.metrics
        return out | self.extra

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


class StepHooks:
    """What runs after every optimizer step, in this order: the EMA update, the progress observers, the probe, and
    the stop check (whose answer ends the epoch early)."""

    def __init__(
        self,
        state: RunState,
        progress: TrainProgress | None,
        probe: Probe | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.state, self.progress, self.probe, self.should_stop = state, progress, probe, should_stop
        self.epoch = 0
        self.first_step: Callable[[], None] | None = None  # called once, after the run's first step

    def after_step(self, step: int, totals: EpochTotals) -> bool:
        if self.first_step is not None:
            first, self.first_step = self.first_step, None
            first()
        return self._after_step(step, totals)

    def _after_step(self, step: int, totals: EpochTotals) -> bool:
        s = self.state
        if s.ema is not None:
            s.ema.update(s.model)
        if self.progress is not None:
            self.progress.step(step, totals)
        if self.probe is not None:
            with at_full_resolution(s.eval_model):
                self.probe(s.eval_model, self.epoch * s.steps_per_epoch + step + 1, s.steps_per_epoch)
        return self.stop_requested()

    def stop_requested(self) -> bool:
        return self.should_stop is not None and self.should_stop()


def validate_epoch(state: RunState, epoch: int, paths: RunPaths) -> tuple[float | None, float | None]:
    """(val_loss, val_acc) of the weights validation uses, or (None, None) without a validation split. With class
    weights the validation loss is weighted as the training loss is, so best.pt is chosen on the objective trained
    (an unweighted loss on imbalanced data would keep an epoch that ignores the rare classes)."""
    splits = state.data.splits
    if not len(splits.val_labels):
        return None, None
    with at_full_resolution(state.eval_model):
        logits = predict_logits(
            state.eval_model,
            splits.val_images,
            state.data.mean,
            state.data.std,
            batch_size=state.config.eval_batch_size,
            device=state.device,
            precision=state.precision,
            channels_last=state.channels_last,
            size=state.data.input_size,
        )
    labels = torch.from_numpy(np.asarray(splits.val_labels))
    weights = state.class_weights.cpu() if state.class_weights is not None else None
    val = {
        "loss": float(batch_loss(logits, labels, class_weights=weights)),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
    }
    if not math.isfinite(val["loss"]):
        raise DivergenceError(
            f"the validation loss became {val['loss']} after epoch {epoch + 1}; training diverged: lower the "
            f"learning rate (--lr) and train again ({paths.best} still holds the best finite weights)"
        )
    return val["loss"], val["accuracy"]


def epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    """The one line every completed epoch prints (with or without a progress bar): it starts `epoch N/M`."""
    return (
        f"epoch {int(row['epoch'])}/{epochs}"
        f"  train loss {_fmt(row['train_loss'])} acc {_fmt(row['train_acc'], True)}"
        f"  val loss {_fmt(row['val_loss'])} acc {_fmt(row['val_acc'], True)}  lr {row['lr']:.3g}"
        f"  {row['seconds']:.1f}s" + ("  [best]" if improved else "")
    )


def resume_hint(paths: RunPaths) -> str:
    """The command that continues this run, with an absolute path so it works from any working directory (the
    checkpoint records the run's data source, so no --data is needed)."""
    return f"cifar-cnn train --resume {paths.last.absolute()}"


def fit(
    state: RunState,
    checkpointer: Checkpointer,
    hooks: StepHooks,
    log: Callable[[str], None],
) -> bool:
    """Train from the state's position to its last epoch; returns True when a stop request interrupted it."""
    config, dist, paths = state.config, state.dist, checkpointer.paths
    if config.patience and state.history and epochs_since_best(state.history) >= config.patience:
        log(f"the run had stopped early (patience {config.patience}); raise --patience to train on")
        return False
    for epoch in range(state.start_epoch, config.epochs):
        t0 = time.perf_counter()
        hooks.epoch = epoch
        if hooks.progress is not None:
            hooks.progress.epoch_start(epoch, config.epochs, state.steps_per_epoch, state.start_step, config.batch_size)
        enter_phase(state, epoch, log)
        set_resolution(state, epoch, log)
        totals, next_step = train_one_epoch(
            state.train_model,
            state.loader,
            state.optimizer,
            epoch=epoch,
            lr_fn=state.lr_fn,
            peak_lrs=state.peak_lrs,
            device=state.device,
            precision=state.precision,
            label_smoothing=config.label_smoothing,
            class_weights=state.class_weights,
            loss_reduction=config.loss_reduction,
            channels_last=state.channels_last,
            start_step=state.start_step,
            totals=state.totals,
            on_step=hooks.after_step,
            loss_weight=dist.loss_weight(state.loader, config.loss_reduction),
            scaler=state.scaler,
            accum_steps=config.accum_steps,
            clip_grad=config.clip_grad,
            set_mode=state.set_mode,
        )
        state.start_step, state.totals = 0, None
        if dist.active:  # the epoch's totals over all ranks
            loss_sum, correct, seen = dist.all_sum([totals.loss_sum, totals.correct, totals.seen])
            totals = EpochTotals(loss_sum, int(correct), int(seen))
        if next_step < state.steps_per_epoch:  # interrupted inside the epoch
            if dist.is_main:
                checkpointer.save_interrupted(epoch, next_step, totals)
            log(
                f"interrupted at epoch {epoch + 1}, step {next_step}/{state.steps_per_epoch}; resume with: "
                f"{resume_hint(paths)}"
            )
            return True
        if not dist.is_main:  # rank 0 validates and writes; the others go on to the next epoch's all-reduce
            if hooks.stop_requested():
                return True
            if config.patience and dist.any(False):  # rank 0 says whether patience ran out
                return False
            continue
        val_loss, val_acc = validate_epoch(state, epoch, paths)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": totals.loss,
            "train_acc": totals.accuracy,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": next((g["lr"] for g in state.optimizer.param_groups if g["lr"] > 0), 0.0),  # frozen body: head's
            "seconds": round(time.perf_counter() - t0, 3),
        }
        state.history.append(row)
        improved = val_loss is not None and val_loss < state.best_val_loss
        if improved:
            state.best_val_loss = val_loss
        checkpointer.save_epoch_end(epoch + 1, {k: row[k] for k in METRICS_HEADER}, improved)
        write_metrics_csv(paths.metrics, state.history)
        if hooks.progress is not None:
            hooks.progress.epoch_end(row)
        log(epoch_line(row, config.epochs, improved))
        if hooks.stop_requested():
            log(f"interrupted after epoch {epoch + 1}; resume with: {resume_hint(paths)}")
            return True
        if config.patience and dist.any(epochs_since_best(state.history) >= config.patience):
            best = len(state.history) - epochs_since_best(state.history)
            log(
                f"early stop after epoch {epoch + 1}: the validation loss has not improved for {config.patience} "
                f"epochs (patience); best.pt holds epoch {best}"
            )
            state.stopped_early = epoch + 1
            return False
    return False


def epochs_since_best(history: list[dict[str, Any]]) -> int:
    """Epochs since the lowest validation loss of `history` (0: the last epoch is the best; ties keep the earlier
    epoch, as best.pt does). Computed from the history alone, so a resumed run counts on exactly."""
    losses = [row["val_loss"] for row in history if row.get("val_loss") is not None]
    if not losses:
        return 0
    best = min(range(len(losses)), key=lambda i: (losses[i], i))
    return len(losses) - 1 - best


def start_run_json(
    state: RunState, paths: RunPaths, resume: str | Path | None, command: list[str] | None
) -> dict[str, Any]:
    """run.json at the start: provenance, the data source and its split sizes, normalization, distribution, transfer;
    a resumed run keeps its first start time and counts its resumes."""
    splits = state.data.splits
    run = provenance(state.device, state.precision, command)
    run.update(
        data=str(state.data.source),
        data_source=state.data.record(),
        images={"train": len(splits.train_labels), "val": len(splits.val_labels), "test": len(splits.test_labels)},
        resumed_from=str(resume) if resume else None,
        normalization=state.data.stats_from,
    )
    if state.dist.active:
        run["distributed"] = state.dist.describe()
    if state.transferred:
        run["transfer"] = state.transferred
    if resume and paths.run_json.is_file():
        previous = read_run_json(paths.root)
        run["start_time"] = previous.get("start_time", run["start_time"])
        run["resumes"] = previous.get("resumes", 0) + 1
    return run


def log_start(state: RunState, resume: str | Path | None, log: Callable[[str], None]) -> None:
    config, splits = state.config, state.data.splits
    log(f"config ({config.recipe} recipe):\n" + "\n".join("  " + line for line in to_yaml(config).splitlines()))
    log(
        f"data {state.data.source}: {len(splits.train_labels)} train, {len(splits.val_labels)} validation, "
        f"{len(splits.test_labels)} test images, {len(splits.classes)} classes; device {state.device}, "
        f"precision {state.precision}, threads {torch.get_num_threads()}"
    )
    held = splits.calibration_labels
    if held is not None and len(held):
        log(
            f"calibration: {len(held):,} training images (fixed by the seed) held out for fitting the temperature "
            "after training; they are not trained on (--calibration-images)"
        )
    if resume:
        log(f"resuming from {resume}: epoch {state.start_epoch + 1}, step {state.start_step}")


def test_best(state: RunState, paths: RunPaths, home: Path | None) -> EvalResult:
    """best.pt on the test split (with the recipe's TTA), reusing the splits in memory; writes test_metrics.json."""
    if not paths.best.is_file():
        raise CifarCnnError(f"{paths.best}: missing; the run has no best checkpoint to test")
    config = state.config
    test = evaluate_checkpoint(
        paths.best,
        state.data.source,
        split="test",
        device=config.device,
        precision=config.precision,
        batch_size=config.eval_batch_size,
        home=home,
        splits=state.data.splits,
        with_logits=True,
    )
    atomic_write_text(paths.test_metrics, json.dumps(test.metrics, indent=2) + "\n")
    return test


def train(
    config: TrainConfig,
    data: str | DataSource | None = None,
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
    probe: Probe | None = None,
    dist_timeout: float | None = None,
) -> TrainResult:
    """Train `config` on `data` into the run directory `out`; returns a TrainResult (test metrics and logits).

    `data` defaults to the run's own source when resuming (recorded in the checkpoint), else 'cifar10'. With `resume`
    (a last.pt), training continues exactly where that checkpoint stood: same weights, optimizer, loss-scaler and
    schedule state, RNG state, epoch and position inside the epoch. `should_stop()` is polled after every step; when
    it returns True a resumable last.pt is written and training stops (status 'interrupted'). `progress` (see
    cifar_cnn.hooks) is told when each epoch starts, after each step and when each epoch ends.
    `evaluate_test=False` skips the final test evaluation (hyper-parameter search selects on validation only).
    `probe(model, steps_done, steps_per_epoch)` is called after every optimizer step with the weights that would be
    saved (benchmarks measure test accuracy during training with it; it must leave the model as it found it).
    Under torchrun this process joins the data-parallel group (waiting at most `dist_timeout` seconds for the others
    at any collective); only rank 0 writes (see cifar_cnn.distributed).
    """
    started = time.perf_counter()
    tune_allocator()
    ckpt = load_checkpoint(resume) if resume else None
    dist = distributed.init_from_env(resolve_device(config.device), dist_timeout)  # torchrun: join; else one process
    if not dist.is_main:  # only rank 0 speaks and writes
        log, progress, probe = (lambda _: None), None, None
    with RunLock(Path(out), log) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            check_out_dir(Path(out), resume=resume, overwrite=overwrite)
        if threads is None and ckpt is not None and ckpt.get("threads"):
            # the same thread count as before keeps float reductions in the same order: a bit-identical continuation
            threads = min(int(ckpt["threads"]), os.cpu_count() or 1)
        set_threads(threads)
        state = build_run_state(config, data, dist, ckpt=ckpt, resume=resume, home=home, threads=threads, log=log)
        paths = RunPaths(Path(out))
        files = RunFiles(paths, state, start_run_json(state, paths, resume, command), log, dist.is_main)
        files.replacing = dist.is_main and replaces_a_run(Path(out), resume=resume, overwrite=overwrite)
        files.evaluate_test = evaluate_test
        log_start(state, resume, log)
        try:
            result = _fit_and_test(state, files, dist, progress, probe, should_stop, home, log, started)
        except BaseException as exc:
            files.failed(exc)
            if (lost := distributed.lost_contact(exc, dist)) is not None:
                raise CifarCnnError(f"{lost}; {last_checkpoint_note(paths)}") from None
            if not files.begun and isinstance(exc, (RuntimeError, ValueError)):  # the first step failed
                raise first_step_error(exc, paths) from None
            raise
        result.seconds = round(time.perf_counter() - started, 3)
        if dist.is_main:
            files.finish(result)
        dist.finish()
        return result


def _fit_and_test(
    state: RunState,
    files: RunFiles,
    dist: Any,
    progress: TrainProgress | None,
    probe: Probe | None,
    should_stop: Callable[[], bool] | None,
    home: Path | None,
    log: Callable[[str], None],
    started: float,
) -> TrainResult:
    """Fit, then (rank 0, not interrupted) calibrate and test best.pt. The run's files are begun after the first
    optimizer step (RunFiles.begin), so input that fails only once training starts leaves the folder as it was."""
    config, paths = state.config, files.paths
    hooks = StepHooks(state, progress, probe, dist.agreed(should_stop))  # every rank stops at the same step
    hooks.first_step = files.begin
    if progress is not None and hasattr(progress, "run_start"):
        progress.run_start(state)
    checkpointer = Checkpointer(paths, state)
    checkpointer.on_saved = files.checkpointed
    interrupted = fit(state, checkpointer, hooks, log)
    files.begin()  # a run resumed at its very end takes no step
    result = TrainResult(str(paths.root), interrupted, state.history)
    if state.data.skipped:
        result.extra["skipped_images"] = len(state.data.skipped)
    if state.stopped_early:
        result.extra["stopped_early_after_epoch"] = state.stopped_early
    if interrupted or not dist.is_main:
        return result
    try:
        if isinstance(should_stop, StopRequest):
            should_stop.at_once()  # nothing polls from here on: a signal stops the command where it is
        if config.calibrate:
            calibrate_checkpoint(
                paths.best,
                state.data.source,
                device=config.device,
                batch_size=config.eval_batch_size,
                home=home,
                splits=state.data.splits,
                log=log,
            )
        if files.evaluate_test:
            result.test = test_best(state, paths, home)
            log(
                f"test accuracy {_fmt(result.test.accuracy, True)} (loss {result.test.metrics['loss']:.4f}, tta "
                f"{result.test.metrics['tta']}) with {paths.best}, {time.perf_counter() - started:.1f}s in all"
            )
    except Stopped as stopped:
        result.interrupted = True
        log(
            f"{stopped} during the final {'calibration' if config.calibrate and result.test is None else 'test'}: "
            f"training is complete but best.pt is not tested; finish with: {resume_hint(paths)}"
        )
    return result


def last_checkpoint_note(paths: RunPaths) -> str:
    """What is left to resume from, and the command (for a run stopped by an error)."""
    if not paths.last.is_file():
        return f"no checkpoint was written yet; start again into {paths.root} with --overwrite"
    return f"{paths.last} is intact; resume with: {resume_hint(paths)}"


def first_step_error(exc: BaseException, paths: RunPaths) -> CifarCnnError:
    """A value that fails only once training starts (torch rejects a shape, a size, a width) as a one-line error: the
    run directory is as it was, since nothing is written before the first step."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = first if len(first) <= 200 else first[:200] + "..."
    return CifarCnnError(
        f"the first training step failed ({type(exc).__name__}: {first}); check the config values this names "
        f"(--print-config shows them all); nothing in {paths.root} was changed"
    )


class RunFiles:
    """What train() writes into the run directory besides checkpoints, and when.

    Nothing is written before the first optimizer step has run (`begin`): bad values that fail only once training
    starts leave the folder as it was. A run that replaces another (--overwrite) moves it aside at `begin`, deletes it
    at its first checkpoint (`checkpointed`) and puts it back if it fails before (`failed`). A run that fails later is
    marked `failed` in run.json, with the error.
    """

    def __init__(
        self, paths: RunPaths, state: RunState, run: dict[str, Any], log: Callable[[str], None], writes: bool
    ) -> None:
        self.paths, self.state, self.run, self.log, self.writes = paths, state, run, log, writes
        self.replacing = False
        self.begun = False
        self.aside = False
        self.evaluate_test = True

    def begin(self) -> None:
        if self.begun or not self.writes:
            return
        self.begun = True
        if self.replacing:
            self.aside = move_previous_run_aside(self.paths)
        atomic_write_text(self.paths.config, to_yaml(self.state.config))
        write_run_json(self.paths.run_json, self.run)
        write_metrics_csv(self.paths.metrics, self.state.history)  # on resume: cut back to the checkpoint's epoch

    def checkpointed(self) -> None:
        if self.aside:
            drop_previous_run(self.paths)
            self.aside = False

    def failed(self, exc: BaseException) -> None:
        if not self.begun:
            return
        if self.aside:
            restore_previous_run(self.paths)
            self.aside = False
            self.log(
                f"the new run failed before its first checkpoint; the run it was replacing in {self.paths.root} "
                "is back in place"
            )
            return
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        self.run.update(end_time=now(), status="failed", error=first)
        write_run_json(self.paths.run_json, self.run)

    def finish(self, result: TrainResult) -> None:
        self.run.update(
            end_time=now(), status="interrupted" if result.interrupted else "finished", seconds=result.seconds
        )
        write_run_json(self.paths.run_json, self.run)
