"""What a training run tells its watchers: the running totals of an epoch, and the observer interface.

`engine.train(progress=...)` calls `epoch_start` when an epoch starts, `step` after every optimizer step and
`epoch_end` with the epoch's metrics row. The progress bar and TensorBoard logger (cifar_cnn.progress) and the
hyper-parameter search's pruning reporter (cifar_cnn.tune) implement it; `Observers` combines several into one.
This module sits below the engine and everything that watches it, so none of them imports the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


class EpochTotals:
    """Running sums of one epoch, kept in checkpoints so an epoch resumed in the middle reports the same numbers.

    The training loop adds each batch's loss and correct count as tensors (`add`), which stay on the device: adding
    never waits for the device. Reading `loss_sum` or `correct` (a progress line, the epoch's row, a checkpoint)
    brings the pending sums to the host, one synchronization for all the steps since the last read."""

    def __init__(self, loss_sum: float = 0.0, correct: int = 0, seen: int = 0) -> None:
        self._loss_sum, self._correct, self.seen = float(loss_sum), int(correct), int(seen)
        self._pending_loss: Any = None  # tensors on the device, or None
        self._pending_correct: Any = None

    def add(self, loss_sum: Any, correct: Any, seen: int) -> None:
        """Add a batch: `loss_sum` and `correct` are 0-d tensors (kept where they are), `seen` its image count."""
        # float64 on the device: in practice the sum does not depend on its grouping, so reading it mid-epoch (a
        # progress line, an interrupt's checkpoint) changes nothing (a resumed epoch reports the same loss)
        loss_sum, correct = loss_sum.detach().double(), correct.detach()
        has = self._pending_loss is not None
        self._pending_loss = self._pending_loss + loss_sum if has else loss_sum
        self._pending_correct = self._pending_correct + correct if has else correct
        self.seen += seen

    def _settle(self) -> None:
        if self._pending_loss is not None:
            self._loss_sum += float(self._pending_loss)
            self._correct += int(self._pending_correct)
            self._pending_loss = self._pending_correct = None

    @property
    def loss_sum(self) -> float:
        self._settle()
        return self._loss_sum

    @loss_sum.setter
    def loss_sum(self, value: float) -> None:
        self._settle()
        self._loss_sum = float(value)

    @property
    def correct(self) -> int:
        self._settle()
        return self._correct

    @correct.setter
    def correct(self, value: int) -> None:
        self._settle()
        self._correct = int(value)

    def as_dict(self) -> dict[str, float | int]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EpochTotals) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"EpochTotals({self.loss_sum!r}, {self.correct!r}, {self.seen!r})"

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
