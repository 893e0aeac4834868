"""What `cifar-cnn train` does around `engine.train()`, as a library function a notebook can call too: the progress
bar, TensorBoard (opened, fed, closed whatever happens), the report after training (reusing the test logits that
training just computed), and Ctrl-C / SIGTERM turned into a clean stop with a resumable checkpoint."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .config import TrainConfig
from .data import DataSource
from .engine import TrainResult, train
from .errors import CifarCnnError, Stopped
from .hooks import Observers
from .progress import ProgressBar, TensorBoardLogger
from .rundir import RunPaths


class StopOnSignal:
    """Ctrl-C or SIGTERM during training: finish the current step, save a resumable checkpoint and exit.
    A second Ctrl-C exits at once (checkpoints are written atomically, so nothing is left half-written). Once training
    is over (`at_once()`: calibration, the final test and the report poll nothing) a signal raises
    cifar_cnn.errors.Stopped at once, so a supervisor's grace period is never outlasted."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.signum: int | None = None
        self.stream = stream
        self.immediate = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.immediate:
            self.signum = signum
            raise Stopped(signum, name)
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"cifar-cnn: {name} received: stopping after the current step and saving a checkpoint (Ctrl-C again to "
            "quit at once)",
            file=self.stream or sys.stderr,
            flush=True,
        )

    def at_once(self) -> None:
        self.immediate = True
        if self.signum is not None:  # arrived after the last poll
            raise Stopped(self.signum, signal.Signals(self.signum).name)

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 143 after SIGTERM, as shells report them."""
        return 128 + (self.signum or signal.SIGINT)


def write_report(
    out: str | Path,
    data: str | DataSource | None,
    config: TrainConfig,
    result: TrainResult,
    threads: int | None,
    log: Callable[[str], None],
) -> str | None:
    """RUN_DIR/report/ after training, from the test logits training just computed; the training's results are safe
    whatever happens here (a failure is a warning with the command that retries)."""
    from .report import build_report  # matplotlib is imported only when a report is written

    try:
        summary = build_report(
            out,
            data,
            device=config.device,
            precision=config.precision,
            batch_size=config.eval_batch_size,
            threads=threads,
            test=result.test,
            log=log,
        )
    except (CifarCnnError, OSError) as exc:
        log(f"warning: could not write the report ({exc}); try again with: cifar-cnn report {Path(out).absolute()}")
        return None
    return summary["report"]


def train_and_report(
    config: TrainConfig,
    data: str | DataSource | None = None,
    out: str | Path = "runs/run",
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    tensorboard: bool = False,
    report: bool = True,
    stream: IO[str] | None = None,
    command: list[str] | None = None,
    home: Path | None = None,
    handle_signals: bool = True,
    dist_timeout: float | None = None,
) -> tuple[TrainResult, int]:
    """Train with a progress bar (or plain lines) on `stream`, optional TensorBoard event files, then the report.
    Returns (the result, the exit code: 0; 1 when label rows were skipped with --skip-bad; 130 / 143 when a signal
    interrupted training, and the result then says `interrupted` and last.pt resumes it). This is `cifar-cnn train`."""
    stream = stream or sys.stdout
    bar = ProgressBar(stream) if progress else None

    def log(message: str) -> None:
        if bar is not None:
            bar.log(message)
        else:
            print(message, file=stream, flush=True)

    board = TensorBoardLogger(RunPaths(Path(out)).tensorboard) if tensorboard else None
    observers = Observers([bar, board])
    stop = StopOnSignal() if handle_signals else None
    with stop if stop is not None else contextlib.nullcontext():
        try:
            result = train(
                config,
                data,
                out,
                resume=resume,
                overwrite=overwrite,
                threads=threads,
                home=home,
                log=log,
                command=command,
                should_stop=stop,
                progress=observers if observers.observers else None,
                dist_timeout=dist_timeout,
            )
        except BaseException:
            if board is not None:
                board.close()
            raise
        finally:
            if bar is not None:
                bar.close()
        if board is not None:
            board.finish(result.test_metrics)
            log(f"tensorboard: tensorboard --logdir {board.log_dir.absolute()}")
        if report and not result.interrupted:
            try:
                result.extra["report"] = write_report(out, data, config, result, threads, log)
            except Stopped as stopped:
                log(
                    f"{stopped} while writing the report: the run is complete (test_metrics.json is written); "
                    f"write the report with: cifar-cnn report {Path(out).absolute()}"
                )
                return result, stopped.exit_code
    if result.interrupted and stop is not None:
        return result, stop.exit_code
    return result, 1 if result.get("skipped_images") else 0  # images left out with --skip-bad
