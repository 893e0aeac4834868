"""The benchmark: FLOP counting against a hand count, and a tiny end-to-end bench with its JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_cnn import bench
from cifar_cnn.bench import run_bench, throughput

from .conftest import make_images, write_official_batches


def test_flops_of_seed_cnn_by_hand() -> None:
    r = throughput("seed", steps=2, warmup=1, device="cpu", batch_size=8)
    conv1 = 2 * 3 * 9 * 16 * 32 * 32  # multiply-adds x 2, per output element
    conv2 = 2 * 16 * 9 * 32 * 16 * 16
    fc = 2 * 2048 * 512 + 2 * 512 * 10
    assert r["forward_gflop_per_img"] * 1e9 == pytest.approx(conv1 + conv2 + fc)
    assert r["train_img_per_s"] > 0 and r["infer_img_per_s"] > 0 and r["peak_memory_mb"] > 0


def test_bench_end_to_end(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "bench"
    result = run_bench(
        out, recipes=["seed"], seeds=[0], data=str(official_dir), device="cpu", threads=1, log=lambda m: None
    )
    saved = json.loads((out / "bench.json").read_text())
    assert saved["runs"][0]["recipe"] == "seed" and 0 <= saved["runs"][0]["accuracy"] <= 1
    assert saved["runs"][0]["wall_s"] > 0 and result["throughput"][0]["model"] == "seed_cnn"
    md = (out / "bench.md").read_text()
    assert "| seed | seed_cnn |" in md and "| seed | 0 |" in md


@pytest.mark.slow  # 2-3 minutes: a benchmark run, by hand (--runslow)
def test_time_to_target(tmp_path: Path) -> None:
    """The seed recipe trains to the end and sets the target; quick, given learning rates too small to move its
    weights (overrides reach every recipe but the seed baseline), certainly stays far below it: it runs all its
    epochs, every one probed, and reaches nothing."""
    x, y = make_images(120, seed=1)  # 1,200 training images: the quick recipe's batch of 1,000 fits
    tx, ty = make_images(20, seed=2)
    data = write_official_batches(tmp_path / "cifar-10-batches-py", x, y, tx, ty)
    out = tmp_path / "bench"
    frozen = {"lr": 1e-9, "muon_lr": 1e-9, "epochs": 2}  # two epochs are enough to see every epoch probed
    result = run_bench(
        out,
        recipes=["seed", "quick"],
        seeds=[0],
        data=str(data),
        to_target=True,
        probe_images=700,
        overrides=frozen,
        device="cpu",
        threads=1,
        log=lambda m: None,
    )
    saved = json.loads((out / "bench.json").read_text())
    seed, quick = saved["to_target"]
    assert seed["recipe"] == "seed" and seed["probe_every_steps"] == 35  # 700 images in steps of 20
    steps = [p["step"] for p in seed["curve"]]  # every 35 steps, and at the end of each epoch of 960 images
    assert steps == sorted({35 * k for k in range(1, 14)} | {48 * e for e in range(1, 11)})
    assert all(b["seconds"] > a["seconds"] for a, b in zip(seed["curve"], seed["curve"][1:]))
    # the target is the seed recipe's final test accuracy (best.pt), which one of its probes measured too
    assert seed["target"] == seed["final_accuracy"] >= 0.9  # the classes differ in colour: the seed recipe learns
    assert any(abs(p["accuracy"] - seed["final_accuracy"]) < 1e-9 for p in seed["curve"])
    assert seed["reached"] == next(p for p in seed["curve"] if p["accuracy"] >= seed["target"])
    assert "\nlr: 0.01\n" in (out / "seed-seed0-to-target" / "config.yaml").read_text()  # the baseline as it is
    assert "\nlr: 1.0e-09\n" in (out / "quick-seed0-to-target" / "config.yaml").read_text()
    assert quick["target"] == seed["target"] and quick["final_accuracy"] is None and quick["reached"] is None
    assert [p["step"] for p in quick["curve"]] == [1, 2]  # one step per epoch, 2 epochs, all probed
    assert all(p["accuracy"] < 0.5 for p in quick["curve"])  # an untrained net: about chance (10%)
    assert result["to_target_ratios"] == []  # no time to compare with
    md = (out / "bench.md").read_text()
    assert f"| seed | 0 | {100 * seed['target']:.2f}% |" in md
    assert f"| quick | 0 | {100 * seed['target']:.2f}% | no | - | - | 1 |" in md


def test_to_target_ratio_compares_the_times_of_the_recipes_that_reached_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """to_target_bench's bookkeeping with canned runs: the target is the seed runs' mean final accuracy, each run's
    first probe at it counts, and a ratio is given only for a recipe that reached it."""
    curves = {  # (seconds, accuracy) of each probe
        "seed": [(10.0, 0.5), (20.0, 0.8), (30.0, 0.79)],
        "quick": [(1.0, 0.7), (2.0, 0.85), (3.0, 0.9)],
        "fast": [(1.0, 0.2), (2.0, 0.3)],
    }
    calls = []

    def canned(recipe: str, seed: int, data: str, out: Path, *, target: float | None, overrides=None, **_) -> dict:
        calls.append((recipe, target, overrides))
        curve = [
            {"step": i + 1, "images": 10 * (i + 1), "seconds": t, "accuracy": a}
            for i, (t, a) in enumerate(curves[recipe])
        ]
        reached = None
        if target is not None:  # a run with a target stops at the first probe that reaches it
            reached = next((p for p in curve if p["accuracy"] >= target), None)
            curve = curve[: curve.index(reached) + 1] if reached else curve
        final = curve[-1]["accuracy"] if target is None else None
        return {
            "recipe": recipe,
            "seed": seed,
            "target": target,
            "reached": reached,
            "final_accuracy": final,
            "train_s": 40.0,
            "probe_every_steps": 1,
            "tta": "none",
            "curve": curve,
        }

    monkeypatch.setattr(bench, "time_to_target", canned)
    runs, ratios = bench.to_target_bench(
        ["seed", "quick", "fast"], [0], "data", tmp_path, overrides={"ema_decay": 0.5}, log=lambda m: None
    )
    assert calls == [("seed", None, None), ("quick", 0.79, {"ema_decay": 0.5}), ("fast", 0.79, {"ema_decay": 0.5})]
    seed, quick, fast = runs
    assert seed["target"] == 0.79 and seed["reached"]["seconds"] == 20.0  # the first probe at 0.79, not the last
    assert quick["reached"]["seconds"] == 2.0 and fast["reached"] is None
    assert ratios == [
        "time to 79.00%: seed recipe / quick = 20.0 s / 2.0 s = 10.00x (medians, same invocation, probes excluded)"
    ]


@pytest.mark.slow  # 2 minutes: a benchmark run, by hand (--runslow)
def test_time_to_target_stops_at_the_target_with_overrides(tmp_path: Path) -> None:
    x, y = make_images(120, seed=1)
    tx, ty = make_images(20, seed=2)
    data = write_official_batches(tmp_path / "cifar-10-batches-py", x, y, tx, ty)
    out = tmp_path / "bench"
    result = run_bench(
        out,
        recipes=["quick"],
        seeds=[0],
        data=str(data),
        to_target=True,
        target=1e-6,
        overrides={"ema_decay": 0.5, "epochs": 3},
        device="cpu",
        threads=1,
        log=lambda m: None,
    )
    (quick,) = result["to_target"]
    # one step per epoch (1,200 images, batch 1,000): the first probe is at step 1 and reaches any accuracy > 0
    assert quick["curve"] == [quick["reached"]] and quick["reached"]["step"] == 1 and quick["final_accuracy"] is None
    run = out / "quick-seed0-to-target"
    assert "ema_decay: 0.5" in (run / "config.yaml").read_text() and "epochs: 3" in (run / "config.yaml").read_text()
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["ema_state"]["updates"] == 1 and last["batch_in_epoch"] == 0 and last["epoch"] == 1
    assert json.loads((out / "bench.json").read_text())["overrides"] == {"ema_decay": 0.5, "epochs": 3}


def test_bench_against_the_notebook_loop_with_the_frontier(tmp_path: Path, official_dir: Path) -> None:
    """The notebook's own loop runs first, then the instant recipe (on the 600 images it takes them all: it caps,
    not requires, its 25,000); each recipe is compared with the loop seed by seed, and the frontier is written."""
    out = tmp_path / "bench"
    lines: list[str] = []
    result = run_bench(
        out,
        recipes=["instant"],
        seeds=[0],
        data=str(official_dir),
        device="cpu",
        threads=1,
        notebook=True,
        pareto=True,
        log=lines.append,
    )
    (loop,) = result["notebook"]
    (instant,) = result["runs"]
    assert loop["epochs"] == 10 and len(loop["history"]) == 10 and loop["wall_s"] > 0
    assert lines.index(next(x for x in lines if x.startswith("notebook loop seed 0"))) < lines.index(
        next(x for x in lines if x.startswith("instant seed 0"))
    )
    (ratio,) = result["ratios"]
    expected = loop["wall_s"] / instant["wall_s"]
    assert ratio.startswith(f"notebook loop / instant = {loop['wall_s']:.1f} s / {instant['wall_s']:.1f} s = ")
    assert f"= {expected:.1f}x" in ratio
    reached = instant["accuracy"] >= loop["accuracy"]
    assert ("reaches the notebook loop's test accuracy on every seed" in ratio) == reached
    md = (out / "bench.md").read_text()
    assert f"| the notebook's loop | 0 | {100 * loop['accuracy']:.2f}% | none |" in md
    names = {p["name"]: p for p in json.loads((out / "pareto.json").read_text())["points"]}
    assert set(names) == {"the notebook's loop", "instant"}
    assert names["instant"]["accuracy"] == instant["accuracy"]
    assert (out / "pareto.md").exists() and (out / "pareto.svg").exists()


def test_bench_refuses_the_notebook_with_throughput_only(tmp_path: Path) -> None:
    with pytest.raises(bench.CifarCnnError, match="--notebook and --pareto time whole runs"):
        run_bench(tmp_path, recipes=["seed"], seeds=[0], data="x", throughput_only=True, notebook=True)
