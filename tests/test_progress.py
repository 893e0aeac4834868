"""The progress bar: plain lines off a terminal (every tenth of an epoch, no control codes), a bar on one."""

from __future__ import annotations

import io
import re

from cifar_cnn.hooks import EpochTotals
from cifar_cnn.progress import ProgressBar


def test_progress_plain_lines_off_a_terminal_and_a_bar_on_one() -> None:
    def drive(bar: ProgressBar) -> None:
        bar.epoch_start(0, 1, 40, 0, 10)
        t = EpochTotals()
        for step in range(40):
            t.loss_sum, t.correct, t.seen = t.loss_sum + 10 * 2.0, t.correct + 5, t.seen + 10
            bar.step(step, t)
        bar.epoch_end({})
        bar.close()

    plain = io.StringIO()
    drive(ProgressBar(plain))
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and "\x1b" not in plain.getvalue()
    assert [int(re.search(r"step (\d+)/40", line).group(1)) for line in lines] == [1, *range(4, 41, 4)]
    assert lines[1].startswith("  epoch 1/1  step 4/40  loss 2.0000  acc 50.00%") and "ETA" in lines[1]
    assert "step 40/40" in lines[-1] and "elapsed" in lines[-1]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bar = ProgressBar(term)
    assert not bar.plain
    drive(bar)
    assert "\r" in term.getvalue() and "epoch 1/1" in term.getvalue() and "batch" in term.getvalue()
