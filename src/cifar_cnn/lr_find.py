"""The learning-rate range test (fastai's `lr_find`, after Leslie Smith): train a throwaway copy of the run's model
for a few dozen steps while the LR grows geometrically from tiny to huge, record the loss, stop once it blows up, and
suggest the LR where the smoothed loss falls fastest.

The sweep uses everything a real run of the config would: data, normalization, augmentation, model, optimizer,
parameter groups, precision, label smoothing and class weights. Nothing is saved but the outputs in `out`:
lr_find.csv (lr, loss, smoothed), lr_find.json (the result and the settings) and lr_find.png (the curve).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .atomic import atomic_write_bytes, atomic_write_text
from .config import TrainConfig
from .data import DataSource
from .device import autocast, set_threads, tune_allocator
from .distributed import DistContext, env_world_size
from .engine.loop import apply_update, backward, batch_loss
from .engine.state import RunState, build_run_state
from .errors import CifarCnnError
from .rundir import provenance

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

CSV_NAME, JSON_NAME, PNG_NAME = "lr_find.csv", "lr_find.json", "lr_find.png"
LR_FIND_FILES = (CSV_NAME, JSON_NAME, PNG_NAME)
MIN_POINTS = 5  # fewer points than this make no curve to read a slope from
SKIP_START = 10  # at most this many first points are left out of the search: the average of one or two losses is noise
BETA = 0.98  # fastai's smoothing: each smoothed loss averages roughly the last 1 / (1 - beta) = 50 steps
PNG_DPI = 100


# ---- the schedule, the smoothing and the suggestion (pure) ---------------------------------------------------------


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """`steps` LRs from `start_lr` to `end_lr` (both exact), each the previous times the same factor: the test
    spends as many steps on every decade."""
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise CifarCnnError(f"the LR range must have 0 < start_lr < end_lr, got {start_lr:g} to {end_lr:g}")
    if steps < 2:
        raise CifarCnnError(f"an LR schedule needs at least 2 steps, got {steps}")
    ratio = end_lr / start_lr
    lrs = [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]
    lrs[0], lrs[-1] = start_lr, end_lr
    return lrs


def smooth(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """fastai's debiased exponential moving average: avg_i = beta * avg_(i-1) + (1 - beta) * loss_i, avg_(-1) = 0,
    reported as avg_i / (1 - beta^(i+1)) so the first values are not pulled towards the zero it starts from."""
    if not 0 <= beta < 1:
        raise CifarCnnError(f"the smoothing factor beta must be in [0, 1), got {beta}")
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def noisy_points(n: int) -> int:
    """How many first points of n the suggestion leaves out, for its minimum and its slope: min(SKIP_START, n // 10).
    A smoothed loss there averages only a few batches, so one lucky batch can look like the lowest loss."""
    return min(SKIP_START, n // 10)


def steepest_between(x: np.ndarray, y: np.ndarray, first: int, low: int) -> int:
    """The index of the most negative slope dy/dx among indices first..low (inclusive)."""
    slope = np.gradient(y, x)  # central differences inside, one-sided at the ends
    return first + int(np.argmin(slope[first : low + 1]))


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """The LR where the loss falls fastest: the most negative d loss / d log10(lr) (numpy.gradient), searched between
    the first few noisy points and the lowest loss (what comes after the minimum is the blow-up, however it moves).
    Also fastai's "minimum" rule, the LR of the lowest loss / 10. Pass smoothed losses (`smooth`); points after the
    first non-finite loss are left out.

    Returns {"lr", "index" (of the suggestion in lrs), "method", "min_lr", "min_loss_lr", "min_loss_index"}; method
    is "steepest descent", or "none: ..." when the loss never fell below the first points' (then lr is the first LR
    past them)."""
    if len(lrs) != len(losses):
        raise CifarCnnError(f"suggest_lr needs one loss per LR, got {len(lrs)} LRs and {len(losses)} losses")
    finite = np.isfinite(np.asarray(losses, dtype=np.float64))
    n = int(np.argmin(finite)) if not finite.all() else len(finite)  # up to the first non-finite loss
    if n < MIN_POINTS:
        raise CifarCnnError(
            f"suggest_lr needs at least {MIN_POINTS} points with a finite loss, got {n}: run more steps"
        )
    rates, y = np.asarray(lrs[:n], dtype=np.float64), np.asarray(losses[:n], dtype=np.float64)
    if not (np.all(rates > 0) and np.all(np.isfinite(rates)) and np.all(np.diff(rates) > 0)):
        raise CifarCnnError("suggest_lr needs positive, increasing LRs")
    first = noisy_points(n)
    low = first + int(np.argmin(y[first:]))  # the lowest loss past the noisy first points
    index = steepest_between(np.log10(rates), y, first, low)
    return {
        "lr": float(lrs[index]),
        "index": index,
        "method": "steepest descent" if low > first else "none: the loss never fell; lower the start LR",
        "min_lr": float(lrs[low]) / 10,
        "min_loss_lr": float(lrs[low]),
        "min_loss_index": low,
    }


@dataclass
class LrFindResult:
    """What a range test recorded: per step its LR (for --lr; every parameter group ran at its own multiple of
    it), the batch's loss and the smoothed loss; the suggestion (`suggest_lr`); whether it stopped before the end of
    the schedule, and why; where the outputs are."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: dict[str, Any]
    stopped_early: bool
    steps_run: int
    stop_reason: str = ""  # why it stopped early ('' when the schedule ran to its end)
    out: str = ""  # the folder of lr_find.csv, lr_find.json and lr_find.png

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the sweep ------------------------------------------------------------------------------------------------------


