"""The LR range test: the schedule, the smoothing and the suggestion against numbers worked out independently
(numpy's geomspace, an EMA by hand, curves whose steepest point is known), and an end-to-end run on a tiny data set."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cifar_cnn import lr_find
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.lr_find import (
    LR_FIND_FILES,
    LrFindResult,
    lr_find_figure,
    lr_schedule,
    run_lr_find,
    smooth,
    suggest_lr,
)

from .conftest import run_cli
from .helpers import quiet, small_config

# ---- lr_schedule --------------------------------------------------------------------------------------------------


def test_schedule_is_geometric_with_exact_endpoints() -> None:
    lrs = lr_schedule(1e-7, 10.0, 100)
    assert len(lrs) == 100 and lrs[0] == 1e-7 and lrs[-1] == 10.0
    ratios = np.asarray(lrs[1:]) / np.asarray(lrs[:-1])
    assert ratios == pytest.approx(np.full(99, 10 ** (8 / 99)), rel=1e-12)
    assert lrs == pytest.approx(np.geomspace(1e-7, 10.0, 100), rel=1e-12)


@pytest.mark.parametrize(
    ("start", "end", "steps"), [(0.0, 1.0, 10), (1.0, 0.1, 10), (1e-3, math.inf, 10), (1e-3, 1.0, 1)]
)
def test_schedule_refuses_bad_ranges(start: float, end: float, steps: int) -> None:
    with pytest.raises(CifarCnnError):
        lr_schedule(start, end, steps)


# ---- smooth -------------------------------------------------------------------------------------------------------


def test_smooth_is_the_debiased_ema_by_hand() -> None:
    # beta 0.9: avg = 0.3, 0.27 + 0.1 = 0.37, 0.333 + 0.2 = 0.533; divided by 1 - 0.9, 1 - 0.81, 1 - 0.729
    assert smooth([3.0, 1.0, 2.0], beta=0.9) == pytest.approx([3.0, 0.37 / 0.19, 0.533 / 0.271], rel=1e-12)
    # the default beta 0.98: avg = 0.06, 0.0588 + 0.02 = 0.0788, 0.077224 + 0.04 = 0.117224
    assert smooth([3.0, 1.0, 2.0]) == pytest.approx([3.0, 0.0788 / 0.0396, 0.117224 / 0.058808], rel=1e-12)


def test_smooth_keeps_a_constant() -> None:
    """The debiasing: without it the first values would be pulled towards 0."""
    assert smooth([2.5] * 20) == pytest.approx([2.5] * 20, rel=1e-12)


# ---- suggest_lr ---------------------------------------------------------------------------------------------------

LRS = lr_schedule(1e-7, 10.0, 100)
LOG_LR = np.log10(LRS)


def descent(centre: float, width: float = 0.4) -> np.ndarray:
    """A loss falling from 2.3 to 0.3 as a logistic curve in log10(lr): steepest exactly at log10(lr) = centre."""
    return 2.3 - 2.0 / (1 + np.exp(-(LOG_LR - centre) / width))


def blow_up(after: float = -1.0) -> np.ndarray:
    """A quadratic rise after log10(lr) = after."""
    return np.where(after < LOG_LR, 30 * (LOG_LR - after) ** 2, 0.0)


@pytest.mark.parametrize("centre", [-3.0, -5.0])
def test_suggestion_is_where_the_loss_falls_fastest(centre: float) -> None:
    losses = descent(centre) + blow_up()
    s = suggest_lr(LRS, list(losses))
    assert abs(math.log10(s["lr"]) - centre) <= 0.15
    assert s["method"] == "steepest descent" and s["lr"] == LRS[s["index"]]
    low = int(np.argmin(losses))
    assert s["min_loss_index"] == low and s["min_loss_lr"] == LRS[low] and s["min_lr"] == pytest.approx(LRS[low] / 10)


def test_suggestion_ignores_the_blow_up_after_the_minimum() -> None:
    """After the minimum the loss shoots up and crashes down again, far more steeply than the real descent."""
    losses = descent(-3.0) + blow_up()
    crash = LOG_LR > 0.0
    losses[crash] = 40.0 - 200 * (LOG_LR[crash] - 0.0)
    losses = np.maximum(losses, 5.0) * (LOG_LR > -0.5) + losses * (LOG_LR <= -0.5)
    slope = np.gradient(losses, LOG_LR)
    assert np.argmin(slope) > np.argmin(losses)  # the naive steepest point lies in the blow-up
    assert abs(math.log10(suggest_lr(LRS, list(losses))["lr"]) + 3.0) <= 0.15


def test_suggestion_skips_the_noisy_first_points() -> None:
    losses = descent(-3.0) + blow_up()
    losses[:3] = [9.0, 6.0, 3.0]  # a steep fall among the first points, as the first averages of few batches make
    assert abs(math.log10(suggest_lr(LRS, list(losses))["lr"]) + 3.0) <= 0.15
    losses[:3] = [0.0, 3.0, 2.3]  # one lucky first batch, lower than anything after it
    s = suggest_lr(LRS, list(losses))
    assert abs(math.log10(s["lr"]) + 3.0) <= 0.15 and s["min_loss_index"] > 3


def test_suggestion_stops_at_the_first_non_finite_loss() -> None:
    losses = descent(-3.0) + blow_up()
    cut = list(losses[:80]) + [math.inf, math.nan] + list(losses[82:])
    assert suggest_lr(LRS, cut) == suggest_lr(LRS[:80], list(losses[:80]))


def test_a_loss_that_never_falls_has_no_suggestion() -> None:
    s = suggest_lr(LRS[:20], [1.0 + i for i in range(20)])
    assert s["method"].startswith("none") and s["index"] == s["min_loss_index"] <= 2 and s["lr"] == LRS[s["index"]]


def test_suggest_refuses_too_few_points_and_mismatched_lengths() -> None:
    with pytest.raises(CifarCnnError, match="at least 5 points"):
        suggest_lr(LRS[:4], [2.0, 1.5, 1.0, 0.9])
    with pytest.raises(CifarCnnError, match="at least 5 points"):
        suggest_lr(LRS[:6], [2.0, 1.5, 1.0, math.nan, 0.5, 0.4])
    with pytest.raises(CifarCnnError, match="one loss per LR"):
        suggest_lr(LRS[:6], [2.0] * 5)


# ---- the figure ---------------------------------------------------------------------------------------------------


def test_figure_marks_the_suggestion_on_a_log_axis() -> None:
    losses = list(descent(-3.0) + blow_up())
    result = LrFindResult(LRS, losses, losses, suggest_lr(LRS, losses), False, len(LRS))
    ax = lr_find_figure(result).axes[0]
    assert ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    s = result.suggestion
    point = lines[f"suggested lr {s['lr']:.1e}"]
    assert list(point.get_xdata()) == [s["lr"]] and list(point.get_ydata()) == [losses[s["index"]]]
    assert list(lines["loss (smoothed)"].get_xdata()) == LRS
    assert f"suggested lr {s['lr']:.1e}" in [t.get_text() for t in ax.get_legend().get_texts()]


# ---- run_lr_find end to end ---------------------------------------------------------------------------------------


def read_rows(out: Path) -> list[dict[str, float]]:
    with (out / "lr_find.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_run_writes_the_curve_and_trains_every_group_at_its_share(
    tmp_path: Path, official_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 steps over 30 batches per epoch (480 training images, batch 16): the sweep goes on into a second epoch.
    Every parameter group steps at the schedule's LR times its factor (head_lr_factor 2 for the head)."""
    seen: list[list[float]] = []
    real_update = lr_find.apply_update

    def spy(optimizer: Any, scaler: Any, clip_grad: float = 0.0) -> bool:
        seen.append([g["lr"] for g in optimizer.param_groups])
        return real_update(optimizer, scaler, clip_grad)

    monkeypatch.setattr(lr_find, "apply_update", spy)
    config = small_config(batch_size=16, head_lr_factor=2.0)
    messages: list[str] = []
    out = tmp_path / "find"
    result = run_lr_find(
        config, str(official_dir), out, start_lr=1e-4, end_lr=0.3, steps=40, threads=1, log=messages.append
    )
    schedule = lr_schedule(1e-4, 0.3, 40)
    assert not result.stopped_early and result.steps_run == 40 and result.stop_reason == ""
    assert sorted(p.name for p in out.iterdir()) == sorted(lr_find.LR_FIND_FILES)
    rows = read_rows(out)
    assert len(rows) == result.steps_run
    assert [r["lr"] for r in rows] == schedule == result.lrs
    assert [r["loss"] for r in rows] == result.losses
    assert [r["smoothed"] for r in rows] == pytest.approx(smooth([r["loss"] for r in rows]), rel=1e-12)
    assert np.asarray(seen) == pytest.approx(np.asarray([[lr, 2 * lr] for lr in schedule]), rel=1e-12)
    assert result.losses[0] == pytest.approx(math.log(10), abs=0.3)  # a fresh 10-class model: about chance
    s = result.suggestion
    assert s == suggest_lr(result.lrs, result.smoothed) and s["lr"] in result.lrs
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["suggestion"] == s and saved["losses"] == result.losses and saved["steps_run"] == 40
    assert saved["config"]["model"] == "seed_cnn" and saved["config"]["head_lr_factor"] == 2.0
    assert saved["range"] == {"start_lr": 1e-4, "end_lr": 0.3, "steps": 40, "divergence": 4.0, "beta": 0.98}
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pattern = r"suggested lr (\S+) \(steepest descent\); minimum/10: (\S+); plot: (.+)"
    found = re.fullmatch(pattern, messages[-1])
    assert found, messages[-1]
    assert found.groups() == (f"{s['lr']:.1e}", f"{s['min_lr']:.1e}", str((out / "lr_find.png").absolute()))


