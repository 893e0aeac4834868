"""The observer interface of a training run: Observers forwards every call in order, run_start only to the observers
that define it, and drops None; EpochTotals turns running sums into a mean loss and an accuracy."""

from __future__ import annotations

import pytest

from cifar_cnn.hooks import EpochTotals, Observers


class Recorder:
    """Records every call it gets into a shared list, tagged with its name."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def epoch_start(self, epoch: int, epochs: int, steps: int, start_step: int, batch_size: int) -> None:
        self.calls.append((self.name, "epoch_start", (epoch, epochs, steps, start_step, batch_size)))

    def step(self, step: int, totals: EpochTotals) -> None:
        self.calls.append((self.name, "step", (step, totals)))

    def epoch_end(self, row: dict) -> None:
        self.calls.append((self.name, "epoch_end", (row,)))


class StartRecorder(Recorder):
    def run_start(self, state: object) -> None:
        self.calls.append((self.name, "run_start", (state,)))


def test_observers_forward_every_call_in_order_and_skip_none() -> None:
    calls: list = []
    a, b = Recorder("a", calls), StartRecorder("b", calls)
    obs = Observers([a, None, b, None])
    assert obs.observers == [a, b]
    state, totals, row = object(), EpochTotals(1.0, 1, 2), {"epoch": 1}
    obs.run_start(state)  # a has no run_start: only b gets it, and a must not raise
    obs.epoch_start(0, 3, 15, 4, 32)
    obs.step(5, totals)
    obs.epoch_end(row)
    assert calls == [
        ("b", "run_start", (state,)),
        ("a", "epoch_start", (0, 3, 15, 4, 32)),
        ("b", "epoch_start", (0, 3, 15, 4, 32)),
        ("a", "step", (5, totals)),
        ("b", "step", (5, totals)),
        ("a", "epoch_end", (row,)),
        ("b", "epoch_end", (row,)),
    ]
    assert calls[3][2][1] is totals and calls[5][2][0] is row  # the same objects, not copies


def test_no_observers_is_a_no_op() -> None:
    obs = Observers([None])
    assert obs.observers == []
    obs.run_start(object())
    obs.epoch_start(0, 1, 1, 0, 1)
    obs.step(0, EpochTotals())
    obs.epoch_end({})


def test_epoch_totals() -> None:
    t = EpochTotals(loss_sum=12.5, correct=7, seen=10)
    assert t.loss == pytest.approx(1.25) and t.accuracy == pytest.approx(0.7)
    assert t.as_dict() == {"loss_sum": 12.5, "correct": 7, "seen": 10}
    assert EpochTotals(**t.as_dict()) == t  # what a checkpoint stores rebuilds the same totals
    empty = EpochTotals()
    assert (empty.loss, empty.accuracy) == (0.0, 0.0)  # nothing seen yet: 0, not a division by zero
    assert empty.as_dict() == {"loss_sum": 0.0, "correct": 0, "seen": 0}
