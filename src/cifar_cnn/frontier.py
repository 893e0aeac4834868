"""Accuracy against wall time (`cifar-cnn bench --pareto`): each recipe's runs and the teaching notebook's own loop as
points (mean test accuracy over the seeds, median wall time from launch to the test accuracy), which of them are on
the Pareto frontier (no other point is at least as accurate and at least as fast), and the published anchors beside
them. Writes pareto.json, pareto.md and, with matplotlib, pareto.svg.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_text

NOTEBOOK = "the notebook's loop"

# Published figures, for context only: they are measured on the original pixels (this package's JPEG copy costs
# about 3 points) on other hardware, so they are cited, never compared as ratios.
ANCHORS = [
    {
        "name": "airbench94_muon",
        "accuracy": "94.01% (original pixels; about 91% expected on the JPEG copy)",
        "time": "2.59 s on an NVIDIA A100",
        "source": "Keller Jordan, github.com/KellerJordan/cifar10-airbench (README)",
    },
    {
        "name": "airbench94",
        "accuracy": "94.01% (original pixels)",
        "time": "3.29 s on an NVIDIA A100",
        "source": "Jordan, '94% on CIFAR-10 in 3.29 Seconds on a Single GPU', arXiv:2404.00498 (2024)",
    },
]


def points(notebook: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per recipe (and one for the notebook's loop): mean accuracy, its spread and median wall time."""
    groups: dict[str, list[dict[str, Any]]] = {}
    if notebook:
        groups[NOTEBOOK] = notebook
    for r in runs:
        groups.setdefault(r["recipe"], []).append(r)
    out = []
    for name, rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        out.append(
            {
                "name": name,
                "seeds": [r["seed"] for r in rs],
                "accuracy": statistics.mean(accs),
                "min_accuracy": min(accs),
                "max_accuracy": max(accs),
                "wall_s": statistics.median(r["wall_s"] for r in rs),
            }
        )
    for p in out:
        p["frontier"] = not any(dominates(q, p) for q in out if q is not p)
    return sorted(out, key=lambda p: p["wall_s"])


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a is at least as accurate and at least as fast as b, and better in one of the two."""
    return (
        a["accuracy"] >= b["accuracy"]
        and a["wall_s"] <= b["wall_s"]
        and (a["accuracy"] > b["accuracy"] or a["wall_s"] < b["wall_s"])
    )


def frontier_markdown(pts: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, torch {machine['torch']}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; commit {machine['commit']}",
        "",
        "| run | seeds | mean test accuracy (min-max) | median wall time (s) | on the frontier |",
        "|---|---|---|---|---|",
    ]
    for p in pts:
        lines.append(
            f"| {p['name']} | {','.join(map(str, p['seeds']))} | {100 * p['accuracy']:.2f}% "
            f"({100 * p['min_accuracy']:.2f}-{100 * p['max_accuracy']:.2f}) | {p['wall_s']:.1f} | "
            + ("yes" if p["frontier"] else "no")
            + " |"
        )
    lines += ["", "Published anchors (other hardware, original pixels; cited, not compared):", ""]
    lines += [f"- {a['name']}: {a['accuracy']} in {a['time']}; {a['source']}" for a in ANCHORS]
    return "\n".join(lines) + "\n"


def frontier_svg(pts: list[dict[str, Any]]) -> bytes | None:
    """The points on a log time axis, the frontier joined by a line; None without matplotlib."""
    try:
        from matplotlib.backends.backend_svg import FigureCanvasSVG
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasSVG(fig)
    ax = fig.add_subplot()
    for p in pts:
        ax.errorbar(
            p["wall_s"],
            100 * p["accuracy"],
            yerr=[[100 * (p["accuracy"] - p["min_accuracy"])], [100 * (p["max_accuracy"] - p["accuracy"])]],
            fmt="o",
            color="#1f77b4" if p["name"] != NOTEBOOK else "#7f7f7f",
        )
        ax.annotate(p["name"], (p["wall_s"], 100 * p["accuracy"]), textcoords="offset points", xytext=(6, -10))
    front = [p for p in pts if p["frontier"]]
    ax.plot([p["wall_s"] for p in front], [100 * p["accuracy"] for p in front], "--", color="#1f77b4", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("wall time from launch to test accuracy (s, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()


def write_frontier(
    out: Path, notebook: list[dict[str, Any]], runs: list[dict[str, Any]], machine: dict[str, Any]
) -> list[dict[str, Any]]:
    """pareto.json, pareto.md and pareto.svg in `out`; returns the points."""
    pts = points(notebook, runs)
    atomic_write_text(out / "pareto.json", json.dumps({"points": pts, "anchors": ANCHORS}, indent=2) + "\n")
    atomic_write_text(out / "pareto.md", frontier_markdown(pts, machine))
    svg = frontier_svg(pts)
    if svg is not None:
        atomic_write_bytes(out / "pareto.svg", lambda f: f.write(svg))
    return pts
