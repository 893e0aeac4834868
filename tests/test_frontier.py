"""Accuracy against wall time (cifar_cnn.frontier): points per recipe, the Pareto frontier checked against a brute
force over hand-made runs, and the files it writes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from cifar_cnn.frontier import ANCHORS, NOTEBOOK, dominates, points, write_frontier

MACHINE = {"cpu": "test cpu", "cores": 2, "threads": 2, "torch": "2.x", "gpu": None, "commit": "abc1234"}


def run(recipe: str, seed: int, acc: float, wall: float) -> dict:
    return {"recipe": recipe, "seed": seed, "accuracy": acc, "wall_s": wall}


def test_points_average_the_seeds_and_mark_the_frontier() -> None:
    notebook = [{"seed": 0, "accuracy": 0.67, "wall_s": 150.0}, {"seed": 1, "accuracy": 0.66, "wall_s": 160.0}]
    runs = [
        run("instant", 0, 0.69, 9.0),
        run("instant", 1, 0.70, 8.0),
        run("quick", 0, 0.88, 150.0),
        run("quick", 1, 0.89, 170.0),
        run("slow-and-worse", 0, 0.85, 400.0),
    ]
    pts = {p["name"]: p for p in points(notebook, runs)}
    assert pts["instant"]["accuracy"] == 0.695 and pts["instant"]["wall_s"] == 8.5
    assert (pts["instant"]["min_accuracy"], pts["instant"]["max_accuracy"]) == (0.69, 0.70)
    assert pts[NOTEBOOK]["wall_s"] == 155.0 and pts[NOTEBOOK]["seeds"] == [0, 1]
    # the notebook's loop is slower than quick and less accurate; slow-and-worse loses to quick
    assert {n for n, p in pts.items() if p["frontier"]} == {"instant", "quick"}
    assert [p["name"] for p in points(notebook, runs)] == ["instant", NOTEBOOK, "quick", "slow-and-worse"]


def test_the_frontier_is_what_a_brute_force_finds() -> None:
    import random

    rng = random.Random(4)
    for _ in range(50):
        runs = [run(f"r{i}", 0, round(rng.random(), 2), float(rng.randint(1, 9))) for i in range(8)]
        pts = points([], runs)
        for p in pts:
            mine = (p["accuracy"], p["wall_s"])
            beaten = any(
                q["accuracy"] >= mine[0] and q["wall_s"] <= mine[1] and (q["accuracy"], q["wall_s"]) != mine
                for q in pts
            )
            assert p["frontier"] == (not beaten)
        assert [p["wall_s"] for p in pts] == sorted(p["wall_s"] for p in pts)
    a, b = run("a", 0, 0.9, 5.0), run("b", 0, 0.9, 5.0)
    assert not dominates(a, b) and not dominates(b, a)  # equal points: both stay on the frontier
    for x, y in itertools.permutations([run("a", 0, 0.8, 2.0), run("b", 0, 0.9, 1.0)]):
        assert dominates(x, y) == (x["recipe"] == "b")


def test_write_frontier_files(tmp_path: Path) -> None:
    pts = write_frontier(
        tmp_path, [{"seed": 0, "accuracy": 0.67, "wall_s": 150.0}], [run("instant", 0, 0.7, 9.0)], MACHINE
    )
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["points"] == pts and saved["anchors"] == ANCHORS
    md = (tmp_path / "pareto.md").read_text()
    assert "| instant | 0 | 70.00% (70.00-70.00) | 9.0 | yes |" in md
    assert f"| {NOTEBOOK} | 0 | 67.00% (67.00-67.00) | 150.0 | no |" in md
    assert "airbench94_muon" in md and "2.59 s on an NVIDIA A100" in md
    svg = (tmp_path / "pareto.svg").read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
