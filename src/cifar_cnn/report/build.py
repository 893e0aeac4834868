"""`build_report(run_dir)`: everything a run logged plus best.pt on the test split, as plots, report.json and
index.html in RUN_DIR/report/."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from ..calibration import calibration_metrics, reliability, softmax
from ..checkpoint import checkpoint_temperature, load_checkpoint
from ..data import DataSource
from ..errors import CifarCnnError
from ..evaluate import EvalResult, evaluate_checkpoint
from ..explain import Explainer, overlay
from ..rundir import (
    REPORT_DIR,
    RunPaths,
    pick_checkpoint,
    read_config_yaml,
    read_metrics,
    read_run_json,
    resolve_source,
)
from .browser import browser_data, cell_images, image_losses, pick_cells, render_browser
from .figures import (
    most_confident_mistakes,
    plot_confusion,
    plot_curves,
    plot_image_grid,
    plot_mistakes,
    plot_per_class,
    plot_reliability,
    prediction_captions,
)
from .html import pct, render_html

MISTAKES = 16  # the most confident mistakes shown with their heat maps
EXPLAIN_BATCH = 256  # images per Grad-CAM pass: a few MB of activations for CIFAR nets


def with_calibration(test: EvalResult, temperature: float) -> dict[str, Any]:
    """The test metrics with the calibration figures (ece, nll, temperature, uncalibrated, reliability), computed
    here from the logits when an evaluation made before `evaluate` reported them lacks them."""
    if "ece" in test.metrics:
        return test.metrics
    return test.metrics | calibration_metrics(test.logits.numpy(), test.labels, temperature)


def explain_images(
    checkpoint: Path,
    images: Any,
    indices: Sequence[int],
    targets: np.ndarray,
    *,
    device: str,
    threads: int | None,
) -> tuple[dict[int, np.ndarray] | None, dict[str, Any]]:
    """Grad-CAM maps of the test images at `indices` for the classes `targets[index]` (the predicted ones), in one
    batched pass over just these images; returns ({index: map}, what was done and how long it took). A model with
    no spatial feature map gets no maps (None) and a note instead of failing the report."""
    start = time.perf_counter()
    done: dict[str, Any] = {"method": "gradcam", "target": "predicted class", "images": len(indices)}
    if not indices:
        return {}, done | {"seconds": 0.0}
    try:
        explainer = Explainer.from_checkpoint(checkpoint, threads=threads, device=device, batch_size=EXPLAIN_BATCH)
        maps = explainer.maps(images[list(indices)], "gradcam", targets[list(indices)])
    except (CifarCnnError, RuntimeError, ValueError) as exc:  # a model the maps cannot run on: no maps, a note
        note = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return None, done | {"images": 0, "seconds": round(time.perf_counter() - start, 2), "note": note}
    seconds = round(time.perf_counter() - start, 2)
    return dict(zip(indices, maps)), done | {"layer": explainer.layer(), "seconds": seconds}


def draw_figures(
    report_dir: Path,
    history: list[dict[str, Any]],
    test: EvalResult,
    grid: int,
    *,
    metrics: dict[str, Any] | None = None,
    maps: dict[int, np.ndarray] | None = None,
) -> tuple[dict[str, bytes], dict[str, Any], list[int]]:
    """Write every PNG of the report; returns (PNG bytes by name, the curves' plotted data, the mistakes shown).

    `metrics` defaults to the test's (with the calibration figures); `maps` holds Grad-CAM maps by test index, drawn
    beside the most confident mistakes when given. Probabilities are those served: softmax(logits / temperature)."""
    metrics = test.metrics if metrics is None else metrics
    images, labels = test.images, test.labels
    temperature = float(metrics.get("temperature", 1.0))
    probs = softmax(test.logits.numpy(), temperature)
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
    mistakes = most_confident_mistakes(labels, probs, k=MISTAKES)
    captions, _ = prediction_captions(labels, probs, classes, mistakes)
    shown_images = images[mistakes] if mistakes else images[:0]
    overlays = np.stack([overlay(im, maps[i]) for im, i in zip(shown_images, mistakes)]) if maps and mistakes else None
    pngs["confident_wrong"] = plot_mistakes(shown_images, overlays, captions, report_dir / "confident_wrong.png")["png"]
    if "reliability" in metrics:
        uncalibrated = reliability(softmax(test.logits.numpy()), labels) if temperature != 1.0 else None
        pngs["reliability"] = plot_reliability(
            metrics["reliability"], uncalibrated, report_dir / "reliability.png", temperature=temperature
        )["png"]
    return pngs, curves["data"], mistakes


def mistake_browser(
    test: EvalResult, metrics: dict[str, Any], checkpoint: Path, *, device: str, threads: int | None
) -> tuple[str, dict[int, np.ndarray] | None, dict[str, Any]]:
    """The clickable confusion matrix's panel (HTML) and the Grad-CAM maps of every image the report shows (the
    browser's and the most confident mistakes), computed once; with what was explained, its seconds and size."""
    labels = np.asarray(test.labels)
    probs = softmax(test.logits.numpy(), float(metrics["temperature"]))
    preds, losses = probs.argmax(1), image_losses(probs, labels)
    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    cells = cell_images(labels, preds, losses)
    chosen = pick_cells(cells, counts)
    shown = {i for cell in chosen for i in cells[cell]} | set(most_confident_mistakes(labels, probs, k=MISTAKES))
    maps, explained = explain_images(checkpoint, test.images, sorted(shown), preds, device=device, threads=threads)
    start = time.perf_counter()
    data = browser_data(cells, chosen, counts, test.images, maps, labels, probs, losses)
    panel = render_browser(data, metrics["classes"])
    explained["browser"] = {
        "cells": len(chosen),
        "cells_with_images": len(cells),
        "images": sum(len(cells[c]) for c in chosen),
        "bytes": len(panel.encode()),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return panel, maps, explained


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
    started = time.perf_counter()
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
    evaluate_seconds = 0.0
    if test is None or test.logits is None:
        evaluate_start = time.perf_counter()
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
        evaluate_seconds = time.perf_counter() - evaluate_start
    metrics = with_calibration(test, checkpoint_temperature(ckpt, checkpoint_path))
    browser, maps, explained = mistake_browser(test, metrics, checkpoint_path, device=device, threads=threads)
    pngs, curves, mistakes = draw_figures(report_dir, history, test, grid, metrics=metrics, maps=maps)
    ckpt_info = {
        "name": checkpoint_path.name,
        "path": str(checkpoint_path),
        "epoch": ckpt.get("epoch"),
        "batch_in_epoch": int(ckpt.get("batch_in_epoch") or 0),
        "note": ckpt.get("note", ""),
    }
    page = render_html(
        run_dir=root,
        run=run,
        config=config,
        history=history,
        checkpoint=ckpt_info,
        metrics=metrics,
        images=pngs,
        browser=browser,
        explained=explained,
    )
    atomic_write_text(report_dir / "index.html", page)
    seconds = time.perf_counter() - started
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
        "explanations": explained,
        "page_bytes": len(page.encode()),
        # what the report took; `total - evaluate` is what it adds to a training run, which hands over its test logits
        "seconds": {"evaluate": round(evaluate_seconds, 2), "total": round(seconds, 2)},
        "test_metrics": metrics,
    }
    atomic_write_text(report_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    log(
        f"report: {report_dir / 'index.html'} ({checkpoint_path.name}, test accuracy {pct(metrics['accuracy'])}; "
        f"{seconds - evaluate_seconds:.1f} s besides evaluation, {explained['seconds']:.1f} s of it for "
        f"{explained['images']} heat maps)"
    )
    return summary
