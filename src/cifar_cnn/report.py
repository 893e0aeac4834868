"""Plots and a self-contained HTML report of a run directory (needs matplotlib: `pip install 'cifar-cnn[report]'`).

`build_report(run_dir)` reads what the run logged (config.yaml, metrics.csv, run.json), evaluates best.pt (last.pt
when there is none, e.g. an interrupted run) on the test split and writes into RUN_DIR/report/:

    curves.png         loss, accuracy and learning rate per epoch (train and validation)
    confusion.png      the test confusion matrix as an annotated heat map
    per_class.png      test accuracy per class
    predictions.png    32 test images (a fixed sample): predicted label, confidence, true label (mistakes in red)
    confident_wrong.png  the mistakes the model was surest of
    report.json        what was evaluated and the metrics (the schema of `evaluate --json` under test_metrics)
    index.html         all of it in one file, images embedded, readable offline

Figures are built with matplotlib's object API (`Figure`, Agg canvas), so no global backend or pyplot state is
touched. Each plotting function returns the numbers it drew, read back from the figure, so tests can check them.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint
from .errors import CifarCnnError

REPORT_DIRNAME = "report"
PNG_DPI = 100
TRAIN_COLOR, VAL_COLOR, LR_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"  # matplotlib's tab:blue, tab:orange, tab:green
RIGHT_COLOR, WRONG_COLOR = "#2ca02c", "#d62728"


# --------------------------------------------------------------------------------------------------------------------
# reading a run directory


def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """metrics.csv as rows of floats (None for empty cells, e.g. val_loss without a validation split)."""
    p = Path(path)
    if not p.is_file():
        return []
    with p.open(newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def pick_checkpoint(run_dir: str | Path) -> Path:
    """best.pt, or last.pt when the run has no best.pt yet (interrupted in its first epoch)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CifarCnnError(f"{root}: no such run directory")
    for name in ("best.pt", "last.pt"):
        if (root / name).is_file():
            return root / name
    raise CifarCnnError(f"{root}: holds neither best.pt nor last.pt; is it a run directory written by `train`?")


