"""`build_report(run_dir)`: everything a run logged plus best.pt on the test split, as plots, report.json and
index.html in RUN_DIR/report/.

What the report reads is checked first (run.json an object with fields of the right types, metrics.csv numbers under
its header): a damaged file is one CifarCnnError naming it and its line. The report is written into a staging folder
beside RUN_DIR/report and swapped in at the end, so a failure (or a stop signal) leaves the previous report whole.
File and class names are shown with cifar_cnn.names.shown (any bytes)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
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
from ..names import shown, shown_strings
from ..rundir import METRICS_HEADER, REPORT_DIR, RUN_JSON, RunPaths, pick_checkpoint, read_config_yaml, resolve_source
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

# ---- what the report reads ------------------------------------------------------------------------------------------

TEXT, NUMBER, WHOLE = (str,), (int, float), (int,)
# run.json fields the report shows, and the JSON types each may have (null is always allowed)
RUN_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(
        ("status", "data", "device", "device_name", "precision", "start_time", "end_time", "package_version"), TEXT
    ),
    **dict.fromkeys(("git_commit", "torch_version", "python_version", "platform"), TEXT),
    "command_line": (list, str),
    "threads": WHOLE,
    "resumes": WHOLE,
    "seconds": NUMBER,
    "data_source": (dict,),
}
OPTIONAL_METRICS = ("val_loss", "val_acc")  # empty without a validation split


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def read_run_record(root: Path) -> dict[str, Any]:
    """run.json of the run ({} when there is none), checked: an object whose fields in RUN_FIELDS have their types."""
    path = root / RUN_JSON
    if not path.is_file():
        return {}
    fix = "restore it, or delete it (the report then leaves out the run's provenance)"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CifarCnnError(f"{shown(path)}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # bad JSON, or bytes that are not UTF-8
        raise CifarCnnError(f"{shown(path)}: not valid JSON ({str(exc)[:80]}); {fix}") from None
    if not isinstance(loaded, dict):
        raise CifarCnnError(f"{shown(path)}: expected a JSON object, found {_json_type(loaded)}; {fix}")
    for key, types in RUN_FIELDS.items():
        value = loaded.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise CifarCnnError(f"{shown(path)}: field {key!r} is {_json_type(value)}, which it cannot be; {fix}")
    return loaded


def _metric(value: str, column: str, where: str) -> float | None:
    """One cell of metrics.csv: a number, or None where a column may be empty."""
    if value == "" and column in OPTIONAL_METRICS:
        return None
    try:
        number = float(value)
    except ValueError:
        raise CifarCnnError(f"{where}: {column} is {value[:20]!r}, not a number; {METRICS_FIX}") from None
    if column == "epoch" and not (math.isfinite(number) and number >= 1 and number == int(number)):
        raise CifarCnnError(f"{where}: epoch is {value[:20]!r}, not a whole number from 1; {METRICS_FIX}")
    return number


METRICS_FIX = "restore metrics.csv or delete it (the report then has no training curves)"


def read_history(path: Path) -> list[dict[str, float | None]]:
    """metrics.csv as one dict per epoch over METRICS_HEADER ([] when there is none), checked: the header names
    every column, each row has as many cells, each cell is a number (val_loss and val_acc may be empty)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise CifarCnnError(f"{shown(path)}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CifarCnnError(f"{shown(path)}: not a CSV file of numbers ({str(exc)[:80]}); {METRICS_FIX}") from None
    if not rows:
        return []
    header, missing = rows[0], [c for c in METRICS_HEADER if c not in rows[0]]
    if missing:
        raise CifarCnnError(f"{shown(path)}:1: the header lacks {', '.join(missing)}; {METRICS_FIX}")
    history = []
    for line, row in enumerate(rows[1:], start=2):
        where = f"{shown(path)}:{line}"
        if len(row) != len(header):
            raise CifarCnnError(f"{where}: {len(row)} cells under a header of {len(header)}; {METRICS_FIX}")
        cells = dict(zip(header, row))
        history.append({c: _metric(cells[c], c, where) for c in METRICS_HEADER})
    return history


# ---- writing it: a staging folder swapped in at the end ---------------------------------------------------------

REPORT_FILES = {"index.html", "report.json"} | {
    f"{n}.png" for n in ("curves", "confusion", "per_class", "predictions", "confident_wrong", "reliability")
}


def staging_folder(report_dir: Path) -> Path:
    """A new empty folder beside `report_dir` to build the report in; leftovers of killed reports removed first."""
    parent, prefix = report_dir.parent, f".{report_dir.name}.staging-"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for old in parent.glob(f"{prefix}*"):
            if not _alive(old.name.removeprefix(prefix)):
                shutil.rmtree(old, ignore_errors=True)
        staging = parent / f"{prefix}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise CifarCnnError(f"{shown(report_dir)}: cannot create the report folder ({exc.strerror or exc})") from None
    return staging


def _alive(pid: str) -> bool:
    """Whether the process `pid` (a folder name's tail) still runs: its staging folder is then not a leftover."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def install_report(staging: Path, report_dir: Path) -> None:
    """Put the finished report in place of `report_dir`: the folder swapped whole when it holds only a report's
    files, else file by file (a folder of the user's keeps its other files; an older report's figures go)."""
    try:
        if report_dir.is_dir() and not {p.name for p in report_dir.iterdir()} <= REPORT_FILES:
            made = {f.name for f in staging.iterdir()}
            for name in made:
                os.replace(staging / name, report_dir / name)
            for name in REPORT_FILES - made:
                (report_dir / name).unlink(missing_ok=True)
            staging.rmdir()
            return
        old = report_dir.with_name(f".{report_dir.name}.old-{os.getpid()}")
        if report_dir.is_dir():
            report_dir.rename(old)
        try:
            staging.rename(report_dir)
        except OSError:
            if old.is_dir():
                old.rename(report_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise CifarCnnError(f"{shown(report_dir)}: cannot put the report in place ({exc.strerror or exc})") from None


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
    so nothing is evaluated again. Returns what report.json holds (names shown with cifar_cnn.names.shown).
    """
    started = time.perf_counter()
    root = Path(run_dir)
    checkpoint_path = pick_checkpoint(root)
    run = read_run_record(root)
    history = read_history(RunPaths(root).metrics)
    report_dir = Path(out) if out is not None else root / REPORT_DIR
    ckpt = load_checkpoint(checkpoint_path)
    source = resolve_source(data, ckpt, root, default=None)
    if source is None:
        raise CifarCnnError(f"{shown(root)}: run.json does not say which data the run used; pass --data SOURCE")
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
    ckpt_info = {
        "name": checkpoint_path.name,
        "path": str(checkpoint_path),
        "epoch": ckpt.get("epoch"),
        "batch_in_epoch": int(ckpt.get("batch_in_epoch") or 0),
        "note": ckpt.get("note", ""),
    }
    staging = staging_folder(report_dir)
    try:
        summary = write_report(
            staging,
            report_dir,
            root=root,
            run=run,
            config=config,
            history=history,
            test=test,
            metrics=metrics,
            checkpoint=ckpt_info,
            grid=grid,
            device=device,
            threads=threads,
        )
        summary["data"] = shown(str(source))
        seconds = time.perf_counter() - started
        summary["seconds"] = {"evaluate": round(evaluate_seconds, 2), "total": round(seconds, 2)}
        atomic_write_text(staging / "report.json", json.dumps(summary, indent=2) + "\n")
        install_report(staging, report_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when installed
    explained = summary["explanations"]
    log(
        f"report: {shown(report_dir / 'index.html')} ({checkpoint_path.name}, test accuracy "
        f"{pct(metrics['accuracy'])}; {seconds - evaluate_seconds:.1f} s besides evaluation, "
        f"{explained['seconds']:.1f} s of it for {explained['images']} heat maps)"
    )
    return summary


def write_report(
    staging: Path,
    report_dir: Path,
    *,
    root: Path,
    run: dict[str, Any],
    config: dict[str, Any],
    history: list[dict[str, Any]],
    test: EvalResult,
    metrics: dict[str, Any],
    checkpoint: dict[str, Any],
    grid: int,
    device: str,
    threads: int | None,
) -> dict[str, Any]:
    """The figures and index.html into `staging`; returns report.json's content (names shown, paths as they will
    be once `staging` is installed as `report_dir`), without its `data` and `seconds`."""
    browser, maps, explained = mistake_browser(test, metrics, Path(checkpoint["path"]), device=device, threads=threads)
    pngs, curves, mistakes = draw_figures(staging, history, test, grid, metrics=metrics, maps=maps)
    page = render_html(
        run_dir=root,
        run=run,
        config=config,
        history=history,
        checkpoint=checkpoint,
        metrics=metrics,
        images=pngs,
        browser=browser,
        explained=explained,
    )
    atomic_write_text(staging / "index.html", page)
    return shown_strings(
        {
            "run_dir": str(root),
            "report": str(report_dir / "index.html"),
            "status": run.get("status"),
            "data": None,
            "checkpoint": checkpoint,
            "epochs_completed": len(history),
            "epochs": config.get("epochs"),
            "history": history,
            "curves": curves,
            "files": {name: str(report_dir / f"{name}.png") for name in pngs},
            "confident_mistakes": mistakes,
            "explanations": explained,
            "page_bytes": len(page.encode()),
            # what the report took; `total - evaluate` is what it adds to a training run, which hands over its logits
            "seconds": None,
            "test_metrics": metrics,
        }
    )
