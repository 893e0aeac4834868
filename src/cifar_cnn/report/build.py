"""`build_report(run_dir)`: everything a run logged plus best.pt on the test split, as plots, report.json and
index.html in RUN_DIR/report/."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..checkpoint import load_checkpoint
from ..data import DataSource
from ..errors import CifarCnnError
from ..evaluate import EvalResult, evaluate_checkpoint
from ..rundir import (
    REPORT_DIR,
    RunPaths,
    pick_checkpoint,
    read_config_yaml,
    read_metrics,
    read_run_json,
    resolve_source,
)
from .figures import (
    most_confident_mistakes,
    plot_confusion,
    plot_curves,
    plot_image_grid,
    plot_per_class,
    prediction_captions,
)
from .html import pct, render_html


def draw_figures(
    report_dir: Path, history: list[dict[str, Any]], test: EvalResult, grid: int
) -> tuple[dict[str, bytes], dict[str, Any], list[int]]:
    """Write every PNG of the report; returns (PNG bytes by name, the curves' plotted data, the mistakes shown)."""
    metrics, images, labels = test.metrics, test.images, test.labels
    probs = test.probabilities()
    classes = metrics["classes"]
    pngs: dict[str, bytes] = {}
    curves = plot_curves(history, report_dir / "curves.png")
    pngs["curves"] = curves["png"]
    pngs["confusion"] = plot_confusion(metrics["confusion_matrix"], classes, report_dir / "confusion.png")["png"]
    per_class = plot_per_class(metrics["per_class_accuracy"], metrics["accuracy"], report_dir / "per_class.png")
    pngs["per_class"] = per_class["png"]
    # a fixed random sample: test sets stored by class folder would otherwise show one class only
    shown = sorted(np.random.default_rng(0).choice(len(labels), size=min(grid, len(labels)), replace=False).tolist())
    captions, wrong = prediction_captions(labels, probs, classes, shown)
    pngs["predictions"] = plot_image_grid(
        images[shown], captions, report_dir / "predictions.png", wrong=wrong, title="test predictions"
    )["png"]
    mistakes = most_confident_mistakes(labels, probs, k=16)
    captions, wrong = prediction_captions(labels, probs, classes, mistakes)
    pngs["confident_wrong"] = plot_image_grid(
        images[mistakes] if mistakes else images[:0],
        captions,
        report_dir / "confident_wrong.png",
        wrong=wrong,
        title="most confidently wrong",
    )["png"]
    return pngs, curves["data"], mistakes


def build_report(
    run_dir: str | Path,
    data: str | DataSource | None = None,
    *,
    out: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1000,
    threads: int | None = None,
    home: Path | None = None,
    grid: int = 32,
    test: EvalResult | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the plots, report.json and index.html of a finished or interrupted run into `out` (RUN_DIR/report).

    `data` defaults to the run's own source (recorded in its checkpoint and run.json). `test` passes an evaluation
    of the run's checkpoint on the test split that the caller already has, with its logits (training just made one),
    so nothing is evaluated again. Returns what report.json holds.
    """
    root = Path(run_dir)
    checkpoint_path = pick_checkpoint(root)
    run = read_run_json(root)
    history = read_metrics(RunPaths(root).metrics)
    report_dir = Path(out) if out is not None else root / REPORT_DIR
    ckpt = load_checkpoint(checkpoint_path)
    source = resolve_source(data, ckpt, root, default=None)
    if source is None:
        raise CifarCnnError(f"{root}: run.json does not say which data the run used; pass --data SOURCE")
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarCnnError(f"{report_dir}: cannot create the report folder ({exc.strerror or exc})") from None
    config = read_config_yaml(root) or dict(ckpt.get("config", {}))
    if test is None or test.logits is None:
        test = evaluate_checkpoint(
            checkpoint_path,
            source,
            split="test",
            device=device,
            precision=precision,
            batch_size=batch_size,
            threads=threads,
            home=home,
            log=log,
            ckpt=ckpt,
            with_logits=True,
        )
    metrics = test.metrics
    pngs, curves, mistakes = draw_figures(report_dir, history, test, grid)
    ckpt_info = {
        "name": checkpoint_path.name,
        "path": str(checkpoint_path),
        "epoch": ckpt.get("epoch"),
        "batch_in_epoch": int(ckpt.get("batch_in_epoch") or 0),
        "note": ckpt.get("note", ""),
    }
    page = render_html(
        run_dir=root, run=run, config=config, history=history, checkpoint=ckpt_info, metrics=metrics, images=pngs
    )
    atomic_write_text(report_dir / "index.html", page)
    summary = {
        "run_dir": str(root),
        "report": str(report_dir / "index.html"),
        "status": run.get("status"),
        "data": str(source),
        "checkpoint": ckpt_info,
        "epochs_completed": len(history),
        "epochs": config.get("epochs"),
        "history": history,
        "curves": curves,
        "files": {name: str(report_dir / f"{name}.png") for name in pngs},
        "confident_mistakes": mistakes,
        "test_metrics": metrics,
    }
    atomic_write_text(report_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    log(f"report: {report_dir / 'index.html'} ({checkpoint_path.name}, test accuracy {pct(metrics['accuracy'])})")
    return summary
