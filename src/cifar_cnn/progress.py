"""Watching a training: a progress bar (or plain lines) per epoch, and TensorBoard logging.

Both are *observers* of `engine.train(progress=...)`: the engine calls `epoch_start`, `step` after every optimizer
step and `epoch_end` with the epoch's metrics row. Library use passes none; the command line turns them on.
On a terminal the bar is drawn with tqdm (batches, loss, accuracy, img/s, ETA); when the stream is not a terminal (CI
logs, files) or tqdm is missing, it prints plain lines at every tenth of an epoch, with no control codes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .data.preprocess import denormalize
from .errors import CifarCnnError
from .hooks import EpochTotals, Observers, TrainProgress
from .names import shown_text

__all__ = ["EpochTotals", "Observers", "ProgressBar", "TensorBoardLogger", "TrainProgress", "training_sample"]

if TYPE_CHECKING:
    from .engine.state import RunState


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """Per-epoch progress on `stream`: a tqdm bar on a terminal, plain lines elsewhere (`plain=True` forces them).

    Use `log` for other messages while training runs, so they do not tear the bar.
    """

    def __init__(self, stream: IO[str] | None = None, *, plain: bool | None = None, lines_per_epoch: int = 10) -> None:
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._tqdm: Any = None
        if not plain and (plain is not None or tty):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            self._tqdm = tqdm
        self.lines_per_epoch = max(1, lines_per_epoch)
        self.refresh_s = 0.5  # the bar's loss and accuracy: at most this often
        self._shown = 0.0
        self._bar: Any = None
        self._epoch = self._epochs = self._steps = self._start_step = self._batch_size = 0
        self._t0 = 0.0
        self._next_line = 0

    @property
    def plain(self) -> bool:
        """True when progress is printed as plain lines (no terminal, or tqdm missing)."""
        return self._tqdm is None

    def log(self, message: str) -> None:
        """Print a message above the bar (or as a line); names of any bytes in it as cifar_cnn.names shows them."""
        message = shown_text(message)
        if self._bar is not None:
            self._tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int, batch_size: int) -> None:
        self.close()
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        self._start_step, self._batch_size = start_step, batch_size
        self._t0 = time.perf_counter()
        self._next_line = start_step + 1
        if not self.plain:
            self._bar = self._tqdm(
                total=steps,
                initial=start_step,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                file=self.stream,
                dynamic_ncols=True,
            )

    def _rate(self, step: int) -> tuple[float, float]:
        """(images per second, seconds left in this epoch) from the steps run since epoch_start."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        done = step + 1 - self._start_step
        per_step = elapsed / max(done, 1)
        return done * self._batch_size / elapsed, per_step * (self._steps - step - 1)

    def step(self, step: int, totals: EpochTotals) -> None:
        """Reads the totals (which waits for the device) only when it shows them: at a printed line, and on a
        terminal at most every `refresh_s` seconds."""
        done = step + 1
        if self._bar is not None:
            now = time.perf_counter()
            if now - self._shown >= self.refresh_s or done == self._steps:
                self._shown = now
                loss, acc = totals.loss, totals.accuracy  # first: reading them waits for the queued steps
                ips, _ = self._rate(step)
                self._bar.set_postfix_str(f"loss {loss:.4f} acc {100 * acc:.2f}% {ips:.0f} img/s", refresh=False)
            self._bar.update(1)
            return
        # a line after the first step (early speed and ETA), then at every tenth of the epoch and at its last step
        if done >= self._next_line or done == self._steps:
            loss, acc = totals.loss, totals.accuracy  # first: reading them waits for the queued steps
            ips, eta = self._rate(step)
            every = max(1, -(-self._steps // self.lines_per_epoch))
            self._next_line = (done // every + 1) * every
            tail = f"ETA {_clock(eta)}" if done < self._steps else f"{_clock(time.perf_counter() - self._t0)} elapsed"
            print(
                f"  epoch {self._epoch + 1}/{self._epochs}  step {done}/{self._steps}  loss {loss:.4f}  "
                f"acc {100 * acc:.2f}%  {ips:.0f} img/s  {tail}",
                file=self.stream,
                flush=True,
            )

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        """Remove the bar (the engine's epoch summary line takes its place)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TensorBoardLogger:
    """TensorBoard event files in `log_dir`: per-epoch losses, accuracies and LR; a sample training batch (as the
    model sees it, augmented); at the end (`finish`) test metrics and the confusion matrix as an image.

    The sample is the run's own first batch (`training_sample`), taken at `run_start` and logged at the first epoch;
    `sample=False` leaves it out.
    """

    def __init__(self, log_dir: str | Path, sample: bool = True) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CifarCnnError(
                "--tensorboard needs the tensorboard package: pip install 'cifar-cnn[report]' (or tensorboard)"
            ) from None
        self.log_dir = Path(log_dir)
        self._writer_cls = SummaryWriter
        self._writer: Any = None
        self._sample = sample
        self._state: Any = None
        self._opened = False
        self.epoch = 0

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_cls(str(self.log_dir))
        return self._writer

    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int, batch_size: int) -> None:
        self.epoch = epoch
        if self._writer is None and not self._opened:
            # opened at the first epoch, when the run directory exists; purge_step hides what an earlier
            # (overwritten or resumed) run logged from this epoch on
            self._writer = self._writer_cls(str(self.log_dir), purge_step=epoch)
            self._opened = True
        if self._sample and self._state is not None:
            self._sample = False
            images = training_sample(self._state, epoch)
            self._state = None  # the run's arrays are not kept alive by the logger
            self.writer.add_images("data/sample_batch", images, epoch, dataformats="NCHW")

    def run_start(self, state: RunState) -> None:
        self._state = state

    def step(self, step: int, totals: EpochTotals) -> None:
        pass

    def epoch_end(self, row: dict[str, Any]) -> None:
        e = int(row["epoch"])
        self.epoch = e
        w = self.writer
        w.add_scalar("loss/train", row["train_loss"], e)
        w.add_scalar("accuracy/train", row["train_acc"], e)
        if row.get("val_loss") is not None:
            w.add_scalar("loss/val", row["val_loss"], e)
            w.add_scalar("accuracy/val", row["val_acc"], e)
        w.add_scalar("lr", row["lr"], e)
        w.flush()

    def finish(self, test_metrics: dict[str, Any] | None) -> None:
        """Log the test metrics and the confusion matrix (an image; needs matplotlib), then close the files."""
        if test_metrics is not None:
            w = self.writer
            w.add_scalar("loss/test", test_metrics["loss"], self.epoch)
            w.add_scalar("accuracy/test", test_metrics["accuracy"], self.epoch)
            try:
                from .report import confusion_figure
            except ImportError:
                pass
            else:
                fig = confusion_figure(test_metrics["confusion_matrix"], test_metrics["classes"])
                w.add_figure("test/confusion_matrix", fig, self.epoch, close=False)
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def training_sample(state: RunState, epoch: int = 0, n: int = 64) -> Any:
    """The first `n` images of the run's first batch of `epoch`, from the engine's own loader (its order, flips,
    translation and cutout, at the run's input size), as the uint8 pixels (N, 3, H, W) the model sees."""
    _, x, _ = next(iter(state.loader.batches(epoch, 0)))
    return denormalize(x[:n], state.data.mean, state.data.std)
