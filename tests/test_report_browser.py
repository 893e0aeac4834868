"""The report's mistake browser, heat maps and calibration: the clickable confusion matrix is clicked in headless
Chromium (from a file:// URL, offline) and must list exactly the images of the cell, highest loss first, each with
the right pixels and the right Grad-CAM map; the calibration figures must be what `calibration_metrics` gives for an
independent evaluation. (The rest of the report: test_report.py.)

One small run is shared by the module: seed_cnn, 2 epochs at a low LR on generated data with 40 test images a class
(so that cells hold more than 25 images and some are mistakes), its checkpoint given temperature 1.7.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cifar_cnn import resolve_config, train
from cifar_cnn.calibration import calibration_metrics
from cifar_cnn.checkpoint import load_checkpoint, save_checkpoint
from cifar_cnn.evaluate import evaluate_checkpoint
from cifar_cnn.explain import Explainer, heat_colors
from cifar_cnn.report import build_report
from cifar_cnn.report.browser import CELL_LIMIT, MAX_IMAGES, pick_cells

from .conftest import make_images, write_official_batches
from .helpers import CHROMIUM, CHROMIUM_ARGS, quiet

TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run, its report, and an independent evaluation of best.pt on the test split (with logits)."""
    root = tmp_path_factory.mktemp("browser")
    x, y = make_images(60, seed=1)
    tx, ty = make_images(40, seed=2)
    data = write_official_batches(root / "cifar-10-batches-py", x, y, tx, ty)
    config = resolve_config(
        "seed", None, dict(epochs=2, batch_size=32, lr=0.005, momentum=0.9, device="cpu", precision="fp32")
    )
    out = root / "run"
    train(config, str(data), out, home=root / "home", log=quiet, threads=1)
    ckpt = load_checkpoint(out / "best.pt")
    save_checkpoint(out / "best.pt", ckpt | {"temperature": TEMPERATURE})
    summary = build_report(out, str(data), precision="fp32", threads=1, home=root / "home", log=quiet)
    test = evaluate_checkpoint(
        out / "best.pt", str(data), precision="fp32", threads=1, home=root / "home", log=quiet, with_logits=True
    )
    return {"out": out, "summary": summary, "test": test, "page": out / "report" / "index.html"}


def served(test) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, per-image loss) at the checkpoint's temperature, with torch in float64."""
    z = test.logits.double() / TEMPERATURE
    labels = torch.from_numpy(np.asarray(test.labels))
    return torch.softmax(z, 1).numpy(), F.cross_entropy(z, labels, reduction="none").numpy()


def expected_cell(test, true: int, pred: int) -> list[int]:
    """The test indices a cell must list: its images by loss, highest first (ties: lower index), at most 25."""
    probs, loss = served(test)
    members = np.flatnonzero((np.asarray(test.labels) == true) & (probs.argmax(1) == pred)).tolist()
    return sorted(members, key=lambda k: (-loss[k], k))[:25]


def decode_data_uri(uri: str) -> np.ndarray:
    head, _, payload = uri.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64"), head[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")).astype(int)


def click_and_read(page, true: int, pred: int) -> list[dict]:
    """Click cell (true, pred) of the HTML confusion matrix; the panel's figures as shown."""
    page.locator("#confusion-matrix tr").nth(true + 1).locator("td").nth(pred).click()
    page.wait_for_selector(f'#browser[data-cell="{true},{pred}"]')
    return page.eval_on_selector_all(
        "#browser figure",
        """figs => figs.map(f => ({
            index: Number(f.dataset.index),
            image: f.querySelector('img').src,
            heat: f.querySelector('canvas') ? f.querySelector('canvas').toDataURL('image/png') : null,
            text: f.textContent}))""",
    )


def check_shown(shown: list[dict], test, true: int, pred: int, classes: list[str], ckpt_path: Path) -> None:
    """The figures are the cell's images in loss order, with the pixels of those test images and their maps."""
    assert [s["index"] for s in shown] == expected_cell(test, true, pred)
    probs, loss = served(test)
    images = np.asarray(test.images).transpose(0, 2, 3, 1).astype(int)
    indices = [s["index"] for s in shown]
    maps = Explainer.from_checkpoint(ckpt_path, threads=1).maps(
        np.asarray(test.images)[indices], "gradcam", [pred] * len(indices)
    )
    for s, heat in zip(shown, maps):
        k = s["index"]
        pixels = decode_data_uri(s["image"])
        assert np.abs(pixels - images[k]).mean() < 12, k  # a JPEG of this very image (noise-like: JPEG loses more)
        assert np.abs(images - pixels).mean(axis=(1, 2, 3)).argmin() == k  # and of no other test image
        drawn = decode_data_uri(s["heat"])  # the map as the script painted it: 16 x 16 in inferno colours
        small = heat.reshape(16, 2, 16, 2).mean(axis=(1, 3))
        assert np.abs(drawn - heat_colors(small).astype(int)).max() <= 12, k
        assert f"#{k}" in s["text"] and f"loss {loss[k]:.3f}" in s["text"]
        assert f"predicted {classes[pred]} {100 * probs[k, pred]:.1f}%" in s["text"]
        assert f"true {classes[true]} {100 * probs[k, true]:.1f}%" in s["text"]


