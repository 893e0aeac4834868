"""What a training run tells its watchers: the running totals of an epoch, and the observer interface.

`engine.train(progress=...)` calls `epoch_start` when an epoch starts, `step` after every optimizer step and
`epoch_end` with the epoch's metrics row. The progress bar and TensorBoard logger (cifar_cnn.progress) and the
hyper-parameter search's pruning reporter (cifar_cnn.tune) implement it; `Observers` combines several into one.
This module sits below the engine and everything that watches it, so none of them imports the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class EpochTotals:
    """Running sums of one epoch, kept in checkpoints so an epoch resumed in the middle reports the same numbers."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen}

    @property
    def loss(self) -> float:
        """Mean training loss per image so far."""
        return self.loss_sum / max(1, self.seen)

    @property
    def accuracy(self) -> float:
        """Training accuracy so far."""
        return self.correct / max(1, self.seen)


class TrainProgress(Protocol):
    """What `engine.train(progress=...)` calls; no-op methods are fine. An observer may also define
    `run_start(state)`, called once before the first step with the engine's RunState (the TensorBoard logger takes
    its sample batch from the run's own loader there)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int, batch_size: int) -> None: ...

    def step(self, step: int, totals: EpochTotals) -> None: ...

    def epoch_end(self, row: dict[str, Any]) -> None: ...


@runtime_checkable
class StopRequest(Protocol):
    """What `engine.train(should_stop=...)` may be beyond a callable: training polls it after every step; when
    training is over (calibration, the final test, the report poll nothing) the engine calls `at_once()`, and from
    then on a stop request raises cifar_cnn.errors.Stopped where the program is."""

    def __call__(self) -> bool: ...

    def at_once(self) -> None: ...


class Observers:
    """Several observers as one (the engine takes one `progress`); None entries are dropped."""

    def __init__(self, observers: Sequence[Any]) -> None:
        self.observers = [o for o in observers if o is not None]

    def run_start(self, state: Any) -> None:
        for o in self.observers:
            if hasattr(o, "run_start"):
                o.run_start(state)

    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int, batch_size: int) -> None:
        for o in self.observers:
            o.epoch_start(epoch, epochs, steps, start_step, batch_size)

    def step(self, step: int, totals: EpochTotals) -> None:
        for o in self.observers:
            o.step(step, totals)

    def epoch_end(self, row: dict[str, Any]) -> None:
        for o in self.observers:
            o.epoch_end(row)
