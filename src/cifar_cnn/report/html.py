"""The report as one self-contained HTML page (images embedded as data URIs, readable offline)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from ..names import shown, shown_strings
from ..rundir import LAST
from .browser import BROWSER_CSS, CELL_LIMIT


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(v: Any) -> str:
    """Text for the page: names of any bytes shown (cifar_cnn.names), then HTML-escaped."""
    return html.escape(shown(str(v)), quote=True)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _compact(value: dict[str, Any] | list[Any]) -> str:
    """A list or mapping as JSON for reading: names shown (cifar_cnn.names), other characters as they are."""
    return json.dumps(shown_strings(value), ensure_ascii=False)


def _kv_table(items: dict[str, Any], table_id: str) -> str:
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(_compact(v) if isinstance(v, (dict, list)) else v)}</td></tr>"
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


def _calibration_table(metrics: dict[str, Any]) -> str:
    """ECE and NLL of the probabilities as served (with the checkpoint's temperature) and at temperature 1."""
    if "ece" not in metrics:
        return ""
    raw = metrics["uncalibrated"]
    rows = [
        (f"as served (temperature {metrics['temperature']:.4g})", metrics["ece"], metrics["nll"]),
        ("uncalibrated (temperature 1)", raw["ece"], raw["nll"]),
    ]
    body = "".join(f"<tr><th>{_esc(name)}</th><td>{pct(ece)}</td><td>{_num(nll)}</td></tr>" for name, ece, nll in rows)
    mean = metrics.get("mean_confidence")
    tail = f"<tr><th>mean confidence (as served)</th><td colspan=2>{pct(mean)}</td></tr>" if mean is not None else ""
    return (
        f'<table id="calibration"><tr><th>probabilities</th><th>ECE (15 bins)</th><th>NLL</th></tr>{body}{tail}</table>'
    )


def _browser_intro(explained: dict[str, Any]) -> str:
    """What a click on the confusion matrix shows, and which cells the page left out (browser.MAX_IMAGES)."""
    held = explained.get("browser", {})
    left_out = held.get("cells_with_images", 0) - held.get("cells", 0)
    more = (
        f" The page holds the images of {held['cells']} of the {held['cells_with_images']} non-empty cells "
        f"({held['images']} images): the mistakes first, most confused first, then the correct predictions."
        if left_out > 0
        else ""
    )
    return (
        "<p class='sub'>Click a cell of the table: its test images (true class = row, predicted = column), at most "
        f"{CELL_LIMIT}, highest loss first, each beside its Grad-CAM map.{more}</p>"
    )


def _per_class_table(metrics: dict[str, Any]) -> str:
    classes, cm = metrics["classes"], metrics["confusion_matrix"]
    support = [int(sum(row)) for row in cm]
    rows = "".join(
        f"<tr><th>{_esc(c)}</th><td>{support[i]}</td>"
        f"<td><span class='bar' style='width:{60 * (metrics['per_class_accuracy'][c] or 0):.0f}px'></span>"
        f"{pct(metrics['per_class_accuracy'][c])}</td>"
        f"<td>{pct(metrics['per_class_precision'][c])}</td><td>{_num(metrics['per_class_f1'][c], 3)}</td></tr>"
        for i, c in enumerate(classes)
    )
    return (
        '<table id="per-class"><tr><th>class</th><th>images</th><th>accuracy (recall)</th><th>precision</th>'
        f"<th>F1</th></tr>{rows}</table>"
    )


def _confusion_table(classes: list[str], cm: list[list[int]]) -> str:
    head = "".join(f"<th title='predicted {_esc(c)}'>{_esc(c)}</th>" for c in classes)
    body = "".join(
        f"<tr><th>{_esc(classes[i])}</th>"
        + "".join(f"<td{' class=diag' if i == j else ''}>{v}</td>" for j, v in enumerate(row))
        + "</tr>"
        for i, row in enumerate(cm)
    )
    return f'<table id="confusion-matrix"><tr><th>true \\ predicted</th>{head}</tr>{body}</table>'


def _epochs_table(history: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{int(r['epoch'])}</td><td>{_num(r['train_loss'])}</td><td>{pct(r['train_acc'])}</td>"
        f"<td>{_num(r['val_loss'])}</td><td>{pct(r['val_acc'])}</td><td>{r['lr']:.4g}</td>"
        f"<td>{_num(r['seconds'], 1)}</td></tr>"
        for r in history
    )
    return (
        '<table id="epochs"><tr><th>epoch</th><th>train loss</th><th>train acc</th><th>val loss</th><th>val acc</th>'
        f"<th>lr</th><th>seconds</th></tr>{rows}</table>"
    )


def render_html(
    *,
    run_dir: Path,
    run: dict[str, Any],
    config: dict[str, Any],
    history: list[dict[str, Any]],
    checkpoint: dict[str, Any],
    metrics: dict[str, Any],
    images: dict[str, bytes],
    browser: str = "",
    explained: dict[str, Any] | None = None,
) -> str:
    """The report as one HTML page; `images` maps figure names to PNG bytes, embedded as data URIs; `browser` is the
    mistake browser's panel and script (browser.render_browser), `explained` what the heat maps were made with."""
    classes = metrics["classes"]
    cm = metrics["confusion_matrix"]
    status = run.get("status") or "unknown"
    title = f"cifar-cnn report: {run_dir.name}"
    notes = []
    if checkpoint["name"] == LAST:
        notes.append(
            f"This run has no best.pt: the report evaluates last.pt, saved at epoch {checkpoint['epoch']}"
            f" step {checkpoint['batch_in_epoch']} ({_esc(checkpoint['note'])})."
        )
    if status != "finished":
        notes.append(
            f"The run is <b>{_esc(status)}</b>: {len(history)} of {_esc(config.get('epochs', '?'))} epochs "
            "completed; the curves show what it logged."
        )

    per_class = _per_class_table(metrics)
    cm_table = _confusion_table(classes, cm)
    epochs_table = _epochs_table(history)
    cards = [
        (pct(metrics["accuracy"]), "test accuracy"),
        (pct(metrics["top5_accuracy"]), "top-5 accuracy"),
        (_num(metrics["loss"]), "test loss"),
        (_num(metrics["macro_f1"], 3), "macro F1"),
        (str(metrics["num_images"]), "test images"),
        (f"{len(history)} / {config.get('epochs', '?')}", "epochs"),
    ]
    if "ece" in metrics:
        cards.insert(3, (pct(metrics["ece"]), f"ECE (T = {metrics['temperature']:.3g})"))
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

    explained = explained or {}
    heat_note = (
        f"<p class='note'>No heat maps: {_esc(explained['note'])}</p>"
        if "note" in explained
        else "<p class='sub'>Each beside its Grad-CAM map for the predicted class: where the model looked to say it."
        "</p>"
    )
    browser_intro = _browser_intro(explained) if browser else ""
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{CSS}{BROWSER_CSS}</style></head>
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
{browser_intro}
<div class="row">{img("confusion", "confusion matrix heat map")}{cm_table}</div>
{browser}
<h2>Calibration</h2>
<p class="sub">How far the stated confidence is from the accuracy: expected calibration error over 15 equal-width
bins of top-1 confidence, and the mean negative log-likelihood of the true class.</p>
<div class="row">{_calibration_table(metrics)}{img("reliability", "reliability: accuracy per confidence bin")}</div>
<h2>Predictions</h2>
<p class="sub">A fixed sample of test images: predicted class and confidence, true class below; mistakes in red.</p>
{img("predictions", "test images with predicted and true labels")}
<h2>Most confidently wrong</h2>
{heat_note}
{img("confident_wrong", "the wrong predictions with the highest confidence, with their heat maps")}
<h2>Epochs</h2>
{epochs_table}
<h2>Config</h2>
{_kv_table(config, "config")}
<h2>Run</h2>
{_kv_table(provenance, "run")}
</main></body></html>
"""
