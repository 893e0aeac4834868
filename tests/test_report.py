"""Seeing a training: the progress lines of a CLI run, TensorBoard events, plots, the HTML report (rendered in
headless Chromium), reports of interrupted runs, and sample images per class. (The progress bar alone:
test_progress.py.)

One small CLI training (2 epochs on the tiny data set, with --tensorboard and --json) is shared by the module.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_cnn import resolve_config, train
from cifar_cnn.cli import main
from cifar_cnn.data import load_dataset
from cifar_cnn.report import build as report_build
from cifar_cnn.report import (
    build_report,
    confusion_figure,
    plot_confusion,
    plot_curves,
    plot_per_class,
    prediction_captions,
    read_metrics,
)
from cifar_cnn.report.browser import render_browser

from .conftest import make_images, run_cli, write_official_batches
from .helpers import quiet

CHROMIUM = "/usr/bin/chromium"
PNGS = ("curves", "confusion", "per_class", "predictions", "confident_wrong", "reliability")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`cifar-cnn train --tensorboard --json` for 2 epochs; a low LR so the test split keeps some mistakes."""
    root = tmp_path_factory.mktemp("report")
    x, y = make_images(60, seed=1)
    tx, ty = make_images(20, seed=2)
    data = write_official_batches(root / "cifar-10-batches-py", x, y, tx, ty)
    env = {"CIFAR_CNN_HOME": str(root / "home")}
    out = root / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "32", "--lr", "0.005",
        "--momentum", "0.9", "--precision", "fp32", "--threads", "1", "--tensorboard", "--json", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "data": data, "env": env, "proc": proc}


def metrics_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path, min_size: tuple[int, int] = (300, 150)) -> Image.Image:
    with Image.open(path) as im:
        im.verify()
    im = Image.open(path).convert("RGB")
    assert im.format is None or im.format == "PNG"
    w, h = im.size
    assert min_size[0] <= w <= 4000 and min_size[1] <= h <= 4000, (path, im.size)
    assert len(im.getcolors(1 << 24)) > 20, f"{path} is nearly blank"
    return im