# --------------------------------------------------------------------------------------------------------------------
# figures


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


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """The confusion matrix as a heat map (rows: true class, columns: predicted), each cell annotated with its count."""
    cm = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    side = max(4.0, 0.45 * n + 2.2)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    ax.set_label("confusion matrix")
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, shrink=0.8, label="images")
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (test split)")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
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
    """Write the heat map; returns {"png", "data": the matrix as drawn (colours), "annotations": the cell texts}."""
    fig = confusion_figure(matrix, classes)
    ax = fig.axes[0]
    n = len(classes)
    drawn = np.asarray(ax.get_images()[0].get_array()).astype(np.int64).tolist()
    texts = {t.get_gid(): t.get_text() for t in ax.texts}
    annotations = [[int(texts[f"cell-{i}-{j}"]) for j in range(n)] for i in range(n)]
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
    ax.set_yticks(range(len(names)), labels=names)
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
        captions.append(f"{mark}{classes[pred]} {100 * probs[i, pred]:.0f}%\ntrue: {classes[int(labels[i])]}")
        wrong.append(not ok)
    return captions, wrong


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
    fig = Figure(figsize=(1.1 * cols + 1.2, 1.1 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, name in enumerate(classes):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(picks[r]):
                ax.imshow(_hwc(images[picks[r][c]]), interpolation="nearest")
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    return {
        "png": _save(fig, path),
        "classes": list(classes),
        "shown": {name: len(p) for name, p in zip(classes, picks)},
        "indices": {name: [int(i) for i in p] for name, p in zip(classes, picks)},
    }


# --------------------------------------------------------------------------------------------------------------------
# evaluation of the run's checkpoint


def evaluate_run(
    checkpoint: Path,
    data: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1000,
    threads: int | None = None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """(metrics as `evaluate --json` prints them, test images, test labels, softmax probabilities per image)."""
    import torch

    from .data import load_dataset, make_splits
    from .engine import evaluate_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.get("config", {})
    ds = load_dataset(data, int(ckpt["input_size"]), home=home, threads=threads, log=log)
    splits = make_splits(ds, float(cfg.get("val_split", 0.2)), int(cfg.get("seed", 0)), cfg.get("subset") or None)
    metrics, logits = evaluate_checkpoint(
        checkpoint,
        data,
        split="test",
        device=device,
        precision=precision,
        batch_size=batch_size,
        threads=threads,
        home=home,
        log=log,
        dataset_splits=splits,
        with_logits=True,
    )
    probs = torch.softmax(logits, 1).numpy()
    return metrics, splits.test_images, np.asarray(splits.test_labels), probs


# --------------------------------------------------------------------------------------------------------------------
# HTML


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _kv_table(items: dict[str, Any], table_id: str) -> str:
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v) if isinstance(v, (dict, list)) else v)}</td></tr>"
        for k, v in items.items()
    )
    return f'<table id="{table_id}" class="kv">{rows}</table>'


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1240px;margin:0 auto;padding:18px 24px 48px}
h1{font-size:24px;margin:4px 0 2px}
h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
.sub{color:#5a6570;font-size:13px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#5a6570;font-size:12px}
.status-finished{color:#1a7f37}.status-interrupted,.status-running{color:#b35900}
img{max-width:100%;height:auto;background:#fff;border:1px solid #d8dde3;border-radius:6px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #d8dde3;padding:3px 8px;text-align:right}th{background:#eef1f4}
table.kv th,table.kv td{text-align:left}
.row{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}
.bar{display:inline-block;height:9px;background:#1f77b4;vertical-align:middle;margin-right:6px}
td.diag{background:#dbe9f6;font-weight:600}
.note{background:#fff6e5;border:1px solid #f0c36d;border-radius:6px;padding:8px 12px;margin:10px 0}
"""


def render_html(
    *,
    run_dir: Path,
    run: dict[str, Any],
    config: dict[str, Any],
    history: list[dict[str, Any]],
    checkpoint: dict[str, Any],
    metrics: dict[str, Any],
    images: dict[str, bytes],
) -> str:
    """The report as one HTML page; `images` maps figure names to PNG bytes, embedded as data URIs."""
    classes = metrics["classes"]
    cm = metrics["confusion_matrix"]
    status = run.get("status") or "unknown"
    title = f"cifar-cnn report: {run_dir.name}"
    notes = []
    if checkpoint["name"] == "last.pt":
        notes.append(
            f"This run has no best.pt: the report evaluates last.pt, saved at epoch {checkpoint['epoch']}"
            f" step {checkpoint['batch_in_epoch']} ({_esc(checkpoint['note'])})."
        )
    if status != "finished":
        notes.append(
            f"The run is <b>{_esc(status)}</b>: {len(history)} of {_esc(config.get('epochs', '?'))} epochs "
            "completed; the curves show what it logged."
        )

    support = [int(sum(row)) for row in cm]
    per_class_rows = "".join(
        f"<tr><th>{_esc(c)}</th><td>{support[i]}</td>"
        f"<td><span class='bar' style='width:{60 * (metrics['per_class_accuracy'][c] or 0):.0f}px'></span>"
        f"{_pct(metrics['per_class_accuracy'][c])}</td>"
        f"<td>{_pct(metrics['per_class_precision'][c])}</td><td>{_num(metrics['per_class_f1'][c], 3)}</td></tr>"
        for i, c in enumerate(classes)
    )
    per_class = (
        '<table id="per-class"><tr><th>class</th><th>images</th><th>accuracy (recall)</th><th>precision</th>'
        f"<th>F1</th></tr>{per_class_rows}</table>"
    )
    head = "".join(f"<th title='predicted {_esc(c)}'>{_esc(c)}</th>" for c in classes)
    body = "".join(
        f"<tr><th>{_esc(classes[i])}</th>"
        + "".join(f"<td{' class=diag' if i == j else ''}>{v}</td>" for j, v in enumerate(row))
        + "</tr>"
        for i, row in enumerate(cm)
    )
    cm_table = f'<table id="confusion-matrix"><tr><th>true \\ predicted</th>{head}</tr>{body}</table>'
    epoch_rows = "".join(
        f"<tr><td>{int(r['epoch'])}</td><td>{_num(r['train_loss'])}</td><td>{_pct(r['train_acc'])}</td>"
        f"<td>{_num(r['val_loss'])}</td><td>{_pct(r['val_acc'])}</td><td>{r['lr']:.4g}</td>"
        f"<td>{_num(r['seconds'], 1)}</td></tr>"
        for r in history
    )
    epochs_table = (
        '<table id="epochs"><tr><th>epoch</th><th>train loss</th><th>train acc</th><th>val loss</th><th>val acc</th>'
        f"<th>lr</th><th>seconds</th></tr>{epoch_rows}</table>"
    )
    cards = [
        (_pct(metrics["accuracy"]), "test accuracy"),
        (_pct(metrics["top5_accuracy"]), "top-5 accuracy"),
        (_num(metrics["loss"]), "test loss"),
        (_num(metrics["macro_f1"], 3), "macro F1"),
        (str(metrics["num_images"]), "test images"),
        (f"{len(history)} / {config.get('epochs', '?')}", "epochs"),
    ]
    cards_html = "".join(f"<div class='card'><b>{_esc(v)}</b><span>{_esc(k)}</span></div>" for v, k in cards)
    provenance = {
        k: run.get(k)
        for k in (
            "status",
            "data",
            "device",
            "device_name",
            "precision",
            "threads",
            "start_time",
            "end_time",
            "seconds",
            "resumes",
            "package_version",
            "git_commit",
            "torch_version",
            "python_version",
            "command_line",
        )
        if k in run
    }
    ckpt_desc = (
        f"{checkpoint['name']} (epoch {checkpoint['epoch']}"
        + (f", step {checkpoint['batch_in_epoch']}" if checkpoint["batch_in_epoch"] else "")
        + f"; {checkpoint['note']}), tta {metrics['tta']}, precision {metrics.get('precision')}"
    )

    def img(name: str, alt: str) -> str:
        return f'<img id="img-{name}" alt="{_esc(alt)}" src="{_data_uri(images[name])}">' if name in images else ""

    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{_esc(title)}</h1>
<div class="sub">model <b>{_esc(config.get("model", "?"))}</b>, recipe {_esc(config.get("recipe", "?"))},
data {_esc(run.get("data", "?"))}; status <b class="status-{_esc(status)}">{_esc(status)}</b>;
evaluated {_esc(ckpt_desc)} on the test split; generated {_esc(generated)}</div>
{"".join(f'<div class="note">{n}</div>' for n in notes)}
<div class="cards">{cards_html}</div>
<h2>Training curves</h2>
{img("curves", "loss, accuracy and learning rate per epoch")}
<h2>Test metrics per class</h2>
<div class="row">{per_class}{img("per_class", "test accuracy per class")}</div>
<h2>Confusion matrix</h2>
<div class="row">{img("confusion", "confusion matrix heat map")}{cm_table}</div>
<h2>Predictions</h2>
<p class="sub">A fixed sample of test images: predicted class and confidence, true class below; mistakes in red.</p>
{img("predictions", "test images with predicted and true labels")}
<h2>Most confidently wrong</h2>
{img("confident_wrong", "the wrong predictions with the highest confidence")}
<h2>Epochs</h2>
{epochs_table}
<h2>Config</h2>
{_kv_table(config, "config")}
<h2>Run</h2>
{_kv_table(provenance, "run")}
</main></body></html>
"""


# --------------------------------------------------------------------------------------------------------------------
# the whole report


def build_report(
    run_dir: str | Path,
    data: str | None = None,
    *,
    out: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 1000,
    threads: int | None = None,
    home: Path | None = None,
    grid: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the plots, report.json and index.html of a finished or interrupted run into `out` (RUN_DIR/report).

    `data` defaults to the run's own source (run.json's "data"). Returns what report.json holds.
    """
    root = Path(run_dir)
    checkpoint_path = pick_checkpoint(root)
    run = _read_json(root / "run.json")
    config = _read_yaml(root / "config.yaml")
    history = read_metrics(root / "metrics.csv")
    source = data or run.get("data")
    if not source:
        raise CifarCnnError(f"{root}: run.json does not say which data the run used; pass --data SOURCE")
    report_dir = Path(out) if out is not None else root / REPORT_DIRNAME
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarCnnError(f"{report_dir}: cannot create the report folder ({exc.strerror or exc})") from None

    ckpt = load_checkpoint(checkpoint_path)
    if not config:
        config = dict(ckpt.get("config", {}))
    metrics, images, labels, probs = evaluate_run(
        checkpoint_path,
        str(source),
        device=device,
        precision=precision,
        batch_size=batch_size,
        threads=threads,
        home=home,
        log=log,
    )
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
    files = {name: str(report_dir / f"{name}.png") for name in pngs}
    summary = {
        "run_dir": str(root),
        "report": str(report_dir / "index.html"),
        "status": run.get("status"),
        "data": str(source),
        "checkpoint": ckpt_info,
        "epochs_completed": len(history),
        "epochs": config.get("epochs"),
        "history": history,
        "curves": curves["data"],
        "files": files,
        "confident_mistakes": mistakes,
        "test_metrics": metrics,
    }
    atomic_write_text(report_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    log(f"report: {report_dir / 'index.html'} ({checkpoint_path.name}, test accuracy {_pct(metrics['accuracy'])})")
    return summary