def check_arguments(start_lr: float, end_lr: float, steps: int, divergence: float) -> None:
    """One-line errors naming the bad value, before any data is read."""
    if not (start_lr > 0 and math.isfinite(start_lr)):
        raise CifarCnnError(f"--start-lr must be a positive number, got {start_lr:g}")
    if not (start_lr < end_lr and math.isfinite(end_lr)):
        raise CifarCnnError(f"--end-lr must be a number above --start-lr ({start_lr:g}), got {end_lr:g}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < MIN_POINTS:
        raise CifarCnnError(f"--steps must be an integer of at least {MIN_POINTS}, got {steps!r}")
    if not (divergence > 1 and math.isfinite(divergence)):
        raise CifarCnnError(
            f"--divergence must be a number above 1 (the loss's growth over its minimum), got {divergence:g}"
        )


def refuse_non_folder(out: Path) -> None:
    """A file where the outputs' folder should be is an error (checked before the data is read)."""
    if out.exists() and not out.is_dir():
        raise CifarCnnError(f"--out {out}: exists and is not a folder")


def make_folder(out: Path) -> None:
    """Create the outputs' folder (once the sweep has run, so bad input leaves nothing behind)."""
    refuse_non_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarCnnError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None


def endless_batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches epoch after epoch (each epoch shuffled and augmented as in training), for as long as the
    sweep wants them: a short data set does not cut the test short."""
    for epoch in itertools.count():
        for _, x, y in loader.batches(epoch):
            yield x, y


def set_range_lr(state: RunState, lr: float) -> None:
    """Every parameter group at `lr` times its own factor (its peak LR / config.lr), so head_lr_factor's and
    muon_lr's ratios hold during the sweep as in training."""
    for group, peak in zip(state.optimizer.param_groups, state.peak_lrs):
        group["lr"] = lr * peak / state.config.lr


def train_step(state: RunState, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on a batch, as training takes it; returns the batch's loss per image (before the step).
    A non-finite loss is returned without a step."""
    config = state.config
    x, y = x.to(state.device, non_blocking=True), y.to(state.device, non_blocking=True)
    if state.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(state.device, state.precision):
        logits = state.train_model(x)
    loss = batch_loss(logits.float(), y, config.label_smoothing, config.loss_reduction, state.class_weights)
    value = loss.item() / (len(y) if config.loss_reduction == "sum" else 1)
    if math.isfinite(value):
        state.optimizer.zero_grad(set_to_none=True)
        backward(loss, state.scaler)
        apply_update(state.optimizer, state.scaler, config.clip_grad)
    return value


def sweep(state: RunState, schedule: Sequence[float], divergence: float) -> tuple[list[float], list[float], str]:
    """Train one step per LR of `schedule`; stop when the smoothed loss passes `divergence` x its lowest value (that
    step is kept: it shows the blow-up) or a loss is not finite (that step is not: it has no number to plot).
    Returns (lrs, raw losses, why it stopped early or '')."""
    state.set_mode(state.train_model)  # as training: a frozen body (freeze_backbone) stays in eval mode
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    for i, (lr, (x, y)) in enumerate(zip(schedule, endless_batches(state.loader))):
        set_range_lr(state, lr)
        loss = train_step(state, x, y)
        if not math.isfinite(loss):
            return lrs, losses, f"the loss became {loss} at lr {lr:.1e}"
        lrs.append(lr)
        losses.append(loss)
        avg = BETA * avg + (1 - BETA) * loss  # as `smooth`, one step at a time
        smoothed = avg / (1 - BETA ** (i + 1))
        best = min(best, smoothed)
        if smoothed > divergence * best:
            return lrs, losses, f"the smoothed loss passed {divergence:g} x its minimum at lr {lr:.1e}"
    return lrs, losses, ""


# ---- outputs --------------------------------------------------------------------------------------------------------


def csv_text(result: LrFindResult) -> str:
    """lr, loss, smoothed per step, each number as Python writes a float (it reads back exactly)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["lr", "loss", "smoothed"])
    writer.writerows(zip(result.lrs, result.losses, result.smoothed))
    return buf.getvalue()


def lr_find_figure(result: LrFindResult) -> Figure:
    """Loss against LR on a log axis: each batch's loss faint, the smoothed loss solid, the suggestion a red point
    labelled with its LR, fastai's minimum/10 a dashed line. The y axis ends a little above the highest smoothed
    loss before the minimum, so the blow-up runs off the top instead of flattening the descent."""
    from matplotlib.figure import Figure  # matplotlib is imported only when a plot is drawn

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.set_label("lr_find")
    ax.plot(result.lrs, result.losses, color="#1f77b4", alpha=0.3, linewidth=1, label="loss (batch)")
    ax.plot(result.lrs, result.smoothed, color="#1f77b4", linewidth=2, label="loss (smoothed)")
    s = result.suggestion
    ax.plot(
        [s["lr"]],
        [result.smoothed[s["index"]]],
        "o",
        color="#d62728",
        markersize=8,
        label=f"suggested lr {s['lr']:.1e}",
    )
    ax.axvline(s["min_lr"], color="#7f7f7f", linestyle="--", linewidth=1, label=f"minimum/10 {s['min_lr']:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(
        "LR range test" + (f" (stopped early: {result.stop_reason})" if result.stopped_early else ""), fontsize=9
    )
    descent = result.smoothed[: s["min_loss_index"] + 1]
    low, high = min(result.smoothed), max(descent)
    if high > low:
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_lr_find(result: LrFindResult, path: str | Path) -> None:
    """Draw `lr_find_figure` and write it to `path` as PNG, atomically."""
    buf = io.BytesIO()
    lr_find_figure(result).savefig(buf, format="png", dpi=PNG_DPI)
    atomic_write_bytes(Path(path), lambda f: f.write(buf.getvalue()))


def write_outputs(out: Path, result: LrFindResult, settings: dict[str, Any]) -> None:
    """lr_find.csv, lr_find.json (the result and `settings`) and lr_find.png into `out` (created), each atomically."""
    make_folder(out)
    atomic_write_text(out / CSV_NAME, csv_text(result))
    atomic_write_text(out / JSON_NAME, json.dumps({**result.to_dict(), **settings}, indent=2) + "\n")
    plot_lr_find(result, out / PNG_NAME)


def settings_of(state: RunState, start_lr: float, end_lr: float, steps: int, divergence: float) -> dict[str, Any]:
    """What produced a range test: its arguments, the config, the data source, versions and machine."""
    run = {k: v for k, v in provenance(state.device, state.precision).items() if k not in ("status", "end_time")}
    return {
        "range": {"start_lr": start_lr, "end_lr": end_lr, "steps": steps, "divergence": divergence, "beta": BETA},
        "config": state.config.to_dict(),
        "data": state.data.source.to_dict(),
        "train_images": int(len(state.data.splits.train_labels)),
        **run,
    }


def run_lr_find(
    config: TrainConfig,
    data: str | DataSource | None = None,
    out: str | Path = "runs/lr_find",
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    divergence: float = 4.0,
    home: Path | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> LrFindResult:
    """The LR range test of `config` on `data` (default CIFAR-10): up to `steps` optimizer steps at LRs growing
    geometrically from `start_lr` to `end_lr` (`lr_schedule`), over the training batches epoch after epoch; stops
    early when the smoothed loss passes `divergence` x its minimum or a loss is not finite. Writes lr_find.csv,
    lr_find.json and lr_find.png into `out` and returns the result; the model and optimizer are thrown away.

    The suggestion is for `--lr`: every parameter group ran at its own multiple of the swept LR (head_lr_factor; with
    muon, muon_lr / lr), as it would in training. One process only: under torchrun, run it without.
    """
    check_arguments(start_lr, end_lr, steps, divergence)
    if env_world_size() > 1:
        raise CifarCnnError("the LR range test runs in one process: start it without torchrun")
    out = Path(out)
    refuse_non_folder(out)
    tune_allocator()
    set_threads(threads)
    state = build_run_state(config, data, DistContext(), home=home, threads=threads, log=log)
    log(
        f"lr range test: up to {steps} steps of {config.batch_size} images, lr {start_lr:.1e} to {end_lr:.1e} "
        f"({config.model}, {config.optimizer}, {state.device}, {state.precision})"
    )
    if config.accum_steps > 1 or config.freeze_epochs:
        log(
            "lr range test: one update per batch of batch_size (accum_steps ignored) with the whole network "
            "trainable (freeze_epochs ignored; freeze_backbone is kept): the suggestion is for that setting"
        )
    lrs, losses, reason = sweep(state, lr_schedule(start_lr, end_lr, steps), divergence)
    if len(lrs) < MIN_POINTS:
        raise CifarCnnError(
            f"the loss blew up after {len(lrs)} step(s) ({reason}), too few to read a curve from: "
            f"lower --start-lr (now {start_lr:g}) or --end-lr (now {end_lr:g})"
        )
    smoothed = smooth(losses)
    result = LrFindResult(
        lrs, losses, smoothed, suggest_lr(lrs, smoothed), bool(reason), len(lrs), reason, str(out.absolute())
    )
    write_outputs(out, result, settings_of(state, start_lr, end_lr, steps, divergence))
    s = result.suggestion
    log(
        f"suggested lr {s['lr']:.1e} ({s['method']}); minimum/10: {s['min_lr']:.1e}; "
        f"plot: {(out / PNG_NAME).absolute()}"
    )
    return result
