"""The report's figures, drawn with matplotlib's object API (`Figure`, Agg canvas), so no global backend or pyplot
state is touched. Each plotting function returns the numbers it drew, read back from the figure, so tests can check
them; with a path it also writes the PNG (atomically)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from ..atomic import atomic_write_bytes
from ..names import shown

PNG_DPI = 100
TRAIN_COLOR, VAL_COLOR, LR_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"  # matplotlib's tab:blue, tab:orange, tab:green
RIGHT_COLOR, WRONG_COLOR = "#2ca02c", "#d62728"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    return buf.getvalue()


def _save(fig: Figure, path: str | Path | None) -> bytes:
    """Render `fig` to PNG bytes, and write them atomically to `path` if given."""
    data = _png(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), lambda f: f.write(data))
    return data


def _lines(fig: Figure) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{axes label: {line label: {"epoch": [...], "value": [...]}}}, read back from the drawn lines."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for ax in fig.axes:
        key = ax.get_label()
        out[key] = {
            line.get_label(): {
                "epoch": [float(v) for v in line.get_xdata()],
                "value": [float(v) for v in line.get_ydata()],
            }
            for line in ax.get_lines()
        }
    return out


def curves_figure(history: Sequence[dict[str, Any]]) -> Figure:
    """Loss, accuracy and learning rate per epoch; train in blue, validation in orange, one marker per epoch."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    epochs = [int(r["epoch"]) for r in history]
    panels = (("loss", "loss"), ("acc", "accuracy"), ("lr", "learning rate"))
    for ax, (key, title) in zip(axes, panels):
        ax.set_label(title)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.plot(epochs, [r["lr"] for r in history], "o-", color=LR_COLOR, label="lr (end of epoch)")
        else:
            ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", color=TRAIN_COLOR, label="train")
            val = [(e, r[f"val_{key}"]) for e, r in zip(epochs, history) if r.get(f"val_{key}") is not None]
            if val:
                ax.plot([e for e, _ in val], [v for _, v in val], "o-", color=VAL_COLOR, label="validation")
            if key == "acc":
                ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if epochs:
            ax.legend(loc="best", fontsize="small")
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, "no completed epoch yet", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path | None = None) -> dict[str, Any]:
    """Write the curves to `path`; returns {"png": bytes, "data": the plotted points by panel and line}."""
    fig = curves_figure(history)
    return {"png": _save(fig, path), "data": _lines(fig)}


ANNOTATE_MAX = 30  # classes up to which the confusion matrix shows the counts


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """The confusion matrix as a heat map (rows: true class, columns: predicted), each cell annotated with its count
    up to ANNOTATE_MAX classes (beyond, the cells would be too small to read: the colours tell)."""
    cm = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    side = max(4.0, 0.45 * n + 2.2) if n <= ANNOTATE_MAX else min(24.0, 0.16 * n + 4.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    ax.set_label("confusion matrix")
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, shrink=0.8, label="images")
    small = {} if n <= ANNOTATE_MAX else {"fontsize": 5}
    names = [shown(c) for c in classes]  # class names are folder names: any bytes
    ax.set_xticks(range(n), labels=names, rotation=45 if n <= ANNOTATE_MAX else 90, ha="right", **small)
    ax.set_yticks(range(n), labels=names, **small)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (test split)")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n if n <= ANNOTATE_MAX else 0):
        for j in range(n):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8 if n <= 12 else 6,
                color="white" if cm[i, j] > threshold else "black",
                gid=f"cell-{i}-{j}",
            )
    return fig


def plot_confusion(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path | None = None
) -> dict[str, Any]:
    """Write the heat map; returns {"png", "data": the matrix as drawn (colours), "annotations": the cell texts
    (none beyond ANNOTATE_MAX classes)}."""
    fig = confusion_figure(matrix, classes)
    ax = fig.axes[0]
    n = len(classes)
    drawn = np.asarray(ax.get_images()[0].get_array()).astype(np.int64).tolist()
    texts = {t.get_gid(): t.get_text() for t in ax.texts}
    annotations = [[int(texts[f"cell-{i}-{j}"]) for j in range(n)] for i in range(n)] if texts else []
    return {"png": _save(fig, path), "data": drawn, "annotations": annotations}