def test_clicked_cells_show_their_images_by_loss(run: dict, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    test, classes = run["test"], run["test"].metrics["classes"]
    cm = np.asarray(test.metrics["confusion_matrix"])
    off = cm - np.diag(np.diag(cm))
    assert off.sum() > 0 and cm.max() > CELL_LIMIT, cm  # the fixture has mistakes and a cell past the limit
    mistake = np.unravel_index(off.argmax(), cm.shape)
    full = np.unravel_index(cm.argmax(), cm.shape)
    empty = np.argwhere(cm == 0)[0]
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(run["page"].resolve().as_uri())
            for true, pred in (mistake, full):
                true, pred = int(true), int(pred)
                shown = click_and_read(page, true, pred)
                assert len(shown) == min(CELL_LIMIT, cm[true, pred]) > 0
                check_shown(shown, test, true, pred, classes, run["out"] / "best.pt")
                assert page.locator("#confusion-matrix td.sel").count() == 1
            assert click_and_read(page, int(empty[0]), int(empty[1])) == []
            assert "0 images" in page.inner_text("#browser")
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), [u[:60] for u in requests]


def test_report_json_and_page_hold_the_calibration(run: dict) -> None:
    summary, test = run["summary"], run["test"]
    expected = calibration_metrics(test.logits.numpy(), test.labels, TEMPERATURE)
    stored = summary["test_metrics"]
    assert stored["temperature"] == TEMPERATURE
    for key in ("ece", "nll", "mean_confidence"):
        assert stored[key] == pytest.approx(expected[key], rel=1e-6), key
    for key in ("ece", "nll"):
        assert stored["uncalibrated"][key] == pytest.approx(expected["uncalibrated"][key], rel=1e-6), key
    assert stored["ece"] != pytest.approx(stored["uncalibrated"]["ece"])  # the temperature did change something
    assert [b["count"] for b in stored["reliability"]] == [b["count"] for b in expected["reliability"]]
    assert json.loads((run["out"] / "report" / "report.json").read_text())["test_metrics"]["ece"] == stored["ece"]
    page = run["page"].read_text()
    table = re.search(r'<table id="calibration">(.*?)</table>', page).group(1)
    assert f"{100 * expected['ece']:.2f}%" in table and f"{expected['nll']:.4f}" in table
    assert (
        f"{100 * expected['uncalibrated']['ece']:.2f}%" in table and f"{expected['uncalibrated']['nll']:.4f}" in table
    )
    assert "temperature 1.7" in table
    with Image.open(run["out"] / "report" / "reliability.png") as im:
        assert im.size[0] >= 300 and im.size[1] >= 300


def test_heat_maps_are_timed_and_the_page_is_self_contained(run: dict) -> None:
    summary, test = run["summary"], run["test"]
    probs, _ = served(test)
    labels = np.asarray(test.labels)
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    surest = sorted(wrong.tolist(), key=lambda k: (-probs[k, preds[k]], k))[:16]
    assert summary["confident_mistakes"] == surest
    explained = summary["explanations"]
    cm = np.asarray(test.metrics["confusion_matrix"])
    listed = int(np.minimum(cm, CELL_LIMIT).sum())
    assert explained["browser"]["images"] == listed and explained["browser"]["cells"] == int((cm > 0).sum())
    assert explained["images"] == len(
        set(surest) | {k for t, p in np.argwhere(cm > 0) for k in expected_cell(test, t, p)}
    )
    assert explained["method"] == "gradcam" and explained["layer"] and 0 < explained["seconds"] < 60
    assert summary["seconds"]["total"] > summary["seconds"]["evaluate"] > 0
    page = run["page"].read_text()
    assert summary["page_bytes"] == len(page.encode())
    assert not re.search(r'(?:src|href)\s*=\s*["\'](?!data:)', page)  # every image is a data URI
    assert not re.search(r"<script[^>]*\ssrc|<link|https?://", page)  # no script, style or page from elsewhere


def test_many_classes_embed_mistakes_first_within_the_budget() -> None:
    # 40 classes: 1,000 correct images to list (25 a class) and about 2,300 mistakes in 1 to 3 images a cell
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(40, 40))
    np.fill_diagonal(counts, 90)
    cells = {(int(t), int(p)): list(range(min(CELL_LIMIT, counts[t, p]))) for t, p in np.argwhere(counts > 0)}
    mistakes = sorted((c for c in cells if c[0] != c[1]), key=lambda c: (-counts[c], c))
    listed = sum(len(cells[c]) for c in mistakes)
    assert listed < MAX_IMAGES < listed + 25 * 40  # every mistake fits, not every correct cell
    chosen = pick_cells(cells, counts)
    assert chosen[: len(mistakes)] == mistakes  # all mistakes, most confused first
    kept = (MAX_IMAGES - listed) // CELL_LIMIT
    assert chosen[len(mistakes) :] == [(c, c) for c in range(kept)]  # then as many correct cells as fit