def test_run_stops_when_the_loss_blows_up(tmp_path: Path, official_dir: Path) -> None:
    """Divergence 1.5 x the minimum, so that the smoothed loss crosses it a step or more before it explodes: the stop
    must come at the first step past it."""
    config = small_config(batch_size=16)
    out = tmp_path / "find"
    result = run_lr_find(config, str(official_dir), out, start_lr=1e-4, end_lr=1e4, steps=30, divergence=1.5, log=quiet)
    assert result.stopped_early and 5 <= result.steps_run < 30 and result.stop_reason
    rows = read_rows(out)
    assert len(rows) == result.steps_run and [r["lr"] for r in rows] == lr_schedule(1e-4, 1e4, 30)[: len(rows)]
    sm = [r["smoothed"] for r in rows]
    # it stopped at the first step that broke the rule, not before: every earlier step kept within 1.5 x the minimum
    assert all(sm[i] <= 1.5 * min(sm[: i + 1]) for i in range(len(sm) - 1))
    if "smoothed" in result.stop_reason:
        assert sm[-1] > 1.5 * min(sm)
    else:  # the next loss was not finite (and is not in the file)
        assert "loss became" in result.stop_reason and sm[-1] <= 1.5 * min(sm)
    s = result.suggestion
    assert s["lr"] == result.lrs[s["index"]] and s["lr"] < result.lrs[-1] and s["index"] <= s["min_loss_index"]
    assert json.loads((out / "lr_find.json").read_text())["stopped_early"] is True