def plot_per_class(
    per_class_accuracy: dict[str, float | None], overall: float | None = None, path: str | Path | None = None
) -> dict[str, Any]:
    """Horizontal bars of accuracy per class (a dashed line at the overall accuracy)."""
    names = list(per_class_accuracy)
    values = [per_class_accuracy[c] if per_class_accuracy[c] is not None else 0.0 for c in names]
    fig = Figure(figsize=(7, max(2.5, 0.35 * len(names) + 1.2)), layout="constrained")
    ax = fig.subplots()
    ax.set_label("per-class accuracy")
    bars = ax.barh(range(len(names)), values, color=TRAIN_COLOR)
    ax.set_yticks(range(len(names)), labels=[shown(c) for c in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    for bar, c in zip(bars, names):
        v = per_class_accuracy[c]
        label = "no images" if v is None else f"{100 * v:.1f}%"
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    if overall is not None:
        ax.axvline(overall, color=VAL_COLOR, ls="--", label=f"overall {100 * overall:.1f}%")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title("test accuracy per class")
    return {"png": _save(fig, path), "data": dict(zip(names, [float(b.get_width()) for b in bars]))}


def _hwc(image: np.ndarray) -> np.ndarray:
    return np.transpose(np.asarray(image), (1, 2, 0)) if np.asarray(image).shape[0] in (1, 3) else np.asarray(image)


def plot_image_grid(
    images: np.ndarray,
    titles: Sequence[str],
    path: str | Path | None = None,
    *,
    wrong: Sequence[bool] | None = None,
    columns: int = 8,
    title: str = "",
) -> dict[str, Any]:
    """uint8 images (N, 3, H, W) in a grid with a caption under each; `wrong[i]` draws image i's caption and frame
    in red (else green when `wrong` is given)."""
    n = len(images)
    columns = max(1, min(columns, n)) if n else 1
    rows = max(1, math.ceil(n / columns))
    fig = Figure(figsize=(1.55 * columns, 1.75 * rows + (0.4 if title else 0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(_hwc(images[k]), interpolation="nearest")
        color = "black" if wrong is None else (WRONG_COLOR if wrong[k] else RIGHT_COLOR)
        ax.set_xlabel(titles[k], fontsize=7.5, color=color, labelpad=2)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(1 if wrong is None else 2.5)
    if not n:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes[0].transAxes)
    if title:
        fig.suptitle(title)
    return {"png": _save(fig, path), "count": n}


def prediction_captions(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], indices: Sequence[int]
) -> tuple[list[str], list[bool]]:
    """'pred 87%' over 'true: label' captions and mistake flags for the images at `indices`."""
    captions, wrong = [], []
    for i in indices:
        pred = int(probs[i].argmax())
        ok = pred == int(labels[i])
        mark = "" if ok else "✗ "
        truth = shown(classes[int(labels[i])])
        captions.append(f"{mark}{shown(classes[pred])} {100 * probs[i, pred]:.0f}%\ntrue: {truth}")
        wrong.append(not ok)
    return captions, wrong


PAIRS_PER_ROW = 4


def _pair_geometry(side: int) -> dict[str, int]:
    """Pixel sizes of the mistakes mosaic for images of `side` pixels: frame/gap, a framed pair, a cell with room
    below the pair for a two-line caption (half an image height: the figure shows each pixel about 3 points high)."""
    pad = max(1, side // 16)
    pair_w, pair_h = 2 * side + 3 * pad, side + 2 * pad
    return {"pad": pad, "pair_w": pair_w, "pair_h": pair_h, "cell_w": pair_w + 4 * pad, "cell_h": pair_h + side // 2}


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def mistakes_mosaic(images: np.ndarray, overlays: np.ndarray, columns: int = PAIRS_PER_ROW) -> np.ndarray:
    """One RGB picture of (image | its overlay) pairs, `columns` pairs a row, each pair in a red frame (a mistake),
    with room under each pair for its caption."""
    n, side = len(images), int(images.shape[-1])
    g = _pair_geometry(side)
    pad = g["pad"]
    mosaic = np.full((math.ceil(n / columns) * g["cell_h"], min(n, columns) * g["cell_w"], 3), 255, dtype=np.uint8)
    for k in range(n):
        y, x = (k // columns) * g["cell_h"], (k % columns) * g["cell_w"] + 2 * pad
        mosaic[y : y + g["pair_h"], x : x + g["pair_w"]] = _rgb(WRONG_COLOR)
        mosaic[y + pad : y + pad + side, x + pad : x + pad + side] = _hwc(images[k])
        mosaic[y + pad : y + pad + side, x + 2 * pad + side : x + 2 * (pad + side)] = overlays[k]
    return mosaic


def plot_mistakes(
    images: np.ndarray,
    overlays: np.ndarray | None,
    titles: Sequence[str],
    path: str | Path | None = None,
    *,
    title: str = "most confidently wrong",
) -> dict[str, Any]:
    """The mistakes (uint8 (N, 3, H, W)), each beside its heat map over it (`overlays`, uint8 (N, H, W, 3)), four
    pairs a row, captions in red; without overlays, the images alone (plot_image_grid). The pairs are one picture
    drawn once: a grid of 32 axes took seconds on a busy CPU."""
    if overlays is None or not len(images):
        return plot_image_grid(images, titles, path, wrong=[True] * len(images), title=title)
    g = _pair_geometry(int(images.shape[-1]))
    columns, rows = min(len(images), PAIRS_PER_ROW), math.ceil(len(images) / PAIRS_PER_ROW)
    width = 2.9 * columns  # inches; the height keeps the mosaic's aspect, plus the title
    fig = Figure(figsize=(width, width * rows * g["cell_h"] / (columns * g["cell_w"]) + 0.4), layout="constrained")
    ax = fig.subplots()
    ax.set_label("mistakes with heat maps")
    ax.imshow(mistakes_mosaic(images, overlays), interpolation="nearest")
    ax.axis("off")
    for k, caption in enumerate(titles):
        x = (k % PAIRS_PER_ROW + 0.5) * g["cell_w"]
        y = (k // PAIRS_PER_ROW) * g["cell_h"] + g["pair_h"] + g["pad"]
        ax.text(x, y, caption, ha="center", va="top", fontsize=7.5, color=WRONG_COLOR)
    fig.suptitle(f"{title}; beside each, its Grad-CAM map for the predicted class")
    return {"png": _save(fig, path), "count": len(images)}


def plot_reliability(
    bins: Sequence[dict[str, float]],
    uncalibrated: Sequence[dict[str, float]] | None = None,
    path: str | Path | None = None,
    *,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """A reliability diagram: per bin of top-1 confidence, the accuracy of its images (bars, the probabilities as
    served) against the diagonal a calibrated model follows, and how many images fall in it (below); with
    `uncalibrated`, the same at temperature 1 as a line. Empty bins draw nothing."""
    fig = Figure(figsize=(5.2, 5.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.set_label("reliability")
    bottom.set_label("images per bin")
    lower = [b["lower"] for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 1.0
    accuracy = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    top.plot([0, 1], [0, 1], ls="--", color="#888888", label="calibrated")
    served = f"as served (T = {temperature:.3g})"
    top.bar(lower, accuracy, width=width, align="edge", color=TRAIN_COLOR, edgecolor="white", alpha=0.85, label=served)
    if uncalibrated is not None:
        filled = [b for b in uncalibrated if b["count"]]
        xs, ys = [b["confidence"] for b in filled], [b["accuracy"] for b in filled]
        top.plot(xs, ys, "o-", color=VAL_COLOR, ms=4, label="uncalibrated (T = 1)")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title("reliability (test split)")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.bar(lower, [b["count"] for b in bins], width=width, align="edge", color=TRAIN_COLOR, edgecolor="white")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    data = {
        "accuracy": [float(r.get_height()) for r in top.patches],
        "count": [int(r.get_height()) for r in bottom.patches],
    }
    return {"png": _save(fig, path), "data": data}


def most_confident_mistakes(labels: np.ndarray, probs: np.ndarray, k: int = 16) -> list[int]:
    """Indices of the wrong predictions with the highest confidence, surest first."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    conf = probs[wrong, preds[wrong]]
    return [int(i) for i in wrong[np.argsort(-conf, kind="stable")][:k]]


def plot_class_samples(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    path: str | Path | None = None,
    *,
    per_class: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """A row of `per_class` random images (fixed by `seed`) for each class, the class name on the left."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        picks.append(np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)) if len(idx) else idx)
    rows, cols = len(classes), max(1, per_class)
    side = int(np.asarray(images[0]).shape[-1]) if len(labels) else 32
    cell = side + 2  # a 2-pixel white gap between images
    # one mosaic drawn once: a figure of rows x cols axes takes minutes for CIFAR-100's 100 classes
    mosaic = np.full((rows * cell, cols * cell, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c, i in enumerate(picks[r][:cols]):
            mosaic[r * cell : r * cell + side, c * cell : c * cell + side] = _hwc(images[int(i)])
    fig = Figure(figsize=(1.1 * cols + 1.6, 1.1 * rows), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * cell + side / 2 for r in range(rows)], labels=[shown(c) for c in classes], fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return {
        "png": _save(fig, path),
        "classes": list(classes),
        "shown": {name: len(p) for name, p in zip(classes, picks)},
        "indices": {name: [int(i) for i in p] for name, p in zip(classes, picks)},
    }