class TableReader(HTMLParser):
    """The cell texts of the <table id=...> tables of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table" and "id" in a:
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_train_progress_json_and_tensorboard(cli_run: dict) -> None:
    proc, out = cli_run["proc"], cli_run["out"]
    summary = json.loads(proc.stdout)  # stdout holds exactly one JSON object; progress went to stderr
    assert summary["report"] == str(out / "report" / "index.html") and Path(summary["report"]).is_file()
    err = proc.stderr
    assert "\r" not in err and "\x1b" not in err, "progress wrote control codes into a non-terminal stream"
    lines = re.findall(r"epoch (\d)/2  step (\d+)/15  loss \d+\.\d{4}  acc [\d.]+%  \d+ img/s  (ETA|\d)", err)
    assert [(e, s) for e, s, _ in lines if s == "15"] == [("1", "15"), ("2", "15")]
    assert [int(s) for e, s, _ in lines if e == "1"] == [1, *range(2, 15, 2), 15]  # step 1, each tenth, the end
    assert re.search(r"^epoch 2/2  train loss .* val loss", err, re.M)  # the epoch summary line

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    rows = metrics_csv(out / "metrics.csv")
    for tag, col in [
        ("loss/train", "train_loss"),
        ("loss/val", "val_loss"),
        ("accuracy/train", "train_acc"),
        ("accuracy/val", "val_acc"),
        ("lr", "lr"),
    ]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2], tag
        assert [e.value for e in events] == pytest.approx([float(r[col]) for r in rows], rel=1e-6), tag
    test = json.loads((out / "test_metrics.json").read_text())
    assert acc.Scalars("accuracy/test")[0].value == pytest.approx(test["accuracy"])
    tags = acc.Tags()["images"]
    assert "test/confusion_matrix" in tags and any(t.startswith("data/sample_batch") for t in tags), tags
    sample = next(t for t in tags if t.startswith("data/sample_batch"))
    grid = Image.open(io.BytesIO(acc.Images(sample)[0].encoded_image_string))
    assert grid.size[0] >= 4 * 32 and grid.size[1] >= 4 * 32  # 32 images of 32x32 tiled


def test_plots_open_and_curves_are_metrics_csv(cli_run: dict) -> None:
    out = cli_run["out"]
    report = out / "report"
    for name in PNGS:
        assert_png(report / f"{name}.png")
    rows = metrics_csv(out / "metrics.csv")
    epochs = [float(r["epoch"]) for r in rows]
    expected = {
        "loss": {"train": "train_loss", "validation": "val_loss"},
        "accuracy": {"train": "train_acc", "validation": "val_acc"},
        "learning rate": {"lr (end of epoch)": "lr"},
    }
    # what the figure holds, read back from its lines, in report.json and from a fresh figure
    stored = json.loads((report / "report.json").read_text())["curves"]
    fresh = plot_curves(read_metrics(out / "metrics.csv"))["data"]
    for curves in (stored, fresh):
        assert set(curves) == set(expected)
        for panel, lines in expected.items():
            assert set(curves[panel]) == set(lines), panel
            for label, col in lines.items():
                assert curves[panel][label]["epoch"] == epochs == [1.0, 2.0]
                assert curves[panel][label]["value"] == [float(r[col]) for r in rows], (panel, label)


def test_report_command_confusion_matrix_is_evaluates(cli_run: dict) -> None:
    out, data, env = cli_run["out"], cli_run["data"], cli_run["env"]
    rep = run_cli("report", str(out), "--json", env=env)  # --data defaults to the run's own (run.json)
    assert rep.returncode == 0, rep.stderr
    summary = json.loads(rep.stdout)
    ev = run_cli("evaluate", str(out / "best.pt"), "--data", str(data), "--json", env=env)
    assert ev.returncode == 0, ev.stderr
    evaluated = json.loads(ev.stdout)
    cm = evaluated["confusion_matrix"]
    assert np.array(cm).sum() == 200 and np.trace(np.array(cm)) < 200  # some mistakes to show
    assert summary["checkpoint"]["name"] == "best.pt" and summary["data"] == str(data)
    assert summary["test_metrics"] == evaluated | {"checkpoint": summary["test_metrics"]["checkpoint"]}
    # the HTML table, the heat map's cells and colours show the same numbers
    page = (out / "report" / "index.html").read_text()
    reader = TableReader()
    reader.feed(page)
    table = reader.tables["confusion-matrix"]
    assert table[0][1:] == evaluated["classes"]
    assert [[int(v) for v in row[1:]] for row in table[1:]] == cm
    assert [row[0] for row in table[1:]] == evaluated["classes"]
    drawn = plot_confusion(cm, evaluated["classes"])
    assert drawn["annotations"] == cm and drawn["data"] == cm
    per_class = {row[0]: row[1:] for row in reader.tables["per-class"][1:]}
    for c in evaluated["classes"]:
        acc = evaluated["per_class_accuracy"][c]
        assert per_class[c][0] == str(int(np.array(cm)[evaluated["classes"].index(c)].sum()))
        assert per_class[c][1] == f"{100 * acc:.2f}%"
    # self-contained: every image is a data URI, nothing is fetched
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:)', page)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == len(PNGS)
    assert [r[0] for r in reader.tables["epochs"][1:]] == ["1", "2"]


def test_html_report_renders_in_headless_chromium(cli_run: dict, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does: apt-get install chromium)")
    shot = tmp_path / "shot.png"
    page = (cli_run["out"] / "report" / "index.html").resolve()
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
        page.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 2000)
    px = np.asarray(im).reshape(-1, 3).astype(int)
    assert len(np.unique(px @ np.array([1 << 16, 1 << 8, 1]))) > 500, "the screenshot has too few colours"
    assert (px.min(1) > 240).mean() < 0.97, "the screenshot is (nearly) all white"

    def near(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(px - np.array(rgb)).max(1) <= 12).sum())

    assert near((31, 119, 180)) > 300, "no train curve (tab:blue) in view"
    assert near((255, 127, 14)) > 150, "no validation curve (tab:orange) in view"
    assert near((238, 241, 244)) > 2000, "no table header cells in view"


def small_config(**overrides):
    base = dict(epochs=2, batch_size=32, lr=0.005, momentum=0.9, device="cpu", precision="fp32", eval_batch_size=64)
    return resolve_config("seed", None, base | overrides)


def stop_after(n: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= n

    return should_stop


def test_interrupted_runs_get_a_report(tmp_path: Path, official_dir: Path) -> None:
    # stopped in epoch 2 (step 5 of 15): one logged epoch, best.pt from epoch 1, no test_metrics.json
    out = tmp_path / "half"
    res = train(small_config(), str(official_dir), out, log=quiet, threads=1, should_stop=stop_after(20))
    assert res["interrupted"] and not (out / "test_metrics.json").exists()
    summary = build_report(out, precision="fp32", log=quiet)  # data from run.json
    assert summary["status"] == "interrupted" and summary["checkpoint"]["name"] == "best.pt"
    rows = metrics_csv(out / "metrics.csv")
    assert len(rows) == 1 and summary["epochs_completed"] == 1
    assert summary["curves"]["loss"]["train"] == {"epoch": [1.0], "value": [float(rows[0]["train_loss"])]}
    assert summary["curves"]["accuracy"]["validation"]["value"] == [float(rows[0]["val_acc"])]
    assert np.array(summary["test_metrics"]["confusion_matrix"]).sum() == 200
    page = (out / "report" / "index.html").read_text()
    assert "interrupted" in page and "1 of 2 epochs" in page
    for name in PNGS:
        assert_png(out / "report" / f"{name}.png")

    # stopped in epoch 1: nothing logged yet, no best.pt; the report evaluates last.pt (saved mid-epoch)
    out = tmp_path / "early"
    train(small_config(), str(official_dir), out, log=quiet, threads=1, should_stop=stop_after(3))
    assert not (out / "best.pt").exists() and metrics_csv(out / "metrics.csv") == []
    summary = build_report(out, str(official_dir), precision="fp32", log=quiet)
    assert summary["checkpoint"]["name"] == "last.pt" and summary["checkpoint"]["batch_in_epoch"] == 3
    assert summary["epochs_completed"] == 0 and summary["curves"]["loss"]["train"]["epoch"] == []
    assert "has no best.pt" in (out / "report" / "index.html").read_text()
    assert_png(out / "report" / "curves.png")


def test_show_data_one_row_per_class(tmp_path: Path, official_dir: Path, capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "samples" / "classes.png"
    assert main(["show-data", "--data", str(official_dir), "--out", str(png), "--per-class", "5", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    ds = load_dataset(str(official_dir), log=quiet)
    assert shown["classes"] == ds.classes and shown["shown"] == {c: 5 for c in ds.classes}
    for i, c in enumerate(ds.classes):
        assert (ds.train_labels[shown["indices"][c]] == i).all(), c  # each row holds images of its class
    im = assert_png(png, min_size=(400, 800))
    assert im.size[1] > im.size[0]  # 10 rows of 5


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"cifar-cnn: error: {tmp_path / 'missing'}: no such run directory"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither best.pt nor last.pt" in err[0]


# ---- names of any bytes, damaged inputs, a report that fails (issue 16) ---------------------------------------------

RUN_FILES = ("best.pt", "last.pt", "config.yaml", "metrics.csv", "run.json", "test_metrics.json")


def copy_run(src: Path, dest: Path, *, with_report: bool = False) -> Path:
    dest.mkdir(parents=True)
    for name in RUN_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    if with_report:
        shutil.copytree(src / "report", dest / "report")
    return dest


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_report_of_a_run_and_data_named_with_any_bytes(cli_run: dict, tmp_path: Path) -> None:
    run = copy_run(cli_run["out"], tmp_path / os.fsdecode(b"r\xe9port \x1b run"))
    data = tmp_path / os.fsdecode(b"d\xe9ta")
    shutil.copytree(cli_run["data"], data)
    record = json.loads((run / "run.json").read_text())
    record["data"], record["command_line"] = str(data), ["cifar-cnn", "train", "--data", str(data)]
    (run / "run.json").write_text(json.dumps(record))  # surrogates written as \udce9, read back as surrogates
    env = cli_run["env"] | {"PYTHONIOENCODING": "utf-8:strict"}
    r = run_cli("report", str(run), "--data", str(data), "--json", env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    shown_run, shown_data = f"{tmp_path}/r\\xe9port \\x1b run", f"{tmp_path}/d\\xe9ta"
    assert "\\ud" not in r.stdout  # strict JSON: no lone surrogates
    summary = json.loads(r.stdout)
    assert summary["run_dir"] == shown_run and summary["data"] == shown_data
    assert summary["report"] == f"{shown_run}/report/index.html"
    saved = (run / "report" / "report.json").read_text(encoding="utf-8")
    assert "\\ud" not in saved and json.loads(saved)["run_dir"] == shown_run
    page = (run / "report" / "index.html").read_text(encoding="utf-8", errors="strict")
    assert "r\\xe9port \\x1b run" in page and shown_data in page and "\\ud" not in page


def test_class_names_of_any_bytes_in_figures_and_the_browser() -> None:
    classes = ["caf\udce9", "esc\x1b[2J", "plain"]
    drawn = plot_confusion([[2, 0, 0], [1, 1, 0], [0, 0, 2]], classes)
    assert drawn["png"].startswith(b"\x89PNG")
    figure = confusion_figure([[2, 0, 0], [1, 1, 0], [0, 0, 2]], classes)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["caf\\xe9", "esc\\x1b[2J", "plain"]
    assert plot_per_class(dict(zip(classes, [1.0, 0.5, None])), 0.6)["png"].startswith(b"\x89PNG")
    captions, _ = prediction_captions(np.array([0]), np.array([[0.1, 0.9, 0.0]]), classes, [0])
    assert captions == ["✗ esc\\x1b[2J 90%\ntrue: caf\\xe9"]
    panel = render_browser({}, classes)
    panel.encode("utf-8")  # a lone surrogate would raise here
    assert '["caf\\\\xe9","esc\\\\x1b[2J","plain"]' in panel


def test_a_damaged_input_or_a_failure_leaves_the_previous_report_whole(
    cli_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(cli_run["out"], tmp_path / "run", with_report=True)
    before = files_of(run / "report")
    good_metrics = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(good_metrics + "3,2.1,0.3,x,0.2,0.01\n")
    assert main(["report", str(run), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cifar-cnn: error: {run}/metrics.csv:4: 6 cells under a header of 7; " + report_build.METRICS_FIX]
    entries = sorted([*RUN_FILES, "report"])
    assert files_of(run / "report") == before and sorted(p.name for p in run.iterdir()) == entries

    (run / "metrics.csv").write_text(good_metrics)
    home = Path(cli_run["env"]["CIFAR_CNN_HOME"])

    def broken_page(**kwargs):  # the figures are drawn by now; the page fails
        raise RuntimeError("the page failed")

    monkeypatch.setattr(report_build, "render_html", broken_page)
    with pytest.raises(RuntimeError, match="the page failed"):
        build_report(run, home=home, threads=1, log=quiet)
    assert files_of(run / "report") == before, "a failed report changed the previous one"
    assert sorted(p.name for p in run.iterdir()) == entries, "staging left behind"
    monkeypatch.undo()

    leftover = run / ".report.staging-999999999"  # a killed report's staging folder (no such process)
    leftover.mkdir()
    (run / "report" / "stale.png").write_bytes(b"from an older version")  # not a report file: kept
    summary = build_report(run, home=home, threads=1, log=quiet)
    assert not leftover.exists() and (run / "report" / "stale.png").exists()
    after = files_of(run / "report")
    assert after["index.html"] != before["index.html"] and set(after) == set(before) | {"stale.png"}
    assert summary["report"] == str(run / "report" / "index.html")
    (run / "report" / "stale.png").unlink()
    build_report(run, home=home, threads=1, log=quiet)  # a folder holding only a report: swapped whole
    assert set(files_of(run / "report")) == set(before) and not list(run.glob(".report.*"))


def test_train_and_its_report_with_non_utf8_folder_names(tmp_path: Path) -> None:
    """The issue's case: data and run folders named with bytes that are not UTF-8, output to a strict UTF-8 stream;
    training and its report finish (exit 0), every line readable."""
    x, y = make_images(20, seed=1)
    data = write_official_batches(tmp_path / os.fsdecode(b"d\xe9ta"), x, y, x[:40], y[:40])
    out = tmp_path / os.fsdecode(b"r\xfcn")
    env = {"CIFAR_CNN_HOME": str(tmp_path / "home"), "PYTHONIOENCODING": "utf-8:strict"}
    argv = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "40", "--threads", "1"]
    r = run_cli(*argv, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"report: {tmp_path}/r\\xfcn/report/index.html" in r.stdout
    page = (out / "report" / "index.html").read_text(encoding="utf-8", errors="strict")
    assert f"{tmp_path}/d\\xe9ta" in page