@pytest.mark.parametrize("bad_step", [9, 3])
def test_run_stops_at_a_loss_that_is_not_finite(
    tmp_path: Path, official_dir: Path, monkeypatch: pytest.MonkeyPatch, bad_step: int
) -> None:
    """A NaN loss at step `bad_step` (counting from 1) ends the sweep; that step is not recorded. Fewer than 5
    recorded steps make no curve: an error that says what to change."""
    calls = []
    real_step = lr_find.train_step

    def nan_at(state: Any, x: torch.Tensor, y: torch.Tensor) -> float:
        calls.append(1)
        return math.nan if len(calls) == bad_step else real_step(state, x, y)

    monkeypatch.setattr(lr_find, "train_step", nan_at)
    out = tmp_path / "find"
    if bad_step <= 5:
        with pytest.raises(CifarCnnError, match=r"blew up after 2 step\(s\).*lower --start-lr"):
            run_lr_find(small_config(batch_size=16), str(official_dir), out, steps=20, log=quiet)
        assert not out.exists()  # nothing written
        return
    result = run_lr_find(small_config(batch_size=16), str(official_dir), out, steps=20, log=quiet)
    assert result.stopped_early and result.steps_run == bad_step - 1 == len(read_rows(out)) and len(calls) == bad_step
    assert result.stop_reason == f"the loss became nan at lr {lr_schedule(1e-7, 10.0, 20)[bad_step - 1]:.1e}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_lr": 0.0}, r"--start-lr must be a positive number, got 0"),
        ({"start_lr": 1.0, "end_lr": 0.5}, r"--end-lr must be a number above --start-lr \(1\), got 0.5"),
        ({"end_lr": math.inf}, r"--end-lr .* got inf"),
        ({"steps": 4}, r"--steps must be an integer of at least 5, got 4"),
        ({"divergence": 1.0}, r"--divergence must be a number above 1 .* got 1$"),
    ],
)
def test_run_refuses_bad_arguments_before_reading_data(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CifarCnnError, match=message):
        run_lr_find(small_config(), str(tmp_path / "no-such-data"), tmp_path / "out", log=quiet, **kwargs)
    assert not (tmp_path / "out").exists()


def test_run_refuses_a_file_as_out(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "taken"
    out.write_text("mine")
    with pytest.raises(CifarCnnError, match="exists and is not a folder"):
        run_lr_find(small_config(), str(official_dir), out, steps=5, log=quiet)
    assert out.read_text() == "mine"


def test_the_command_writes_the_plot_and_prints_the_suggestion(official_dir: Path, data_home: Path) -> None:
    """`cifar-cnn lr-find` end to end in a fresh process, as a user runs it: --json gives the result, the files are
    there, and the suggestion is one of the LRs it tried."""
    out = official_dir.parent / "lrf"
    done = run_cli(
        "lr-find",
        "--data",
        str(official_dir),
        "--batch-size",
        "16",
        "--steps",
        "12",
        "--start-lr",
        "1e-4",
        "--out",
        str(out),
        "--json",
        "--threads",
        "1",
        env={"CIFAR_CNN_HOME": str(data_home)},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["suggestion"]["lr"] in result["lrs"]
    assert all((out / name).is_file() for name in LR_FIND_FILES)
    assert "suggested lr" in done.stderr
